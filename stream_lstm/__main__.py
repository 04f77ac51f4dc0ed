"""``python -m stream_lstm``: the same as the ``stream-lstm`` command."""

from stream_lstm.cli import main

main()
