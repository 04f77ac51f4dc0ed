"""Another recurrent cell is a new model class, not edits in every layer.

A GRU keeps one state an entity where an LSTM keeps two. Declared here as a model class with
what a model declares (its states, one step, a packed run), it goes through the engine, the
store (value formats 3 and 4, read by the Lua scripts on a real server and a cluster), the cache
and the worker's batch processor unchanged, and its predictions and memories equal ``nn.GRU``
run offline on each entity's events.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import orjson
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from state import MemoryStore, codec
from stream_lstm.engine import Events, entity_rows, step, views
from stream_lstm.memories import RESETS, Memories, Shape
from stream_lstm.model import ModelConfig, StreamModel
from tests.conftest import StoreBackend
from workers.batch import BatchProcessor, Record

INPUT, HIDDEN, LAYERS = 3, 5, 2
TOL = 1e-5


class StreamGRU(StreamModel):
    """A stacked ``nn.GRU`` and a linear head: one state an entity, the hidden state h."""

    states = ("h",)

    @classmethod
    def from_gru(cls, gru: nn.GRU, head: nn.Linear) -> StreamGRU:
        config = ModelConfig(
            input_size=gru.input_size,
            hidden_size=gru.hidden_size,
            num_layers=gru.num_layers,
            bias=gru.bias,
            output_size=head.out_features,
            head_bias=True,
            activation="identity",
            labels=None,
        )
        return cls(config, gru, head)  # type: ignore[arg-type]  # the cell, whatever its kind

    def run_step(self, x: Tensor, states: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        (h,) = states  # (N, L, H)
        out, h_n = self.lstm(x.unsqueeze(0), h.transpose(0, 1).contiguous())
        return out[0], (h_n.transpose(0, 1),)

    def run_sequence(
        self, packed: PackedSequence, states: tuple[Tensor, ...]
    ) -> tuple[PackedSequence, tuple[Tensor, ...]]:
        (h,) = states  # (L, S, H)
        out, h_n = self.lstm(packed, h)
        return out, (h_n,)


@pytest.fixture
def gru() -> StreamGRU:
    torch.manual_seed(7)
    return StreamGRU.from_gru(nn.GRU(INPUT, HIDDEN, LAYERS), nn.Linear(HIDDEN, 2))


def offline(
    model: StreamGRU, features: Sequence[Tensor], resets: Sequence[bool]
) -> tuple[list[Tensor], Tensor]:
    """nn.GRU over one entity's events, one at a time: each output (O,), the final h (L, H)."""
    h = torch.zeros(LAYERS, 1, HIDDEN)
    outputs = []
    with torch.no_grad():
        for x, reset in zip(features, resets, strict=True):
            if reset:
                h = torch.zeros_like(h)
            top, h = model.lstm(x.view(1, 1, INPUT), h)
            outputs.append(model.readout(top[0])[0])
    return outputs, h[:, 0]


def test_the_gru_shape_names_one_state(gru: StreamGRU) -> None:
    assert gru.shape == Shape(1, LAYERS, HIDDEN)
    assert gru.version != StreamModel.from_torch(nn.LSTM(INPUT, HIDDEN, LAYERS)).version


@pytest.mark.parametrize("per_entity", [1, 4])
def test_the_engine_steps_a_gru_as_nn_gru_does(gru: StreamGRU, per_entity: int) -> None:
    rng = random.Random(per_entity)
    entity_ids = [f"e{rng.randrange(6)}" for _ in range(6 * per_entity)]
    if per_entity == 1:
        entity_ids = [f"e{n}" for n in range(6)]  # one event each: the single-step path
    features = torch.randn(len(entity_ids), INPUT)
    resets = torch.tensor([rng.random() < 0.2 for _ in entity_ids])
    ids, rows = entity_rows(entity_ids)
    result = step(gru, Events(rows, features, resets), *views(Memories.zeros(ids, gru.shape)))
    for row, entity_id in enumerate(ids):
        mine = [n for n, e in enumerate(entity_ids) if e == entity_id]
        outputs, h = offline(gru, [features[n] for n in mine], [bool(resets[n]) for n in mine])
        for n, want in zip(mine, outputs, strict=True):
            torch.testing.assert_close(result.output[n], want, atol=TOL, rtol=0)
        torch.testing.assert_close(result.states[0][row], h, atol=TOL, rtol=0)


def one_state(entity_ids: Sequence[str], offset: int, other: dict[int, dict[int, int]]) -> Memories:
    e = len(entity_ids)
    h = np.full((e, LAYERS, HIDDEN), offset, np.float32) + np.arange(HIDDEN, dtype=np.float32)
    return Memories(
        list(entity_ids),
        (h,),
        np.full(e, offset, np.int64),
        np.zeros(e, np.int64),
        np.full(e, offset, np.int64),
        other,
    )


async def test_one_state_memories_round_trip_through_the_stores_scripts(
    store: MemoryStore,
) -> None:
    shape = Shape(1, LAYERS, HIDDEN)
    sent = one_state(["a", "b"], 5, {1: {3: 9}})  # b has a fence on partition 3: format 4
    assert (await store.commit_many(sent)).applied.all()
    loaded = (await store.load_many(["a", "b", "c"], shape)).memories
    assert np.array_equal(loaded.states[0][:2], sent.states[0])
    assert loaded.fence_offset.tolist() == [5, 5, -1]
    assert loaded.other_fences == {1: {3: 9}}
    raw = store._backend.redis
    versions = [(await raw.get(store._backend.keys.memory(e)))[4] for e in "ab"]
    assert versions == [codec.FORMAT_STATES, codec.FORMAT_STATES_FENCES]

    assert (await store.commit_many(sent)).stale_ids == ["a", "b"]  # the script read the fences
    assert await store.reset("a")
    reset = await store.get("a")
    assert reset is not None
    assert not reset.memories.states[0].any()
    assert int(reset.memories.step[0]) == 0
    assert reset.memories.other_fences == {0: {RESETS: 1}}  # the fences kept, the reset counted
    # A commit made from the memory before the reset finds it moved (the script read the reset
    # count after the one state); made after it, it is written.
    assert (await store.commit_many(one_state(["a"], 6, {}))).moved_ids == ["a"]
    after = one_state(["a"], 6, {0: {RESETS: 1}})
    assert (await store.commit_many(after)).applied_ids == ["a"]
    again = await store.get("a")
    assert again is not None
    assert np.array_equal(again.memories.states[0], after.states[0])


async def test_a_worker_serves_a_gru_equal_to_nn_gru_offline(
    backend: StoreBackend, gru: StreamGRU
) -> None:
    client = backend.client() if backend.fake_server is not None else None
    store = MemoryStore(
        backend.url, backend.namespace, gru.version, client=client, cache_entities=100
    )
    sent: list[bytes] = []

    class Emitter:
        async def emit(self, topic: str, messages: Sequence[tuple[bytes | None, bytes]]) -> None:
            if topic == "out":
                sent.extend(value for _, value in messages)

    rng = random.Random(3)
    events = []
    for _offset in range(40):
        entity_id = f"e{rng.randrange(5)}"
        features = [rng.uniform(-2, 2) for _ in range(INPUT)]
        reset = rng.random() < 0.1
        events.append((entity_id, features, reset))
    async with store:
        processor = BatchProcessor(
            gru,
            store,
            Emitter(),
            output_topic="out",
            dead_letter_topic="dead",
            max_event_bytes=4096,
        )
        for start in range(0, len(events), 7):  # batches of several events an entity
            records = [
                Record(
                    "events",
                    0,
                    offset,
                    entity_id.encode(),
                    orjson.dumps({"entity_id": entity_id, "features": features, "reset": reset}),
                )
                for offset, (entity_id, features, reset) in enumerate(events)
                if start <= offset < start + 7
            ]
            await processor.process(records)
        predictions = [orjson.loads(value) for value in sent]
        assert len(predictions) == len(events)
        for entity_id in sorted({e for e, _, _ in events}):
            mine = [n for n, (e, _, _) in enumerate(events) if e == entity_id]
            outputs, h = offline(
                gru,
                [torch.tensor(events[n][1]) for n in mine],
                [events[n][2] for n in mine],
            )
            got = [p["output"] for p in predictions if p["entity_id"] == entity_id]
            torch.testing.assert_close(torch.tensor(got), torch.stack(outputs), atol=TOL, rtol=0)
            stored = await store.get(entity_id)
            assert stored is not None
            torch.testing.assert_close(
                torch.from_numpy(stored.memories.states[0][0]), h, atol=TOL, rtol=0
            )
            assert int(stored.memories.fence_offset[0]) == mine[-1]
