"""How durable a commit must be before the store reports it: what Redis has done with it.

Redis acknowledges a write once it is in the primary's memory. The worker moves its Kafka
offsets right after, so a write lost later (a crash before the AOF's next fsync, a failover to
a replica that had not received it) loses memories whose events Kafka will not replay. A
`Durability` names what else must hold first, spelled as the setting takes it:

- ``none``: the primary's memory (Redis's acknowledgement alone).
- ``replicas:N``: also N replicas acknowledged it (``WAIT N``): survives a failover that
  promotes one of them.
- ``aof``: also fsynced to the primary's append-only file (``WAITAOF 1 0``, Redis 7.2+ or
  Valkey, ``appendonly yes``): survives a crash or restart of the primary.
- ``aof+replicas:N``: both (``WAITAOF 1 0``, then ``WAIT N``): survives either.

None of them waits for the replicas' own AOFs (``WAITAOF 1 N``): a replica reports its fsyncs
only in its once-a-second acknowledgement, so every commit would wait about a second. What none
of them survives: losing the primary and every replica that took the write before any of them
fsynced it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["TIMEOUT_MAX_S", "Durability"]

TIMEOUT_MAX_S = 4.0
"""The longest wait: below the store's reply timeout (5 s), so a wait that runs its course is
not taken for a lost connection and sent again."""
WAITAOF_SINCE = (7, 2)
"""The first Redis version with WAITAOF (every Valkey has it, and reports 7.2.4)."""

_SPELLING = re.compile(r"(none|aof|(?:aof\+)?replicas:([1-9][0-9]{0,2}))")


@dataclass(frozen=True, slots=True)
class Durability:
    """What Redis must have done with a commit, besides acknowledging it (the module says what
    each promises)."""

    aof: bool = False  # fsynced to the primary's AOF
    replicas: int = 0  # acknowledged by this many replicas

    @classmethod
    def parse(cls, value: object) -> Durability:
        """``none``, ``replicas:N``, ``aof`` or ``aof+replicas:N`` (N from 1 to 999);
        ValueError otherwise."""
        if isinstance(value, Durability):
            return value
        found = _SPELLING.fullmatch(value) if isinstance(value, str) else None
        if found is None:
            raise ValueError("must be none, replicas:N, aof or aof+replicas:N (N from 1 to 999)")
        return cls(aof=found[1].startswith("aof"), replicas=int(found[2] or 0))

    def __str__(self) -> str:
        if self.aof:
            return f"aof+replicas:{self.replicas}" if self.replicas else "aof"
        return f"replicas:{self.replicas}" if self.replicas else "none"

    @property
    def waits(self) -> bool:
        """Whether a commit waits for anything beyond Redis's acknowledgement."""
        return self.aof or self.replicas > 0

    def commands(self, timeout_s: float) -> list[list[str | int]]:
        """The commands that wait for it, each for at most ``timeout_s``: WAITAOF, WAIT or both.

        They wait for the connection's own last write: send them after a write on the same
        connection (a pipeline)."""
        timeout_ms = max(1, round(timeout_s * 1000))  # 0 would wait forever
        waits: list[list[str | int]] = [["WAITAOF", 1, 0, timeout_ms]] if self.aof else []
        if self.replicas:
            waits.append(["WAIT", self.replicas, timeout_ms])
        return waits

    def shortfall(self, replies: list[Any]) -> str | None:
        """What the replies to ``commands`` say is missing, in words; None when nothing is."""
        if self.aof and replies[0][0] < 1:
            return "the primary's AOF was not fsynced"
        if self.replicas and replies[-1] < self.replicas:
            return f"{replies[-1]} of {self.replicas} replicas acknowledged it"
        return None

    def unmet_by(self, info: Mapping[str, Any]) -> str | None:
        """Why a server whose INFO (default sections, as redis-py parses it) is ``info`` cannot
        give this durability, in words; None when it can, as far as INFO tells."""
        if self.aof:
            version = str(info.get("redis_version", "0"))
            if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < WAITAOF_SINCE:
                return (
                    f"WAITAOF needs Redis {'.'.join(map(str, WAITAOF_SINCE))} or later (or "
                    f"Valkey); the server is Redis {version}"
                )
            if not info.get("aof_enabled"):
                return "the server has appendonly no: set appendonly yes"
        online = sum(
            1
            for name, replica in info.items()
            if re.fullmatch(r"slave\d+", name)
            and isinstance(replica, Mapping)
            and replica.get("state") == "online"
        )
        if online < self.replicas:
            return f"{online} replicas online (INFO replication), fewer than {self.replicas}"
        return None
