// The Uppy plugin (frontend/uppy.mjs) on a real @uppy/core, with a stand-in for @uppy/tus
// that records what it would send and answers as our tus server would. The real
// @uppy/tus against the real server, in Chromium: tests/browser/test_uppy.py.
// Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import Uppy from "@uppy/core";
import IncomingTickets from "../../frontend/uppy.mjs";

// Answers as @uppy/tus does: `upload-success` with {body: {xhr}}, or `upload-error` with
// tus-js-client's DetailedError for a refusal: its message names the status, and its
// originalResponse, aborted by then, says 0 (a status of "live:NNN" stays readable).
function fakeTus(uppy, answer) {
  const sent = [];
  uppy.addUploader(async (fileIDs) => {
    for (const file of uppy.getFilesByIds(fileIDs).filter((f) => !f.error)) {
      sent.push({ name: file.name, ticket: file.meta.ticket, tus: file.tus });
      const [status, result, pending] = answer(file);
      if (status === 204) {
        const headers = result === undefined ? {} : { "incoming-result": result };
        if (pending) {
          headers["incoming-handover"] = "pending";
        }
        const xhr = { getResponseHeader: (name) => headers[name.toLowerCase()] ?? null };
        uppy.emit("upload-success", uppy.getFile(file.id), { status: 200, body: { xhr }, uploadURL: "u" });
      } else {
        const [code, live] = String(status).startsWith("live:") ? [status.slice(5), true] : [status, false];
        const error = new Error("tus: unexpected response while creating upload, originated from " +
          `request (method: POST, url: u, response code: ${code || "n/a"}, response text: ` +
          `${code ? "response code: 404, " : "n/a"}, request id: n/a)`);
        error.originalResponse = code ? { getStatus: () => (live ? Number(code) : 0) } : null;
        uppy.emit("upload-error", uppy.getFile(file.id), error);
      }
    }
  });
  return sent;
}

function uppyWith(files, getTicket, answer = () => [204, ""]) {
  const uppy = new Uppy({ logger: quiet, infoTimeout: 0 }).use(IncomingTickets, { getTicket });
  const sent = fakeTus(uppy, answer);
  for (const [name, meta] of files) {
    uppy.addFile({ name, type: "application/octet-stream", data: new Blob([name]), meta });
  }
  return { uppy, sent };
}

const quiet = { debug() {}, warn() {}, error() {} };
const byName = (uppy, name) => uppy.getFiles().find((f) => f.name === name);

test("a ticket per file without one, asked at once for all; a file's own ticket is kept", async () => {
  const asked = [];
  let waiting = 0;
  let most = 0;
  const { uppy, sent } = uppyWith([["a.bin"], ["b.bin"], ["c.bin", { ticket: "mine" }]], async (file) => {
    asked.push(file.name);
    most = Math.max(most, ++waiting);
    await new Promise((resolve) => setTimeout(resolve, 5));
    waiting--;
    return "ticket-" + file.name;
  });
  const result = await uppy.upload();
  assert.deepEqual(asked.sort(), ["a.bin", "b.bin"]);
  assert.equal(most, 2, "asked together, not one after the other");
  assert.deepEqual(sent.map((s) => [s.name, s.ticket]).sort(),
                   [["a.bin", "ticket-a.bin"], ["b.bin", "ticket-b.bin"], ["c.bin", "mine"]]);
  // tus-js-client must not resume another ticket's upload of the same file
  assert.ok(sent.every((s) => s.tus.storeFingerprintForResuming === false));
  assert.equal(result.successful.length, 3);
  assert.equal(byName(uppy, "a.bin").progress.preprocess, undefined, "preprocessing over");
});

test("the verdict, decoded, is response.body.result on upload-success and in the result", async () => {
  const verdicts = {
    "a.bin": encodeURIComponent('{"url": "/files/été.mp4"}\nsecond line'),
    "b.bin": undefined, // no verdict, or an older server
    "c.bin": "100%25%20sure%E0%A4%A", // not percent-encoding: as it came
  };
  const { uppy } = uppyWith([["a.bin"], ["b.bin"], ["c.bin"]], async (f) => "t-" + f.name,
                            (file) => [204, verdicts[file.name]]);
  const seen = {};
  uppy.on("upload-success", (file, response) => { seen[file.name] = response.body.result; });
  const result = await uppy.upload();
  const expected = { "a.bin": '{"url": "/files/été.mp4"}\nsecond line', "b.bin": "", "c.bin": "100%25%20sure%E0%A4%A" };
  assert.deepEqual(seen, expected);
  assert.deepEqual(Object.fromEntries(result.successful.map((f) => [f.name, f.response.body.result])), expected);
  assert.equal(byName(uppy, "a.bin").response.body.result, expected["a.bin"]);
  assert.equal(byName(uppy, "a.bin").response.body.pending, false);
});

test("a handover the backend has not answered in time is response.body.pending", async () => {
  const { uppy } = uppyWith([["a.bin"], ["b.bin"]], async (f) => "t-" + f.name,
                            (file) => (file.name === "a.bin" ? [204, "", true] : [204, "v"]));
  const result = await uppy.upload();
  const body = (name) => result.successful.find((f) => f.name === name).response.body;
  assert.deepEqual([body("a.bin").pending, body("a.bin").result], [true, ""]);
  assert.deepEqual([body("b.bin").pending, body("b.bin").result], [false, "v"]);
});

test("a getTicket that fails fails its file only; a retry asks again", async () => {
  let down = true;
  const { uppy, sent } = uppyWith([["a.bin"], ["b.bin"], ["c.bin"]], async (file) => {
    if (file.name === "a.bin" && down) throw new Error("the app refused: quota exceeded");
    if (file.name === "b.bin" && down) return { ticket: "not a string" };
    return "t-" + file.name;
  });
  const errors = [];
  uppy.on("upload-error", (file, error) => errors.push([file.name, error.message]));
  const result = await uppy.upload();
  assert.deepEqual(result.successful.map((f) => f.name), ["c.bin"]);
  assert.deepEqual(result.failed.map((f) => f.name).sort(), ["a.bin", "b.bin"]);
  assert.deepEqual(errors.sort(), [
    ["a.bin", "the app refused: quota exceeded"],
    ["b.bin", 'IncomingTickets: getTicket gave {"ticket":"not a string"}, not a ticket'],
  ]);
  assert.match(byName(uppy, "a.bin").error, /quota exceeded/);
  assert.deepEqual(sent.map((s) => s.name), ["c.bin"], "no upload without a ticket");
  down = false;
  const again = await uppy.retryAll();
  assert.deepEqual(again.successful.map((f) => [f.name, f.meta.ticket]).sort(),
                   [["a.bin", "t-a.bin"], ["b.bin", "t-b.bin"]]);
});

test("a file refused with 404 or 410 loses its ticket, so a retry gets a new one", async () => {
  let n = 0;
  const refusals = { "gone.bin": 410, "unknown.bin": "live:404", "big.bin": 413, "offline.bin": 0 };
  let refuse = true;
  const { uppy, sent } = uppyWith(Object.keys(refusals).map((name) => [name]),
                                  async (file) => `${file.name}#${++n}`,
                                  (file) => (refuse ? [refusals[file.name]] : [204, "ok"]));
  // Uppy keeps the tus URL of a started upload on the file; a dead one must go too
  for (const file of uppy.getFiles()) {
    uppy.setFileState(file.id, { tus: { uploadUrl: "https://up.example/incoming/tus/old" } });
  }
  const first = await uppy.upload();
  assert.equal(first.failed.length, 4);
  const state = (name) => [byName(uppy, name).meta.ticket, byName(uppy, name).tus.uploadUrl];
  assert.deepEqual(state("gone.bin")[1], null);
  assert.deepEqual(state("unknown.bin"), [undefined, null]);
  assert.deepEqual(state("gone.bin")[0], undefined);
  // refused for another reason (too big), or never answered: the ticket still holds
  assert.deepEqual(state("big.bin")[1], "https://up.example/incoming/tus/old");
  assert.match(state("big.bin")[0], /^big\.bin#\d$/);
  assert.match(state("offline.bin")[0], /^offline\.bin#\d$/);
  const before = Object.fromEntries(sent.map((s) => [s.name, s.ticket]));
  refuse = false;
  await uppy.retryAll();
  const after = Object.fromEntries(sent.slice(4).map((s) => [s.name, s.ticket]));
  assert.notEqual(after["gone.bin"], before["gone.bin"]);
  assert.notEqual(after["unknown.bin"], before["unknown.bin"]);
  assert.equal(after["big.bin"], before["big.bin"]);
  assert.equal(after["offline.bin"], before["offline.bin"]);
  assert.equal(n, 6, "two new tickets");
});

test("getTicket is required; removing the plugin stops it", async () => {
  assert.throws(() => new Uppy().use(IncomingTickets, {}), /getTicket option must be a function/);
  assert.throws(() => new Uppy().use(IncomingTickets), /getTicket option must be a function/);
  let asked = 0;
  const { uppy, sent } = uppyWith([["a.bin"]], async () => { asked++; return "t"; },
                                  () => [204, "ok"]);
  uppy.removePlugin(uppy.getPlugin("IncomingTickets"));
  const result = await uppy.upload();
  assert.equal(asked, 0);
  assert.deepEqual(sent.map((s) => s.ticket), [undefined]);
  assert.equal(result.successful[0].response.body.result, undefined);
});
