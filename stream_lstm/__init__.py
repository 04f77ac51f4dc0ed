"""stream-lstm: stateful LSTM inference for millions of entities on an event stream.

Each entity keeps a long-term memory (LTM, the cell state) and a short-term memory (STM, the
hidden state) between its events; a batch of events for many entities runs as one fused step.
"""

from stream_lstm.exceptions import StreamLSTMError
from stream_lstm.model import StreamModel
from stream_lstm.schema import Event, MemorySnapshot, Prediction

__version__ = "0.1.0"

__all__ = ["Event", "MemorySnapshot", "Prediction", "StreamLSTMError", "StreamModel", "__version__"]
