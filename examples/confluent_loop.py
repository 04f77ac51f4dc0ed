"""Per-entity LSTM memories in a confluent-kafka loop: events in, one prediction per event out,
each entity's memories in Redis updated exactly once per event (workers/plugin.py says how).

    KAFKA=localhost:9092 REDIS=redis://localhost MODEL=model.pt python examples/confluent_loop.py
"""

import asyncio
import os
import signal

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from state import MemoryStore
from stream_lstm import StreamModel
from workers.plugin import Message, Processor, Record

KAFKA, REDIS, GROUP = os.environ["KAFKA"], os.environ["REDIS"], os.environ.get("GROUP", "my-app")
EVENTS, PREDICTIONS = (
    os.environ.get("EVENTS", "events"),
    os.environ.get("PREDICTIONS", "predictions"),
)
DEAD_LETTERS = os.environ.get("DEAD_LETTERS", "dead-letters")


def main() -> None:
    model = StreamModel.load(os.environ["MODEL"])
    loop = asyncio.new_event_loop()  # the store is asyncio: its calls run here, one at a time
    store = MemoryStore(REDIS, GROUP, model.version, cache_entities=100_000)
    processor = Processor(model, store, input_topic=EVENTS)
    loop.run_until_complete(processor.check_topic(KAFKA))  # refuses a recreated topic
    consumer = Consumer(
        {"bootstrap.servers": KAFKA, "group.id": GROUP, "enable.auto.commit": False,
         "auto.offset.reset": "earliest"}
    )  # fmt: skip
    # Idempotent, so that retries keep each entity's predictions in order; and Java's
    # partitioner, as the worker's: a prediction lands where Java clients would put it.
    producer = Producer(
        {"bootstrap.servers": KAFKA, "enable.idempotence": True, "partitioner": "murmur2_random"}
    )
    consumer.subscribe(  # callbacks run inside consume(), between batches
        [EVENTS],
        on_assign=lambda _, parts: processor.assign((p.topic, p.partition) for p in parts),
        on_revoke=lambda _, parts: processor.revoke((p.topic, p.partition) for p in parts),
    )
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: stopping.append(signum))

    async def send_dead_letters(letters: list[Message]) -> None:
        send(producer, DEAD_LETTERS, letters)

    try:
        while not stopping:
            messages = consumer.consume(1000, timeout=0.5)
            errors = [m.error() for m in messages if m.error()]
            if any(not error.retriable() for error in errors):  # librdkafka retries the others
                raise KafkaException(next(e for e in errors if not e.retriable()))
            records = [
                Record(m.topic(), m.partition(), m.offset(), m.key(), m.value())
                for m in messages
                if not m.error()
            ]
            if not records:
                continue
            processed = loop.run_until_complete(processor.process(records))
            send(producer, PREDICTIONS, processed.predictions)
            send(producer, DEAD_LETTERS, processed.dead_letters)
            processed.delivered()
            loop.run_until_complete(processor.commit(processed, send_dead_letters))
            offsets = [TopicPartition(t, p, next) for (t, p), next in processed.offsets.items()]
            consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()
        loop.run_until_complete(store.aclose())


def send(producer: Producer, topic: str, messages: list[Message]) -> None:
    """Send, and return once the broker acknowledged every message."""
    failed = []
    for key, value in messages:
        producer.produce(topic, value, key, on_delivery=lambda e, _: e and failed.append(e))
    producer.flush()
    if failed:
        raise KafkaException(failed[0])


if __name__ == "__main__":
    main()
