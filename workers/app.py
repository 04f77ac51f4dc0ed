"""The Faust app that hosts a worker: its lifecycle and signals, and the memory, health and
metrics views. The Kafka I/O runs in the ``BatchConsumer`` service it starts (workers.consumer).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import faust
from aiokafka.errors import KafkaError
from faust.app.base import BootStrategy
from faust.web import Request, Response, View
from mode import BaseSignalT

from stream_lstm.exceptions import BrokerError, StoreUnavailableError
from stream_lstm.model import StreamModel
from workers.batch import BatchProcessor
from workers.consumer import BatchConsumer, KafkaEmitter
from workers.metrics import CONTENT_TYPE, Metrics
from workers.settings import Settings

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
TOPICS_WAIT_S = 60.0


async def preflight(settings: Settings, model: StreamModel) -> None:
    """Before the worker starts: the broker accepts our login and has the topics, and Redis
    accepts us.

    A refusal (a wrong password, an untrusted certificate) raises BrokerRefusedError or
    StoreRefusedError at once: retrying cannot help, and the clients would otherwise retry it
    as if the broker or Redis were down. A broker that does not answer is waited for (up to
    ``TOPICS_WAIT_S``); a Redis that does not answer yet is the worker's to wait out.
    """
    await settings.kafka.check(TOPICS_WAIT_S)
    async with settings.memory_store(model.version) as store:
        try:
            await store.ping(HEALTH_TIMEOUT_S)
        except StoreUnavailableError as e:
            logger.warning("Redis does not answer yet; the worker will wait for it: %s", e)
    await ensure_topics(settings)


async def ensure_topics(settings: Settings) -> None:
    """Create missing topics with PARTITIONS partitions (and REPLICATION_FACTOR replicas)
    before any client can auto-create them.

    Some brokers (Tansu) auto-create a topic with their own default partition count as soon as a
    client asks for its metadata, and the count caps how many workers can share the stream.
    """
    names = [settings.input_topic, settings.output_topic, settings.dead_letter_topic]
    deadline = time.monotonic() + TOPICS_WAIT_S
    while True:
        try:
            await settings.kafka.create_topics(
                names, settings.partitions, settings.replication_factor
            )
        except KafkaError as e:
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"STREAM_LSTM_BROKER / --broker: {settings.broker} did not answer within "
                    f"{TOPICS_WAIT_S:.0f}s ({e!r})"
                ) from e
            logger.warning("waiting for the broker at %s: %r", settings.broker, e)
            await asyncio.sleep(1.0)
            continue
        return


class _HostOnly(BootStrategy):
    """Faust hosts the web server and lifecycle; the BatchConsumer service does the Kafka I/O."""

    enable_kafka = False


class _App(faust.App):
    BootStrategy = _HostOnly


class StreamWorker:
    """The app and everything it serves with: model, memory store, processor and metrics."""

    def __init__(self, settings: Settings, model: StreamModel) -> None:
        self.settings = settings
        self.model = model
        self.started = time.monotonic()
        self.metrics = Metrics()
        # Faust's datadir. Its default, <app id>-data in the working directory, left an empty
        # directory behind wherever a worker ran; the worker keeps no tables there. Unset, it is
        # a temporary directory of this worker's own, removed when the process exits.
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if settings.data_dir is not None:
            self.data_dir = settings.data_dir
        else:
            self._scratch = tempfile.TemporaryDirectory(
                prefix=f"{settings.app_id}-data-", ignore_cleanup_errors=True
            )
            self.data_dir = Path(self._scratch.name)
        self.app = _App(
            settings.app_id,
            broker=settings.broker,
            store="memory://",
            # Faust expands {...} in the path as a format string: escape the braces of ours.
            datadir=str(self.data_dir).replace("{", "{{").replace("}", "}}"),
            web_enabled=True,
            web_port=settings.web_port,
            web_bind="0.0.0.0",
            web_host="127.0.0.1",
            logging_config=None,
        )
        self.store = settings.memory_store(model.version)
        self.emitter = KafkaEmitter(settings.kafka)
        self.processor = BatchProcessor(
            model,
            self.store,
            self.emitter,
            output_topic=settings.output_topic,
            dead_letter_topic=settings.dead_letter_topic,
            max_event_bytes=settings.max_event_bytes,
        )
        self.consumer = BatchConsumer(settings, self.processor, self.emitter, self.metrics)
        self.app.service(cast(Any, self.consumer))
        self.app.page("/entities/{entity_id:[^/]+}/memory")(self._memory_view())
        self.app.page("/health")(self._health_view())
        self.app.page("/metrics")(self._metrics_view())
        self.app.on_before_shutdown.connect(self._on_shutdown)

    async def _on_shutdown(
        self, sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any
    ) -> None:
        totals = ", ".join(f"{n} {what}" for what, n in self.metrics.totals.items())
        logger.info("stream-lstm stopping after %.0fs: %s", time.monotonic() - self.started, totals)

    def _memory_view(self) -> type[View]:
        worker = self

        class MemoryView(View):
            async def get(self, request: Request, entity_id: str) -> Response:
                stored = await worker.store.get(entity_id)
                if stored is None:
                    return self.json({"error": f"no memory stored for {entity_id!r}"}, status=404)
                snapshot = stored.snapshot(entity_id, worker.model.version)
                return self.bytes(
                    snapshot.model_dump_json().encode(), content_type="application/json"
                )

            async def delete(self, request: Request, entity_id: str) -> Response:
                existed = await worker.store.reset(entity_id)
                if not existed:
                    return self.json({"error": f"no memory stored for {entity_id!r}"}, status=404)
                return self.json({"entity_id": entity_id, "reset": True})

        return MemoryView

    def _health_view(self) -> type[View]:
        worker = self

        class HealthView(View):
            async def get(self, request: Request) -> Response:
                checks = await worker.health()
                ready = all(checks.values())
                return self.json({"ready": ready, "checks": checks}, status=200 if ready else 503)

        return HealthView

    def _metrics_view(self) -> type[View]:
        worker = self

        class MetricsView(View):
            async def get(self, request: Request) -> Response:
                return self.bytes(worker.metrics.render(), content_type=CONTENT_TYPE)

        return MetricsView

    async def health(self) -> dict[str, bool]:
        """Ready only when the model is loaded, the worker has joined its consumer group, and
        both the broker and Redis answer now."""
        return {
            "model": self.model is not None,
            "group": self.consumer.joined,
            "redis": await self._answers(self.store.ping(HEALTH_TIMEOUT_S)),
            "broker": await self._answers(self.emitter.producer.client.fetch_all_metadata()),
        }

    @staticmethod
    async def _answers(check: Any) -> bool:
        try:
            await asyncio.wait_for(check, HEALTH_TIMEOUT_S)
        except Exception as e:  # any failure means "not ready", and says why in the log
            logger.info("health check failed: %r", e)
            return False
        return True
