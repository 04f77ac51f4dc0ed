"""The memory store: each entity's memories in Redis, fenced against stale writers."""

from state.codec import StoredMemory
from state.connection import without_password
from state.store import CommitResult, HandOver, Loaded, MemoryStore, Sweep

__all__ = [
    "CommitResult",
    "HandOver",
    "Loaded",
    "MemoryStore",
    "StoredMemory",
    "Sweep",
    "without_password",
]
