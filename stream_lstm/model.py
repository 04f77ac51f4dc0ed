"""StreamModel: a trained LSTM, an optional linear head and an output activation, as one file.

A model file is a ``torch.save`` of plain data (format marker, format version, config, version,
weights) and is read back with ``torch.load(weights_only=True)``, so loading one never runs code.
``version`` is a content hash of config and weights: stored memories are namespaced by it, so a
worker never feeds one model's memories to another.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from stream_lstm.exceptions import CheckpointError, ModelError
from stream_lstm.memories import Shape

Activation = Literal["softmax", "sigmoid", "identity"]

FORMAT = "stream-lstm"
FORMAT_VERSION = 1
EARLIER_CELL = "lstm"
"""The cell of a file that does not say: earlier builds wrote LSTMs only."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything but the weights needed to rebuild a model."""

    input_size: int
    hidden_size: int
    num_layers: int
    bias: bool
    output_size: int | None  # the head's width; None when the STM is the output
    head_bias: bool
    activation: Activation
    labels: tuple[str, ...] | None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` means CUDA when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but torch sees no CUDA device")
    return resolved


class StreamModel:
    """A stacked LSTM (torch's exact parameter layout) plus an optional head and activation.

    The model owns copies of the weights it was given, so its ``version`` stays true for its
    lifetime. Build one with ``from_torch`` or ``load``.

    It declares the recurrent states an entity keeps (``states``) and runs its cell on them
    (``run_sequence``, ``run_step``): all the engine, the store and the workers know of the
    cell, so another one (a GRU: one state) is another class with these three, not edits in
    every layer.
    """

    cell = "lstm"
    """The recurrent cell, recorded in the model's file: a file of another cell is refused."""
    states: tuple[str, ...] = ("ltm", "stm")
    """The states an entity keeps between events, in stored order: the long-term memory (the
    cell state c) and the short-term memory (the hidden state h)."""

    def __init__(self, config: ModelConfig, lstm: nn.LSTM, head: nn.Linear | None) -> None:
        self.config = config
        self.lstm = lstm.eval()
        self.head = head.eval() if head is not None else None
        self.version = _content_hash(config, self._state_dict())

    @classmethod
    def from_torch(
        cls,
        lstm: nn.LSTM,
        head: nn.Linear | None = None,
        *,
        labels: list[str] | tuple[str, ...] | None = None,
        activation: Activation | None = None,
    ) -> StreamModel:
        """Wrap a trained ``nn.LSTM`` (and head) without converting its weights.

        ``batch_first`` and dropout do not matter for one step at a time and are dropped;
        a bidirectional or projected LSTM cannot run on a stream and is refused.
        """
        if not isinstance(lstm, nn.LSTM):
            raise ModelError(f"from_torch takes a torch.nn.LSTM, got {type(lstm).__name__}")
        if lstm.bidirectional:
            raise ModelError("a bidirectional LSTM needs future events; a stream has none")
        if lstm.proj_size:
            raise ModelError("LSTMs with proj_size are not supported; use proj_size=0")
        if head is not None and not isinstance(head, nn.Linear):
            raise ModelError(f"head must be a torch.nn.Linear or None, got {type(head).__name__}")
        if activation is None:
            activation = "softmax" if labels is not None else "identity"
        config = ModelConfig(
            input_size=lstm.input_size,
            hidden_size=lstm.hidden_size,
            num_layers=lstm.num_layers,
            bias=lstm.bias,
            output_size=head.out_features if head is not None else None,
            head_bias=head is not None and head.bias is not None,
            activation=activation,
            labels=tuple(labels) if labels is not None else None,
        )
        state = {k: v.detach() for k, v in lstm.state_dict().items()}
        if head is not None:
            state |= {f"head.{k}": v.detach() for k, v in head.state_dict().items()}
        return cls._build(config, state, torch.device("cpu"))

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: str | torch.device | None = None
    ) -> StreamModel:
        """Read a file written by ``save``; ``device`` None or "auto" picks CUDA when present."""
        target = resolve_device(device)
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"model file {str(path)!r} does not exist or is not a file")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            unsafe = next((line for line in str(e).splitlines() if "GLOBAL" in line), None)
            if unsafe is not None:
                raise CheckpointError(
                    f"model file {str(path)!r} refused: it pickles code or objects other than "
                    f"tensors and plain data ({unsafe.strip()}), and loading it could run that "
                    "code; write model files with StreamModel.save"
                ) from e
            raise CheckpointError(
                f"model file {str(path)!r} is not a readable torch file (corrupt or truncated?)"
            ) from e
        except Exception as e:  # torch raises RuntimeError, EOFError, zipfile errors, ...
            raise CheckpointError(
                f"model file {str(path)!r} is not a readable torch file "
                f"(corrupt or truncated?): {e}"
            ) from e
        config, state, version = _unpack(blob, path, cls.cell)
        try:
            model = cls._build(config, state, target)
        except CheckpointError:
            raise
        except ModelError as e:
            raise CheckpointError(f"model file {str(path)!r} cannot be used: {e}") from e
        if model.version != version:
            raise CheckpointError(
                f"model file {str(path)!r} is corrupt: its weights do not hash to the version "
                f"it records ({version})"
            )
        return model

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model atomically, so a reader never sees half a file."""
        path = Path(path)
        blob = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "cell": self.cell,
            "version": self.version,
            "config": _config_to_plain(self.config),
            "state_dict": {k: v.cpu() for k, v in self._state_dict().items()},
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(blob, f)
            os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a worker may run as another user
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @property
    def input_size(self) -> int:
        return self.config.input_size

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def labels(self) -> tuple[str, ...] | None:
        return self.config.labels

    @property
    def output_size(self) -> int:
        return self.config.output_size or self.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.lstm.parameters()).device

    @property
    def shape(self) -> Shape:
        """One entity's memories: each of ``states``, layers x hidden."""
        return Shape(len(self.states), self.num_layers, self.hidden_size)

    def run_sequence(
        self, packed: PackedSequence, states: tuple[Tensor, ...]
    ) -> tuple[PackedSequence, tuple[Tensor, ...]]:
        """Run packed sequences from their states (each (L, S, H)): the top layer's STM at
        every step, and the final states."""
        ltm, stm = states
        out, (h_n, c_n) = self.lstm(packed, (stm, ltm))
        return out, (c_n, h_n)

    def run_step(self, x: Tensor, states: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One step of N entities from their states (each (N, L, H)): the top layer's STM
        (N, H), and the new states (each (N, L, H)). The states may be the caller's own memories
        (the engine passes them uncopied when no event resets): never written in place.

        On a GPU each layer is one ``torch.lstm_cell`` (cuDNN's ``nn.LSTM`` took 25x longer for
        one step of 64k entities on an H200); on a CPU ``nn.LSTM``'s single step is ~15%
        cheaper than the cells. Both are the same arithmetic (a test holds them to it).
        """
        ltm, stm = states
        run_layers = by_cells if x.device.type == "cuda" else by_sequence
        top, stm, ltm = run_layers(self.lstm, x, stm, ltm)
        return top, (ltm, stm)

    def readout(self, stm_top: Tensor) -> Tensor:
        """Turn the top layer's new STM (N, H) into the prediction (N, O)."""
        y = self.head(stm_top) if self.head is not None else stm_top  # (N, O)
        if self.config.activation == "softmax":
            return torch.softmax(y, dim=-1)
        if self.config.activation == "sigmoid":
            return torch.sigmoid(y)
        return y

    def _state_dict(self) -> dict[str, Tensor]:
        state = dict(self.lstm.state_dict())
        if self.head is not None:
            state |= {f"head.{k}": v for k, v in self.head.state_dict().items()}
        return state

    @classmethod
    def _build(
        cls, config: ModelConfig, state: dict[str, Tensor], device: torch.device
    ) -> StreamModel:
        _check_config(config)
        lstm = nn.LSTM(config.input_size, config.hidden_size, config.num_layers, bias=config.bias)
        head = (
            nn.Linear(config.hidden_size, config.output_size, bias=config.head_bias)
            if config.output_size is not None
            else None
        )
        lstm_state = {k: v for k, v in state.items() if not k.startswith("head.")}
        head_state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
        try:
            lstm.load_state_dict(_as_float32(lstm_state))
            if head is not None:
                head.load_state_dict(_as_float32(head_state))
            elif head_state:
                raise ModelError(
                    f"weights for a head but no head in the config: {sorted(head_state)}"
                )
        except RuntimeError as e:  # load_state_dict reports missing, unexpected and misshapen keys
            raise ModelError(f"weights do not fit the model's config: {e}") from e
        lstm.to(device)
        if head is not None:
            head.to(device)
        return cls(config, lstm, head)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"StreamModel(version={self.version}, input={c.input_size}, hidden={c.hidden_size}, "
            f"layers={c.num_layers}, output={self.output_size}, activation={c.activation!r}, "
            f"labels={list(c.labels) if c.labels else None})"
        )


def _check_config(config: ModelConfig) -> None:
    if min(config.input_size, config.hidden_size, config.num_layers) < 1:
        raise ModelError(f"sizes must be positive: {config}")
    if config.activation not in get_args(Activation):
        choices = ", ".join(get_args(Activation))
        raise ModelError(f"activation must be one of {choices}, got {config.activation!r}")
    if config.labels is not None and len(config.labels) != (
        config.output_size or config.hidden_size
    ):
        raise ModelError(
            f"{len(config.labels)} labels for {config.output_size or config.hidden_size} outputs"
        )


MAX_SIZES = {"input_size": 1_000_000, "hidden_size": 65_536, "num_layers": 64}
"""Bounds of a model file's sizes, checked before anything is allocated."""
MAX_OUTPUT_SIZE = 1_000_000
MAX_PARAMETERS = 1_000_000_000
"""Weights a model file may ask for (4 GB in float32): a file must not make a worker allocate
without bound."""


def _checked_config(plain: dict[str, Any], name: str) -> ModelConfig:
    """A model file's config, each field of the type and within the bounds it must have:
    a file is input, and its sizes decide what is allocated. (The activation and the labels'
    count are ``_check_config``'s, as for a model built in memory.)"""
    expected = {f.name for f in fields(ModelConfig)}
    if set(plain) != expected:
        raise CheckpointError(
            f"model file {name} is incomplete or damaged: config fields {sorted(plain)}, "
            f"expected {sorted(expected)}"
        )

    def refuse(field: str, what: str) -> CheckpointError:
        return CheckpointError(
            f"model file {name}: config {field} must be {what}, got {plain[field]!r}"[:500]
        )

    for field, top in MAX_SIZES.items():
        if type(plain[field]) is not int or not 1 <= plain[field] <= top:
            raise refuse(field, f"an integer from 1 to {top:,}")
    output_size = plain["output_size"]
    if output_size is not None and (
        type(output_size) is not int or not 1 <= output_size <= MAX_OUTPUT_SIZE
    ):
        raise refuse("output_size", f"null or an integer from 1 to {MAX_OUTPUT_SIZE:,}")
    for field in ("bias", "head_bias"):
        if type(plain[field]) is not bool:
            raise refuse(field, "true or false")
    labels = plain["labels"]
    if labels is not None and (
        not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels)
    ):
        raise refuse("labels", "null or a list of strings")
    config = ModelConfig(**{**plain, "labels": tuple(labels) if labels is not None else None})
    if (count := _parameters(config)) > MAX_PARAMETERS:
        raise CheckpointError(
            f"model file {name} asks for {count:,} parameters; at most {MAX_PARAMETERS:,} "
            "are served"
        )
    return config


def _parameters(config: ModelConfig) -> int:
    """How many weights a config makes: torch's LSTM layout, plus the head."""
    hidden, gates = config.hidden_size, 4 * config.hidden_size
    count = gates * (config.input_size + hidden) + (2 * gates if config.bias else 0)
    count += (config.num_layers - 1) * (gates * 2 * hidden + (2 * gates if config.bias else 0))
    if config.output_size is not None:
        count += config.output_size * hidden + (config.output_size if config.head_bias else 0)
    return count


def _as_float32(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Serving runs in float32, whatever precision the model was trained in."""
    return {k: v.to(torch.float32) for k, v in state.items()}


def _config_to_plain(config: ModelConfig) -> dict[str, Any]:
    plain = asdict(config)
    plain["labels"] = list(config.labels) if config.labels is not None else None
    return plain


def _content_hash(config: ModelConfig, state: dict[str, Tensor]) -> str:
    """A hash of config and weights that is the same in any process on any machine."""
    digest = hashlib.sha256()
    digest.update(json.dumps(_config_to_plain(config), sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"\n{name}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()[:16]


def _unpack(blob: Any, path: Path, served: str) -> tuple[ModelConfig, dict[str, Tensor], str]:
    """Check a loaded file's envelope and return its config, weights and recorded version."""
    name = repr(str(path))
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        hint = (
            "a bare state_dict? "
            if isinstance(blob, dict) and all(isinstance(v, Tensor) for v in blob.values())
            else ""
        )
        raise CheckpointError(
            f"model file {name} is not a stream-lstm model ({hint}no format marker); wrap a "
            "trained LSTM with StreamModel.from_torch(lstm, head, labels=...).save(path)"
        )
    if blob.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"model file {name} has format version {blob.get('format_version')!r}; this "
            f"stream-lstm reads version {FORMAT_VERSION}: upgrade stream-lstm or re-save the model"
        )
    cell = blob.get("cell", EARLIER_CELL)
    if cell != served:
        raise CheckpointError(
            f"model file {name} holds a {str(cell)[:40]!r} cell; this model class serves "
            f"{served!r} models"
        )
    try:
        plain = dict(blob["config"])
        state = dict(blob["state_dict"])
        version = str(blob["version"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"model file {name} is incomplete or damaged: {e!r}") from e
    config = _checked_config(plain, name)
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"model file {name} holds non-tensor weights")
    return config, state, version


def by_cells(lstm: nn.LSTM, x: Tensor, stm: Tensor, ltm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One step, layer by layer: top STM (N, H), then STM and LTM (N, L, H)."""
    stms, ltms = [], []
    for layer, (h0, c0) in enumerate(zip(stm.unbind(1), ltm.unbind(1), strict=True)):
        # Weights: w_ih, w_hh and, with bias, b_ih, b_hh.
        x, c = torch.lstm_cell(x, (h0, c0), *lstm.all_weights[layer])  # (N, H) each
        stms.append(x)
        ltms.append(c)
    return x, torch.stack(stms, 1), torch.stack(ltms, 1)


def by_sequence(
    lstm: nn.LSTM, x: Tensor, stm: Tensor, ltm: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One step as a sequence of length one: top STM (N, H), then STM and LTM (N, L, H)."""
    state = (stm.transpose(0, 1).contiguous(), ltm.transpose(0, 1).contiguous())  # (L, N, H)
    out, (h_n, c_n) = lstm(x.unsqueeze(0), state)  # (1, N, H), (L, N, H)
    return out[0], h_n.transpose(0, 1), c_n.transpose(0, 1)
