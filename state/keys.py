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

Every key of a namespace is ``<namespace>:<kind>:<model_version>`` followed, for a memory, by
``:{<escaped entity id>}`` and, for a partition's fence, by ``:<partition>``; ``NamespaceKeys``
finds them across model versions (one entity's memories under every version, every key of the
versions to remove), and tells which version a key belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from stream_lstm.exceptions import ConfigError

__all__ = ["KeyLayout", "NamespaceKeys"]

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
KINDS = (MEMORY, FENCE, OUTSIDE_WRITES, DURABLE, TOPIC)
"""Every key kind of a model version: a key of the namespace of another kind is not one of
them (the take-over record is the namespace's, of no version)."""

_NAME = re.compile(r"[A-Za-z0-9._-]+")
_UNESCAPES = {"%25": "%", "%7B": "{", "%7D": "}"}
_ESCAPED = re.compile("|".join(_UNESCAPES))
_GLOB = re.compile(r"([*?\[\]\\])")
PATTERN_ID_MAX = 256
"""The most of an id a SCAN pattern holds: every SCAN call sends the pattern again, which for a
megabyte id would cost more than the SCAN."""


def _escape(entity_id: str) -> str:
    """The hash-tag content of an id: braces and the escape character percent-encoded."""
    if not entity_id:
        raise ValueError("entity ids must be non-empty: the hash tag '{}' would be ignored")
    return entity_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _unescape(tag: str) -> str | None:
    """The id of a hash tag ``_escape`` made, else None: one pass, so ``%257B`` is ``%7B``."""
    entity_id = _ESCAPED.sub(lambda found: _UNESCAPES[found[0]], tag)
    return entity_id if tag and _escape(entity_id) == tag else None


def _as_text(key: str | bytes) -> str | None:
    """A key as SCAN returns it (bytes), as text; None when it is not UTF-8 (none of ours)."""
    if isinstance(key, str):
        return key
    try:
        return key.decode()
    except UnicodeDecodeError:
        return None


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

    def entity_id(self, key: str | bytes) -> str | None:
        """The entity whose memory key (of this namespace and version) ``key`` is, else None."""
        text = _as_text(key)
        prefix = self.memory_prefix
        if text is None or not text.startswith(prefix + "{") or not text.endswith("}"):
            return None
        return _unescape(text[len(prefix) + 1 : -1])

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


@dataclass(frozen=True, slots=True)
class NamespaceKeys:
    """The keys of one namespace, under every model version.

    Raises ConfigError when namespace holds anything but letters, digits, ``.``, ``_`` and
    ``-``.
    """

    namespace: str

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.namespace):
            raise ConfigError(
                f"namespace {self.namespace!r} is invalid: use letters, digits, '.', '_' and '-'"
            )

    def layout(self, model_version: str) -> KeyLayout:
        """The keys of one model version of this namespace."""
        return KeyLayout(self.namespace, model_version)

    @property
    def pattern(self) -> str:
        """The SCAN pattern of every key of this namespace (and of no other: the namespace
        cannot hold ``:``)."""
        return f"{self.namespace}:*"

    def entity_pattern(self, entity_id: str) -> str:
        """A SCAN pattern matching one entity's memory under every model version (and, for an
        id longer than ``PATTERN_ID_MAX``, those of ids that begin alike): check each key found
        with ``version_of_memory``. The escaped id's glob metacharacters are escaped in turn;
        the version, which holds no ``:``, is a wildcard."""
        tag = _escape(entity_id)
        head = _GLOB.sub(r"\\\1", tag[:PATTERN_ID_MAX])
        end = "}" if len(tag) <= PATTERN_ID_MAX else "*"
        return f"{self.namespace}:{MEMORY}:*:{{{head}{end}"

    def version_of_memory(self, key: str | bytes, entity_id: str) -> str | None:
        """The model version under which ``key`` is ``entity_id``'s memory, else None."""
        version = self.version_of(key)
        if version is None or self.layout(version).memory(entity_id) != _as_text(key):
            return None
        return version

    def version_of(self, key: str | bytes) -> str | None:
        """The model version a key of this namespace belongs to (any kind of ``KINDS``); None
        for a key that is not one stream-lstm writes, or of another namespace."""
        text = _as_text(key)
        if text is None or not text.startswith(f"{self.namespace}:"):
            return None
        kind, _, rest = text[len(self.namespace) + 1 :].partition(":")
        if kind not in KINDS:
            return None
        version, _, tail = rest.partition(":")
        if not _NAME.fullmatch(version):
            return None
        layout = self.layout(version)
        if kind == MEMORY:
            return version if layout.entity_id(text) is not None else None
        if kind == FENCE:
            digits = tail.isascii() and tail.isdigit()
            return version if digits and layout.fence(int(tail)) == text else None
        return version if text == getattr(layout, _PROPERTIES[kind]) else None


_PROPERTIES = {OUTSIDE_WRITES: "outside_writes", DURABLE: "durable", TOPIC: "topic"}
"""The ``KeyLayout`` property naming the one key of each kind a version has."""
