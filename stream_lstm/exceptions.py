"""Every error stream-lstm raises on purpose, rooted in one class.

    StreamLSTMError
    ├── ModelError            the model cannot serve (unsupported LSTM, inputs of the wrong shape)
    │   └── CheckpointError   a model file is missing, corrupt, foreign, unsafe or too new
    ├── ConfigError           a setting is invalid; the message names the setting
    ├── BrokerError           a broker is missing, failed or did not answer, or refused a topic
    │   └── BrokerRefusedError      the broker refused us: credentials, TLS trust, protocol
    ├── TopicChangedError     the stored memories count offsets of another input topic
    ├── TakenOverError        another deployment took this app id's stream over
    ├── UsageError            the processing API was called out of order (workers/plugin.py)
    ├── ArchiveError          a memory export file is not one, truncated, corrupt or refused
    └── StoreError            the memory store failed or holds a value that does not decode
        ├── StoreUnavailableError   Redis did not answer within the retry budget
        │   └── StoreFullError      Redis is at maxmemory and refuses writes
        └── StoreRefusedError       Redis answered but refused us: credentials or TLS trust

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
    """A broker is missing, did not start or did not answer, or it refused a topic."""


class BrokerRefusedError(BrokerError):
    """The broker answered but refused us for good: credentials, TLS trust, protocol, or a
    replication factor it cannot give; retrying cannot help.

    ``setting`` names the setting to fix (a ``workers.settings.Settings`` field).
    """

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


class TopicChangedError(StreamLSTMError):
    """The stored memories were made from another input topic than the one the worker reads
    (it was deleted and recreated, or renamed): their fences count that topic's offsets, and
    this one's events at offsets below them would be dropped as replays. The message says what
    to do."""


class TakenOverError(StreamLSTMError):
    """Another deployment (a new model's, started with STREAM_LSTM_TAKES_OVER) took this app
    id's stream over: it emits the predictions now, so a worker of this app id must not. The
    message names it and says what to do."""


class UsageError(StreamLSTMError):
    """The processing API (``workers.plugin.Processor``) was called in an order that would break
    its guarantees: committing before delivering, twice, a batch of partitions the caller does
    not own. Nothing was done; the message says what the right order is."""


class ArchiveError(StreamLSTMError):
    """A file of exported memories cannot be imported: it is not an export, it is truncated or
    corrupt, a value in it does not decode to the model's memories, or it holds another model
    version's. Nothing was written; the message names the file and says why."""


class StoreError(StreamLSTMError):
    """The memory store failed, or a stored value does not decode."""


class StoreUnavailableError(StoreError):
    """Redis did not answer within the configured retry budget."""


class StoreFullError(StoreUnavailableError):
    """Redis is at its maxmemory and refuses writes: an outage to wait out until memory is
    freed (or maxmemory raised), not a reason to stop."""


class StoreRefusedError(StoreError):
    """Redis answered but refused us for good: credentials or TLS trust; retrying cannot help.

    A wrong user or password (or a user without a permission the store needs), a server
    certificate that is not trusted or names another host, or a client certificate the server
    refused. The message says what was refused and names the URL without its password.
    """
