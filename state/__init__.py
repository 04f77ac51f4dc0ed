"""The memory store: each entity's memories in Redis, fenced against stale writers."""

from state.codec import StoredMemory
from state.connection import without_password
from state.store import CommitResult, Loaded, MemoryStore, Sweep

__all__ = ["CommitResult", "Loaded", "MemoryStore", "StoredMemory", "Sweep", "without_password"]
