/* The demo page: one incoming.Uploader per chosen file, a row each.
 *
 * Uploads go over HTTP (incoming.js's default). A file this browser had started
 * to upload before the page was reloaded (or closed) continues with the same
 * ticket: incoming.find_upload(file) remembers it, so no new ticket is asked for.
 * When a file is finished, the web app's verdict (the uploader's `result`: JSON with the
 * file's URL, size, SHA-256 and stored name) says where it is: no need to ask the web app.
 * The bar shows the bytes sent (`frac_sent`); the speed, those sent by this page while
 * they move (speed.js). */
"use strict";

incoming.set_server_hostname(window.INCOMING_HOST);

var uploadsList = document.getElementById("uploads");
var filesList = document.getElementById("files");
var drop = document.getElementById("drop");
var picker = document.getElementById("picker");
var template = document.getElementById("upload-row");

function human(bytes) {
  var units = ["B", "KB", "MB", "GB", "TB"];
  var i = 0;
  while (bytes >= 1000 && i < units.length - 1) { bytes /= 1000; i++; }
  return (i ? bytes.toFixed(1) : bytes) + " " + units[i];
}

function duration(seconds) {
  if (!isFinite(seconds)) { return ""; }
  seconds = Math.round(seconds);
  if (seconds < 60) { return seconds + " s left"; }
  return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s left";
}

function addUpload(file) {
  var row = template.content.firstElementChild.cloneNode(true);
  var empty = uploadsList.querySelector(".empty");
  if (empty) { empty.remove(); }
  uploadsList.appendChild(row);
  row.querySelector(".name").textContent = file.name;
  row.querySelector(".size").textContent = human(file.size);
  var pauseButton = row.querySelector(".pause");
  var cancelButton = row.querySelector(".cancel");
  pauseButton.disabled = cancelButton.disabled = true;
  var remembered = incoming.find_upload(file);
  if (remembered) {
    var note = row.querySelector(".note");
    note.hidden = false;
    note.textContent = "Continuing the upload this browser started before";
    start(row, file, remembered, true);
  } else {
    newTicket(row, file);
  }
}

function newTicket(row, file) {
  row.querySelector(".state").textContent = "Asking for a ticket";
  fetch("/api/ticket", { method: "POST" }).then(function (response) {
    return response.json();
  }).then(function (answer) {
    if (!answer.ticket) { throw new Error(answer.error || "no ticket"); }
    start(row, file, answer.ticket, false);
  }).catch(function (e) {
    row.classList.add("failed");
    row.querySelector(".state").textContent = "Could not start";
    showError(row, e.message);
  });
}

function showError(row, text) {
  var box = row.querySelector(".error");
  box.hidden = false;
  box.textContent = text;
}

function start(row, file, ticket, resumed) {
  var up = new incoming.Uploader(ticket, file);
  var speed = new Speed();
  var failed = false;
  var ticker = setInterval(render, 1000); // the speed falls when bytes stop moving
  row.dataset.ticket = ticket;
  row.uploader = up;
  var pauseButton = row.querySelector(".pause");
  var cancelButton = row.querySelector(".cancel");
  pauseButton.onclick = function () { up.pause("toggle"); };
  cancelButton.onclick = function () { up.cancel("cancelled on the demo page"); };

  function render() {
    var ended = up.finished || up.cancelled || failed;
    // bytes move: not while connecting, paused, cancelling or handing over
    var moving = up.connected && !up.paused && !up.cancelling && !ended &&
      up.bytes_tx < up.bytes_total;
    speed.sample(performance.now(), up.bytes_tx, moving);
    var rate = speed.rate();
    // bytes sent, moving within a request; 1 once finished
    row.querySelector("progress").value = up.frac_sent;
    row.querySelector(".state").textContent = up.state_msg;
    row.querySelector(".rate").textContent = rate > 0 ? human(rate) + "/s" : "";
    row.querySelector(".eta").textContent =
      rate > 0 ? duration((up.bytes_total - up.bytes_tx) / rate) : "";
    pauseButton.textContent = up.paused ? "Resume" : "Pause";
    pauseButton.disabled = !up.can_pause;
    cancelButton.disabled = !up.can_cancel;
    pauseButton.hidden = cancelButton.hidden = ended; // nothing left to pause or cancel
    row.classList.toggle("cancelled", up.cancelled);
    row.classList.toggle("finished", up.finished);
    if (ended) { clearInterval(ticker); }
  }

  up.onprogress = render;
  up.onfinished = function () { render(); received(row, up); };
  up.oncancelled = function () { render(); showError(row, "Cancelled: " + up.cancel_msg); };
  up.onerror = function () {
    failed = true;
    if (resumed && up.error_code === 10) {
      // Incoming!! no longer knows the ticket (it expired): start over with a new one
      clearInterval(ticker);
      row.querySelector(".note").textContent = "The earlier upload had expired; starting over";
      newTicket(row, file);
      return;
    }
    render();
    row.classList.add("failed");
    showError(row, "Error " + up.error_code + ": " + up.error_msg);
  };
  up.start();
  render();
}

// The web app's verdict: where it keeps the file, its size and the SHA-256 of what it received.
function received(row, up) {
  var verdict = null;
  try {
    verdict = JSON.parse(up.result);
  } catch (e) {
    // none: an Incoming!! server older than `result`
  }
  if (!verdict || typeof verdict.url !== "string") {
    refreshFiles(); // then ask the web app
    return;
  }
  var box = row.querySelector(".received");
  var link = box.querySelector("a");
  link.href = verdict.url;
  link.textContent = verdict.name;
  var size = typeof verdict.size === "number" ? verdict.size : up.bytes_total; // kept from before sizes
  box.querySelector(".received-size").textContent = human(size);
  box.querySelector(".sha256").textContent = verdict.sha256;
  box.hidden = false;
  listFile({ name: verdict.name, url: verdict.url, size: size }, true);
}

function listFile(f, first) {
  var empty = filesList.querySelector(".empty");
  if (empty) { empty.remove(); }
  var li = document.createElement("li");
  var a = document.createElement("a");
  a.href = f.url;
  a.textContent = f.name;
  li.appendChild(a);
  li.appendChild(document.createTextNode(" (" + human(f.size) + ")"));
  filesList.insertBefore(li, first ? filesList.firstChild : null);
}

// The files the web app has, from earlier visits too.
function refreshFiles() {
  fetch("/api/files").then(function (r) { return r.json(); }).then(function (files) {
    filesList.textContent = "";
    if (!files.length) {
      filesList.innerHTML = '<li class="empty">No files yet.</li>';
      return;
    }
    files.forEach(function (f) { listFile(f, false); });
  });
}

function addAll(files) {
  Array.prototype.forEach.call(files, addUpload);
}

picker.addEventListener("change", function () { addAll(picker.files); picker.value = ""; });
drop.addEventListener("dragover", function (e) { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", function () { drop.classList.remove("over"); });
drop.addEventListener("drop", function (e) {
  e.preventDefault();
  drop.classList.remove("over");
  addAll(e.dataTransfer.files);
});
refreshFiles();
