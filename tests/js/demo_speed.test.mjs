// The demo page's speed (examples/demo/static/speed.js): bytes sent in this page's
// session while they move, never the offset a resumed upload starts from.
// Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import vm from "node:vm";

const source = readFileSync(new URL("../../examples/demo/static/speed.js", import.meta.url), "utf8");
const MB = 1e6;

function speed() {
  const context = vm.createContext({});
  vm.runInContext(source, context);
  return new context.Speed();
}

// `sent` bytes at `ms`, moving or not; returns the rate after each sample.
function feed(meter, samples) {
  return samples.map(([ms, sent, moving = true]) => {
    meter.sample(ms, sent, moving);
    return meter.rate();
  });
}

test("a resumed upload's offset is not speed: only bytes sent since it moves again", () => {
  // the page reloaded: bytes_tx is 0 while connecting, then the server's offset, 60 MB
  const rates = feed(speed(), [
    [0, 0, false],
    [40, 60 * MB],
    [300, 60 * MB + 2 * MB],
    [1040, 60 * MB + 8 * MB],
    [2040, 60 * MB + 16 * MB],
  ]);
  assert.deepEqual(rates, [0, 0, 0, 8 * MB, 8 * MB]);
});

test("no figure while nothing moves (connecting, paused, handing over), nor just after", () => {
  const meter = speed();
  assert.deepEqual(feed(meter, [[0, 0], [500, 4 * MB], [1000, 8 * MB]]), [0, 8 * MB, 8 * MB]);
  assert.deepEqual(feed(meter, [[1100, 8 * MB, false]]), [0], "handing over: no stale speed");
  assert.deepEqual(feed(meter, [[5000, 8 * MB], [5400, 9 * MB], [5500, 9.5 * MB]]), [0, 0, 3 * MB]);
});

test("bytes going back (resumed from a lower offset after a pause) start the count again", () => {
  const meter = speed();
  feed(meter, [[0, 0], [1000, 10 * MB]]);
  assert.deepEqual(feed(meter, [[1100, 9 * MB], [1700, 12 * MB]]), [0, 5 * MB]);
});

test("the speed of the last 3 s: it follows a change and falls when bytes stop", () => {
  const meter = speed();
  const samples = [];
  for (let s = 0; s <= 6; s++) samples.push([s * 1000, s * 2 * MB]); // 2 MB/s for 6 s
  for (let s = 7; s <= 9; s++) samples.push([s * 1000, 12 * MB + (s - 6) * 8 * MB]); // then 8
  const rates = feed(meter, samples);
  assert.deepEqual(rates.slice(1, 7), Array(6).fill(2 * MB));
  assert.deepEqual(rates.slice(7), [4 * MB, 6 * MB, 8 * MB]);
  assert.deepEqual(feed(meter, [[10_000, 36 * MB], [11_000, 36 * MB], [12_000, 36 * MB]]),
                   [8 * MB * 2 / 3, 8 * MB / 3, 0], "stalled: no stale figure");
});
