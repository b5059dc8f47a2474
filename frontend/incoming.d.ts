/**
 * Incoming!! browser library: streams a File to an Incoming!! server, resuming after
 * pauses, lost connections and page reloads. Types of incoming.mjs (this package's main
 * module) and of the global `incoming` that incoming.js defines (see ./global.d.ts).
 */

/** The options of `new Uploader(ticket, file, options)`; each is checked at once (TypeError). */
export interface UploaderOptions {
  /**
   * `"http"` (tus 1.0 on /incoming/tus/; the default) or `"websocket"` (the 2014
   * protocol). Over HTTP the uploader switches to the WebSocket by itself when the server
   * has no tus endpoint, unless `headers` are given.
   */
  transport?: "http" | "websocket";
  /**
   * Bytes per request over HTTP; the creation carries the first piece. Default: all the
   * file has left, in one request (no round trip idles between pieces; `bytes_acked` moves
   * when it is answered). The WebSocket uses the server's chunk size.
   */
  chunkSize?: number | null;
  /**
   * Extra headers on every HTTP request (creation, PATCH, HEAD, DELETE), typically the
   * app's auth for a proxy in front of Incoming!!. A function is called before each request
   * (a token that changes); if it throws, the upload ends with `onerror`. The library's
   * own headers (Tus-Resumable, Upload-*, Content-Type, Incoming-Cancel-Reason,
   * X-HTTP-Method-Override) may not be named. Browsers cannot set headers on a WebSocket:
   * with `transport: "websocket"` this is a TypeError, and an uploader with headers never
   * falls back to the WebSocket (a server without tus is an error instead). From another
   * origin, the server's CORS preflight must allow each name.
   */
  headers?: Readonly<Record<string, string>> | (() => Readonly<Record<string, string>>) | null;
  /**
   * Milliseconds to wait before each retry in turn, as tus-js-client's `retryDelays`
   * (e.g. `[0, 1000, 3000, 5000]`); once used up, the next failure ends the upload with
   * `onerror`. They start over whenever the server stores more. Absent or `null`: retry
   * for ever, after about 1 s doubling to 60 s (±25 % jitter).
   */
  retryDelays?: readonly number[] | null;
}

/** What `pause()` does: `"pause"` (the default), `"unpause"`, or `"toggle"`. */
export type PauseAction = "pause" | "unpause" | "toggle";

/** Each callback gets the uploader, whose properties say where the upload stands. */
export type UploaderCallback = (uploader: Uploader) => void;

/** One file's upload. Many may run at once. */
export declare class Uploader {
  /**
   * @param ticket the ticket your backend got from `new_upload` (or `find_upload(file)`'s)
   * @param file the File to send
   */
  constructor(ticket: string, file: File, options?: UploaderOptions | null);

  /** The file's name. */
  readonly filename: string;
  /** The file's size in bytes. */
  readonly bytes_total: number;
  /**
   * Bytes sent: over HTTP what the request in flight has sent; over the WebSocket what was
   * given to the socket (it may not have sent it yet: see `bytes_sent`).
   */
  readonly bytes_tx: number;
  /** Bytes that have left the browser, never fewer than `bytes_acked`; for a speed. */
  readonly bytes_sent: number;
  /** Bytes the server has stored durably (fsynced) and acknowledged. */
  readonly bytes_acked: number;
  /** `bytes_tx - bytes_acked`. */
  readonly bytes_ahead: number;
  /**
   * For a progress bar: `bytes_sent / bytes_total`, 0..1. It moves within a request, is
   * never below `frac_complete` before the handover, and is 1 only once `finished`.
   */
  readonly frac_sent: number;
  /** `bytes_acked / bytes_total`, 0..1 (the 2014 meaning). */
  readonly frac_complete: number;
  /** Chunks (WebSocket) or requests carrying bytes (HTTP) sent on this connection. */
  readonly chunks_tx_now: number;
  /** Chunks or requests carrying bytes acknowledged on this connection. */
  readonly chunks_acked_now: number;
  /** `chunks_tx_now - chunks_acked_now`. */
  readonly chunks_ahead: number;
  /** Where the upload stands, for people: "Uploading", "Paused", "Handing over", ... */
  readonly state_msg: string;
  /** Why it was cancelled, once `cancelled`. */
  readonly cancel_msg: string;
  /**
   * The backend's verdict for the page, set before `onfinished` fires ("" if none), or,
   * after a `pending` finish, before `onhandedover` fires.
   */
  readonly result: string;
  /** The error's code (README's table), 0 for none or an error without a code. */
  readonly error_code: number;
  /** The error's text; also of an error being retried (with `error_code` 13, 23 or 99). */
  readonly error_msg: string;
  readonly connected: boolean;
  /**
   * The backend has the file (`onfinished` fired), or, with `pending`, the server stored it
   * and goes on handing it over. False again if that finally fails (`onerror`).
   */
  readonly finished: boolean;
  /**
   * Finished while the backend had not answered the handover within the server's
   * HandoverTimeoutS (it is away: a deploy, a restart). The file is stored and the server
   * retries (for a day by default). While the page is open the uploader asks the server
   * (HEAD, after 5 s doubling to 60 s) until `onhandedover` or `onerror`; `pending` is
   * false again then.
   */
  readonly pending: boolean;
  readonly paused: boolean;
  readonly can_pause: boolean;
  /** A cancel waits for the server's answer. */
  readonly cancelling: boolean;
  readonly cancelled: boolean;
  readonly can_cancel: boolean;

  /**
   * Any observable change: bytes sent (`bytes_sent`, `frac_sent`, `bytes_tx`), bytes
   * acknowledged (`bytes_acked`, `frac_complete`), `state_msg`, the flags.
   */
  onprogress: UploaderCallback | null;
  /**
   * The backend has the file; `result` holds its verdict. With `pending` true: the file is
   * stored and the backend has not answered yet (`result` is ""): `onhandedover` follows.
   */
  onfinished: UploaderCallback | null;
  /**
   * After a `pending` finish, while the page is open: the backend has answered (`done`, or
   * `finish_upload` after `wait`); `result` holds its verdict.
   */
  onhandedover: UploaderCallback | null;
  /** Cancelled (by `cancel()`, the backend, an idle timeout); `cancel_msg` says why. */
  oncancelled: UploaderCallback | null;
  /**
   * The upload ended with an error: `error_code`, `error_msg`. After a `pending` finish:
   * 30 when the server gave up the handover (the file is deleted), 10 when the server no
   * longer knows the upload (a page asleep past its idle expiry: ask the application).
   */
  onerror: UploaderCallback | null;

  /** Starts (or continues, with a remembered ticket) the upload; once. */
  start(): void;
  pause(what?: PauseAction): void;
  /** Asks the server to cancel; `oncancelled` fires when it confirms. */
  cancel(reason?: string): void;
}

/** `host[:port]` of the Incoming!! server; by default the page's own (`null` too). */
export declare function set_server_hostname(hostname: string | null): void;

/**
 * The ticket of an upload this browser started for this file (same name, size,
 * lastModified and server) and has not seen end, or `null`: a new Uploader with it
 * continues from the server's offset after a page reload.
 */
export declare function find_upload(file: File): string | null;

/** The global `incoming`, and this module's default export. */
export interface Incoming {
  set_server_hostname: typeof set_server_hostname;
  Uploader: typeof Uploader;
  find_upload: typeof find_upload;
}

declare const incoming: Incoming;
export default incoming;
