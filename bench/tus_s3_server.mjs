// @tus/server with @tus/s3-store on loopback, the reference of bench/s3_bench.py.
//
//   node bench/tus_s3_server.mjs PORT ENDPOINT BUCKET PART_SIZE   (PORT 0: any free port)
//
// Credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. Serves the tus endpoint
// /files/ and prints "listening on PORT" once it accepts. Parts of PART_SIZE bytes, as
// ours (@tus/s3-store spools each part to a temporary file before it sends it).
import { S3Store } from "@tus/s3-store";
import { Server } from "@tus/server";

const [port, endpoint, bucket, partSize] = process.argv.slice(2);
const datastore = new S3Store({
  partSize: Number(partSize),
  minPartSize: Number(partSize),
  s3ClientConfig: {
    bucket,
    endpoint,
    region: "us-east-1",
    forcePathStyle: true, // Ceph RGW
    // The SDK's default checksums (CRC32, since 3.729) are not what RGW 16 takes.
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
    credentials: {
      accessKeyId: process.env.AWS_ACCESS_KEY_ID,
      secretAccessKey: process.env.AWS_SECRET_ACCESS_KEY,
    },
  },
});
const tus = new Server({ path: "/files", datastore });
const listener = tus.listen({ host: "127.0.0.1", port: Number(port) }, () => {
  console.log(`listening on ${listener.address().port}`);
});
process.on("SIGTERM", () => listener.close(() => process.exit(0)));
