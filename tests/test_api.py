"""The public API is what we mean to export, and nothing else."""

import stream_lstm


def test_public_api_is_pinned() -> None:
    assert sorted(stream_lstm.__all__) == [
        "Event",
        "MemorySnapshot",
        "Prediction",
        "StreamLSTMError",
        "StreamModel",
        "__version__",
    ]
    for name in stream_lstm.__all__:
        assert getattr(stream_lstm, name) is not None
