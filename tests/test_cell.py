"""The explain path spells out the same step the fast path takes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stream_lstm.cell import explain
from stream_lstm.engine import Events, step
from stream_lstm.model import StreamModel


@pytest.mark.parametrize(("layers", "bias"), [(1, True), (2, False), (3, True)])
def test_explain_equals_the_fast_path(layers: int, bias: bool) -> None:
    torch.manual_seed(layers)
    model = StreamModel.from_torch(nn.LSTM(5, 7, layers, bias=bias))
    ltm, stm = torch.randn(1, layers, 7), torch.randn(1, layers, 7)
    x = torch.randn(5)

    events = Events(torch.tensor([0]), x[None], torch.tensor([False]))
    fast = step(model, events, (ltm, stm), torch.tensor([3]))
    gates = explain(model.lstm, x, ltm[0], stm[0])

    assert len(gates) == layers
    fast_ltm, fast_stm = fast.states
    torch.testing.assert_close(torch.stack([g.remember for g in gates]), fast_ltm[0])
    torch.testing.assert_close(torch.stack([g.use for g in gates]), fast_stm[0])
    torch.testing.assert_close(gates[-1].use, fast.output[0])


def test_gates_compose_as_the_lecture_says() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4)
    ltm, stm = torch.randn(1, 4), torch.randn(1, 4)
    (g,) = explain(lstm, torch.randn(3), ltm, stm)
    torch.testing.assert_close(g.forget, g.forget_gate * ltm[0])
    torch.testing.assert_close(g.learn, g.input_gate * g.candidate)
    torch.testing.assert_close(g.remember, g.forget + g.learn)
    torch.testing.assert_close(g.use, g.output_gate * torch.tanh(g.remember))
    for gate in (g.input_gate, g.forget_gate, g.output_gate):
        assert ((gate > 0) & (gate < 1)).all()
