"""The report's choices, without Ray: which rounds it shows, and the figures summarize derives."""

from __future__ import annotations

import math

import pyarrow as pa

from raysim.cli import _rows_to_show
from raysim.metrics import METRICS_SCHEMA, summarize


def rows(count: int, eval_every: int) -> list[dict]:
    return [{"round": r, "accuracy": 0.1 + r / 1000 if r % eval_every == 0 or r == count else math.nan}
            for r in range(1, count + 1)]


def test_report_shows_evaluated_rounds_evenly_and_always_the_last():
    shown = [row["round"] for row in _rows_to_show(rows(300, 10), 25)]
    assert all(r % 10 == 0 for r in shown) and shown[-1] == 300 and len(shown) <= 26
    assert shown == sorted(shown) and shown[1] - shown[0] == 20


def test_report_of_a_run_evaluated_every_round_spaces_all_rounds():
    shown = [row["round"] for row in _rows_to_show(rows(10, 1), 25)]
    assert shown == list(range(1, 11))
    shown = [row["round"] for row in _rows_to_show(rows(7, 3), 25)]  # 3, 6 and the final 7 were evaluated
    assert shown == [3, 6, 7]


def test_summary_splits_the_bytes_to_target_by_direction():
    values = {name: [0] * 3 for name in METRICS_SCHEMA.names}
    values.update(round=[1, 2, 3], status=["ok"] * 3, accuracy=[0.3, 0.6, 0.7], loss=[1.0] * 3,
                  virtual_time_s=[1.0, 2.0, 3.0], wall_time_s=[1.0, 2.0, 3.0],
                  cumulative_bytes_up=[10, 20, 30], cumulative_bytes_down=[100, 200, 300])
    summary = summarize(pa.Table.from_pydict(values, schema=METRICS_SCHEMA), target_accuracy=0.5)
    assert (summary["round_to_target"], summary["bytes_to_target"], summary["bytes_up_to_target"]) == (2, 220, 20)


def test_the_summary_shows_peak_memory_per_process_kind():
    from raysim.cli import _memory_rows

    memory = {"driver_peak_mb": 500.0, "coordinator_peak_mb": 300.0, "client_actors_peak_mb": [1000.0, 1248.0],
              "total_peak_mb": 3048.0}
    [(name, text)] = _memory_rows(memory)
    assert "driver / coordinator / actors" in name
    assert text == "3.0 GB (500 / 300 / 2,248 MB)"
    assert _memory_rows(None) == []  # runs recorded before the figure existed
