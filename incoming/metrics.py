"""Counters for `GET /incoming/metrics`, in Prometheus' text format."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from .uploads import Phase, Upload

WRITE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class Metrics:
    """What the server counts while it runs; uploads by state are read at render time."""

    def __init__(self) -> None:
        self.tickets_created = 0
        self.bytes_received = 0
        self.chunks_stored = 0
        self.handover_attempts = 0
        self.handover_failures = 0
        self.connections = 0
        self.write_seconds_sum = 0.0
        self.write_buckets = [0] * (len(WRITE_BUCKETS) + 1)

    def observe_write(self, seconds: float) -> None:
        """A chunk took `seconds` from arrival to being on disk."""
        self.chunks_stored += 1
        self.write_seconds_sum += seconds
        self.write_buckets[bisect_left(WRITE_BUCKETS, seconds)] += 1

    def render(self, uploads: Iterable[Upload]) -> str:
        states = dict.fromkeys((phase.value for phase in Phase), 0)
        for upload in uploads:
            states[upload.phase.value] += 1
        lines = [
            "# HELP incoming_uploads Uploads the server knows, by state.",
            "# TYPE incoming_uploads gauge",
            *(f'incoming_uploads{{state="{state}"}} {n}' for state, n in states.items()),
            *_single("tickets_created_total", "counter", "Tickets given to backends.",
                     self.tickets_created),
            *_single("bytes_received_total", "counter", "Bytes accepted from browsers.",
                     self.bytes_received),
            *_single("handover_attempts_total", "counter", "POSTs to signalFinishURLs.",
                     self.handover_attempts),
            *_single("handover_failures_total", "counter", "Handovers that failed for good.",
                     self.handover_failures),
            *_single("websocket_connections", "gauge", "Open WebSocket connections.",
                     self.connections),
            "# HELP incoming_chunk_write_seconds Time from a chunk's arrival to its ack.",
            "# TYPE incoming_chunk_write_seconds histogram",
        ]  # fmt: skip
        cumulative = 0
        for bound, count in zip((*WRITE_BUCKETS, "+Inf"), self.write_buckets, strict=True):
            cumulative += count
            lines.append(f'incoming_chunk_write_seconds_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f"incoming_chunk_write_seconds_sum {self.write_seconds_sum:.6f}")
        lines.append(f"incoming_chunk_write_seconds_count {self.chunks_stored}")
        return "\n".join(lines) + "\n"


def _single(name: str, kind: str, help_text: str, value: int) -> list[str]:
    return [f"# HELP incoming_{name} {help_text}", f"# TYPE incoming_{name} {kind}",
            f"incoming_{name} {value}"]  # fmt: skip
