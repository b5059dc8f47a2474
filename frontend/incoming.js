/*
 * Incoming!! browser library: streams a File to an Incoming!! server over a
 * WebSocket, in chunks, resuming after pauses and lost connections.
 *
 *   <script src="https://HOST/incoming/frontend/incoming.js"></script>
 *   incoming.set_server_hostname("HOST");
 *   var up = new incoming.Uploader(ticket, file);
 *   up.onprogress = function (u) { bar.value = u.frac_complete; };
 *   up.start();
 *
 * Defines the one global `incoming` (also the default export of
 * incoming.mjs, served beside this file).
 */
(function (root) {
  "use strict";

  var server_hostname = null;
  var RETRY_FIRST_S = 1;
  var RETRY_MAX_S = 60;
  // ErrorCodes after which trying again may help: another connection still
  // held the ticket, or the server had an internal error.
  var RETRYABLE_ERRORS = { 13: true, 99: true };

  function set_server_hostname(hostname) {
    server_hostname = hostname;
  }

  function socket_url() {
    var loc = root.location || {};
    var scheme = loc.protocol === "https:" ? "wss://" : "ws://";
    return scheme + (server_hostname || loc.host) + "/incoming/frontend/upload_ws";
  }

  function Uploader(ticket, file) {
    if (!(this instanceof Uploader)) {
      return new Uploader(ticket, file);
    }
    this._ticket = ticket;
    this._file = file;
    this._s = {
      filename: file.name,
      bytes_total: file.size,
      bytes_tx: 0,
      bytes_acked: 0,
      chunks_tx_now: 0,
      chunks_acked_now: 0,
      state_msg: "Ready",
      cancel_msg: "",
      error_code: 0,
      error_msg: "",
      connected: false,
      finished: false,
      paused: false,
      cancelling: false,
      cancelled: false,
      failed: false,
      started: false
    };
    this._ws = null;
    this._generation = 0; // one per connection; late events of old ones are ignored
    this._confirmed = false;
    this._chunk_size = 0;
    this._send_ahead = 0;
    this._read_pos = 0; // next byte to read from the file
    this._queue = []; // chunks being read or read, in file order, not yet sent
    this._retries = 0;
    this._retry_timer = null;
    this._retry_why = ""; // what state_msg says while waiting to reconnect, when not "Connection lost"
    this._cancel_reason = "";
    this.onprogress = null;
    this.onfinished = null;
    this.oncancelled = null;
    this.onerror = null;
  }

  function readonly(name, get) {
    Object.defineProperty(Uploader.prototype, name, { get: get, enumerable: true });
  }

  ["filename", "bytes_total", "bytes_tx", "bytes_acked", "chunks_tx_now",
   "chunks_acked_now", "state_msg", "cancel_msg", "error_code", "error_msg",
   "connected", "finished", "paused", "cancelling", "cancelled"].forEach(function (name) {
    readonly(name, function () { return this._s[name]; });
  });
  readonly("bytes_ahead", function () { return this._s.bytes_tx - this._s.bytes_acked; });
  readonly("chunks_ahead", function () { return this._s.chunks_tx_now - this._s.chunks_acked_now; });
  readonly("frac_complete", function () {
    var s = this._s;
    if (s.bytes_total === 0) {
      return s.finished ? 1 : 0;
    }
    return s.bytes_acked / s.bytes_total;
  });
  readonly("can_pause", function () {
    var s = this._s;
    return s.started && !this._ended() && !s.cancelling && s.bytes_acked < s.bytes_total;
  });
  readonly("can_cancel", function () {
    var s = this._s;
    return !this._ended() && !s.cancelling && !(s.started && s.bytes_acked === s.bytes_total);
  });

  var P = Uploader.prototype;

  P._ended = function () {
    var s = this._s;
    return s.finished || s.cancelled || s.failed;
  };

  P._notify = function (callback) {
    var fn = this[callback];
    if (typeof fn === "function") {
      try {
        fn(this);
      } catch (e) {
        if (root.console) {
          root.console.error("incoming.Uploader " + callback + " callback failed", e);
        }
      }
    }
  };

  P._set_state = function (msg) {
    this._s.state_msg = msg;
    this._notify("onprogress");
  };

  P.start = function () {
    if (this._s.started || this._ended()) {
      return;
    }
    this._s.started = true;
    this._connect();
  };

  P.pause = function (what) {
    var s = this._s;
    var want = what === "toggle" ? !s.paused : what !== "unpause";
    if (want === s.paused || !this.can_pause) {
      return;
    }
    s.paused = want;
    if (want) {
      this._clear_retry();
      if (this._ws && this._confirmed) {
        this._send("MsgPause", { Pause: true });
      }
      this._drop_socket();
      this._set_state("Paused");
    } else {
      this._retries = 0;
      this._connect();
    }
  };

  P.cancel = function (reason) {
    var s = this._s;
    if (!this.can_cancel) {
      return;
    }
    this._cancel_reason = reason || "cancelled by the user";
    if (!s.started) {
      // nothing was started: nothing to tell the server
      this._mark_cancelled(this._cancel_reason);
      return;
    }
    // Cancelled only when the server says so: it may have finished the upload meanwhile.
    s.cancelling = true;
    if (!this._ws) {
      // paused, or waiting to reconnect: connect at once (MsgCancel follows its MsgUploadConf)
      s.paused = false;
      this._retries = 0;
      this._connect();
      return;
    }
    if (this._confirmed) {
      this._send("MsgCancel", { Reason: this._cancel_reason });
    } // else sent when MsgUploadConf arrives
    this._set_state("Cancelling");
  };

  P._mark_cancelled = function (reason) {
    var s = this._s;
    if (s.cancelled) {
      return;
    }
    s.cancelled = true;
    s.cancel_msg = reason;
    s.error_code = 0;
    s.error_msg = "";
    s.state_msg = "Cancelled: " + reason;
    this._notify("onprogress");
    this._notify("oncancelled");
  };

  // Connection

  P._connect = function () {
    var self = this;
    var generation;
    var ws;
    this._drop_socket(); // one socket at a time: the server refuses a second one (13)
    generation = ++this._generation;
    this._clear_retry();
    this._retry_why = "";
    this._queue = [];
    this._s.chunks_tx_now = 0;
    this._s.chunks_acked_now = 0;
    this._s.state_msg = this._s.cancelling ? "Cancelling" : "Connecting";
    this._notify("onprogress");
    try {
      ws = new root.WebSocket(socket_url());
    } catch (e) {
      this._fail(0, "cannot open a WebSocket: " + e.message);
      return;
    }
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    ws.onopen = function () {
      if (generation !== self._generation) {
        return;
      }
      self._s.connected = true;
      self._send("MsgUploadReq", {
        Id: self._ticket,
        LengthBytes: self._file.size,
        Name: self._file.name
      });
    };
    ws.onmessage = function (event) {
      if (generation !== self._generation || typeof event.data !== "string") {
        return;
      }
      var msg;
      try {
        msg = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      self._receive(msg.MsgType, msg.MsgData || {});
    };
    ws.onclose = function () {
      if (generation !== self._generation) {
        return;
      }
      self._closed();
    };
  };

  P._send = function (type, data) {
    if (this._ws && this._ws.readyState === 1) {
      this._ws.send(JSON.stringify({ MsgType: type, MsgData: data }));
    }
  };

  P._drop_socket = function () {
    var ws = this._ws;
    this._generation++;
    this._ws = null;
    this._confirmed = false;
    this._queue = [];
    this._s.connected = false;
    if (ws) {
      try {
        ws.close();
      } catch (e) {
        // already closing
      }
    }
  };

  P._closed = function () {
    var s = this._s;
    this._ws = null;
    this._confirmed = false;
    s.connected = false;
    if (this._ended() || s.paused) {
      this._notify("onprogress");
      return;
    }
    var why = s.cancelling ? "Cancelling" : this._retry_why || "Connection lost";
    var delay = Math.min(RETRY_MAX_S, RETRY_FIRST_S * Math.pow(2, this._retries));
    delay = delay * (0.75 + Math.random() * 0.5);
    this._retries++;
    var self = this;
    this._retry_timer = root.setTimeout(function () {
      self._retry_timer = null;
      self._connect();
    }, delay * 1000);
    this._set_state(why + "; retrying in " + Math.round(delay) + " s");
  };

  P._clear_retry = function () {
    if (this._retry_timer !== null) {
      root.clearTimeout(this._retry_timer);
      this._retry_timer = null;
    }
  };

  // Messages from the server

  P._receive = function (type, data) {
    var s = this._s;
    if (type === "MsgUploadConf") {
      this._confirmed = true;
      this._retries = 0;
      s.error_code = 0; // connected again: an error retried before is over
      s.error_msg = "";
      this._chunk_size = data.ChunkSizeKB * 1024;
      this._send_ahead = data.SendAhead;
      s.bytes_acked = data.FilePos;
      s.bytes_tx = data.FilePos;
      this._read_pos = data.FilePos;
      this._send("MsgAck", { Ack: true });
      if (s.cancelling) {
        this._send("MsgCancel", { Reason: this._cancel_reason });
        return;
      }
      this._set_state(s.bytes_acked === s.bytes_total ? "Handing over" : "Uploading");
      this._pump();
    } else if (type === "MsgChunkAck") {
      s.bytes_acked += data.ChunkSize;
      s.chunks_acked_now++;
      if (s.bytes_acked === s.bytes_total) {
        s.state_msg = "Handing over";
      }
      this._notify("onprogress");
      this._pump();
    } else if (type === "MsgAllDone") {
      s.finished = true;
      s.cancelling = false;
      s.error_code = 0;
      s.error_msg = "";
      s.bytes_acked = s.bytes_total;
      this._drop_socket();
      this._set_state("Finished");
      this._notify("onfinished");
    } else if (type === "MsgCancelAck" || type === "MsgCancel") {
      s.cancelling = false;
      this._drop_socket();
      this._mark_cancelled(type === "MsgCancel" ? data.Reason : this._cancel_reason);
      this._notify("onprogress");
    } else if (type === "MsgError") {
      this._server_error(data.ErrorCode || 0, data.Msg || "unknown error");
    }
  };

  P._server_error = function (code, message) {
    var s = this._s;
    if (s.cancelling && (code === 12 || code === 10)) {
      // the server already cancelled or forgot the upload: the cancel has nothing left to do
      s.cancelling = false;
      this._drop_socket();
      this._mark_cancelled(this._cancel_reason);
      return;
    }
    if (code === 12) {
      // cancelled while we were away (by the backend, an idle timeout...): not an error
      this._drop_socket();
      this._mark_cancelled(message);
      return;
    }
    if (code === 11) {
      // finished while we were away (the connection dropped before MsgAllDone), or
      // before our cancel reached the server: the backend has the file
      this._receive("MsgAllDone", {});
      return;
    }
    if (code === 16) {
      // too late to cancel: the handover runs. Its MsgAllDone or MsgError follows on
      // this connection; if the server closes it first, the next one gets it.
      s.cancelling = false;
      this._retry_why = "Handing over";
      this._set_state("Too late to cancel; handing over");
      return;
    }
    s.error_code = code;
    s.error_msg = message;
    if (RETRYABLE_ERRORS[code]) {
      // not the end: retried like a lost connection (the server closes; _closed retries)
      this._retry_why = "Interrupted: " + message;
      this._notify("onprogress");
      return;
    }
    this._fail(code, message);
  };

  P._fail = function (code, message) {
    var s = this._s;
    s.failed = true;
    s.cancelling = false;
    s.error_code = code;
    s.error_msg = message;
    this._drop_socket();
    this._clear_retry();
    this._set_state("Error: " + message);
    this._notify("onerror");
  };

  // Sending chunks: keep SendAhead chunks in flight, and up to SendAhead more being
  // read from the file meanwhile (several reads at once are much faster in Chromium).

  P._pump = function () {
    var s = this._s;
    if (!this._confirmed || s.paused || s.cancelling || this._ended()) {
      return;
    }
    while (this._queue.length && this._queue[0].buffer && this.chunks_ahead < this._send_ahead) {
      var chunk = this._queue.shift().buffer;
      this._ws.send(chunk);
      s.bytes_tx += chunk.byteLength;
      s.chunks_tx_now++;
      this._notify("onprogress");
    }
    while (this._queue.length < this._send_ahead && this._read_pos < s.bytes_total) {
      var end = Math.min(this._read_pos + this._chunk_size, s.bytes_total);
      this._read(this._read_pos, end);
      this._read_pos = end;
    }
  };

  P._read = function (start, end) {
    var self = this;
    var generation = this._generation;
    var entry = { buffer: null };
    this._queue.push(entry);
    read_blob(this._file.slice(start, end)).then(function (buffer) {
      if (generation !== self._generation) {
        return; // a new connection starts again from its FilePos
      }
      entry.buffer = buffer;
      self._pump();
    }, function (e) {
      if (generation === self._generation) {
        self._fail(0, "cannot read the file: " + (e && e.message ? e.message : e));
      }
    });
  };

  function read_blob(blob) {
    if (blob.arrayBuffer) {
      return blob.arrayBuffer();
    }
    return new Promise(function (resolve, reject) {
      var reader = new root.FileReader();
      reader.onload = function () { resolve(reader.result); };
      reader.onerror = function () { reject(reader.error); };
      reader.readAsArrayBuffer(blob);
    });
  }

  root.incoming = {
    set_server_hostname: set_server_hostname,
    Uploader: Uploader
  };
})(typeof globalThis !== "undefined" ? globalThis : typeof self !== "undefined" ? self : this);
