"""What a run records: metrics.parquet, events.parquet, TensorBoard, summary.json.

The coordinator feeds one :class:`RunRecorder` a row per round and a batch of
per-sensor task rows; TensorBoard gets the same numbers as the Parquet files.
Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

METRICS_SCHEMA = pa.schema(
    [
        ("round", pa.int64()),  # sync: the round; async: the server step (= model version produced)
        ("status", pa.string()),  # ok | skipped (below min_completion) | idle (no sensor online)
        ("virtual_time_s", pa.float64()),
        ("round_duration_s", pa.float64()),
        ("wall_time_s", pa.float64()),
        ("accuracy", pa.float64()),
        ("loss", pa.float64()),
        ("train_loss", pa.float64()),
        ("selected", pa.int64()),  # tasks that ended in this round / step
        ("updates_applied", pa.int64()),
        ("updates_dropped", pa.int64()),  # late + lost + offline + skipped + rejected
        ("updates_late", pa.int64()),
        ("updates_lost", pa.int64()),
        ("updates_offline", pa.int64()),
        ("updates_rejected", pa.int64()),  # refused by validation (non-finite, unknown base, anomaly filters)
        ("retransmissions", pa.int64()),
        ("trainings_skipped", pa.int64()),  # tasks that got the model but were never trained (dropped anyway)
        ("compute_saved_s", pa.float64()),  # their virtual compute time
        ("staleness_mean", pa.float64()),
        ("staleness_max", pa.int64()),
        ("concurrency", pa.int64()),  # sensors in flight
        ("bytes_up", pa.int64()),
        ("bytes_down", pa.int64()),
        ("cumulative_bytes_up", pa.int64()),
        ("cumulative_bytes_down", pa.int64()),
        ("uplink_compression", pa.float64()),  # raw float32 bytes per byte sent, sensor → coordinator
        ("downlink_compression", pa.float64()),  # the same, coordinator → sensor
        ("epsilon", pa.float64()),  # privacy spent so far, at the scenario's δ (NaN without privacy)
        ("dp_clip_norm", pa.float64()),  # central DP: the clipping bound for the next round (NaN otherwise)
        ("updates_per_s", pa.float64()),
        ("train_wall_s", pa.float64()),  # wall seconds from sending the step's training calls to the last result
        ("actor_busy_mean_s", pa.float64()),  # wall seconds each client actor spent training, mean over actors
        ("actor_busy_max_s", pa.float64()),  # and the busiest actor's
        # With personalization: every sensor that has trained, with its own model on its own held-out samples.
        ("participation_fairness", pa.float64()),  # Jain's index over every sensor's selection count so far
        ("drift_alarms", pa.float64()),  # sensors flagged by drift detection in the round (NaN without it)
        ("personal_accuracy_mean", pa.float64()),
        ("personal_accuracy_std", pa.float64()),
        ("personal_accuracy_p10", pa.float64()),  # the 10th percentile: how the worst-served sensors do
        ("personal_sensors", pa.float64()),  # how many sensors that is
    ]
)
# A run with several model architectures adds accuracy.<architecture> and loss.<architecture> columns
# (float64), one pair per architecture, named after its tiers (architectures.Group.name); a fleet of
# several tiers adds selected.<tier>: the sensors of each tier selected in the round (async: that ended in it).

EVENTS_SCHEMA = pa.schema(
    [
        ("sensor", pa.int64()),
        ("round", pa.int64()),
        ("base_version", pa.int64()),
        ("tier", pa.string()),
        ("dispatched_at", pa.float64()),
        ("download_s", pa.float64()),
        ("compute_s", pa.float64()),
        ("upload_s", pa.float64()),
        ("arrived_at", pa.float64()),
        ("outcome", pa.string()),
        ("reason", pa.string()),  # rejected updates: non_finite | unknown_base | norm_outlier | cosine_outlier | too_few_valid
        ("staleness", pa.int64()),
        ("retransmissions", pa.int64()),
        ("num_samples", pa.int64()),
        ("local_steps", pa.int64()),
        ("train_loss", pa.float64()),
        ("bytes_up", pa.int64()),
        ("bytes_down", pa.int64()),
    ]
)

# Columns that depend on the host machine, not on the simulation.
WALL_CLOCK_COLUMNS = ("wall_time_s", "updates_per_s", "train_wall_s", "actor_busy_mean_s", "actor_busy_max_s")


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MB, since it started or since :func:`reset_peak_rss`.

    Linux's VmHWM where available (it can be reset), else ``getrusage``'s
    ru_maxrss (KiB on Linux, bytes on macOS), which covers the whole process life.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def process_memory() -> dict[str, Any]:
    """This process's id and :func:`peak_rss_mb` (what an actor's ``memory()`` reports)."""
    return {"pid": os.getpid(), "peak_mb": peak_rss_mb()}


def reset_peak_rss() -> None:
    """Start :func:`peak_rss_mb` afresh from the current resident size (Linux; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


# actors.parquet: one row per (round or async step, client actor) that trained in it.
ACTORS_SCHEMA = pa.schema(
    [
        ("round", pa.int64()),
        ("actor", pa.int64()),  # index of the client actor
        ("sensors", pa.int64()),  # tasks it trained for this round / step
        ("busy_s", pa.float64()),  # wall seconds it spent training them
    ]
)

# TensorBoard tags (the curves a user looks at) and the metrics columns they plot.
TB_BY_ROUND = {
    "accuracy": "accuracy",
    "loss": "loss",
    "train_loss": "train_loss",
    "updates_applied": "updates_applied",
    "updates_dropped": "updates_dropped",
    "updates_late": "updates_late",
    "updates_lost": "updates_lost",
    "updates_offline": "updates_offline",
    "updates_rejected": "updates_rejected",
    "retransmissions": "retransmissions",
    "staleness_mean": "staleness_mean",
    "concurrency": "concurrency",
    "bytes_up": "bytes_up",
    "bytes_down": "bytes_down",
    "virtual_time_s": "virtual_time_s",
    "updates_per_s": "throughput/updates_per_s",
    "train_wall_s": "throughput/train_wall_s",
    "actor_busy_max_s": "throughput/actor_busy_max_s",
    "actor_busy_mean_s": "throughput/actor_busy_mean_s",
    "cumulative_bytes_up": "communication/cumulative_bytes_up",
    "cumulative_bytes_down": "communication/cumulative_bytes_down",
    "uplink_compression": "communication/uplink_compression",
    "downlink_compression": "communication/downlink_compression",
    "epsilon": "privacy/epsilon",
    "dp_clip_norm": "privacy/clip_norm",
    "participation_fairness": "selection/participation_fairness",
    "drift_alarms": "drift/alarms",
    "personal_accuracy_mean": "personal/accuracy_mean",
    "personal_accuracy_std": "personal/accuracy_std",
    "personal_accuracy_p10": "personal/accuracy_p10",
}
TB_BY_VIRTUAL_TIME = {"accuracy": "by_virtual_time_ms/accuracy", "loss": "by_virtual_time_ms/loss"}
TB_BY_BYTES = {"accuracy": "by_bytes_up/accuracy"}  # step: cumulative uplink bytes


class RunRecorder:
    """Collects a run's rows and writes them to the run directory."""

    def __init__(self, run_dir: Path, tensorboard: bool, extra_columns: tuple[str, ...] = ()) -> None:
        self.run_dir = Path(run_dir)
        # float64 columns beyond METRICS_SCHEMA (per-architecture figures); "a.b" is plotted as round/a/b
        self.schema = pa.schema(list(METRICS_SCHEMA) + [(name, pa.float64()) for name in extra_columns])
        self.extra_tags = {name: name.replace(".", "/", 1) for name in extra_columns}
        self.metrics: list[dict[str, Any]] = []
        self.events: list[pa.RecordBatch] = []
        self.actors: list[pa.RecordBatch] = []
        self.tb = _Board(self.run_dir / "tb") if tensorboard else None

    def record_round(
        self, row: dict[str, Any], events: dict[str, np.ndarray], staleness: np.ndarray | None = None,
        actors: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Add one round's (or async step's) row and task events; ``staleness`` of the applied updates;
        ``actors``: the client actors' work in it (columns of :data:`ACTORS_SCHEMA` but ``round``)."""
        self.metrics.append(row)
        self.events.append(pa.RecordBatch.from_pydict(events, schema=EVENTS_SCHEMA))
        if actors is not None:
            count = len(actors["actor"])
            self.actors.append(pa.RecordBatch.from_pydict(
                {"round": np.full(count, row["round"], dtype=np.int64), **actors}, schema=ACTORS_SCHEMA))
        if self.tb is not None:
            self._board(row, staleness=staleness)

    def resume(self, last_round: int) -> None:
        """Take back the rows written up to ``last_round`` (a resumed run), dropping any later ones, and
        rebuild TensorBoard's files from them so no step appears twice."""
        def kept(name: str, schema: pa.Schema) -> pa.Table:
            path = self.run_dir / name
            table = pq.read_table(path) if path.exists() else schema.empty_table()
            return table.filter(pa.compute.less_equal(table["round"], last_round)).cast(schema)

        self.metrics = kept("metrics.parquet", self.schema).to_pylist()
        self.events = kept("events.parquet", EVENTS_SCHEMA).to_batches()
        self.actors = kept("actors.parquet", ACTORS_SCHEMA).to_batches()
        if self.tb is not None:
            self.tb.close()
            shutil.rmtree(self.run_dir / "tb", ignore_errors=True)
            self.tb = _Board(self.run_dir / "tb")
            for row in self.metrics:
                self._board(row)

    def amend_last(self, **values: Any) -> None:
        """Fill in columns of the last row (e.g. the final evaluation of a run that stopped early), TensorBoard too."""
        row = self.metrics[-1]
        row.update(values)
        if self.tb is not None:
            self._board(row, only=set(values))

    def _board(self, row: dict[str, Any], staleness: np.ndarray | None = None, only: set[str] | None = None) -> None:
        """Write the row's TensorBoard values (just the columns in ``only``, if given)."""
        def pick(tags: dict[str, str], prefix: str = "") -> dict[str, str]:
            return {column: prefix + tag for column, tag in tags.items() if only is None or column in only}

        by_round = self.tb.scalars(row, pick({**TB_BY_ROUND, **self.extra_tags}, "round/"))
        if staleness is not None and len(staleness):
            by_round.append(self.tb.integer_histogram("round/staleness", staleness))
        self.tb.write(int(row["round"]), by_round)
        self.tb.write(int(round(row["virtual_time_s"] * 1000)), self.tb.scalars(row, pick(TB_BY_VIRTUAL_TIME)))
        self.tb.write(int(row["cumulative_bytes_up"]), self.tb.scalars(row, pick(TB_BY_BYTES)))

    def metrics_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.metrics, schema=self.schema)

    def events_table(self) -> pa.Table:
        return pa.Table.from_batches(self.events, schema=EVENTS_SCHEMA)

    def write(self) -> None:
        """Write metrics.parquet and events.parquet as they stand (atomically)."""
        write_parquet(self.metrics_table(), self.run_dir / "metrics.parquet")
        write_parquet(self.events_table(), self.run_dir / "events.parquet")
        write_parquet(pa.Table.from_batches(self.actors, schema=ACTORS_SCHEMA), self.run_dir / "actors.parquet")
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        """Close TensorBoard's file; the Parquet files are as the last :meth:`write` left them."""
        if self.tb is not None:
            self.tb.close()


class _Board:
    """A TensorBoard event file with one event per step holding all that step's values.

    Written with TensorBoard's own event writer: a step's dozen scalars cost
    one event instead of one each, and integer histograms are binned with
    ``bincount``, which matters at hundreds of asynchronous steps a second.
    """

    def __init__(self, log_dir: Path) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(str(log_dir), flush_secs=10)

    @staticmethod
    def scalars(row: dict[str, Any], tags: dict[str, str]) -> list:
        """Summary values for the row's columns in ``tags`` (column → tag), skipping missing and NaN ones."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        return [Summary.Value(tag=tag, simple_value=float(row[column])) for column, tag in tags.items()
                if row[column] is not None and not math.isnan(row[column])]

    @staticmethod
    def integer_histogram(tag: str, values: np.ndarray) -> Any:
        """A histogram of non-negative integers, one bucket per value: bucket k counts (k − ½, k + ½]."""
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

        values = np.asarray(values, dtype=np.int64)
        counts = np.bincount(values)
        histogram = HistogramProto(min=float(values.min()), max=float(values.max()), num=float(len(values)),
                                   sum=float(values.sum()), sum_squares=float((values**2).sum()),
                                   bucket_limit=(np.arange(len(counts)) + 0.5).tolist(), bucket=counts.tolist())
        return Summary.Value(tag=tag, histo=histogram)

    def write(self, step: int, values: list) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        if values:
            self.writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def summarize(metrics: pa.Table, target_accuracy: float | None = None) -> dict[str, Any]:
    """Headline figures of a run from its metrics table, with time- and bytes-to-target if a target is set."""
    columns = metrics.to_pydict()
    rounds = len(columns["round"])
    if rounds == 0:
        return {"rounds": 0}
    evaluated = [(r, a, l) for r, a, l in zip(columns["round"], columns["accuracy"], columns["loss"]) if a is not None and not math.isnan(a)]
    applied = sum(columns["updates_applied"])
    wall = columns["wall_time_s"][-1]
    summary: dict[str, Any] = {
        "rounds": rounds,
        "virtual_time_s": columns["virtual_time_s"][-1],
        "wall_time_s": wall,
        "updates_applied": applied,
        "updates_dropped": sum(columns["updates_dropped"]),
        "updates_late": sum(columns["updates_late"]),
        "updates_lost": sum(columns["updates_lost"]),
        "updates_offline": sum(columns["updates_offline"]),
        "updates_rejected": sum(columns["updates_rejected"]),
        "rounds_skipped": sum(status == "skipped" for status in columns["status"]),
        "trainings_skipped": sum(columns["trainings_skipped"]),
        "compute_saved_s": sum(columns["compute_saved_s"]),
        "bytes_up": columns["cumulative_bytes_up"][-1],
        "bytes_down": columns["cumulative_bytes_down"][-1],
        "updates_per_s": applied / wall if wall > 0 else None,
    }
    if evaluated:
        summary["first_accuracy"] = evaluated[0][1]
        summary["final_accuracy"] = evaluated[-1][1]
        summary["final_loss"] = evaluated[-1][2]
        best = max(evaluated, key=lambda item: item[1])
        summary["best_accuracy"] = best[1]
        summary["best_accuracy_round"] = best[0]
    if target_accuracy is not None:
        summary["target_accuracy"] = target_accuracy
        summary.update(round_to_target=None, time_to_target_s=None, bytes_to_target=None, bytes_up_to_target=None)
        for i, accuracy in enumerate(columns["accuracy"]):
            if accuracy is not None and accuracy >= target_accuracy:
                summary.update(
                    round_to_target=columns["round"][i],
                    time_to_target_s=columns["virtual_time_s"][i],
                    bytes_to_target=columns["cumulative_bytes_up"][i] + columns["cumulative_bytes_down"][i],
                    bytes_up_to_target=columns["cumulative_bytes_up"][i],
                )
                break
    return summary
