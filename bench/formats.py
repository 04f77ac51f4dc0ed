"""What each event format costs the worker: decoding and checking an event, encoding a prediction.

    python bench/formats.py [--batch 1024] [--rounds 30]

A default run takes about 20 seconds (``--quick``: a few, not written).

The worker's own functions on the target model's shapes (input 32, 8 labels): ``check`` on a
batch of well-formed events, in JSON and in the binary format (msgpack, features packed as
float32), and the prediction encoding of ``apply`` for each format. Each figure is the median of
``--rounds`` timings of a whole batch, in microseconds an event, with the message size; ratios
against JSON in the same run. Results: bench/RESULTS.md, section "Event formats".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import orjson
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import machine, write_section
from stream_lstm.engine import Events, StepResult, step, views
from stream_lstm.memories import Memories
from stream_lstm.model import StreamModel
from stream_lstm.schema import Format
from workers.batch import Checked, Record, _predictions, apply, check

INPUT, HIDDEN, LABELS = 32, 128, [f"label-{k}" for k in range(8)]


def records(batch: int, packed: bool) -> list[Record]:
    """A batch of well-formed events of ``batch`` entities, in one format."""
    features = np.round(np.random.default_rng(1).standard_normal((batch, INPUT)), 4)
    made = []
    for n, row in enumerate(features):
        entity = f"entity-{n:06d}"
        fields = {"entity_id": entity, "event_id": f"e-{n}"}
        if packed:
            value = msgspec.msgpack.encode({**fields, "features": row.astype("<f4").tobytes()})
        else:
            value = orjson.dumps({**fields, "features": row.tolist()})
        made.append(Record("events", 0, n, entity.encode(), value))
    return made


def events_of(checked: Checked) -> Events:
    return Events(
        torch.from_numpy(checked.rows),
        torch.from_numpy(checked.features),
        torch.from_numpy(checked.reset),
    )


def per_event_us(run: Callable[[], object], events: int, rounds: int) -> float:
    """The median of ``rounds`` timings of ``run``, in microseconds an event."""
    run()  # warm caches and decoders
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times) / events


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1024, help="events a batch")
    parser.add_argument("--rounds", type=int, default=30, help="timed batches a figure")
    parser.add_argument("--quick", action="store_true", help="3 rounds; not written")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = StreamModel.from_torch(nn.LSTM(INPUT, HIDDEN), nn.Linear(HIDDEN, 8), labels=LABELS)

    rows = []
    formats: list[Format] = ["json", "msgpack"]
    for fmt in formats:
        batch = records(args.batch, packed=fmt == "msgpack")

        def decode_all(b: list[Record] = batch, f: Format = fmt) -> object:
            return check(b, INPUT, 65_536, f)

        decode = per_event_us(decode_all, len(batch), rounds)
        checked = check(batch, INPUT, 65_536, fmt)
        assert len(checked.records) == len(batch), "every event well-formed"
        zeros = Memories.zeros(checked.ids, model.shape)
        states, steps = views(zeros)
        result = step(model, events_of(checked), states, steps)

        def encode_all(c: Checked = checked, f: Format = fmt, out: StepResult = result) -> object:
            return _predictions(
                model, c.entity_ids, c.event_ids, c.records, out.output, out.step, f
            )

        encode = per_event_us(encode_all, len(batch), rounds)
        predictions = apply(model, checked, zeros, fmt).predictions
        event_bytes = statistics.mean(len(r.value or b"") for r in batch)
        prediction_bytes = statistics.mean(len(value) for _, value in predictions)
        rows.append((fmt, decode, encode, event_bytes, prediction_bytes))
        print(f"{fmt}: decode {decode:.2f} us/event, encode {encode:.2f} us/event", flush=True)

    json_decode, json_encode = rows[0][1], rows[0][2]
    table = "\n".join(
        f"| {name} | {decode:.2f} ({decode / json_decode:.2f}x) | {event_bytes:.0f} | "
        f"{encode:.2f} ({encode / json_encode:.2f}x) | {prediction_bytes:.0f} |"
        for name, decode, encode, event_bytes, prediction_bytes in rows
    )
    body = f"""`python bench/formats.py --batch {args.batch} --rounds {rounds}` ({machine()}).

The worker's own functions, one process, one torch thread: `check` (decode and validate) on a
batch of {args.batch:,} well-formed events of {INPUT} features, and the encoding of their
predictions (8 labels) as `apply` does it. Medians of {rounds} batches, microseconds an event;
ratios against JSON in the same run.

| format | decode + check, us an event | event bytes | encode a prediction, us | prediction bytes |
|---|---|---|---|---|
{table}

The binary format is msgpack with the float lists packed as float32 (`stream_lstm/schema.py`):
msgspec decodes a map and one bin where JSON has 32 numbers to parse and range-check, and
checks the features' finiteness on the whole batch's array at once.
"""
    print("\n" + body)
    if not args.quick:
        write_section("Event formats", body)
        print("written to bench/RESULTS.md, section 'Event formats'")


if __name__ == "__main__":
    main()
