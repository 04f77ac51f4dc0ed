"""Redis bytes per entity (measured with MEMORY USAGE) and the drift of float16 storage.

    python bench/footprint.py

A run takes about half a minute per Redis-protocol server found here (redis-server, valkey).

1. Footprint: entities committed through ``MemoryStore`` to a real Redis-protocol server, for
   hidden sizes 32 to 512, 1 and 2 layers, float32 and float16; ``MEMORY USAGE`` of each key
   (key, value and Redis' own overhead), averaged over 1000 entities.
2. Drift: 1000 events of one entity through the target model (input 32, hidden 128, softmax
   over 8 labels), once with float32 memories and once rounding them to float16 after every
   event, as the float16 store does; the largest difference in memory and output, and how often
   the predicted label differs. Averaged over 64 entities with random events.
Results: bench/RESULTS.md, section "Memory footprint".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import numpy as np
import torch
from redis.asyncio import Redis
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import machine, write_section
from state import MemoryStore
from state.keys import KeyLayout
from stream_lstm.engine import Events, States, step
from stream_lstm.memories import Memories
from stream_lstm.model import StreamModel
from workers.dev.redis_server import RedisServer, server_binaries

ENTITIES = 1000
SHAPES = [(1, 32), (1, 64), (1, 128), (2, 128), (1, 256), (1, 512)]
DRIFT_STEPS = 1000
DRIFT_ENTITIES = 64


async def bytes_per_entity(url: str, layers: int, hidden: int, dtype: str) -> float:
    """Mean MEMORY USAGE of ENTITIES committed memories of this shape and dtype."""
    namespace = f"fp-{layers}x{hidden}-{dtype}"
    ids = [f"user-{k:08d}" for k in range(ENTITIES)]
    rng = np.random.default_rng(0)
    updates = Memories(
        ids,
        (
            rng.normal(size=(ENTITIES, layers, hidden)).astype(np.float32),  # LTM
            rng.normal(size=(ENTITIES, layers, hidden)).astype(np.float32),  # STM
        ),
        np.ones(ENTITIES, dtype=np.int64),
        np.zeros(ENTITIES, dtype=np.int64),
        np.arange(ENTITIES, dtype=np.int64),
    )
    async with MemoryStore(url, namespace, "v1", dtype=dtype) as store:
        await store.commit_many(updates)
    keys = KeyLayout(namespace, "v1").memories(ids)
    async with Redis.from_url(url) as client:
        sizes = [await client.memory_usage(key) for key in keys]
    missing = sizes.count(None)
    assert not missing, f"{missing} entities were just committed but have no MEMORY USAGE"
    return float(np.mean([size for size in sizes if size is not None]))


def drift() -> dict[str, float]:
    """float32 memories against memories rounded to float16 after every event."""
    torch.manual_seed(0)
    model = StreamModel.from_torch(
        nn.LSTM(32, 128), nn.Linear(128, 8), labels=[f"label-{k}" for k in range(8)]
    )
    rows = torch.arange(DRIFT_ENTITIES)
    zeros: States = tuple(torch.zeros(DRIFT_ENTITIES, 1, 128) for _ in model.states)
    exact, rounded = zeros, zeros  # each (E, L, H): the LTM, then the STM
    exact_steps = rounded_steps = torch.zeros(DRIFT_ENTITIES, dtype=torch.int64)
    memory_error: list[float] = []
    worst_output = 0.0
    disagreements = 0
    for _ in range(DRIFT_STEPS):
        events = Events(
            rows, torch.randn(DRIFT_ENTITIES, 32), torch.zeros(DRIFT_ENTITIES, dtype=torch.bool)
        )
        a = step(model, events, exact, exact_steps)
        b = step(model, events, rounded, rounded_steps)
        exact, exact_steps = a.states, a.steps
        rounded = tuple(state.half().float() for state in b.states)  # as a float16 store gives
        rounded_steps = b.steps
        memory_error.append(float((exact[0] - rounded[0]).abs().max()))  # the LTM
        worst_output = max(worst_output, float((a.output - b.output).abs().max()))
        disagreements += int((a.output.argmax(1) != b.output.argmax(1)).sum())
    return {
        "max |LTM difference|, events 1-100": max(memory_error[:100]),
        f"max |LTM difference|, events {DRIFT_STEPS - 99}-{DRIFT_STEPS}": max(memory_error[-100:]),
        "max |output difference|": worst_output,
        "labels that differ": disagreements / (DRIFT_STEPS * DRIFT_ENTITIES),
    }


async def footprints(url: str) -> list[tuple[int, int, float, float]]:
    rows = []
    for layers, hidden in SHAPES:
        f32 = await bytes_per_entity(url, layers, hidden, "float32")
        f16 = await bytes_per_entity(url, layers, hidden, "float16")
        print(f"layers {layers} hidden {hidden:4d}: float32 {f32:7.0f} B, float16 {f16:7.0f} B")
        rows.append((layers, hidden, f32, f16))
    return rows


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    torch.set_num_threads(1)
    sections = []
    for binary in server_binaries():
        with RedisServer(binary=binary) as server:
            version = asyncio.run(_server_version(server.url))
            print(version)
            rows = asyncio.run(footprints(server.url))
        sections.append(_table(version, rows))
    figures = drift()
    for name, value in figures.items():
        print(f"{name}: {value:.3g}")
    body = (
        f"`python bench/footprint.py` ({machine()}).\n\n"
        f"Bytes per entity are `MEMORY USAGE` of the entity's key (key, value, Redis overhead), "
        f"mean of {ENTITIES} entities with ids like `user-00000042` in a short namespace, on "
        "every Redis-protocol server found here. The allocator matters: jemalloc rounds each "
        "block up to a size class.\n\n" + "\n\n".join(sections) + "\n\n"
        f"float16 drift over {DRIFT_STEPS} events per entity ({DRIFT_ENTITIES} entities, input "
        "32, hidden 128, softmax over 8 labels, random weights and events), memories rounded "
        "to float16 after every event as the float16 store does, against float32:\n\n"
        + "\n".join(f"- {name}: {value:.3g}" for name, value in figures.items())
    )
    write_section("Memory footprint", body)


def _table(version: str, rows: list[tuple[int, int, float, float]]) -> str:
    """One server's figures, with the performance issue's targets at 1 x 128."""
    f32 = next(f32 for layers, hidden, f32, _ in rows if (layers, hidden) == (1, 128))
    f16 = next(f16 for layers, hidden, _, f16 in rows if (layers, hidden) == (1, 128))
    return "\n".join(
        [
            f"**{version}**: at 1 x 128, float32 <= 1200 B: **{f32:.0f} B, "
            f"{'met' if f32 <= 1200 else 'NOT met'}**; float16 <= 700 B: **{f16:.0f} B, "
            f"{'met' if f16 <= 700 else 'NOT met'}**.",
            "",
            "| layers | hidden | float32 B/entity | float16 B/entity | float16/float32 |",
            "|---:|---:|---:|---:|---:|",
            *(
                f"| {layers} | {hidden} | {a:.0f} | {b:.0f} | {b / a:.2f} |"
                for layers, hidden, a, b in rows
            ),
        ]
    )


async def _server_version(url: str) -> str:
    async with Redis.from_url(url) as client:
        info = await client.info("server") | await client.info("memory")
    name = "valkey" if "valkey_version" in info else "redis"
    number = info.get("valkey_version") or info.get("redis_version")
    return f"{name} {number}, {info.get('mem_allocator')}"


if __name__ == "__main__":
    main()
