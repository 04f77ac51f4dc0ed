"""The Faust app that hosts a worker: its lifecycle and signals, and the memory, health and
metrics views. The Kafka I/O runs in the ``BatchConsumer`` service it starts (workers.consumer).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import faust
from faust.app.base import BootStrategy
from faust.web import Request, Response, View
from mode import BaseSignalT
from mode.utils.futures import maybe_cancel

from state import StoredMemory
from stream_lstm.model import StreamModel
from stream_lstm.schema import MemorySnapshot
from workers.batch import BatchProcessor
from workers.consumer import BatchConsumer, KafkaEmitter
from workers.metrics import CONTENT_TYPE, Metrics
from workers.settings import Settings

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0


def memory_snapshot(entity_id: str, stored: StoredMemory, model: StreamModel) -> MemorySnapshot:
    """An entity's stored memory as the memory API and ``stream-lstm memory get`` show it: each
    of the model's states by its name."""
    memories = stored.memories
    states = {
        name: state[0].tolist() for name, state in zip(model.states, memories.states, strict=True)
    }
    return MemorySnapshot(
        entity_id=entity_id,
        **states,
        step=int(memories.step[0]),
        model_version=model.version,
        updated_at=stored.updated_at,
    )


class _HostOnly(BootStrategy):
    """Faust hosts the web server and lifecycle; the BatchConsumer service does the Kafka I/O."""

    enable_kafka = False


class _App(faust.App):
    BootStrategy = _HostOnly


class _Worker(faust.Worker):
    """Faust's worker, which can also be stopped from inside: as SIGTERM stops it; and without
    its terminal spinner, which at log level warning or above sets the root logger to DEBUG, so
    that every library's debug line would be built and formatted (13% of a Faust agent's CPU)."""

    def _setup_spinner_handler(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None

    def stop_soon(self) -> None:
        """Stop as mode's SIGTERM handler does (``_schedule_shutdown``), without logging a
        signal: the worker's own shutdown then waits for this stop to finish."""
        if not self._signal_stop_time:
            self._signal_stop_time = self.loop.time()
            self._signal_stop_future = asyncio.ensure_future(self._stop(), loop=self.loop)

    async def _stop(self) -> None:
        await self.stop()
        maybe_cancel(self._starting_fut)  # a worker still starting stops too


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
            web_bind=settings.web_bind,
            web_host="127.0.0.1",
            # Faust's own pages (router, tables, graph, stats, metrics) serve nothing of ours.
            web_router_enabled=False,
            web_tables_enabled=False,
            web_graph_enabled=False,
            web_stats_enabled=False,
            web_metrics_enabled=False,
            logging_config=None,
        )
        self.store = settings.memory_store(model.version)
        # The memory API's own connections: a flood of requests waits on these, never on the
        # ones the stream loads and commits with.
        self.api_store = settings.memory_store(model.version, cache_entities=0)
        self.emitter = KafkaEmitter(settings.kafka)
        self.processor = BatchProcessor(
            model,
            self.store,
            self.emitter,
            output_topic=settings.output_topic,
            dead_letter_topic=settings.dead_letter_topic,
            max_event_bytes=settings.max_event_bytes,
            event_format=settings.event_format,
            prediction_format=settings.prediction_format,
        )
        self.failure: BaseException | None = None  # what stopped the stream, if anything did
        self._worker: _Worker | None = None
        self.consumer = BatchConsumer(
            settings, self.processor, self.emitter, self.metrics, failed=self._stop_after
        )
        self.metrics.redis_full.set_function(lambda: float(self.processor.redis_full))
        take_over = self.consumer.take_over
        if take_over is not None:
            self.metrics.warming.set_function(lambda: float(take_over.handed_over is None))
            self.metrics.behind_live.set_function(lambda: float(take_over.behind))
        self.app.service(cast(Any, self.consumer))
        self.app.page("/entities/{entity_id:[^/]+}/memory")(self._memory_view())
        self.app.page("/health")(self._health_view())
        self.app.page("/metrics")(self._metrics_view())
        self.app.on_before_shutdown.connect(self._on_shutdown)

    def run(self) -> BaseException | None:
        """Run the worker until SIGTERM (None) or until the stream fails: then return the error
        that stopped it, once the worker has stopped. The caller decides the exit status."""
        self._worker = _Worker(
            self.app, loglevel=self.settings.log_level.replace("warning", "warn")
        )
        try:
            self._worker.execute_from_commandline()  # ends with SystemExit, 0 unless it broke
        except SystemExit as status:
            if self.failure is None and status.code not in (0, None):
                raise
        return self.failure

    def _stop_after(self, failure: BaseException) -> None:
        """The stream failed: stop the worker as SIGTERM would, committing nothing more."""
        self.failure = failure
        if self._worker is not None:
            self._worker.stop_soon()

    async def _on_shutdown(
        self, sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any
    ) -> None:
        totals = ", ".join(f"{n} {what}" for what, n in self.metrics.totals.items())
        logger.info("stream-lstm stopping after %.0fs: %s", time.monotonic() - self.started, totals)

    def _memory_view(self) -> type[View]:
        worker = self

        class MemoryView(View):
            async def dispatch(self, request: Any) -> Any:
                if not worker.allowed(request.headers.get("Authorization", "")):
                    return self.json(
                        {"error": "the memory API needs Authorization: Bearer <API token>"},
                        status=401,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                return await super().dispatch(request)

            async def get(self, request: Request, entity_id: str) -> Response:
                stored = await worker.api_store.get(entity_id)
                if stored is None:
                    return self.json({"error": f"no memory stored for {entity_id!r}"}, status=404)
                snapshot = memory_snapshot(entity_id, stored, worker.model)
                return self.bytes(
                    snapshot.model_dump_json().encode(), content_type="application/json"
                )

            async def delete(self, request: Request, entity_id: str) -> Response:
                existed = await worker.api_store.reset(entity_id)
                if not existed:
                    return self.json({"error": f"no memory stored for {entity_id!r}"}, status=404)
                return self.json({"entity_id": entity_id, "reset": True})

        return MemoryView

    def allowed(self, authorization: str) -> bool:
        """Whether a request may use the memory API: any, without a token; else one that
        carries it (compared in constant time)."""
        token = self.settings.api_token
        if token is None:
            return True
        scheme, _, given = authorization.partition(" ")
        # Header bytes that are not UTF-8 reach us as surrogates: compare them as bytes too.
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
        matches = hmac.compare_digest(given_bytes, token.get_secret_value().encode())
        return scheme.lower() == "bearer" and matches

    def _health_view(self) -> type[View]:
        worker = self

        class HealthView(View):
            async def get(self, request: Request) -> Response:
                checks = await worker.health()
                ready = all(checks.values())
                body: dict[str, Any] = {"ready": ready, "checks": checks}
                take_over = worker.consumer.take_over
                if take_over is not None:
                    body["take_over"] = {
                        "from": take_over.old,
                        "state": take_over.state,
                        "behind": take_over.behind,
                        "lag": worker.consumer.lag,
                        "error": take_over.error,
                    }
                    shadow = take_over.shadow
                    if shadow is not None:
                        body["take_over"]["shadow"] = {
                            "topic": shadow.topic,
                            "compared": shadow.compared,
                            "same_label": shadow.same_label,
                        }
                return self.json(body, status=200 if ready else 503)

        return HealthView

    def _metrics_view(self) -> type[View]:
        worker = self

        class MetricsView(View):
            async def get(self, request: Request) -> Response:
                return self.bytes(worker.metrics.render(), content_type=CONTENT_TYPE)

        return MetricsView

    async def health(self) -> dict[str, bool]:
        """Ready only when the model is loaded, the worker has joined its consumer group, both
        the broker and Redis answer now, and Redis takes writes (it is not at maxmemory)."""
        return {
            "model": self.model is not None,
            "group": self.consumer.joined,
            "redis": await self._answers(self.api_store.ping(HEALTH_TIMEOUT_S)),
            "redis_writes": not self.processor.redis_full,
            "progress": not self.consumer.stalled,
            "broker": await self._answers(self.emitter.ping()),
        }

    @staticmethod
    async def _answers(check: Any) -> bool:
        try:
            await asyncio.wait_for(check, HEALTH_TIMEOUT_S)
        except Exception as e:  # any failure means "not ready", and says why in the log
            logger.info("health check failed: %r", e)
            return False
        return True
