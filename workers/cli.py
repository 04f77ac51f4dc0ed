"""The ``stream-lstm`` command: run a worker, publish events, tail predictions, query memories.

Every worker setting is an environment variable (``STREAM_LSTM_*``) and a flag of the same name;
a flag wins. The command line is the top of the three layers (``stream_lstm`` <- ``state`` <-
``workers``); what it runs is imported inside each command, so ``--help`` answers without
importing torch, Redis or Kafka clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar, cast

import click

from stream_lstm.exceptions import StreamLSTMError

if TYPE_CHECKING:
    from state import MemoryStore
    from stream_lstm.model import StreamModel
    from workers.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

EXIT_REFUSED = 2
"""A setting refused (one line names it), or memories made from another input topic."""
EXIT_SOFTWARE = 70
"""An error the worker cannot retry: the batch is replayed on restart."""
CLI_WAIT_S = 3.0
"""How long a command waits for a broker or Redis that does not answer: a person is waiting."""
EXIT_INTERRUPTED = 130
"""Ctrl-C, as a shell reports it."""
PROGRESS_S = 2.0
"""How often a long command (export, import, gc) prints its counts."""


def settings_options(*names: str, kafka: bool = False) -> Callable[[F], F]:
    """Add a flag for each named setting (all of them when none are named), help from the field;
    ``kafka``: also the broker's address and security settings."""
    from workers.settings import KAFKA_CONNECTION, Settings, env_name

    def decorate(command: F) -> F:
        fields = Settings.model_fields
        named = (*KAFKA_CONNECTION, *names) if kafka else names
        for name in reversed(named or tuple(fields)):
            field = fields[name]
            default = "unset" if field.default is None else field.default
            command = click.option(
                f"--{name.replace('_', '-')}",
                name,
                default=None,
                help=f"{field.description} [env {env_name(name)}; default: {default}]",
            )(command)
        return command

    return decorate


def fail_clearly(command: F) -> F:
    """Turn our own errors into one line on stderr and exit status 2, no traceback; a refusal
    by the broker or Redis names the setting to fix."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from workers.settings import blame

        try:
            return command(*args, **kwargs)
        except StreamLSTMError as e:
            click.echo(f"stream-lstm: error: {blame(e)}", err=True)
            sys.exit(EXIT_REFUSED)

    return run  # type: ignore[return-value]


def quietly(command: F) -> F:
    """A person waits on this command: it logs errors only (the outcome, not each retry)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.ERROR, format="stream-lstm: %(message)s")
        return command(*args, **kwargs)

    return run  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="stream-lstm")
def main() -> None:
    """Stateful LSTM inference for many entities on a Kafka stream, memories in Redis.

    Events (JSON, keyed by entity id) go in on one topic; a worker runs one batched LSTM step
    per micro-batch and writes a prediction per event to another topic, keeping each entity's
    long- and short-term memory in Redis.
    """


@main.command()
@settings_options()
@fail_clearly
def worker(**flags: Any) -> None:
    """Run a worker: read events, predict, emit, keep memories. SIGTERM stops it cleanly.

    It joins the consumer group APP_ID, creates missing topics with PARTITIONS partitions,
    serves GET/DELETE /entities/{id}/memory, /health and /metrics on WEB_PORT, and on
    SIGTERM finishes the batch in hand, commits it and exits 0.
    """
    import torch

    from stream_lstm.exceptions import TakenOverError, TopicChangedError
    from workers.app import StreamWorker
    from workers.preflight import preflight
    from workers.settings import Settings

    settings = Settings.load(**flags)
    torch.set_num_threads(settings.torch_threads)
    model = load_model(settings)
    asyncio.run(preflight(settings, model))
    failure = StreamWorker(settings, model).run()
    if failure is not None:  # logged where it happened, with the batch it stopped
        refused = isinstance(failure, (TopicChangedError, TakenOverError))
        sys.exit(EXIT_REFUSED if refused else EXIT_SOFTWARE)


@main.command()
@click.argument("file", type=click.File("rb"))
@settings_options("input_topic", "event_format", kafka=True)
@fail_clearly
@quietly
def publish(file: IO[bytes], **flags: Any) -> None:
    """Send JSONL events from FILE (or - for stdin), each keyed by its entity_id; with
    --event-format msgpack, each in the binary format (features packed as float32).

    A line that is not an event with an entity_id is sent as is, without a key: the worker
    puts it on the dead-letter topic with the reason.
    """
    from workers.settings import Settings

    settings = Settings.load(**flags)
    lines = [line for line in file.read().splitlines() if line.strip()]
    sent = asyncio.run(_publish(settings, lines))
    click.echo(
        f"published {sent} events to {settings.input_topic} ({settings.event_format})", err=True
    )


async def _publish(settings: Settings, lines: list[bytes]) -> int:
    await settings.kafka.check(CLI_WAIT_S)
    producer = settings.kafka.producer(acks="all")
    await producer.start()
    try:
        with click.progressbar(length=len(lines), label="publishing", file=sys.stderr) as bar:
            pending = []
            for line in lines:
                value = _packed(line) if settings.event_format == "msgpack" else line
                pending.append(
                    await producer.send(settings.input_topic, value, key=_entity_key(line))
                )
                bar.update(1)
            await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return len(lines)


def _entity_key(line: bytes) -> bytes | None:
    import orjson

    try:
        entity = orjson.loads(line).get("entity_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return entity.encode() if isinstance(entity, str) else None


def _packed(line: bytes) -> bytes:
    """A JSON event in the binary format: msgpack, its features packed as float32. A line the
    event schema refuses is sent as is, for the worker to dead-letter (as not msgpack)."""
    import msgspec
    import numpy as np
    from pydantic import ValidationError

    from stream_lstm.schema import PACKED, Event

    try:
        event = Event.model_validate_json(line)
    except ValidationError:
        return line
    fields = event.model_dump(exclude_defaults=True)
    fields["features"] = np.asarray(event.features, PACKED).tobytes()
    return msgspec.msgpack.encode(fields)


@main.command()
@settings_options("output_topic", "prediction_format", kafka=True)
@click.option(
    "--from-beginning", is_flag=True, help="Start at the oldest prediction, not the newest."
)
@click.option("--limit", type=click.IntRange(min=1), help="Exit after this many predictions.")
@click.option(
    "--idle-timeout-s", type=click.FloatRange(min=0), help="Exit after this long without one."
)
@fail_clearly
@quietly
def tail(
    from_beginning: bool, limit: int | None, idle_timeout_s: float | None, **flags: Any
) -> None:
    """Print the prediction stream as JSONL on stdout, until Ctrl-C (or --limit / idle timeout);
    binary (msgpack) predictions too, with --prediction-format msgpack."""
    from workers.settings import Settings

    settings = Settings.load(**flags)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_tail(settings, from_beginning, limit, idle_timeout_s))


async def _tail(
    settings: Settings, from_beginning: bool, limit: int | None, idle_timeout_s: float | None
) -> None:
    await settings.kafka.check(CLI_WAIT_S)
    consumer = settings.kafka.consumer(
        settings.output_topic,
        group_id=None,
        auto_offset_reset="earliest" if from_beginning else "latest",
        enable_auto_commit=False,
        fetch_max_wait_ms=100,  # print predictions as they come, not every 500 ms
    )
    await consumer.start()
    printed = 0
    try:
        while limit is None or printed < limit:
            timeout_ms = int(idle_timeout_s * 1000) if idle_timeout_s is not None else 60_000
            batches = await consumer.getmany(timeout_ms=timeout_ms)
            if not batches and idle_timeout_s is not None:
                return
            for record in _in_order(batches):
                value = record.value
                if settings.prediction_format == "msgpack":
                    value = _unpacked(value)
                sys.stdout.buffer.write(value + b"\n")
                printed += 1
                if limit is not None and printed >= limit:
                    break
            sys.stdout.flush()
    finally:
        await consumer.stop()


def _unpacked(value: bytes) -> bytes:
    """A binary prediction as JSON (its output as numbers); a value that is not one as a JSON
    object holding it in base64, so that every line printed is JSON."""
    import base64

    import msgspec
    import numpy as np
    import orjson

    try:
        prediction = msgspec.msgpack.decode(value)
        prediction["output"] = np.frombuffer(prediction["output"], "<f4").tolist()
        return orjson.dumps(prediction)
    except Exception:  # any value at all may come: none stops tail
        return orjson.dumps({"not_a_prediction": base64.b64encode(value).decode()})


def _in_order(batches: dict[Any, list[Any]]) -> Iterator[Any]:
    for records in batches.values():
        yield from records


@main.command()
@click.option(
    "--channels",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="TV channels (entities).",
)
@click.option(
    "--frames",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Frames (events) per channel.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=2000.0,
    show_default=True,
    help="Events offered per second (0: as fast as possible).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the workload.")
@fail_clearly
def demo(channels: int, frames: int, rate: float, seed: int) -> None:
    """Run the lecture's TV-show example on an embedded stack, print a summary, stop everything.

    Starts a Kafka-protocol broker (Tansu), a Redis-protocol server and a worker with the
    bundled TV-show model on free local ports; streams each channel's frames twice (with
    memory, and with memory reset at every event); prints accuracy on the ambiguous dog-or-wolf
    frames, events/s, latency percentiles and one channel's stored memory. Ctrl-C stops it all.
    """
    from workers.dev import demo as run_demo
    from workers.dev.stack import Stack

    with _stopped_by_sigterm(), tempfile.TemporaryDirectory(prefix="stream-lstm-demo-") as tmp:
        click.echo("starting the broker, Redis and a worker ...", err=True)
        started = time.monotonic()
        with Stack(Path(tmp)) as stack:
            click.echo(f"stack up in {time.monotonic() - started:.1f}s", err=True)
            summary = run_demo.run(stack, channels, frames, rate, seed)
            status, snapshot = stack.worker.memory(summary.showcase)
            if status != 200:
                raise StreamLSTMError(f"no memory of {summary.showcase!r}: {snapshot}")
        click.echo(run_demo.report(summary, snapshot, rate))


@main.command()
@settings_options("model", "max_batch", "max_delay_ms")
@click.option(
    "--kafka",
    type=click.Choice(["tansu", "apache"]),
    default="tansu",
    show_default=True,
    help="The broker: Tansu (embedded, in memory) or Apache Kafka (needs Java 17+ and Maven; "
    "the first run fetches its jars from Maven Central into ~/.cache/stream-lstm).",
)
@fail_clearly
def dev(kafka: str, **flags: Any) -> None:
    """Start a broker, Redis and a worker on free local ports and keep them up until Ctrl-C.

    Prints the addresses to export in another terminal, to publish, tail and query there.
    """
    from workers.dev.stack import Stack

    settings = {k: str(v) for k, v in flags.items() if v is not None}
    click.echo(f"starting {kafka}, Redis and a worker ...", err=True)
    with (
        _stopped_by_sigterm(),
        tempfile.TemporaryDirectory(prefix="stream-lstm-dev-") as tmp,
        Stack(Path(tmp), settings, kafka=cast(Literal["tansu", "apache"], kafka)) as stack,
    ):
        click.echo(
            "stream-lstm dev stack is up; in another terminal:\n\n"
            f"  export STREAM_LSTM_BROKER={stack.broker.url}\n"
            f"  export STREAM_LSTM_REDIS_URL={stack.redis.url}\n"
            f"  stream-lstm publish events.jsonl\n"
            f"  stream-lstm tail --from-beginning\n"
            f"  curl {stack.worker.web_url}/health\n\n"
            f"worker log: {stack.worker.log_path}\nCtrl-C stops everything."
        )
        with contextlib.suppress(KeyboardInterrupt):
            while stack.worker.process is not None and stack.worker.process.poll() is None:
                time.sleep(0.5)
        click.echo("stopping ...", err=True)


@contextlib.contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so every process we started is stopped on the way out."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@main.group()
def memory() -> None:
    """Read, reset or erase stored memories directly in Redis; export, import, collect garbage."""


def _entity_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value:
        raise click.BadParameter("an entity id is not empty")
    try:
        value.encode()
    except UnicodeEncodeError:  # bytes the terminal's encoding could not read
        raise click.BadParameter("an entity id is UTF-8 text") from None
    return value


@memory.command("get")
@click.argument("entity_id", callback=_entity_id)
@settings_options("redis_url", "app_id", "model", "device")
@fail_clearly
@quietly
def memory_get(entity_id: str, **flags: Any) -> None:
    """Print ENTITY_ID's memory (MemorySnapshot JSON); exit 1 when none is stored."""
    from stream_lstm.schema import MemorySnapshot
    from workers.app import memory_snapshot
    from workers.settings import Settings

    settings = Settings.load(**flags)
    model = load_model(settings)

    async def get() -> MemorySnapshot | None:
        async with settings.memory_store(model.version, retry_s=CLI_WAIT_S) as store:
            stored = await store.get(entity_id)
        return memory_snapshot(entity_id, stored, model) if stored is not None else None

    snapshot = asyncio.run(get())
    if snapshot is None:
        click.echo(f"no memory stored for {entity_id!r} (model {model.version})", err=True)
        sys.exit(1)
    click.echo(snapshot.model_dump_json())


@memory.command("reset")
@click.argument("entity_id", callback=_entity_id)
@settings_options("redis_url", "app_id", "model", "device")
@fail_clearly
@quietly
def memory_reset(entity_id: str, **flags: Any) -> None:
    """Reset ENTITY_ID's memory to zeros (its next event is step 1); exit 1 when none is stored."""
    from workers.settings import Settings

    settings = Settings.load(**flags)
    model = load_model(settings)

    async def reset() -> bool:
        async with settings.memory_store(model.version, retry_s=CLI_WAIT_S) as store:
            return await store.reset(entity_id)

    if not asyncio.run(reset()):
        click.echo(f"no memory stored for {entity_id!r} (model {model.version})", err=True)
        sys.exit(1)
    click.echo(f"reset {entity_id!r}", err=True)


@memory.command("erase")
@click.argument("entity_id", callback=_entity_id)
@settings_options("redis_url", "app_id", "model", "device")
@fail_clearly
@quietly
def memory_erase(entity_id: str, **flags: Any) -> None:
    """Delete ENTITY_ID's memories under every model version of the app id (right to erasure);
    exit 1 when none is stored.

    Running workers' memory caches let go of it. Its events arriving later start it again from
    zeros; predictions already on the output topic are not erased. A batch a worker had already
    loaded it for may still write it back: erase once its events have stopped.
    """
    from workers.settings import Settings

    settings = Settings.load(**flags)
    model = load_model(settings)

    async def erase() -> list[str]:
        async with _plain_store(settings, model.version) as store:
            return await store.erase(entity_id)

    versions = asyncio.run(erase())
    if not versions:
        click.echo(
            f"no memory stored for {entity_id!r} under any model version of app id "
            f"{settings.app_id}",
            err=True,
        )
        sys.exit(1)
    for version in versions:
        click.echo(f"erased the memory of {entity_id!r} of model {version}", err=True)


@memory.command("export")
@click.argument("file", type=click.Path(dir_okay=False, writable=True, allow_dash=True))
@settings_options("redis_url", "app_id", "model", "device")
@fail_clearly
@quietly
def memory_export(file: str, **flags: Any) -> None:
    """Write every memory of the app id and model to FILE (- for stdout), as stored: states,
    steps and fences, bit-exact, for stream-lstm memory import.

    SCANs Redis a thousand memories at a time, so memory stays bounded; counts go to stderr.
    FILE appears only once complete (an interrupted export leaves none; on stdout it lacks
    the end, and an import refuses it). Not a snapshot: memories that workers write
    meanwhile are exported as each was read.
    """
    from state.archive import export_memories
    from workers.settings import Settings

    if file == "-" and sys.stdout.isatty():
        raise click.UsageError("an export is binary: redirect stdout, or name a FILE")
    settings = Settings.load(**flags)
    model = load_model(settings)
    shown = "stdout" if file == "-" else file
    progress = _Progress()
    count = [0]

    def exported(n: int) -> None:
        count[0] = n
        progress(f"exported {n} memories so far")

    async def export(out: IO[bytes]) -> int:
        async with _plain_store(settings, model.version) as store:
            return await export_memories(store, out, model.shape, progress=exported)

    try:
        with _written_whole(file) as out:
            total = asyncio.run(export(out))
    except KeyboardInterrupt:
        where = "stdout's copy lacks its end" if file == "-" else f"{file} not written"
        click.echo(f"stream-lstm: export interrupted after {count[0]} memories: {where}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second complaint
        click.echo(f"stream-lstm: error: stdout closed after {count[0]} memories", err=True)
        sys.exit(EXIT_REFUSED)
    except OSError as error:  # no such directory, disk full: FILE is not written
        click.echo(f"stream-lstm: error: cannot write {shown}: {error.strerror or error}", err=True)
        sys.exit(EXIT_REFUSED)
    click.echo(f"exported {total} memories of model {model.version} to {shown}", err=True)


@contextlib.contextmanager
def _written_whole(file: str) -> Iterator[IO[bytes]]:
    """Stdout for -, else a temporary file beside FILE (readable by its owner alone) that
    becomes FILE once written whole, and is removed otherwise."""
    if file == "-":
        yield sys.stdout.buffer
        return
    path = Path(file)
    partial = tempfile.NamedTemporaryFile(  # noqa: SIM115 (renamed or removed below)
        dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False
    )
    try:
        with partial:
            yield partial
            os.fsync(partial.fileno())
        os.replace(partial.name, path)
    except BaseException:
        Path(partial.name).unlink(missing_ok=True)
        raise


@memory.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option(
    "--replace", is_flag=True, help="Overwrite memories already stored (by default they stay)."
)
@click.option(
    "--any-version",
    is_flag=True,
    help="Import a file of another model version under the configured model's version (its "
    "memories must have the configured model's shape).",
)
@settings_options("redis_url", "app_id", "model", "device", "memory_ttl_s")
@fail_clearly
@quietly
def memory_import(file: str, replace: bool, any_version: bool, **flags: Any) -> None:
    """Load the memories stream-lstm memory export wrote to FILE (- for stdin) into Redis, under the
    app id and model version configured.

    All of FILE is checked before anything is written: a file that is not an export, is
    truncated or holds a value that does not decode is refused (exit 2), and so is one of
    another model version, unless --any-version. An entity that already has a memory keeps it,
    unless --replace. Running workers' memory caches let go of what is written. With
    MEMORY_TTL_S, imported memories expire as workers' writes do.
    """
    from state.archive import Imported, check_export, import_memories
    from workers.settings import Settings

    if file == "-" and sys.stdin.isatty():
        raise click.UsageError("an export is binary: redirect stdin, or name a FILE")
    settings = Settings.load(**flags)
    model = load_model(settings)
    shown = "stdin" if file == "-" else file
    with contextlib.ExitStack() as stack:
        source = sys.stdin.buffer if file == "-" else stack.enter_context(open(file, "rb"))
        checked = check_export(
            source, shown, model_version=model.version, shape=model.shape, any_version=any_version
        )
        stack.callback(checked.close)
        header = checked.header
        click.echo(
            f"checked {shown}: {checked.count} memories of model {header.model_version!r}, "
            f"exported from app id {header.namespace!r} at {header.created_at!r}",
            err=True,
        )
        progress = _Progress()
        so_far = [Imported(0, 0)]

        def imported(counts: Imported) -> None:
            so_far[0] = counts
            progress(f"imported {counts.written + counts.kept} memories so far")

        async def load() -> Imported:
            async with _plain_store(settings, model.version) as store:
                return await import_memories(store, checked, replace=replace, progress=imported)

        try:
            counts = asyncio.run(load())
        except KeyboardInterrupt:
            click.echo(
                f"stream-lstm: import interrupted after {so_far[0].written} memories were "
                "written; importing again keeps them (or --replace overwrites them)",
                err=True,
            )
            sys.exit(EXIT_INTERRUPTED)
    kept = (
        f", {counts.kept} kept (already stored; --replace overwrites them)" if not replace else ""
    )
    click.echo(
        f"imported {checked.count} memories of model {model.version} from {shown}: "
        f"{counts.written} written{kept}",
        err=True,
    )


@memory.command("gc")
@click.option(
    "--keep",
    multiple=True,
    required=True,
    help="A model version whose keys stay; repeat for more. The others' keys go.",
)
@click.option("--dry-run", is_flag=True, help="Count each model version's keys; delete nothing.")
@settings_options("redis_url", "app_id")
@fail_clearly
@quietly
def memory_gc(keep: tuple[str, ...], dry_run: bool, **flags: Any) -> None:
    """Remove every key of the app id's model versions but those named by --keep: memories,
    fences, counters, recorded topics. Never another app id's keys.

    A model version to keep must hold memories (a typo would remove the version meant); run
    with --dry-run first to see each version's keys. SCANs Redis and deletes a thousand keys at
    a time, so memory stays bounded; counts go to stderr.
    """
    from state import Sweep
    from stream_lstm.exceptions import ConfigError
    from workers.settings import Settings

    settings = Settings.load(**flags)
    progress = _Progress()
    verb = "counted" if dry_run else "removed"

    def swept(sweep: Sweep) -> None:
        progress(f"{verb} {sum(sweep.removed.values())} keys so far")

    async def gc() -> Sweep:
        async with _plain_store(settings, keep[0]) as store:
            if not dry_run:
                for version in keep:
                    if not await store.has_memories(version):
                        raise ConfigError(
                            f"--keep {version}: app id {settings.app_id} holds no memory of "
                            f"model version {version} (a typo would remove the version meant); "
                            "nothing removed. --dry-run lists each version's keys"
                        )
            return await store.gc(keep, dry_run=dry_run, progress=swept)

    sweep = asyncio.run(gc())
    would = "would remove" if dry_run else "removed"
    for version, keys in sorted(sweep.removed.items()):
        click.echo(f"model {version}: {would} {keys} keys")
    for version in sorted({*keep, *sweep.kept}):
        click.echo(f"model {version}: kept {sweep.kept.get(version, 0)} keys")
    click.echo(
        f"{would} {sum(sweep.removed.values())} keys of {len(sweep.removed)} other model "
        f"versions of app id {settings.app_id}",
        err=True,
    )


def _plain_store(settings: Settings, model_version: str) -> MemoryStore:
    """The store a command reads and writes through: no cache, a person's patience."""
    return settings.memory_store(model_version, retry_s=CLI_WAIT_S, cache_entities=0)


class _Progress:
    """Prints a long command's counts on stderr, at most every PROGRESS_S."""

    def __init__(self) -> None:
        self.due = time.monotonic() + PROGRESS_S

    def __call__(self, line: str) -> None:
        now = time.monotonic()
        if now >= self.due:
            click.echo(line, err=True)
            self.due = now + PROGRESS_S


def load_model(settings: Settings) -> StreamModel:
    """The model named by the settings; a bad file is a ConfigError naming STREAM_LSTM_MODEL."""
    from stream_lstm.exceptions import ConfigError, ModelError
    from stream_lstm.model import StreamModel
    from workers.settings import env_name

    path = settings.model
    try:
        return StreamModel.load(path, device=settings.device)
    except ModelError as e:
        raise ConfigError(f"{env_name('model')} / --model: {e}") from e


if __name__ == "__main__":  # python -m workers.cli, what the dev stack and tests start
    main(prog_name="stream-lstm")
