"""The memory store: each entity's LSTM memories in Redis, fenced against stale writers."""

from state.codec import MemoryBatch, MemoryUpdates, StoredMemory
from state.connection import without_password
from state.store import CommitResult, MemoryStore

__all__ = [
    "CommitResult",
    "MemoryBatch",
    "MemoryStore",
    "MemoryUpdates",
    "StoredMemory",
    "without_password",
]
