"""The order of a worker's batches: each is prepared (check, load, step) while up to
``MAX_FINISHING`` earlier ones finish (emit, commit memories, commit offsets), and each step of
finishing waits for the same step of the batch before, so what others see keeps its order.

A batch starts from the memories of the batches still finishing, even before they reach Redis
(``BatchProcessor.prepare``'s ``in_flight``). Its offsets are committed only after its memories
are, and only after the batch before committed its own.

A failure stops the pipeline: no batch starts and nothing more is committed (the batches still
finishing are cancelled: their events come again from the committed offsets, and the fences
drop what was applied already), and the error is kept in ``failure`` for the program to stop
with. Not even the batches before a failed one finish: a failure may be theirs too (Redis
refusing every commit), or make their events another topic's (the input topic recreated).
Skipping the failed batch and going on would let later events of the same entities commit
fences past it, and its events would then be dropped as replays: lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.batch import BatchProcessor, BatchReport, Consumed, Prepared

__all__ = ["MAX_FINISHING", "Batch", "Pipeline"]

logger = logging.getLogger(__name__)

MAX_FINISHING = 2
"""Batches emitting and committing at once while the next one is prepared."""


@dataclass(eq=False)
class Batch:
    """Records fetched together: ``offsets`` is what committing them moves each partition to."""

    records: Sequence[Consumed]
    offsets: dict[Any, int]  # partition (as the consumer names it) -> next offset to read
    fetched_at: float  # unix seconds, comparable with record timestamps
    oldest: float = 0.0  # the oldest record's timestamp, unix seconds (0: none carried one)


@dataclass(eq=False)
class Finished:
    """A batch whose memories and offsets are committed, for the metrics."""

    batch: Batch
    report: BatchReport
    emitted_at: float  # unix seconds: when the broker acknowledged its predictions


@dataclass(eq=False)
class _Finishing:
    """A prepared batch on its way out, and how far it got."""

    batch: Batch
    prepared: Prepared
    before: _Finishing | None  # the batch prepared just before this one, while it finishes
    emitted: asyncio.Event = field(default_factory=asyncio.Event)
    committed: asyncio.Event = field(default_factory=asyncio.Event)  # its memories are in Redis
    task: asyncio.Future[None] | None = None


class Pipeline:
    """Runs batches through a ``BatchProcessor`` in order, overlapping one batch's preparation
    with earlier ones' waits on the broker and Redis.

    ``commit_offsets`` acknowledges a batch's events (the consumer's offset commit);
    ``finished`` hears of each batch done; ``failed`` hears once of the error that stopped the
    pipeline. The caller runs one ``run`` at a time (the consumer holds a lock around it and
    around ``drain``, which a rebalance waits for).
    """

    def __init__(
        self,
        processor: BatchProcessor,
        commit_offsets: Callable[[dict[Any, int]], Awaitable[None]],
        *,
        finished: Callable[[Finished], None] = lambda _: None,
        failed: Callable[[BaseException], None] = lambda _: None,
    ) -> None:
        self.processor = processor
        self._commit_offsets = commit_offsets
        self._finished = finished
        self._failed = failed
        self.failure: BaseException | None = None
        self._abandoned = False  # a stop gave up waiting for the batches finishing
        self._finishing: list[_Finishing] = []  # oldest first

    async def run(self, batch: Batch) -> None:
        """Prepare the batch (from the memories of the batches still finishing), wait until
        fewer than ``MAX_FINISHING`` finish, then let it finish in turn. Does nothing once the
        pipeline has failed."""
        if self.closed or not batch.records:
            return
        # Once a batch's memories are committed, Redis holds them: always so after a rebalance
        # (the revoke drains the pipeline), when another owner may have moved them on.
        self._finishing = [f for f in self._finishing if f.task is None or not f.task.done()]
        in_flight = [
            f.prepared.applied.updates for f in self._finishing if not f.committed.is_set()
        ]
        try:
            prepared = await self.processor.prepare(batch.records, in_flight)
        except Exception as error:
            self.fail(error, batch.records)
            return
        await self.drain(keep=MAX_FINISHING - 1)
        if self.closed:
            return
        this = _Finishing(batch, prepared, self._finishing[-1] if self._finishing else None)
        this.task = asyncio.ensure_future(self._finish(this))
        self._finishing.append(this)

    async def drain(self, keep: int = 0) -> None:
        """Wait for the oldest batches to finish until at most ``keep`` are finishing. A
        rebalance and a shutdown drain it all, so partitions move with everything committed."""
        while len(self._finishing) > keep:
            task = self._finishing[0].task
            if task is not None:
                await asyncio.wait([task])  # a cancelled task (after a failure) is done too
            self._finishing.pop(0)

    @property
    def closed(self) -> bool:
        """Whether nothing more may start or commit: after a failure, or once abandoned."""
        return self.failure is not None or self._abandoned

    def abandon(self) -> None:
        """Cancel every batch still finishing and commit nothing more: a stop that cannot wait
        any longer (their events come again from the committed offsets, and the fences drop
        what was applied already)."""
        self._abandoned = True
        self._cancel_finishing()

    def _cancel_finishing(self) -> None:
        current = asyncio.current_task()
        for finishing in self._finishing:
            if finishing.task is not None and finishing.task is not current:
                finishing.task.cancel()

    def fail(self, error: BaseException, records: Sequence[Consumed] = ()) -> None:
        """Stop: log why, then commit nothing more: start no batch and cancel every batch
        still finishing (whatever of theirs was not committed comes again from the committed
        offsets, and the fences drop what was), and tell ``failed``. Only the first failure
        is told; every one cancels what is still finishing."""
        self._cancel_finishing()
        if self.failure is not None:
            return
        self.failure = error
        if records:
            first, last = records[0], records[-1]
            logger.critical(
                "batch of %d events (%s[%d]@%d .. [%d]@%d) failed; stopping the worker so that "
                "nothing after it is committed",
                len(records),
                first.topic,
                first.partition,
                first.offset,
                last.partition,
                last.offset,
                exc_info=error,
            )
        else:
            logger.critical("stopping the worker: %s", error)
        self._failed(error)

    async def _finish(self, this: _Finishing) -> None:
        """Emit, commit the memories, then the offsets, each after the batch before did."""
        before = this.before
        try:
            if before is not None and not await _reached(before, before.emitted):
                return
            await self.processor.emit(this.prepared)
            emitted_at = time.time()
            this.emitted.set()
            if before is not None and not await _reached(before, before.committed):
                return
            if self.closed:  # cancelled too: this holds if a cancellation is lost
                return
            report = await self.processor.commit(this.prepared)
            this.committed.set()
            if before is not None and before.task is not None:
                await before.task  # its offsets are committed
                this.before = None  # nothing keeps the batches before alive
            if self.closed:
                return
            started = time.perf_counter()
            await self._commit_offsets(this.batch.offsets)
            report.seconds["offsets"] = time.perf_counter() - started
        except Exception as error:
            self.fail(error, this.batch.records)
            return
        try:
            self._finished(Finished(this.batch, report, emitted_at))
        except Exception:  # the batch is committed: a failure to report it stops nothing
            logger.exception("reporting a finished batch failed")


async def _reached(before: _Finishing, step: asyncio.Event) -> bool:
    """Wait until the batch before has done a step; False when it ended without (it failed,
    or was cancelled), so that nothing waits for a step that never comes."""
    if step.is_set() or before.task is None:
        return step.is_set()
    waiter: asyncio.Future[Any] = asyncio.ensure_future(step.wait())
    either: list[asyncio.Future[Any]] = [waiter, before.task]
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    return step.is_set()
