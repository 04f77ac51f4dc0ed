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


def write_section(title: str, body: str, *, after: str | None = None) -> None:
    """Replace the ``## title`` section of RESULTS.md with ``body``; a new section goes right
    after the ``## after`` one when there is one, else at the end."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADING
    section = f"## {title}\n\n{body.strip()}\n\n"
    if (found := _section(title).search(text)) is not None:
        start, end = found.span()
    elif after is not None and (sibling := _section(after).search(text)) is not None:
        start = end = sibling.end()
    else:
        start = end = len(text)
    text = text[:start] + "\n" + section + text[end:]
    RESULTS.write_text(re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n")


def _section(title: str) -> re.Pattern[str]:
    """The ``## title`` section: its heading line up to the next ``## `` heading or the end."""
    return re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
