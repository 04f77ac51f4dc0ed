"""A take-over deployment: a new model warms its memories on the stream's history, then takes the
output over from the live deployment exactly where that one's consumer group stopped.

Memories are namespaced by model version, so a new model would start every entity from zeros.
Instead, a deployment of it with its own app id and ``STREAM_LSTM_TAKES_OVER=<live app id>``:

1. **Warms.** Its consumer group reads the input topic from the earliest retained offset and
   builds memories as any worker does, but its processor sends nothing (``EmitFrom``). Each
   partition is read only up to the live group's committed offsets, which the live deployment
   has emitted for (it commits offsets after its predictions are stored): an event past them is
   held, its partition paused, until those offsets pass it. So whatever the new deployment has
   processed, the live one has emitted.
2. **Takes over** once the live group is empty (its workers stopped with SIGTERM, each after
   committing the batch in hand): one of its workers claims the live app id's take-over record
   in Redis (atomically, only when nothing is recorded; the claim expires, should that worker
   die), sees the group still empty after it with every offset it has seen, and records the
   group's committed offsets in place of its claim (else it deletes its claim and waits again).
   From them on every worker of it emits: each event gets its predictions from exactly one model
   version. A worker of the old app id that (re)joins its group afterwards finds the claim or the
   record when its partitions are assigned, while they are paused, before anything of them is
   fetched, and stops (``TakenOverError``). A restarted new worker reads the offsets from the
   record.

With ``STREAM_LSTM_SHADOW_TOPIC``, a warming deployment also sends the predictions it holds
back to that topic and compares each with the live model's (``ShadowComparison``).

A live worker killed (SIGKILL, a lost machine) rather than stopped may have emitted predictions
for events after its last offset commit: its group empties when its session times out, and
those events get the new model's predictions as well (at-least-once, as for any crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, for_code

from state import HandOver, MemoryStore
from state.keys import KeyLayout
from stream_lstm.exceptions import BrokerError, ConfigError, TakenOverError
from stream_lstm.schema import PACKED, Format, Prediction, fast_struct
from workers.batch import BatchProcessor, EmitFrom
from workers.metrics import Metrics
from workers.settings import Settings, env_name

__all__ = ["ShadowComparison", "TakeOver", "check_not_taken_over", "check_take_over"]

logger = logging.getLogger(__name__)

EMPTY_STATES = frozenset({"Empty", "Dead"})
"""Consumer group states without members (Dead: the group is gone, or never existed)."""
SHADOW_READ = 1000
"""Live predictions a shadow comparison reads at a time: the event loop serves the rest between."""
SHADOW_PENDING = 100_000
"""Predictions of either deployment a shadow comparison keeps while the other's for the same
event has not come (the oldest are dropped beyond)."""
CLAIM_TTL_S = 30.0
"""How long a worker's claim to record the hand-over lasts: one that dies mid-way lets go."""


class TakeOver:
    """One worker's side of a take-over: the live group's offsets it may process up to, the
    partitions it holds back, and the hand-over."""

    def __init__(self, settings: Settings, processor: BatchProcessor, metrics: Metrics) -> None:
        if settings.takes_over is None:
            raise ValueError("a take-over needs TAKES_OVER")
        self.shadow = ShadowComparison(settings, metrics) if settings.shadow_topic else None
        processor.shadow = self.shadow
        self.old = settings.takes_over
        self.settings = settings
        self.processor = processor
        processor.emit_from = EmitFrom()  # nothing while warming
        self.bounds: dict[int, int] = {}  # the live group's committed offsets, as last read
        self.handed_over: HandOver | None = None
        self.behind = 0  # events of this worker's partitions before ``bounds`` not yet done
        self.warm = False
        self.polled = False  # ``bounds`` read at least once
        self._seen: dict[int, int] = {}  # the highest committed offset read, per partition
        self._refusal: str | None = None  # why the last hand-over was not made
        self.error: str | None = None  # why the last poll failed, until one succeeds
        self._token = uuid.uuid4().hex  # this worker's claims
        self._held: dict[TopicPartition, int] = {}  # paused partitions: the offset they wait at
        self._admin: AIOKafkaAdminClient | None = None

    @property
    def state(self) -> str:
        """``warming``, ``warm`` (caught up with the live deployment) or ``emitting``."""
        if self.handed_over is not None:
            return "emitting"
        return "warm" if self.warm else "warming"

    async def start(self, owned: Callable[[], Collection[int]]) -> None:
        """Read the take-over record; ``owned``: the input partitions this worker owns now."""
        self._admin = self.settings.kafka.admin()
        await self._admin.start()
        recorded = await self.processor.store.taken_over(self.old)
        own = self.settings.app_id
        if recorded is not None and recorded.by == own and recorded.offsets is not None:
            self._hand_over(recorded)
        elif self.shadow is not None:
            await self.shadow.start(owned)
        logger.info(
            "taking over from %s: warming memories without emitting, up to its group's "
            "committed offsets, until its workers stop",
            self.old,
        )

    async def stop(self) -> None:
        try:
            if self.shadow is not None:
                await self.shadow.stop()
        finally:
            if self._admin is not None:
                await self._admin.close()

    async def poll(self) -> None:
        """Read the take-over record and the live group's committed offsets; take over once the
        group is empty. Raises TakenOverError when another deployment took it over."""
        if self.handed_over is not None or self._admin is None:
            return
        try:
            await self._poll(self._admin)
        except TakenOverError:
            raise
        except Exception as error:
            if self.error is None:
                logger.warning("could not read %s's group or take-over record: %r", self.old, error)
            self.error = repr(error)
            return
        if self.error is not None:
            logger.info("reading %s's group and take-over record again", self.old)
            self.error = None
        if self.handed_over is not None and self.shadow is not None:
            await self.shadow.stop()  # nothing is held back any more

    async def _poll(self, admin: AIOKafkaAdminClient) -> None:
        store, own, topic = self.processor.store, self.settings.app_id, self.settings.input_topic
        recorded = await store.taken_over(self.old)
        if recorded is not None and recorded.offsets is not None:  # another worker took over
            if recorded.by != own:
                raise _taken_by_another(self.old, recorded)
            self._hand_over(recorded)
            return
        mine = recorded is not None and recorded.claim == self._token  # left by a failed poll
        empty, offsets = await _group(admin, self.old, topic)
        self._see(offsets)
        if not empty:
            if mine:
                assert recorded is not None
                await store.release_take_over(self.old, recorded)
            return  # serving
        if recorded is not None and not mine:
            return  # another worker is claiming it
        claim = await store.claim_take_over(self.old, self._token, CLAIM_TTL_S)
        if claim.claim != self._token:
            return
        try:
            # Claimed: a worker of the old group that joins from now on finds the claim before
            # it fetches anything. One that joined before it shows in the group.
            empty, offsets = await _group(admin, self.old, topic)
            lost = self._lost(offsets)
            if not empty or lost:
                await store.release_take_over(self.old, claim)
                why = lost or "has members again"
                if why != self._refusal:  # said once, not every poll
                    logger.warning("%s's group %s: not taking over", self.old, why)
                self._refusal = why
                return
            recorded = await store.record_take_over(self.old, claim, offsets)
        except BaseException:
            with contextlib.suppress(Exception):
                await store.release_take_over(self.old, claim)
            raise
        if recorded is not None and recorded.offsets is not None and recorded.by == own:
            self._hand_over(recorded)

    def _see(self, offsets: dict[int, int]) -> None:
        """The live group's committed offsets as read now: the bounds of what may be processed,
        and, the highest of each partition ever read, what a hand-over must start from."""
        self.bounds = offsets
        self.polled = True
        for partition, offset in offsets.items():
            self._seen[partition] = max(offset, self._seen.get(partition, 0))

    def _lost(self, offsets: dict[int, int]) -> str | None:
        """What is wrong with offsets to hand over from, if anything: partitions whose committed
        offsets are gone, or went back, since they were read (the group deleted, its offsets
        expired or reset), or none at all; a hand-over from them would emit again what the live
        deployment emitted."""
        if not offsets:
            return "has no committed offsets on the input topic"
        lost = sorted(p for p, at in self._seen.items() if offsets.get(p, -1) < at)
        return f"lost the committed offsets of partitions {lost}" if lost else None

    def _hand_over(self, recorded: HandOver) -> None:
        offsets = dict(recorded.offsets or {})
        self.processor.emit_from = EmitFrom(offsets, others=True)
        self.processor.shadow = None
        self.handed_over = recorded
        self.bounds = offsets
        logger.info(
            "took over from %s: emitting the predictions of model %s from its group's committed "
            "offsets %s",
            self.old,
            self.processor.model.version,
            {p: offsets[p] for p in sorted(offsets)},
        )

    def hold(
        self, fetched: dict[TopicPartition, list[Any]], consumer: AIOKafkaConsumer
    ) -> dict[TopicPartition, list[Any]]:
        """The fetched records the live deployment has emitted for; each partition's others are
        held: it is paused and will be read again from its first held record."""
        if self.handed_over is not None:
            return fetched
        kept: dict[TopicPartition, list[Any]] = {}
        for tp, records in fetched.items():
            bound = self.bounds.get(tp.partition, 0)
            n = next((i for i, r in enumerate(records) if r.offset >= bound), len(records))
            if n < len(records) and tp in consumer.assignment():
                consumer.seek(tp, records[n].offset)
                consumer.pause(tp)
                self._held[tp] = records[n].offset
            if n:
                kept[tp] = records[:n]
        return kept

    def release(self, consumer: AIOKafkaConsumer) -> None:
        """Resume the held partitions the live group's offsets have passed (all, once taken
        over)."""
        for tp, offset in list(self._held.items()):
            if self.handed_over is not None or offset < self.bounds.get(tp.partition, 0):
                del self._held[tp]
                if tp in consumer.assignment():
                    consumer.resume(tp)

    def forget(self, revoked: list[TopicPartition]) -> None:
        """Partitions another worker owns now (a reassigned partition starts unpaused)."""
        for tp in revoked:
            self._held.pop(tp, None)

    def observe(self, done: dict[TopicPartition, int]) -> None:
        """How far this worker's partitions are (the next offset of each) behind the live
        group's committed offsets; logs once when it has caught up."""
        if self.handed_over is not None:
            self.behind = 0
            return
        self.behind = sum(max(0, self.bounds.get(tp.partition, 0) - n) for tp, n in done.items())
        warm = self.polled and self.behind <= self.settings.max_batch
        if warm and not self.warm:
            logger.info(
                "warm: caught up with %s's committed offsets; stop its workers (SIGTERM) to hand "
                "the stream over",
                self.old,
            )
        self.warm = warm


class ShadowComparison:
    """A warming deployment's shadow: the predictions it holds back go to SHADOW_TOPIC, and each
    is compared with the live deployment's prediction of the same event, read from the output
    topic (from its end when the comparison starts: events the live deployment predicted before
    are not compared; nor are those of input partitions this worker does not own). A comparison
    never stops the worker: what it cannot read or send it leaves out, with a warning."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        assert settings.shadow_topic is not None
        self.topic = settings.shadow_topic
        self.settings = settings
        self.metrics = metrics
        self.compared = 0
        self.same_label = 0
        self.unreadable = 0  # messages that are no prediction of this input topic
        self._decode = _prediction_decoder(settings.prediction_format)
        self._ours: OrderedDict[tuple[int, int], _Compared] = OrderedDict()
        self._theirs: OrderedDict[tuple[int, int], _Compared] = OrderedDict()
        self._owned: Callable[[], Collection[int]] = frozenset
        self._consumer: AIOKafkaConsumer | None = None
        self._reading: asyncio.Task[None] | None = None

    async def start(self, owned: Callable[[], Collection[int]]) -> None:
        """Start reading the live predictions; ``owned``: the input partitions this worker owns
        now (the others' events it never predicts)."""
        self._owned = owned
        self._consumer = self.settings.kafka.consumer(
            self.settings.output_topic,
            group_id=None,
            auto_offset_reset="latest",
            enable_auto_commit=False,
        )
        await self._consumer.start()
        self._reading = asyncio.ensure_future(self._read(self._consumer))

    async def stop(self) -> None:
        reading, consumer = self._reading, self._consumer
        self._reading = self._consumer = None
        if reading is not None:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    def sent(self, predictions: Sequence[tuple[bytes | None, bytes]]) -> None:
        """Our predictions, acknowledged on the shadow topic."""
        self._match_all((value for _, value in predictions), self._ours, self._theirs)

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                fetched = await consumer.getmany(timeout_ms=1000, max_records=SHADOW_READ)
            except Exception as e:
                logger.warning("the shadow comparison could not read the output topic: %r", e)
                await asyncio.sleep(1.0)
                continue
            owned = self._owned()
            for records in fetched.values():
                values = (r.value for r in records)
                self._match_all(values, self._theirs, self._ours, owned)

    def _match_all(
        self,
        values: Iterable[bytes | None],
        mine: OrderedDict[tuple[int, int], _Compared],
        other: OrderedDict[tuple[int, int], _Compared],
        owned: Collection[int] | None = None,
    ) -> None:
        same = differ = 0
        for value in values:
            try:
                prediction = self._decode(value)  # a TypeError for a tombstone
                source = prediction.source
                if source.topic != self.settings.input_topic:
                    raise ValueError(f"a prediction of topic {source.topic!r}")
                if owned is not None and source.partition not in owned:
                    continue
                at = (source.partition, source.offset)
                output = _output(prediction)
                label = prediction.label if prediction.label is not None else int(output.argmax())
            except Exception as e:  # not a prediction of ours: the topic is not only ours
                self.unreadable += 1
                if self.unreadable == 1:
                    logger.warning("the shadow comparison left out a message: %r", e)
                continue
            counterpart = other.pop(at, None)
            if counterpart is None:
                mine[at] = _Compared(label, output)
                if len(mine) > SHADOW_PENDING:
                    mine.popitem(last=False)
                continue
            if label == counterpart.label:
                same += 1
            else:
                differ += 1
            if output.shape == counterpart.output.shape:
                difference = float(np.abs(output - counterpart.output).max())
                self.metrics.shadow_difference.observe(difference)
        self.compared += same + differ
        self.same_label += same
        if same:
            self.metrics.shadow_compared.labels("same_label").inc(same)
        if differ:
            self.metrics.shadow_compared.labels("other_label").inc(differ)


@dataclass(frozen=True, slots=True)
class _Compared:
    """What a comparison keeps of a prediction while the other side's has not come."""

    label: object  # the label, or the largest output's index for a model without labels
    output: npt.NDArray[np.float32]


def _prediction_decoder(prediction_format: Format) -> Callable[[Any], Any]:
    if prediction_format == "msgpack":
        return msgspec.msgpack.Decoder(fast_struct(Prediction, packed={"output"})).decode
    return msgspec.json.Decoder(fast_struct(Prediction)).decode


def _output(prediction: Any) -> npt.NDArray[np.float32]:
    output = prediction.output
    if isinstance(output, bytes):
        return np.frombuffer(output, PACKED).astype(np.float32)
    return np.asarray(output, dtype=np.float32)


async def check_take_over(settings: Settings, store: MemoryStore) -> None:
    """Before a take-over deployment starts: the app id it takes over was not taken over by
    another, and its consumer group has committed offsets on the input topic (else it names no
    live deployment, and taking over would emit the whole history again): ConfigError naming
    TAKES_OVER."""
    old = settings.takes_over
    if old is None:
        return
    recorded = await store.taken_over(old)
    if recorded is not None and recorded.by != settings.app_id:
        raise _taken_by_another(old, recorded)
    if recorded is not None and recorded.offsets is not None:
        return  # taken over already: this is a restart
    admin = settings.kafka.admin()
    try:
        await admin.start()
        empty, offsets = await _group(admin, old, settings.input_topic)
    except KafkaError as error:
        raise BrokerError(
            f"{env_name('takes_over')} / --takes-over: the broker at {settings.broker} did not "
            f"describe consumer group {old!r} ({error!r}); a take-over reads the live group's "
            "state and committed offsets (Apache Kafka answers; Tansu does not)"
        ) from error
    finally:
        await admin.close()
    if offsets and empty:
        logger.warning(
            "consumer group %r has no members: the stream is handed over at once, from its "
            "committed offsets; is %s the app id of the deployment serving now?",
            old,
            env_name("takes_over"),
        )
    if not offsets:
        raise ConfigError(
            f"{env_name('takes_over')} / --takes-over: consumer group {old!r} has committed no "
            f"offsets on {settings.input_topic!r}, so it is no live deployment of this stream "
            "(set the app id of the deployment to replace)"
        )


async def check_not_taken_over(store: MemoryStore, settings: Settings) -> None:
    """TakenOverError when another deployment took this app id's stream over: a worker of it
    must not emit again."""
    recorded = await store.taken_over()
    if recorded is not None and recorded.offsets is None:
        raise TakenOverError(
            f"app id {settings.app_id!r} is being taken over by the deployment {recorded.by!r} "
            f"({env_name('takes_over')}): its group was empty a moment ago. Start again to "
            f"serve (the claim expires within {CLAIM_TTL_S:.0f} s) unless the take-over "
            "completes meanwhile"
        )
    if recorded is not None:
        key = KeyLayout(settings.app_id, store.model_version).taken_over
        raise TakenOverError(
            f"app id {settings.app_id!r} was taken over by the deployment {recorded.by!r} "
            f"({env_name('takes_over')}), which emits its stream's predictions now: run this "
            f"model under another app id (or delete the Redis key {key!r} to serve as "
            f"{settings.app_id!r} again)"
        )


def _taken_by_another(old: str, recorded: HandOver) -> TakenOverError:
    return TakenOverError(
        f"{env_name('takes_over')} / --takes-over: {old!r} was taken over by the deployment "
        f"{recorded.by!r} already"
    )


async def _group(admin: AIOKafkaAdminClient, group: str, topic: str) -> tuple[bool, dict[int, int]]:
    """Whether the consumer group has no member, and its committed offsets on ``topic``."""
    (response,) = await admin.describe_consumer_groups([group])
    error_code, _, state = response.groups[0][:3]
    if error_code:
        raise for_code(error_code)(f"describing consumer group {group!r}")
    committed = await admin.list_consumer_group_offsets(group)
    offsets = {tp.partition: at.offset for tp, at in committed.items() if tp.topic == topic}
    return state in EMPTY_STATES, {p: o for p, o in offsets.items() if o >= 0}
