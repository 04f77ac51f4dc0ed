"""Every error stream-lstm raises on purpose, rooted in one class.

    StreamLSTMError
    ├── ModelError            the model cannot serve (unsupported LSTM, inputs of the wrong shape)
    │   └── CheckpointError   a model file is missing, corrupt, foreign, unsafe or too new
    ├── ConfigError           a setting is invalid; the message names the setting
    ├── BrokerError           the embedded broker is missing or failed, or a topic was refused
    └── StoreError            the memory store failed or holds a value that does not decode
        └── StoreUnavailableError   Redis did not answer within the retry budget

Catch `StreamLSTMError` to handle them all; catch a subclass to act on one failure.
"""

from __future__ import annotations


class StreamLSTMError(Exception):
    """Root of every error stream-lstm raises on purpose."""


class ModelError(StreamLSTMError):
    """The model cannot serve: an unsupported LSTM, or inputs that do not fit it."""


class CheckpointError(ModelError):
    """A model file cannot be loaded; the message says why and what to do."""


class ConfigError(StreamLSTMError):
    """A setting is invalid; the message names the setting."""


class BrokerError(StreamLSTMError):
    """The embedded broker is missing or did not start, or the broker refused a topic."""


class StoreError(StreamLSTMError):
    """The memory store failed, or a stored value does not decode."""


class StoreUnavailableError(StoreError):
    """Redis did not answer within the configured retry budget."""
