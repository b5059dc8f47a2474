// The npm package incoming-client (frontend/): its version is the server's, `npm pack` holds
// exactly its files, and, installed from the tarball, it imports by name and its types
// check (tsc against the typed examples in tests/js/types/).
// Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { cpSync, mkdtempSync, mkdirSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../../", import.meta.url));
const PACKAGE = join(ROOT, "frontend");
const TSC = join(ROOT, "node_modules", ".bin", "tsc");
const manifest = JSON.parse(readFileSync(join(PACKAGE, "package.json"), "utf8"));

test("the package's version is the server's (incoming.__version__, which pyproject reads)", () => {
  const module = readFileSync(join(ROOT, "incoming", "__init__.py"), "utf8");
  const [, version] = module.match(/^__version__ = "([^"]+)"$/m);
  assert.equal(manifest.version, version);
  assert.equal(manifest.name, "incoming-client");
});

test("npm pack: the scripts, their types, README, LICENSE and package.json, nothing else", (t) => {
  const where = mkdtempSync(join(tmpdir(), "incoming-client-"));
  t.after(() => rmSync(where, { recursive: true, force: true }));
  const npm = (args, cwd) => execFileSync("npm", args, {
    cwd, encoding: "utf8", env: { ...process.env, npm_config_update_notifier: "false" },
  });
  const [packed] = JSON.parse(npm(["pack", "--json", "--pack-destination", where], PACKAGE));
  const expected = ["LICENSE", "README.md", "global.d.ts", "incoming.d.ts", "incoming.js",
                    "incoming.mjs", "package.json", "uppy.d.ts", "uppy.mjs"];
  assert.deepEqual(packed.files.map((f) => f.path).sort(), expected);
  assert.equal(packed.filename, `incoming-client-${manifest.version}.tgz`);

  // Installed as npm would (the tarball's package/ as node_modules/incoming-client), with
  // Uppy beside it for the plugin and the examples.
  const installed = join(where, "app", "node_modules", "incoming-client");
  mkdirSync(installed, { recursive: true });
  execFileSync("tar", ["-xzf", join(where, packed.filename), "-C", installed, "--strip-components=1"]);
  assert.deepEqual(readdirSync(installed).sort(), expected);
  assert.equal(readFileSync(join(installed, "incoming.js"), "utf8"),
               readFileSync(join(PACKAGE, "incoming.js"), "utf8"));
  const app = join(where, "app");
  symlinkSync(join(ROOT, "node_modules", "@uppy"), join(app, "node_modules", "@uppy"));
  writeFileSync(join(app, "package.json"), JSON.stringify({ private: true, type: "module" }));

  const imported = execFileSync(process.execPath, ["--input-type=module", "-e", `
    import incoming, { Uploader, find_upload, set_server_hostname } from "incoming-client";
    import IncomingTickets from "incoming-client/uppy";
    import Uppy from "@uppy/core";
    const uppy = new Uppy().use(IncomingTickets, { getTicket: async () => "t" });
    console.log(JSON.stringify([
      Object.keys(incoming).sort(), Uploader === incoming.Uploader, globalThis.incoming === incoming,
      typeof find_upload, typeof set_server_hostname, uppy.getPlugin("IncomingTickets").type,
    ]));`], { cwd: app, encoding: "utf8" });
  assert.deepEqual(JSON.parse(imported), [
    ["Uploader", "find_upload", "set_server_hostname"], true, true, "function", "function", "modifier",
  ]);

  cpSync(join(ROOT, "tests", "js", "types"), app, { recursive: true });
  // Node's resolution and a bundler's; then the declaration files themselves, fully checked
  // (the examples skip the libraries' own .d.ts, as most projects do: tus-js-client's need
  // Node's types)
  for (const config of ["tsconfig.json", "tsconfig.bundler.json", "tsconfig.decls.json"]) {
    try {
      execFileSync(TSC, ["-p", config], { cwd: app, encoding: "utf8" });
    } catch (e) {
      assert.fail(`tsc -p ${config}:\n${e.stdout}${e.stderr}`);
    }
  }
});
