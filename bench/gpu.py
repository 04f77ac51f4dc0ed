"""Engine step on a GPU against the CPU, for 1k to 64k entities, in the same run.

    python bench/gpu.py [--sizes 1024,4096,16384,65536] [--cpu-threads 1]

A default run takes about a minute on a GPU machine (the CPU baseline at 64k entities is most
of it).

Model: input 32, hidden 128, 1 layer, softmax over 8 labels; one event per entity per step (the
worker's common case), plus one packed batch of 4 events per entity. Three figures per size:

- **cpu**: ``engine.step`` with the model on the CPU (the baseline, ``--cpu-threads`` threads);
- **gpu, host memories**: ``engine.step`` with the model on the GPU, as the worker runs it:
  memories and features come from host memory and predictions and new memories go back to it;
- **gpu, resident**: ``engine.step`` on memories and features already on the GPU, results left
  there: the floor a GPU-resident memory cache would reach.

Results: bench/RESULTS.md, section "Engine step on a GPU". Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import machine, write_section
from stream_lstm.engine import Events, States, step
from stream_lstm.model import StreamModel

Batch = tuple[Events, States, torch.Tensor]
"""Events, the states of their entities (each (E, L, H)) and the entities' steps (E,)."""


def per_step_ms(run: Callable[[], object], sync: Callable[[], None], min_s: float = 0.3) -> float:
    """Mean milliseconds per call of ``run``, after warm-up, waiting for the device each round."""
    for _ in range(3):
        run()
    sync()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s or calls < 5:
        run()
        sync()
        calls += 1
    return elapsed / calls * 1e3


def host_batch(model: StreamModel, entities: int, per_entity: int) -> Batch:
    """``per_entity`` events for each of ``entities`` entities, interleaved, and their memories."""
    n = entities * per_entity
    events = Events(
        torch.arange(n) % entities,
        torch.randn(n, model.input_size),
        torch.zeros(n, dtype=torch.bool),
    )
    shape = (entities, model.num_layers, model.hidden_size)
    states = (torch.randn(shape), torch.randn(shape).tanh())  # the LTM, then the STM
    return events, states, torch.zeros(entities, dtype=torch.int64)


def on_device(batch: Batch, device: torch.device) -> Batch:
    """The same batch with every tensor on ``device``: memories a GPU-resident cache would hold."""
    events, states, steps = batch
    return (
        Events(*(t.to(device) for t in (events.entity, events.features, events.reset))),
        tuple(state.to(device) for state in states),
        steps.to(device),
    )


def lstm_step(model: StreamModel, events: Events, states: States) -> Callable[[], object]:
    """One time step of ``nn.LSTM`` and the readout, on tensors already on the model's device."""
    device = model.device
    ltm, stm = states
    x = events.features.to(device).unsqueeze(0)  # (1, E, I)
    h0 = stm.to(device).transpose(0, 1).contiguous()  # (L, E, H)
    c0 = ltm.to(device).transpose(0, 1).contiguous()

    def run() -> object:
        with torch.inference_mode():
            out, state = model.lstm(x, (h0, c0))
            return model.readout(out[0]), state

    return run


def check_same(cpu: StreamModel, gpu: StreamModel) -> float:
    """Largest difference between CPU and GPU over an interleaved batch with resets."""
    events, states, steps = host_batch(cpu, 512, 6)
    events = Events(events.entity, events.features, torch.rand(events.reset.shape) < 0.1)
    on_cpu, on_gpu = step(cpu, events, states, steps), step(gpu, events, states, steps)
    diff = max(
        float((a - b).abs().max())
        for a, b in [
            (on_cpu.output, on_gpu.output),
            *zip(on_cpu.states, on_gpu.states, strict=True),
        ]
    )
    same_steps = torch.equal(on_cpu.step, on_gpu.step) and torch.equal(on_cpu.steps, on_gpu.steps)
    if diff > 1e-4 or not same_steps:
        sys.exit(f"the GPU step differs from the CPU step by {diff:.2e}")
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1024,4096,16384,65536")
    parser.add_argument("--cpu-threads", type=int, default=1, help="1 is what a worker uses")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device; torch sees none")
    torch.set_num_threads(args.cpu_threads)
    torch.manual_seed(0)
    lstm, head = nn.LSTM(32, 128, 1), nn.Linear(128, 8)
    labels = [f"label-{k}" for k in range(8)]
    cpu = StreamModel.from_torch(lstm, head, labels=labels)
    gpu = StreamModel.from_torch(lstm, head, labels=labels)
    gpu.lstm.cuda()
    gpu.head.cuda()  # type: ignore[union-attr]

    diff = check_same(cpu, gpu)
    print(f"GPU matches CPU within {diff:.1e} on 3072 interleaved events with resets")

    sync = torch.cuda.synchronize

    def no_sync() -> None:
        return None

    rows = [
        "| entities | events | cpu ms | gpu ms, host memories | gpu ms, resident "
        "| gpu ms, nn.LSTM resident | speed-up host | speed-up resident |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cases = [(int(s), 1) for s in args.sizes.split(",")] + [(16384, 4)]
    for entities, per_entity in cases:
        batch = host_batch(cpu, entities, per_entity)
        events, states, _ = batch
        on_cpu = per_step_ms(partial(step, cpu, *batch), no_sync)
        on_gpu = per_step_ms(partial(step, gpu, *batch), sync)
        resident = per_step_ms(partial(step, gpu, *on_device(batch, gpu.device)), sync)
        n = entities * per_entity
        cudnn = "" if per_entity > 1 else f"{per_step_ms(lstm_step(gpu, events, states), sync):.3f}"
        line = (
            f"| {entities} | {n} | {on_cpu:.2f} | {on_gpu:.3f} | {resident:.3f} | {cudnn} "
            f"| {on_cpu / on_gpu:.1f}x | {on_cpu / resident:.0f}x |"
        )
        print(line, flush=True)
        rows.append(line)
    sync()
    body = (
        f"`python bench/gpu.py` ({machine()}; {torch.cuda.get_device_name()}; "
        f"CPU baseline with {args.cpu_threads} torch thread(s) on the same machine, same run).\n"
        "Input 32, hidden 128, 1 layer, softmax over 8 labels, float32. Milliseconds per step. "
        "*Host memories* is `engine.step` as a worker runs it (copies in and out included); "
        "*resident* is `engine.step` on memories already on the GPU, results left there; "
        "*nn.LSTM resident* is one time step of `nn.LSTM` (cuDNN) and the readout on the same "
        "tensors, the engine's previous one-event path. The last row is one packed batch of 4 "
        "events for each of 16,384 entities (no nn.LSTM figure). Target: under 1 ms for 64k "
        f"entities. Before timing, the GPU step matched the CPU step within {diff:.1e} on 3,072 "
        "interleaved events with resets.\n\n" + "\n".join(rows)
    )
    write_section("Engine step on a GPU", body)


if __name__ == "__main__":
    main()
