"""A model upgrade by take-over, with real processes: the live deployment serves, a new model's
deployment warms on the whole history without emitting, the live one stops, and from there on
the new one emits. Every event is predicted by exactly one model version, the new one's equal
to offline ``nn.LSTM`` of the new model on each entity's full history."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
import torch
from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata

from state import HandOver, MemoryStore
from stream_lstm.exceptions import ConfigError
from stream_lstm.model import StreamModel
from tests.conftest import StoreBackend
from tests.offline import offline
from tests.stack import History, StreamSlice, random_stream, save_model
from workers.batch import BatchProcessor, EmitFrom
from workers.dev.apache_kafka import ApacheKafka
from workers.dev.redis_server import RedisServer
from workers.dev.stack import WorkerProcess
from workers.dev.tansu import TansuBroker
from workers.metrics import Metrics
from workers.settings import Settings
from workers.takeover import ShadowComparison, TakeOver

ENTITIES = [f"user-{i}" for i in range(12)]


async def everything(stack: StreamSlice, topic: str, quiet_s: float = 3.0) -> list[dict[str, Any]]:
    """Every message of the topic, read until none has come for ``quiet_s``."""
    consumer = stack.connection.consumer(
        topic, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    found: list[dict[str, Any]] = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < quiet_s:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                found.extend(orjson.loads(r.value) for r in records)
                last = time.monotonic()
    finally:
        await consumer.stop()
    return found


def wait_for_state(worker: WorkerProcess, state: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """The take-over section of the worker's /health once it says ``state``."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, health = worker.http("GET", "/health")
        if health.get("take_over", {}).get("state") == state:
            return dict(health["take_over"])
        assert time.monotonic() < deadline, f"never {state}: {health}\n{worker.log_tail()}"
        time.sleep(0.2)


def extend(history: History, more: History) -> None:
    for entity_id, events in more.items():
        history.setdefault(entity_id, []).extend(events)


def source(prediction: dict[str, Any]) -> tuple[int, int]:
    return prediction["source"]["partition"], prediction["source"]["offset"]


def check_versions(
    predictions: list[dict[str, Any]],
    history: History,
    old: StreamModel,
    new: StreamModel,
    hand_over: dict[int, int],
) -> int:
    """Each event has the new model's prediction from the hand-over offsets on, and the old
    one's before them, each equal to its model offline on the entity's whole history; no version
    predicts an event twice. Returns how many events after the hand-over the old model predicted
    as well (a live worker killed after emitting them, before committing their offsets)."""
    sources: dict[str, set[tuple[int, int]]] = {}
    for p in predictions:
        sources.setdefault(p["entity_id"], set()).add(source(p))
    assert sorted(sources) == sorted(history)
    wants = {}
    for entity_id, events in history.items():
        assert len(sources[entity_id]) == len(events), f"{entity_id}: an event never predicted"
        tensors = [(torch.tensor(x, dtype=torch.float32), reset) for x, reset in events]
        wants[entity_id] = {
            old.version: offline(old, tensors)[0],
            new.version: offline(new, tensors)[0],
        }
    index = {e: {s: k for k, s in enumerate(sorted(found))} for e, found in sources.items()}
    seen: set[tuple[str, int, int]] = set()
    twice = 0
    for p in predictions:
        entity_id, version = p["entity_id"], p["model_version"]
        partition, offset = p["source"]["partition"], p["source"]["offset"]
        assert (version, partition, offset) not in seen, f"predicted twice by one version: {p}"
        seen.add((version, partition, offset))
        handed = offset >= hand_over.get(partition, 0)
        twice += handed and version == old.version
        k = index[entity_id][partition, offset]
        torch.testing.assert_close(
            torch.tensor(p["output"]), wants[entity_id][version][k], atol=1e-4, rtol=0
        )
    for entity_id, found in sources.items():
        for partition, offset in found:
            handed = offset >= hand_over.get(partition, 0)
            version = (new if handed else old).version
            assert (version, partition, offset) in seen, f"{entity_id}@{offset}: no {version}"
    return twice


def offline_by_source(
    predictions: list[dict[str, Any]], history: History, model: StreamModel
) -> dict[tuple[int, int], torch.Tensor]:
    """The model's offline output for each event the predictions name, by (partition, offset)."""
    sources: dict[str, set[tuple[int, int]]] = {}
    for p in predictions:
        sources.setdefault(p["entity_id"], set()).add(source(p))
    found = {}
    for entity_id, events in history.items():
        tensors = [(torch.tensor(x, dtype=torch.float32), reset) for x, reset in events]
        want = offline(model, tensors)[0]
        found |= {source: want[k] for k, source in enumerate(sorted(sources[entity_id]))}
    return found


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"takes_over": "live", "app_id": "live"}, "names this deployment's own"),
        ({"shadow_topic": "shadow"}, "STREAM_LSTM_SHADOW_TOPIC / --shadow-topic needs"),
        ({"takes_over": "live", "shadow_topic": "stream-lstm-predictions"}, "a topic of its own"),
    ],
)
def test_a_take_over_setting_that_cannot_work_stops_the_start(
    settings: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        Settings.load(**settings)


async def test_one_worker_claims_the_take_over_and_only_its_claim_records_the_offsets(
    backend: StoreBackend,
) -> None:
    old, new, other = (f"{backend.namespace}-{name}" for name in ("old", "new", "other"))
    async with (
        backend.store(namespace=old) as live,
        backend.store("v2", namespace=new) as taking,
        backend.store("v3", namespace=other) as late,
    ):
        assert await live.taken_over() is None
        mine = await taking.claim_take_over(old, "w1", 30)
        assert mine == HandOver(new, claim="w1")
        assert await taking.claim_take_over(old, "w2", 30) == mine  # another worker's: waits
        assert await late.claim_take_over(old, "w3", 30) == mine
        assert await live.taken_over() == mine  # old workers refuse a claim too
        assert await late.record_take_over(old, HandOver(other, claim="w3"), {0: 1}) == mine

        await taking.release_take_over(old, mine)  # the group had a member again
        assert await live.taken_over() is None
        assert await taking.record_take_over(old, mine, {0: 5}) is None  # released: not written
        mine = await taking.claim_take_over(old, "w2", 30)
        recorded = await taking.record_take_over(old, mine, {0: 5, 3: 0})
        assert recorded == HandOver(new, {0: 5, 3: 0})
        assert await taking.record_take_over(old, mine, {0: 9}) == recorded  # once
        await taking.release_take_over(old, mine)
        assert await late.claim_take_over(old, "w3", 30) == recorded
        assert await live.taken_over() == recorded
        assert await late.taken_over(old) == recorded
        assert await taking.taken_over() is None


async def test_a_claim_expires_when_its_worker_dies(backend: StoreBackend) -> None:
    old = f"{backend.namespace}-old"
    async with backend.store(namespace=old) as live, backend.store("v2") as taking:
        await taking.claim_take_over(old, "w1", 0.05)
        await asyncio.sleep(0.3)
        assert await live.taken_over() is None


async def test_a_new_model_takes_over_with_warm_memories_and_no_gap_or_duplicate(
    apache_kafka: ApacheKafka, redis_server: RedisServer, tmp_path: Path
) -> None:
    old_model = save_model(tmp_path / "old.pt", seed=1)
    new_model = save_model(tmp_path / "new.pt", seed=2, hidden=12)
    stack = StreamSlice(apache_kafka, redis_server, old_model, tmp_path)
    new_app = f"{stack.name}-v2"
    rng = random.Random(18)
    history: History = {}
    try:
        live = stack.start_worker(session_timeout_s="10")
        first, more = random_stream(rng, ENTITIES, 8)
        extend(history, more)
        await stack.publish([*first, (b"user-0", b"{not json")])
        before = {source(p) for p in await stack.predictions(len(first))}

        # The new deployment warms on the history while events keep coming to the live one.
        shadow_topic = f"{stack.name}-shadow"
        warming = stack.start_worker(
            app_id=new_app, model=str(new_model), takes_over=stack.name, shadow_topic=shadow_topic
        )
        second, more = random_stream(rng, ENTITIES, 8)
        extend(history, more)
        await stack.publish(second)
        warm = await asyncio.to_thread(wait_for_state, warming, "warm")
        assert warm["from"] == stack.name
        assert warming.metric("stream_lstm_warming") == 1
        # Its shadow: each event of the second part compared with the live model's prediction.
        deadline = time.monotonic() + 30
        while (shadow := warming.http("GET", "/health")[1]["take_over"]["shadow"])[
            "compared"
        ] < len(second):
            assert time.monotonic() < deadline, shadow
            await asyncio.sleep(0.2)
        assert shadow["compared"] == len(second)
        live_labels = {
            source(p): p["label"]
            for p in await everything(stack, stack.env["STREAM_LSTM_OUTPUT_TOPIC"], 1.0)
            if source(p) not in before
        }
        shadow_labels = {source(p): p["label"] for p in await everything(stack, shadow_topic, 1.0)}
        assert len(live_labels) == len(second)
        agree = sum(label == shadow_labels[at] for at, label in live_labels.items())
        assert shadow["same_label"] == agree

        # Events the live deployment never gets to, while the new one would: they must wait for
        # the hand-over (the live one frozen for less than its session timeout, then stopped).
        live.process.send_signal(signal.SIGSTOP)
        late, more = random_stream(rng, ENTITIES, 2)
        extend(history, more)
        await stack.publish(late)
        await asyncio.sleep(1.5)
        live.process.send_signal(signal.SIGTERM)
        live.process.send_signal(signal.SIGCONT)
        assert live.stop() == 0  # SIGTERM: the live deployment finishes its batch and leaves
        await asyncio.to_thread(wait_for_state, warming, "emitting")
        assert warming.metric("stream_lstm_warming") == 0
        third, more = random_stream(rng, ENTITIES, 8)
        extend(history, more)
        await stack.publish([*third, (b"user-1", b"[]")])
        await stack.predictions(len(first) + len(second) + len(late) + len(third))

        async with MemoryStore(redis_server.url, new_app, "any") as store:
            recorded = await store.taken_over(stack.name)
        assert recorded is not None
        assert recorded.by == new_app
        assert recorded.offsets is not None
        predictions = await everything(stack, stack.env["STREAM_LSTM_OUTPUT_TOPIC"])
        sources = [source(p) for p in predictions]
        assert len(sources) == len(set(sources)), "an event predicted twice"
        models = StreamModel.load(old_model), StreamModel.load(new_model)
        assert check_versions(predictions, history, *models, dict(recorded.offsets)) == 0
        assert {p["model_version"] for p in predictions} == {m.version for m in models}
        # The shadow topic: the new model's prediction of each event the old one predicted.
        shadowed = await everything(stack, shadow_topic, 1.0)
        handed = {s: o for s, o in recorded.offsets.items()}
        old_sources = {source(p) for p in predictions if p["model_version"] == models[0].version}
        assert sorted(source(p) for p in shadowed) == sorted(old_sources)
        assert all(
            p["source"]["offset"] < handed.get(p["source"]["partition"], 0) for p in shadowed
        )
        wants = offline_by_source(predictions, history, models[1])
        for p in shadowed:
            assert p["model_version"] == models[1].version
            want = wants[source(p)]
            torch.testing.assert_close(torch.tensor(p["output"]), want, atol=1e-4, rtol=0)
        letters = await everything(stack, stack.env["STREAM_LSTM_DEAD_LETTER_TOPIC"], 1.0)
        assert sorted(letter["payload"] for letter in letters) == ["[]", "{not json"]

        # The old deployment started again refuses: its stream is the new one's now.
        again = WorkerProcess(stack.env, tmp_path / "again.log").start()
        assert again.process.wait(timeout=60) == 2
        assert f"was taken over by the deployment '{new_app}'" in again.log_tail()
    finally:
        stack.stop_all()


async def test_a_take_over_of_no_live_deployment_stops_the_start(
    apache_kafka: ApacheKafka, redis_server: RedisServer, tmp_path: Path
) -> None:
    stack = StreamSlice(apache_kafka, redis_server, save_model(tmp_path / "m.pt", seed=1), tmp_path)
    result = stack.cli("worker", "--app-id", f"{stack.name}-v2", "--takes-over", "no-such-app")
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("stream-lstm: error: STREAM_LSTM_TAKES_OVER / --takes-over:"), last
    assert "consumer group 'no-such-app' has committed no offsets" in last


async def test_a_live_deployment_killed_is_taken_over_once_its_session_times_out(
    apache_kafka: ApacheKafka, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Killed, not stopped: the live worker may have emitted predictions after its last offset
    commit. The new deployment takes over when the group's session times out, from the committed
    offsets: those events get the new model's predictions as well, and none is lost."""
    old_model = save_model(tmp_path / "old.pt", seed=3)
    new_model = save_model(tmp_path / "new.pt", seed=4)
    stack = StreamSlice(apache_kafka, redis_server, old_model, tmp_path)
    new_app = f"{stack.name}-v2"
    rng = random.Random(19)
    history: History = {}
    try:
        live = stack.start_worker()
        first, more = random_stream(rng, ENTITIES, 6)
        extend(history, more)
        await stack.publish(first)
        await stack.predictions(len(first))
        warming = stack.start_worker(app_id=new_app, model=str(new_model), takes_over=stack.name)
        await asyncio.to_thread(wait_for_state, warming, "warm")

        second, more = random_stream(rng, ENTITIES, 20)
        extend(history, more)
        publishing = asyncio.ensure_future(stack.publish(second))
        await stack.predictions(len(first) + len(second) // 3)
        live.stop(signal.SIGKILL)  # mid-stream
        await publishing
        await asyncio.to_thread(wait_for_state, warming, "emitting")
        await stack.predictions(len(first) + len(second))

        async with MemoryStore(redis_server.url, new_app, "any") as store:
            recorded = await store.taken_over(stack.name)
        assert recorded is not None
        assert recorded.offsets is not None
        predictions = await everything(stack, stack.env["STREAM_LSTM_OUTPUT_TOPIC"])
        models = StreamModel.load(old_model), StreamModel.load(new_model)
        twice = check_versions(predictions, history, *models, dict(recorded.offsets))
        # Both predicted only events the live worker emitted after its last offset commit: of
        # the second part (the first was committed before the new deployment was warm).
        assert twice <= len(second)
    finally:
        stack.stop_all()


async def test_a_take_over_needs_a_broker_that_describes_groups(
    tansu_broker: TansuBroker, redis_server: RedisServer, tmp_path: Path
) -> None:
    stack = StreamSlice(tansu_broker, redis_server, save_model(tmp_path / "m.pt", seed=1), tmp_path)
    result = stack.cli("worker", "--app-id", f"{stack.name}-v2", "--takes-over", stack.name)
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("stream-lstm: error: STREAM_LSTM_TAKES_OVER / --takes-over:"), last
    assert "Tansu does not" in last


# --- the hand-over's decisions, in one process: a live group whose answers the test scripts ---


class ScriptedGroup:
    """An admin client whose live group answers, describe by describe, as scripted: a state and
    its committed offsets, or an error."""

    def __init__(self, topic: str, *answers: tuple[str, dict[int, int]] | Exception) -> None:
        self.topic = topic
        self.answers = list(answers)
        self.offsets: dict[int, int] = {}

    async def describe_consumer_groups(self, groups: list[str]) -> list[Any]:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        state, self.offsets = answer
        return [SimpleNamespace(groups=[(0, groups[0], state, "consumer", "", [])])]

    async def list_consumer_group_offsets(self, group: str) -> dict[TopicPartition, Any]:
        return {
            TopicPartition(self.topic, p): OffsetAndMetadata(o, "") for p, o in self.offsets.items()
        }


class Silent:
    async def emit(self, topic: str, messages: Sequence[tuple[bytes | None, bytes]]) -> None:
        pass


@pytest.fixture
async def taking_over(
    backend: StoreBackend, tmp_path: Path
) -> AsyncIterator[Callable[..., TakeOver]]:
    stores: list[MemoryStore] = []

    def make(*answers: tuple[str, dict[int, int]] | Exception) -> TakeOver:
        settings = Settings.load(app_id="new", takes_over=f"{backend.namespace}-live")
        model = StreamModel.load(save_model(tmp_path / "m.pt", seed=1))
        store = backend.store(model.version, namespace="new")
        stores.append(store)
        processor = BatchProcessor(
            model,
            store,
            Silent(),
            output_topic="out",
            dead_letter_topic="dead",
            max_event_bytes=1024,
        )
        take_over = TakeOver(settings, processor, Metrics())
        take_over._admin = cast(Any, ScriptedGroup(settings.input_topic, *answers))
        return take_over

    yield make
    for store in stores:
        await store.aclose()


async def test_a_hand_over_starts_from_the_offsets_the_empty_group_committed(
    taking_over: Callable[..., TakeOver],
) -> None:
    take_over = taking_over(("Stable", {0: 10}), ("Empty", {0: 12, 1: 3}), ("Empty", {0: 12, 1: 3}))
    await take_over.poll()
    assert take_over.state == "warming"
    assert take_over.bounds == {0: 10}
    await take_over.poll()
    assert take_over.state == "emitting"
    assert take_over.processor.emit_from == EmitFrom({0: 12, 1: 3}, others=True)
    recorded = await take_over.processor.store.taken_over(take_over.old)
    assert recorded == HandOver("new", {0: 12, 1: 3})


@pytest.mark.parametrize(
    "second",
    [
        ("Stable", {0: 12}),  # a live worker joined between the two looks
        ("Dead", {}),  # the group deleted: its offsets are gone
        ("Empty", {0: 9}),  # offsets reset below what was read before
        RuntimeError("the broker went away"),
    ],
    ids=["members-again", "offsets-gone", "offsets-back", "error"],
)
async def test_a_group_that_is_not_empty_or_lost_its_offsets_is_not_taken_over(
    taking_over: Callable[..., TakeOver], second: tuple[str, dict[int, int]] | Exception
) -> None:
    take_over = taking_over(("Stable", {0: 10}), ("Empty", {0: 12}), second)
    await take_over.poll()
    await take_over.poll()
    assert take_over.state != "emitting"
    assert take_over.processor.emit_from == EmitFrom()  # still sends nothing
    # The claim is gone: the live deployment's workers can rejoin and serve.
    assert await take_over.processor.store.taken_over(take_over.old) is None
    assert (take_over.error is not None) == isinstance(second, Exception)


async def test_the_shadow_compares_what_it_can_read_and_leaves_out_the_rest(
    tmp_path: Path,
) -> None:
    settings = Settings.load(takes_over="live", shadow_topic="shadow")
    shadow = ShadowComparison(settings, Metrics())
    shadow._owned = lambda: {0, 1}

    def prediction(partition: int, offset: int, label: str, output: list[float]) -> bytes:
        source = {"topic": settings.input_topic, "partition": partition, "offset": offset}
        return orjson.dumps(
            {
                "entity_id": "a",
                "event_id": None,
                "step": 1,
                "output": output,
                "label": label,
                "model_version": "v",
                "source": source,
            }
        )

    live = [
        prediction(0, 1, "cat", [0.9, 0.1]),
        prediction(1, 1, "dog", [0.2, 0.8]),
        prediction(2, 1, "cat", [0.9, 0.1]),  # another worker's partition
        None,  # a tombstone
        b"not a prediction",
    ]
    shadow._match_all(live, shadow._theirs, shadow._ours, shadow._owned())
    shadow.sent(
        [(b"a", prediction(0, 1, "cat", [0.7, 0.3])), (b"a", prediction(1, 1, "cat", [0.6, 0.4]))]
    )
    assert (shadow.compared, shadow.same_label, shadow.unreadable) == (2, 1, 2)
    assert not shadow._theirs
    assert not shadow._ours
