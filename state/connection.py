"""Connecting to Redis: one server or a cluster from a URL, retries that stop at a refusal, and
URLs and messages without their passwords.

A client made here retries lost connections (one server: redis-py's own retry, forever, which
the store's calls bound by ``retry_s``; a cluster: none inside redis-py, the store retries) but
never a refusal: a wrong user or password, a missing permission, a certificate not trusted
(``refusal``). Its commands are packed by hiredis, in C.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import AuthenticationError, NoPermissionError, RedisClusterException

from stream_lstm.exceptions import ConfigError

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "CLUSTER_SCHEMES",
    "connect",
    "error_chain",
    "names_another_host",
    "passwords",
    "refusal",
    "scrubbed",
    "user_of",
    "why_refused",
    "without_password",
]

T = TypeVar("T")

BACKOFF_BASE_S = 0.01
BACKOFF_CAP_S = 1.0
_CONNECT_TIMEOUT_S = 5.0
"""A connect slower than this counts as a failed attempt (then retried)."""
_REPLY_TIMEOUT_S = 5.0
"""A reply slower than this counts as a failed attempt, and the command is sent again: harmless,
since loads only read and a repeated fenced commit applies nothing twice (it reports stale).
``retry_s`` bounds the whole call. (Also redis-py's own default, stated here so it is ours.)"""
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes naming a Redis Cluster, and the plain scheme of each node. redis-py has no cluster
scheme of its own: ``redis+cluster://[user:password@]host:port[,host:port...][?option=value]``
lists seed nodes (any one that answers is enough to discover the rest); options are redis-py's
URL options, as for ``redis://``. No database number: a cluster has only database 0."""
_CLUSTER_RETRIES = 0
"""redis-py's own retries of a cluster call. None: it still follows MOVED and ASK within a call,
but a lost node is retried by ``Cluster.attempt`` (cluster.py), with backoff and a fresh slot
map, and only for what that node has not answered (redis-py would resend a pipeline's
unanswered calls, but after closing every connection of the client, those of calls still in
flight included)."""
_CLUSTER_SOCKET_TIMEOUT_S = 5.0
"""A cluster node that stops answering counts as lost after this, so redis-py refreshes the
slot map (a replica may have taken over) instead of waiting out ``retry_s`` on it."""


_CLIENT_CERTIFICATE_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "TLSV1_ALERT_UNKNOWN_CA",
}
"""TLS alerts of a server that refused our client certificate (or our lack of one)."""
_NAME_MISMATCHES = {62, 64}
"""OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH."""


def names_another_host(error: ssl.SSLCertVerificationError) -> bool:
    """Whether a server's certificate was refused for naming another host or IP address (not
    for an issuer we do not trust): the hostname check's doing, not the CA's."""
    return error.verify_code in _NAME_MISMATCHES


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it was raised from or while handling, nearest first (a few: redis-py's
    chains are short; never a long or cyclic one)."""
    seen: BaseException | None = error
    for _ in range(5):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def refusal(error: BaseException) -> BaseException | None:
    """The refusal behind ``error`` when Redis refused us for good, else None.

    redis-py raises AuthenticationError, a ConnectionError, for a wrong user or password
    (WRONGPASS) and for none given (NOAUTH); a TLS failure is a ConnectionError raised while
    handling the ssl error (its ``__context__``); a cluster client raises RedisClusterException
    from either (its ``__cause__``). Any of them would be retried as if Redis were down. A user
    without a permission the store needs gets NoPermissionError (NOPERM), never retried.
    """
    for seen in error_chain(error):
        if isinstance(seen, (AuthenticationError, NoPermissionError, ssl.SSLCertVerificationError)):
            return seen
        if isinstance(seen, ssl.SSLError) and seen.reason in _CLIENT_CERTIFICATE_ALERTS:
            return seen
    return None


def why_refused(refused: BaseException, user: str) -> str:
    """What was refused, in words, for ``refusal``'s answer."""
    if isinstance(refused, AuthenticationError):
        return f"authentication failed for user {user!r} ({refused})"
    if isinstance(refused, NoPermissionError):
        return f"permission denied to user {user!r} ({refused})"
    if isinstance(refused, ssl.SSLCertVerificationError):
        if names_another_host(refused):
            return f"hostname mismatch: {refused.verify_message}"
        return f"certificate not trusted: {refused.verify_message}"
    return f"client certificate refused ({refused})"


class _RetryUnlessRefused(Retry):
    """redis-py's retry of connection errors, except a refusal (``refusal``): that one is
    raised at once, so a wrong password fails in one round trip instead of after ``retry_s``."""

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[[Exception], Any] | Callable[[Exception, int], Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        def retryable(error: Exception) -> bool:
            return refusal(error) is None and (is_retryable is None or is_retryable(error))

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


def connect(redis_url: str, retry_s: float) -> Redis | RedisCluster:
    """A client that retries lost connections forever, with backoff; ``_call`` bounds it."""
    if redis_url.partition("://")[0] in CLUSTER_SCHEMES:
        return _connect_cluster(redis_url, retry_s)
    try:
        client = Redis.from_url(
            redis_url,
            retry=_RetryUnlessRefused(
                ExponentialWithJitterBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), -1
            ),
            socket_connect_timeout=min(retry_s, _CONNECT_TIMEOUT_S),
            socket_timeout=min(retry_s, _REPLY_TIMEOUT_S),
        )
    except ValueError as error:  # its message may quote a piece of the URL
        message = f"{without_password(redis_url)}: {error}"
        raise ConfigError(scrubbed(message, passwords(redis_url))) from None
    pool = client.connection_pool
    pool.connection_class = _packed_by_hiredis(pool.connection_class)
    return client


def _packed_by_hiredis(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` (plain, TLS or Unix socket) packing commands with hiredis, in C.

    redis-py's asyncio connections pack every argument in Python; its synchronous ones use
    hiredis when it is installed. For a batch's MGET and commit (thousands of keys and 1 KB
    values) the Python packer cost ~10% of a worker's CPU.
    """
    serializer = HiredisRespSerializer()

    def pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
        command = args[0].encode() if isinstance(args[0], str) else args[0]
        if b" " not in command:  # not a two-word command such as SCRIPT LOAD
            try:  # str, bytes and ints, as the store sends, straight to hiredis
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        packed: list[bytes] = serializer.pack(*args)  # splits the command, converts buffers
        return packed

    return type(
        f"Hiredis{connection_class.__name__}", (connection_class,), {"pack_command": pack_command}
    )


def _connect_cluster(redis_url: str, retry_s: float) -> RedisCluster:
    """A cluster client seeded with every node the URL lists; it connects on first use.

    The first seed goes through redis-py's URL parser (credentials, TLS, query options), the
    others join it as startup nodes; redis-py asks them in turn for the slot map until one
    answers.
    """
    parts = urlsplit(redis_url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    seeds = [host.strip() for host in hosts.split(",") if host.strip()]
    if not seeds:
        raise ConfigError(
            f"{without_password(redis_url)}: a cluster URL names at least one node, "
            f"{parts.scheme}://host:port[,host:port...]"
        )
    first = urlunsplit(
        (
            CLUSTER_SCHEMES[parts.scheme],
            f"{credentials}@{seeds[0]}" if credentials else seeds[0],
            parts.path,
            parts.query,
            "",
        )
    )
    try:
        others = [ClusterNode(*_host_port(seed)) for seed in seeds[1:]]
        return RedisCluster.from_url(
            first,
            startup_nodes=others or None,
            retry=Retry(
                ExponentialWithJitterBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S),
                _CLUSTER_RETRIES,
            ),
            socket_connect_timeout=min(retry_s, _CONNECT_TIMEOUT_S),
            socket_timeout=min(retry_s, _CLUSTER_SOCKET_TIMEOUT_S),
        )
    except (ValueError, RedisClusterException) as error:
        message = f"{without_password(redis_url)}: {error}"
        raise ConfigError(scrubbed(message, passwords(redis_url))) from None


def _host_port(seed: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``; the port defaults to 6379) as a pair."""
    parts = urlsplit(f"//{seed}")
    if not parts.hostname:
        raise ValueError(f"{seed!r} is not host:port")
    return parts.hostname, parts.port or 6379


_MASK = "***"


def _split_url(url: str) -> tuple[str, str, str, list[tuple[str, str, str]]]:
    """``scheme://``, the userinfo (up to the last ``@``, so that a password with an unescaped
    ``/``, ``@``, ``?``, ``#`` or ``&`` stays whole), the rest up to the query, and the query's
    ``(name, "=", value)`` options, all as written. No URL is invalid here: no error to leak
    it."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, rest = rest.rpartition("@")
    location, _, query = rest.partition("?")
    options = [option.partition("=") for option in query.split("&")] if query else []
    return scheme + sep, userinfo + at, location, options


def _is_password(name: str) -> bool:
    """A query option holding a secret: ``password``, and ``ssl_password`` (a key's)."""
    return "password" in unquote(name).lower()


def without_password(url: str) -> str:
    """The URL as it may appear in logs and errors: the password of the userinfo and of any
    ``password=`` option masked."""
    scheme, userinfo, location, options = _split_url(url)
    if "?" in userinfo:  # an "@" in the query, or a password with "?": where would it end?
        return f"{scheme}{_MASK}"
    user, colon, _ = userinfo.removesuffix("@").partition(":")
    if colon:
        userinfo = f"{user}:{_MASK}@"
    if not options:
        return scheme + userinfo + location
    query = "&".join(
        name + eq + (_MASK if eq and _is_password(name) else value) for name, eq, value in options
    )
    return f"{scheme}{userinfo}{location}?{query}"


_SHORTEST = 4
"""A piece of a password shorter than this is not masked on its own in library messages: it
would mask common words and give the piece away."""


def passwords(url: str) -> list[str]:
    """Every password the URL holds, as written and unescaped, and what a URL parser that
    ends the host at an unescaped ``/`` would take for one: what no message may show."""
    _, userinfo, _, options = _split_url(url)
    password = userinfo.removesuffix("@").partition(":")[2]
    head = password.partition("/")[0]
    found = [password, head] if len(head) >= _SHORTEST else [password]
    found += [value for name, _, value in options if _is_password(name)]
    return [form for secret in found if secret for form in {secret, unquote(secret)}]


def scrubbed(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret masked: for messages that quote what a library said."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text


def user_of(url: str) -> str:
    """The user a URL authenticates as: its userinfo's or ``username=`` option's, else the
    default user."""
    _, userinfo, _, options = _split_url(url)
    user = userinfo.removesuffix("@").partition(":")[0]
    user = user or next((v for k, _, v in options if unquote(k) == "username"), "")
    return unquote(user) or "default"
