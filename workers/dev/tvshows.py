"""The lecture's example as a workload, and the demo model trained on it.

TV channels are the entities and their frames the events. A nature channel shows forest animals,
a pet channel shows pets. Each frame is a noisy feature vector of the animal on screen. Wolf and
dog have nearly the same prototype, so a wolf or dog frame is *ambiguous* on its own: without
memory a classifier can only guess (about 50%). The channel's long-term memory (which kind of
animals it has shown so far) resolves it: on a nature channel it is a wolf, on a pet channel a
dog.

``train`` fits a small ``nn.LSTM`` + ``nn.Linear`` on short channel sequences in seconds on a CPU;
``python -m workers.dev.tvshows`` retrains it and writes ``DEMO_MODEL``, the checkpoint that
ships with the package. This module computes; the only I/O is in ``train_and_save`` and
``__main__``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from stream_lstm.engine import Events, entity_rows, step, views
from stream_lstm.memories import Memories
from stream_lstm.model import StreamModel
from workers.settings import DEMO_MODEL

logger = logging.getLogger(__name__)

Kind = Literal["nature", "pets"]

FOREST: tuple[str, ...] = ("wolf", "squirrel", "deer", "owl", "bear")
PETS: tuple[str, ...] = ("dog", "cat", "hamster", "parrot")
LABELS: tuple[str, ...] = FOREST + PETS
AMBIGUOUS: tuple[str, ...] = ("wolf", "dog")  # the pair a single frame cannot tell apart
KINDS: tuple[Kind, ...] = ("nature", "pets")
INPUT_SIZE = 16
HIDDEN_SIZE = 24

AMBIGUOUS_SHARE = 0.3  # of a channel's frames show its ambiguous animal (wolf or dog)
NOISE = 0.5  # std of the per-feature Gaussian noise on a frame
DOG_OFFSET = 0.02  # per-feature std of dog's prototype around wolf's: nearly identical
PROTOTYPE_SEED = 2  # the lecture's number; fixes the animals' looks for every process

# Training: short channels, fresh ones at every Adam step.
TRAIN_STEPS = 300
TRAIN_BATCH = 64
TRAIN_FRAMES = 48
LEARNING_RATE = 1e-2


def _prototypes() -> Tensor:
    """One fixed feature vector per label (L, I); dog sits within a hair of wolf."""
    g = torch.Generator().manual_seed(PROTOTYPE_SEED)
    protos = torch.randn(len(LABELS), INPUT_SIZE, generator=g, dtype=torch.float64)  # (L, I)
    wolf, dog = LABELS.index("wolf"), LABELS.index("dog")
    jitter = torch.randn(INPUT_SIZE, generator=g, dtype=torch.float64)  # (I,)
    protos[dog] = protos[wolf] + DOG_OFFSET * jitter
    return protos


PROTOTYPES = _prototypes()  # (L, I) float64


def _animal_probs() -> Tensor:
    """P(animal | channel kind) (K, L): the ambiguous animal gets AMBIGUOUS_SHARE, others split
    the rest evenly; a channel never shows the other kind's animals, so its story stays crisp."""
    probs = torch.zeros(len(KINDS), len(LABELS), dtype=torch.float64)  # (K, L)
    for k, group in enumerate((FOREST, PETS)):
        for animal in group:
            share = AMBIGUOUS_SHARE if animal in AMBIGUOUS else (1 - AMBIGUOUS_SHARE)
            probs[k, LABELS.index(animal)] = share / (1 if animal in AMBIGUOUS else len(group) - 1)
    return probs


ANIMAL_PROBS = _animal_probs()  # (K, L) float64, rows sum to 1


def _sample(kinds: Tensor, frames: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Animals (C, T) int64 and features (C, T, I) float64 for channels of the given kinds."""
    c = kinds.numel()
    if c == 0 or frames == 0:  # multinomial refuses to draw nothing
        return torch.empty(c, frames, dtype=torch.int64), torch.empty(
            c, frames, INPUT_SIZE, dtype=torch.float64
        )
    animals = torch.multinomial(ANIMAL_PROBS[kinds], frames, replacement=True, generator=g)
    noise = torch.randn(c, frames, INPUT_SIZE, generator=g, dtype=torch.float64)  # (C, T, I)
    features = PROTOTYPES[animals] + NOISE * noise  # (C, T, I)
    return animals, features


@dataclass(frozen=True)
class Frame:
    """One event of the workload: what the stream carries, plus the truth to score it."""

    channel: str
    index: int  # the frame's position in its channel, from 0
    features: list[float]
    animal: str
    ambiguous: bool
    kind: Kind


def workload(channels: int, frames_per_channel: int, seed: int) -> list[Frame]:
    """Frames of all channels interleaved at random, each channel's in order.

    Channels alternate nature and pets (``nature-0000``, ``pets-0001``, ...), so any workload
    has both kinds. Features are rounded to 4 decimals to keep events short on the wire. The
    same seed gives the same frames in any process.
    """
    if channels < 0 or frames_per_channel < 0:
        raise ValueError(f"channels and frames must be >= 0, got {channels}, {frames_per_channel}")
    g = torch.Generator().manual_seed(seed)
    kinds = torch.arange(channels) % len(KINDS)  # (C,)
    animals, features = _sample(kinds, frames_per_channel, g)  # (C, T), (C, T, I)
    features = torch.round(features * 1e4) / 1e4  # (C, T, I) shortest repr is 4 decimals
    names = [f"{KINDS[int(k)]}-{c:04d}" for c, k in enumerate(kinds)]
    order = torch.arange(channels).repeat_interleave(frames_per_channel)  # (C*T,)
    order = order[torch.randperm(order.numel(), generator=g)]  # (C*T,) channel of each event
    feature_lists, animal_ids = features.tolist(), animals.tolist()
    seen = [0] * channels
    frames = []
    for c in order.tolist():
        t = seen[c]
        seen[c] += 1
        animal = LABELS[animal_ids[c][t]]
        frames.append(
            Frame(
                channel=names[c],
                index=t,
                features=feature_lists[c][t],
                animal=animal,
                ambiguous=animal in AMBIGUOUS,
                kind=KINDS[c % len(KINDS)],
            )
        )
    return frames


def train(seed: int = 0) -> StreamModel:
    """Fit the demo model: cross-entropy on every frame of fresh random channels.

    Deterministic for a seed on a given machine (seeded generators, one torch thread, restored
    afterwards); a few seconds on a CPU.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        lstm = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, 1)
        head = nn.Linear(HIDDEN_SIZE, len(LABELS))
        params = [*lstm.parameters(), *head.parameters()]
        opt = torch.optim.Adam(params, lr=LEARNING_RATE)
        for n in range(TRAIN_STEPS):
            kinds = torch.randint(len(KINDS), (TRAIN_BATCH,), generator=g)  # (B,)
            animals, features = _sample(kinds, TRAIN_FRAMES, g)  # (B, T), (B, T, I)
            x = features.to(torch.float32).transpose(0, 1)  # (T, B, I)
            y, _ = lstm(x)  # (T, B, H)
            logits = head(y)  # (T, B, L)
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, len(LABELS)),  # (T*B, L)
                animals.transpose(0, 1).reshape(-1),  # (T*B,)
            )
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if n % 50 == 0 or n == TRAIN_STEPS - 1:
                logger.debug("train step %d loss %.4f", n, loss.item())
    finally:
        torch.set_num_threads(threads)
    return StreamModel.from_torch(lstm, head, labels=LABELS)


@dataclass(frozen=True)
class Accuracy:
    """Share of frames whose top label is the animal on screen."""

    ambiguous: float  # on wolf and dog frames, the ones only memory can resolve
    overall: float  # on all frames
    ambiguous_frames: int
    frames: int


def accuracy(model: StreamModel, frames: Sequence[Frame], *, memory: bool) -> Accuracy:
    """Score the model on frames run through ``engine.step`` as one batch, in arrival order.

    ``memory=False`` resets every event (each frame seen on its own), which is what the model
    would do without its memories: the baseline the demo compares against.
    """
    assert model.labels is not None, "the model must name its labels"
    ids, rows = entity_rows([f.channel for f in frames])
    features = (
        torch.tensor([f.features for f in frames], dtype=torch.float32)  # (N, I)
        if frames
        else torch.empty(0, model.input_size)
    )
    reset = torch.full((len(frames),), not memory, dtype=torch.bool)  # (N,)
    zeros = Memories.zeros(ids, model.shape)
    result = step(model, Events(rows, features, reset), *views(zeros))
    top = result.output.argmax(dim=1).tolist()  # (N,)
    right = [model.labels[p] == f.animal for p, f in zip(top, frames, strict=True)]
    ambiguous = [r for r, f in zip(right, frames, strict=True) if f.ambiguous]
    return Accuracy(
        ambiguous=sum(ambiguous) / len(ambiguous) if ambiguous else float("nan"),
        overall=sum(right) / len(right) if right else float("nan"),
        ambiguous_frames=len(ambiguous),
        frames=len(right),
    )


def train_and_save(path: Path = DEMO_MODEL, seed: int = 0) -> StreamModel:
    """Train and write the model atomically (``StreamModel.save``)."""
    model = train(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    logger.info("wrote %s (version %s)", path, model.version)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    """Retrain the demo model, write it, and print how much its memory matters."""
    parser = argparse.ArgumentParser(
        prog="python -m workers.dev.tvshows",
        description="Retrain the demo model on the TV-shows workload and write it.",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--out", type=Path, default=DEMO_MODEL, help="where to write it")
    parser.add_argument("--eval-seed", type=int, default=1, help="seed of the scoring workload")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    model = train_and_save(args.out, args.seed)
    elapsed = time.perf_counter() - start
    frames = workload(channels=200, frames_per_channel=50, seed=args.eval_seed)
    with_memory = accuracy(model, frames, memory=True)
    without = accuracy(model, frames, memory=False)
    print(f"model {model.version} -> {args.out} ({args.out.stat().st_size} bytes)")
    print(f"trained in {elapsed:.1f} s (seed {args.seed})")
    print(
        f"accuracy on {with_memory.ambiguous_frames} ambiguous frames (wolf/dog) of "
        f"{with_memory.frames}: with memory {with_memory.ambiguous:.3f}, "
        f"memory reset at every event {without.ambiguous:.3f}"
    )
    print(
        f"accuracy on all frames: with memory {with_memory.overall:.3f}, "
        f"memory reset at every event {without.overall:.3f}"
    )


if __name__ == "__main__":
    main()
