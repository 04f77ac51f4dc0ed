"""The commands a new user meets first: the demo and the dev stack, run as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import require_apache_kafka


@pytest.mark.slow
def test_demo_prints_a_summary_where_memory_resolves_the_ambiguous_frames() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "demo", "--channels", "30", "--frames", "30"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    with_memory = float(re.search(r"with memory \(the channel's LTM/STM\)\s+([\d.]+)%", out)[1])  # type: ignore[index]
    without = float(re.search(r"memory reset at every event\s+([\d.]+)%", out)[1])  # type: ignore[index]
    assert with_memory > 85.0
    assert without < 70.0
    assert re.search(r"Throughput: 1800 events in [\d.]+s = [\d,]+ events/s", out)
    assert re.search(r"p50 [\d.]+ ms, p95 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert "Dead letters: 0" in out
    assert re.search(r"Stored memory of channel 'nature-\d+' after 30 frames", out)


@pytest.mark.slow
@pytest.mark.parametrize("kafka", ["tansu", "apache"])
def test_dev_keeps_a_stack_up_and_stops_all_of_it_on_sigterm(kafka: str) -> None:
    if kafka == "apache":
        require_apache_kafka()
    with subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "dev", "--kafka", kafka],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as process:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(lines)
        health = re.search(r"curl (http://127\.0\.0\.1:\d+)/health", text)
        assert health, text
        assert re.search(r"export STREAM_LSTM_BROKER=kafka://127\.0\.0\.1:\d+", text)
        assert re.search(r"export STREAM_LSTM_REDIS_URL=redis://127\.0\.0\.1:\d+", text)
        with urllib.request.urlopen(health[1] + "/health", timeout=10) as response:
            assert response.status == 200
        children = _children(process.pid)
        assert len(children) >= 3, "broker, Redis and worker"

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        time.sleep(0.5)
        assert not [pid for pid in children if _alive(pid)], "everything it started is stopped"


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
