"""The worker's metrics, without a worker: what one observation leaves in /metrics."""

from __future__ import annotations

from workers.metrics import Metrics


def sample(metrics: Metrics, name: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_an_event_age_from_a_clock_ahead_of_ours_counts_as_zero() -> None:
    metrics = Metrics()
    metrics.observe_age(-0.25, 0.04)  # the producer's clock runs 0.25 s ahead of the worker's

    age = "stream_lstm_event_age_seconds"
    assert sample(metrics, f'{age}_sum{{at="fetched"}}') == 0.0
    assert sample(metrics, f'{age}_sum{{at="emitted"}}') == 0.04
    assert sample(metrics, f'{age}_bucket{{at="fetched",le="0.005"}}') == 1.0
    assert sample(metrics, f'{age}_bucket{{at="emitted",le="0.025"}}') == 0.0
    assert sample(metrics, f'{age}_bucket{{at="emitted",le="0.05"}}') == 1.0
