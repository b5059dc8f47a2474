// Express and Incoming!!: the page uploads files through Incoming!!; this app gets each
// one by the handover, keeps it in its own folder and serves it. See README.md.
"use strict";
const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const express = require("express");

const INCOMING_URL = process.env.INCOMING_URL || "http://127.0.0.1:4000"; // as this app reaches it
const INCOMING_PUBLIC = process.env.INCOMING_PUBLIC || new URL(INCOMING_URL).host; // as browsers do
const APP_URL = process.env.APP_URL || "http://127.0.0.1:3000"; // as Incoming!! reaches this app
const DATA = path.resolve(process.env.DATA_DIR || "data");
const FILES = path.join(DATA, "files");
const TICKETS = path.join(DATA, "tickets");
const TICKET = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
fs.mkdirSync(FILES, { recursive: true });
fs.mkdirSync(TICKETS, { recursive: true });

// Per ticket, the app keeps its secret and, once it has the file, its verdict. A real app
// keeps them in its database; here one small JSON file per ticket.
const kept = (ticket) => {
  const file = path.join(TICKETS, `${ticket}.json`);
  return fs.existsSync(file) ? JSON.parse(fs.readFileSync(file, "utf8")) : {};
};
const keep = (ticket, values) => {
  const file = path.join(TICKETS, `${ticket}.json`);
  fs.writeFileSync(`${file}.new`, JSON.stringify({ ...kept(ticket), ...values }));
  fs.renameSync(`${file}.new`, file);
};

// Constant time, whatever the lengths: compare digests of the two.
const sameSecret = (a, b) => crypto.timingSafeEqual(sha256(a), sha256(b));
const sha256 = (text) => crypto.createHash("sha256").update(String(text)).digest();
const sha256OfFile = async (file) => {
  const hash = crypto.createHash("sha256");
  for await (const block of fs.createReadStream(file)) hash.update(block);
  return hash.digest("hex");
};

// The browser's name, made one harmless file name: no directories, no dot files.
function safeName(name) {
  let safe = String(name).normalize("NFC").split(/[\\/]/).pop()
    .replace(/[^\p{L}\p{N}\p{M} ._\-()+,=@[\]]/gu, "_").replace(/\s+/g, " ")
    .replace(/^[ .-]+|[ .]+$/g, "");
  while (Buffer.byteLength(safe) > 200) safe = safe.slice(0, -1);
  return safe || "upload";
}

const fsync = (file) => {
  const fd = fs.openSync(file, "r");
  fs.fsyncSync(fd);
  fs.closeSync(fd);
};

// Into FILES under a name of its own (reserved with "wx": never over another file), synced.
function moveIntoFiles(source, name) {
  const dot = name.lastIndexOf(".");
  const [stem, ext] = dot > 0 ? [name.slice(0, dot), name.slice(dot)] : [name, ""];
  for (let n = 1; ; n++) {
    const target = path.join(FILES, n === 1 ? name : `${stem}-${n}${ext}`);
    try {
      fs.closeSync(fs.openSync(target, "wx"));
    } catch (e) {
      if (e.code === "EEXIST") continue;
      throw e;
    }
    try {
      fs.renameSync(source, target);
    } catch (e) {
      if (e.code !== "EXDEV") { fs.unlinkSync(target); throw e; }
      fs.copyFileSync(source, target); // another file system: copy, sync, then remove
      fsync(target);
      fs.unlinkSync(source);
    }
    fsync(FILES);
    return path.basename(target);
  }
}

const app = express();
const page = fs.readFileSync(path.join(__dirname, "index.html"), "utf8");
const escape = (s) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

app.get("/", (req, res) => res.type("html").send(page.replaceAll("{{ incoming }}", escape(INCOMING_PUBLIC))));

app.post("/ticket", async (req, res) => {
  // A real app checks here who may upload (a signed-in user, a quota...).
  const secret = crypto.randomBytes(32).toString("base64url");
  const answer = await fetch(`${INCOMING_URL}/incoming/backend/new_upload`, {
    method: "POST",
    body: new URLSearchParams({
      signalFinishURL: `${APP_URL}/handover`, removeFileWhenFinished: "false", backendSecret: secret,
    }),
  });
  const text = await answer.text();
  if (answer.status !== 200 || !TICKET.test(text)) return res.status(502).json({ error: text });
  keep(text, { secret });
  res.json({ ticket: text });
});

app.post("/handover", express.urlencoded({ extended: false, limit: "64kb" }), async (req, res) => {
  const form = req.body || {};
  res.type("text/plain; charset=utf-8");
  const ticket = TICKET.test(form.id) ? kept(form.id) : {};
  if (!sameSecret(form.backendSecret, ticket.secret || "") || !ticket.secret) {
    return res.status(403).send("wrong backendSecret or unknown upload id");
  }
  if (form.cancelled === "yes") { // by the browser, an idle timeout or an error
    fs.rmSync(path.join(TICKETS, `${form.id}.json`), { force: true });
    return res.send("ok");
  }
  if (!ticket.verdict) { // handovers come at least once
    if (!path.isAbsolute(form.filename) || path.basename(form.filename) !== form.id) {
      return res.status(400).send("filename is not this upload's file");
    }
    const digest = await sha256OfFile(form.filename);
    if (form.sha256 && digest !== form.sha256.toLowerCase()) {
      return res.status(422).send("the file's SHA-256 differs");
    }
    const name = moveIntoFiles(form.filename, safeName(form.filenameFromBrowser));
    ticket.verdict = JSON.stringify({ url: `/files/${encodeURIComponent(name)}`, sha256: digest, name });
    keep(form.id, { verdict: ticket.verdict });
  }
  res.send(`done\n${ticket.verdict}`); // the page gets the verdict as `result`
});

app.get("/files/:name", (req, res) => {
  res.download(req.params.name, { root: FILES, dotfiles: "deny" });
});

const port = Number(process.env.PORT || 3000);
const server = app.listen(port, process.env.HOST || "127.0.0.1", (error) => {
  if (error) throw error;
  console.log(`listening on http://${server.address().address}:${server.address().port}`);
});
