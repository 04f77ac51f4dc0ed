"""The memory cell: one LSTM step, told with the lecture's four gates.

An entity carries two memories between events: the long-term memory (LTM, torch's cell state
``c``) and the short-term memory (STM, torch's hidden state ``h``). For an event ``x``::

    i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)    how much of the candidate to learn
    f = sigmoid(W_if x + b_if + W_hf h + b_hf)    how much of the LTM to keep
    g = tanh(W_ig x + b_ig + W_hg h + b_hg)       the candidate, from STM and event
    o = sigmoid(W_io x + b_io + W_ho h + b_ho)    how much of the LTM to use

    forget   = f * c                 what the LTM keeps
    learn    = i * g                 what is worth learning
    remember = forget + learn  = c'  the new LTM
    use      = o * tanh(c')    = h'  the output, and the new STM

The parameters are exactly ``torch.nn.LSTM``'s: ``weight_ih_l{k}`` (4H, I), ``weight_hh_l{k}``
(4H, H), optional ``bias_ih_l{k}`` and ``bias_hh_l{k}`` (4H,), gate rows in the order i, f, g, o.
So any trained ``nn.LSTM`` loads as is.

Two paths share those parameters: the fast path is ``nn.LSTM`` itself (fused kernels, cuDNN on a
GPU) and serves every batch; the explain path below spells the gates out for one entity, so the
memory API can show why a memory changed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class GateActivations(NamedTuple):
    """One layer's gates for one event; every field has shape (H,)."""

    input_gate: Tensor  # i
    forget_gate: Tensor  # f
    candidate: Tensor  # g
    output_gate: Tensor  # o
    forget: Tensor  # f * c
    learn: Tensor  # i * g
    remember: Tensor  # c' = f*c + i*g, the new LTM
    use: Tensor  # h' = o * tanh(c'), the new STM


def gates(
    x: Tensor,
    ltm: Tensor,
    stm: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
) -> GateActivations:
    """One layer's step written gate by gate, for reading rather than for speed."""
    z = weight_ih @ x + weight_hh @ stm  # (4H,)
    if bias_ih is not None and bias_hh is not None:
        z = z + bias_ih + bias_hh
    zi, zf, zg, zo = z.chunk(4)  # 4 x (H,), torch's gate order
    i, f, g, o = torch.sigmoid(zi), torch.sigmoid(zf), torch.tanh(zg), torch.sigmoid(zo)
    forget = f * ltm
    learn = i * g
    remember = forget + learn
    use = o * torch.tanh(remember)
    return GateActivations(i, f, g, o, forget, learn, remember, use)


def explain(lstm: nn.LSTM, x: Tensor, ltm: Tensor, stm: Tensor) -> list[GateActivations]:
    """Every layer's gates for one entity's event, bottom layer first.

    ``x`` is (I,); ``ltm`` and ``stm`` are (L, H). Layer k's input is layer k-1's ``use``.
    """
    assert x.dim() == 1, f"explain takes one event of shape (I,), got {tuple(x.shape)}"
    layers: list[GateActivations] = []
    with torch.inference_mode():
        for k in range(lstm.num_layers):
            layer = gates(
                x,
                ltm[k],
                stm[k],
                getattr(lstm, f"weight_ih_l{k}"),
                getattr(lstm, f"weight_hh_l{k}"),
                getattr(lstm, f"bias_ih_l{k}", None),
                getattr(lstm, f"bias_hh_l{k}", None),
            )
            layers.append(layer)
            x = layer.use
    return layers
