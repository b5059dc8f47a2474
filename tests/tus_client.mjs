// tus-js-client under Node, run as a subprocess by the tests (tests/test_tus_clients.py)
// and by bench/tus_bench.py: uploads files concurrently and prints one JSON line per
// event on stdout, the last one {"event": "end", ...}.
//
//   node tests/tus_client.mjs '{"endpoint": "http://127.0.0.1:4000/incoming/tus/",
//     "uploads": [{"file": "/path", "metadata": {"ticket": "...", "filename": "a.bin"}}],
//     "chunkSize": null, "retryDelays": [100, 500], "rate": 0, "abortAfter": null}'
//
// chunkSize null is tus-js-client's default, Infinity (the whole file in one PATCH).
// parallelUploads (default 1) splits each file into that many partial uploads
// (tus concatenation), each created with its upload's metadataForPartialUploads.
// rate (bytes/s, per upload) throttles what is read from the file; abortAfter (bytes)
// calls abort(true) (termination) once that many bytes are sent. deferred: the file is
// read as a stream of unknown size (uploadLengthDeferred; chunkSize must be finite), the
// length given with the PATCH that ends it (creation-defer-length). startAgainAfter (ms):
// after an error tus-js-client did not retry, the page's start() again, once.
import fs from "node:fs";
import { PassThrough, Transform } from "node:stream";
import * as tus from "tus-js-client";

const options = JSON.parse(process.argv[2]);
const emit = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);
const started = performance.now();
const elapsed = () => Math.round((performance.now() - started) * 10) / 10;

// Passes bytes on no faster than `rate` bytes per second.
function throttle(rate) {
  const begin = performance.now();
  let passed = 0;
  return new Transform({
    transform(chunk, _encoding, callback) {
      passed += chunk.length;
      const wait = begin + (passed / rate) * 1000 - performance.now();
      if (wait > 0) setTimeout(() => callback(null, chunk), wait);
      else callback(null, chunk);
    },
  });
}

// tus-js-client's own file source for a path (fs.createReadStream per slice), throttled.
class ThrottledFileReader {
  constructor(rate) {
    this.rate = rate;
  }

  async openFile(path) {
    const { size } = await fs.promises.stat(path);
    const rate = this.rate;
    return {
      size,
      slice(start, end) {
        end = Math.min(end, size);
        if (end <= start) return Promise.resolve({ value: Buffer.alloc(0), done: true });
        const stream = fs.createReadStream(path, { start, end: end - 1 }).pipe(throttle(rate));
        stream.size = end - start;
        return Promise.resolve({ value: stream, done: end >= size });
      },
      close() {},
    };
  }
}

function statusOf(error) {
  const response = error?.originalResponse;
  return response ? response.getStatus() : 0;
}

function upload(index, spec) {
  return new Promise((resolve) => {
    const begin = performance.now();
    const finish = (event) => {
      emit({ upload: index, ms: Math.round(performance.now() - begin), at: elapsed(), ...event });
      resolve(event.event === "success");
    };
    let aborting = false;
    let startedAgain = false;
    const input = options.deferred
      ? fs.createReadStream(spec.file).pipe(options.rate ? throttle(options.rate) : new PassThrough())
      : options.rate
        ? spec.file
        : fs.createReadStream(spec.file);
    const up = new tus.Upload(input, {
      endpoint: options.endpoint,
      uploadUrl: spec.uploadUrl ?? null,
      metadata: spec.metadata ?? {},
      chunkSize: options.chunkSize ?? Number.POSITIVE_INFINITY,
      retryDelays: options.retryDelays ?? null,
      uploadDataDuringCreation: options.uploadDataDuringCreation ?? false,
      parallelUploads: options.parallelUploads ?? 1,
      uploadLengthDeferred: options.deferred ?? false,
      metadataForPartialUploads: spec.metadataForPartialUploads ?? {},
      ...(options.rate && !options.deferred
        ? { fileReader: new ThrottledFileReader(options.rate) }
        : {}),
      onUploadUrlAvailable() {
        emit({ event: "created", upload: index, url: up.url, at: elapsed() });
      },
      onChunkComplete(size, accepted, total) {
        emit({ event: "chunk", upload: index, size, accepted, total, at: elapsed() });
      },
      onShouldRetry(error, attempt) {
        const status = statusOf(error);
        const retry = !(status >= 400 && status < 500) || status === 409 || status === 423;
        emit({ event: "retry", upload: index, attempt, status, retry, at: elapsed(),
               message: String(error.message).slice(0, 300) }); // prettier-ignore
        return retry;
      },
      ...(options.abortAfter != null
        ? {
            onProgress(sent) {
              if (aborting || sent < options.abortAfter) return;
              aborting = true;
              up.abort(true).then(
                () => finish({ event: "aborted", sent }),
                (error) => finish({ event: "abort-failed", sent, status: statusOf(error),
                                    message: String(error.message).slice(0, 300) }), // prettier-ignore
              );
            },
          }
        : {}),
      onSuccess({ lastResponse }) {
        finish({ event: "success", url: up.url, status: lastResponse.getStatus(),
                 offset: lastResponse.getHeader("Upload-Offset") ?? null,
                 result: lastResponse.getHeader("Incoming-Result") ?? null }); // prettier-ignore
      },
      onError(error) {
        const response = error.originalResponse;
        const event = { event: "error", url: up.url, status: statusOf(error),
                        body: response ? response.getBody() : null,
                        message: String(error.message).slice(0, 500) }; // prettier-ignore
        if (options.startAgainAfter != null && !startedAgain) {
          startedAgain = true;
          emit({ ...event, event: "start-again", upload: index, at: elapsed() });
          setTimeout(() => up.start(), options.startAgainAfter);
          return;
        }
        finish(event);
      },
    });
    up.start();
  });
}

const results = await Promise.all(options.uploads.map((spec, index) => upload(index, spec)));
emit({ event: "end", ok: results.every(Boolean), ms: elapsed() });
