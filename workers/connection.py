"""How every Kafka client of the project connects: bootstrap servers and security, in one place.

The worker's consumer and producer, the topic creator, ``publish``, ``tail``, the tests and the
benchmarks all make their aiokafka clients through a ``KafkaConnection``, so a secured cluster
(SASL_SSL with SCRAM, mTLS, a private CA) is configured once, by the ``STREAM_LSTM_KAFKA_*``
settings (``Settings.kafka``).

``check`` connects to a bootstrap server the way the clients will, before any client starts:
aiokafka's clients log a refused login or an untrusted certificate and go on retrying as if the
broker were down, so a wrong password would otherwise look like an outage forever.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from pydantic import SecretStr

from state.connection import names_another_host
from stream_lstm.exceptions import BrokerError, BrokerRefusedError

__all__ = ["SECURITY_FIELDS", "KafkaConnection", "SaslMechanism", "SecurityProtocol"]

logger = logging.getLogger(__name__)

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

_TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code
_CLOSED_TRIES = 5
"""A broker that closes the connection at once is refusing our protocol or certificate; one
that is restarting or overloaded can do it too, so it must happen this many times in a row
(half a second apart) to be final."""
_QUIET_S = 5.0
"""How long ``check`` waits for a broker before it says so in the log."""
_DEFAULT_PORT = 9092


class _NoLoginRequests(logging.Filter):
    """Drops aiokafka's debug line of each SASL request: a PLAIN login carries the password in
    clear, a SCRAM one what an offline guess needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Sasl" not in record.getMessage()


logging.getLogger("aiokafka.conn").addFilter(_NoLoginRequests())


@dataclass(frozen=True)
class KafkaConnection:
    """Where the brokers are and how to talk to them; makes every Kafka client.

    ``bootstrap_servers``: ``host:port[,host:port...]``. TLS (``SSL``, ``SASL_SSL``) trusts
    ``ssl_cafile`` (else the system's CAs), checks the broker's host name unless
    ``ssl_check_hostname`` is False, and presents ``ssl_certfile``/``ssl_keyfile`` (decrypted
    with ``ssl_key_password``) when the broker asks for a client certificate (mTLS).
    """

    bootstrap_servers: str
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    _ssl: ssl.SSLContext | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        # Load the certificates now: a bad file or key password fails here, naming the setting.
        object.__setattr__(self, "_ssl", self._ssl_context())

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def options(self) -> dict[str, Any]:
        """The keyword arguments every aiokafka client takes to reach the brokers."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.uses_tls:
            options["ssl_context"] = self._ssl
        if self.uses_sasl:
            options |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": _reveal(self.sasl_password),
            }
        return options

    def producer(self, **options: Any) -> AIOKafkaProducer:
        """A producer (not started) on these brokers."""
        return AIOKafkaProducer(**self.options(), **options)

    def consumer(self, *topics: str, **options: Any) -> AIOKafkaConsumer:
        """A consumer (not started) on these brokers."""
        return AIOKafkaConsumer(*topics, **self.options(), **options)

    def admin(self, **options: Any) -> AIOKafkaAdminClient:
        """An admin client (not started) on these brokers."""
        return AIOKafkaAdminClient(**self.options(), **options)

    def client(self) -> AIOKafkaClient:
        """A bare client (bootstrap it, then close it) for requests the others do not make."""
        return AIOKafkaClient(**self.options())

    async def check(self, wait_s: float) -> None:
        """Connect (and log in) to a bootstrap server as the clients will.

        Raises BrokerRefusedError at once when a broker refuses the credentials, the
        certificates or the protocol; BrokerError when none answered within ``wait_s``.
        """
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() is None:
            loop.set_exception_handler(quiet_broken_requests)
        started = time.monotonic()
        deadline = started + wait_s
        closed: Counter[tuple[str, int]] = Counter()
        waited = False
        while True:
            for host, port in self._servers():
                left_ms = int((deadline - time.monotonic()) * 1000)
                try:
                    conn = await create_conn(
                        host,
                        port,
                        request_timeout_ms=max(100, min(5_000, left_ms)),
                        **self._conn_options(),
                    )
                except SaslAuthenticationFailed as e:
                    raise BrokerRefusedError(
                        f"the broker at {host}:{port} refused the login of "
                        f"{self.sasl_username!r} with {self.sasl_mechanism}: {e.message}",
                        "kafka_sasl_password",
                    ) from None
                except UnsupportedSaslMechanismError:
                    raise BrokerRefusedError(
                        f"the broker at {host}:{port} does not accept {self.sasl_mechanism}",
                        "kafka_sasl_mechanism",
                    ) from None
                except ssl.SSLCertVerificationError as e:
                    raise _untrusted(host, port, e) from None
                except (KafkaConnectionError, ConnectionResetError) as e:
                    closed[host, port] += 1
                    if closed[host, port] >= _CLOSED_TRIES:
                        raise self._closed(host, port) from None
                    logger.debug("%s:%s closed the connection: %r", host, port, e)
                except (OSError, TimeoutError, KafkaError) as e:
                    closed[host, port] = 0
                    # A person waiting on a command sees the outcome; a worker, why it waits.
                    quiet = waited or time.monotonic() - started < _QUIET_S
                    log = logger.debug if quiet else logger.warning
                    log("waiting up to %gs for the broker at %s:%s: %r", wait_s, host, port, e)
                    waited = waited or not quiet
                else:
                    conn.close()
                    return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"no broker of {self.bootstrap_servers} answered within {wait_s:g}s"
                )
            await asyncio.sleep(0.5)

    async def create_topics(
        self,
        names: Iterable[str],
        partitions: int,
        replication_factor: int | None = None,
        *,
        timeout_ms: int = 10_000,
    ) -> list[str]:
        """Create the topics that do not exist yet; return the names actually created.

        ``replication_factor`` None: min(3, the brokers up), and a warning when that is under 3,
        so a cluster never gets unreplicated topics silently. An existing topic is left as it
        is (a restart while a broker is down needs no broker count); a replication factor
        beyond the brokers up is refused (BrokerRefusedError naming the setting).
        """
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return []
        admin = self.admin(request_timeout_ms=timeout_ms)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            wanted = [name for name in wanted if name not in existing]
            if not wanted:
                return []
            brokers = len((await admin.describe_cluster())["brokers"])
            replicas = min(3, brokers) if replication_factor is None else replication_factor
            if replicas > brokers:
                raise BrokerRefusedError(
                    f"a replication factor of {replicas} needs {replicas} brokers; "
                    f"the cluster at {self.bootstrap_servers} lists {brokers} up",
                    "replication_factor",
                )
            if replicas < 3:
                logger.warning(
                    "creating topics %s with %d replica(s): the cluster lists %d broker(s) up; "
                    "set STREAM_LSTM_REPLICATION_FACTOR to require more",
                    wanted,
                    replicas,
                    brokers,
                )
            response = await admin.create_topics(
                [NewTopic(name, partitions, replicas) for name in wanted], timeout_ms=timeout_ms
            )
        finally:
            await admin.close()
        created: list[str] = []
        for topic, error_code, *rest in response.topic_errors:
            if error_code == 0:
                created.append(topic)
            elif error_code != _TOPIC_ALREADY_EXISTS:
                message = rest[0] if rest else None
                raise BrokerError(f"cannot create topic {topic!r}: error {error_code} {message}")
        if created:
            logger.info(
                "created topics %s with %d partitions, %d replicas", created, partitions, replicas
            )
        return created

    def _servers(self) -> list[tuple[str, int]]:
        """``host:port`` pairs, as aiokafka reads them: 9092 when no port is given."""
        servers = []
        for server in self.bootstrap_servers.split(","):
            parts = urlsplit(f"//{server.strip()}")
            if not parts.hostname:
                raise BrokerRefusedError(f"{server!r} is not host:port", "broker")
            servers.append((parts.hostname, parts.port or _DEFAULT_PORT))
        return servers

    def _conn_options(self) -> dict[str, Any]:
        options = self.options()
        del options["bootstrap_servers"]
        return options

    def _closed(self, host: str, port: int) -> BrokerRefusedError:
        """What a broker closing every connection at once most likely means."""
        if self.uses_tls and self.ssl_certfile is None:
            return BrokerRefusedError(
                f"the broker at {host}:{port} closes every TLS connection: it may require a "
                "client certificate, or not speak "
                f"{self.security_protocol} on that port",
                "kafka_ssl_certfile",
            )
        if self.uses_tls:
            return BrokerRefusedError(
                f"the broker at {host}:{port} closes every TLS connection: it may not trust "
                f"the client certificate, or not speak {self.security_protocol} on that port",
                "kafka_ssl_certfile",
            )
        return BrokerRefusedError(
            f"the broker at {host}:{port} closes every connection: does it speak "
            f"{self.security_protocol} on that port?",
            "kafka_security_protocol",
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of every client; a file that cannot be used raises
        BrokerRefusedError naming its setting."""
        if not self.uses_tls:
            return None
        try:
            context = ssl.create_default_context(cafile=_name(self.ssl_cafile))
        except (ssl.SSLError, OSError) as e:
            raise BrokerRefusedError(f"cannot use it as CAs: {e}", "kafka_ssl_cafile") from None
        context.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile is not None:
            self._load_client_certificate(context, self.ssl_certfile)
        return context

    def _load_client_certificate(self, context: ssl.SSLContext, certfile: Path) -> None:
        password = _reveal(self.ssl_key_password) or ""

        def key_password() -> str:  # never OpenSSL's prompt on the terminal
            return password

        try:
            context.load_cert_chain(certfile, _name(self.ssl_keyfile), password=key_password)
        except ssl.SSLError as e:
            if e.reason == "KEY_VALUES_MISMATCH":
                raise BrokerRefusedError(
                    "the key does not belong to the client certificate", "kafka_ssl_keyfile"
                ) from None
            locked = _encrypted(self.ssl_keyfile or certfile)
            setting = "kafka_ssl_key_password" if locked else "kafka_ssl_keyfile"
            raise BrokerRefusedError(
                "cannot load the client certificate's key (a wrong or missing key password, "
                f"or no PEM key): {e}",
                setting,
            ) from None
        except OSError as e:
            raise BrokerRefusedError(
                f"cannot read the client certificate or key: {e}", "kafka_ssl_certfile"
            ) from None


def quiet_broken_requests(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An event loop's exception handler that logs at debug, without a traceback, the errors of
    aiokafka requests left unread on a connection the broker broke (a client certificate
    refused after a TLS 1.3 handshake, say): asyncio would print each with its traceback when
    the request is collected, after the command has said in one line what was refused."""
    if isinstance(context.get("exception"), KafkaConnectionError) and "never retrieved" in str(
        context.get("message")
    ):
        logger.debug("%s: %r", context.get("message"), context.get("exception"))
        return
    loop.default_exception_handler(context)


SECURITY_FIELDS = tuple(
    f.name for f in fields(KafkaConnection) if f.init and f.name != "bootstrap_servers"
)
"""How to talk to the brokers, besides where they are: each is the setting ``kafka_<name>``."""


def _untrusted(host: str, port: int, error: ssl.SSLCertVerificationError) -> BrokerRefusedError:
    if names_another_host(error):
        return BrokerRefusedError(
            f"the certificate of the broker at {host}:{port} is not for {host!r}: "
            f"{error.verify_message}",
            "kafka_ssl_check_hostname",
        )
    return BrokerRefusedError(
        f"the certificate of the broker at {host}:{port} is not trusted: {error.verify_message}",
        "kafka_ssl_cafile",
    )


def _encrypted(keyfile: Path | None) -> bool:
    """Whether a PEM key file holds an encrypted key (the key may sit in the certificate file)."""
    try:
        return keyfile is not None and b"ENCRYPTED" in keyfile.read_bytes()
    except OSError:
        return False


def _name(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()
