"""The worker's Prometheus metrics, in a registry of its own so tests can run several apps."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from workers.batch import BatchReport

BATCH_SIZES = (1, 8, 32, 128, 256, 512, 1024, 2048, 4096, 16384)
STEP_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
AGE_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)

CONTENT_TYPE = "text/plain; version=0.0.4"


class Metrics:
    """Counters and histograms of what the worker did."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.totals = {"events": 0, "batches": 0, "dead letters": 0}
        self.events = Counter(
            "stream_lstm_events", "Events read, dead letters included", registry=self.registry
        )
        self.batches = Counter(
            "stream_lstm_batches", "Micro-batches processed", registry=self.registry
        )
        self.dead_letters = Counter(
            "stream_lstm_dead_letters",
            "Events sent to the dead-letter topic",
            registry=self.registry,
        )
        self.replayed = Counter(
            "stream_lstm_replayed_events",
            "Events skipped because their memory update was already stored",
            registry=self.registry,
        )
        self.stale = Counter(
            "stream_lstm_stale_commits",
            "Memory writes refused by a newer stored fence",
            registry=self.registry,
        )
        self.moved = Counter(
            "stream_lstm_moved_commits",
            "Memory writes that found the memory moved on (a reset, events of the same entity "
            "on another partition) and applied their events again on it",
            registry=self.registry,
        )
        self.memory_loads = Counter(
            "stream_lstm_memory_loads",
            "Entity memories the batches started from, by where they were read: the worker's "
            "memory cache (what it committed itself) or Redis",
            ["source"],
            registry=self.registry,
        )
        for source in ("cache", "redis"):  # both at 0 from the start, not from the first batch
            self.memory_loads.labels(source)
        self.batch_size = Histogram(
            "stream_lstm_batch_size",
            "Events per micro-batch",
            buckets=BATCH_SIZES,
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "stream_lstm_step_seconds",
            "Engine step time per micro-batch (prediction encoding included)",
            buckets=STEP_SECONDS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "stream_lstm_stage_seconds",
            "Wall time per micro-batch of each stage: check, load, step, emit, commit, offsets "
            "(batches overlap: one's emit includes the next one's check, load and step)",
            ["stage"],
            buckets=STEP_SECONDS,
            registry=self.registry,
        )
        self.event_age = Histogram(
            "stream_lstm_event_age_seconds",
            "Age of each micro-batch's oldest event by its record timestamp (the producer's "
            "clock, or the broker's with LogAppendTime) when the worker took the batch "
            "(at=fetched) and when the broker acknowledged its predictions (at=emitted): the "
            "difference is the worker's share of the latency",
            ["at"],
            buckets=AGE_SECONDS,
            registry=self.registry,
        )
        self.redis_full = Gauge(
            "stream_lstm_redis_full",
            "1 while Redis refuses the worker's writes at its maxmemory (the worker waits)",
            registry=self.registry,
        )
        self.warming = Gauge(
            "stream_lstm_warming",
            "1 while a take-over deployment (TAKES_OVER) builds memories without emitting, until "
            "the live deployment's workers stop; 0 otherwise",
            registry=self.registry,
        )
        self.behind_live = Gauge(
            "stream_lstm_warming_behind_events",
            "A warming take-over deployment: events of this worker's partitions before the live "
            "deployment's committed offsets not yet through a finished batch",
            registry=self.registry,
        )
        self.shadow_compared = Counter(
            "stream_lstm_shadow_compared",
            "A warming take-over deployment with SHADOW_TOPIC: its predictions compared with the "
            "live deployment's for the same events, by whether their labels agree",
            ["agreement"],
            registry=self.registry,
        )
        self.shadow_difference = Histogram(
            "stream_lstm_shadow_output_difference",
            "Largest absolute difference between the two models' outputs for one event (models "
            "with as many outputs)",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
            registry=self.registry,
        )
        self.lag = Gauge(
            "stream_lstm_consumer_lag",
            "Events behind the high watermark, per input partition: not yet through a finished "
            "batch (measured every second against the high watermark of the broker's last "
            "fetch answer, whether or not batches finish)",
            ["partition"],
            registry=self.registry,
        )

    def observe(self, report: BatchReport) -> None:
        self.totals["events"] += report.events
        self.totals["batches"] += 1
        self.totals["dead letters"] += report.dead
        self.events.inc(report.events)
        self.batches.inc()
        self.dead_letters.inc(report.dead)
        self.replayed.inc(report.replayed)
        self.stale.inc(report.stale)
        self.moved.inc(report.moved)
        self.memory_loads.labels("cache").inc(report.cached)
        self.memory_loads.labels("redis").inc(report.loaded - report.cached)
        self.batch_size.observe(report.events)
        self.step_seconds.observe(report.seconds["step"])
        for stage, seconds in report.seconds.items():
            self.stage_seconds.labels(stage).observe(seconds)

    def observe_age(self, fetched_s: float, emitted_s: float) -> None:
        """A batch's oldest event's age when fetched and when its predictions were stored.

        Clamped at zero: the record timestamp comes from another machine's clock.
        """
        self.event_age.labels("fetched").observe(max(0.0, fetched_s))
        self.event_age.labels("emitted").observe(max(0.0, emitted_s))

    def render(self) -> bytes:
        return generate_latest(self.registry)
