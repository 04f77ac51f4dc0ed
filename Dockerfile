# The stream-lstm worker image: CPU torch, the project, `stream-lstm worker` as a non-root user.
#
#   docker build -t stream-lstm .
#   docker run --rm stream-lstm --help
#
# docker-compose.yml builds it as the `worker` service.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch first, from PyTorch's CPU index: torch from PyPI on Linux pulls the
# multi-GB CUDA build. Its own layer, so code changes do not reinstall it.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Then the project itself (no dev extras); the installed torch satisfies its torch requirement.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY stream_lstm/ stream_lstm/
COPY state/ state/
COPY workers/ workers/
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 stream

# A writable working directory, the user's home. Faust's data directory is a temporary one
# under /tmp unless STREAM_LSTM_DATA_DIR names another (the worker keeps nothing there).
USER stream
WORKDIR /home/stream

# The memory API, /health and /metrics (STREAM_LSTM_WEB_PORT).
EXPOSE 6066
# The worker finishes the batch in hand on SIGTERM, commits it and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["stream-lstm"]
CMD ["worker"]
