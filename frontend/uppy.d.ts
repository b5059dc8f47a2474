/**
 * Incoming!! for Uppy's tus uploads: `uppy.use(IncomingTickets, { getTicket })` after
 * `uppy.use(Tus, { endpoint: "https://INCOMING_HOST/incoming/tus/" })`.
 */
import type { Body, Meta, PluginOpts, Uppy, UppyFile } from "@uppy/core";
import { BasePlugin } from "@uppy/core";

export interface IncomingTicketsOptions<M extends Meta, B extends Body> extends PluginOpts {
  /**
   * Your backend's ticket for this file (from Incoming!!'s `new_upload`). Asked before
   * the upload for each file without a `ticket` in its meta; a rejection fails that file.
   */
  getTicket: (file: UppyFile<M, B>) => Promise<string> | string;
}

/** The meta the plugin sets: the file's ticket, sent in the tus Upload-Metadata. */
export type IncomingMeta = {
  ticket?: string;
};

/**
 * What the plugin adds to the response body on `upload-success`: the backend's verdict
 * (the text after `done` in its handover answer, or finish_upload's `result`), decoded;
 * "" if none; and `pending`, true when the backend had not answered within the server's
 * HandoverTimeoutS (the file is stored, the server keeps handing it over; `result` is "").
 * Type Uppy with it: `new Uppy<Meta & IncomingMeta, TusBody & IncomingBody>()`.
 */
export type IncomingBody = {
  result?: string;
  pending?: boolean;
};

export default class IncomingTickets<M extends Meta, B extends Body> extends BasePlugin<
  IncomingTicketsOptions<M, B>,
  M,
  B
> {
  constructor(uppy: Uppy<M, B>, opts: IncomingTicketsOptions<M, B>);
  install(): void;
  uninstall(): void;
}
