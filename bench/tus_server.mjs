// @tus/server with @tus/file-store on loopback, the reference of bench/tus_bench.py.
//
//   node bench/tus_server.mjs PORT DIRECTORY     (PORT 0: any free port)
//
// Serves the tus endpoint /files/ and prints "listening on PORT" once it accepts.
import { FileStore } from "@tus/file-store";
import { Server } from "@tus/server";

const [port, directory] = process.argv.slice(2);
const tus = new Server({ path: "/files", datastore: new FileStore({ directory }) });
const listener = tus.listen({ host: "127.0.0.1", port: Number(port) }, () => {
  console.log(`listening on ${listener.address().port}`);
});
process.on("SIGTERM", () => listener.close(() => process.exit(0)));
