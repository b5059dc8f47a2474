// Bundled by esbuild for tests/browser/test_uppy.py (into build/, not committed): Uppy with
// its tus plugin, and our IncomingTickets plugin (frontend/uppy.mjs), as globals for uppy.html.
import Uppy from "@uppy/core";
import Tus from "@uppy/tus";
import IncomingTickets from "../../frontend/uppy.mjs";

window.Uppy = Uppy;
window.UppyTus = Tus;
window.IncomingTickets = IncomingTickets;
