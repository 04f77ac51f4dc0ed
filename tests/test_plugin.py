"""The processing API (workers/plugin.py): the worker's guarantees in a caller's own loop, and
misuse refused before it can break them. In process, on each store backend."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import numpy as np
import orjson
import pytest
import torch
from torch import nn

from state import MemoryStore
from stream_lstm.exceptions import UsageError
from stream_lstm.memories import Memories
from stream_lstm.model import StreamModel
from tests.conftest import StoreBackend
from tests.offline import offline
from workers.batch import Record
from workers.plugin import Message, Processed, Processor

TOPIC = "events"
INPUT = 3


@pytest.fixture
def model() -> StreamModel:
    torch.manual_seed(11)
    return StreamModel.from_torch(nn.LSTM(INPUT, 4), nn.Linear(4, 2))


def store_of(backend: StoreBackend, model: StreamModel) -> MemoryStore:
    client = backend.client() if backend.fake_server is not None else None
    return MemoryStore(
        backend.url, backend.namespace, model.version, client=client, cache_entities=100
    )


def records(events: Sequence[tuple[str, int]], partition: int = 0) -> list[Record]:
    """(entity, offset) pairs as consumed records; features from the offset."""
    return [
        Record(
            TOPIC,
            partition,
            offset,
            entity.encode(),
            orjson.dumps({"entity_id": entity, "features": [offset / 10, -1.0, 0.5]}),
        )
        for entity, offset in events
    ]


def features(offset: int) -> list[float]:
    return [offset / 10, -1.0, 0.5]


def processor_of(model: StreamModel, store: MemoryStore, *partitions: int) -> Processor:
    processor = Processor(model, store, input_topic=TOPIC)
    processor.assign([(TOPIC, p) for p in partitions])
    return processor


async def no_late_letters(letters: list[Message]) -> None:
    raise AssertionError(f"no dead letter was expected at commit: {letters}")


async def deliver_and_commit(processor: Processor, processed: Processed) -> None:
    processed.delivered()
    await processor.commit(processed, no_late_letters)


async def test_the_callers_loop_gets_the_workers_predictions_and_memories(
    backend: StoreBackend, model: StreamModel
) -> None:
    events = [("a", 0), ("b", 1), ("a", 2), ("a", 3), ("b", 4), ("c", 5)]
    async with store_of(backend, model) as store:
        processor = processor_of(model, store, 0)
        sent = []
        for batch in (events[:2], events[2:5], events[5:]):
            processed = await processor.process(records(batch))
            assert processed.offsets == {(TOPIC, 0): batch[-1][1] + 1}
            sent += [orjson.loads(value) for _, value in processed.predictions]
            await deliver_and_commit(processor, processed)
        for entity in "abc":
            mine = [offset for e, offset in events if e == entity]
            want, stm, _ = offline(model, [(torch.tensor(features(o)), False) for o in mine])
            got = [p["output"] for p in sent if p["entity_id"] == entity]
            torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=0)
            stored = await store.get(entity)
            assert stored is not None
            assert int(stored.memories.step[0]) == len(mine)
            torch.testing.assert_close(
                torch.from_numpy(stored.memories.states[1][0]), stm, atol=1e-5, rtol=0
            )


async def test_a_batch_replayed_after_a_crash_gets_the_same_predictions_and_applies_once(
    backend: StoreBackend, model: StreamModel
) -> None:
    first = records([("a", 0), ("b", 1)])
    batch = records([("a", 2), ("b", 3), ("a", 4)])
    async with store_of(backend, model) as store:
        processor = processor_of(model, store, 0)
        await deliver_and_commit(processor, await processor.process(first))
        before_crash = await processor.process(batch)  # delivered, then the process dies
    async with store_of(backend, model) as store:  # a restart reads the batch again
        processor = processor_of(model, store, 0)
        replayed = await processor.process(batch)
        assert replayed.predictions == before_crash.predictions
        await deliver_and_commit(processor, replayed)
        again = await processor.process(batch)  # committed memories, offsets not: dropped
        assert again.predictions == []
        await deliver_and_commit(processor, again)
        stored = await store.get("a")
        assert stored is not None
        assert int(stored.memories.step[0]) == 3


async def test_misuse_is_refused_and_commits_nothing(
    backend: StoreBackend, model: StreamModel
) -> None:
    async with store_of(backend, model) as store:
        processor = Processor(model, store, input_topic=TOPIC)
        with pytest.raises(UsageError, match=r"events\[0\], which this consumer was not assigned"):
            await processor.process(records([("a", 0)]))
        processor.assign([(TOPIC, 0)])
        with pytest.raises(UsageError, match=r"events\[1\]"):
            await processor.process(records([("a", 0)], partition=1))
        processed = await processor.process(records([("a", 0)]))
        with pytest.raises(UsageError, match="only once the predictions and dead letters"):
            await processor.commit(processed, no_late_letters)
        assert await store.count() == 0
        with pytest.raises(UsageError, match="not committed"):
            await processor.process(records([("a", 1)]))
        with pytest.raises(UsageError, match=r"revoking events\[0\] while a batch in hand"):
            processor.revoke([(TOPIC, 0)])
        await deliver_and_commit(processor, processed)
        with pytest.raises(UsageError, match="committed already"):
            await processor.commit(processed, no_late_letters)
        dropped = await processor.process(records([("a", 1)]))
        processor.drop(dropped)
        dropped.delivered()
        with pytest.raises(UsageError, match="dropped"):
            await processor.commit(dropped, no_late_letters)
        stored = await store.get("a")
        assert stored is not None
        assert int(stored.memories.step[0]) == 1  # only the committed batch
        processor.revoke([(TOPIC, 0)])
        with pytest.raises(UsageError, match="not assigned"):
            await processor.process(records([("a", 2)]))


async def test_a_store_of_another_model_is_refused(
    backend: StoreBackend, model: StreamModel
) -> None:
    async with backend.store(model_version="another") as store:
        with pytest.raises(UsageError, match=r"model_version=model\.version"):
            Processor(model, store, input_topic=TOPIC)


async def test_a_partition_assigned_again_reads_what_its_owner_wrote_meanwhile(
    backend: StoreBackend, model: StreamModel
) -> None:
    async with store_of(backend, model) as mine, store_of(backend, model) as theirs:
        one, other = processor_of(model, mine, 0), Processor(model, theirs, input_topic=TOPIC)
        await deliver_and_commit(one, await one.process(records([("a", 0), ("a", 1)])))
        one.revoke([(TOPIC, 0)])  # the partition moves to the other consumer ...
        other.assign([(TOPIC, 0)])
        await deliver_and_commit(other, await other.process(records([("a", 2), ("a", 3)])))
        other.revoke([(TOPIC, 0)])
        one.assign([(TOPIC, 0)])  # ... and back: not from what this one cached
        processed = await one.process(records([("a", 4)]))
        assert [orjson.loads(v)["step"] for _, v in processed.predictions] == [5]


async def test_a_batch_the_processor_must_not_take_is_refused_whole(
    backend: StoreBackend, model: StreamModel
) -> None:
    async with store_of(backend, model) as store:
        processor = processor_of(model, store, 0, 1)
        other_topic = Record("other", 0, 5, b"a", records([("a", 5)])[0].value)
        with pytest.raises(UsageError, match="a record of topic 'other'"):
            await processor.process([*records([("a", 0)]), other_topic])
        with pytest.raises(UsageError, match=r"out of order or repeated \(offset 0 after 0\)"):
            await processor.process(records([("a", 0), ("a", 0)]))
        with pytest.raises(UsageError, match=r"offset 1 after 2"):
            await processor.process(records([("a", 2), ("a", 1)]))
        processed = await processor.process(
            itertools.chain(records([("a", 0)]), records([("b", 0)], partition=1))
        )  # any iterable: taken once, whole
        assert len(processed.predictions) == 2
        await deliver_and_commit(processor, processed)
        assert await store.count() == 2


async def test_a_second_batch_or_a_revocation_during_processing_is_refused(
    backend: StoreBackend, model: StreamModel
) -> None:
    async with store_of(backend, model) as store:
        processor = processor_of(model, store, 0, 1)
        first = asyncio.ensure_future(processor.process(records([("a", 0)])))
        await asyncio.sleep(0)  # it is loading the memories
        with pytest.raises(UsageError, match="another batch is being processed"):
            await processor.process(records([("a", 1)]))
        with pytest.raises(UsageError, match=r"revoking events\[0\] while a batch in hand"):
            processor.revoke([(TOPIC, 0)])
        processor.revoke([(TOPIC, 1)])  # a partition the batch does not hold
        await deliver_and_commit(processor, await first)
        stored = await store.get("a")
        assert stored is not None
        assert int(stored.memories.step[0]) == 1


async def test_dead_letters_found_at_commit_are_sent_before_their_fences_are_written(
    backend: StoreBackend,
) -> None:
    """An entity reset between process and commit has the batch's events applied again, on
    zeros; an event that overflows there is a dead letter, which must reach the broker before
    the memory that skips it is written: a crash in between would lose it."""
    torch.manual_seed(0)
    model = StreamModel.from_torch(nn.LSTM(2, 3), nn.Linear(3, 2))
    assert model.head is not None
    with torch.no_grad():
        for name, weight in model.lstm.named_parameters():
            weight.fill_(1.0 if name == "weight_ih_l0" else 0.0)  # huge inputs saturate gates
        model.head.weight.copy_(torch.tensor([[1e38, 1e38, 1e38], [0.0, 0.0, 0.0]]))
        model.head.bias.copy_(torch.tensor([2.5e38, 0.0]))  # overflows once sum(h) > 0.9
    model = StreamModel.from_torch(model.lstm, model.head)  # its version from these weights
    huge = Record(TOPIC, 0, 1, b"a", orjson.dumps({"entity_id": "a", "features": [3e38, 3e38]}))
    async with store_of(backend, model) as store:
        stored = Memories.zeros(["a"], model.shape)
        stored.states[0][:] = -10.0  # c = -10: h = tanh(c + 1) is about -1, the head finite
        stored.fence_partition[:], stored.fence_offset[:] = 0, 0
        await store.commit_many(stored)
        processor = processor_of(model, store, 0)
        processed = await processor.process([huge])
        assert len(processed.predictions) == 1  # finite from the stored memory
        await store.reset("a")  # c = 0 now: h = tanh(1) in each unit, and the head overflows
        processed.delivered()
        fences_when_sent: list[int] = []

        async def send(letters: list[Message]) -> None:
            (letter,) = (orjson.loads(value) for _, value in letters)
            assert letter["reason"] == "non_finite"
            before = await store.get("a")
            assert before is not None
            fences_when_sent.append(int(before.memories.fence_offset[0]))

        await processor.commit(processed, send)
        after = await store.get("a")
    assert fences_when_sent == [0]  # sent while the memory still stopped before the event
    assert after is not None
    assert int(after.memories.fence_offset[0]) == 1
    assert not np.any(after.memories.states[0])  # the reset holds; the event is skipped
