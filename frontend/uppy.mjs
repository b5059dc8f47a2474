/*
 * Incoming!! for Uppy's tus uploads (@uppy/core and @uppy/tus): a ticket per file from
 * the app, and the backend's verdict on the file's response.
 *
 *   import Uppy from "@uppy/core";
 *   import Tus from "@uppy/tus";
 *   import IncomingTickets from "incoming-client/uppy";
 *
 *   const uppy = new Uppy()
 *     .use(Tus, { endpoint: "https://INCOMING_HOST/incoming/tus/" })
 *     .use(IncomingTickets, { getTicket: async (file) => askMyBackend(file) });
 *   uppy.on("upload-success", (file, response) => show(response.body.result));
 *
 * `response.body.pending` is true when the backend had not answered within the server's
 * HandoverTimeoutS: the file is stored and the server keeps handing it over (its verdict
 * then reaches the app, not this page: incoming.js's Uploader asks for it, Uppy does not).
 *
 * Before an upload, getTicket(file) is asked for each file without a `ticket` in its meta;
 * the ticket goes there, and @uppy/tus sends it in Upload-Metadata, as our tus creation
 * requires. A getTicket that fails fails that file only (`upload-error`; a retry asks
 * again). A file refused with 404 or 410 (its ticket unknown, expired or cancelled) loses
 * its ticket, so a retry asks for a new one.
 *
 * tus-js-client's own resuming across page loads finds an earlier upload of the same file
 * by its fingerprint alone and would continue it under that upload's ticket, not the one
 * getTicket just gave: the plugin turns it off for its files (storeFingerprintForResuming:
 * false). Retries and pauses in the page still resume, from the upload's URL.
 */
import { BasePlugin } from "@uppy/core";

// The header of the answer that finished the upload: the backend's verdict, percent-encoded
// UTF-8 ("" if none; the text as it came if it is not percent-encoded).
function verdict(xhr) {
  const value = xhr.getResponseHeader("Incoming-Result") || "";
  try {
    return decodeURIComponent(value);
  } catch {
    return value;
  }
}

// The HTTP status of a tus-js-client error, 0 if none. @uppy/tus aborts the upload before
// `upload-error`, which zeroes its XMLHttpRequest's status: then the status is the one
// tus-js-client wrote in the message ("response code: 410").
function refusal(error) {
  const status = error?.originalResponse?.getStatus?.();
  if (status) {
    return status;
  }
  const written = /, response code: (\d{3}),/.exec(error?.message ?? "");
  return written ? Number(written[1]) : 0;
}

export default class IncomingTickets extends BasePlugin {
  constructor(uppy, opts) {
    super(uppy, opts);
    if (typeof this.opts.getTicket !== "function") {
      throw new TypeError("IncomingTickets: the getTicket option must be a function of the file");
    }
    this.id = this.opts.id || "IncomingTickets";
    this.type = "modifier";
    this.defaultLocale = { strings: { askingForTicket: "Preparing the upload" } };
    this.i18nInit();
  }

  install() {
    this.uppy.addPreProcessor(this.#prepare);
    this.uppy.on("upload-success", this.#succeeded);
    this.uppy.on("upload-error", this.#failed);
  }

  uninstall() {
    this.uppy.removePreProcessor(this.#prepare);
    this.uppy.off("upload-success", this.#succeeded);
    this.uppy.off("upload-error", this.#failed);
  }

  #prepare = async (fileIDs) => {
    await Promise.all(fileIDs.map((id) => this.#ticket(id)));
  };

  async #ticket(id) {
    let file = this.uppy.getFile(id);
    if (!file || file.error || file.progress.uploadComplete) {
      return; // removed, failed before (Uppy retries it separately), or done
    }
    this.uppy.setFileState(id, { tus: { ...file.tus, storeFingerprintForResuming: false } });
    if (typeof file.meta.ticket === "string" && file.meta.ticket) {
      return;
    }
    this.uppy.emit("preprocess-progress", file, {
      mode: "indeterminate",
      message: this.i18n("askingForTicket"),
    });
    try {
      const ticket = await this.opts.getTicket(this.uppy.getFile(id));
      if (typeof ticket !== "string" || !ticket) {
        throw new TypeError(`IncomingTickets: getTicket gave ${JSON.stringify(ticket)}, not a ticket`);
      }
      if (this.uppy.getFile(id)) {
        this.uppy.setFileMeta(id, { ticket });
      }
    } catch (error) {
      file = this.uppy.getFile(id);
      if (file) {
        this.uppy.emit("upload-error", file, error instanceof Error ? error : new Error(String(error)));
      }
    } finally {
      file = this.uppy.getFile(id);
      if (file) {
        this.uppy.emit("preprocess-complete", file);
      }
    }
  }

  // Listeners of upload-success added after this plugin see `response.body.result`; the
  // file's `response` (and so `upload()`'s result and `complete`) has it in any case.
  #succeeded = (file, response) => {
    const xhr = response?.body?.xhr;
    if (xhr && typeof xhr.getResponseHeader === "function") {
      response.body.result = verdict(xhr);
      response.body.pending = (xhr.getResponseHeader("Incoming-Handover") || "").trim() === "pending";
    }
  };

  #failed = (file, error) => {
    const status = refusal(error);
    const current = file && this.uppy.getFile(file.id);
    if (current && (status === 404 || status === 410)) {
      const { ticket, ...meta } = current.meta;
      this.uppy.setFileState(file.id, { meta, tus: { ...current.tus, uploadUrl: null } });
    }
  };
}
