"""What the server counts, for `GET /incoming/metrics` (Prometheus, via prometheus_client).

Each service has its own registry (several servers in one process, as in the
tests, must not share counters); the process collector adds CPU, memory and
open file descriptors. Label values come from small fixed sets, never from text
a client or a backend sent.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from .errors import ErrorCode
from .upload import Cause, Phase

WRITE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
SIZE_BUCKETS = tuple(float(1024 * 4**n) for n in range(16))  # 1 KiB to 1 TiB
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 7 * 86400.0)
HANDOVER_BUCKETS = (
    *(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    *(300.0, 3600.0, 6 * 3600.0, 86400.0),  # a backend that was away
)
RETRIED_POSTS = ("handover", "cancel_notice")
ROUND_TRIP_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
TRANSPORTS = ("websocket", "tus", "none")  # "none": an upload that never had a connection
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The counters; uploads by state are counted when scraped."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.tickets_created = Counter(
            "incoming_tickets_created", "Tickets given to backends.", registry=registry
        )
        self.bytes_received = Counter(
            "incoming_bytes_received", "Bytes accepted from clients.", registry=registry
        )
        self.handover_attempts = Counter(
            "incoming_handover_attempts", "POSTs to signalFinishURLs.", registry=registry
        )
        self.handover_failures = Counter(
            "incoming_handover_failures", "Handovers that failed for good.", registry=registry
        )
        self.handover_retries = Counter(
            "incoming_handover_retries",
            "POSTs to signalFinishURLs made again because the backend was away (no answer, "
            "429 or 5xx), by what they carry: a handover or a cancel notice.",
            ["post"],
            registry=registry,
        )
        self.handovers_pending = Gauge(
            "incoming_handovers_pending",
            "Uploads whose client was told the file is stored, the backend not having "
            "answered within HandoverTimeoutS, and that the backend has not finished yet.",
            registry=registry,
        )
        self.websocket_connections = Gauge(
            "incoming_websocket_connections", "Open upload WebSockets.", registry=registry
        )
        self.websocket_round_trip = Histogram(
            "incoming_websocket_round_trip_seconds",
            "Round trips of upload WebSockets, measured as they open (their windows cover them).",
            buckets=ROUND_TRIP_BUCKETS,
            registry=registry,
        )
        self.tus_patches = Gauge(
            "incoming_tus_patches", "tus request bodies being written.", registry=registry
        )
        self.chunk_write_seconds = Histogram(
            "incoming_chunk_write_seconds",
            "Time from a chunk's arrival to its being on disk.",
            buckets=WRITE_BUCKETS,
            registry=registry,
        )
        self.uploads_started = Counter(
            "incoming_uploads_started",
            "Uploads that had their first connection, by its transport.",
            ["transport"],
            registry=registry,
        )
        self.uploads_finished = Counter(
            "incoming_uploads_finished",
            "Uploads handed over and finished, by the transport of their last connection.",
            ["transport"],
            registry=registry,
        )
        self.uploads_cancelled = Counter(
            "incoming_uploads_cancelled",
            "Uploads cancelled, by reason and the transport of their last connection.",
            ["reason", "transport"],
            registry=registry,
        )
        self.errors_sent = Counter(
            "incoming_errors_sent",
            "MsgErrors and HTTP refusals sent to clients, by ErrorCode and transport.",
            ["code", "transport"],
            registry=registry,
        )
        self.upload_bytes = Histogram(
            "incoming_upload_size_bytes",
            "Sizes of the uploads handed over and finished.",
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.upload_seconds = Histogram(
            "incoming_upload_duration_seconds",
            "Time from an upload's first connection to its last byte stored, pauses included.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.handover_seconds = Histogram(
            "incoming_handover_duration_seconds",
            "Time from a handover's first POST to the backend's answer, retries included.",
            buckets=HANDOVER_BUCKETS,
            registry=registry,
        )
        for post in RETRIED_POSTS:
            self.handover_retries.labels(post)
        for transport in TRANSPORTS:  # every series there is, from the start
            self.uploads_finished.labels(transport)
            for cause in Cause:
                self.uploads_cancelled.labels(cause.value, transport)
            if transport != "none":
                self.uploads_started.labels(transport)
        ProcessCollector(registry=registry)

    def error_sent(self, code: ErrorCode | None, transport: str) -> None:
        """Count a MsgError or an HTTP refusal (one without an ErrorCode is not counted)."""
        if code is not None:
            self.errors_sent.labels(str(int(code)), transport).inc()

    def count_uploads(self, phases: Callable[[], Tally[Phase]]) -> None:
        """Count uploads by state from `phases` (once, by the one who has them)."""
        self.registry.register(_UploadStates(phases))

    def render(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """The registry's metrics without their `_created` samples: a counter's or a
    histogram's creation time, which doubles the series and says nothing here
    (prometheus_client's switch for them is process-wide)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


class _UploadStates:
    """`incoming_uploads{state=...}`, counted at scrape time."""

    def __init__(self, phases: Callable[[], Tally[Phase]]) -> None:
        self._phases = phases

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "incoming_uploads", "Uploads the server knows, by state.", labels=["state"]
        )
        counted = self._phases()
        for phase in Phase:
            gauge.add_metric([phase.value], counted[phase])
        yield gauge
