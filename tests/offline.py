"""The reference every prediction is checked against: torch.nn.LSTM on one entity's history."""

from __future__ import annotations

import torch
from torch import Tensor

from stream_lstm.model import StreamModel


def offline(model: StreamModel, events: list[tuple[Tensor, bool]]) -> tuple[Tensor, Tensor, Tensor]:
    """Reference: nn.LSTM over each run of events since the last reset (outputs, h_n, c_n)."""
    outputs, h_n, c_n, segment = [], None, None, []
    for x, reset in events:
        if reset:
            segment = []
        segment.append(x)
        with torch.no_grad():
            y, (h_n, c_n) = model.lstm(torch.stack(segment).unsqueeze(1))  # (T, 1, H)
            outputs.append(model.readout(y[-1]))  # (1, O)
    assert h_n is not None
    assert c_n is not None
    return torch.cat(outputs), h_n[:, 0], c_n[:, 0]
