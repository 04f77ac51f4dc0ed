"""The input topic's identity, so that memories fenced by one topic's offsets never meet another's.

Every stored memory carries the offset of the last event applied to it, and an event at or below
it is dropped as a replay. Offsets count within one topic: a topic deleted and recreated starts
again at 0 (and Kafka forgets the group's offsets), as does another topic the worker is pointed at
under the same app id, so their events would be dropped as replays, silently. The store records
the input topic's name and Kafka topic id (a UUID no recreated topic shares) beside the memories,
and a worker refuses any other topic (``check_input_topic``): at start, whenever partitions are
assigned to it, when a partition's offsets go back, and when the broker names another topic id
(asked every 2 s).

aiokafka asks for metadata at version 5 at most, which has no topic ids: the request here is
version 10 (Kafka 2.8 and later), which Tansu and Apache Kafka both answer with the topic's id.
A broker that cannot say (an older one, or one that answers the all-zero id: no topic ids in
its cluster yet) leaves the check undone, with a warning: recording or comparing such an answer
would protect nothing, or stop a healthy worker once the cluster assigns real ids.
"""

from __future__ import annotations

import logging
import uuid
from io import BytesIO
from typing import Any, cast

import orjson
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError, for_code
from aiokafka.protocol.abstract import AbstractType
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from state import MemoryStore
from stream_lstm.exceptions import TopicChangedError
from workers.settings import Settings

__all__ = ["check_input_topic", "claim_input_topic", "topic_id"]

logger = logging.getLogger(__name__)

NO_TOPIC_ID = uuid.UUID(int=0)


class _Uuid(AbstractType):  # type: ignore[misc]
    """Kafka's ``uuid``: 16 bytes, big-endian."""

    @classmethod
    def encode(cls, value: uuid.UUID) -> bytes:
        return value.bytes

    @classmethod
    def decode(cls, data: BytesIO) -> uuid.UUID:
        return uuid.UUID(bytes=data.read(16))


class _MetadataResponseV10(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 10
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            CompactArray(
                ("node_id", Int32),
                ("host", CompactString("utf-8")),
                ("port", Int32),
                ("rack", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            CompactArray(
                ("error_code", Int16),
                ("name", CompactString("utf-8")),
                ("topic_id", _Uuid),
                ("is_internal", Boolean),
                (
                    "partitions",
                    CompactArray(
                        ("error_code", Int16),
                        ("partition_index", Int32),
                        ("leader_id", Int32),
                        ("leader_epoch", Int32),
                        ("replica_nodes", CompactArray(Int32)),
                        ("isr_nodes", CompactArray(Int32)),
                        ("offline_replicas", CompactArray(Int32)),
                        ("tags", TaggedFields),
                    ),
                ),
                ("topic_authorized_operations", Int32),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_authorized_operations", Int32),
        ("tags", TaggedFields),
    )


class _MetadataRequestV10(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 3
    API_VERSION = 10
    RESPONSE_TYPE = _MetadataResponseV10
    SCHEMA = Schema(
        (
            "topics",
            CompactArray(
                ("topic_id", _Uuid), ("name", CompactString("utf-8")), ("tags", TaggedFields)
            ),
        ),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class _TopicMetadata(Request[_MetadataRequestV10]):  # type: ignore[misc]
    """Metadata of one topic, by name, with its topic id; never creates it."""

    API_KEY = 3

    def __init__(self, topic: str) -> None:
        self.topic = topic

    def build(self, request_struct_class: type[_MetadataRequestV10]) -> Any:
        return request_struct_class([(NO_TOPIC_ID, self.topic, {})], False, False, False, {})


async def topic_id(client: AIOKafkaClient, topic: str) -> uuid.UUID | None:
    """The topic's Kafka topic id, as a broker knows it now; None when the broker cannot say
    (it predates Metadata v10, or has no topic ids: it answers the all-zero id).

    Raises the broker's error (UnknownTopicOrPartitionError while the topic does not exist, a
    KafkaError to retry) or KafkaConnectionError when no broker is known.
    """
    node = client.get_random_node()
    if node is None:
        raise KafkaConnectionError("no broker known")
    try:
        response = await client.send(node, _TopicMetadata(topic))
    except NotImplementedError:  # aiokafka: the broker's Metadata versions stop below 10
        return None
    ((error_code, _, found, *_),) = response.topics
    if error_code:
        raise for_code(error_code)(f"metadata of topic {topic!r}")
    return None if found == NO_TOPIC_ID else cast("uuid.UUID", found)


_unchecked: list[str] = []
"""Topics already warned about as unchecked in this process: one warning, not one every 2 s."""


async def check_input_topic(
    client: AIOKafkaClient, store: MemoryStore, settings: Settings
) -> uuid.UUID | None:
    """Record the input topic beside the memories, or raise TopicChangedError when they were
    made from another topic: one recreated since (the same name, another id) or renamed.
    Returns the topic id checked (None: the broker gives none, and nothing was checked)."""
    return await claim_input_topic(
        client,
        store,
        settings.input_topic,
        "Start the worker with a new STREAM_LSTM_APP_ID (a new consumer group and memory "
        f"namespace), or delete the keys {settings.app_id}:* from Redis to start every entity "
        "from zero memory",
    )


async def claim_input_topic(
    client: AIOKafkaClient, store: MemoryStore, topic: str, remedy: str
) -> uuid.UUID | None:
    """``check_input_topic`` for any caller: ``remedy`` says what to do when the topic changed."""
    found = await topic_id(client, topic)
    if found is None:
        if not _unchecked:
            logger.warning(
                "the broker gives no topic id for %r (Kafka before 2.8, or a cluster without "
                "topic ids): a topic deleted and recreated under this app id cannot be told "
                "from the one the memories were made from",
                topic,
            )
            _unchecked.append(topic)
        return None
    identity = {"topic": topic, "topic_id": str(found)}
    recorded = await store.claim_topic(orjson.dumps(identity).decode())
    if recorded is None or orjson.loads(recorded) == identity:
        return found
    was = orjson.loads(recorded)
    if was["topic"] == topic:
        what = f"was deleted and recreated (topic id {was['topic_id']}, now {identity['topic_id']})"
    else:
        what = f"is not the topic {was['topic']!r} they were made from"
    raise TopicChangedError(
        f"the input topic {topic!r} {what}: the stored memories of this app id and model count "
        f"that topic's offsets, so this one's events would be dropped as replays. {remedy}"
    )
