"""Per-entity LSTM memories as an agent of your own Faust app: events in, one prediction per
event out, each entity's memories in Redis updated exactly once per event
(workers/faust_agent.py says how, under Faust's acking).

    KAFKA=localhost:9092 REDIS=redis://localhost MODEL=model.pt \\
        python examples/faust_app.py worker --without-web -l info

``--without-web``: Faust's worker command starts its web server on 0.0.0.0:6066 otherwise,
whatever the app's ``web_enabled`` says. ``-l info``: at its default level (warn) Faust starts a
terminal spinner that sets the root logger to DEBUG, and every library's debug line is then
built and formatted (13% of the agent's CPU).
"""

import os

import faust

from state import MemoryStore
from stream_lstm import StreamModel
from workers.faust_agent import add_lstm_agent
from workers.plugin import Processor

KAFKA, REDIS, GROUP = os.environ["KAFKA"], os.environ["REDIS"], os.environ.get("GROUP", "my-app")
EVENTS, PREDICTIONS = (
    os.environ.get("EVENTS", "events"),
    os.environ.get("PREDICTIONS", "predictions"),
)
DEAD_LETTERS = os.environ.get("DEAD_LETTERS", "dead-letters")

model = StreamModel.load(os.environ["MODEL"])
store = MemoryStore(REDIS, GROUP, model.version, cache_entities=100_000)
app = faust.App(
    GROUP,
    broker=f"kafka://{KAFKA}",
    web_enabled=False,
    datadir=os.environ.get("DATADIR", f"{GROUP}-data"),
)
# ... your app's own agents, tables and pages ...
processor = Processor(model, store, input_topic=EVENTS)
add_lstm_agent(app, processor, predictions=PREDICTIONS, dead_letters=DEAD_LETTERS)

if __name__ == "__main__":
    app.main()
