"""Engine step cost per event, batched against stepping entities one at a time.

    python bench/engine.py [--hidden 128] [--input 32] [--layers 1] [--threads 1]

A default run takes about 10 seconds.

Model: input 32, hidden 128, 1 layer, a linear head with softmax over 8 labels (the figures in
the performance targets). For each batch size B, B entities with one event each go through one
``engine.step``; the baseline steps the same B entities one call each. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import machine, write_section
from stream_lstm.engine import Events, step, views
from stream_lstm.memories import Memories
from stream_lstm.model import StreamModel

SIZES = (1, 16, 256, 1024, 4096)


def per_event_us(model: StreamModel, entities: int, per_call: int, min_s: float = 0.5) -> float:
    """Mean microseconds per event, stepping ``entities`` in calls of ``per_call`` entities."""
    ids = [f"user-{k:08d}" for k in range(per_call)]
    states, steps = views(Memories.zeros(ids, model.shape))  # as the worker steps its memories
    events = Events(
        torch.arange(per_call),
        torch.randn(per_call, model.input_size),
        torch.zeros(per_call, dtype=torch.bool),
    )
    calls = max(1, entities // per_call)
    step(model, events, states, steps)  # warm up
    rounds, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s or rounds == 0:
        for _ in range(calls):
            step(model, events, states, steps)
        rounds += 1
    return elapsed / (rounds * calls * per_call) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    labels = [f"label-{k}" for k in range(8)]
    model = StreamModel.from_torch(
        nn.LSTM(args.input, args.hidden, args.layers), nn.Linear(args.hidden, 8), labels=labels
    )
    rows = [
        "| entities | batched us/event | one at a time us/event | speed-up |",
        "|---:|---:|---:|---:|",
    ]
    print(f"{'entities':>9} {'batched us/ev':>14} {'one-by-one us/ev':>17} {'ratio':>7}")
    for size in SIZES:
        batched = per_event_us(model, size, size)
        single = per_event_us(model, size, 1)
        print(f"{size:>9} {batched:>14.2f} {single:>17.2f} {single / batched:>6.1f}x")
        rows.append(f"| {size} | {batched:.2f} | {single:.2f} | {single / batched:.1f}x |")
    body = (
        f"`python bench/engine.py` ({machine()}; {args.threads} torch thread(s)).\n"
        f"Input {args.input}, hidden {args.hidden}, {args.layers} layer(s), softmax over 8 labels; "
        "one event per entity per call. Baseline: the same entities stepped one call each, "
        "in the same run.\n\n" + "\n".join(rows)
    )
    write_section("Engine step", body)


if __name__ == "__main__":
    main()
