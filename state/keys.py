"""The Redis key layout: every key stream-lstm writes is named here, and only here.

One entity's memory lives in one string key::

    <namespace>:mem:<model_version>:{<escaped entity id>}

- The part in braces is a Redis Cluster hash tag, so every key of one entity (today one, later
  perhaps more) hashes to the same slot, and the slot depends on the entity alone: the same
  entity maps to the same slot under every namespace and model version.
- Entity ids are arbitrary UTF-8 (colons, slashes, spaces, emoji). Redis takes the first ``{``
  and the first ``}`` after it as the tag, so the id is escaped percent-style: ``%`` becomes
  ``%25``, ``{`` becomes ``%7B`` and ``}`` becomes ``%7D``. The escaped id holds no brace, so
  the tag is exactly the escaped id, and escaping is one-to-one, so no two ids share a key.
  Everything else stays as it is, which keeps keys short (memory per entity counts) and
  readable in ``redis-cli``.
- The empty id is refused: its tag ``{}`` would be empty, which Redis ignores.
- Namespace and model version are restricted to letters, digits, ``.``, ``_`` and ``-``: they
  can neither open a hash tag, nor contain the ``:`` separator, nor hold a glob metacharacter
  (so the SCAN pattern needs no escaping).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from stream_lstm.exceptions import ConfigError

__all__ = ["KeyLayout"]

MEMORY = "mem"
"""The key kind of an entity's memory (its states, step and fences in one value)."""
FENCE = "fence"
"""The key kind of a partition's fence: the highest offset any commit carried for it."""
OUTSIDE_WRITES = "resets"
"""The key kind of the outside-writes counter: writes no partition's owner sees coming (resets,
and writes that give a memory fences on another partition), which its cache and fast commit
must see. Named as earlier builds named their reset counter, which it continues: a reset made
by an earlier build's API still clears these workers' caches."""
DURABLE = "durable"
"""The key kind of the durability marker: every wait for durability writes it first."""
TOPIC = "topic"
"""The key kind of the input topic's identity: the topic whose offsets the fences count."""
TAKEN_OVER = "taken-over"
"""The key kind of the take-over record: which deployment took this app id's stream over, and
from which input offsets it emits (workers/takeover.py)."""

_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _escape(entity_id: str) -> str:
    """The hash-tag content of an id: braces and the escape character percent-encoded."""
    if not entity_id:
        raise ValueError("entity ids must be non-empty: the hash tag '{}' would be ignored")
    return entity_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """The keys of one namespace and model version.

    Raises ConfigError when namespace or model_version holds anything but letters, digits,
    ``.``, ``_`` and ``-``.
    """

    namespace: str
    model_version: str

    def __post_init__(self) -> None:
        for setting in ("namespace", "model_version"):
            value = getattr(self, setting)
            if not _NAME.fullmatch(value):
                raise ConfigError(
                    f"{setting} {value!r} is invalid: use letters, digits, '.', '_' and '-'"
                )

    @property
    def memory_prefix(self) -> str:
        """What every memory key of this namespace and model version starts with."""
        return f"{self.namespace}:{MEMORY}:{self.model_version}:"

    @property
    def memory_pattern(self) -> str:
        """The SCAN pattern matching exactly this namespace and version's memory keys."""
        return self.memory_prefix + "{*}"

    def memory(self, entity_id: str) -> str:
        """The key of one entity's memory."""
        return f"{self.memory_prefix}{{{_escape(entity_id)}}}"

    def fence(self, partition: int) -> str:
        """The key of one input partition's fence (one server only: it has no hash tag)."""
        return f"{self.namespace}:{FENCE}:{self.model_version}:{partition}"

    @property
    def outside_writes(self) -> str:
        """The key counting outside writes (one server only: it has no hash tag)."""
        return f"{self.namespace}:{OUTSIDE_WRITES}:{self.model_version}"

    @property
    def durable(self) -> str:
        """The key a durability wait writes first, so that the wait covers every write Redis
        acknowledged before it (one server only: it has no hash tag)."""
        return f"{self.namespace}:{DURABLE}:{self.model_version}"

    @property
    def topic(self) -> str:
        """The key naming the input topic (name and Kafka topic id) whose offsets every stored
        fence counts: another topic's offsets are not comparable with them. Read and written
        alone, so it needs no hash tag on a cluster."""
        return f"{self.namespace}:{TOPIC}:{self.model_version}"

    @property
    def taken_over(self) -> str:
        """The key of the namespace's take-over record, one per namespace whatever the model
        version: once another deployment has taken the stream over, no worker of this namespace
        may emit again. Read and written alone, so it needs no hash tag on a cluster."""
        return f"{self.namespace}:{TAKEN_OVER}"

    def memories(self, entity_ids: Sequence[str]) -> list[str]:
        """The keys of many entities' memories, in order."""
        prefix = self.memory_prefix
        return [f"{prefix}{{{_escape(entity_id)}}}" for entity_id in entity_ids]
