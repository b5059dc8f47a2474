// A typed integration of the npm package, checked by tsc (tests/js/package.test.mjs, from
// the packed tarball). Each @ts-expect-error is a mistake the types must catch.
import incoming, { Uploader, find_upload, set_server_hostname } from "incoming-client";
import type { UploaderOptions } from "incoming-client";
import Uppy from "@uppy/core";
import type { Meta } from "@uppy/core";
import Tus from "@uppy/tus";
import type { TusBody } from "@uppy/tus";
import IncomingTickets from "incoming-client/uppy";
import type { IncomingBody, IncomingMeta } from "incoming-client/uppy";

declare const file: File;
declare const bar: HTMLProgressElement;
let token = "first";

set_server_hostname("uploads.example.com");
incoming.set_server_hostname(null);

const options: UploaderOptions = {
  chunkSize: 8 * 1024 * 1024,
  headers: () => ({ Authorization: `Bearer ${token}` }),
  retryDelays: [0, 1000, 3000, 5000],
};
const up = new Uploader(find_upload(file) ?? "ticket", file, options);
up.onprogress = (u) => {
  const sent: number = u.bytes_sent;
  const acked: number = u.bytes_acked;
  bar.value = u.frac_sent;
  console.log(`${sent} sent, ${acked} stored of ${u.bytes_total}: ${u.state_msg}`);
};
up.onfinished = (u) => {
  const verdict: string = u.result;
  console.log(u.pending ? "stored; the application will take it" : verdict);
};
up.onhandedover = (u) => {
  const verdict: string = u.result;
  console.log(verdict);
};
up.onerror = (u) => console.log(u.error_code, u.error_msg);
up.oncancelled = null;
up.start();
up.pause("toggle");
up.pause();
up.cancel("changed my mind");
token = "second";
new incoming.Uploader("ticket", file, { transport: "websocket" });
new Uploader("ticket", file, { headers: { "X-CSRF-Token": "abc" } });
new Uploader("ticket", file, null);
const flags: boolean[] = [up.connected, up.finished, up.paused, up.can_pause, up.cancelling,
  up.cancelled, up.can_cancel];
const counts: number[] = [up.bytes_tx, up.bytes_ahead, up.frac_complete, up.chunks_tx_now,
  up.chunks_acked_now, up.chunks_ahead];
const texts: string[] = [up.filename, up.cancel_msg, up.error_msg];
console.log(flags, counts, texts);

// @ts-expect-error read-only
up.bytes_acked = 3;
// @ts-expect-error read-only: the server says when a handover is over
up.pending = false;
// @ts-expect-error no such transport
new Uploader("ticket", file, { transport: "ftp" });
// @ts-expect-error header values are strings
new Uploader("ticket", file, { headers: { "X-Count": 3 } });
// @ts-expect-error retryDelays are milliseconds
new Uploader("ticket", file, { retryDelays: "1s" });
// @ts-expect-error no such pause action
up.pause("stop");
// @ts-expect-error a File, not a name
find_upload("a.bin");
// @ts-expect-error callbacks get the uploader, not bytes
up.onprogress = (sent: number) => console.log(sent);

const uppy = new Uppy<Meta & IncomingMeta, TusBody & IncomingBody>()
  .use(Tus, { endpoint: "https://uploads.example.com/incoming/tus/" })
  .use(IncomingTickets, {
    getTicket: async (f) => {
      const answer = await fetch("/tickets", { method: "POST", body: f.name ?? "" });
      return answer.text();
    },
  });
uppy.on("upload-success", (f, response) => {
  const verdict: string | undefined = response.body?.result;
  console.log(f?.meta.ticket, verdict);
});
// @ts-expect-error getTicket is required
new Uppy().use(IncomingTickets, {});
// @ts-expect-error getTicket gives a ticket (a string)
new Uppy().use(IncomingTickets, { getTicket: async () => 42 });
