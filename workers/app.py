"""The Faust app: one agent that runs micro-batches, and the memory, health and metrics views.

Faust hosts the worker: group membership, partition assignment and rebalancing, offset commits,
the web server and signal handling. The agent reads raw bytes (no Faust codec may fail on a bad
message), takes micro-batches without acknowledging them, hands each batch to the
``BatchProcessor`` and acknowledges its events only once their memories are committed, so the
offsets Faust commits never run ahead of the memories.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, NoReturn, cast

import faust
from aiokafka.errors import KafkaError
from faust.streams import Stream
from faust.transport.drivers.aiokafka import Producer
from faust.types import EventT, StreamT
from faust.web import Request, Response, View
from mode import BaseSignalT

from state import MemoryStore
from stream_lstm.exceptions import BrokerError
from stream_lstm.model import StreamModel
from workers.batch import BatchProcessor, Record
from workers.broker import create_topics
from workers.metrics import CONTENT_TYPE, Metrics
from workers.settings import Settings

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
SHUTDOWN_GRACE_S = 6.0
"""How long SIGTERM waits for the batch in hand; the whole stop must stay under 10 s."""
EXIT_SOFTWARE = 70
TOPICS_WAIT_S = 60.0


def fail_stop(records: list[Record], error: Exception) -> NoReturn:
    """Stop at once, acknowledging nothing: the batch and all after it are replayed on restart.

    Skipping the batch and going on would let later events of the same entities commit fences
    past it, and its events would then be dropped as replays: lost. A crash loses nothing.
    """
    first, last = records[0], records[-1]
    logger.critical(
        "batch of %d events (%s[%d]@%d .. [%d]@%d) failed; stopping the worker so that nothing "
        "after it is committed",
        len(records),
        first.topic,
        first.partition,
        first.offset,
        last.partition,
        last.offset,
        exc_info=error,
    )
    logging.shutdown()
    os._exit(EXIT_SOFTWARE)


async def ensure_topics(settings: Settings) -> None:
    """Create missing topics with PARTITIONS partitions before any client can auto-create them.

    Some brokers (Tansu) auto-create a topic with their own default partition count as soon as a
    client asks for its metadata, and the count caps how many workers can share the stream.
    """
    names = [settings.input_topic, settings.output_topic, settings.dead_letter_topic]
    deadline = time.monotonic() + TOPICS_WAIT_S
    while True:
        try:
            created = await create_topics(settings.bootstrap_servers, names, settings.partitions)
        except KafkaError as e:
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"STREAM_LSTM_BROKER / --broker: {settings.broker} did not answer within "
                    f"{TOPICS_WAIT_S:.0f}s ({e!r})"
                ) from e
            logger.warning("waiting for the broker at %s: %r", settings.broker, e)
            await asyncio.sleep(1.0)
            continue
        if created:
            logger.info("created topics %s with %d partitions", created, settings.partitions)
        return


class FaustEmitter:
    """Sends through the app's own producer and waits until the broker acknowledged all."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    async def emit(self, topic: str, messages: Any) -> None:
        producer = self.app.producer
        pending = [
            await producer.send(topic, key, value, None, None, None) for key, value in messages
        ]
        await asyncio.gather(*pending)


class StreamWorker:
    """The app and everything it serves with: model, memory store, processor and metrics."""

    def __init__(self, settings: Settings, model: StreamModel) -> None:
        self.settings = settings
        self.model = model
        self.started = time.monotonic()
        self.metrics = Metrics()
        self.app = faust.App(
            settings.app_id,
            broker=settings.broker,
            store="memory://",
            topic_partitions=settings.partitions,
            topic_allow_declare=True,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=settings.session_timeout_s,
            broker_heartbeat_interval=settings.session_timeout_s / 4,
            broker_rebalance_timeout=settings.session_timeout_s,
            producer_acks=-1,
            web_enabled=True,
            web_port=settings.web_port,
            web_bind="0.0.0.0",
            stream_recovery_delay=0.0,
            topic_disable_leader=True,
            web_host="127.0.0.1",
            logging_config=None,
        )
        self.store = MemoryStore(
            settings.redis_url, settings.app_id, model.version, ttl_s=settings.memory_ttl_s
        )
        self.processor = BatchProcessor(
            model,
            self.store,
            FaustEmitter(self.app),
            output_topic=settings.output_topic,
            dead_letter_topic=settings.dead_letter_topic,
            max_event_bytes=settings.max_event_bytes,
        )
        self.events_topic = self.app.topic(
            settings.input_topic,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )
        self.app.agent(self.events_topic, name="stream-lstm-step")(self._agent)
        self.app.page("/entities/{entity_id:[^/]+}/memory")(self._memory_view())
        self.app.page("/health")(self._health_view())
        self.app.page("/metrics")(self._metrics_view())
        self.app.on_before_shutdown.connect(self._on_shutdown)

    async def _agent(self, stream: StreamT[Any]) -> None:
        within = self.settings.max_delay_ms / 1000
        events = cast("Stream[Any]", stream)
        async for batch in events.noack_take(self.settings.max_batch, within=within):
            work = asyncio.ensure_future(self._run(events, cast("list[EventT[Any]]", batch)))
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                await self._finish_in_hand(work)
                raise

    async def _run(self, stream: Stream[Any], batch: list[EventT[Any]]) -> None:
        """Process one batch, then acknowledge it; any unexpected error stops the worker."""
        records = [
            Record(m.topic, m.partition, m.offset, m.key, m.value)
            for m in (e.message for e in batch)
        ]
        try:
            report = await self.processor.process(records)
        except Exception as error:
            fail_stop(records, error)
        for event in batch:
            await stream.ack(event)
        self.metrics.observe(report)
        self._observe_lag(batch)

    @staticmethod
    async def _finish_in_hand(work: asyncio.Future[None]) -> None:
        """On shutdown, let the batch in hand commit its memories, within a grace period."""
        if work.done():
            return
        logger.info("stopping: finishing the batch in hand")
        try:
            await asyncio.wait_for(work, SHUTDOWN_GRACE_S)
        except TimeoutError:
            logger.warning(
                "the batch in hand did not finish within %.0fs; it will be replayed on restart",
                SHUTDOWN_GRACE_S,
            )

    def _observe_lag(self, batch: list[EventT[Any]]) -> None:
        last: dict[Any, int] = {}
        for event in batch:
            last[event.message.tp] = event.message.offset
        consumer = self.app.consumer
        for tp, offset in last.items():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(0, highwater - offset - 1))

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
        """Ready only when the model is loaded and both the broker and Redis answer now."""
        return {
            "model": self.model is not None,
            "redis": await self._answers(self.store.ping(HEALTH_TIMEOUT_S)),
            "broker": await self._answers(self._kafka_client().fetch_all_metadata()),
        }

    def _kafka_client(self) -> Any:
        """The producer's aiokafka client: Faust exposes no public way to ask the broker."""
        return cast(Producer, self.app.producer)._ensure_producer().client

    @staticmethod
    async def _answers(check: Any) -> bool:
        try:
            await asyncio.wait_for(check, HEALTH_TIMEOUT_S)
        except Exception as e:  # any failure means "not ready", and says why in the log
            logger.info("health check failed: %r", e)
            return False
        return True
