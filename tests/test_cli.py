"""The stream-lstm command: complete help, clear refusals of bad settings and model files, and
a worker that leaves nothing in the working directory."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import subprocess
import sys
from pathlib import Path

import click
import faust
import pytest
import torch
from aiokafka.errors import KafkaConnectionError
from click.testing import CliRunner

from stream_lstm.exceptions import BrokerError
from stream_lstm.model import StreamModel
from tests.stack import save_model
from workers.app import StreamWorker, _Worker
from workers.cli import main
from workers.connection import KafkaConnection
from workers.preflight import preflight
from workers.settings import Settings

COMMANDS = [
    [],
    ["worker"],
    ["publish"],
    ["tail"],
    ["memory"],
    ["memory", "get"],
    ["memory", "reset"],
    ["memory", "erase"],
    ["memory", "export"],
    ["memory", "import"],
    ["memory", "gc"],
]


def command_of(path: list[str]) -> click.Command:
    command: click.Command = main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "stream-lstm")
def test_help_names_every_option_and_argument(path: list[str]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    command = command_of(path)
    assert (command.help or "").split("\n")[0].strip()[:40] in " ".join(result.output.split())
    for param in command.params:
        if isinstance(param, click.Option):
            assert any(opt in result.output for opt in param.opts), param.name
            assert param.help, f"--{param.name} has no help"
        else:
            assert (param.name or "").upper() in result.output
    if isinstance(command, click.Group):
        for name in command.commands:
            assert name in result.output


def test_worker_help_names_each_environment_variable() -> None:
    from workers.settings import Settings, env_name

    output = CliRunner().invoke(main, ["worker", "--help"], terminal_width=200).output
    for name in Settings.model_fields:
        assert env_name(name) in output


def test_a_bad_setting_stops_the_worker_naming_it() -> None:
    env = {**os.environ, "STREAM_LSTM_MAX_BATCH": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "worker"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "STREAM_LSTM_MAX_BATCH / --max-batch" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--broker", "localhost:9092"],
            "STREAM_LSTM_BROKER / --broker: Value error, must start with kafka://",
        ),
        (["--redis-url", "http://x"], "STREAM_LSTM_REDIS_URL / --redis-url"),
        (["--device", "tpu"], "STREAM_LSTM_DEVICE / --device"),
        (["--input-topic", "bad topic"], "STREAM_LSTM_INPUT_TOPIC / --input-topic"),
        (["--memory-ttl-s", "-5"], "STREAM_LSTM_MEMORY_TTL_S / --memory-ttl-s"),
        (["--model", "/nonexistent/model.pt"], "STREAM_LSTM_MODEL / --model: model file"),
    ],
)
def test_bad_worker_configuration_fails_at_start(
    flags: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STREAM_LSTM_MODEL", raising=False)
    result = CliRunner().invoke(main, ["worker", *flags])
    assert result.exit_code == 2
    assert message in result.output


def test_a_worker_without_a_model_setting_warns_that_it_serves_the_demo_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 16: a worker whose STREAM_LSTM_MODEL is unset serves the bundled TV-show model;
    it starts (the demo and the dev stack rely on it) but says so loudly, and only then."""
    monkeypatch.delenv("STREAM_LSTM_MODEL", raising=False)

    async def broker_away(wait_s: float) -> None:
        raise BrokerError("the test stops here, after the model check")

    for settings, warns in [
        (Settings.load(), True),
        (Settings.load(model=save_model(tmp_path / "mine.pt", seed=1)), False),
    ]:
        caplog.clear()
        monkeypatch.setattr(type(settings.kafka), "check", lambda self, wait_s: broker_away(wait_s))
        with pytest.raises(BrokerError):
            asyncio.run(preflight(settings, StreamModel.load(settings.model)))
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("serving the bundled TV-show demo model" in m for m in said) == warns, said


def test_a_corrupt_model_file_fails_at_start(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a model")
    result = CliRunner().invoke(main, ["worker", "--model", str(path)])
    assert result.exit_code == 2
    assert "STREAM_LSTM_MODEL / --model: model file" in result.output
    assert "corrupt or truncated" in result.output


def test_the_worker_keeps_faust_data_out_of_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STREAM_LSTM_DATA_DIR", raising=False)
    model = StreamModel.from_torch(torch.nn.LSTM(2, 3))

    worker = StreamWorker(Settings.load(app_id="datadir-test"), model)
    asyncio.run(worker.app.on_first_start())  # where Faust creates datadir, appdir, tabledir
    datadir = worker.app.conf.datadir
    assert datadir == worker.data_dir
    assert datadir.is_absolute()
    assert not datadir.is_relative_to(tmp_path)
    assert (datadir / "v1" / "tables").is_dir()
    assert list(tmp_path.iterdir()) == []

    configured = tmp_path / "faust {data}"  # braces: Faust formats the path; ours are literal
    worker = StreamWorker(Settings.load(data_dir=configured), model)
    assert worker.app.conf.datadir == configured


def test_a_request_left_unread_on_a_broken_connection_prints_no_traceback(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """aiokafka may leave a request's error unread when the broker breaks the connection (a
    client certificate refused after the TLS 1.3 handshake): asyncio would print it with a
    traceback when it is collected, after the one line that says what was refused. Other
    unread errors still reach asyncio's default handler."""

    async def leave_unread(error: BaseException) -> None:
        future = asyncio.get_running_loop().create_future()
        future.set_exception(error)
        del future
        gc.collect()

    async def main() -> None:
        with contextlib.suppress(BrokerError):
            await KafkaConnection("127.0.0.1:1").check(0.1)  # installs the handler
        broken = KafkaConnectionError("Connection at 127.0.0.1:9093 broken: bad certificate")
        await leave_unread(broken)
        await leave_unread(ValueError("not ours to hide"))

    with caplog.at_level(logging.DEBUG, logger="workers.connection"):
        asyncio.run(main())
    shown = capsys.readouterr().err + "".join(
        r.getMessage() for r in caplog.records if r.name == "asyncio"
    )
    assert "bad certificate" not in shown
    assert "not ours to hide" in shown
    assert any("bad certificate" in r.getMessage() for r in caplog.records if r.levelno == 10)


@pytest.mark.parametrize("level", ["warn", "error"])
def test_a_quiet_worker_leaves_debug_logging_off(level: str) -> None:
    """Faust's terminal spinner sets the root logger to DEBUG at level warn and above: every
    library's debug line would then be built and formatted, on the hot path too."""
    root = logging.getLogger()
    before = root.level
    worker = _Worker(faust.App("quiet", broker="kafka://localhost:1"), loglevel=level)
    try:
        worker._setup_logging()
        assert worker.spinner is None
        assert not logging.getLogger("aiokafka.conn").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(before)
        for handler in root.handlers[:]:
            if type(handler).__module__.startswith(("mode", "faust")):
                root.removeHandler(handler)
