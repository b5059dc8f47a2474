"""What the server counts, for `GET /incoming/metrics` (Prometheus, via prometheus_client).

Each service has its own registry (several servers in one process, as in the
tests, must not share counters); the process collector adds CPU, memory and
open file descriptors.
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

from .upload import Phase

WRITE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
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
        self.websocket_connections = Gauge(
            "incoming_websocket_connections", "Open upload WebSockets.", registry=registry
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
        ProcessCollector(registry=registry)

    def count_uploads(self, phases: Callable[[], Tally[Phase]]) -> None:
        """Count uploads by state from `phases` (once, by the one who has them)."""
        self.registry.register(_UploadStates(phases))

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
