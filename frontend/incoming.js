/*
 * Incoming!! browser library: streams a File to an Incoming!! server, resuming
 * after pauses, lost connections and page reloads.
 *
 *   <script src="https://HOST/incoming/frontend/incoming.js"></script>
 *   incoming.set_server_hostname("HOST");
 *   var up = new incoming.Uploader(ticket, file);  // options: see Uploader
 *   up.onprogress = function (u) { bar.value = u.frac_sent; };
 *   up.onfinished = function (u) { show(u.result); }; // the backend's verdict ("" if none)
 *   up.start();
 *
 * When the application's backend does not answer within the server's HandoverTimeoutS
 * (it is being deployed, say), onfinished fires with `pending` true: the file is stored
 * and the server keeps handing it over. While the page stays open the uploader asks the
 * server now and then (HEAD, over either transport), and fires onhandedover with `result`
 * once the backend has answered, or onerror (30) if the server finally gave up.
 *
 * Two transports: HTTP (tus 1.0, the default: the creation carries the file, a
 * File.slice the browser streams from disk) and the 2014 WebSocket protocol
 * ({transport: "websocket"}, and the fallback when the server has no tus endpoint).
 * incoming.find_upload(file) gives the ticket of an upload this browser
 * started for that file and has not seen end, so a reloaded page can continue it.
 *
 * Defines the one global `incoming` (also the default export of
 * incoming.mjs, served beside this file and published with it to npm as
 * incoming-client; incoming.d.ts types both).
 */
(function (root) {
  "use strict";

  var server_hostname = null;
  var RETRY_FIRST_S = 1;
  var RETRY_MAX_S = 60;
  // ErrorCodes after which trying again may help: another connection still
  // held the ticket, the server had an internal error, (several instances)
  // their Redis was away, or its storage was full or its object store away
  // (nothing acknowledged is lost).
  var RETRYABLE_ERRORS = { 13: true, 23: true, 24: true, 25: true, 99: true };
  var TUS_VERSION = "1.0.0";
  // Bytes per request by default: all the file has left. Each request ends with a
  // round trip in which the link idles (tus allows one PATCH at a time), so on a long
  // fat link every piece costs its round trip: 256 MiB at 150 ms and 400 Mbit/s
  // reached 0.63 of the line in 32 MiB PATCHes, 0.76 in one request, as tus-js-client
  // in one PATCH (bench/wan_bench.py; docs/operations/performance.rst). A larger
  // request costs the page nothing: the browser streams a File.slice from disk, and
  // the server keeps what arrived of a request cut short, so a pause or a lost
  // connection resends only from the server's offset (HEAD, or a plain creation). What
  // it costs: bytes_acked (durable) moves at each answer only, at the end of the file;
  // bytes_sent and frac_sent move meanwhile. options.chunkSize gives smaller pieces.
  var HTTP_CHUNK_SIZE = Infinity;
  // WebSocket chunks read from the file ahead of sending, at most: a server on a long
  // fat link announces a SendAhead of tens of chunks (its window covers the round
  // trip), and what is read but not sent is held in the page's memory.
  var WS_READ_AHEAD = 8;
  // What an HTTP refusal means, as the WebSocket's ErrorCode (README table).
  var CREATION_ERRORS = { 400: 1, 404: 10, 409: 14, 413: 22, 502: 30, 507: 21 };
  var PATCH_ERRORS = { 400: 1, 404: 10, 413: 15, 415: 1, 502: 30, 507: 24 };
  // A pending handover: HEAD after about 5 s, doubling to 60 s (±25 % jitter), until over.
  var POLL_FIRST_S = 5;
  var HANDOVER_FAILED = 30;
  var HANDOVER_FAILED_TEXT = "handover failed: the backend did not take the file";
  var REMEMBERED = "incoming.upload|"; // localStorage key prefix
  var REMEMBER_MS = 12 * 3600 * 1000; // the server's default idle expiry
  var MAX_REASON_CHARS = 500; // of a cancel reason sent over HTTP: what the server keeps
  // Request headers the library sets itself: options.headers may not name them.
  var OWN_HEADERS = ["tus-resumable", "upload-offset", "upload-length", "upload-metadata",
    "content-type", "incoming-cancel-reason", "x-http-method-override"];
  var HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/; // an HTTP token

  function set_server_hostname(hostname) {
    server_hostname = hostname;
  }

  function socket_url() {
    var loc = root.location || {};
    var scheme = loc.protocol === "https:" ? "wss://" : "ws://";
    return scheme + (server_hostname || loc.host) + "/incoming/frontend/upload_ws";
  }

  function http_base() {
    var loc = root.location || {};
    var scheme = loc.protocol === "https:" ? "https://" : "http://";
    return scheme + (server_hostname || loc.host);
  }

  function tus_endpoint() {
    return http_base() + "/incoming/tus/";
  }

  // Seconds before attempt `retries` + 1: `first` (RETRY_FIRST_S), doubling to
  // RETRY_MAX_S, ±25 % jitter.
  function retry_delay(retries, first) {
    var delay = Math.min(RETRY_MAX_S, (first || RETRY_FIRST_S) * Math.pow(2, retries));
    return delay * (0.75 + Math.random() * 0.5);
  }

  // Uploads started in this browser, per server and file, so that a reloaded page
  // can continue one: localStorage[key] = {"ticket": ..., "at": ms of last activity}.

  function storage() {
    try {
      return root.localStorage || null; // reading it throws where storage is denied
    } catch (e) {
      return null;
    }
  }

  function remembered_key(file) {
    return REMEMBERED + (server_hostname || (root.location || {}).host || "") + "|" +
      file.size + "|" + (file.lastModified || 0) + "|" + file.name;
  }

  function find_upload(file) {
    var store = storage();
    var key, entry;
    if (!store || !file) {
      return null;
    }
    try {
      key = remembered_key(file);
      entry = JSON.parse(store.getItem(key) || "null");
      if (!entry || typeof entry.ticket !== "string" || !entry.ticket) {
        return null;
      }
      if (!(Date.now() - entry.at < REMEMBER_MS)) {
        store.removeItem(key); // the server has most likely forgotten it
        return null;
      }
      return entry.ticket;
    } catch (e) {
      return null;
    }
  }

  // `prune`: also drop the entries nobody continued in time.
  function remember(file, ticket, prune) {
    var store = storage();
    var now = Date.now();
    var i, key, entry, stale = [];
    if (!store) {
      return;
    }
    try {
      for (i = 0; prune && i < store.length; i++) {
        key = store.key(i);
        if (key && key.indexOf(REMEMBERED) === 0) {
          try {
            entry = JSON.parse(store.getItem(key));
          } catch (e) {
            entry = null;
          }
          if (!entry || !(now - entry.at < REMEMBER_MS)) {
            stale.push(key);
          }
        }
      }
      stale.forEach(function (k) { store.removeItem(k); });
      store.setItem(remembered_key(file), JSON.stringify({ ticket: ticket, at: now }));
    } catch (e) {
      // full or denied: the upload works all the same, only not across a reload
    }
  }

  function forget(file, ticket) {
    var store = storage();
    if (!store) {
      return;
    }
    try {
      if (find_upload(file) === ticket) {
        store.removeItem(remembered_key(file));
      }
    } catch (e) {
      // denied: nothing to forget
    }
  }

  // Upload-Metadata values: base64 of UTF-8.
  var B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

  function base64_utf8(text) {
    var bytes, out = "", i, n, left;
    try {
      bytes = unescape(encodeURIComponent(text));
    } catch (e) {
      bytes = String(text).replace(/[^\x20-\x7e]/g, "?"); // a lone surrogate
    }
    for (i = 0; i < bytes.length; i += 3) {
      left = bytes.length - i;
      n = (bytes.charCodeAt(i) << 16) | (left > 1 ? bytes.charCodeAt(i + 1) << 8 : 0) |
        (left > 2 ? bytes.charCodeAt(i + 2) : 0);
      out += B64.charAt((n >> 18) & 63) + B64.charAt((n >> 12) & 63) +
        (left > 1 ? B64.charAt((n >> 6) & 63) : "=") + (left > 2 ? B64.charAt(n & 63) : "=");
    }
    return out;
  }

  function header(xhr, name) {
    try {
      return xhr.getResponseHeader(name);
    } catch (e) {
      return null;
    }
  }

  function int_header(xhr, name) {
    var value = header(xhr, name);
    return value !== null && /^\s*\d+\s*$/.test(value) ? parseInt(value, 10) : null;
  }

  // A cancel reason for the header Incoming-Cancel-Reason: what the server keeps of it,
  // percent-encoded UTF-8.
  function reason_header(reason) {
    var text = String(reason).slice(0, MAX_REASON_CHARS);
    if (/[\ud800-\udbff]$/.test(text)) {
      text = text.slice(0, -1); // half a pair, cut
    }
    try {
      return encodeURIComponent(text);
    } catch (e) {
      // a lone surrogate: then every surrogate becomes U+FFFD, paired or not
      return encodeURIComponent(text.replace(/[\ud800-\udfff]/g, "\ufffd"));
    }
  }

  // The backend's verdict, as the answer that finished the upload carries it: percent-
  // encoded UTF-8 ("" if none; the text as it came if it is not percent-encoded).
  function result_header(xhr) {
    var value = header(xhr, "Incoming-Result") || "";
    try {
      return decodeURIComponent(value);
    } catch (e) {
      return value;
    }
  }

  // Incoming-Handover: pending: the file is stored; the backend has not answered yet.
  function handover_pending(xhr) {
    return (header(xhr, "Incoming-Handover") || "").trim() === "pending";
  }

  // The server's text for a refusal; a proxy's page or nothing becomes "HTTP 503 ...".
  function answer_text(xhr) {
    var text = "";
    try {
      text = String(xhr.responseText || "").trim();
    } catch (e) {
      text = "";
    }
    if (!text || !header(xhr, "Tus-Resumable") || text.length > 1000) {
      text = "HTTP " + xhr.status + (xhr.statusText ? " " + xhr.statusText : "");
    }
    return text;
  }

  function own(object, name) {
    return Object.prototype.hasOwnProperty.call(object, name);
  }

  // options.headers, or what its function returned: names and values an XMLHttpRequest
  // can send, none of them the library's own.
  function checked_headers(headers, where) {
    var name, value;
    if (!headers || typeof headers !== "object" || Array.isArray(headers)) {
      throw new TypeError(where + " must be an object of header names and values");
    }
    for (name in headers) {
      if (own(headers, name)) {
        value = headers[name];
        if (!HEADER_NAME.test(name)) {
          throw new TypeError(where + ": " + JSON.stringify(name) + " is not a header name");
        }
        if (OWN_HEADERS.indexOf(name.toLowerCase()) >= 0) {
          throw new TypeError(where + ": " + name + " is set by incoming.js itself");
        }
        if (typeof value !== "string" || /[\r\n\0]/.test(value)) {
          throw new TypeError(where + ": the value of " + name + " must be a string on one line");
        }
      }
    }
    return headers;
  }

  // The Uploader's options, checked: a mistake is a TypeError at once, not a surprise later.
  function read_options(options) {
    var transport, chunk, headers, delays, i;
    if (options === undefined || options === null) {
      options = {};
    } else if (typeof options !== "object") {
      throw new TypeError("incoming.Uploader: options must be an object");
    }
    transport = options.transport || "http";
    if (transport !== "http" && transport !== "websocket") {
      throw new TypeError('incoming.Uploader: transport must be "http" or "websocket"');
    }
    chunk = options.chunkSize;
    if (chunk !== undefined && chunk !== null &&
        (typeof chunk !== "number" || !(chunk >= 1) || chunk === Infinity)) {
      throw new TypeError("incoming.Uploader: chunkSize must be a number of bytes, at least 1");
    }
    headers = options.headers;
    if (headers === undefined || headers === null) {
      headers = null;
    } else if (transport === "websocket") {
      throw new TypeError("incoming.Uploader: headers need the HTTP transport: " +
        "browsers cannot set headers on a WebSocket");
    } else if (typeof headers !== "function") {
      headers = checked_headers(headers, "incoming.Uploader: headers");
    }
    delays = options.retryDelays;
    if (delays === undefined || delays === null) {
      delays = null;
    } else {
      if (!Array.isArray(delays)) {
        throw new TypeError("incoming.Uploader: retryDelays must be an array of milliseconds");
      }
      for (i = 0; i < delays.length; i++) {
        if (typeof delays[i] !== "number" || !(delays[i] >= 0) || delays[i] === Infinity) {
          throw new TypeError("incoming.Uploader: retryDelays must be milliseconds, 0 or more");
        }
      }
      delays = delays.slice();
    }
    return {
      transport: transport,
      chunk_size: chunk ? Math.floor(chunk) : HTTP_CHUNK_SIZE,
      headers: headers,
      retry_delays: delays
    };
  }

  function Uploader(ticket, file, options) {
    if (!(this instanceof Uploader)) {
      return new Uploader(ticket, file, options);
    }
    options = read_options(options);
    var transport = options.transport;
    this._ticket = ticket;
    this._file = file;
    this._transport = transport; // "websocket" also once a server without tus is found
    this._s = {
      filename: file.name,
      bytes_total: file.size,
      bytes_tx: 0,
      bytes_acked: 0,
      chunks_tx_now: 0,
      chunks_acked_now: 0,
      state_msg: "Ready",
      cancel_msg: "",
      result: "", // the backend's verdict for the page, once finished
      pending: false, // finished, and the backend has not answered its handover yet
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
    this._ws_unsent = 0; // what the last socket had not sent when it went
    this._generation = 0; // one per connection; late events of old ones are ignored
    this._confirmed = false;
    this._chunk_size = 0;
    this._send_ahead = 0;
    this._read_pos = 0; // next byte to read from the file
    this._queue = []; // chunks being read or read, in file order, not yet sent
    this._retries = 0; // since the server last answered as hoped
    this._retry_delays = options.retry_delays; // ms before each retry; null: the backoff, for ever
    this._polls = 0; // HEADs while the handover runs, or while it is pending
    this._retry_timer = null;
    this._retry_why = ""; // what state_msg says while waiting to reconnect, when not "Connection lost"
    this._cancel_reason = "";
    // HTTP (tus)
    this._http_chunk = options.chunk_size;
    this._headers = options.headers; // the app's, on every HTTP request: an object or a function
    this._xhr = null; // the one request in flight
    this._probe = null; // a WebSocket that tells an unreachable server from one without tus
    this._url = null; // the upload's tus URL, once created
    // The first creation carries the first piece (creation-with-upload): one round trip
    // less. Not where this browser remembers starting this upload (a reloaded page: the
    // server would discard a body sent again), nor after a creation that went unanswered.
    this._create_with_body = false;
    this._offset_known = false; // bytes_acked is the server's offset (else ask with HEAD)
    this._tus_seen = false; // the server has answered as a tus server, or taken a body
    this._gone = ""; // the server's text when a creation or PATCH found the upload ended
    this.onprogress = null;
    this.onfinished = null;
    this.onhandedover = null;
    this.oncancelled = null;
    this.onerror = null;
  }

  function readonly(name, get) {
    Object.defineProperty(Uploader.prototype, name, { get: get, enumerable: true });
  }

  ["filename", "bytes_total", "bytes_tx", "bytes_acked", "chunks_tx_now",
   "chunks_acked_now", "state_msg", "cancel_msg", "result", "error_code", "error_msg",
   "connected", "finished", "pending", "paused", "cancelling", "cancelled"].forEach(function (name) {
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
  // The bytes that have left the browser (over HTTP the upload events of the PATCH, over
  // the WebSocket what the socket has sent), never fewer than bytes_acked.
  readonly("bytes_sent", function () {
    return Math.min(this._bytes_sent(), this._s.bytes_total);
  });
  // For a progress bar: the bytes that have left the browser, over bytes_total. It moves
  // within a PATCH, where frac_complete waits for the answer, and is never below it but
  // during the handover: frac_sent is 1 only once finished (the last byte counts when
  // the backend has the file), so frac_sent === 1 means finished.
  readonly("frac_sent", function () {
    var s = this._s;
    if (s.finished) {
      return 1;
    }
    if (s.bytes_total === 0) {
      return 0;
    }
    return Math.min(this._bytes_sent(), s.bytes_total - 1) / s.bytes_total;
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

  // Over HTTP bytes_tx is what the PATCH's upload events count; over the WebSocket it
  // counts what was given to the socket, which may not have sent it yet.
  P._bytes_sent = function () {
    var s = this._s;
    return Math.max(s.bytes_acked, s.bytes_tx - this._unsent());
  };

  // Bytes given to the WebSocket that it has not sent: as they were when the last socket
  // went, until the next MsgUploadConf says where the server stands.
  P._unsent = function () {
    return this._ws && this._confirmed ? this._ws.bufferedAmount || 0 : this._ws_unsent;
  };

  // Seconds to wait before the next retry, or -1 once options.retryDelays are used up.
  P._retry_delay = function () {
    var delays = this._retry_delays;
    if (!delays) {
      return retry_delay(this._retries);
    }
    return this._retries < delays.length ? delays[this._retries] / 1000 : -1;
  };

  // Retries used up: the upload ends with the error that was retried, or the lost connection.
  P._give_up = function (message) {
    var s = this._s;
    this._fail(s.error_code, s.error_msg || message);
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
    this._create_with_body = find_upload(this._file) !== this._ticket;
    remember(this._file, this._ticket, true);
    if (this._transport === "http") {
      this._h_step();
    } else {
      this._connect();
    }
  };

  P.pause = function (what) {
    var s = this._s;
    var want = what === "toggle" ? !s.paused : what !== "unpause";
    if (want === s.paused || !this.can_pause) {
      return;
    }
    s.paused = want;
    if (this._transport === "http") {
      this._h_pause(want);
      return;
    }
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
    if (this._transport === "http") {
      this._h_cancel();
      return;
    }
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
    if (s.started) {
      forget(this._file, this._ticket);
    }
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
    this._ws_unsent = this._unsent();
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
    this._ws_unsent = this._unsent();
    this._ws = null;
    this._confirmed = false;
    s.connected = false;
    if (this._ended() || s.paused) {
      this._notify("onprogress");
      return;
    }
    var why = s.cancelling ? "Cancelling" : this._retry_why || "Connection lost";
    var delay = this._retry_delay();
    if (delay < 0) {
      this._give_up("Connection lost");
      return;
    }
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
      remember(this._file, this._ticket);
      this._chunk_size = data.ChunkSizeKB * 1024;
      this._send_ahead = data.SendAhead;
      s.bytes_acked = data.FilePos;
      s.bytes_tx = data.FilePos;
      this._ws_unsent = 0;
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
      // a server before the second version sends no Result, before the third no Pending
      this._finished(data.Result, data.Pending === true);
    } else if (type === "MsgCancelAck" || type === "MsgCancel") {
      s.cancelling = false;
      this._drop_socket();
      this._mark_cancelled(type === "MsgCancel" ? data.Reason : this._cancel_reason);
      this._notify("onprogress");
    } else if (type === "MsgError") {
      this._server_error(data.ErrorCode || 0, data.Msg || "unknown error", data);
    }
  };

  P._server_error = function (code, message, data) {
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
      // before our cancel reached the server: the backend has the file (and its verdict
      // comes along)
      this._receive("MsgAllDone", { Result: data.Result });
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

  // `result`: the backend's verdict for the page, where the server sent one. `pending`:
  // the file is stored, the backend has not answered yet: ask until it has.
  P._finished = function (result, pending) {
    var s = this._s;
    s.finished = true;
    s.pending = pending === true;
    s.result = typeof result === "string" ? result : "";
    s.cancelling = false;
    s.error_code = 0;
    s.error_msg = "";
    s.bytes_acked = s.bytes_total;
    this._drop();
    this._clear_retry();
    if (s.pending) {
      remember(this._file, this._ticket); // a reloaded page can learn the outcome too
      this._polls = 0;
      this._set_state("Stored; waiting for the application");
      this._notify("onfinished");
      this._poll_handover();
      return;
    }
    forget(this._file, this._ticket);
    this._set_state("Finished");
    this._notify("onfinished");
  };

  // The handover is pending: HEAD now and then (the same on both transports) until it
  // is over. Lost requests and other answers (a restarting server) are asked again.
  P._poll_handover = function () {
    var self = this;
    var delay = retry_delay(this._polls, POLL_FIRST_S);
    this._polls++;
    this._retry_timer = root.setTimeout(function () {
      self._retry_timer = null;
      self._h_send("HEAD", self._url || self._h_upload_url(), {}, null, function (xhr) {
        self._s.connected = false;
        self._handover_polled(xhr);
      });
    }, delay * 1000);
  };

  P._handover_polled = function (xhr) {
    var s = this._s;
    var status = xhr ? xhr.status : 0;
    var tus = xhr && header(xhr, "Tus-Resumable") !== null;
    if (status === 200 && tus && !handover_pending(xhr) && header(xhr, "Upload-Expires") === null) {
      s.pending = false; // finished: the backend has it, and its verdict comes along
      s.result = result_header(xhr);
      forget(this._file, this._ticket);
      this._set_state("Finished");
      this._notify("onhandedover");
    } else if ((status === 410 || status === 404) && tus) {
      // cancelled (the retries ran out), or forgotten (a page asleep past the server's
      // idle expiry: it cannot tell any more)
      s.finished = false;
      s.pending = false;
      if (status === 410) {
        this._fail(HANDOVER_FAILED, HANDOVER_FAILED_TEXT);
      } else {
        this._fail(10, "the server no longer knows this upload; ask the application");
      }
    } else {
      this._poll_handover();
    }
  };

  P._fail = function (code, message) {
    var s = this._s;
    s.failed = true;
    s.cancelling = false;
    s.error_code = code;
    s.error_msg = message;
    this._drop();
    this._clear_retry();
    forget(this._file, this._ticket);
    this._set_state("Error: " + message);
    this._notify("onerror");
  };

  // Sending chunks: keep SendAhead chunks in flight, and up to SendAhead more (at most
  // WS_READ_AHEAD) being read from the file meanwhile (several reads at once are much
  // faster in Chromium).

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
    var ahead = Math.min(this._send_ahead, WS_READ_AHEAD);
    while (this._queue.length < ahead && this._read_pos < s.bytes_total) {
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


  // HTTP transport (tus 1.0): a creation POST, then one PATCH of a File.slice at a
  // time. Each step is decided from the state by _h_step; every request is answered
  // in one place per method. A lost request is retried with the WebSocket's
  // backoff and resumes from HEAD.

  P._drop = function () {
    this._drop_socket();
    this._h_drop();
  };

  P._h_drop = function () {
    var xhr = this._xhr;
    var probe = this._probe;
    this._generation++;
    this._xhr = null;
    this._probe = null;
    this._s.connected = false;
    if (xhr) {
      try {
        xhr.abort();
      } catch (e) {
        // already done
      }
    }
    if (probe) {
      try {
        probe.close();
      } catch (e) {
        // already closing
      }
    }
  };

  P._h_step = function () {
    var s = this._s;
    if (this._transport !== "http" || this._ended() || s.paused || this._xhr ||
        this._probe || this._retry_timer !== null) {
      return;
    }
    if (!this._url) {
      this._h_create();
    } else if (s.cancelling) {
      this._h_delete();
    } else if (!this._offset_known) {
      this._h_head();
    } else if (s.bytes_acked < s.bytes_total) {
      this._h_patch();
    }
  };

  // Sends one request; `answered` gets the XMLHttpRequest, or null if no answer came.
  // `before` sets upload listeners: only those set before send() hear anything.
  P._h_send = function (method, url, headers, body, answered, before) {
    var self = this;
    var generation = ++this._generation;
    var xhr, name;
    try {
      xhr = new root.XMLHttpRequest();
      xhr.open(method, url, true);
      xhr.setRequestHeader("Tus-Resumable", TUS_VERSION);
      this._app_headers(xhr);
      for (name in headers) {
        if (own(headers, name)) {
          xhr.setRequestHeader(name, headers[name]);
        }
      }
      xhr.onload = function () {
        if (generation === self._generation) {
          self._xhr = null;
          self._s.connected = true;
          if (header(xhr, "Tus-Resumable")) {
            self._tus_seen = true;
          }
          answered(xhr);
        }
      };
      xhr.onerror = xhr.ontimeout = function () {
        if (generation === self._generation) {
          self._xhr = null;
          answered(null);
        }
      };
      this._xhr = xhr;
      if (before) {
        before(xhr);
      }
      xhr.send(body);
    } catch (e) {
      this._xhr = null;
      this._fail(0, "cannot send an HTTP request: " + (e && e.message ? e.message : e));
    }
  };

  // options.headers; a function is asked before each request (a token that changes).
  P._app_headers = function (xhr) {
    var headers = this._headers;
    var name;
    if (typeof headers === "function") {
      headers = checked_headers(headers(), "incoming.Uploader: headers()");
    }
    for (name in headers) {
      if (own(headers, name)) {
        xhr.setRequestHeader(name, headers[name]);
      }
    }
  };

  P._h_connecting = function () {
    var s = this._s;
    s.chunks_tx_now = 0;
    s.chunks_acked_now = 0;
    this._set_state(s.cancelling ? "Cancelling" : "Connecting");
  };

  P._h_create = function () {
    var self = this;
    var s = this._s;
    var metadata = "ticket " + base64_utf8(this._ticket);
    var headers = { "Upload-Length": String(s.bytes_total) };
    var answered;
    if (this._file.name) {
      metadata += ",filename " + base64_utf8(this._file.name);
    }
    headers["Upload-Metadata"] = metadata;
    this._h_connecting();
    answered = function (xhr) {
      var location, offset;
      if (!xhr) {
        self._h_unreachable();
      } else if (xhr.status === 201) {
        if (s.bytes_total === 0) {
          // a zero-byte creation is answered after the handover
          self._finished(result_header(xhr), handover_pending(xhr));
          return;
        }
        location = header(xhr, "Location");
        self._url = location ? self._h_resolve(location) : self._h_upload_url();
        offset = int_header(xhr, "Upload-Offset");
        if (offset === null) {
          self._h_step(); // HEAD tells
        } else {
          if (s.chunks_tx_now > s.chunks_acked_now) {
            s.chunks_acked_now++; // it carried a piece: answered, as a PATCH's
          }
          self._h_at(offset, xhr);
        }
      } else if (xhr.status === 404 && !header(xhr, "Tus-Resumable")) {
        self._h_fallback(); // a server without a tus endpoint (before the second version)
      } else if (xhr.status === 410) {
        self._url = self._h_upload_url(); // finished or cancelled: HEAD tells which
        self._gone = answer_text(xhr);
        self._h_head();
      } else {
        self._h_refused(xhr, CREATION_ERRORS);
      }
    };
    if (this._create_with_body && s.bytes_total > 0) {
      this._create_with_body = false; // once: a creation sent again asks where things stand
      this._h_send_piece("POST", tus_endpoint(), headers, 0, answered);
    } else {
      this._h_send("POST", tus_endpoint(), headers, null, answered);
    }
  };

  P._h_upload_url = function () {
    return tus_endpoint() + encodeURIComponent(this._ticket);
  };

  P._h_resolve = function (location) {
    if (/^https?:\/\//i.test(location)) {
      return location;
    }
    return (location.charAt(0) === "/" ? http_base() : tus_endpoint()) + location;
  };

  // The creation had no answer: either the server is down, or it has no tus endpoint
  // and the browser hid its 404 (a page on another origin: the preflight failed). A
  // WebSocket that opens tells the second case: then the WebSocket path goes on.
  P._h_unreachable = function () {
    var self = this;
    var generation = this._generation;
    var probe;
    if (this._tus_seen || !root.WebSocket) {
      this._h_retry("Connection lost");
      return;
    }
    try {
      probe = new root.WebSocket(socket_url());
    } catch (e) {
      this._h_retry("Connection lost");
      return;
    }
    this._probe = probe;
    probe.onopen = function () {
      if (generation === self._generation) {
        self._h_fallback();
      }
    };
    probe.onclose = function () {
      if (generation === self._generation) {
        self._probe = null;
        self._h_retry("Connection lost");
      }
    };
  };

  // A server without tus gets the WebSocket, which cannot carry options.headers: with
  // them, the upload ends (also where the server is up but a CORS preflight refused them).
  P._h_fallback = function () {
    if (this._headers) {
      this._fail(0, "no tus answer from a server that is up (no tus endpoint, or a CORS " +
        "preflight refused the request's headers or this page's origin); the WebSocket " +
        "cannot carry the headers option");
      return;
    }
    this._h_drop();
    this._transport = "websocket";
    this._connect();
  };

  // The server's offset, from the answer to a creation or a HEAD. Upload-Expires is
  // given until the upload is finished; once it is, Incoming-Result with it.
  P._h_at = function (offset, xhr) {
    var s = this._s;
    var live = header(xhr, "Upload-Expires") !== null;
    s.error_code = 0; // the server answers again: an error retried before is over
    s.error_msg = "";
    if (offset > s.bytes_acked) {
      this._retries = 0; // it stored more than we knew: the retries start over
    }
    s.bytes_acked = s.bytes_tx = Math.min(offset, s.bytes_total);
    this._offset_known = true;
    if (offset < s.bytes_total) {
      if (!s.cancelling) {
        this._set_state("Uploading");
      }
      this._h_step();
    } else if (handover_pending(xhr)) {
      this._finished("", true); // stored; the backend has yet to answer
    } else if (!live) {
      this._finished(result_header(xhr));
    } else {
      // every byte is stored and the handover runs; ask again until it is over
      s.cancelling = false;
      this._h_wait("Handing over");
    }
  };

  P._h_head = function () {
    var self = this;
    var s = this._s;
    this._h_connecting();
    this._h_send("HEAD", this._url, {}, null, function (xhr) {
      var offset = xhr && int_header(xhr, "Upload-Offset");
      if (!xhr) {
        self._h_retry("Connection lost");
      } else if (xhr.status === 200 && offset !== null) {
        self._h_at(offset, xhr);
      } else if (xhr.status === 410 || (xhr.status === 404 && s.cancelling)) {
        self._h_cancelled();
      } else {
        self._h_refused(xhr, PATCH_ERRORS);
      }
    });
  };

  // Cancelled on the server (410 to a HEAD, which has no text): the text of the
  // creation or PATCH that found it, or of a creation sent to ask.
  P._h_cancelled = function () {
    var self = this;
    var reason = this._s.cancelling ? this._cancel_reason : this._gone;
    if (reason) {
      this._s.cancelling = false;
      this._h_drop();
      this._mark_cancelled(reason);
      return;
    }
    this._h_send("POST", tus_endpoint(), {
      "Upload-Length": String(this._s.bytes_total),
      "Upload-Metadata": "ticket " + base64_utf8(this._ticket)
    }, null, function (xhr) {
      var text = xhr && xhr.status === 410 ? answer_text(xhr) : "this upload was cancelled";
      self._h_drop();
      self._mark_cancelled(text);
    });
  };

  P._h_patch = function () {
    var self = this;
    var s = this._s;
    var start = s.bytes_acked;
    this._h_send_piece("PATCH", this._url, {}, start, function (xhr) {
      var offset;
      if (!xhr) {
        self._h_retry("Connection lost");
      } else if (xhr.status === 204) {
        offset = int_header(xhr, "Upload-Offset");
        s.bytes_acked = s.bytes_tx = Math.min(offset === null ? self._h_end(start) : offset,
                                              s.bytes_total);
        s.chunks_acked_now++;
        s.error_code = 0;
        s.error_msg = "";
        self._retries = 0;
        if (s.bytes_acked === s.bytes_total) {
          // the last PATCH is answered once the backend has the file, with its verdict,
          // or after HandoverTimeoutS with Incoming-Handover: pending
          self._finished(result_header(xhr), handover_pending(xhr));
          return;
        }
        remember(self._file, self._ticket);
        self._notify("onprogress");
        self._h_step();
      } else if (xhr.status === 409) {
        self._offset_known = false; // another offset than ours: HEAD says which
        self._h_step();
      } else if (xhr.status === 410) {
        self._offset_known = false;
        self._gone = answer_text(xhr);
        self._h_head(); // finished or cancelled meanwhile
      } else {
        self._h_refused(xhr, PATCH_ERRORS);
      }
    });
  };

  P._h_end = function (start) {
    return Math.min(start + this._http_chunk, this._s.bytes_total);
  };

  // A PATCH, or the creation that carries the first piece: the bytes from `start` to
  // the piece's end, a File.slice that the browser streams from disk; bytes_tx follows
  // its upload events.
  P._h_send_piece = function (method, url, headers, start, answered) {
    var self = this;
    var s = this._s;
    var end = this._h_end(start);
    headers["Content-Type"] = "application/offset+octet-stream";
    if (method === "PATCH") {
      headers["Upload-Offset"] = String(start);
    }
    this._h_send(method, url, headers, this._file.slice(start, end), answered, function (xhr) {
      if (!xhr.upload) {
        return;
      }
      xhr.upload.onprogress = function (event) {
        if (self._xhr === xhr) {
          s.bytes_tx = start + Math.min(event.loaded, end - start);
          if (event.loaded > 0) {
            self._tus_seen = true; // the request got through (a preflight, if any, passed)
            s.connected = true; // the server takes bytes: connected before any answer
            if (s.state_msg === "Connecting") {
              self._set_state("Uploading"); // a creation's bytes flow
              return;
            }
          }
          self._notify("onprogress");
        }
      };
      xhr.upload.onload = function () {
        if (self._xhr === xhr && end === s.bytes_total) {
          s.bytes_tx = end;
          self._set_state("Handing over"); // sent; the answer comes after the handover
        }
      };
    });
    if (!this._xhr) {
      return; // could not send
    }
    s.chunks_tx_now++;
    if (method === "PATCH" && s.state_msg !== "Uploading") {
      this._set_state("Uploading");
    }
  };

  P._h_delete = function () {
    var self = this;
    var s = this._s;
    this._set_state("Cancelling");
    this._h_send("DELETE", this._url, {
      "Incoming-Cancel-Reason": reason_header(this._cancel_reason)
    }, null, function (xhr) {
      if (!xhr) {
        self._h_retry("Cancelling");
      } else if (xhr.status === 204 || xhr.status === 404) {
        // cancelled, or nothing left to cancel
        s.cancelling = false;
        self._h_drop();
        self._mark_cancelled(self._cancel_reason);
      } else if (xhr.status === 410) {
        self._h_head(); // already cancelled, or finished: HEAD tells which
      } else if (xhr.status === 412) {
        // too late: the handover runs (or ran); its result is what HEAD says next
        s.cancelling = false;
        self._offset_known = false;
        self._h_wait("Too late to cancel; handing over");
      } else {
        self._h_refused(xhr, {});
      }
    });
  };

  // Until HEAD says what the server stored, bytes_tx keeps what was sent (as on the
  // WebSocket until the next MsgUploadConf).
  P._h_pause = function (pause) {
    if (pause) {
      this._clear_retry();
      this._h_drop();
      this._offset_known = false; // the server may have stored more of the aborted PATCH
      this._set_state("Paused");
    } else {
      this._retries = 0;
      this._h_step();
    }
  };

  P._h_cancel = function () {
    var s = this._s;
    s.paused = false;
    this._clear_retry();
    this._retries = 0;
    if ((this._xhr && !this._url && s.chunks_tx_now === 0) || this._probe) {
      // the creation, or the probe after it, is under way: the cancel follows it (one
      // that carries bytes is stopped: a plain creation then tells the upload's URL)
      this._set_state("Cancelling");
      return;
    }
    this._h_drop();
    this._offset_known = false;
    this._h_step();
  };

  // A refusal: retried (423, 5xx but a handover's failure) or the end (the others).
  P._h_refused = function (xhr, errors) {
    var status = xhr.status;
    var text = answer_text(xhr);
    var tus = header(xhr, "Tus-Resumable") !== null;
    var s = this._s;
    var code = status === 423 ? 13 : status === 500 ? 99 : errors[status];
    if (RETRYABLE_ERRORS[code]) {
      s.error_code = code;
      s.error_msg = text;
      this._h_retry("Interrupted: " + text, text);
    } else if (status >= 500 && !(tus && errors[status])) {
      this._h_retry("Interrupted: " + text, text); // a restarting server, or a proxy's
    } else if (s.cancelling && status === 404) {
      s.cancelling = false;
      this._h_drop();
      this._mark_cancelled(this._cancel_reason);
    } else {
      this._fail(errors[status] || 0, text);
    }
  };

  // `text`: the error if no retry is left (options.retryDelays used up).
  P._h_retry = function (why, text) {
    var self = this;
    var s = this._s;
    var delay = this._retry_delay();
    if (delay < 0) {
      this._give_up(text || "Connection lost");
      return;
    }
    this._h_drop();
    this._clear_retry();
    this._retries++;
    this._offset_known = false;
    this._retry_timer = root.setTimeout(function () {
      self._retry_timer = null;
      self._h_step();
    }, delay * 1000);
    this._set_state((s.cancelling ? "Cancelling" : why) + "; retrying in " + Math.round(delay) + " s");
  };

  // The handover runs: HEAD again after the backoff until it is over.
  P._h_wait = function (why) {
    var self = this;
    var delay = retry_delay(this._polls);
    this._clear_retry();
    this._polls++;
    this._offset_known = false;
    this._s.connected = true;
    this._retry_timer = root.setTimeout(function () {
      self._retry_timer = null;
      self._h_step();
    }, delay * 1000);
    this._set_state(why);
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
    Uploader: Uploader,
    find_upload: find_upload
  };
})(typeof globalThis !== "undefined" ? globalThis : self); // no `this`: also read as a module
