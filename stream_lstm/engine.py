"""The batched step: every event of a micro-batch through the model in one fused LSTM call.

A batch holds events for many entities, several per entity in arrival order, some carrying
``reset``. Each entity's events are cut at its resets into *segments*: a segment starts from the
entity's stored memory (or from zeros when it starts with a reset) and runs its events in order.
Segments are sorted longest first and laid out as one ``PackedSequence``, so ``nn.LSTM`` steps a
shrinking contiguous prefix of segments at each time step inside its own kernels (cuDNN on a GPU)
with no Python loop over entities or time. An entity's new memory is its last segment's. When
each entity has exactly one event (event n for entity n, the common case with many entities),
the batch is one plain ``nn.LSTM`` time step with no grouping at all.

Tensors are indexed by entity row ``e`` in ``0..E-1`` (the caller's memory rows) and event
``n`` in ``0..N-1`` (arrival order). The model's states are a tuple (``States``): the engine
knows nothing of the cell but its methods (``StreamModel.run_sequence``, ``run_step``).
Results come back on the device the memories came from: the CPU for memories read from Redis
(``Memories``, whose states the worker passes as torch views), the GPU for memories kept there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from stream_lstm.exceptions import ModelError
from stream_lstm.memories import Memories
from stream_lstm.model import StreamModel

States: TypeAlias = tuple[Tensor, ...]
"""The model's states (``StreamModel.states``) of E entities, each (E, L, H): torch views of a
``Memories``' states, or tensors a GPU keeps."""


@dataclass(frozen=True)
class Events:
    """N events in arrival order, each pointing at its entity's memory row."""

    entity: Tensor  # (N,) int64, the entity's row in the states
    features: Tensor  # (N, I) float32
    reset: Tensor  # (N,) bool, start this entity from zero memory at this event


@dataclass(frozen=True)
class StepResult:
    """One prediction per event and every entity's memory after the batch."""

    output: Tensor  # (N, O) the readout of each event, in arrival order
    step: Tensor  # (N,) int64, 1-based events since the entity's last reset
    states: States  # each (E, L, H): rows of entities without events are unchanged
    steps: Tensor  # (E,) int64, each entity's events since its last reset


def views(memories: Memories) -> tuple[States, Tensor]:
    """A ``Memories``' states and steps as tensors sharing its arrays: ``step``'s arguments."""
    return tuple(torch.from_numpy(state) for state in memories.states), torch.from_numpy(
        memories.step
    )


def entity_rows(entity_ids: Sequence[str]) -> tuple[list[str], Tensor]:
    """Distinct ids in first-seen order, and each event's row among them: (N,) int64."""
    rows: dict[str, int] = {}
    index = [rows.setdefault(entity_id, len(rows)) for entity_id in entity_ids]
    return list(rows), torch.tensor(index, dtype=torch.int64)


def step(model: StreamModel, events: Events, states: States, steps: Tensor) -> StepResult:
    """Apply a batch of events to E entities' states (and their (E,) steps) in one call of the
    model's fused cell."""
    _check(model, events, states, steps)
    n = events.entity.numel()
    if n == 0:
        empty = torch.empty(0, model.output_size)
        return StepResult(empty, torch.empty(0, dtype=torch.int64), states, steps)
    device = model.device
    with torch.inference_mode(), _exact_float32(device):
        entity = events.entity.to(device)
        features = events.features.to(device, torch.float32)
        reset = events.reset.to(device, torch.bool)
        if n == steps.numel() and bool((entity == torch.arange(n, device=device)).all()):
            return _one_event_each(model, features, reset, states, steps)

        # Group each entity's events, keeping arrival order within the entity.
        order = torch.sort(entity, stable=True).indices  # (N,) grouped position -> event
        ent = entity[order]  # (N,)
        first_of_entity = torch.ones(n, dtype=torch.bool, device=device)  # (N,)
        first_of_entity[1:] = ent[1:] != ent[:-1]
        last_of_entity = torch.ones(n, dtype=torch.bool, device=device)  # (N,)
        last_of_entity[:-1] = first_of_entity[1:]

        # Cut into segments at each entity's first event and at every reset.
        starts = first_of_entity | reset[order]  # (N,)
        seg = torch.cumsum(starts, 0) - 1  # (N,) segment of each grouped event
        seg_start = torch.nonzero(starts).squeeze(1)  # (S,)
        seg_len = torch.diff(seg_start, append=seg_start.new_tensor([n]))  # (S,)
        seg_entity = ent[seg_start]  # (S,)
        seg_from_stored = ~reset[order][seg_start]  # (S,) False: starts from zeros
        pos = torch.arange(n, device=device) - seg_start[seg]  # (N,) time step in its segment

        # Longest segments first: the packed layout runs a shrinking prefix at each time step.
        by_len = torch.sort(seg_len, descending=True, stable=True).indices  # (S,) rank -> segment
        rank = torch.empty_like(by_len)  # (S,) segment -> rank
        rank[by_len] = torch.arange(by_len.numel(), device=device)
        batch_sizes = torch.bincount(seg_len - 1).flip(0).cumsum(0).flip(0)  # (T,)
        offsets = batch_sizes.cumsum(0) - batch_sizes  # (T,) first packed row of each step
        packed_row = offsets[pos] + rank[seg]  # (N,) grouped event -> packed row
        data = torch.empty_like(features)  # (N, I)
        data[packed_row] = features[order]

        # A segment after a reset starts from zeros: masked, not multiplied (inf * 0 is NaN).
        fresh = ~seg_from_stored[by_len].to(device)[:, None, None]  # (S, 1, 1)
        rows = seg_entity[by_len]  # (S,)
        start = tuple(
            state.to(device)[rows].masked_fill(fresh, 0.0).transpose(0, 1).contiguous()
            for state in states
        )  # each (L, S, H)
        packed_out, final = model.run_sequence(PackedSequence(data, batch_sizes.cpu()), start)

        stm_top = torch.empty(n, model.hidden_size, device=device)  # (N, H) in arrival order
        stm_top[order] = packed_out.data[packed_row]
        output = model.readout(stm_top)  # (N, O)

        base = torch.where(seg_from_stored, steps.to(device)[seg_entity], 0)  # (S,)
        grouped_step = base[seg] + pos + 1  # (N,)
        event_step = torch.empty_like(grouped_step)
        event_step[order] = grouped_step

        # An entity's new memory is the final state of its last segment.
        done_entity = ent[last_of_entity]  # (E',)
        done_rank = rank[seg[last_of_entity]]  # (E',)
        memory_device = steps.device
        done = done_entity.to(memory_device)
        new_states = tuple(state.clone() for state in states)
        for new, end in zip(new_states, final, strict=True):
            new[done] = end[:, done_rank].transpose(0, 1).to(memory_device)  # (E', L, H)
        new_steps = steps.clone()
        new_steps[done] = grouped_step[last_of_entity].to(memory_device)
        return StepResult(
            output.to(memory_device), event_step.to(memory_device), new_states, new_steps
        )


def _one_event_each(
    model: StreamModel, features: Tensor, reset: Tensor, states: States, steps: Tensor
) -> StepResult:
    """The common case, event n of entity n: one time step, no grouping, no packing."""
    device, memory_device = model.device, steps.device
    start = tuple(state.to(device) for state in states)  # (N, L, H)
    if bool(reset.any()):  # masked_fill copies every state: 0.24 ms a batch of 1024 on a CPU
        fresh = reset.to(device)[:, None, None]  # (N, 1, 1): from zeros (masked: inf * 0 is NaN)
        start = tuple(state.masked_fill(fresh, 0.0) for state in start)
    top, new = model.run_step(features, start)
    output = model.readout(top)  # (N, O)
    new_steps = (torch.where(reset, 0, steps.to(device)) + 1).to(memory_device)  # (N,)
    return StepResult(
        output.to(memory_device),
        new_steps,
        tuple(state.contiguous().to(memory_device) for state in new),
        new_steps,
    )


@contextlib.contextmanager
def _exact_float32(device: torch.device) -> Iterator[None]:
    """On a GPU, float32 as nn.LSTM computes it on a CPU: cuDNN's RNNs default to TF32 inputs,
    which left a worker's memories 1.2e-4 from the CPU's after 20 events on an H200."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _check(model: StreamModel, events: Events, states: States, steps: Tensor) -> None:
    n, e = events.entity.numel(), steps.numel()
    if events.features.shape != (n, model.input_size):
        raise ModelError(
            f"features of shape {tuple(events.features.shape)} for {n} events; "
            f"the model takes ({n}, {model.input_size})"
        )
    if events.reset.shape != (n,):
        raise ModelError(f"reset of shape {tuple(events.reset.shape)} for {n} events")
    if len(states) != len(model.states):
        raise ModelError(f"{len(states)} states; the model keeps {len(model.states)}")
    for state in states:
        if state.dim() != 3 or state.shape[0] != e:
            raise ModelError(f"a state of shape {tuple(state.shape)} for {e} entities")
        if tuple(state.shape[1:]) != (model.num_layers, model.hidden_size):
            raise ModelError(
                f"memories of {state.shape[1]} layers x {state.shape[2]} hidden; the model "
                f"has {model.num_layers} x {model.hidden_size}"
            )
    if steps.shape != (e,):
        raise ModelError(f"steps of shape {tuple(steps.shape)}; expected ({e},)")
    if n and (int(events.entity.min()) < 0 or int(events.entity.max()) >= e):
        raise ModelError(f"an event points at an entity row outside 0..{e - 1}")
