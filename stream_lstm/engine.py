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
``n`` in ``0..N-1`` (arrival order). Results come back on the device the memories came from:
the CPU for memories read from Redis, the GPU for memories kept there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from stream_lstm.exceptions import ModelError
from stream_lstm.model import StreamModel


@dataclass(frozen=True)
class Memory:
    """Memories of E entities: LTM and STM per layer, and events applied since the last reset."""

    ltm: Tensor  # (E, L, H) float32, cell state c
    stm: Tensor  # (E, L, H) float32, hidden state h
    step: Tensor  # (E,) int64

    @classmethod
    def zeros(cls, entities: int, layers: int, hidden: int) -> Memory:
        """Memories of entities that have seen nothing yet."""
        return cls(
            torch.zeros(entities, layers, hidden),
            torch.zeros(entities, layers, hidden),
            torch.zeros(entities, dtype=torch.int64),
        )


@dataclass(frozen=True)
class Events:
    """N events in arrival order, each pointing at its entity's memory row."""

    entity: Tensor  # (N,) int64, row in Memory
    features: Tensor  # (N, I) float32
    reset: Tensor  # (N,) bool, start this entity from zero memory at this event


@dataclass(frozen=True)
class StepResult:
    """One prediction per event and every entity's memory after the batch."""

    output: Tensor  # (N, O) the readout of each event, in arrival order
    step: Tensor  # (N,) int64, 1-based events since the entity's last reset
    memory: Memory  # (E, ...) rows of entities without events are unchanged


def entity_rows(entity_ids: Sequence[str]) -> tuple[list[str], Tensor]:
    """Distinct ids in first-seen order, and each event's row among them: (N,) int64."""
    rows: dict[str, int] = {}
    index = [rows.setdefault(entity_id, len(rows)) for entity_id in entity_ids]
    return list(rows), torch.tensor(index, dtype=torch.int64)


def step(model: StreamModel, events: Events, memory: Memory) -> StepResult:
    """Apply a batch of events to the memories in one call of the model's fused LSTM."""
    _check(model, events, memory)
    n = events.entity.numel()
    if n == 0:
        empty = torch.empty(0, model.output_size)
        return StepResult(empty, torch.empty(0, dtype=torch.int64), memory)
    device = model.device
    with torch.inference_mode(), _exact_float32(device):
        entity = events.entity.to(device)
        features = events.features.to(device, torch.float32)
        reset = events.reset.to(device, torch.bool)
        if n == memory.step.numel() and bool((entity == torch.arange(n, device=device)).all()):
            return _one_event_each(model, features, reset, memory)

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
        h0 = memory.stm.to(device)[rows].masked_fill(fresh, 0.0).transpose(0, 1).contiguous()
        c0 = memory.ltm.to(device)[rows].masked_fill(fresh, 0.0).transpose(0, 1).contiguous()
        packed_out, (h_n, c_n) = model.lstm(PackedSequence(data, batch_sizes.cpu()), (h0, c0))

        stm_top = torch.empty(n, model.hidden_size, device=device)  # (N, H) in arrival order
        stm_top[order] = packed_out.data[packed_row]
        output = model.readout(stm_top)  # (N, O)

        base = torch.where(seg_from_stored, memory.step.to(device)[seg_entity], 0)  # (S,)
        grouped_step = base[seg] + pos + 1  # (N,)
        event_step = torch.empty_like(grouped_step)
        event_step[order] = grouped_step

        # An entity's new memory is the final state of its last segment.
        done_entity = ent[last_of_entity]  # (E',)
        done_rank = rank[seg[last_of_entity]]  # (E',)
        memory_device = memory.ltm.device
        done = done_entity.to(memory_device)
        ltm, stm, steps = memory.ltm.clone(), memory.stm.clone(), memory.step.clone()
        ltm[done] = c_n[:, done_rank].transpose(0, 1).to(memory_device)  # (E', L, H)
        stm[done] = h_n[:, done_rank].transpose(0, 1).to(memory_device)
        steps[done] = grouped_step[last_of_entity].to(memory_device)
        return StepResult(
            output.to(memory_device), event_step.to(memory_device), Memory(ltm, stm, steps)
        )


def _one_event_each(
    model: StreamModel, features: Tensor, reset: Tensor, memory: Memory
) -> StepResult:
    """The common case, event n of entity n: one time step, no grouping, no packing.

    On a GPU each layer is one ``torch.lstm_cell`` (cuDNN's ``nn.LSTM`` took 25x longer for one
    step of 64k entities on an H200); on a CPU ``nn.LSTM``'s single step is ~15% cheaper than
    the cells. Both are the same arithmetic (a test holds them to it).
    """
    device, memory_device = model.device, memory.ltm.device
    fresh = reset.to(device)[:, None, None]  # (N, 1, 1): from zeros (masked: inf * 0 is NaN)
    stm = memory.stm.to(device).masked_fill(fresh, 0.0)  # (N, L, H)
    ltm = memory.ltm.to(device).masked_fill(fresh, 0.0)  # (N, L, H)
    run_layers = _by_cells if device.type == "cuda" else _by_sequence
    top, stm, ltm = run_layers(model.lstm, features, stm, ltm)
    output = model.readout(top)  # (N, O)
    steps = torch.where(reset, 0, memory.step.to(device)) + 1  # (N,)
    new = Memory(
        ltm.contiguous().to(memory_device),
        stm.contiguous().to(memory_device),
        steps.to(memory_device),
    )
    return StepResult(output.to(memory_device), new.step, new)


def _by_cells(lstm: nn.LSTM, x: Tensor, stm: Tensor, ltm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One step, layer by layer: top STM (N, H), then STM and LTM (N, L, H)."""
    stms, ltms = [], []
    for layer, (h0, c0) in enumerate(zip(stm.unbind(1), ltm.unbind(1), strict=True)):
        # Weights: w_ih, w_hh and, with bias, b_ih, b_hh.
        x, c = torch.lstm_cell(x, (h0, c0), *lstm.all_weights[layer])  # (N, H) each
        stms.append(x)
        ltms.append(c)
    return x, torch.stack(stms, 1), torch.stack(ltms, 1)


def _by_sequence(
    lstm: nn.LSTM, x: Tensor, stm: Tensor, ltm: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One step as a sequence of length one: top STM (N, H), then STM and LTM (N, L, H)."""
    state = (stm.transpose(0, 1).contiguous(), ltm.transpose(0, 1).contiguous())  # (L, N, H)
    out, (h_n, c_n) = lstm(x.unsqueeze(0), state)  # (1, N, H), (L, N, H)
    return out[0], h_n.transpose(0, 1), c_n.transpose(0, 1)


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


def _check(model: StreamModel, events: Events, memory: Memory) -> None:
    n = events.entity.numel()
    e, layers, hidden = memory.ltm.shape
    if events.features.shape != (n, model.input_size):
        raise ModelError(
            f"features of shape {tuple(events.features.shape)} for {n} events; "
            f"the model takes ({n}, {model.input_size})"
        )
    if events.reset.shape != (n,):
        raise ModelError(f"reset of shape {tuple(events.reset.shape)} for {n} events")
    if (layers, hidden) != (model.num_layers, model.hidden_size):
        raise ModelError(
            f"memories of {layers} layers x {hidden} hidden; the model has "
            f"{model.num_layers} x {model.hidden_size}"
        )
    if memory.stm.shape != memory.ltm.shape or memory.step.shape != (e,):
        raise ModelError("ltm, stm and step must describe the same entities")
    if n and (int(events.entity.min()) < 0 or int(events.entity.max()) >= e):
        raise ModelError(f"an event points at an entity row outside 0..{e - 1}")
