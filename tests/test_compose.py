"""docker-compose.yml and the Dockerfile, checked by reading: no Docker engine needed.

The compose file is parsed with PyYAML and interpolated the way Compose does (``${VAR:-default}``,
``$$``); the worker's environment must be valid ``Settings``, the topic creator must create the
topics those settings name (its script runs here with a stub ``kafka-topics.sh``), and the worker
must scale: no container name, no fixed host port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from stream_lstm.exceptions import ConfigError
from workers.dev.apache_kafka import KAFKA_VERSION
from workers.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
TOPICS_SCRIPT = "/opt/kafka/bin/kafka-topics.sh"

# What a user may export on the host: overrides that must reach both the topic creator and the
# workers, and a broker URL for host tools that must NOT reach the workers.
TOKEN = "compose-test-token-0123456789abcdef"
HOST_OVERRIDES = {
    "STREAM_LSTM_API_TOKEN": TOKEN,
    "STREAM_LSTM_PARTITIONS": "3",
    "STREAM_LSTM_INPUT_TOPIC": "tv-events",
    "STREAM_LSTM_APP_ID": "demo",
    "STREAM_LSTM_LOG_LEVEL": "debug",
    "STREAM_LSTM_BROKER": "kafka://localhost:9092",
    "STREAM_LSTM_REDIS_URL": "redis://localhost:6379/0",
}
HOST_ENVS = pytest.mark.parametrize(
    "host_env",
    [{"STREAM_LSTM_API_TOKEN": TOKEN}, HOST_OVERRIDES],
    ids=["defaults", "overrides"],
)

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, host_env: dict[str, str]) -> str:
    """Compose's interpolation of one string: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["name"]
        if match["op"] == ":-":
            return host_env.get(name) or match["default"]
        if match["op"] == "-":
            return host_env.get(name, match["default"])
        return host_env.get(name, "")

    assert "${" not in _VARIABLE.sub("", value), f"interpolation this test cannot do: {value!r}"
    return _VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict), "docker-compose.yml is not a mapping"
    return loaded


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    services = compose["services"]
    assert name in services, f"no {name!r} service in {sorted(services)}"
    spec: dict[str, Any] = services[name]
    return spec


def environment(spec: dict[str, Any], host_env: dict[str, str]) -> dict[str, str]:
    """A service's environment (mapping or KEY=VALUE list), interpolated."""
    raw = spec.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    for key, value in raw.items():
        assert value is not None, f"{key} has no value: it would come from the host unchecked"
    return {key: interpolate(str(value), host_env) for key, value in raw.items()}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def exec_form(instruction: str) -> list[str]:
    values = [json.loads(args) for keyword, args in dockerfile() if keyword == instruction]
    assert values, f"the Dockerfile has no {instruction} in exec (JSON) form"
    last: list[str] = values[-1]
    return last


def as_list(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def port_mappings(spec: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(published host port or range or None, container port) for each of a service's ports."""
    mappings: list[tuple[str | None, str]] = []
    for port in spec.get("ports", []):
        if isinstance(port, dict):
            published = port.get("published")
            mappings.append((str(published) if published else None, str(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        target = parts[-1]
        published = parts[-2] if len(parts) >= 2 else None
        mappings.append((published or None, target))
    return mappings


def worker_settings(
    compose: dict[str, Any], host_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The Settings a worker container would load: only its compose environment, nothing else."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in environment(service(compose, "worker"), host_env).items():
        monkeypatch.setenv(key, value)
    return Settings.load()


def test_services_are_kafka_redis_topic_creator_and_worker(compose: dict[str, Any]) -> None:
    assert {"kafka", "redis", "topics", "worker"} <= set(compose["services"])


def test_kafka_is_a_single_kraft_node_advertised_as_kafka_9092(compose: dict[str, Any]) -> None:
    kafka = service(compose, "kafka")
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}", "the version the tests run"
    env = environment(kafka, {})
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_NODE_ID"] == "1"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert env["CLUSTER_ID"]
    for setting in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[setting] == "1", setting
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"

    # name -> container port, e.g. PLAINTEXT://:9092; name -> host:port, e.g. PLAINTEXT://kafka:9092
    listeners = {
        name: address.rsplit(":", 1)[1]
        for name, address in (item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    }
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]] == "kafka:9092"
    assert listeners[env["KAFKA_CONTROLLER_LISTENER_NAMES"]] == "9093"
    assert set(listeners) <= set(protocols), "a listener without a security protocol"
    # Every advertised address outside the compose network is a host port mapped to its listener.
    published = dict(port_mappings(kafka))
    for name, address in advertised.items():
        host, port = address.rsplit(":", 1)
        if host != "kafka":
            assert published.get(port) == listeners[name], f"{name}://{address} is not mapped"

    assert "/var/lib/kafka/data" in [v.split(":")[1] for v in kafka["volumes"]]
    assert env["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"
    assert "kafka-topics.sh" in " ".join(kafka["healthcheck"]["test"])


def test_redis_persists_with_aof(compose: dict[str, Any]) -> None:
    redis = service(compose, "redis")
    assert redis["image"].startswith("redis:7")
    command = " ".join(as_list(redis["command"]))
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert as_list(redis["healthcheck"]["test"])[-2:] == ["redis-cli", "ping"]


def test_worker_runs_stream_lstm_worker_from_the_dockerfile(compose: dict[str, Any]) -> None:
    worker = service(compose, "worker")
    build = worker["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    name = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / name).resolve() == DOCKERFILE
    assert exec_form("ENTRYPOINT") == ["stream-lstm"]
    assert exec_form("CMD") == ["worker"]
    entrypoint = as_list(worker.get("entrypoint", exec_form("ENTRYPOINT")))
    command = as_list(worker.get("command", exec_form("CMD")))
    assert [*entrypoint, *command] == ["stream-lstm", "worker"]


def test_worker_scales_no_container_name_no_fixed_host_port(compose: dict[str, Any]) -> None:
    worker = service(compose, "worker")
    assert "container_name" not in worker, "replicas cannot share a container name"
    assert "hostname" not in worker
    for published, target in port_mappings(worker):
        assert published is None or "-" in published, f"host port {published} for {target}"
    web_port = str(Settings.model_fields["web_port"].default)
    assert web_port in [target for _, target in port_mappings(worker)]


def test_worker_environment_names_only_real_settings(compose: dict[str, Any]) -> None:
    worker = environment(service(compose, "worker"), {"STREAM_LSTM_API_TOKEN": TOKEN})
    names = [name for name in worker if ENV_PREFIX in name]
    assert names, "the worker has no STREAM_LSTM_* environment"
    for name in names:
        assert name.startswith(ENV_PREFIX), f"{name}: the prefix is {ENV_PREFIX}"
        assert name.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, (
            f"{name} is not a field of workers.settings.Settings"
        )


@HOST_ENVS
def test_worker_environment_validates_and_names_the_compose_services(
    compose: dict[str, Any], host_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = worker_settings(compose, host_env, monkeypatch)
    assert settings.bootstrap_servers == "kafka:9092"
    assert settings.redis_url.startswith("redis://redis:6379/")
    assert settings.device == "cpu", "the image has the CPU build of torch"
    assert settings.partitions == int(host_env.get("STREAM_LSTM_PARTITIONS", 8))
    # Published beyond the container, so every interface, and never without a token.
    assert settings.web_bind == "0.0.0.0"
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == TOKEN
    assert settings.app_id == host_env.get("STREAM_LSTM_APP_ID", "stream-lstm")
    # A model named here may live only in the container (a mount): it need not exist here.
    model = environment(service(compose, "worker"), host_env).get("STREAM_LSTM_MODEL")
    if model is not None:
        assert settings.model == Path(model)


def test_the_worker_does_not_start_without_an_api_token(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="STREAM_LSTM_API_TOKEN"):
        worker_settings(compose, {}, monkeypatch)


@HOST_ENVS
def test_topic_creator_creates_exactly_the_workers_topics(
    compose: dict[str, Any],
    host_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    settings = worker_settings(compose, host_env, monkeypatch)
    topics = service(compose, "topics")
    assert topics["image"] == service(compose, "kafka")["image"]
    assert topics["restart"] == "no"
    *shell, script = as_list(topics["entrypoint"]) + as_list(topics["command"])
    assert shell == ["/bin/sh", "-c"]
    script = interpolate(script, host_env)
    assert TOPICS_SCRIPT in script
    calls_file = tmp_path / "calls"
    stub = tmp_path / "kafka-topics.sh"
    log = shlex.quote(str(calls_file))
    stub.write_text(f"#!/bin/sh\nprintf '%s\\037' \"$@\" >> {log}\necho >> {log}\n")
    stub.chmod(0o755)

    subprocess.run(
        [*shell, script.replace(TOPICS_SCRIPT, str(stub))],
        env={"PATH": os.environ["PATH"], **environment(topics, host_env)},
        check=True,
        timeout=10,
    )

    assert calls_file.exists(), "the script never ran kafka-topics.sh"
    calls = [line.split("\x1f")[:-1] for line in calls_file.read_text().splitlines()]

    def option(args: list[str], name: str) -> str:
        return args[args.index(name) + 1]

    for args in calls:
        assert "--create" in args
        assert "--if-not-exists" in args
        assert option(args, "--bootstrap-server") == "kafka:9092"
        assert option(args, "--partitions") == str(settings.partitions)
        assert option(args, "--replication-factor") == "1"
    created = sorted(option(args, "--topic") for args in calls)
    assert created == sorted(
        [settings.input_topic, settings.output_topic, settings.dead_letter_topic]
    )
    kafka_env = environment(service(compose, "kafka"), host_env)
    assert kafka_env.get("KAFKA_NUM_PARTITIONS", str(settings.partitions)) == str(
        settings.partitions
    )


def test_services_start_in_order(compose: dict[str, Any]) -> None:
    def conditions(name: str) -> dict[str, str]:
        return {
            dependency: spec["condition"]
            for dependency, spec in service(compose, name)["depends_on"].items()
        }

    assert conditions("topics") == {"kafka": "service_healthy"}
    assert conditions("worker") == {
        "redis": "service_healthy",
        "topics": "service_completed_successfully",
    }


def test_worker_stops_on_sigterm_with_grace_and_checks_health(compose: dict[str, Any]) -> None:
    worker = service(compose, "worker")
    assert worker["stop_signal"] == "SIGTERM"
    grace = re.fullmatch(r"(\d+)s", str(worker["stop_grace_period"]))
    assert grace is not None, worker["stop_grace_period"]
    assert 10 <= int(grace[1]) <= 60, "time to finish the batch in hand, not minutes"
    check = as_list(worker["healthcheck"]["test"])
    assert check[:3] == ["CMD", "python", "-c"], "no curl in the image: check with Python"
    url = re.search(r"http://(?:localhost|127\.0\.0\.1):(\d+)/health", check[3])
    assert url is not None, check
    env = environment(worker, {"STREAM_LSTM_API_TOKEN": TOKEN})
    settings_port = env.get("STREAM_LSTM_WEB_PORT", "6066")
    assert url[1] == settings_port


def test_dockerfile_installs_cpu_torch_before_the_project() -> None:
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    torch_runs = [i for i, args in enumerate(runs) if "torch==" in args]
    project_runs = [
        i for i, args in enumerate(runs) if re.search(r"pip install .*\s\.(\s|$)", args)
    ]
    assert torch_runs, "no RUN installs torch"
    assert project_runs, "no RUN installs the project (pip install .)"
    assert torch_runs[0] < project_runs[0], "torch must be installed before the project"
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_runs[0]]
    assert "[dev]" not in runs[project_runs[0]]

    # The pinned CPU torch must satisfy the project's requirement, or `pip install .` replaces it
    # with the CUDA build from PyPI.
    pinned = re.search(r"torch==(\S+)", runs[torch_runs[0]])
    assert pinned is not None
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_requirement = next(
        Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch"
    )
    assert torch_requirement.specifier.contains(pinned[1]), (pinned[1], str(torch_requirement))


def test_dockerfile_copies_every_package_runs_as_a_user_and_exposes_the_web_port() -> None:
    instructions = dockerfile()
    copied = " ".join(args for keyword, args in instructions if keyword == "COPY")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert f"{package}/" in copied, f"the image does not copy {package}/"
    for name in ("pyproject.toml", "README.md"):
        assert name in copied
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER: the worker would run as root"
    assert users[-1] not in ("root", "0"), "the worker must not run as root"
    assert ("EXPOSE", str(Settings.model_fields["web_port"].default)) in instructions
    assert ("STOPSIGNAL", "SIGTERM") in instructions


def test_dockerignore_keeps_the_sources_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch(path, p) or fnmatch(path, p.removeprefix("**/")) for p in patterns)

    for kept in ("pyproject.toml", "README.md", "stream_lstm", "state", "workers"):
        assert not ignored(kept), f".dockerignore drops {kept}"
    assert not ignored("workers/dev/models/tv-shows.pt"), "bundled models must reach the image"
    for dropped in (".venv", ".git", ".pytest_cache", "tests"):
        assert ignored(dropped), f".dockerignore keeps {dropped}"
