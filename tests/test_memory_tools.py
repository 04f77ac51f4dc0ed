"""Export and import, erase and gc of memories, on a real server and a 3-primary Redis Cluster:
bit-exact round trips both ways, files refused whole, one entity erased under every version and
nothing else, other versions collected and nothing else; and the same through the command line.
"""

from __future__ import annotations

import asyncio
import io
import struct
import subprocess
import sys
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner, Result

from state import MemoryStore
from state.archive import CheckedExport, check_export, export_memories, import_memories
from state.connection import connect
from state.keys import KeyLayout, NamespaceKeys
from stream_lstm.exceptions import ArchiveError, StoreError, TopicChangedError
from stream_lstm.memories import Memories, Shape
from stream_lstm.model import StreamModel
from tests.stack import save_model
from tests.test_store import AWKWARD_IDS, make_updates
from workers.cli import main
from workers.dev.redis_server import RedisClusterServer, RedisServer

SHAPE = Shape(2, 2, 4)
TOPIC = '{"topic": "events", "topic_id": "6c1b4cbb-0f5f-4a35-9ad5-6f4bbd1a2a9c"}'


def namespace() -> str:
    return f"tools-{uuid.uuid4().hex[:12]}"


def urls(redis_server: RedisServer, redis_cluster: RedisClusterServer) -> dict[str, str]:
    return {"server": redis_server.url, "cluster": redis_cluster.url}


@pytest.fixture(params=["server", "cluster"])
def url(
    request: pytest.FixtureRequest, redis_server: RedisServer, redis_cluster: RedisClusterServer
) -> str:
    """A real server, then the cluster."""
    return urls(redis_server, redis_cluster)[request.param]


def odd_updates(entity_ids: Sequence[str], offset: int, seed: int) -> Memories:
    """Updates with random memories and the floats a careless copy would change: -0.0, NaN
    payloads, infinities, subnormals."""
    updates = make_updates(entity_ids, offset, layers=SHAPE.layers, hidden=SHAPE.hidden)
    rng = np.random.default_rng(seed)
    odd = np.array([-0.0, np.inf, -np.inf, 1e-45], np.float32).view(np.uint32).tolist()
    odd.append(0x7FC00123)  # a NaN with a payload
    for state in updates.states:
        state[...] = rng.normal(size=state.shape).astype(np.float32)
        state.reshape(-1).view(np.uint32)[: len(odd)] = odd
    return updates


async def filled(url: str, version: str = "v1") -> str:
    """A new namespace holding memories of every awkward id in float32, of others in float16,
    one with fences on three partitions and a reset (format 2), and the input topic recorded."""
    ns = namespace()
    async with (
        MemoryStore(url, ns, version) as store,
        MemoryStore(url, ns, version, dtype="float16") as halves,
    ):
        await store.commit_many(odd_updates(AWKWARD_IDS, 7, seed=1))
        await halves.commit_many(odd_updates([f"half-{n}" for n in range(30)], 9, seed=2))
        fenced = odd_updates(["fenced"], 11, seed=3)
        fenced.other_fences[0] = {1: 40, 3: 2}
        await store.commit_many(fenced)
        assert await store.reset("fenced")
        assert await store.claim_topic(TOPIC) is None
    return ns


FILLED = len(AWKWARD_IDS) + 31


async def stored(url: str, ns: str, version: str = "v1") -> dict[str, bytes]:
    """Every memory of a namespace and version, as Redis holds it, by entity id."""
    layout = KeyLayout(ns, version)
    async with connect(url, 5.0) as client:
        keys = [key async for key in client.scan_iter(match=layout.memory_pattern)]
        values = [await client.get(key) for key in keys]
    found = {layout.entity_id(key): value for key, value in zip(keys, values, strict=True)}
    return {entity_id: value for entity_id, value in found.items() if entity_id is not None}


async def every_key(url: str, ns: str) -> set[bytes]:
    """The keys of a namespace and of those whose names it begins (never expiring ones of
    other tests)."""
    async with connect(url, 5.0) as client:
        return {key async for key in client.scan_iter(match=f"{ns}*")}


async def exported(url: str, ns: str, version: str = "v1", shape: Shape = SHAPE) -> bytes:
    async with MemoryStore(url, ns, version) as store:
        file = io.BytesIO()
        assert await export_memories(store, file, shape, chunk=7) == len(
            await stored(url, ns, version)
        )
        return file.getvalue()


def checked(data: bytes, version: str = "v1", *, any_version: bool = False) -> CheckedExport:
    return check_export(
        io.BytesIO(data),
        "memories.bin",
        model_version=version,
        shape=SHAPE,
        any_version=any_version,
    )


def export_file(records: Sequence[tuple[bytes, bytes]], **fields: object) -> bytes:
    """An export made by hand, for files an export never writes (``fields``: the header's)."""
    header = {"format": 1, "namespace": "ns", "model_version": "v1", "shape": list(SHAPE)}
    header |= {"topic": None, "created_at": "2025-01-01T00:00:00+00:00"} | fields
    line = orjson.dumps(header) + b"\n"
    body = b"".join(
        struct.pack("<I", len(e)) + e + struct.pack("<I", len(v)) + v for e, v in records
    )
    end = struct.pack("<IQI", 0, len(records), zlib.crc32(body, zlib.crc32(line)))
    return b"stream-lstm memories\n" + line + body + end


class Pipe(io.BytesIO):
    """A file that cannot be read twice, as stdin from a pipe."""

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        raise io.UnsupportedOperation("a pipe")


# --- export and import -----------------------------------------------------------------------


@pytest.mark.parametrize(("source", "target"), [("server", "cluster"), ("cluster", "server")])
async def test_an_export_imports_bit_exact_from_one_server_to_a_cluster_and_back(
    source: str, target: str, redis_server: RedisServer, redis_cluster: RedisClusterServer
) -> None:
    where = urls(redis_server, redis_cluster)
    ns, copy = await filled(where[source]), namespace()
    data = await exported(where[source], ns)
    counts: list[tuple[int, int]] = []
    async with MemoryStore(where[target], copy, "v1") as store:
        done = await import_memories(
            store, checked(data), chunk=7, progress=lambda c: counts.append((c.written, c.kept))
        )
        assert await store.recorded_topic() == TOPIC
    original = await stored(where[source], ns)
    assert len(original) == FILLED
    formats = {(value[4], value[5]) for value in original.values()}  # (format, dtype code)
    assert formats == {(1, 1), (1, 2), (2, 1)}  # float32, float16, more fences
    assert await stored(where[target], copy) == original  # every byte of every value
    assert (done.written, done.kept) == (FILLED, 0)
    assert counts == [(min(n, FILLED), 0) for n in range(7, FILLED + 7, 7)]


async def test_a_file_from_a_pipe_is_checked_whole_then_imported(redis_server: RedisServer) -> None:
    ns, copy = await filled(redis_server.url), namespace()
    data = await exported(redis_server.url, ns)
    pipe = check_export(Pipe(data), "stdin", model_version="v1", shape=SHAPE)
    try:
        async with MemoryStore(redis_server.url, copy, "v1") as store:
            await import_memories(store, pipe)
    finally:
        pipe.close()
    assert await stored(redis_server.url, copy) == await stored(redis_server.url, ns)
    with pytest.raises(ArchiveError, match="stdin is truncated"):
        check_export(Pipe(data[:-1]), "stdin", model_version="v1", shape=SHAPE)


async def test_an_empty_namespace_exports_a_file_of_no_memories(url: str) -> None:
    data = await exported(url, namespace())
    assert checked(data).count == 0
    async with MemoryStore(url, namespace(), "v1") as store:
        assert (await import_memories(store, checked(data))).written == 0
        assert await store.recorded_topic() is None


async def test_a_foreign_value_stops_an_export_naming_its_entity(url: str) -> None:
    ns = namespace()
    async with connect(url, 5.0) as client:
        await client.set(KeyLayout(ns, "v1").memory("junk"), b"junk")
    with pytest.raises(StoreError, match="entity 'junk': value of 4 bytes is shorter"):
        await exported(url, ns)


async def test_another_model_version_is_refused_unless_any_version(
    redis_server: RedisServer,
) -> None:
    ns = await filled(redis_server.url)
    data = await exported(redis_server.url, ns, "v1")
    with pytest.raises(ArchiveError, match="model version 'v1', not of the configured model's v2"):
        checked(data, "v2")
    async with MemoryStore(redis_server.url, ns, "v2") as store:
        await import_memories(store, checked(data, "v2", any_version=True))
    assert await stored(redis_server.url, ns, "v2") == await stored(redis_server.url, ns, "v1")
    with pytest.raises(ArchiveError, match=r"2 states of \(layers 2, hidden 4\); the config"):
        check_export(
            io.BytesIO(data), "f", model_version="v2", shape=Shape(2, 1, 4), any_version=True
        )


async def test_a_value_of_another_shape_is_refused_naming_its_entity(
    redis_server: RedisServer,
) -> None:
    ns = namespace()
    async with MemoryStore(redis_server.url, ns, "v1") as store:
        await store.commit_many(make_updates(["wide"], 3, layers=2, hidden=4))
        await store.commit_many(make_updates(["narrow"], 3, layers=1, hidden=4))
    values = await stored(redis_server.url, ns)
    data = export_file([(b"wide", values["wide"]), ("нарро".encode(), values["narrow"])])
    with pytest.raises(ArchiveError, match="entity 'нарро': stored memory has 2 states of"):
        checked(data, "v2", any_version=True)


def damaged(data: bytes) -> dict[str, tuple[bytes, str]]:
    """Files an import must refuse, each with what the refusal says."""
    first = data.index(b"\n", len(b"stream-lstm memories\n")) + 1  # the first record
    (id_length,) = struct.unpack_from("<I", data, first)
    value = first + 4 + id_length + 4
    flipped = bytearray(data)
    flipped[value + 44] ^= 0x01  # a state's bit: it still decodes, the checksum says no
    return {
        "empty": (b"", "is not a stream-lstm memory export"),
        "garbage": (bytes(range(256)) * 4, "is not a stream-lstm memory export"),
        "json": (b'{"entity_id": "a"}\n', "is not a stream-lstm memory export"),
        "no header": (data[: first - 5], "its header is not an export's"),
        "cut in a value": (data[: value + 3], "is truncated: it ends in a value after 0 memories"),
        "cut before the end": (data[:-16], "is truncated: it ends in a record after"),
        "cut in the end": (data[:-3], "is truncated: it ends in the end after"),
        "a bit flipped": (bytes(flipped), "its checksum does not match"),
        "a header changed": (
            data.replace(b'"created_at":"2', b'"created_at":"3', 1),
            "its checksum does not match",
        ),
        "a topic not ours": (export_file([], topic="not json"), "its header is not an export's"),
        "a format not a number": (export_file([], format=True), "an export of format True"),
        "more after the end": (data + b"\0", "goes on after the end of its records"),
        "a count that lies": (data[:-12] + struct.pack("<QI", 3, 0), "says it holds 3"),
        "a foreign value": (export_file([(b"x", b"not a memory")]), "entity 'x': value of 12"),
        "an id not UTF-8": (export_file([(b"\xff", b"")]), "the entity id is not UTF-8"),
    }


async def test_a_damaged_file_is_refused_in_one_line_and_nothing_is_written(
    redis_server: RedisServer,
) -> None:
    ns, target = await filled(redis_server.url), namespace()
    data = await exported(redis_server.url, ns)
    for case, (file, says) in damaged(data).items():
        with pytest.raises(ArchiveError, match=says) as refused:
            checked(file)
        assert "\n" not in str(refused.value), case
    assert not await every_key(redis_server.url, target)


async def test_an_import_keeps_stored_memories_unless_replace(url: str) -> None:
    ns = namespace()
    async with MemoryStore(url, ns, "v1") as store:
        await store.commit_many(make_updates(["a", "b"], 5))
        data = await exported(url, ns)
        await store.commit_many(make_updates(["a"], 6))
        await store.erase("b")
        newer = await stored(url, ns)
        done = await import_memories(store, checked(data))
        assert (done.written, done.kept) == (1, 1)
        assert (await stored(url, ns))["a"] == newer["a"]  # kept: the one stored
        done = await import_memories(store, checked(data), replace=True)
        assert (done.written, done.kept) == (2, 0)
        assert await stored(url, ns) == {e: checked_value(data, e) for e in ("a", "b")}


def checked_value(data: bytes, entity_id: str) -> bytes:
    """The value an export holds for one entity."""
    for entity_ids, values in checked(data).chunks():
        if entity_id in entity_ids:
            return values[entity_ids.index(entity_id)]
    raise AssertionError(f"{entity_id!r} is not in the export")


async def test_imported_memories_expire_as_the_store_s_own_writes_do(url: str) -> None:
    ns = namespace()
    async with MemoryStore(url, ns, "v1") as store:
        await store.commit_many(make_updates(["a"], 5))
        data = await exported(url, ns)
    async with MemoryStore(url, ns, "v1", ttl_s=60) as store:
        await import_memories(store, checked(data), replace=True)
    async with connect(url, 5.0) as client:
        assert 0 < await client.pttl(KeyLayout(ns, "v1").memory("a")) <= 60_000


async def test_an_import_clears_the_memory_caches_of_running_workers(
    redis_server: RedisServer,
) -> None:
    ns = namespace()
    async with (
        MemoryStore(redis_server.url, ns, "v1", cache_entities=100) as worker,
        MemoryStore(redis_server.url, ns, "v1") as cli,
    ):
        await cli.commit_many(make_updates(["a"], 5))
        data = await exported(redis_server.url, ns)
        await worker.load_many(["a"], SHAPE)  # the worker has read the counter
        await worker.commit_many(make_updates(["a"], 8))  # and cached a at 8
        await import_memories(cli, checked(data), replace=True)
        loaded = (await worker.load_many(["a"], SHAPE)).memories
    assert loaded.fence_offset.tolist() == [5]  # what was imported, not what was cached


async def test_an_import_refuses_memories_of_another_input_topic(
    redis_server: RedisServer,
) -> None:
    ns, target = await filled(redis_server.url), namespace()
    data = await exported(redis_server.url, ns)
    async with MemoryStore(redis_server.url, target, "v1") as store:
        await store.claim_topic('{"topic": "events", "topic_id": "another"}')
        with pytest.raises(TopicChangedError, match="fences count another topic's offsets"):
            await import_memories(store, checked(data))
    assert len(await every_key(redis_server.url, target)) == 1  # the topic alone


async def test_an_import_of_no_recorded_topic_into_one_that_records_a_topic_is_refused(
    redis_server: RedisServer,
) -> None:
    ns, target = namespace(), namespace()
    async with MemoryStore(redis_server.url, ns, "v1") as store:
        await store.commit_many(make_updates(["a"], 3, layers=SHAPE.layers, hidden=SHAPE.hidden))
    data = export_file([(b"a", (await stored(redis_server.url, ns))["a"])])
    async with MemoryStore(redis_server.url, target, "v1") as store:
        await store.claim_topic('{"topic": "events", "topic_id": "x"}')
        with pytest.raises(TopicChangedError, match="records no input topic, but Redis records"):
            await import_memories(store, checked(data))
    assert len(await every_key(redis_server.url, target)) == 1  # the topic alone


# --- erase -----------------------------------------------------------------------------------

LONG = "y*" * 200  # longer than a SCAN pattern holds of an id
NEIGHBOURS = ["a", "a*", "ab", "a*b", "a?", "[a]", "%", "%25", "%7B", "{", "{}", "a\\", "*"]
NEIGHBOURS += [LONG, f"{LONG}b", LONG[:-1]]


@pytest.mark.parametrize("erased", ["a*", "%", "{", "[a]", "*", LONG], ids=lambda e: e[:5])
async def test_erase_removes_one_entity_under_every_version_and_nothing_else(
    url: str, erased: str
) -> None:
    ns = namespace()
    for version in ("v1", "v2"):
        async with MemoryStore(url, ns, version) as store:
            await store.commit_many(make_updates(NEIGHBOURS, 3))
    async with MemoryStore(url, f"{ns}x", "v1") as elsewhere:  # its name begins with ns
        await elsewhere.commit_many(make_updates([erased], 3))
    before = await every_key(url, ns)
    async with MemoryStore(url, ns, "v3") as store:  # a store of any version erases them all
        assert await store.erase(erased) == ["v1", "v2"]
        assert await store.erase(erased) == []
    gone = {KeyLayout(ns, v).memory(erased).encode() for v in ("v1", "v2")}
    assert gone <= before
    counters = {KeyLayout(ns, v).outside_writes.encode() for v in ("v1", "v2")}
    assert await every_key(url, ns) == before - gone | (counters if "cluster" not in url else set())


async def test_an_erased_memory_is_not_written_back_from_a_cache(
    redis_server: RedisServer,
) -> None:
    ns = namespace()
    async with (
        MemoryStore(redis_server.url, ns, "v1", cache_entities=100) as worker,
        MemoryStore(redis_server.url, ns, "v2") as cli,
    ):
        await worker.load_many(["a", "b"], SHAPE)  # the worker has read the counter
        await worker.commit_many(make_updates(["a", "b"], 5))  # and cached both
        assert await cli.erase("a") == ["v1"]
        loaded = await worker.load_many(["a", "b"], SHAPE, partitions=[0])
        assert loaded.memories.found.tolist() == [False, True]
        assert (loaded.memories.states[0][0] == 0).all()  # a starts again from zeros
        assert loaded.memories.step.tolist() == [0, 5]


async def test_a_batch_loaded_before_an_erase_can_write_the_entity_back(
    redis_server: RedisServer,
) -> None:
    """Why the docs say to erase once an entity's events have stopped: a batch in flight
    carries the memory it loaded, and with nothing stored its commit applies."""
    ns = namespace()
    async with (
        MemoryStore(redis_server.url, ns, "v1", cache_entities=100) as worker,
        MemoryStore(redis_server.url, ns, "v1") as cli,
    ):
        await worker.commit_many(make_updates(["a"], 5))
        loaded = await worker.load_many(["a"], SHAPE, partitions=[0])
        assert await cli.erase("a") == ["v1"]
        await worker.commit_many(make_updates(["a"], 6), loaded=loaded)
        assert await cli.get("a") is not None


# --- gc --------------------------------------------------------------------------------------


async def test_gc_counts_in_a_dry_run_then_removes_other_versions_only(url: str) -> None:
    ns = namespace()
    for version, n in (("v1", 3), ("v2", 4), ("v3", 1500)):
        async with MemoryStore(url, ns, version) as store:
            await store.commit_many(make_updates([f"e{i}" for i in range(n)], 5))
            await store.reset("e0")  # on one server, an outside-writes counter too
            await store.claim_topic(TOPIC)
    async with MemoryStore(url, f"{ns}x", "v1") as elsewhere:
        await elsewhere.commit_many(make_updates(["e0"], 5))
    async with connect(url, 5.0) as client:  # keys in the namespace that are not ours
        await client.set(f"{ns}:mem:v1:{{%7}}", b"x")
        await client.set(f"{ns}:notes", b"x")
    before = await every_key(url, ns)
    extra = 3 if url.startswith("redis://") else 1  # the topic; a partition fence, a counter
    async with MemoryStore(url, ns, "v2") as store:
        counted: list[int] = []
        dry = await store.gc(
            dry_run=True, progress=lambda sweep: counted.append(sum(sweep.removed.values()))
        )
        assert dry.removed == {"v1": 3 + extra, "v3": 1500 + extra}
        assert dry.kept == {"v2": 4 + extra}
        assert counted[-1] == 1503 + 2 * extra
        assert await every_key(url, ns) == before
        sweep = await store.gc(["v1"])
    assert sweep.removed == {"v3": 1500 + extra}
    assert sweep.kept == {"v1": 3 + extra, "v2": 4 + extra}
    names = NamespaceKeys(ns)
    assert await every_key(url, ns) == {key for key in before if names.version_of(key) != "v3"}


# --- the command line ------------------------------------------------------------------------


def test_the_command_line_exports_imports_erases_and_collects(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    path = save_model(tmp_path / "model.pt", seed=0, hidden=SHAPE.hidden, layers=SHAPE.layers)
    version = StreamModel.load(path).version
    ns, copy = asyncio.run(filled(redis_server.url, version)), namespace()
    redis = ["--redis-url", redis_server.url]

    command = [sys.executable, "-m", "workers.cli", "memory", "export", "-"]
    export = subprocess.run(  # the command itself, its binary stdout
        [*command, "--app-id", ns, *redis, "--model", str(path)],
        capture_output=True,
        check=False,
    )
    assert export.returncode == 0, export.stderr
    assert export.stderr.decode() == f"exported {FILLED} memories of model {version} to stdout\n"

    runner = CliRunner()

    def cli(*args: str, app_id: str = ns, model: Path = path, input: bytes | None = None) -> Result:
        flags = ["--app-id", app_id, *redis, "--model", str(model)]
        return runner.invoke(main, ["memory", *args, *flags], input=input)

    done = cli("import", "-", app_id=copy, input=export.stdout)
    assert done.exit_code == 0, done.output
    assert done.stderr.endswith(
        f"{FILLED} written, 0 kept (already stored; --replace overwrites them)\n"
    )
    assert asyncio.run(stored(redis_server.url, copy, version)) == asyncio.run(
        stored(redis_server.url, ns, version)
    )
    cut = tmp_path / "cut.bin"
    cut.write_bytes(export.stdout[:-1])
    refused = cli("import", str(cut), app_id=copy)
    assert (refused.exit_code, refused.stdout) == (2, "")
    assert refused.stderr == (
        f"stream-lstm: error: {cut} is truncated: it ends in the end after {FILLED} memories "
        "(an export interrupted, or a copy cut short)\n"
    )

    file = tmp_path / "memories.bin"
    assert cli("export", str(file)).exit_code == 0
    with file.open("rb") as written:
        assert check_export(written, "f", model_version=version, shape=SHAPE).count == FILLED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.bin", "memories.bin", "model.pt"]
    assert file.stat().st_mode & 0o777 == 0o600  # memories may be personal data

    erased = cli("erase", "🧠 emoji ünïcödé 漢字")
    assert erased.exit_code == 0, erased.output
    assert erased.stderr == f"erased the memory of '🧠 emoji ünïcödé 漢字' of model {version}\n"
    assert cli("erase", "🧠 emoji ünïcödé 漢字").exit_code == 1
    assert cli("erase", "").exit_code == 2
    assert cli("erase", "\udcff").exit_code == 2  # bytes that are not UTF-8, as argv has them

    other = save_model(tmp_path / "other.pt", seed=1, hidden=SHAPE.hidden, layers=SHAPE.layers)
    retrained = StreamModel.load(other).version
    refused = cli("import", str(file), model=other)
    assert refused.exit_code == 2
    assert refused.stderr == (
        f"stream-lstm: error: {file} holds memories of model version {version!r}, not of the "
        f"configured model's {retrained} (--any-version imports them under {retrained} when "
        "they have its shape)\n"
    )
    moved = cli("import", str(file), "--any-version", model=other)
    assert moved.exit_code == 0, moved.output
    assert len(asyncio.run(stored(redis_server.url, ns, retrained))) == FILLED

    def gc(*args: str) -> Result:
        return runner.invoke(main, ["memory", "gc", *args, "--app-id", ns, *redis])

    assert gc().exit_code == 2  # no --keep
    typo = gc("--keep", version[:-1])
    assert (typo.exit_code, typo.stdout) == (2, "")
    assert f"holds no memory of model version {version[:-1]}" in typo.stderr
    dry = gc("--keep", retrained, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout == (
        # Besides memories, a partition fence, the topic, the outside-writes counter; the
        # import recorded the topic and counted itself an outside write.
        f"model {version}: would remove {FILLED - 1 + 3} keys\n"
        f"model {retrained}: kept {FILLED + 2} keys\n"
    )
    swept = gc("--keep", retrained)
    assert swept.stdout == dry.stdout.replace("would remove", "removed")
    assert asyncio.run(stored(redis_server.url, ns, version)) == {}
