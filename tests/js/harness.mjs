// frontend/incoming.js in a vm context with fakes: WebSocket, XMLHttpRequest,
// timers, localStorage and the clock. Shared by the tests in this directory.
import { readFileSync } from "node:fs";
import vm from "node:vm";

const source = readFileSync(new URL("../../frontend/incoming.js", import.meta.url), "utf8");

export class FakeStorage {
  constructor() {
    this.items = new Map();
  }
  get length() {
    return this.items.size;
  }
  key(i) {
    return [...this.items.keys()][i] ?? null;
  }
  getItem(key) {
    return this.items.has(key) ? this.items.get(key) : null;
  }
  setItem(key, value) {
    this.items.set(key, String(value));
  }
  removeItem(key) {
    this.items.delete(key);
  }
}

// options.storage: a FakeStorage (the default), null (none), or "throws" (reading
// window.localStorage throws, as where storage is denied).
export function load(options = {}) {
  const sockets = [];
  const xhrs = [];
  const timers = [];
  const clock = { now: 1_700_000_000_000 };
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.readyState = 0;
      this.closed = false;
      this.bufferedAmount = 0; // bytes given to send() and not yet transmitted
      sockets.push(this);
    }
    send(data) {
      this.sent.push(typeof data === "string" ? JSON.parse(data) : data);
      this.bufferedAmount += typeof data === "string" ? Buffer.byteLength(data) : data.byteLength;
    }
    // The browser sends `bytes` of what it buffers (all of it by default).
    transmit(bytes = this.bufferedAmount) {
      this.bufferedAmount -= Math.min(bytes, this.bufferedAmount);
    }
    close() {
      this.closed = true;
      this.readyState = 3;
    }
    open() {
      this.readyState = 1;
      this.onopen();
    }
    receive(type, data) {
      this.onmessage({ data: JSON.stringify({ MsgType: type, MsgData: data }) });
    }
    drop() {
      this.readyState = 3;
      this.onclose({});
    }
    chunks() {
      return this.sent.filter((m) => m instanceof ArrayBuffer || ArrayBuffer.isView(m));
    }
    messages(type) {
      return this.sent.filter((m) => m.MsgType === type);
    }
  }
  class FakeXHR {
    constructor() {
      this.upload = {};
      this.requestHeaders = {};
      this.responseHeaders = {};
      this.aborted = false;
      this.answered = false;
      xhrs.push(this);
    }
    open(method, url, async) {
      Object.assign(this, { method, url, async });
    }
    setRequestHeader(name, value) {
      this.requestHeaders[name] = value;
    }
    send(body) {
      this.body = body;
      // as in browsers, upload events reach only the listeners set before send()
      this.uploadListeners = { ...this.upload };
    }
    abort() {
      this.aborted = true;
    }
    getResponseHeader(name) {
      const key = Object.keys(this.responseHeaders).find((h) => h.toLowerCase() === name.toLowerCase());
      return key === undefined ? null : String(this.responseHeaders[key]);
    }
    // An answer from the Incoming!! server (with Tus-Resumable), or with
    // {tus: false} from something else (an older server, a proxy).
    respond(status, headers = {}, text = "", { tus = true } = {}) {
      this.answered = true;
      this.status = status;
      this.statusText = { 204: "No Content", 404: "Not Found", 502: "Bad Gateway" }[status] || "";
      this.responseHeaders = tus ? { "Tus-Resumable": "1.0.0", ...headers } : headers;
      this.responseText = text;
      this.onload();
    }
    fail() {
      this.answered = true;
      this.status = 0;
      this.onerror();
    }
    progress(loaded) {
      this.uploadListeners.onprogress?.({ loaded, total: this.body.size, lengthComputable: true });
    }
    bodySent() {
      this.uploadListeners.onload?.({});
    }
  }
  const globals = {
    WebSocket: FakeSocket,
    XMLHttpRequest: FakeXHR,
    location: { protocol: "https:", host: "app.example" },
    setTimeout: (fn, ms) => timers.push({ fn, ms }),
    clearTimeout: (id) => {
      if (timers[id - 1]) timers[id - 1].cleared = true;
    },
    Date: { now: () => clock.now },
    console,
  };
  const storage = options.storage === undefined ? new FakeStorage() : options.storage;
  const context = vm.createContext(globals);
  if (storage === "throws") {
    Object.defineProperty(context, "localStorage", {
      get() {
        throw new Error("SecurityError: access is denied for this document");
      },
    });
  } else if (storage !== null) {
    context.localStorage = storage;
  }
  vm.runInContext(source, context);
  const pending = () => timers.filter((t) => !t.cleared && !t.fired);
  const fire = () => {
    const timer = pending().at(-1);
    timer.fired = true;
    timer.fn();
    return timer.ms;
  };
  const xhr = () => xhrs.at(-1);
  return { incoming: context.incoming, sockets, xhrs, xhr, timers, pending, fire, clock, storage, context };
}

// A File as the library uses it: name, size, lastModified, and slices (which
// remember where they start and end, for the tests to check PATCH bodies).
export function file(size, name = "a.bin", lastModified = 1_600_000_000_000) {
  return {
    name,
    size,
    lastModified,
    slice: (start, end) => ({
      start,
      end,
      size: end - start,
      arrayBuffer: () => Promise.resolve(new ArrayBuffer(end - start)),
    }),
  };
}

export const settle = () => new Promise((resolve) => setImmediate(resolve));
