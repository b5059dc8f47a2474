// State logic of frontend/incoming.js over HTTP (tus 1.0), the default transport,
// with a fake XMLHttpRequest, fake timers and a fake localStorage.
// Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import { FakeStorage, file, load } from "./harness.mjs";

const MiB = 1024 * 1024;
const URL = "https://app.example/incoming/tus/t";
const b64 = (text) => Buffer.from(text, "utf8").toString("base64");

function recorder(up) {
  const events = [];
  up.oncancelled = (u) => events.push("cancelled: " + u.cancel_msg);
  up.onfinished = () => events.push("finished");
  up.onerror = (u) => events.push("error " + u.error_code + ": " + u.error_msg);
  return events;
}

// start(), and the creation answered 201 at `offset`.
function created(env, up, offset = 0, headers = {}) {
  up.start();
  env.xhr().respond(201, {
    Location: "/incoming/tus/t",
    "Upload-Offset": offset,
    "Upload-Expires": "Sun, 29 Nov 2026 10:39:01 GMT",
    ...headers,
  });
  return env.xhr();
}

const live = { "Upload-Expires": "Sun, 29 Nov 2026 10:39:01 GMT" };
const request = (x) => [x.method, x.url];
const unanswered = (env) => env.xhrs.filter((x) => !x.answered && !x.aborted);

test("a creation with the ticket, name and first piece, then one PATCH of a File.slice at a time", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(10 * MiB, "été.mp4"), { chunkSize: 4 * MiB });
  const events = recorder(up);
  const states = [];
  up.onprogress = (u) => states.at(-1) !== u.state_msg && states.push(u.state_msg);
  up.start();
  const creation = env.xhr();
  assert.deepEqual(request(creation), ["POST", "https://app.example/incoming/tus/"]);
  assert.deepEqual(creation.requestHeaders, {
    "Tus-Resumable": "1.0.0",
    "Upload-Length": "10485760",
    "Upload-Metadata": `ticket ${b64("t")},filename ${b64("été.mp4")}`,
    "Content-Type": "application/offset+octet-stream",
  });
  assert.deepEqual([creation.body.start, creation.body.end], [0, 4 * MiB], "creation-with-upload");
  assert.equal(creation.async, true);
  assert.deepEqual([up.state_msg, up.connected], ["Connecting", false]);
  creation.progress(MiB);
  assert.deepEqual([up.state_msg, up.connected, up.bytes_tx, up.bytes_acked, up.chunks_ahead],
                   ["Uploading", true, MiB, 0, 1], "bytes flow: connected before any answer");
  creation.respond(201, { Location: "/incoming/tus/t", "Upload-Offset": 4 * MiB, ...live });
  assert.deepEqual([up.bytes_acked, up.chunks_acked_now], [4 * MiB, 1]);
  const patches = [creation];
  for (const [start, end] of [[4 * MiB, 8 * MiB], [8 * MiB, 10 * MiB]]) {
    const patch = env.xhr();
    patches.push(patch);
    assert.deepEqual(request(patch), ["PATCH", URL]);
    assert.deepEqual(patch.requestHeaders, {
      "Tus-Resumable": "1.0.0",
      "Content-Type": "application/offset+octet-stream",
      "Upload-Offset": String(start),
    });
    assert.deepEqual([patch.body.start, patch.body.end], [start, end]);
    assert.equal(unanswered(env).length, 1, "one request in flight");
    assert.deepEqual([up.chunks_ahead, up.connected, up.can_pause, up.can_cancel], [1, true, true, true]);
    patch.progress(MiB);
    assert.deepEqual([up.bytes_tx, up.bytes_acked, up.bytes_ahead], [start + MiB, start, MiB]);
    assert.equal(up.frac_complete, start / (10 * MiB));
    if (end < 10 * MiB) {
      patch.respond(204, { "Upload-Offset": end, ...live });
      assert.deepEqual([up.bytes_tx, up.bytes_acked, up.chunks_acked_now], [end, end, patches.length]);
      assert.equal(up.state_msg, "Uploading");
    }
  }
  const last = patches.at(-1);
  last.progress(2 * MiB);
  last.bodySent();
  assert.equal(up.state_msg, "Handing over");
  assert.deepEqual(events, [], "sent, not yet handed over");
  last.respond(204, { "Upload-Offset": 10 * MiB });
  assert.deepEqual(events, ["finished"]);
  assert.deepEqual(states, ["Connecting", "Uploading", "Handing over", "Finished"]);
  assert.deepEqual(
    [up.finished, up.frac_complete, up.bytes_acked, up.chunks_ahead, up.connected, up.can_pause, up.can_cancel],
    [true, 1, 10 * MiB, 0, false, false, false],
  );
  assert.equal(env.xhrs.length, 3);
  assert.equal(env.pending().length, 0);
});

test("by default the creation carries the whole file: one request, answered once handed over", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(300 * MiB));
  const events = recorder(up);
  up.start();
  const creation = env.xhr();
  assert.deepEqual([request(creation), creation.requestHeaders["Content-Type"], creation.body.start, creation.body.end],
                   [["POST", "https://app.example/incoming/tus/"], "application/offset+octet-stream", 0, 300 * MiB]);
  creation.progress(200 * MiB);
  assert.deepEqual([up.bytes_sent, up.bytes_acked, up.frac_complete], [200 * MiB, 0, 0],
                   "sent moves; acknowledged (durable) waits for the answer");
  creation.progress(300 * MiB);
  creation.bodySent();
  assert.equal(up.state_msg, "Handing over");
  creation.respond(201, { Location: "/incoming/tus/t", "Upload-Offset": 300 * MiB, "Incoming-Result": "ok%20!" });
  assert.deepEqual(events, ["finished"]);
  assert.deepEqual([up.result, up.bytes_acked, up.chunks_ahead], ["ok !", 300 * MiB, 0]);
  assert.equal(env.xhrs.length, 1, "no other request: no preflight-worthy second URL, no idle round trip");
  assert.equal(env.pending().length, 0);
});

test("a whole-file request dropped mid-way resumes from the server's offset with the bytes from there", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(64 * MiB));
  const events = recorder(up);
  up.start();
  env.xhr().progress(20 * MiB);
  env.xhr().fail(); // its bytes got through: a lost connection, not a server without tus
  assert.equal(env.sockets.length, 0, "no WebSocket probe");
  assert.match(up.state_msg, /^Connection lost; retrying in \d+ s$/);
  env.fire();
  const again = env.xhr();
  assert.deepEqual([request(again), again.body, again.requestHeaders["Content-Type"]],
                   [["POST", "https://app.example/incoming/tus/"], null, undefined], "a plain creation asks");
  again.respond(201, { Location: "/incoming/tus/t", "Upload-Offset": 16 * MiB, ...live });
  const patch = env.xhr();
  assert.deepEqual([request(patch), patch.requestHeaders["Upload-Offset"], patch.body.start, patch.body.end],
                   [["PATCH", URL], String(16 * MiB), 16 * MiB, 64 * MiB]);
  assert.deepEqual([up.bytes_acked, up.bytes_sent], [16 * MiB, 16 * MiB]);
  patch.progress(30 * MiB);
  assert.equal(up.bytes_sent, 46 * MiB);
  patch.fail();
  env.fire();
  assert.deepEqual(request(env.xhr()), ["HEAD", URL]);
  env.xhr().respond(200, { "Upload-Offset": 40 * MiB, "Upload-Length": 64 * MiB, ...live });
  const rest = env.xhr();
  assert.deepEqual([rest.method, rest.requestHeaders["Upload-Offset"], rest.body.start, rest.body.end],
                   ["PATCH", String(40 * MiB), 40 * MiB, 64 * MiB]);
  rest.respond(204, { "Upload-Offset": 64 * MiB });
  assert.deepEqual(events, ["finished"]);
  assert.deepEqual(env.xhrs.map((x) => x.method), ["POST", "POST", "PATCH", "HEAD", "PATCH"]);
});

test("one request carries all the file has left unless chunkSize says otherwise; Location may be absolute", () => {
  const env = load();
  env.incoming.set_server_hostname("up.example:4000");
  const up = new env.incoming.Uploader("t", file(100 * MiB));
  up.start();
  assert.deepEqual([env.xhr().url, env.xhr().body.start, env.xhr().body.end],
                   ["https://up.example:4000/incoming/tus/", 0, 100 * MiB]);
  env.xhr().respond(201, { Location: "https://other.example/incoming/0.1/tus/t", "Upload-Offset": 3 * MiB, ...live });
  assert.deepEqual([env.xhr().url, env.xhr().body.start, env.xhr().body.end],
                   ["https://other.example/incoming/0.1/tus/t", 3 * MiB, 100 * MiB]);
  assert.throws(() => new env.incoming.Uploader("t", file(1), { transport: "ws" }), /transport/);
});

test("a creation that finds bytes stored continues from its Upload-Offset", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(10 * MiB), { chunkSize: 4 * MiB });
  created(env, up, 6 * MiB);
  assert.deepEqual([up.bytes_acked, up.bytes_tx, up.frac_complete], [6 * MiB, 6 * MiB, 0.6]);
  assert.deepEqual([env.xhr().requestHeaders["Upload-Offset"], env.xhr().body.start, env.xhr().body.end],
                   [String(6 * MiB), 6 * MiB, 10 * MiB]);
});

test("pause aborts the PATCH; unpause resumes from HEAD's offset", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * MiB), { chunkSize: 4 * MiB });
  const events = recorder(up);
  const patch = created(env, up);
  patch.progress(3 * MiB);
  up.pause("toggle");
  assert.equal(patch.aborted, true);
  assert.deepEqual([up.paused, up.state_msg, up.connected, up.can_pause, up.bytes_tx, up.bytes_acked],
                   [true, "Paused", false, true, 3 * MiB, 0]);
  assert.equal(env.xhrs.length, 2, "nothing sent while paused");
  up.pause("unpause");
  const head = env.xhr();
  assert.deepEqual(request(head), ["HEAD", URL]);
  assert.deepEqual([up.paused, up.state_msg], [false, "Connecting"]);
  head.respond(200, { "Upload-Offset": 3 * MiB - 1, "Upload-Length": 8 * MiB, ...live });
  assert.deepEqual([up.bytes_acked, up.bytes_tx], [3 * MiB - 1, 3 * MiB - 1], "as the server says");
  assert.deepEqual([env.xhr().method, env.xhr().body.start, env.xhr().body.end],
                   ["PATCH", 3 * MiB - 1, 7 * MiB - 1]);
  assert.equal(up.state_msg, "Uploading");
  assert.deepEqual(events, []);
});

test("cancel aborts the PATCH and sends DELETE; its 204 ends in oncancelled", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * MiB), { chunkSize: 4 * MiB });
  const events = recorder(up);
  const patch = created(env, up);
  up.cancel("no longer needed");
  assert.equal(patch.aborted, true);
  assert.deepEqual(request(env.xhr()), ["DELETE", URL]);
  assert.deepEqual(env.xhr().requestHeaders, {
    "Tus-Resumable": "1.0.0",
    "Incoming-Cancel-Reason": "no%20longer%20needed",
  });
  assert.deepEqual([up.cancelling, up.cancelled, up.can_cancel, up.state_msg],
                   [true, false, false, "Cancelling"]);
  assert.deepEqual(events, [], "cancelled only when the server says so");
  env.xhr().respond(204);
  assert.deepEqual(events, ["cancelled: no longer needed"]);
  assert.deepEqual([up.cancelled, up.cancelling, up.state_msg, up.connected],
                   [true, false, "Cancelled: no longer needed", false]);
});

test("a cancel while paused sends DELETE at once; unreachable, it retries with the backoff", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * MiB), { chunkSize: 4 * MiB });
  const events = recorder(up);
  created(env, up);
  up.pause("pause");
  up.cancel("gone");
  assert.deepEqual([request(env.xhr()), up.paused, up.cancelling], [["DELETE", URL], false, true]);
  env.xhr().fail();
  assert.match(up.state_msg, /^Cancelling; retrying in \d+ s$/);
  assert.ok(env.fire() <= 1250);
  env.xhr().fail();
  const second = env.fire();
  assert.ok(second >= 1500 && second <= 2500, `the backoff: ${second} ms`);
  assert.equal(env.xhr().method, "DELETE");
  // the first DELETE reached the server: it is already cancelled
  env.xhr().respond(410, {}, "this upload is already cancelled");
  assert.deepEqual(request(env.xhr()), ["HEAD", URL]);
  env.xhr().respond(410);
  assert.deepEqual(events, ["cancelled: gone"]);
  assert.equal(env.pending().length, 0);
});

test("a cancel answered 410 by an upload that had finished ends in onfinished", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * MiB), { chunkSize: 4 * MiB });
  const events = recorder(up);
  created(env, up);
  up.pause("pause");
  up.cancel("too slow");
  env.xhr().respond(410, {}, "this upload is already finished");
  env.xhr().respond(200, { "Upload-Offset": 8 * MiB, "Upload-Length": 8 * MiB }); // no Upload-Expires: final
  assert.deepEqual(events, ["finished"]);
  assert.deepEqual([up.finished, up.cancelled, up.cancelling, up.state_msg, up.frac_complete],
                   [true, false, false, "Finished", 1]);
});

test("a cancel answered 412 (the handover runs) waits for the handover's result", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * MiB), { chunkSize: 8 * MiB });
  const events = recorder(up);
  const patch = created(env, up);
  patch.progress(8 * MiB);
  up.cancel("stop"); // the whole body was sent; the answer had not come
  env.xhr().respond(412, {}, "upload is handover; too late to cancel");
  assert.deepEqual([up.cancelling, up.cancelled, up.state_msg], [false, false, "Too late to cancel; handing over"]);
  assert.deepEqual(events, []);
  env.fire();
  assert.deepEqual(request(env.xhr()), ["HEAD", URL]);
  env.xhr().respond(200, { "Upload-Offset": 8 * MiB, "Upload-Length": 8 * MiB, ...live });
  assert.deepEqual([up.state_msg, up.bytes_acked, up.can_cancel, up.can_pause], ["Handing over", 8 * MiB, false, false]);
  assert.ok(env.fire() >= 1500, "asked again after the backoff");
  env.xhr().respond(200, { "Upload-Offset": 8 * MiB, "Upload-Length": 8 * MiB });
  assert.deepEqual(events, ["finished"]);
});

test("a cancel while a plain creation is under way follows it: creation, then DELETE", () => {
  const env = load();
  env.storage.setItem("incoming.upload|app.example|8388608|1600000000000|a.bin",
                      JSON.stringify({ ticket: "t", at: env.clock.now })); // a reloaded page
  const up = new env.incoming.Uploader("t", file(8 * MiB));
  const events = recorder(up);
  up.start();
  assert.equal(env.xhr().body, null, "no body: the server may have bytes of this upload");
  up.cancel("oops");
  assert.equal(env.xhrs.length, 1);
  assert.equal(env.xhr().aborted, false);
  assert.equal(up.state_msg, "Cancelling");
  env.xhr().respond(201, { Location: "/incoming/tus/t", "Upload-Offset": 0, ...live });
  assert.deepEqual(request(env.xhr()), ["DELETE", URL]);
  env.xhr().respond(204);
  assert.deepEqual(events, ["cancelled: oops"]);
  assert.deepEqual(env.xhrs.map((x) => x.method), ["POST", "DELETE"]);
});

test("a cancel stops a creation that carries the file: a plain creation, then DELETE", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * MiB));
  const events = recorder(up);
  up.start();
  const creation = env.xhr();
  creation.progress(3 * MiB);
  up.cancel("oops");
  assert.equal(creation.aborted, true, "not sent to its end");
  assert.deepEqual([request(env.xhr()), env.xhr().body], [["POST", "https://app.example/incoming/tus/"], null]);
  assert.equal(up.state_msg, "Cancelling");
  env.xhr().respond(201, { Location: "/incoming/tus/t", "Upload-Offset": 3 * MiB, ...live });
  assert.deepEqual(request(env.xhr()), ["DELETE", URL]);
  env.xhr().respond(204);
  assert.deepEqual(events, ["cancelled: oops"]);
  assert.deepEqual(env.xhrs.map((x) => x.method), ["POST", "POST", "DELETE"]);
});

test("a cancel before start() ends at once without a request", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(10));
  const events = recorder(up);
  up.cancel("never mind");
  up.start();
  assert.deepEqual(events, ["cancelled: never mind"]);
  assert.equal(env.xhrs.length, 0);
});

test("409 asks HEAD for the offset and continues from there", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * MiB), { chunkSize: 4 * MiB });
  const events = recorder(up);
  created(env, up).respond(409, { "Upload-Offset": 2 * MiB }, "Upload-Offset 0 is not the upload's offset 2097152");
  assert.deepEqual(request(env.xhr()), ["HEAD", URL]);
  assert.equal(env.pending().length, 0, "at once, not after a delay");
  env.xhr().respond(200, { "Upload-Offset": 2 * MiB, "Upload-Length": 8 * MiB, ...live });
  assert.deepEqual([env.xhr().method, env.xhr().requestHeaders["Upload-Offset"], up.bytes_acked],
                   ["PATCH", String(2 * MiB), 2 * MiB]);
  assert.deepEqual([events, up.error_code], [[], 0]);
});

test("network errors, 5xx, 423 and a full storage's 507 are retried with the backoff and resume from HEAD", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * MiB), { chunkSize: 4 * MiB });
  const events = recorder(up);
  created(env, up).progress(MiB);
  const delays = [];
  const failures = [
    [(x) => x.fail(), /^Connection lost; retrying in \d+ s$/, 0],
    [(x) => x.respond(503, {}, "the server is restarting; resume the upload"),
     /^Interrupted: the server is restarting; resume the upload; retrying in \d+ s$/, 0],
    [(x) => x.respond(500, {}, "internal server error"), /^Interrupted: internal server error; retrying/, 99],
    [(x) => x.respond(502, {}, "<html>bad gateway</html>", { tus: false }), /^Interrupted: HTTP 502 Bad Gateway; retrying/, 0],
    [(x) => x.respond(423, {}, "another connection is serving this upload"),
     /^Interrupted: another connection is serving this upload; retrying/, 13],
    [(x) => x.respond(507, {}, "the server's storage is full; resume later: nothing acknowledged is lost"),
     /^Interrupted: the server's storage is full; resume later: nothing acknowledged is lost; retrying/, 24],
  ];
  for (const [fail, state, code] of failures) {
    fail(env.xhr());
    assert.match(up.state_msg, state);
    assert.deepEqual([up.connected, up.bytes_acked, up.error_code], [false, 0, code]);
    delays.push(env.fire());
    assert.deepEqual(request(env.xhr()), ["HEAD", URL]);
    env.xhr().respond(200, { "Upload-Offset": 0, "Upload-Length": 8 * MiB, ...live });
    assert.equal(env.xhr().method, "PATCH");
  }
  for (let i = 0; i < 4; i++) {
    env.xhr().fail();
    delays.push(env.fire());
    env.xhr().fail(); // the HEAD too
    delays.push(env.fire());
    env.xhr().respond(200, { "Upload-Offset": 0, "Upload-Length": 8 * MiB, ...live });
  }
  const nominal = [1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60, 60, 60, 60];
  delays.forEach((ms, i) => {
    assert.ok(ms >= nominal[i] * 750 && ms <= nominal[i] * 1250, `retry ${i}: ${ms} ms`);
  });
  assert.deepEqual(events, [], "retried, never onerror");
  env.xhr().respond(204, { "Upload-Offset": 4 * MiB, ...live });
  assert.deepEqual([up.error_code, up.error_msg, up.state_msg], [0, "", "Uploading"]);
  env.xhr().fail();
  assert.ok(env.fire() <= 1250, "the backoff starts over once a PATCH went through");
});

test("502 on the final PATCH is HANDOVER_FAILED (30) with the server's text", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(MiB));
  const events = recorder(up);
  created(env, up).respond(502, {}, "handover failed: the backend did not take the file");
  assert.deepEqual(events, ["error 30: handover failed: the backend did not take the file"]);
  assert.deepEqual([up.state_msg, up.can_cancel, up.can_pause, up.connected, up.finished],
                   ["Error: handover failed: the backend did not take the file", false, false, false, false]);
  assert.equal(env.pending().length, 0);
});

test("refusals map to the WebSocket's error codes", () => {
  const cases = [
    ["creation", 404, "unknown upload ticket", 10],
    ["creation", 409, "LengthBytes 5 differs from the 6 given before", 14],
    ["creation", 413, "6 bytes exceed the limit of 5 bytes", 22],
    ["creation", 507, "6 bytes do not fit in the free storage space", 21],
    ["creation", 403, "this Origin may not upload here", 0],
    ["PATCH", 404, "no such upload; create it with the ticket first", 10],
  ];
  for (const [when, status, text, code] of cases) {
    const env = load();
    const up = new env.incoming.Uploader("t", file(6));
    const events = recorder(up);
    up.start();
    if (when === "PATCH") {
      env.xhr().respond(201, { Location: "/incoming/tus/t", "Upload-Offset": 0, ...live });
    }
    env.xhr().respond(status, {}, text);
    assert.deepEqual(events, [`error ${code}: ${text}`], `${when} ${status}`);
    assert.equal(up.state_msg, "Error: " + text);
  }
});

test("410 to the creation: HEAD tells finished from cancelled", () => {
  const env = load();
  const done = new env.incoming.Uploader("t", file(10));
  const events = recorder(done);
  done.start();
  env.xhr().respond(410, {}, "this upload is already finished");
  assert.deepEqual(request(env.xhr()), ["HEAD", URL]);
  env.xhr().respond(200, { "Upload-Offset": 10, "Upload-Length": 10 });
  assert.deepEqual(events, ["finished"]);
  const gone = new env.incoming.Uploader("t", file(10));
  const others = recorder(gone);
  gone.start();
  env.xhr().respond(410, {}, "this upload was cancelled: expired");
  env.xhr().respond(410);
  assert.deepEqual(others, ["cancelled: this upload was cancelled: expired"]);
  assert.deepEqual([gone.cancelled, gone.error_code, gone.state_msg],
                   [true, 0, "Cancelled: this upload was cancelled: expired"]);
});

test("a cancel found on resuming (HEAD 410, no text) asks a creation for the server's text", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * MiB), { chunkSize: 4 * MiB });
  const events = recorder(up);
  created(env, up).fail();
  env.fire();
  env.xhr().respond(410);
  assert.deepEqual(request(env.xhr()), ["POST", "https://app.example/incoming/tus/"]);
  env.xhr().respond(410, {}, "this upload was cancelled: cancelled by the backend");
  assert.deepEqual(events, ["cancelled: this upload was cancelled: cancelled by the backend"]);
});

test("the final PATCH lost: HEAD at full offset waits for the handover, then finishes", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(4 * MiB));
  const events = recorder(up);
  const patch = created(env, up);
  patch.progress(4 * MiB);
  patch.bodySent();
  patch.fail();
  env.fire();
  env.xhr().respond(200, { "Upload-Offset": 4 * MiB, "Upload-Length": 4 * MiB, ...live });
  assert.deepEqual([up.state_msg, up.finished, up.frac_complete], ["Handing over", false, 1]);
  env.fire();
  env.xhr().respond(200, { "Upload-Offset": 4 * MiB, "Upload-Length": 4 * MiB, ...live });
  env.fire();
  env.xhr().respond(200, { "Upload-Offset": 4 * MiB, "Upload-Length": 4 * MiB });
  assert.deepEqual(events, ["finished"]);
  // or the handover failed: the upload was cancelled
  const other = new env.incoming.Uploader("t", file(4 * MiB));
  const others = recorder(other);
  created(env, other).fail();
  env.fire();
  env.xhr().respond(200, { "Upload-Offset": 4 * MiB, "Upload-Length": 4 * MiB, ...live });
  env.fire();
  env.xhr().respond(410);
  env.xhr().respond(410, {}, "this upload was cancelled: handover failed: the backend did not take the file");
  assert.deepEqual(others, ["cancelled: this upload was cancelled: handover failed: the backend did not take the file"]);
});

test("a zero-byte file: the creation is answered after the handover", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(0));
  const events = recorder(up);
  up.start();
  assert.equal(env.xhr().requestHeaders["Upload-Length"], "0");
  env.xhr().respond(201, { "Upload-Offset": 0 });
  assert.deepEqual([events, up.frac_complete, env.xhrs.length], [["finished"], 1, 1]);
});

test("a server without tus (404 from the endpoint) gets the WebSocket", async () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(4096));
  up.start();
  env.xhr().respond(404, {}, "<html>No Such Resource</html>", { tus: false });
  assert.equal(env.sockets.length, 1);
  const socket = env.sockets[0];
  assert.equal(socket.url, "wss://app.example/incoming/frontend/upload_ws");
  socket.open();
  assert.deepEqual(socket.sent[0].MsgType, "MsgUploadReq");
  socket.receive("MsgUploadConf", { ChunkSizeKB: 1, FilePos: 0, SendAhead: 2 });
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(socket.chunks().length, 2);
  assert.equal(env.xhrs.length, 1, "no more HTTP");
  // a pause and an unpause stay on the WebSocket
  up.pause("pause");
  up.pause("unpause");
  assert.deepEqual([env.sockets.length, env.xhrs.length], [2, 1]);
});

test("no answer to the creation: a WebSocket that opens means no tus; one that fails, a retry", () => {
  // another origin's page cannot see the old server's 404 (its preflight fails)
  const env = load();
  const up = new env.incoming.Uploader("t", file(4096));
  up.start();
  env.xhr().fail();
  assert.equal(env.sockets.length, 1);
  assert.equal(up.state_msg, "Connecting");
  env.sockets[0].open();
  assert.equal(env.sockets[0].closed, true, "the probe is closed");
  assert.equal(env.sockets.length, 2);
  env.sockets[1].open();
  assert.equal(env.sockets[1].messages("MsgUploadReq").length, 1);
  // the server is down: retried over HTTP
  const down = new env.incoming.Uploader("u", file(4096));
  down.start();
  env.xhr().fail();
  env.sockets.at(-1).drop();
  assert.match(down.state_msg, /^Connection lost; retrying in \d+ s$/);
  env.fire();
  assert.equal(env.xhr().method, "POST");
  env.xhr().respond(201, { Location: "/incoming/tus/u", "Upload-Offset": 0, ...live });
  assert.equal(env.xhr().method, "PATCH");
  // once the server answered as tus, no answer is a lost connection
  const sockets = env.sockets.length;
  env.xhr().fail();
  env.fire();
  env.xhr().fail();
  assert.equal(env.sockets.length, sockets);
});

test("find_upload: the ticket of an upload started for this file, until it ends", () => {
  const env = load();
  const { find_upload, Uploader } = env.incoming;
  const a = file(8 * MiB, "a.bin");
  assert.equal(find_upload(a), null);
  const up = new Uploader("t", a, { chunkSize: 4 * MiB });
  assert.equal(find_upload(a), null, "remembered once started");
  created(env, up);
  assert.equal(find_upload(a), "t");
  assert.equal(find_upload(file(8 * MiB, "a.bin")), "t", "the same name, size and date");
  assert.equal(find_upload(file(8 * MiB, "b.bin")), null);
  assert.equal(find_upload(file(8 * MiB + 1, "a.bin")), null);
  assert.equal(find_upload(file(8 * MiB, "a.bin", 1)), null, "modified since");
  env.incoming.set_server_hostname("other.example");
  assert.equal(find_upload(a), null, "per server");
  env.incoming.set_server_hostname(null);
  // a reloaded page continues it: same ticket, creation again
  const again = new Uploader(find_upload(a), a, { chunkSize: 4 * MiB });
  const events = recorder(again);
  created(env, again, 4 * MiB);
  assert.deepEqual([env.xhr().body.start, again.bytes_acked], [4 * MiB, 4 * MiB]);
  env.xhr().respond(204, { "Upload-Offset": 8 * MiB });
  assert.deepEqual(events, ["finished"]);
  assert.equal(find_upload(a), null, "forgotten when finished");
  // forgotten when cancelled, or when it ends in an error
  const cancelled = new Uploader("c", a);
  created(env, cancelled);
  cancelled.cancel();
  env.xhr().respond(204);
  assert.equal(find_upload(a), null);
  const failed = new Uploader("f", a);
  failed.start();
  assert.equal(find_upload(a), "f");
  env.xhr().respond(404, {}, "unknown upload ticket");
  assert.equal(find_upload(a), null);
  // another uploader's end does not forget this one; a cancel before start neither
  new Uploader("g", a).start();
  new Uploader("h", a).cancel();
  assert.equal(find_upload(a), "g");
  // WebSocket uploads are remembered too
  const ws = new Uploader("w", file(1, "w.bin"), { transport: "websocket" });
  ws.start();
  assert.equal(find_upload(file(1, "w.bin")), "w");
});

test("find_upload forgets uploads left alone for 12 hours", () => {
  const env = load();
  const a = file(8 * MiB, "a.bin");
  created(env, new env.incoming.Uploader("t", a, { chunkSize: 4 * MiB }));
  env.clock.now += 11 * 3600 * 1000;
  assert.equal(env.incoming.find_upload(a), "t");
  env.xhr().respond(204, { "Upload-Offset": 4 * MiB, ...live }); // activity renews it
  env.clock.now += 11 * 3600 * 1000;
  assert.equal(env.incoming.find_upload(a), "t");
  env.clock.now += 2 * 3600 * 1000;
  assert.equal(env.incoming.find_upload(a), null);
  // and a new upload prunes entries nobody continued
  env.storage.setItem("incoming.upload|app.example|1|0|old.bin", JSON.stringify({ ticket: "o", at: 0 }));
  env.storage.setItem("unrelated", "kept");
  new env.incoming.Uploader("n", file(1, "new.bin")).start();
  assert.deepEqual([...env.storage.items.keys()].sort(), [
    "incoming.upload|app.example|1|1600000000000|new.bin",
    "unrelated",
  ]);
});

test("uploads work where localStorage is missing, throws, or is full", () => {
  class FullStorage extends FakeStorage {
    setItem() {
      throw new Error("QuotaExceededError");
    }
  }
  for (const storage of [null, "throws", new FullStorage()]) {
    const env = load({ storage });
    const a = file(MiB);
    const up = new env.incoming.Uploader("t", a);
    const events = recorder(up);
    created(env, up).respond(204, { "Upload-Offset": MiB });
    assert.deepEqual(events, ["finished"]);
    assert.equal(env.incoming.find_upload(a), null);
  }
});

test("the cancel reason goes with the DELETE, percent-encoded UTF-8, as much as the server keeps", () => {
  const reasons = [
    [undefined, "cancelled by the user"],
    ["trop lent, désolé 🐢 +&%", "trop lent, désolé 🐢 +&%"],
    ["x".repeat(499) + "🐢", "x".repeat(499)], // 500 chars, the last one half of a pair
    ["é".repeat(800), "é".repeat(500)],
    ["lone \ud800 surrogate", "lone \ufffd surrogate"],
  ];
  for (const [reason, sent] of reasons) {
    const env = load();
    const up = new env.incoming.Uploader("t", file(8 * MiB), { chunkSize: 4 * MiB });
    const events = recorder(up);
    created(env, up);
    up.cancel(reason);
    const header = env.xhr().requestHeaders["Incoming-Cancel-Reason"];
    assert.equal(env.xhr().method, "DELETE");
    assert.equal(decodeURIComponent(header), sent, String(reason));
    assert.match(header, /^[A-Za-z0-9%\-_.!~*'()]*$/, "ASCII only");
    env.xhr().respond(204);
    assert.deepEqual(events, ["cancelled: " + (reason || "cancelled by the user")], "the page keeps it whole");
  }
});

const verdict = JSON.stringify({ url: "/files/été 100%.mp4", sha256: "ab".repeat(32), name: "a+b" });

test("the final PATCH's Incoming-Result is `result` (decoded) when onfinished fires", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(8 * MiB), { chunkSize: 4 * MiB });
  const seen = [];
  up.onfinished = (u) => seen.push([u.result, u.finished]);
  created(env, up).respond(204, { "Upload-Offset": 4 * MiB, ...live, "Incoming-Result": "ignored" });
  assert.equal(up.result, "", "nothing until finished");
  env.xhr().respond(204, { "Upload-Offset": 8 * MiB, "Incoming-Result": encodeURIComponent(verdict) });
  assert.deepEqual(seen, [[verdict, true]]);
  assert.equal(up.result, verdict);
  assert.throws(() => { up.result = "x"; }, TypeError, "read-only");
});

test("without Incoming-Result (an older server, no verdict) `result` stays empty", () => {
  for (const headers of [{}, { "Incoming-Result": "" }]) {
    const env = load();
    const up = new env.incoming.Uploader("t", file(MiB));
    const events = recorder(up);
    created(env, up).respond(204, { "Upload-Offset": MiB, ...headers });
    assert.deepEqual([events, up.result], [["finished"], ""]);
  }
  // and text that is not percent-encoded is taken as it came
  const env = load();
  const up = new env.incoming.Uploader("t", file(MiB));
  created(env, up).respond(204, { "Upload-Offset": MiB, "Incoming-Result": "100% done" });
  assert.deepEqual([up.finished, up.result], [true, "100% done"]);
});

test("an upload found finished by HEAD (lost final PATCH, reload, late cancel) gets HEAD's verdict", () => {
  const finished = { "Upload-Offset": 4 * MiB, "Upload-Length": 4 * MiB, "Incoming-Result": encodeURIComponent(verdict) };
  // the final PATCH's answer was lost; HEAD waits out the handover
  let env = load();
  let up = new env.incoming.Uploader("t", file(4 * MiB));
  const results = [];
  const record = (u) => (u.onfinished = () => results.push(u.result));
  record(up);
  created(env, up).fail();
  env.fire();
  env.xhr().respond(200, { "Upload-Offset": 4 * MiB, "Upload-Length": 4 * MiB, ...live });
  assert.equal(up.result, "");
  env.fire();
  assert.equal(env.xhr().method, "HEAD");
  env.xhr().respond(200, finished);
  // a reloaded page: the creation finds it finished (410), HEAD tells
  env = load();
  up = new env.incoming.Uploader("t", file(4 * MiB));
  record(up);
  up.start();
  env.xhr().respond(410, {}, "this upload is already finished");
  assert.equal(env.xhr().method, "HEAD");
  env.xhr().respond(200, finished);
  // a cancel that came too late
  env = load();
  up = new env.incoming.Uploader("t", file(4 * MiB));
  record(up);
  created(env, up);
  up.cancel("stop");
  env.xhr().respond(410, {}, "this upload is already finished");
  env.xhr().respond(200, finished);
  // an older server's HEAD has none
  env = load();
  up = new env.incoming.Uploader("t", file(4 * MiB));
  record(up);
  up.start();
  env.xhr().respond(410, {}, "this upload is already finished");
  env.xhr().respond(200, { "Upload-Offset": 4 * MiB, "Upload-Length": 4 * MiB });
  assert.deepEqual(results, [verdict, verdict, verdict, ""]);
});

test("a zero-byte file: the creation's answer carries the verdict", () => {
  const env = load();
  const up = new env.incoming.Uploader("t", file(0));
  const results = [];
  up.onfinished = (u) => results.push(u.result);
  up.start();
  env.xhr().respond(201, { "Upload-Offset": 0, "Incoming-Result": encodeURIComponent("é") });
  assert.deepEqual(results, ["é"]);
});

test("frac_sent moves within a PATCH, never below frac_complete, and is 1 only once finished", () => {
  const env = load();
  const total = 10 * MiB;
  const up = new env.incoming.Uploader("t", file(total), { chunkSize: 4 * MiB });
  const seen = [];
  up.onprogress = (u) => {
    if (seen.at(-1) !== u.frac_sent) seen.push(u.frac_sent);
    assert.ok(u.frac_sent >= u.frac_complete || !u.finished && u.bytes_acked === total);
  };
  assert.equal(up.frac_sent, 0);
  let patch = created(env, up);
  for (const sent of [1, 2, 3]) {
    patch.progress(sent * MiB);
    assert.deepEqual([up.frac_sent, up.frac_complete], [sent / 10, 0]);
  }
  patch.respond(204, { "Upload-Offset": 4 * MiB, ...live });
  assert.deepEqual([up.frac_sent, up.frac_complete], [0.4, 0.4]);
  env.xhr().progress(MiB);
  assert.equal(up.frac_sent, 0.5);
  assert.deepEqual(seen, [0, 0.1, 0.2, 0.3, 0.4, 0.5], "onprogress at each step");
  // paused: what was sent counts until HEAD says what the server kept of it
  up.pause("pause");
  assert.equal(up.frac_sent, 0.5);
  up.pause("unpause");
  env.xhr().respond(200, { "Upload-Offset": 4.5 * MiB, ...live });
  assert.deepEqual([up.frac_sent, up.frac_complete], [0.45, 0.45]);
  env.xhr().respond(204, { "Upload-Offset": 8.5 * MiB, ...live });
  patch = env.xhr();
  patch.progress(MiB);
  patch.progress(1.5 * MiB);
  patch.bodySent();
  assert.equal(up.state_msg, "Handing over");
  assert.deepEqual([up.frac_sent, up.frac_complete], [(total - 1) / total, 0.85], "sent, not finished");
  patch.respond(204, { "Upload-Offset": total });
  assert.deepEqual([up.finished, up.frac_sent, up.frac_complete], [true, 1, 1]);
  assert.deepEqual(seen.slice(6), [0.45, 0.85, 0.95, (total - 1) / total, 1],
                   "back only to the server's offset, after the pause");

  const empty = new env.incoming.Uploader("t", file(0));
  empty.start();
  assert.equal(empty.frac_sent, 0);
  env.xhr().respond(201, {});
  assert.deepEqual([empty.finished, empty.frac_sent], [true, 1]);
});
