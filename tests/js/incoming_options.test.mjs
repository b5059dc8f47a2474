// The Uploader's options (frontend/incoming.js): headers, retryDelays, chunkSize, transport,
// checked at once; and bytes_sent. Fakes from harness.mjs.
// Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import { file, load, settle } from "./harness.mjs";

const MiB = 1024 * 1024;
const live = { "Upload-Expires": "Sun, 29 Nov 2026 10:39:01 GMT" };
const at = (offset, length) => ({ "Upload-Offset": offset, "Upload-Length": length, ...live });

function recorder(up) {
  const events = [];
  up.oncancelled = (u) => events.push("cancelled: " + u.cancel_msg);
  up.onfinished = () => events.push("finished");
  up.onerror = (u) => events.push("error " + u.error_code + ": " + u.error_msg);
  return events;
}

function created(env, up, offset = 0) {
  up.start();
  env.xhr().respond(201, { Location: "/incoming/tus/t", "Upload-Offset": offset, ...live });
  return env.xhr();
}

test("headers go with every HTTP request: creation, PATCH, HEAD, DELETE", () => {
  const env = load();
  const headers = { Authorization: "Bearer abc", "X-CSRF-Token": "t0k" };
  const up = new env.incoming.Uploader("t", file(8 * MiB), { chunkSize: 4 * MiB, headers });
  const events = recorder(up);
  created(env, up).respond(204, { "Upload-Offset": 4 * MiB, ...live });
  up.pause("pause");
  up.pause("unpause");
  env.xhr().respond(200, at(4 * MiB, 8 * MiB));
  up.cancel("no more");
  env.xhr().respond(204);
  assert.deepEqual(events, ["cancelled: no more"]);
  assert.deepEqual(env.xhrs.map((x) => x.method), ["POST", "PATCH", "PATCH", "HEAD", "PATCH", "DELETE"]);
  for (const xhr of env.xhrs) {
    assert.equal(xhr.requestHeaders.Authorization, "Bearer abc", xhr.method);
    assert.equal(xhr.requestHeaders["X-CSRF-Token"], "t0k", xhr.method);
    assert.equal(xhr.requestHeaders["Tus-Resumable"], "1.0.0", xhr.method);
  }
  assert.equal(env.xhrs[4].requestHeaders["Upload-Offset"], String(4 * MiB), "the library's own stay");
  headers.Authorization = "changed later";
  up.start();
  assert.equal(env.xhrs.length, 6, "an ended upload sends nothing");
});

test("headers as a function are asked before each request (a token that changes)", () => {
  const env = load();
  let token = 1;
  const up = new env.incoming.Uploader("t", file(8 * MiB), {
    chunkSize: 4 * MiB,
    headers: () => ({ Authorization: "Bearer " + token++ }),
  });
  created(env, up).fail();
  env.fire();
  env.xhr().respond(200, at(0, 8 * MiB));
  assert.deepEqual(env.xhrs.map((x) => [x.method, x.requestHeaders.Authorization]),
                   [["POST", "Bearer 1"], ["PATCH", "Bearer 2"], ["HEAD", "Bearer 3"], ["PATCH", "Bearer 4"]]);
});

test("a headers function that throws or gives bad headers ends the upload, sending nothing", () => {
  for (const [headers, message] of [
    [() => { throw new Error("no session"); }, /^cannot send an HTTP request: no session$/],
    [() => null, /headers\(\) must be an object/],
    [() => ({ "Upload-Offset": "0" }), /headers\(\): Upload-Offset is set by incoming.js itself/],
  ]) {
    const env = load();
    const up = new env.incoming.Uploader("t", file(MiB), { headers });
    const events = recorder(up);
    up.start();
    assert.equal(events.length, 1);
    assert.match(events[0], /^error 0: /);
    assert.match(up.error_msg, message);
    assert.ok(env.xhrs.every((x) => x.body === undefined), "no request sent");
    assert.equal(env.pending().length, 0, "and no retry");
  }
});

test("bad options are a TypeError at once, naming the option", () => {
  const env = load();
  const bad = [
    ["options", "websocket"],
    ["transport", { transport: "ws" }],
    ["chunkSize", { chunkSize: 0 }],
    ["chunkSize", { chunkSize: -5 }],
    ["chunkSize", { chunkSize: "8388608" }],
    ["chunkSize", { chunkSize: NaN }],
    ["chunkSize", { chunkSize: Infinity }],
    ["headers", { headers: "Authorization: x" }],
    ["headers", { headers: [["Authorization", "x"]] }],
    ["headers", { headers: { "Bad Name": "x" } }],
    ["headers", { headers: { "X-Count": 3 } }],
    ["headers", { headers: { "X-Two": "a\r\nInjected: b" } }],
    ["headers", { headers: { "tus-resumable": "0.2.2" } }],
    ["headers", { headers: { "Content-Type": "text/plain" } }],
    ["headers", { headers: { Authorization: "x" }, transport: "websocket" }],
    ["retryDelays", { retryDelays: 1000 }],
    ["retryDelays", { retryDelays: [0, -1] }],
    ["retryDelays", { retryDelays: [NaN] }],
    ["retryDelays", { retryDelays: ["1000"] }],
  ];
  for (const [name, options] of bad) {
    assert.throws(() => new env.incoming.Uploader("t", file(1), options),
                  (e) => e.name === "TypeError" && e.message.includes(name),
                  JSON.stringify(options));
  }
  const fine = [undefined, null, {}, { chunkSize: 1.5 }, { headers: {} }, { retryDelays: [] },
                { headers: null, retryDelays: null, chunkSize: null, transport: undefined }];
  for (const options of fine) {
    new env.incoming.Uploader("t", file(1), options);
  }
  assert.equal(env.xhrs.length + env.sockets.length, 0, "nothing sent before start()");
});

test("with headers, a server without tus is an error, not the WebSocket (it cannot carry them)", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(4096), { headers: { Authorization: "x" } });
  const events = recorder(up);
  up.start();
  env.xhr().respond(404, {}, "<html>No Such Resource</html>", { tus: false });
  assert.equal(env.sockets.length, 0);
  assert.equal(events.length, 1);
  assert.match(events[0], /^error 0: no tus answer from a server that is up .* cannot carry the headers option$/);
  // no answer, yet the server is up (a WebSocket opens): a preflight refused the headers
  const refused = new env.incoming.Uploader("u", file(4096), { headers: { "X-Other": "x" } });
  const others = recorder(refused);
  refused.start();
  env.xhr().fail();
  env.sockets[0].open();
  assert.equal(env.sockets[0].closed, true, "the probe is closed");
  assert.equal(env.sockets.length, 1, "no upload over the WebSocket");
  assert.match(others[0], /CORS preflight refused the request's headers/);
  // the server is down: retried as without headers
  const down = new env.incoming.Uploader("v", file(4096), { headers: { "X-Other": "x" } });
  down.start();
  env.xhr().fail();
  env.sockets.at(-1).drop();
  assert.match(down.state_msg, /^Connection lost; retrying in \d+ s$/);
});

test("retryDelays over HTTP: each wait in turn, exactly; once used up, onerror", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * MiB), { chunkSize: 4 * MiB, retryDelays: [0, 500, 3000] });
  const events = recorder(up);
  created(env, up).fail();
  assert.equal(up.state_msg, "Connection lost; retrying in 0 s");
  assert.equal(env.fire(), 0);
  env.xhr().fail(); // HEAD
  assert.equal(up.state_msg, "Connection lost; retrying in 1 s");
  assert.equal(env.fire(), 500);
  env.xhr().respond(200, at(0, 8 * MiB));
  env.xhr().respond(204, { "Upload-Offset": 4 * MiB, ...live }); // a PATCH went through: from the start again
  env.xhr().respond(423, {}, "another connection is serving this upload");
  assert.equal(env.fire(), 0);
  env.xhr().respond(200, at(4 * MiB, 8 * MiB));
  env.xhr().respond(423, {}, "another connection is serving this upload");
  assert.equal(env.fire(), 500);
  env.xhr().respond(200, at(4 * MiB, 8 * MiB));
  env.xhr().respond(423, {}, "another connection is serving this upload");
  assert.equal(env.fire(), 3000);
  assert.deepEqual(events, []);
  env.xhr().respond(200, at(4 * MiB, 8 * MiB));
  env.xhr().respond(423, {}, "another connection is serving this upload");
  assert.deepEqual(events, ["error 13: another connection is serving this upload"]);
  assert.deepEqual([up.state_msg, up.can_pause, up.can_cancel, env.pending().length],
                   ["Error: another connection is serving this upload", false, false, 0]);
  // a lost connection with no retry left; a proxy's 503
  for (const [retryDelays, fail, error] of [
    [[], (x) => x.fail(), "error 0: Connection lost"],
    [[], (x) => x.respond(503, {}, "", { tus: false }), "error 0: HTTP 503"],
  ]) {
    const other = new env.incoming.Uploader("t", file(MiB), { retryDelays });
    const theirs = recorder(other);
    fail(created(env, other));
    assert.deepEqual(theirs, [error]);
  }
});

test("retryDelays over the WebSocket; MsgUploadConf starts them over", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * 1024), { transport: "websocket", retryDelays: [100, 200] });
  const events = recorder(up);
  up.start();
  env.sockets[0].drop();
  assert.equal(env.fire(), 100);
  env.sockets[1].open();
  env.sockets[1].receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 0, SendAhead: 2 });
  await settle();
  env.sockets[1].drop();
  assert.equal(env.fire(), 100, "connected again: the first delay again");
  env.sockets[2].drop();
  assert.equal(env.fire(), 200);
  env.sockets[3].open();
  env.sockets[3].receive("MsgError", { ErrorCode: 99, Msg: "internal error" });
  env.sockets[3].drop();
  assert.deepEqual(events, ["error 99: internal error"]);
  assert.equal(env.pending().length, 0);
});

test("waiting for the handover does not use up retryDelays", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(MiB), { retryDelays: [0] });
  const events = recorder(up);
  const patch = created(env, up);
  patch.bodySent();
  patch.fail();
  env.fire();
  const polls = [];
  for (let i = 0; i < 5; i++) {
    env.xhr().respond(200, at(MiB, MiB)); // stored, the handover runs
    assert.equal(up.state_msg, "Handing over");
    polls.push(env.fire());
  }
  const nominal = [1, 2, 4, 8, 16];
  polls.forEach((ms, i) => assert.ok(ms >= nominal[i] * 750 && ms <= nominal[i] * 1250, `poll ${i}: ${ms} ms`));
  env.xhr().fail(); // one HEAD lost: the retry it was given
  assert.deepEqual(events, []);
  env.fire();
  env.xhr().respond(200, { "Upload-Offset": MiB, "Upload-Length": MiB, "Incoming-Result": "ok" });
  assert.deepEqual([events, up.result], [["finished"], "ok"]);
});

test("bytes_sent: what has left the browser, within a PATCH and on the WebSocket", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * MiB), { chunkSize: 4 * MiB });
  const seen = [];
  up.onprogress = (u) => seen.push([u.bytes_sent, u.bytes_acked]);
  const patch = created(env, up);
  patch.progress(MiB);
  assert.deepEqual(seen.at(-1), [MiB, 0]);
  patch.respond(204, { "Upload-Offset": 4 * MiB, ...live });
  env.xhr().progress(4 * MiB);
  env.xhr().bodySent();
  assert.deepEqual([up.bytes_sent, up.bytes_acked, up.bytes_total], [8 * MiB, 4 * MiB, 8 * MiB]);
  assert.ok(up.frac_sent < 1, "frac_sent waits for the handover; bytes_sent says all left");
  env.xhr().respond(204, { "Upload-Offset": 8 * MiB });
  assert.deepEqual([up.bytes_sent, up.frac_sent], [8 * MiB, 1]);

  const ws = new env.incoming.Uploader("t", file(4096), { transport: "websocket" });
  ws.start();
  const socket = env.sockets.at(-1);
  socket.open();
  socket.receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 1024, SendAhead: 2 });
  socket.transmit(); // MsgUploadReq and MsgAck
  await settle();
  assert.deepEqual([ws.bytes_tx, ws.bytes_sent, ws.bytes_acked], [3072, 1024, 1024], "buffered, not sent");
  socket.transmit(1500);
  assert.deepEqual([ws.bytes_sent, ws.bytes_acked], [2524, 1024]);
});
