"""The batched step equals torch.nn.LSTM on each entity's own history, however events arrive."""

from __future__ import annotations

import itertools
import random
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from stream_lstm.engine import Events, States, entity_rows, step, views
from stream_lstm.exceptions import ModelError
from stream_lstm.memories import Memories, Shape
from stream_lstm.model import StreamModel, by_cells, by_sequence
from tests.offline import offline

TOL = 1e-5


class Stored(NamedTuple):
    """One entity's memory between batches: LTM and STM (L, H), and its step."""

    ltm: Tensor
    stm: Tensor
    step: Tensor


def zeros(entities: int, layers: int, hidden: int) -> tuple[States, Tensor]:
    """Zero states and steps of E entities, as the worker passes them: views of a Memories."""
    ids = [f"entity-{k}" for k in range(entities)]
    return views(Memories.zeros(ids, Shape(2, layers, hidden)))


def run_stream(
    model: StreamModel, stream: list[tuple[str, Tensor, bool]], cuts: list[int]
) -> tuple[dict[str, list[Tensor]], dict[str, list[int]], dict[str, Stored]]:
    """Feed the stream batch by batch, carrying memories between batches as a store would."""
    stored: dict[str, Stored] = {}
    outputs: dict[str, list[Tensor]] = {}
    steps: dict[str, list[int]] = {}
    bounds = [0, *sorted(cuts), len(stream)]
    for lo, hi in itertools.pairwise(bounds):
        batch = stream[lo:hi]
        ids, rows = entity_rows([entity for entity, _, _ in batch])
        memory = Memories.zeros(ids, model.shape)
        (ltm, stm), steps_in = views(memory)
        for row, entity in enumerate(ids):
            if entity in stored:
                ltm[row], stm[row] = stored[entity].ltm, stored[entity].stm
                steps_in[row] = stored[entity].step
        features = (
            torch.stack([x for _, x, _ in batch]) if batch else torch.empty(0, model.input_size)
        )
        reset = torch.tensor([r for _, _, r in batch], dtype=torch.bool)
        result = step(model, Events(rows, features, reset), *views(memory))
        for n, (entity, _, _) in enumerate(batch):
            outputs.setdefault(entity, []).append(result.output[n])
            steps.setdefault(entity, []).append(int(result.step[n]))
        for row, entity in enumerate(ids):
            new_ltm, new_stm = result.states
            stored[entity] = Stored(new_ltm[row], new_stm[row], result.steps[row])
    return outputs, steps, stored


def random_model(rng: random.Random, layers: int, bias: bool, head: bool) -> StreamModel:
    torch.manual_seed(rng.randrange(2**31))
    inputs, hidden = rng.randint(1, 8), rng.randint(1, 12)
    lstm = nn.LSTM(inputs, hidden, layers, bias=bias, batch_first=rng.random() < 0.5)
    if not head:
        return StreamModel.from_torch(lstm)
    outputs = rng.randint(2, 5)
    labels = [f"label-{k}" for k in range(outputs)]
    return StreamModel.from_torch(lstm, nn.Linear(hidden, outputs), labels=labels)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    layers=st.integers(1, 3),
    bias=st.booleans(),
    head=st.booleans(),
    reset_rate=st.sampled_from([0.0, 0.1]),
    batches=st.integers(1, 12),
)
def test_batched_step_equals_nn_lstm_on_each_entity(
    seed: int, layers: int, bias: bool, head: bool, reset_rate: float, batches: int
) -> None:
    rng = random.Random(seed)
    model = random_model(rng, layers, bias, head)
    entities = [f"entity-{k}" for k in range(rng.randint(50, 70))]
    history: dict[str, list[tuple[Tensor, bool]]] = {e: [] for e in entities}
    stream = []
    for entity in entities:
        for k in range(rng.randint(1, 6)):
            event = (torch.randn(model.input_size), k > 0 and rng.random() < reset_rate)
            history[entity].append(event)
    queues = {e: list(h) for e, h in history.items()}
    while queues:  # interleave entities at random, each keeping its own order
        entity = rng.choice(sorted(queues))
        x, reset = queues[entity].pop(0)
        stream.append((entity, x, reset))
        if not queues[entity]:
            del queues[entity]
    cuts = [rng.randint(0, len(stream)) for _ in range(batches - 1)]

    outputs, steps, stored = run_stream(model, stream, cuts)

    for entity, events in history.items():
        want_out, want_h, want_c = offline(model, events)
        torch.testing.assert_close(torch.stack(outputs[entity]), want_out, atol=TOL, rtol=0)
        torch.testing.assert_close(stored[entity].stm, want_h, atol=TOL, rtol=0)
        torch.testing.assert_close(stored[entity].ltm, want_c, atol=TOL, rtol=0)
        since_reset, expected = 0, []
        for _, reset in events:
            since_reset = 1 if reset else since_reset + 1
            expected.append(since_reset)
        assert steps[entity] == expected


def test_reset_mid_sequence_starts_like_a_fresh_sequence() -> None:
    torch.manual_seed(1)
    model = StreamModel.from_torch(nn.LSTM(4, 6, 2))
    xs = torch.randn(5, 4)
    reset = torch.tensor([False, False, False, True, False])
    continued = step(model, Events(torch.zeros(5, dtype=torch.int64), xs, reset), *zeros(1, 2, 6))
    fresh = step(
        model,
        Events(torch.zeros(2, dtype=torch.int64), xs[3:], torch.zeros(2, dtype=torch.bool)),
        *zeros(1, 2, 6),
    )
    torch.testing.assert_close(continued.output[3:], fresh.output, atol=TOL, rtol=0)
    torch.testing.assert_close(continued.states[0], fresh.states[0], atol=TOL, rtol=0)
    assert continued.step.tolist() == [1, 2, 3, 1, 2]
    assert not torch.allclose(continued.output[:2], fresh.output, atol=TOL)


def test_reset_ignores_stored_memory_and_step() -> None:
    torch.manual_seed(2)
    model = StreamModel.from_torch(nn.LSTM(3, 4))
    stored = (torch.randn(1, 1, 4), torch.randn(1, 1, 4)), torch.tensor([41])
    x = torch.randn(1, 3)
    one = torch.zeros(1, dtype=torch.int64)
    with_reset = step(model, Events(one, x, torch.tensor([True])), *stored)
    from_zero = step(model, Events(one, x, torch.tensor([False])), *zeros(1, 1, 4))
    continued = step(model, Events(one, x, torch.tensor([False])), *stored)
    torch.testing.assert_close(with_reset.output, from_zero.output)
    assert with_reset.step.tolist() == [1]
    assert continued.step.tolist() == [42]
    assert not torch.allclose(continued.output, from_zero.output)


@pytest.mark.parametrize(("layers", "bias"), [(1, True), (2, True), (3, False)])
def test_one_event_per_entity_equals_nn_lstm_from_each_stored_memory(
    layers: int, bias: bool
) -> None:
    torch.manual_seed(layers)
    lstm = nn.LSTM(3, 5, layers, bias=bias)
    model = StreamModel.from_torch(lstm, nn.Linear(5, 2), labels=["a", "b"])
    n = 40
    ltm, stm = torch.randn(n, layers, 5), torch.randn(n, layers, 5)
    x, reset = torch.randn(n, 3), torch.rand(n) < 0.3
    result = step(model, Events(torch.arange(n), x, reset), (ltm, stm), torch.arange(n))
    new_ltm, new_stm = result.states
    for k in range(n):
        keep = 0.0 if reset[k] else 1.0
        h0 = (stm[k] * keep).unsqueeze(1)  # (L, 1, H)
        c0 = (ltm[k] * keep).unsqueeze(1)
        with torch.no_grad():
            y, (h_n, c_n) = model.lstm(x[k].view(1, 1, 3), (h0, c0))
        torch.testing.assert_close(result.output[k], model.readout(y[0, 0]), atol=TOL, rtol=0)
        torch.testing.assert_close(new_stm[k], h_n[:, 0], atol=TOL, rtol=0)
        torch.testing.assert_close(new_ltm[k], c_n[:, 0], atol=TOL, rtol=0)
        assert int(result.step[k]) == (1 if reset[k] else k + 1)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("reset", [False, True])
def test_a_step_leaves_the_callers_memories_as_they_were(layers: int, reset: bool) -> None:
    """The memories go in uncopied when no event resets: neither the step nor anything done with
    its result may change the caller's (a worker's loaded memories, its cache's, an overlay's)."""
    model = StreamModel.from_torch(nn.LSTM(3, 5, layers))
    states, steps = (torch.randn(4, layers, 5), torch.randn(4, layers, 5)), torch.arange(4)
    before = [state.clone() for state in states], steps.clone()
    events = Events(torch.arange(4), torch.randn(4, 3), torch.tensor([reset, False, False, False]))
    result = step(model, events, states, steps)
    for new in (*result.states, result.steps):
        new.numpy()[...] += 1  # what a caller may do with its result (the worker uses numpy)
    for state, old in zip(states, before[0], strict=True):
        assert torch.equal(state, old)
    assert torch.equal(steps, before[1])


@pytest.mark.parametrize(("layers", "bias"), [(1, True), (3, False)])
def test_the_gpu_step_by_cells_equals_the_cpu_step_by_sequence(layers: int, bias: bool) -> None:
    torch.manual_seed(layers)
    lstm = nn.LSTM(3, 5, layers, bias=bias)
    x, stm, ltm = torch.randn(40, 3), torch.randn(40, layers, 5), torch.randn(40, layers, 5)
    with torch.no_grad():
        for cells, sequence in zip(
            by_cells(lstm, x, stm, ltm), by_sequence(lstm, x, stm, ltm), strict=True
        ):
            torch.testing.assert_close(cells, sequence, atol=TOL, rtol=0)


def test_entities_without_events_keep_their_memory() -> None:
    model = StreamModel.from_torch(nn.LSTM(2, 3))
    states, steps = (torch.randn(3, 1, 3), torch.randn(3, 1, 3)), torch.tensor([5, 6, 7])
    result = step(
        model, Events(torch.tensor([1]), torch.randn(1, 2), torch.tensor([False])), states, steps
    )
    for row in (0, 2):
        assert torch.equal(result.states[0][row], states[0][row])
        assert torch.equal(result.states[1][row], states[1][row])
    assert result.steps.tolist() == [5, 7, 7]


def test_empty_batch_changes_nothing() -> None:
    model = StreamModel.from_torch(nn.LSTM(2, 3))
    states, steps = zeros(0, 1, 3)
    empty = Events(
        torch.empty(0, dtype=torch.int64), torch.empty(0, 2), torch.empty(0, dtype=torch.bool)
    )
    result = step(model, empty, states, steps)
    assert result.output.shape == (0, 3)
    assert result.states is states
    assert result.steps is steps


def test_entity_rows_keeps_first_seen_order() -> None:
    ids, rows = entity_rows(["b", "a", "b", "c", "a"])
    assert ids == ["b", "a", "c"]
    assert rows.tolist() == [0, 1, 0, 2, 1]


@pytest.mark.parametrize(
    ("features", "memory", "message"),
    [
        (torch.randn(2, 5), zeros(1, 1, 3), "the model takes"),
        (torch.randn(2, 2), zeros(1, 2, 3), "the model has"),
        (torch.randn(2, 2), zeros(1, 1, 4), "the model has"),
        (torch.randn(2, 2), ((torch.zeros(1, 1, 3),), torch.zeros(1, dtype=torch.int64)), "keeps"),
        (torch.randn(2, 2), (zeros(1, 1, 3)[0], torch.zeros(2, dtype=torch.int64)), "for 2 ent"),
        (torch.randn(2, 2), (zeros(1, 1, 3)[0], torch.zeros(1, 1, dtype=torch.int64)), "steps of"),
    ],
)
def test_misshapen_inputs_are_refused(
    features: Tensor, memory: tuple[States, Tensor], message: str
) -> None:
    model = StreamModel.from_torch(nn.LSTM(2, 3))
    events = Events(torch.zeros(2, dtype=torch.int64), features, torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ModelError, match=message):
        step(model, events, *memory)


def test_event_pointing_outside_the_memory_is_refused() -> None:
    model = StreamModel.from_torch(nn.LSTM(2, 3))
    events = Events(torch.tensor([0, 1]), torch.randn(2, 2), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ModelError, match="outside"):
        step(model, events, *zeros(1, 1, 3))
