"""The worker's one settings object: ``STREAM_LSTM_*`` environment variables, CLI flags on top.

Validated once at start-up and passed down; nothing else reads the environment. A bad value
stops the worker before it touches Kafka or Redis, with a message naming the variable.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    FilePath,
    PlainValidator,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from state import MemoryStore, without_password
from state.connection import CLUSTER_SCHEMES
from state.durability import TIMEOUT_MAX_S, Durability
from stream_lstm.exceptions import (
    BrokerRefusedError,
    ConfigError,
    StoreRefusedError,
    StreamLSTMError,
)
from stream_lstm.schema import Format
from workers.connection import (
    SECURITY_FIELDS,
    KafkaConnection,
    SaslMechanism,
    SecurityProtocol,
)

ENV_PREFIX = "STREAM_LSTM_"

DEMO_MODEL = Path(__file__).parent / "dev" / "models" / "tv-shows.pt"
"""The TV-show demo model (``workers.dev.tvshows``), served when no model is set, loudly."""


def _url(*schemes: str) -> AfterValidator:
    def check(value: str) -> str:
        if not value.startswith(tuple(f"{s}://" for s in schemes)):
            raise ValueError(f"must start with {' or '.join(f'{s}://' for s in schemes)}")
        return value

    return AfterValidator(check)


TopicName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")]


def _ip_address(value: str) -> str:
    ipaddress.ip_address(value)  # a ValueError names what is wrong
    return value


class Settings(BaseSettings):
    """Where the worker reads, writes and keeps memories, and how it batches.

    Its repr shows no password: the SASL and key passwords are SecretStr, the Redis URL is
    shown without its password.
    """

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
        DEMO_MODEL,
        description="model file written by StreamModel.save; default: the TV-show demo",
    )
    app_id: str = Field(
        "stream-lstm",
        pattern=r"^[A-Za-z0-9._-]{1,100}$",
        description="consumer group id and memory namespace",
    )
    takes_over: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]{1,100}$",
        description=(
            "app id of the live deployment this one replaces: warm memories from the input "
            "topic's earliest offsets without emitting, then emit from where that deployment's "
            "group stopped once its workers are stopped (README: Upgrading)"
        ),
    )
    shadow_topic: TopicName | None = Field(
        None,
        description=(
            "a warming take-over deployment sends the predictions it holds back here, and "
            "compares them with the live deployment's (/health, stream_lstm_shadow_*); needs "
            "STREAM_LSTM_TAKES_OVER / --takes-over"
        ),
    )
    input_topic: TopicName = Field("stream-lstm-events", description="events to read")
    output_topic: TopicName = Field("stream-lstm-predictions", description="predictions to write")
    dead_letter_topic: TopicName = Field(
        "stream-lstm-dead-letters", description="bad events, with the reason"
    )
    partitions: int = Field(8, ge=1, le=10_000, description="partitions of topics it creates")
    replication_factor: int | None = Field(
        None,
        ge=1,
        le=100,
        description="replicas of each topic it creates; unset: min(3, the cluster's brokers)",
    )
    kafka_security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    kafka_sasl_mechanism: SaslMechanism | None = Field(
        None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_* protocols)"
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user")
    kafka_sasl_password: SecretStr | None = Field(
        None, description="SASL password (prefer the environment variable: flags show in ps)"
    )
    kafka_ssl_cafile: FilePath | None = Field(
        None, description="PEM file of the CAs that sign the brokers' certificates; unset: system's"
    )
    kafka_ssl_certfile: FilePath | None = Field(
        None, description="PEM client certificate, for brokers that require one (mTLS)"
    )
    kafka_ssl_keyfile: FilePath | None = Field(
        None, description="PEM private key of the client certificate"
    )
    kafka_ssl_key_password: SecretStr | None = Field(
        None, description="password of an encrypted client key"
    )
    kafka_ssl_check_hostname: bool = Field(
        True, description="check that a broker's certificate names the host connected to"
    )
    max_batch: int = Field(1024, ge=1, le=100_000, description="events per micro-batch, at most")
    max_delay_ms: float = Field(
        10.0, ge=0, le=60_000, description="how long a micro-batch waits to fill"
    )
    max_event_bytes: int = Field(
        65_536, ge=64, le=10_000_000, description="larger events are dead-lettered as oversized"
    )
    event_format: Format = Field(
        "json",
        description="how events on the input topic are encoded: json, or msgpack with the "
        "features packed as float32 (stream_lstm/schema.py); publish writes it too",
    )
    prediction_format: Format = Field(
        "json",
        description="how predictions are encoded: json, or msgpack with the output packed as "
        "float32; tail prints either as JSON",
    )
    session_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="consumer group session timeout: how fast a dead worker's partitions move",
    )
    stall_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="/health says not ready when events wait and no batch has finished this long",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the step runs")
    torch_threads: int = Field(
        1, ge=1, le=256, description="CPU threads of the step (the broker and Redis need cores too)"
    )
    web_port: int = Field(6066, ge=0, le=65_535, description="HTTP port of the memory API")
    web_bind: Annotated[str, AfterValidator(_ip_address)] = Field(
        "127.0.0.1",
        description=(
            "address the web server listens on: 127.0.0.1 (this machine only), 0.0.0.0 (every "
            "interface: set API_TOKEN)"
        ),
    )
    api_token: SecretStr | None = Field(
        None,
        min_length=16,
        description=(
            "token the memory API requires (Authorization: Bearer <token>); /health and "
            "/metrics stay open"
        ),
    )
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
    redis_durability: Annotated[Durability, NoDecode, PlainValidator(Durability.parse)] = Field(
        Durability(),
        description=(
            "what Redis must have done with memories before offsets move: none (in the "
            "primary's memory), replicas:N (WAIT: N replicas have them), aof (WAITAOF: fsynced to "
            "the primary's AOF), aof+replicas:N (both); one server only"
        ),
    )
    redis_durability_timeout_ms: int = Field(
        1000,
        ge=1,
        le=round(TIMEOUT_MAX_S * 1000),
        description=(
            "how long a commit waits for REDIS_DURABILITY (each of the AOF and the replicas); "
            "then it does not count, and is retried"
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

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, without_password(value) if name == "redis_url" else value

    @model_validator(mode="after")
    def _security_fits_the_protocol(self) -> Settings:
        protocol = self.kafka_security_protocol
        sasl = {
            "kafka_sasl_mechanism": self.kafka_sasl_mechanism,
            "kafka_sasl_username": self.kafka_sasl_username,
            "kafka_sasl_password": self.kafka_sasl_password,
        }
        tls = {
            "kafka_ssl_cafile": self.kafka_ssl_cafile,
            "kafka_ssl_certfile": self.kafka_ssl_certfile,
            "kafka_ssl_keyfile": self.kafka_ssl_keyfile,
            "kafka_ssl_key_password": self.kafka_ssl_key_password,
        }
        if protocol.startswith("SASL_"):
            missing = [_names(name) for name, value in sasl.items() if value is None]
            if missing:
                raise ValueError(f"{protocol} needs {', '.join(missing)}")
        else:
            given = [_names(name) for name, value in sasl.items() if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)} set, but the protocol is {protocol}")
        if not protocol.endswith("SSL"):
            given = [_names(name) for name, value in tls.items() if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)} set, but the protocol is {protocol}")
        if self.kafka_ssl_keyfile is not None and self.kafka_ssl_certfile is None:
            raise ValueError(f"{_names('kafka_ssl_keyfile')} needs {_names('kafka_ssl_certfile')}")
        return self

    @model_validator(mode="after")
    def _takes_over_another(self) -> Settings:
        if self.takes_over == self.app_id:
            raise ValueError(
                f"{_names('takes_over')} names this deployment's own {_names('app_id')} "
                f"{self.app_id!r}: give the new deployment an app id of its own"
            )
        if self.shadow_topic is not None:
            if self.takes_over is None:
                raise ValueError(f"{_names('shadow_topic')} needs {_names('takes_over')}")
            others = {self.input_topic, self.output_topic, self.dead_letter_topic}
            if self.shadow_topic in others:
                raise ValueError(
                    f"{_names('shadow_topic')} {self.shadow_topic!r} must be a topic of its own"
                )
        return self

    @model_validator(mode="after")
    def _durability_on_one_server(self) -> Settings:
        if self.redis_durability.waits and self.redis_url.partition("://")[0] in CLUSTER_SCHEMES:
            raise ValueError(
                f"{_names('redis_durability')} {self.redis_durability} needs one Redis server, "
                f"but {_names('redis_url')} names a cluster (WAIT and WAITAOF cover one node)"
            )
        return self

    @property
    def serves_demo_model(self) -> bool:
        """Whether the model is the bundled TV-show demo: what a worker serves when
        STREAM_LSTM_MODEL is unset, which in production is a mistake worth saying loudly."""
        return self.model.resolve() == DEMO_MODEL.resolve()

    @property
    def bootstrap_servers(self) -> str:
        """The broker URL as Kafka clients take it: host:port,host:port."""
        return ",".join(
            part.strip().removeprefix("kafka://") for part in self.broker.split(";") if part.strip()
        )

    @cached_property
    def kafka(self) -> KafkaConnection:
        """How every Kafka client of the worker and the command line connects; made once, so
        the TLS files are read once.

        A TLS file that cannot be loaded (a bad key password, a file that is no PEM) raises
        ConfigError naming the setting.
        """
        security = {name: getattr(self, f"kafka_{name}") for name in SECURITY_FIELDS}
        try:
            return KafkaConnection(self.bootstrap_servers, **security)
        except BrokerRefusedError as e:
            raise ConfigError(blame(e)) from None

    def memory_store(
        self, model_version: str, retry_s: float = 30.0, cache_entities: int | None = None
    ) -> MemoryStore:
        """The memory store these settings name, for memories of that model version.

        ``retry_s``: how long a call waits out a Redis outage (a command line call: seconds).
        ``cache_entities``: the memory cache's size, MEMORY_CACHE_ENTITIES when None.
        """
        return MemoryStore(
            self.redis_url,
            self.app_id,
            model_version,
            ttl_s=self.memory_ttl_s,
            dtype=self.memory_dtype,
            cache_entities=(
                self.memory_cache_entities if cache_entities is None else cache_entities
            ),
            retry_s=retry_s,
            durability=self.redis_durability,
            durability_timeout_s=self.redis_durability_timeout_ms / 1000,
        )

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Environment first, non-None overrides (CLI flags) on top; bad values: ConfigError."""
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as e:
            problems = "; ".join(
                f"{_names(str(err['loc'][0]))}: {err['msg']} {_shown(str(err['loc'][0]), err)}"
                if err["loc"]
                else f"settings: {err['msg']}"
                for err in e.errors()
            )
            # Not "from e": pydantic's error quotes every input, passwords included.
            raise ConfigError(f"invalid setting: {problems}") from None


def blame(error: StreamLSTMError) -> str:
    """The error as a person reads it: a refusal by the broker or Redis names the setting to fix."""
    if isinstance(error, BrokerRefusedError):
        return f"{_names(error.setting)}: {error}"
    if isinstance(error, StoreRefusedError):
        return f"{_names('redis_url')}: {error}"
    return str(error)


KAFKA_CONNECTION = ("broker", *(f"kafka_{name}" for name in SECURITY_FIELDS))
"""The settings every Kafka client reads (``Settings.kafka``): the commands that talk to the
broker take them as flags."""

_SECRETS = {"kafka_sasl_password", "kafka_ssl_key_password", "api_token"}


def _shown(field: str, error: Any) -> str:
    """What the value was, as it may be shown: never a password."""
    value = error.get("input")
    if field in _SECRETS:
        return "(got a value, not shown)"
    if field == "redis_url" and isinstance(value, str):
        return f"(got {without_password(value)!r})"
    return f"(got {value!r})"


def _names(field: str) -> str:
    return f"{env_name(field)} / --{field.replace('_', '-')}"


def env_name(field: str) -> str:
    """The environment variable behind a settings field."""
    return f"{ENV_PREFIX}{field.upper()}"
