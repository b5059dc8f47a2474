// State logic of frontend/incoming.js over the WebSocket, with a fake WebSocket and fake timers.
// Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import { file, load, settle } from "./harness.mjs";

// The tests of the WebSocket path ask for it: HTTP is the default.
const WS = { transport: "websocket" };

async function confirmed(env, up, conf) {
  up.start();
  const socket = env.sockets.at(-1);
  socket.open();
  socket.receive("MsgUploadConf", conf);
  await settle();
  return socket;
}

test("the URL follows the page's protocol and the server hostname", () => {
  const env = load();
  assert.deepEqual(Object.keys(env.incoming).sort(), ["Uploader", "find_upload", "set_server_hostname"]);
  env.incoming.set_server_hostname("up.example:4000");
  new env.incoming.Uploader("t", file(1), WS).start();
  assert.equal(env.sockets[0].url, "wss://up.example:4000/incoming/frontend/upload_ws");
});

test("request, ack, then chunks within the send-ahead window; progress counts acks", async () => {
  const env = load();
  const up = new env.incoming.Uploader("ticket-1", file(10 * 1024, "x.bin"), WS);
  const socket = await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 2 });
  assert.deepEqual(socket.sent[0], {
    MsgType: "MsgUploadReq",
    MsgData: { Id: "ticket-1", LengthBytes: 10240, Name: "x.bin" },
  });
  assert.deepEqual(socket.sent[1], { MsgType: "MsgAck", MsgData: { Ack: true } });
  assert.equal(socket.chunks().length, 2);
  assert.deepEqual([up.bytes_tx, up.bytes_acked, up.chunks_ahead, up.frac_complete], [2048, 0, 2, 0]);
  socket.receive("MsgChunkAck", { ChunkSize: 1024 });
  await settle();
  assert.equal(up.frac_complete, 0.1);
  assert.equal(socket.chunks().length, 3);
  assert.equal(up.state_msg, "Uploading");
});

test("a lost connection retries after about 1 s, doubling to 60 s, and resumes at FilePos", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * 1024), WS);
  let socket = await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 2 });
  const delays = [];
  for (let i = 0; i < 9; i++) {
    socket.drop();
    assert.match(up.state_msg, /^Connection lost; retrying in \d+ s$/);
    assert.equal(up.connected, false);
    delays.push(env.fire());
    socket = env.sockets.at(-1);
  }
  const nominal = [1, 2, 4, 8, 16, 32, 60, 60, 60];
  delays.forEach((ms, i) => {
    assert.ok(ms >= nominal[i] * 750 && ms <= nominal[i] * 1250, `retry ${i}: ${ms} ms`);
  });
  socket.open();
  socket.receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 4096, SendAhead: 2 });
  await settle();
  assert.equal(up.bytes_acked, 4096);
  assert.equal(up.bytes_tx, 6144);
  assert.equal(up.connected, true);
  socket.drop();
  assert.ok(env.fire() <= 1250, "the backoff starts over after a successful connection");
});

test("error 13 (another connection) is retried, without onerror; error 10 (unknown ticket) is final", async () => {
  const env = load();
  const errors = [];
  const up = new env.incoming.Uploader("t", file(100), WS);
  up.onerror = (u) => errors.push(u.error_code);
  up.start();
  env.sockets[0].open();
  env.sockets[0].receive("MsgError", { ErrorCode: 13, Msg: "busy" });
  env.sockets[0].drop();
  env.fire();
  env.sockets[1].open();
  env.sockets[1].receive("MsgError", { ErrorCode: 10, Msg: "unknown upload ticket" });
  env.sockets[1].drop();
  assert.deepEqual(errors, [10]);
  assert.equal(up.state_msg, "Error: unknown upload ticket");
  assert.deepEqual([up.can_pause, up.can_cancel, up.finished], [false, false, false]);
  assert.equal(env.timers.filter((t) => !t.cleared && !t.fired).length, 0);
});

test("errors 13, 23, 24 and 99 are retried without onerror; MsgUploadConf clears the error", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(4096), WS);
  const events = recorder(up);
  let socket = await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 });
  socket.drop();
  for (const [code, msg] of [[13, "another connection is serving this upload"],
                             [23, "the upload registry is unavailable; try again"],
                             [24, "the server's storage is full; resume later: nothing acknowledged is lost"],
                             [99, "internal server error"]]) {
    env.fire();
    socket = env.sockets.at(-1);
    socket.open();
    socket.receive("MsgError", { ErrorCode: code, Msg: msg });
    socket.drop();
    assert.deepEqual(events, [], `no onerror for ${code}`);
    assert.deepEqual([up.error_code, up.error_msg], [code, msg]);
    assert.equal(up.state_msg, `Interrupted: ${msg}; retrying in ${Math.round(env.timers.at(-1).ms / 1000)} s`);
    assert.deepEqual([up.can_cancel, up.can_pause, up.cancelled, up.finished], [true, true, false, false]);
  }
  env.fire();
  socket = env.sockets.at(-1);
  socket.open();
  socket.receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 1024, SendAhead: 1 });
  await settle();
  assert.deepEqual([up.error_code, up.error_msg, up.state_msg], [0, "", "Uploading"]);
  socket.drop();
  assert.match(up.state_msg, /^Connection lost; retrying in \d+ s$/);
  assert.deepEqual(events, []);
});

test("a cancel learnt on reconnect (12) ends as cancelled with the server's message", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(4096), WS);
  const events = recorder(up);
  (await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 })).drop();
  env.fire();
  env.sockets.at(-1).open();
  env.sockets.at(-1).receive("MsgError", { ErrorCode: 13, Msg: "another connection is serving this upload" });
  env.sockets.at(-1).drop();
  env.fire();
  const socket = env.sockets.at(-1);
  socket.open();
  socket.receive("MsgError", { ErrorCode: 12, Msg: "this upload was cancelled: expired" });
  socket.drop();
  assert.deepEqual(events, ["cancelled"]);
  assert.deepEqual([up.cancelled, up.cancelling, up.cancel_msg, up.state_msg, up.error_code],
                   [true, false, "this upload was cancelled: expired",
                    "Cancelled: this upload was cancelled: expired", 0]);
  assert.equal(env.timers.filter((t) => !t.cleared && !t.fired).length, 0);
});

test("pause closes the socket and unpause resumes", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(4096), WS);
  const socket = await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 });
  up.pause("toggle");
  assert.deepEqual(socket.messages("MsgPause"), [{ MsgType: "MsgPause", MsgData: { Pause: true } }]);
  assert.equal(socket.closed, true);
  assert.deepEqual([up.paused, up.state_msg, up.can_pause], [true, "Paused", true]);
  up.pause("unpause");
  assert.equal(env.sockets.length, 2);
  assert.equal(up.paused, false);
});

test("cancel while paused is cancelling until the server's MsgCancelAck", async () => {
  const env = load();
  const seen = [];
  const up = new env.incoming.Uploader("t", file(4096), WS);
  up.oncancelled = (u) => seen.push(u.cancel_msg);
  await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 });
  up.pause("pause");
  up.cancel("no longer needed");
  assert.deepEqual(seen, []);
  assert.deepEqual([up.cancelled, up.cancelling, up.paused, up.can_cancel, up.state_msg],
                   [false, true, false, false, "Cancelling"]);
  const socket = env.sockets.at(-1);
  socket.open();
  socket.receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 1024, SendAhead: 1 });
  await settle();
  assert.deepEqual(socket.messages("MsgCancel"), [
    { MsgType: "MsgCancel", MsgData: { Reason: "no longer needed" } },
  ]);
  assert.equal(socket.chunks().length, 0);
  assert.deepEqual(seen, []);
  socket.receive("MsgCancelAck", { Ack: true });
  assert.deepEqual(seen, ["no longer needed"]);
  assert.deepEqual([up.cancelled, up.cancelling, up.state_msg],
                   [true, false, "Cancelled: no longer needed"]);
});

function recorder(up) {
  const events = [];
  up.oncancelled = () => events.push("cancelled");
  up.onfinished = () => events.push("finished");
  up.onerror = (u) => events.push("error " + u.error_code);
  return events;
}

test("a cancel while disconnected reconnects with backoff, then ends as the server says", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(4096), WS);
  const events = recorder(up);
  const first = await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 });
  first.drop();
  up.cancel("gone");
  assert.deepEqual(events, []);
  assert.deepEqual([up.cancelling, up.cancelled, up.state_msg], [true, false, "Cancelling"]);
  assert.equal(env.sockets.length, 2, "the cancel connects at once, not after the retry delay");
  env.sockets[1].drop(); // the server is unreachable
  assert.match(up.state_msg, /^Cancelling; retrying in \d+ s$/);
  assert.ok(env.fire() <= 1250);
  env.sockets[2].drop();
  const second = env.fire();
  assert.ok(second >= 1500 && second <= 2500, `the existing backoff: ${second} ms`);
  assert.deepEqual(events, []);
  const socket = env.sockets[3];
  socket.open();
  // the first cancel reached the server before the connection died: nothing left to cancel
  socket.receive("MsgError", { ErrorCode: 12, Msg: "this upload was cancelled: gone" });
  assert.deepEqual(events, ["cancelled"]);
  assert.deepEqual([up.cancelled, up.cancelling, up.cancel_msg, up.error_code],
                   [true, false, "gone", 0]);
  assert.equal(env.timers.filter((t) => !t.cleared && !t.fired).length, 0);
});

test("a cancel the server answers with TICKET_FINISHED (11) ends in onfinished", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(4096), WS);
  const events = recorder(up);
  await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 });
  up.pause("pause");
  up.cancel("too slow");
  const socket = env.sockets.at(-1);
  socket.open();
  socket.receive("MsgError", { ErrorCode: 11, Msg: "this upload is already finished" });
  assert.deepEqual(events, ["finished"]);
  assert.deepEqual([up.finished, up.cancelled, up.cancelling, up.state_msg],
                   [true, false, false, "Finished"]);
});

test("a cancel answered with TOO_LATE (16) waits for the handover's result", async () => {
  const env = load();
  // the result on the same connection
  const up = new env.incoming.Uploader("t", file(2048), WS);
  const events = recorder(up);
  const first = await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 2 });
  first.drop(); // both chunks were stored; the handover started
  up.cancel("stop");
  let socket = env.sockets.at(-1);
  socket.open();
  socket.receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 2048, SendAhead: 2 });
  assert.equal(socket.messages("MsgCancel").length, 1);
  socket.receive("MsgError", { ErrorCode: 16, Msg: "upload is handover; too late to cancel" });
  assert.deepEqual(events, []);
  assert.deepEqual([up.cancelling, up.cancelled, up.finished, up.can_cancel],
                   [false, false, false, false]);
  socket.receive("MsgAllDone", { Success: true });
  assert.deepEqual(events, ["finished"]);
  assert.deepEqual([up.finished, up.cancelled, up.state_msg], [true, false, "Finished"]);
  // the server closes after the MsgError: the next connection learns the result
  const other = new env.incoming.Uploader("u", file(2048), WS);
  const others = recorder(other);
  (await confirmed(env, other, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 2 })).drop();
  other.cancel("stop");
  socket = env.sockets.at(-1);
  socket.open();
  socket.receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 2048, SendAhead: 2 });
  socket.receive("MsgError", { ErrorCode: 16, Msg: "upload is handover; too late to cancel" });
  socket.drop();
  assert.match(other.state_msg, /retrying in \d+ s$/);
  env.fire();
  socket = env.sockets.at(-1);
  socket.open();
  socket.receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 2048, SendAhead: 2 });
  assert.deepEqual(socket.messages("MsgCancel"), [], "the cancel is over: not sent again");
  assert.equal(other.state_msg, "Handing over");
  socket.receive("MsgError", { ErrorCode: 30, Msg: "the backend did not take the file" });
  assert.deepEqual(others, ["error 30"]);
});

test("a cancel before start() ends at once without contacting the server", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(10), WS);
  const events = recorder(up);
  up.cancel("never mind");
  assert.deepEqual(events, ["cancelled"]);
  assert.deepEqual([up.cancelled, up.cancelling, up.cancel_msg], [true, false, "never mind"]);
  up.start();
  assert.equal(env.sockets.length, 0);
});

test("a cancel while the socket is still connecting reuses it: never two sockets", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(4096), WS);
  const events = recorder(up);
  up.start();
  up.cancel("oops"); // the socket is still CONNECTING
  assert.equal(env.sockets.length, 1, "no second connection");
  assert.deepEqual([up.cancelling, up.cancelled, up.state_msg], [true, false, "Cancelling"]);
  const socket = env.sockets[0];
  assert.equal(socket.closed, false);
  socket.open();
  assert.equal(socket.messages("MsgUploadReq").length, 1);
  assert.deepEqual(socket.messages("MsgCancel"), [], "not before MsgUploadConf");
  socket.receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 });
  await settle();
  assert.deepEqual(socket.sent.map((m) => m.MsgType), ["MsgUploadReq", "MsgAck", "MsgCancel"]);
  socket.receive("MsgCancelAck", { Ack: true });
  assert.deepEqual(events, ["cancelled"]);
  assert.equal(env.sockets.length, 1);
  // and a new connection (as a reconnect makes) drops any socket still there
  const other = new env.incoming.Uploader("u", file(4096), WS);
  other.start();
  other._connect();
  assert.deepEqual(env.sockets.slice(1).map((s) => s.closed), [true, false]);
});

test("cancel while transferring waits for MsgCancelAck", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(4096), WS);
  const socket = await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 });
  up.cancel();
  assert.deepEqual([up.cancelling, up.cancelled, up.state_msg], [true, false, "Cancelling"]);
  socket.receive("MsgCancelAck", { Ack: true });
  assert.deepEqual([up.cancelled, up.cancel_msg], [true, "cancelled by the user"]);
});

test("a zero-byte file and a finish found on reconnect both end in onfinished", async () => {
  const env = load();
  const finished = [];
  const empty = new env.incoming.Uploader("t0", file(0), WS);
  empty.onfinished = () => finished.push("empty");
  const socket = await confirmed(env, empty, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 });
  assert.deepEqual([empty.state_msg, empty.frac_complete], ["Handing over", 0]);
  socket.receive("MsgAllDone", { Success: true });
  assert.deepEqual([empty.finished, empty.frac_complete, empty.state_msg], [true, 1, "Finished"]);
  const late = new env.incoming.Uploader("t1", file(10), WS);
  late.onfinished = () => finished.push("late");
  late.start();
  env.sockets.at(-1).open();
  env.sockets.at(-1).receive("MsgError", { ErrorCode: 11, Msg: "this upload is already finished" });
  assert.deepEqual(finished, ["empty", "late"]);
});

test("the backend's verdict in MsgAllDone is `result` when onfinished fires", async () => {
  const env = load();
  const verdict = JSON.stringify({ url: "/files/été.mp4", sha256: "ab".repeat(32) });
  const up = new env.incoming.Uploader("t", file(1024), WS);
  const seen = [];
  up.onprogress = (u) => seen.push(["progress", u.result]);
  up.onfinished = (u) => seen.push(["finished", u.result, u.finished]);
  const socket = await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 });
  socket.receive("MsgChunkAck", { ChunkSize: 1024 });
  assert.equal(up.result, "", "nothing until finished");
  seen.length = 0;
  socket.receive("MsgAllDone", { Success: true, Result: verdict });
  assert.deepEqual(seen, [["progress", verdict], ["finished", verdict, true]]);
  assert.equal(up.result, verdict);
  assert.throws(() => { up.result = "x"; }, TypeError, "read-only");
  assert.ok(Object.keys(Object.getPrototypeOf(up)).includes("result"));
});

test("a server that sends no verdict (the 2014 one, or a plain done) leaves `result` empty", async () => {
  for (const data of [{ Success: true }, { Success: true, Result: "" }, { Success: true, Result: null }]) {
    const env = load();
    const up = new env.incoming.Uploader("t", file(0), WS);
    const events = recorder(up);
    const socket = await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 });
    socket.receive("MsgAllDone", data);
    assert.deepEqual([events, up.result], [["finished"], ""], JSON.stringify(data));
  }
});

test("a finish found on reconnect (11) brings the verdict along, as does one that answers a cancel", async () => {
  const env = load();
  const late = new env.incoming.Uploader("t", file(10), WS);
  const results = [];
  late.onfinished = (u) => results.push(u.result);
  late.start();
  env.sockets.at(-1).open();
  env.sockets.at(-1).receive("MsgError", { ErrorCode: 11, Msg: "this upload is already finished",
                                           Result: '{"url": "/files/a"}' });
  assert.deepEqual(results, ['{"url": "/files/a"}']);
  // the cancel came too late
  const cancelled = new env.incoming.Uploader("u", file(4096), WS);
  cancelled.onfinished = (u) => results.push(u.result);
  await confirmed(env, cancelled, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 });
  cancelled.pause("pause");
  cancelled.cancel("too slow");
  env.sockets.at(-1).open();
  env.sockets.at(-1).receive("MsgError", { ErrorCode: 11, Msg: "this upload is already finished",
                                           Result: "ok" });
  assert.deepEqual(results, ['{"url": "/files/a"}', "ok"]);
  // an older server's error 11 has none
  const old = new env.incoming.Uploader("v", file(10), WS);
  old.onfinished = (u) => results.push(u.result);
  old.start();
  env.sockets.at(-1).open();
  env.sockets.at(-1).receive("MsgError", { ErrorCode: 11, Msg: "this upload is already finished" });
  assert.deepEqual(results, ['{"url": "/files/a"}', "ok", ""]);
});

test("frac_sent counts what the socket has sent, not what it buffers, across a reconnect", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(10 * 1024), WS);
  let socket = await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 2 });
  const text = socket.bufferedAmount - 2048; // MsgUploadReq and MsgAck, before the chunks
  assert.deepEqual([up.bytes_tx, up.frac_sent], [2048, 0]);
  socket.transmit(text + 512);
  assert.equal(up.frac_sent, 0.05);
  socket.transmit(1024);
  assert.equal(up.frac_sent, 0.15);
  socket.receive("MsgChunkAck", { ChunkSize: 1024 });
  await settle();
  assert.deepEqual([up.bytes_tx, up.frac_complete, up.frac_sent], [3072, 0.1, 0.15]);
  socket.drop(); // 1536 bytes never left: they do not count while reconnecting
  assert.equal(up.frac_sent, 0.15);
  env.fire();
  socket = env.sockets.at(-1);
  socket.open();
  assert.equal(up.frac_sent, 0.15);
  socket.receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 2048, SendAhead: 2 });
  await settle();
  assert.deepEqual([up.bytes_tx, up.frac_complete, up.frac_sent], [4096, 0.2, 0.2]);
  socket.transmit();
  assert.equal(up.frac_sent, 0.4);
});

test("frac_sent stays below 1 while the handover runs, and is 1 once finished", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(2048), WS);
  const socket = await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 2 });
  socket.transmit();
  socket.receive("MsgChunkAck", { ChunkSize: 1024 });
  socket.receive("MsgChunkAck", { ChunkSize: 1024 });
  assert.deepEqual([up.state_msg, up.frac_complete, up.frac_sent], ["Handing over", 1, 2047 / 2048]);
  socket.receive("MsgAllDone", {});
  assert.deepEqual([up.finished, up.frac_sent], [true, 1]);
});

test("a large SendAhead keeps that many chunks in flight, reading at most 8 ahead", async () => {
  const env = load();
  const reads = []; // the file's reads not yet answered
  const big = file(64 * 1024);
  big.slice = (start, end) => ({
    size: end - start,
    arrayBuffer: () => new Promise((resolve) => reads.push(() => resolve(new ArrayBuffer(end - start)))),
  });
  const up = new env.incoming.Uploader("t", big, WS);
  const socket = await confirmed(env, up, { ChunkSizeKB: 1, FilePos: 0, SendAhead: 40 });
  let most = 0;
  while (reads.length) {
    most = Math.max(most, reads.length);
    reads.shift()();
    await settle();
  }
  assert.equal(most, 8);
  assert.equal(socket.chunks().length, 40); // the window, all on the wire
  assert.equal(up.chunks_ahead, 40);
  socket.receive("MsgChunkAck", { ChunkSize: 1024 });
  await settle();
  reads.shift()();
  await settle();
  assert.equal(socket.chunks().length, 41);
});
