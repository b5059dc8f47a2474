/* The demo's upload speed: bytes sent by this page over the last few seconds, counted
 * only while bytes move. A resumed upload starts from the server's offset: those bytes
 * were sent before (by another page, or before a pause), so they never count as speed.
 * Tested in tests/js/demo_speed.test.mjs. */
"use strict";

function Speed() {
  this.samples = []; // [ms, bytes sent], since bytes last started to move
}

Speed.WINDOW_MS = 3000; // the speed of the last 3 s: steady, yet quick to follow a change
Speed.SETTLE_MS = 500; // no figure before the upload has moved this long

// `moving`: bytes are being sent (not connecting, paused, handing over, ended).
Speed.prototype.sample = function (now, sent, moving) {
  var samples = this.samples;
  if (!moving || (samples.length && sent < samples[samples.length - 1][1])) {
    samples.length = 0; // stopped, or started again from the server's offset
  }
  if (!moving) {
    return;
  }
  samples.push([now, sent]);
  while (samples.length > 2 && now - samples[1][0] >= Speed.WINDOW_MS) {
    samples.shift();
  }
};

// Bytes per second, 0 while there is no figure.
Speed.prototype.rate = function () {
  var samples = this.samples;
  var first = samples[0];
  var last = samples[samples.length - 1];
  if (samples.length < 2 || last[0] - first[0] < Speed.SETTLE_MS) {
    return 0;
  }
  return (last[1] - first[1]) * 1000 / (last[0] - first[0]);
};
