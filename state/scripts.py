"""The Lua scripts the store runs in Redis (``lua/*.lua``), with the codec's layout filled in.

Each memory script is ``header.lua`` (reading a stored value's header and fences) followed by
its own file; ``%(name)s`` placeholders take the codec's constants, so the layout is defined
once, in codec.py. Each file's comment says what its KEYS and ARGV are and what it returns.
"""

from __future__ import annotations

import struct
from importlib.resources import files

from state import codec
from stream_lstm.memories import RESETS

__all__ = ["COMMIT", "RESET", "TAKE_OVER"]

_CONSTANTS = {
    "header": codec.HEADER_SIZE,
    "states_header": codec.STATES_HEADER_SIZE,
    "magic": "".join(f"\\{byte}" for byte in codec.MAGIC),
    "v1": codec.FORMAT_VERSION,
    "v2": codec.FORMAT_FENCES,
    "v3": codec.FORMAT_STATES,
    "v4": codec.FORMAT_STATES_FENCES,
    "float32": codec.FLOAT32,
    "partition": codec.FENCE_PARTITION_AT + 1,  # Lua strings count from 1
    "offset": codec.FENCE_OFFSET_AT + 1,
    "step": codec.STEP_AT,
    "resets": RESETS,
    "resets_bytes": "".join(f"\\{byte}" for byte in struct.pack("<i", RESETS)),
}


def _script(name: str) -> str:
    lua = files("state").joinpath("lua")
    return (lua.joinpath("header.lua").read_text() + lua.joinpath(f"{name}.lua").read_text()) % (
        _CONSTANTS
    )


COMMIT = _script("commit")
"""Fenced writes of a batch's memories (on one server, also its partitions' fences)."""
RESET = _script("reset")
"""Zeroes one entity's memories, keeping its fences."""
TAKE_OVER = files("state").joinpath("lua", "take_over.lua").read_text()
"""Records a deployment's take-over of an app id, unless another's is recorded (no stored
value is read: no header)."""
