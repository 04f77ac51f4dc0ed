"""Per-entity LSTM memories in a plain aiokafka loop: events in, one prediction per event out,
each entity's memories in Redis updated exactly once per event (workers/plugin.py says how).

    KAFKA=localhost:9092 REDIS=redis://localhost MODEL=model.pt python examples/aiokafka_loop.py
"""

import asyncio
import os
import signal
from functools import partial

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from state import MemoryStore
from stream_lstm import StreamModel
from workers.plugin import Message, Processor

KAFKA, REDIS, GROUP = os.environ["KAFKA"], os.environ["REDIS"], os.environ.get("GROUP", "my-app")
EVENTS, PREDICTIONS = (
    os.environ.get("EVENTS", "events"),
    os.environ.get("PREDICTIONS", "predictions"),
)
DEAD_LETTERS = os.environ.get("DEAD_LETTERS", "dead-letters")


async def main() -> None:
    model = StreamModel.load(os.environ["MODEL"])
    async with MemoryStore(REDIS, GROUP, model.version, cache_entities=100_000) as store:
        processor, in_hand = Processor(model, store, input_topic=EVENTS), asyncio.Lock()
        await processor.check_topic(KAFKA)  # refuses a recreated topic: memories count offsets

        class Rebalance(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
                async with in_hand:  # the batch in hand finishes first
                    processor.revoke((tp.topic, tp.partition) for tp in revoked)

            async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
                processor.assign((tp.topic, tp.partition) for tp in assigned)

        consumer = AIOKafkaConsumer(
            bootstrap_servers=KAFKA, group_id=GROUP, enable_auto_commit=False,
            auto_offset_reset="earliest",
        )  # fmt: skip
        consumer.subscribe([EVENTS], listener=Rebalance())
        producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await consumer.start()
        await producer.start()
        try:
            while not stop.is_set():
                fetched = await consumer.getmany(timeout_ms=500, max_records=1000)
                async with in_hand:  # not while fetching: a rebalance waits inside getmany
                    records = [
                        record
                        for part in fetched.values()
                        for record in part
                        if processor.owns((record.topic, record.partition))  # not revoked since
                    ]
                    if not records:
                        continue
                    processed = await processor.process(records)
                    await send(producer, PREDICTIONS, processed.predictions)
                    await send(producer, DEAD_LETTERS, processed.dead_letters)
                    processed.delivered()
                    await processor.commit(processed, partial(send, producer, DEAD_LETTERS))
                    offsets = processed.offsets.items()
                    await consumer.commit({TopicPartition(*at): next for at, next in offsets})
        finally:
            await consumer.stop()
            await producer.stop()


async def send(producer: AIOKafkaProducer, topic: str, messages: list[Message]) -> None:
    """Send, and return once the broker acknowledged every message."""
    acks = [await producer.send(topic, value, key=key) for key, value in messages]
    await asyncio.gather(*acks)


if __name__ == "__main__":
    asyncio.run(main())
