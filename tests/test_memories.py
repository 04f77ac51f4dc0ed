"""Memories, the one type for a batch of entities' memories: its checks and its row moves."""

from __future__ import annotations

import numpy as np
import pytest

from stream_lstm.memories import NO_FENCE, RESETS, Memories, Shape

SHAPE = Shape(2, 1, 3)


def memories(entity_ids: list[str], offset: int = 0, partition: int = 0) -> Memories:
    """Row e: states e + offset and -(e + offset), step and fence offset e + offset."""
    e = len(entity_ids)
    value = np.arange(e, dtype=np.float32)[:, None, None] + offset
    states = np.broadcast_to(value, (e, SHAPE.layers, SHAPE.hidden))
    return Memories(
        entity_ids,
        (states.copy(), -states),
        np.arange(e, dtype=np.int64) + offset,
        np.full(e, partition, np.int64),
        np.arange(e, dtype=np.int64) + offset,
    )


def test_zeros_have_no_fence_and_are_not_found() -> None:
    zeros = Memories.zeros(["a", "b"], Shape(3, 2, 4))
    assert zeros.shape == Shape(3, 2, 4)
    assert len(zeros) == 2
    assert not any(state.any() for state in zeros.states)
    assert zeros.fence_partition.tolist() == [NO_FENCE] * 2
    assert zeros.found.tolist() == [False, False]
    assert memories(["a"]).found.tolist() == [True]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"states": ()}, "at least one state"),
        (
            {"states": (np.zeros((2, 1, 3), np.float32), np.zeros((2, 1, 4), np.float32))},
            "must all",
        ),
        ({"states": (np.zeros((3, 1, 3), np.float32),)}, "must all be"),
        ({"states": (np.zeros((2, 1, 3), np.float64),)}, "float32"),
        ({"step": np.zeros(2, np.int32)}, "step is int32"),
        ({"fence_offset": np.zeros(3, np.int64)}, "fence_offset is int64 of shape"),
        ({"other_fences": {2: {1: 5}}}, "outside 0..1"),
    ],
)
def test_inconsistent_columns_are_refused(change: dict[str, object], message: str) -> None:
    ok = memories(["a", "b"])
    fields = {
        "entity_ids": ok.entity_ids,
        "states": ok.states,
        "step": ok.step,
        "fence_partition": ok.fence_partition,
        "fence_offset": ok.fence_offset,
        "other_fences": {},
    }
    with pytest.raises(ValueError, match=message):
        Memories(**{**fields, **change})  # type: ignore[arg-type]


def test_take_copies_rows_with_their_other_fences() -> None:
    source = memories(["a", "b", "c"])
    source.other_fences[2] = {RESETS: 1}
    taken = source.take([2, 0])
    assert list(taken.entity_ids) == ["c", "a"]
    assert taken.step.tolist() == [2, 0]
    assert taken.other_fences == {0: {RESETS: 1}}
    taken.states[0][:] = 99  # a copy: the source keeps its own
    assert source.states[0][0, 0, 0] == 0


def test_put_writes_rows_and_moves_other_fences_with_them() -> None:
    target = memories(["a", "b", "c"])
    target.other_fences.update({0: {3: 7}, 1: {4: 8}})
    newer = memories(["x", "y"], offset=10)
    newer.other_fences[1] = {5: 9}
    target.put([1, 0], newer)
    assert target.step.tolist() == [11, 10, 2]
    assert target.states[1][:, 0, 0].tolist() == [-11, -10, -2]
    assert list(target.entity_ids) == ["a", "b", "c"]  # ids are the caller's
    assert target.other_fences == {0: {5: 9}}  # row 1's old ones went with its old memory


def test_put_refuses_memories_of_another_shape_or_count() -> None:
    target = memories(["a", "b"])
    other = Memories.zeros(["x"], Shape(2, 2, 3))  # two layers where the target has one
    with pytest.raises(ValueError, match="put in 1 rows"):
        target.put([0], other)
    with pytest.raises(ValueError, match="put in 2 rows"):
        target.put([0, 1], memories(["x"]))


def test_overlay_puts_newer_memories_by_entity() -> None:
    loaded = memories(["a", "b", "c"])
    loaded.other_fences[0] = {RESETS: 1}
    in_flight = memories(["c", "z", "a"], offset=20, partition=1)
    loaded.overlay(in_flight)
    assert loaded.step.tolist() == [22, 1, 20]
    assert loaded.fence_partition.tolist() == [1, 0, 1]
    assert loaded.other_fences == {}  # a's memory in flight has no other fence
    loaded.overlay(memories(["q"]))  # no entity in common: nothing changes
    assert loaded.step.tolist() == [22, 1, 20]


def test_spans_partitions_ignores_the_resets_count() -> None:
    some = memories(["a", "b"])
    assert not some.spans_partitions()
    some.other_fences[0] = {RESETS: 2}
    assert not some.spans_partitions()
    some.other_fences[1] = {4: 1}
    assert some.spans_partitions()
