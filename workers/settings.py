"""The worker's one settings object: ``STREAM_LSTM_*`` environment variables, CLI flags on top.

Validated once at start-up and passed down; nothing else reads the environment. A bad value
stops the worker before it touches Kafka or Redis, with a message naming the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from state import MemoryStore
from stream_lstm.exceptions import ConfigError
from stream_lstm.tvshows import DEFAULT_MODEL

ENV_PREFIX = "STREAM_LSTM_"


def _url(*schemes: str) -> AfterValidator:
    def check(value: str) -> str:
        if not value.startswith(tuple(f"{s}://" for s in schemes)):
            raise ValueError(f"must start with {' or '.join(f'{s}://' for s in schemes)}")
        return value

    return AfterValidator(check)


TopicName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")]


class Settings(BaseSettings):
    """Where the worker reads, writes and keeps memories, and how it batches."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    broker: Annotated[str, _url("kafka")] = Field(
        "kafka://localhost:9092", description="Kafka bootstrap URL(s), kafka://host:port;host:port"
    )
    redis_url: Annotated[
        str, _url("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
    ] = Field(
        "redis://localhost:6379/0",
        description=(
            "Redis holding the entities' memories; a Redis Cluster as "
            "redis+cluster://host:port[,host:port...] (rediss+cluster:// for TLS)"
        ),
    )
    model: Path = Field(
        DEFAULT_MODEL,
        description="model file written by StreamModel.save; default: the TV-show demo",
    )
    app_id: str = Field(
        "stream-lstm",
        pattern=r"^[A-Za-z0-9._-]{1,100}$",
        description="consumer group id and memory namespace",
    )
    input_topic: TopicName = Field("stream-lstm-events", description="events to read")
    output_topic: TopicName = Field("stream-lstm-predictions", description="predictions to write")
    dead_letter_topic: TopicName = Field(
        "stream-lstm-dead-letters", description="bad events, with the reason"
    )
    partitions: int = Field(8, ge=1, le=10_000, description="partitions of topics it creates")
    max_batch: int = Field(1024, ge=1, le=100_000, description="events per micro-batch, at most")
    max_delay_ms: float = Field(
        10.0, ge=0, le=60_000, description="how long a micro-batch waits to fill"
    )
    max_event_bytes: int = Field(
        65_536, ge=64, le=10_000_000, description="larger events are dead-lettered as oversized"
    )
    session_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="consumer group session timeout: how fast a dead worker's partitions move",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the step runs")
    torch_threads: int = Field(
        1, ge=1, le=256, description="CPU threads of the step (the broker and Redis need cores too)"
    )
    web_port: int = Field(6066, ge=0, le=65_535, description="HTTP port of the memory API")
    memory_ttl_s: int | None = Field(
        None, gt=0, description="expire memories idle this long; unset keeps them"
    )
    memory_dtype: Literal["float32", "float16"] = Field(
        "float32", description="storage of memories in Redis: float16 halves them, rounded"
    )
    memory_cache_entities: int = Field(
        100_000,
        ge=0,
        le=100_000_000,
        description=(
            "memories the worker keeps as it committed them, so it need not read them back "
            "(~1 KB each at hidden 128; one Redis server only); 0: read every batch from Redis"
        ),
    )
    data_dir: Path | None = Field(
        None,
        description=(
            "where Faust keeps its local data (the worker keeps no tables there: nothing in it "
            "must survive a restart); unset: a temporary directory per process, removed on exit"
        ),
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @property
    def bootstrap_servers(self) -> str:
        """The broker URL as Kafka clients take it: host:port,host:port."""
        return ",".join(
            part.strip().removeprefix("kafka://") for part in self.broker.split(";") if part.strip()
        )

    def memory_store(self, model_version: str) -> MemoryStore:
        """The memory store these settings name, for memories of that model version."""
        return MemoryStore(
            self.redis_url,
            self.app_id,
            model_version,
            ttl_s=self.memory_ttl_s,
            dtype=self.memory_dtype,
            cache_entities=self.memory_cache_entities,
        )

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Environment first, non-None overrides (CLI flags) on top; bad values: ConfigError."""
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as e:
            problems = "; ".join(
                f"{_names(str(err['loc'][0])) if err['loc'] else 'settings'}: {err['msg']} "
                f"(got {err.get('input')!r})"
                for err in e.errors()
            )
            raise ConfigError(f"invalid setting: {problems}") from e


def _names(field: str) -> str:
    return f"{env_name(field)} / --{field.replace('_', '-')}"


def env_name(field: str) -> str:
    """The environment variable behind a settings field."""
    return f"{ENV_PREFIX}{field.upper()}"
