// Bundled by esbuild for tests/browser/test_uppy.py (into build/, not committed): Uppy with
// its tus plugin as two globals for uppy.html.
import Uppy from "@uppy/core";
import Tus from "@uppy/tus";

window.Uppy = Uppy;
window.UppyTus = Tus;
