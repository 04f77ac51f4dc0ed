"""The step as an agent of your own Faust app (``examples/faust_app.py``):

    add_lstm_agent(app, Processor(model, store, input_topic="events"),
                   predictions="predictions", dead_letters="dead-letters")

The agent checks the input topic's identity when it starts (``Processor.check_topic``), then
takes batches from it (``noack_take``: up to ``max_batch`` events, or
what came within ``within_s``), runs them through ``workers.plugin.Processor`` in its order,
sends the predictions and dead letters to their topics and waits for the broker's acks, commits
the memories, and only then acks the events, so that Faust commits their offsets after their
memories. So under Faust's acking the worker's guarantees hold: memories exactly once per
event, no event lost, a replay gets the same predictions again (predictions at least once).

What Faust does around it: before it revokes partitions, a rebalance waits until every event
it handed out is acked (``Consumer.wait_empty``), so the agent finishes its batches in hand,
buffer included, and only then hears of the revocation. An event of a partition no longer owned
that still reaches it is acked unprocessed: Faust discards offset commits of revoked partitions
(``_commit_offsets``), and the partition's next owner reads the event. Any error the
processor does not retry (it waits out Redis outages) crashes the app instead of restarting the
agent: a restarted agent would go on after events whose memories were never committed, and
their replay would then be dropped as applied. Restarted, the app reads them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import faust
from faust.types import TP, AgentT, EventT, StreamT
from mode import CrashingSupervisor

from workers.connection import KafkaConnection
from workers.plugin import Message, Processor

__all__ = ["add_lstm_agent"]


def add_lstm_agent(
    app: faust.App,
    processor: Processor,
    *,
    predictions: str,
    dead_letters: str,
    max_batch: int = 1000,
    within_s: float = 0.05,
    kafka: KafkaConnection | None = None,
) -> AgentT[Any]:
    """Add the step to ``app`` as an agent on the processor's input topic; returns the agent.

    ``kafka``: how to reach the brokers to check the input topic's identity; by default the
    app's ``broker`` URLs, in plain text (pass a connection for a secured cluster).
    """
    raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
    source = app.topic(processor.input_topic, **raw)
    output = app.topic(predictions, **raw)
    dead = app.topic(dead_letters, **raw)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # mode's signal typing
    async def on_assigned(sender: faust.App, assigned: set[TP], **_: Any) -> None:
        processor.assign((tp.topic, tp.partition) for tp in assigned)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: faust.App, revoked: set[TP], **_: Any) -> None:
        processor.revoke((tp.topic, tp.partition) for tp in revoked)

    async def send_dead_letters(letters: list[Message]) -> None:
        await send(dead, letters)

    async def step(stream: StreamT[Any]) -> None:
        brokers = ",".join(f"{url.host}:{url.port or 9092}" for url in app.conf.broker)
        await processor.check_topic(kafka or brokers)
        batches = cast("faust.Stream[Any]", stream).noack_take(max_batch, within_s)
        async for batch in batches:
            taken = cast("Sequence[EventT[Any]]", batch)  # noack_take yields the events
            owned = [e for e in taken if processor.owns((e.message.topic, e.message.partition))]
            if owned:
                processed = await processor.process([e.message for e in owned])
                await send(output, processed.predictions)
                await send(dead, processed.dead_letters)
                processed.delivered()
                await processor.commit(processed, send_dead_letters)
            for event in taken:  # only now: Faust commits offsets of acked events
                await stream.ack(event)

    step.__name__ = f"lstm_{processor.input_topic}"
    agent: AgentT[Any] = app.agent(source, supervisor_strategy=CrashingSupervisor)(step)
    return agent


async def send(topic: faust.TopicT, messages: Sequence[Message]) -> None:
    """Send, and return once the broker acknowledged every message."""
    pending = [await topic.send(key=key, value=value) for key, value in messages]
    for sent in pending:
        await sent
