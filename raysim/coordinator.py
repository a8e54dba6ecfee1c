"""Coordinator: a Ray actor owning the global model, the virtual clock and the outputs.

Each synchronous round it samples a cohort, plans every task on the virtual
clock before any training (so updates that will be lost are never computed),
dispatches one call per client actor with the global weights ``ray.put`` once,
aggregates the delivered updates in sensor-id order (so results do not depend
on how sensors are spread over actors), evaluates, and records.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from raysim.clock import APPLIED, plan_tasks
from raysim.fleet import FleetData, preprocess, store
from raysim.metrics import RunRecorder, summarize
from raysim.models import ParamLayout, build_model, init_weights
from raysim.scenario import Scenario
from raysim.streams import COHORT, stream
from raysim.strategies import STRATEGIES
from raysim.training import evaluate


class Coordinator:
    """Drives a run; started as a Ray actor by ``cluster.start_coordinator``."""

    def __init__(
        self,
        scenario: Scenario,
        fleet: FleetData,
        actors: list[Any],
        shards: list[np.ndarray],
        run_dir: str,
    ) -> None:
        torch.set_num_threads(1)
        self.scenario = scenario
        self.fleet = fleet
        self.profiles = fleet.profiles
        self.actors = actors
        # Position of each sensor in the fleet → index of the client actor hosting it.
        self.owner = np.empty(len(self.profiles), dtype=np.int64)
        for index, shard in enumerate(shards):
            self.owner[shard] = index
        self.strategy = STRATEGIES.build(scenario.aggregation.strategy)
        self.model = build_model(scenario.model, fleet.channels, fleet.window, fleet.classes)
        self.layout = ParamLayout.of(self.model)
        self.weights = init_weights(scenario.model, fleet.channels, fleet.window, fleet.classes, scenario.seed)
        self.test_x, self.test_y = _load_test_set(fleet, scenario)
        self.recorder = RunRecorder(Path(run_dir), scenario.logging.tensorboard)
        self.run_dir = Path(run_dir)
        self.round_index = 0
        self.virtual_time_s = 0.0
        self.cumulative_up = 0
        self.cumulative_down = 0
        self.updates_applied = 0
        self.wall_started = time.perf_counter()

    def step(self) -> dict[str, Any]:
        """Run one synchronous round; return its metrics row."""
        self.round_index += 1
        scenario = self.scenario
        round_index = self.round_index
        cohort = np.sort(
            stream(scenario.seed, COHORT, round_index).choice(len(self.profiles), scenario.aggregation.cohort, replace=False)
        )
        members = self.profiles.take(cohort)
        model_bytes = self.layout.num_bytes
        plan = plan_tasks(
            members,
            seed=scenario.seed,
            round_index=round_index,
            dispatched_at=self.virtual_time_s,
            bytes_down=model_bytes,
            bytes_up=model_bytes,
            epochs=scenario.training.local_epochs,
        )

        trained = self._train(round_index, cohort[plan.delivered])
        count = len(cohort)
        train_loss = np.full(count, np.nan)
        steps = np.zeros(count, dtype=np.int64)
        if trained is not None:
            where = np.flatnonzero(plan.delivered)
            train_loss[where] = trained["train_loss"]
            steps[where] = trained["steps"]
            self.weights = self.strategy.aggregate(self.weights, trained["updates"], trained["num_samples"])

        applied = int(plan.delivered.sum())
        finish = plan.arrived_at[plan.delivered] if applied else plan.arrived_at
        duration = float(finish.max() - self.virtual_time_s) if count else 0.0
        self.virtual_time_s += duration
        bytes_up = plan.up_attempts * model_bytes
        bytes_down = plan.down_attempts * model_bytes
        self.cumulative_up += int(bytes_up.sum())
        self.cumulative_down += int(bytes_down.sum())

        accuracy = loss = float("nan")
        if round_index % scenario.logging.eval_every == 0 or round_index == scenario.training.rounds:
            accuracy, loss = evaluate(self.model, self.layout, self.weights, self.test_x, self.test_y)
        wall = time.perf_counter() - self.wall_started
        self.updates_applied += applied
        row = {
            "round": round_index,
            "virtual_time_s": self.virtual_time_s,
            "round_duration_s": duration,
            "wall_time_s": wall,
            "accuracy": float(accuracy),
            "loss": float(loss),
            "train_loss": _weighted_mean_or_nan(train_loss, members.num_samples),
            "updates_applied": applied,
            "updates_dropped": count - applied,
            "bytes_up": int(bytes_up.sum()),
            "bytes_down": int(bytes_down.sum()),
            "cumulative_bytes_up": self.cumulative_up,
            "cumulative_bytes_down": self.cumulative_down,
            "updates_per_s": self.updates_applied / wall if wall > 0 else 0.0,
        }
        events = {
            "sensor": members.sensor_id,
            "round": np.full(count, round_index, dtype=np.int64),
            "tier": np.asarray(members.tier_names)[members.tier],
            "dispatched_at": plan.dispatched_at,
            "download_s": plan.download_s,
            "compute_s": plan.compute_s,
            "upload_s": plan.upload_s,
            "arrived_at": plan.arrived_at,
            "outcome": plan.outcome,
            "staleness": np.zeros(count, dtype=np.int64),
            "num_samples": members.num_samples,
            "local_steps": steps,
            "train_loss": train_loss,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
        }
        self.recorder.record_round(row, events)
        return row

    def _train(self, round_index: int, positions: np.ndarray) -> dict[str, np.ndarray] | None:
        """One call per client actor hosting any of ``positions``; results in position order."""
        if len(positions) == 0:
            return None
        weights_ref = ray.put(self.weights)
        owners = self.owner[positions]
        calls = []
        for actor_index in np.unique(owners):
            mine = positions[owners == actor_index]
            calls.append(self.actors[actor_index].train.remote(round_index, self.profiles.sensor_id[mine], weights_ref))
        parts = ray.get(calls)
        merged = {key: np.concatenate([np.atleast_1d(p[key]) for p in parts]) for key in ("sensor_id", "num_samples", "train_loss", "steps")}
        merged["updates"] = np.concatenate([p["updates"] for p in parts])
        order = np.argsort(merged["sensor_id"], kind="stable")
        return {key: value[order] for key, value in merged.items()}

    def finish(self) -> dict[str, Any]:
        """Write the outputs and return the summary and the final global weights."""
        self.recorder.close()
        checkpoints = self.run_dir / "checkpoints"
        checkpoints.mkdir(exist_ok=True)
        np.savez(
            checkpoints / "final.npz",
            weights=self.weights,
            round=self.round_index,
            virtual_time_s=self.virtual_time_s,
        )
        return {"summary": summarize(self.recorder.metrics_table()), "weights": self.weights}


def _weighted_mean_or_nan(values: np.ndarray, weights: np.ndarray) -> float:
    done = ~np.isnan(values)
    if not done.any():
        return float("nan")
    return float(np.average(values[done], weights=weights[done]))


def _load_test_set(fleet: FleetData, scenario: Scenario) -> tuple[np.ndarray, np.ndarray]:
    """The held-out set, preprocessed per test sensor exactly as sensors preprocess their own data."""
    x, y, sensor = store.read_all(fleet.test_path)
    prep = scenario.fleet.data.preprocess
    out = np.empty_like(x)
    for sid in np.unique(sensor):
        rows = sensor == sid
        out[rows] = preprocess.apply(x[rows], prep)
    return out, y
