// incoming.js as an ES module. incoming.js is the one source: it runs first and defines
// the global `incoming`, which this module exports. The server serves incoming.js followed
// by the lines after the import as /incoming/frontend/incoming.mjs (incoming/frontend.py).
import "./incoming.js";

const incoming = globalThis.incoming;
export default incoming;
export const { set_server_hostname, Uploader, find_upload } = incoming;
