// A handover the backend has not answered within the server's HandoverTimeoutS (SPEC:
// "When the backend is away"): onfinished with `pending`, then HEAD now and then until
// onhandedover (or onerror). Both transports, with the fakes of harness.mjs.
// Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import { file, load, settle } from "./harness.mjs";

const MiB = 1024 * 1024;
const URL = "https://app.example/incoming/tus/t";
const live = { "Upload-Expires": "Sun, 29 Nov 2026 10:39:01 GMT" };
const PENDING = { "Incoming-Handover": "pending" };
const WS = { transport: "websocket" };

function recorder(up) {
  const events = [];
  up.onfinished = (u) => events.push(["finished", u.pending, u.result]);
  up.onhandedover = (u) => events.push(["handed over", u.pending, u.result]);
  up.oncancelled = (u) => events.push(["cancelled", u.cancel_msg]);
  up.onerror = (u) => events.push(["error", u.error_code, u.error_msg, u.finished, u.pending]);
  return events;
}

// An HTTP upload of `size` bytes whose final PATCH is answered 204 + `headers`.
function uploaded(env, size, headers) {
  const up = new env.incoming.Uploader("t", file(size));
  const events = recorder(up);
  up.start();
  env.xhr().respond(201, { Location: "/incoming/tus/t", "Upload-Offset": 0, ...live });
  env.xhr().respond(204, { "Upload-Offset": size, ...headers });
  return [up, events];
}

// The next HEAD the uploader sends (after its timer), answered with `status` and `headers`.
function polled(env, status, headers = {}) {
  const ms = env.fire();
  const head = env.xhr();
  assert.deepEqual([head.method, head.url], ["HEAD", URL]);
  assert.equal(head.requestHeaders["Tus-Resumable"], "1.0.0");
  head.respond(status, headers);
  return ms;
}

const stored = (size) => ({ "Upload-Offset": size, "Upload-Length": size });

test("a final PATCH answered pending fires onfinished with pending, then onhandedover", () => {
  const env = load();
  const [up, events] = uploaded(env, 4 * MiB, { ...PENDING, ...live });
  assert.deepEqual(events, [["finished", true, ""]]);
  assert.deepEqual([up.finished, up.pending, up.frac_sent, up.can_cancel, up.can_pause],
                   [true, true, 1, false, false]);
  assert.equal(up.state_msg, "Stored; waiting for the application");
  assert.equal(env.storage.length, 1, "remembered: a reloaded page can learn the outcome");
  const waits = [];
  waits.push(polled(env, 200, { ...stored(4 * MiB), ...PENDING, ...live }));
  waits.push(polled(env, 503, {}));  // a restarting server: asked again
  waits.push(env.fire());
  env.xhr().fail();  // no answer: asked again
  waits.push(polled(env, 200, { ...stored(4 * MiB), "Incoming-Result": "%C3%A9t%C3%A9" }));
  assert.deepEqual(events, [["finished", true, ""], ["handed over", false, "été"]]);
  assert.deepEqual([up.finished, up.pending, up.result, up.state_msg], [true, false, "été", "Finished"]);
  assert.equal(env.storage.length, 0, "forgotten once over");
  assert.equal(env.pending().length, 0, "no more asking");
  // 5 s doubling (±25 %), up to 60 s
  for (const [i, ms] of waits.entries()) {
    const expected = Math.min(60, 5 * 2 ** i) * 1000;
    assert.ok(ms >= expected * 0.75 && ms <= expected * 1.25, `${ms} ms for poll ${i}`);
  }
});

test("the polls back off to a minute, and a wait answered by finish_upload ends them", () => {
  const env = load();
  const [up, events] = uploaded(env, 10, { ...PENDING, ...live });
  const waits = [];
  for (let i = 0; i < 8; i++) {
    waits.push(polled(env, 200, { ...stored(10), ...PENDING, ...live }));
  }
  assert.ok(waits.slice(4).every((ms) => ms >= 45_000 && ms <= 75_000), String(waits));
  assert.deepEqual(events, [["finished", true, ""]]);
  polled(env, 200, { ...stored(10), "Incoming-Result": "ok" });
  assert.deepEqual(events.at(-1), ["handed over", false, "ok"]);
  assert.equal(up.pending, false);
});

test("a handover that finally fails is onerror 30 after the pending finish", () => {
  const env = load();
  const [up, events] = uploaded(env, 10, { ...PENDING, ...live });
  polled(env, 200, { ...stored(10), ...PENDING, ...live });
  polled(env, 410);
  assert.deepEqual(events, [
    ["finished", true, ""],
    ["error", 30, "handover failed: the backend did not take the file", false, false],
  ]);
  assert.equal(env.pending().length, 0);
  assert.equal(env.storage.length, 0);
  assert.equal(up.state_msg, "Error: handover failed: the backend did not take the file");
});

test("an upload the server forgot while the page slept is onerror 10", () => {
  const env = load();
  const [, events] = uploaded(env, 10, { ...PENDING, ...live });
  polled(env, 404, {});
  assert.deepEqual(events.at(-1).slice(0, 2), ["error", 10]);
  const [, others] = uploaded(env, 10, { ...PENDING, ...live });
  env.fire();
  env.xhr().respond(404, {}, "", { tus: false });  // a proxy's 404: asked again
  assert.deepEqual(others, [["finished", true, ""]]);
  assert.equal(env.pending().length, 1);
});

test("without Incoming-Handover the final PATCH finishes as before, and nothing is asked", () => {
  const env = load();
  const [up, events] = uploaded(env, 10, { "Incoming-Result": "v" });
  assert.deepEqual(events, [["finished", false, "v"]]);
  assert.deepEqual([up.pending, env.pending().length], [false, 0]);
});

test("over the WebSocket MsgAllDone with Pending: the same polls, over HTTP", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(10), WS);
  const events = recorder(up);
  up.start();
  const socket = env.sockets.at(-1);
  socket.open();
  socket.receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 });
  await settle();
  socket.receive("MsgChunkAck", { ChunkSize: 10 });
  socket.receive("MsgAllDone", { Success: true, Pending: true });
  assert.deepEqual(events, [["finished", true, ""]]);
  assert.equal(socket.closed, true);
  assert.equal(env.sockets.length, 1, "no WebSocket to ask with");
  polled(env, 200, { ...stored(10), ...PENDING, ...live });
  polled(env, 200, { ...stored(10), "Incoming-Result": "%7B%7D" });
  assert.deepEqual(events, [["finished", true, ""], ["handed over", false, "{}"]]);
});

test("a reconnect during a pending handover: MsgUploadConf at the end, then MsgAllDone Pending", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(10), WS);
  const events = recorder(up);
  up.start();
  let socket = env.sockets.at(-1);
  socket.open();
  socket.receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 0, SendAhead: 1 });
  await settle();
  socket.drop();  // before any answer
  env.fire();
  socket = env.sockets.at(-1);
  socket.open();
  socket.receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 10, SendAhead: 1 });
  assert.equal(up.state_msg, "Handing over");
  socket.receive("MsgAllDone", { Success: true, Pending: true });
  assert.deepEqual(events, [["finished", true, ""]]);
  assert.deepEqual([up.pending, env.pending().length], [true, 1]);
});

test("a reloaded page finds the handover pending (creation, HEAD): onfinished pending, then polls", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(10));
  const events = recorder(up);
  up.start();
  env.xhr().respond(201, { Location: "/incoming/tus/t", "Upload-Offset": 10, ...live });
  env.fire();  // HEAD: the handover runs
  env.xhr().respond(200, { ...stored(10), ...PENDING, ...live });
  assert.deepEqual(events, [["finished", true, ""]]);
  polled(env, 200, { ...stored(10), "Incoming-Result": "x" });
  assert.deepEqual(events.at(-1), ["handed over", false, "x"]);
});

test("a zero-byte file whose creation is answered pending", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(0));
  const events = recorder(up);
  up.start();
  env.xhr().respond(201, { Location: "/incoming/tus/t", "Upload-Offset": 0, ...PENDING, ...live });
  assert.deepEqual(events, [["finished", true, ""]]);
  polled(env, 200, { ...stored(0), "Incoming-Result": "" });
  assert.deepEqual(events.at(-1), ["handed over", false, ""]);
});

test("the polls carry the app's headers", () => {
  const env = load();
  let token = "a";
  const up = new env.incoming.Uploader("t", file(10), { headers: () => ({ Authorization: token }) });
  recorder(up);
  up.start();
  env.xhr().respond(201, { Location: "/incoming/tus/t", "Upload-Offset": 0, ...live });
  env.xhr().respond(204, { "Upload-Offset": 10, ...PENDING, ...live });
  token = "b";
  env.fire();
  assert.equal(env.xhr().requestHeaders.Authorization, "b");
});
