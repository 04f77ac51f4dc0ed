"""What a worker checks and prepares before it starts: the broker, Redis, the topics.

Runs before the Faust app exists, so its warnings reach stderr as they are (the app's module
logger is silenced by mode until the worker configures logging).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

from aiokafka.errors import KafkaError

from state import MemoryStore
from state.durability import Durability
from stream_lstm.exceptions import BrokerError, ConfigError, StoreUnavailableError
from stream_lstm.model import StreamModel
from workers.settings import Settings
from workers.takeover import check_not_taken_over, check_take_over
from workers.topics import check_input_topic

logger = logging.getLogger(__name__)

PING_TIMEOUT_S = 2.0
TOPICS_WAIT_S = 60.0


async def preflight(settings: Settings, model: StreamModel) -> None:
    """Before the worker starts: the broker accepts our login and has the topics, Redis
    accepts us, and the memories there were made from this input topic.

    A refusal (a wrong password, an untrusted certificate) raises BrokerRefusedError or
    StoreRefusedError at once: retrying cannot help, and the clients would otherwise retry it
    as if the broker or Redis were down. Memories of another input topic (``check_input_topic``)
    raise TopicChangedError; an app id another deployment took over, TakenOverError; a take-over
    of no live deployment, ConfigError (``check_take_over``). A broker that does not answer is
    waited for (up to ``TOPICS_WAIT_S``); a Redis that does not answer yet is the worker's to
    wait out. A Redis that cannot give REDIS_DURABILITY raises ConfigError
    (``check_durability``).
    """
    if settings.serves_demo_model:
        logger.warning(
            "serving the bundled TV-show demo model (%s), as STREAM_LSTM_MODEL is unset: its "
            "predictions mean nothing for your events; set STREAM_LSTM_MODEL to your model file",
            settings.model,
        )
    if settings.api_token is None and not ipaddress.ip_address(settings.web_bind).is_loopback:
        logger.warning(
            "the memory API listens on %s:%d without STREAM_LSTM_API_TOKEN: anyone who can "
            "reach it can read and reset every entity's memory",
            settings.web_bind,
            settings.web_port,
        )
    await settings.kafka.check(TOPICS_WAIT_S)
    async with settings.memory_store(model.version) as store:
        try:
            await store.ping(PING_TIMEOUT_S)  # a refusal first: one line, nothing created
        except StoreUnavailableError as e:
            logger.warning("Redis does not answer yet; the worker will wait for it: %s", e)
            answers = False
        else:
            answers = True
        await ensure_topics(settings)  # the topic check needs the topic
        if answers:
            await _check_input_topic(settings, store)
            await check_not_taken_over(store, settings)
            await check_take_over(settings, store)
            policy = await store.eviction_policy()
            if policy is not None and policy != "noeviction":
                logger.warning(
                    "Redis's maxmemory-policy is %s: when full it evicts keys, memories and "
                    "their fences among them, and their entities start again from zero (events "
                    "replayed onto them would apply twice); set maxmemory-policy noeviction",
                    policy,
                )
            await check_durability(store, settings.redis_durability)


async def _check_input_topic(settings: Settings, store: MemoryStore) -> None:
    """``check_input_topic``, waiting (up to ``TOPICS_WAIT_S``) for a topic just created to
    reach the metadata of the broker asked."""
    deadline = time.monotonic() + TOPICS_WAIT_S
    client = settings.kafka.client()
    try:
        await client.bootstrap()
        while True:
            try:
                await check_input_topic(client, store, settings)
            except KafkaError as e:
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"the broker at {settings.broker} did not describe the input topic "
                        f"{settings.input_topic!r} within {TOPICS_WAIT_S:.0f}s ({e!r})"
                    ) from e
                logger.debug("waiting for the input topic's metadata: %r", e)
                await asyncio.sleep(0.5)
                continue
            return
    finally:
        await client.close()


async def check_durability(store: MemoryStore, durability: Durability) -> None:
    """ConfigError naming REDIS_DURABILITY when Redis's INFO shows it cannot give it (no AOF,
    too few replicas online, no WAITAOF): every commit would wait and fail. A warning when INFO
    cannot be read: then the first commits tell."""
    if not durability.waits:
        return
    info = await store.info()
    if info is None:
        logger.warning(
            "could not read Redis's INFO to check STREAM_LSTM_REDIS_DURABILITY=%s; commits will "
            "fail and be retried if Redis cannot give it",
            durability,
        )
        return
    problem = durability.unmet_by(info)
    if problem is not None:
        raise ConfigError(
            f"STREAM_LSTM_REDIS_DURABILITY / --redis-durability: {durability}: {problem}"
        )


async def ensure_topics(settings: Settings) -> None:
    """Create missing topics with PARTITIONS partitions (and REPLICATION_FACTOR replicas)
    before any client can auto-create them.

    Some brokers (Tansu) auto-create a topic with their own default partition count as soon as a
    client asks for its metadata, and the count caps how many workers can share the stream.
    """
    names = [settings.input_topic, settings.output_topic, settings.dead_letter_topic]
    if settings.shadow_topic is not None:
        names.append(settings.shadow_topic)
    deadline = time.monotonic() + TOPICS_WAIT_S
    while True:
        try:
            await settings.kafka.create_topics(
                names, settings.partitions, settings.replication_factor
            )
        except KafkaError as e:
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"STREAM_LSTM_BROKER / --broker: {settings.broker} did not answer within "
                    f"{TOPICS_WAIT_S:.0f}s ({e!r})"
                ) from e
            logger.warning("waiting for the broker at %s: %r", settings.broker, e)
            await asyncio.sleep(1.0)
            continue
        return
