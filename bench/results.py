"""Write one benchmark's section of bench/RESULTS.md, leaving the other sections as they are."""

from __future__ import annotations

import os
import platform
import re
import sys
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "# Benchmark results\n\nEach section is rewritten by the benchmark named in it.\n"


def machine() -> str:
    """One line saying where and when a figure was measured."""
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.platform(terse=True)}; Python {sys.version.split()[0]}, "
        f"torch {version('torch')}"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_section(title: str, body: str) -> None:
    """Replace the ``## title`` section of RESULTS.md (or append it) with ``body``."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADING
    section = f"## {title}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text + "\n" + section
    RESULTS.write_text(re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n")
