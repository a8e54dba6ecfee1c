"""Coordinator: a Ray actor owning the global model, the virtual clock and the outputs.

Synchronous rounds sample a cohort among the sensors online at the round's
start, plan every task on the virtual clock before any training, apply the
straggler policy, and train only the updates that will be accepted.
Asynchronous runs (FedBuff, FedAsync) keep ``concurrency`` sensors in flight
and apply arrivals in virtual-time order; their schedule is simulated one
server step ahead of the model, so every task that trains from a model version
goes to the client actors in one batch as soon as that version exists. Either
way each client actor gets one call per training batch, with each needed model
version ``ray.put`` once, and results are assembled in an order that does not
depend on which actor hosts which sensor.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import os
import pickle
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from torch.func import functional_call

from raysim.availability import Availability
from raysim.clock import APPLIED, LATE, LOST, OFFLINE, TaskPlan, TaskTiming, plan_task, plan_tasks, stack_timings
from raysim.compression import CODECS
from raysim.errors import AggregationError
from raysim.fleet import FleetData, load_proxy, load_validation, preprocess, store
from raysim.contribution import CONTRIBUTIONS_SCHEMA, ContributionScorer, contribution_summary
from raysim.metrics import RunRecorder, peak_rss_mb, process_memory, reset_peak_rss, summarize, write_parquet
from raysim.architectures import Group, build_architectures, describe, logits_bytes, work_factor
from raysim.privacy import CentralDP, RunAccountant
from raysim.scenario import Scenario
from raysim.selection import Selector, expected_durations
from raysim.drift import DRIFT_SCHEMA, DriftDetector
from raysim.streams import ATTACK, COHORT, CONTRIBUTION, DISPATCH, PRIVACY, stream
from raysim.attacks import attack_updates, choose_attackers
from raysim.strategies import STRATEGIES, FedAvg, ServerContext, UpdateBatch
from raysim.strategies.robust import AGGREGATORS, norm_clip
from raysim.strategies.server_optimizers import SERVER_OPTIMIZERS
from raysim.strategies.validation import ACCEPTED, NON_FINITE, UNKNOWN_BASE, fingerprint, screen
from raysim.training import LocalTraining, evaluate

SKIPPED = "skipped"  # delivered in a round that fell short of min_completion
REJECTED = "rejected"  # trained and received, but refused by validation (events.reason says why)
TOO_FEW = "too_few_valid"  # valid, but the step had fewer valid updates than its aggregator needs


class Coordinator:
    """Drives a run; started as a Ray actor by ``cluster.start_coordinator``."""

    def __init__(
        self,
        scenario: Scenario,
        fleet: FleetData,
        availability: Availability,
        actors: list[Any],
        shards: list[np.ndarray],
        run_dir: str,
        actor_options: dict[str, Any],
    ) -> None:
        torch.set_num_threads(1)
        self.scenario = scenario
        self.fleet = fleet
        self.profiles = fleet.profiles
        self.availability = availability
        self.actors = list(actors)
        self.shards = shards
        self.actor_options = actor_options  # how a replacement client actor is started
        self.replaced: list[dict[str, Any]] = []  # client actors replaced after dying or timing out
        self.faults_done: set[int] = set()
        # Position of each sensor in the fleet → index of the client actor hosting it.
        self.owner = np.empty(len(self.profiles), dtype=np.int64)
        for index, shard in enumerate(shards):
            self.owner[shard] = index
        self.arch = build_architectures(scenario, fleet.channels, fleet.window, fleet.classes)
        self.groups = [_GroupState(scenario, group, len(self.profiles), fleet) for group in self.arch.groups]
        first = self.groups[0]
        self.model, self.layout = first.model, first.group.layout
        self.strategy, self.aggregator, self.optimizer = first.strategy, first.aggregator, first.optimizer
        self.scaffold = bool(self.strategy.client()["scaffold"])
        # Each sensor's architecture, local learning-rate factor (its tier's lr) and compute per sample
        # (its tier's model; distillation and alignment terms add work: architectures.work_factor).
        self.group_of = self.arch.group_of(self.profiles.tier)
        self.lr_scale = np.array(scenario.tier_lr_scale())[self.profiles.tier]
        uploads = np.array(logits_bytes(scenario, self.arch)[0], dtype=bool)[self.group_of]
        factor = work_factor(scenario, self.profiles.num_samples, uploads)
        # A tier with its own local epochs: the clock's compute time (n × epochs × seconds per sample) scaled to it.
        self.epochs = np.array(scenario.tier_epochs())[self.profiles.tier]
        factor = factor * self.epochs / scenario.training.local_epochs
        self.profiles = replace(self.profiles, seconds_per_sample=self.profiles.seconds_per_sample * factor)
        # SGD steps a task would take with all its epochs: early stopping charges only the share it took.
        self.planned_steps = self.epochs * LocalTraining.from_scenario(scenario.training).steps_per_epoch(
            self.profiles.num_samples)
        compression = scenario.compression
        self.codec = first.codec
        self.downlink = CODECS.build(compression.downlink, self.arch.numels) if compression.downlink.name != "none" else None
        # Bytes per transfer, by architecture: the (encoded) model's shared layers down and the encoded update
        # up, each with SCAFFOLD's float32 control variate (or its change) when the strategy uses one, and
        # with distillation the consensus logits down and the sensor's logits up.
        control_bytes = self.layout.num_bytes if self.scaffold else 0
        logits_up, logits_down = logits_bytes(scenario, self.arch)
        detection = scenario.drift.detection if scenario.drift is not None else None
        self.detector = DriftDetector(detection.alpha, fleet.channels) if detection is not None else None
        report_bytes = 4 * fleet.channels * detection.samples if detection is not None else 0  # the drift report
        raw_up, raw_down, up, down = [], [], [], []
        for g, logit_up, logit_down in zip(self.groups, logits_up, logits_down):
            shared = 4 * len(g.group.shared)
            model_bytes = (CODECS.build(compression.downlink, g.group.shared_numels).payload_bytes
                           if compression.downlink.name != "none" else shared)
            down.append(model_bytes + control_bytes + logit_down)
            up.append(g.update_bytes + control_bytes + logit_up + report_bytes)
            raw_up.append(shared + control_bytes + (4 * self.arch.logits_size if logit_up else 0))
            raw_down.append(shared + control_bytes + (4 * self.arch.logits_size if logit_down else 0))
        self.group_bytes = (up, down)  # per architecture: one update up, one model (with its consensus) down
        self.bytes_up_of = np.array(up, dtype=np.int64)[self.group_of]  # per fleet position
        self.bytes_down_of = np.array(down, dtype=np.int64)[self.group_of]
        # Raw float32 bytes per byte actually sent, each way (over the fleet's sensors).
        share = np.bincount(self.group_of, minlength=len(self.groups)).astype(np.float64)
        self.compression = {"uplink": float(share @ raw_up / (share @ up)),
                            "downlink": float(share @ raw_down / (share @ down))}
        privacy = scenario.privacy
        self.central_dp = (CentralDP(privacy, scenario.expected_cohort())
                           if privacy is not None and privacy.mode == "central" else None)
        self.accountant = RunAccountant(privacy, len(self.profiles)) if privacy is not None else None
        self.stopped_for_budget: int | None = None  # the step the privacy budget did not allow
        self.clock_inputs = dict(seed=scenario.seed, epochs=scenario.training.local_epochs, availability=availability)
        self.scorer = (ContributionScorer(scenario.contribution, self.model, self.layout,
                                          *load_validation(scenario, fleet), len(self.profiles), scenario.seed)
                       if scenario.contribution is not None else None)
        self.selector = Selector(scenario, self.profiles, availability, expected_durations(
            self.profiles, self.bytes_down_of, self.bytes_up_of, scenario.training.local_epochs))
        self.malicious = (choose_attackers(scenario.seed, self.profiles.sensor_id, scenario.attack.fraction)
                          if scenario.attack is not None else np.zeros(len(self.profiles), dtype=bool))
        self.fingerprints: dict[int, int] = {}  # model version → fingerprint of its weights
        self.weights = self.arch.init_weights(scenario.seed, fleet.channels, fleet.window, fleet.classes)
        distill = scenario.distillation
        self.proxy_x = load_proxy(scenario, fleet) if distill is not None and distill.teacher == "global" else None
        self.test_x, self.test_y = _load_test_set(fleet, scenario)
        extra = () if len(self.groups) == 1 else tuple(f"{kind}.{g.group.name}" for g in self.groups
                                                         for kind in ("accuracy", "loss"))
        if len(scenario.fleet.tiers) > 1:
            extra += tuple(f"selected.{t.name}" for t in scenario.fleet.tiers)
        self.recorder = RunRecorder(Path(run_dir), scenario.logging.tensorboard, extra)
        self.run_dir = Path(run_dir)
        self.step_index = 0  # rounds (sync) or server steps (async) done
        self.virtual_time_s = 0.0
        self.totals = {"bytes_up": 0, "bytes_down": 0, "updates_applied": 0}
        self.wall_started = time.perf_counter()
        self.wall_before = 0.0  # wall seconds a resumed run had already run
        self.reduce = self._reduction()
        self.trainings_done: list[_Training] = []  # collected since the last recorded step: their wall times
        self.loop = SyncRounds(self) if scenario.aggregation.mode == "sync" else AsyncSteps(self)

    def reload(self, *args: Any) -> None:
        """Become a new actor for another run, in this process (see ``raysim.cluster.ACTOR_POOL``):
        every attribute dropped, the constructor run again, and the peak-memory figure started afresh."""
        self.__dict__.clear()
        reset_peak_rss()
        self.__init__(*args)

    def memory(self) -> dict[str, Any]:
        """This actor's process id and peak resident memory in MB."""
        return process_memory()

    def start_clock(self) -> None:
        """Start the wall clock of the run's throughput figures (called once every client actor is ready);
        a resumed run's clock goes on from the wall time its checkpoint recorded."""
        self.wall_started = time.perf_counter() - self.wall_before

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> int:
        """Save what a resumed run needs, atomically; returns the round saved.

        metrics.parquet and events.parquet are written first (each atomically),
        then ``checkpoints/latest.npz`` replaces the previous checkpoint in one
        rename: the global model, the virtual clock, the totals, the server's
        state (strategy, server optimizer, DP clipping bound, privacy
        accountant), every sensor's own state from the client actors and, for
        an asynchronous run, its schedule (:meth:`AsyncSteps.state`, with the
        dispatch generator). Every other random draw comes from a stream keyed
        by (seed, purpose, sensor, round), which has no state. A kill at any
        moment leaves the previous checkpoint or this one, whole.
        """
        self.recorder.write()
        if self.scorer is not None:
            write_parquet(pa.Table.from_pylist(self.scorer.rows, schema=CONTRIBUTIONS_SCHEMA),
                          self.run_dir / "contributions.parquet")
        if self.detector is not None:
            write_parquet(pa.Table.from_pylist(self.detector.rows, schema=DRIFT_SCHEMA), self.run_dir / "drift.parquet")
        loop_state = self.loop.state() if isinstance(self.loop, AsyncSteps) else None  # collects its trainings first
        clients = ray.get([actor.client_state.remote() for actor in self.actors])
        state: dict[str, Any] = {
            "weights": self.weights, "round": np.int64(self.step_index), "virtual_time_s": self.virtual_time_s,
            "wall_time_s": time.perf_counter() - self.wall_started,
            **{f"totals.{k}": np.int64(v) for k, v in self.totals.items()}, **self._server_state(),
        }
        if loop_state is not None:
            state["loop"] = np.frombuffer(loop_state, dtype=np.uint8)
        # What each model version's recipients reported training from (async updates name older versions).
        state["fingerprints"] = np.array(sorted(self.fingerprints.items()), dtype=np.int64).reshape(-1, 2)
        for kind in CLIENT_STATE:  # one flat array per kind: each sensor's vector, lengths in .sizes
            merged = {k: v for c in clients for k, v in c[kind].items()}
            ids = np.array(sorted(merged), dtype=np.int64)
            state[f"clients.{kind}.ids"] = ids
            state[f"clients.{kind}.sizes"] = np.array([len(merged[i]) for i in ids.tolist()], dtype=np.int64)
            state[f"clients.{kind}"] = (np.concatenate([merged[i] for i in ids.tolist()]).astype(np.float32)
                                        if len(ids) else np.zeros(0, np.float32))
        folder = self.run_dir / "checkpoints"
        folder.mkdir(exist_ok=True)
        tmp = folder / f".latest.{os.getpid()}.tmp"
        with open(tmp, "wb") as handle:
            np.savez(handle, **state)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, folder / "latest.npz")
        return self.step_index

    def restore(self, path: str) -> int:
        """Continue from a :meth:`checkpoint`: state, sensors' state on the client actors, and the outputs up
        to its round; returns that round."""
        with np.load(path) as saved:
            state = {key: saved[key] for key in saved.files}
        self.weights = state["weights"].astype(np.float32)
        self.step_index = int(state["round"])
        self.virtual_time_s = float(state["virtual_time_s"])
        self.wall_before = float(state["wall_time_s"])
        self.totals = {k: int(state[f"totals.{k}"]) for k in self.totals}
        parts = [("privacy.", self.central_dp), ("accountant.", self.accountant), ("selection.", self.selector),
                 ("contribution.", self.scorer), ("drift.", self.detector)]
        for g in self.groups:
            parts += [(f"{g.prefix}optimizer.", g.optimizer), (f"{g.prefix}strategy.", g.strategy)]
        for prefix, part in parts:
            if part is not None:
                part.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        clients = _client_state(state)
        ray.get([actor.load_client_state.remote(clients) for actor in self.actors])
        if "loop" in state:
            self.loop.load(state["loop"].tobytes())
        self.fingerprints = {int(v): int(p) for v, p in state["fingerprints"].tolist()}
        self.recorder.resume(self.step_index)
        if self.scorer is not None and (self.run_dir / "contributions.parquet").exists():
            rows = pq.read_table(self.run_dir / "contributions.parquet").to_pylist()
            self.scorer.rows = [r for r in rows if r["round"] <= self.step_index]
        if self.detector is not None and (self.run_dir / "drift.parquet").exists():
            rows = pq.read_table(self.run_dir / "drift.parquet").to_pylist()
            self.detector.rows = [r for r in rows if r["round"] <= self.step_index]
        return self.step_index

    def _server_state(self) -> dict[str, np.ndarray]:
        """The server's state by part: optimizer.*, strategy.*, privacy.* (central DP) and accountant.*."""
        state = {}
        for g in self.groups:  # the first architecture's without a prefix, the others' as group<i>.*
            state.update({f"{g.prefix}optimizer.{k}": v for k, v in g.optimizer.state_dict().items()})
            state.update({f"{g.prefix}strategy.{k}": v for k, v in g.strategy.state_dict().items()})
        state.update({f"selection.{k}": v for k, v in self.selector.state_dict().items()})
        if self.scorer is not None:
            state.update({f"contribution.{k}": v for k, v in self.scorer.state_dict().items()})
        if self.detector is not None:
            state.update({f"drift.{k}": v for k, v in self.detector.state_dict().items()})
        if self.central_dp is not None:
            state.update({f"privacy.{k}": v for k, v in self.central_dp.state_dict().items()})
        if self.accountant is not None:
            state.update({f"accountant.{k}": v for k, v in self.accountant.state_dict().items()})
        return state

    def step(self) -> dict[str, Any] | None:
        """One synchronous round or one asynchronous server step; returns its metrics row.

        None means the run is over: the step would have spent more privacy than
        ``privacy.target_epsilon`` allows (with ``on_budget: stop``), so it did not happen.
        """
        if self.stopped_for_budget is not None:
            return None
        row = self.loop.step()
        if row is None:
            self.stopped_for_budget = self.step_index + 1
        elif self.step_index % self.scenario.checkpoint.every == 0:
            self.checkpoint()
        return row

    def _reduction(self) -> str | None:
        """How client actors may pre-sum a synchronous round's updates: "samples" or "uniform" weighting, or None.

        Only when the round's aggregate is a plain weighted mean of the updates
        that pass the always-on checks (FedAvg or FedProx with the mean
        aggregator, no clipping, central DP, attack or anomaly filters, all of
        which need each update on the coordinator).
        """
        scenario = self.scenario
        aggregation = scenario.aggregation
        linear = (scenario.cluster.aggregate_on_actors and aggregation.mode == "sync" and self.arch.single
                  and scenario.contribution is None
                  and isinstance(self.strategy, FedAvg) and aggregation.aggregator.name == "mean"
                  and aggregation.clip_norm is None and self.central_dp is None and scenario.attack is None
                  and not aggregation.validation.filters)
        return self.strategy.config.weighting if linear else None

    # ------------------------------------------------------------------ privacy

    def privacy_allows(self, positions: np.ndarray, sample_rate: float) -> bool:
        """Whether the privacy budget lets ``positions`` release updates in the coming step."""
        return self.accountant is None or self.accountant.allows(positions, sample_rate)

    def charge_privacy(self, positions: np.ndarray, sample_rate: float, step: int) -> float:
        """Record the step's releases; ε spent so far (NaN for a run without privacy)."""
        if self.accountant is None:
            return float("nan")
        return self.accountant.charge(positions, sample_rate, step)

    # ------------------------------------------------------------------ shared by both loops

    def train(
        self, positions: np.ndarray, task_keys: np.ndarray, versions: np.ndarray, weights: dict[int, np.ndarray],
        reduce: str | None = None,
    ) -> "_Training":
        """Start training tasks (sensor ``positions[i]`` from model version ``versions[i]``).

        One call per client actor hosting any of them; ``weights`` maps each
        version to its weights, ``ray.put`` once and shared by the calls. A task's learning rate follows the
        schedule at its version. The returned handle's ``result()`` waits and
        gives the results in input order; until then the coordinator is free.
        With ``reduce`` (see :meth:`_reduction`) each actor returns the weighted
        sum of its updates instead of the updates.
        """
        needed = sorted(set(versions.tolist()))
        sent = {v: self._downlink_payload(weights[v]) for v in needed}
        refs = [ray.put(sent[v]) for v in needed]
        for v in needed:
            if v not in self.fingerprints:  # of the weights the sensors get, which they report back
                received = self.downlink.decode(sent[v]) if self.downlink is not None else weights[v]
                self.fingerprints[v] = fingerprint(received)
        slot = {v: i for i, v in enumerate(needed)}
        version_slots = np.array([slot[v] for v in versions.tolist()], dtype=np.int64)
        lr = self.lr_at(versions, positions)
        shared = self.strategy.broadcast()
        options = {"control": ray.put(shared)} if shared is not None else {}
        if reduce is not None:
            options["reduce"] = reduce
        owners = self.owner[positions]
        actor_indices = np.unique(owners)
        faults = self._faults_now()
        sent_at = time.perf_counter()
        calls, rows, replays = [], [], []
        for actor_index in actor_indices:
            mine = np.flatnonzero(owners == actor_index)
            rows.append(mine)
            args = (task_keys[mine], self.profiles.sensor_id[positions[mine]], version_slots[mine], lr[mine], *refs)
            replays.append((args, options))
            injected = {"delay_s": sum(f.seconds for f in faults if f.kind == "slow_actor" and actor_index in f.actors),
                        "crash": any(f.kind == "kill_actor" and actor_index in f.actors for f in faults)}
            calls.append(self.actors[actor_index].train.remote(*args, **options,
                                                               **{k: v for k, v in injected.items() if v}))
        for fault in faults:  # an actor to kill that has no task this round dies now, found dead at its next call
            if fault.kind == "kill_actor":
                for index in set(fault.actors) - set(actor_indices.tolist()):
                    if index < len(self.actors):
                        ray.kill(self.actors[index], no_restart=True)
        return _Training(calls, rows, len(positions), self._decoder(positions), actor_indices, self.trainings_done,
                         replays=replays, recover=self._replace_actor,
                         timeout_s=self.scenario.cluster.call_timeout_s, sent_at=sent_at)

    def _faults_now(self) -> list[Any]:
        """The scenario's faults due in the step under way, each taken once."""
        step, now = self.step_index + 1, self.virtual_time_s
        due = [(i, f) for i, f in enumerate(self.scenario.faults) if i not in self.faults_done
               and (f.round == step if f.round is not None else now >= f.at_s)]
        self.faults_done.update(i for i, _ in due)
        return [f for _, f in due]

    def _replace_actor(self, index: int, reason: str) -> Any:
        """A new client actor for actor ``index``'s sensors, in place of one that died or did not answer.

        The replacement loads the same shard and is given the sensors' own
        state from the last checkpoint, if there is one (stateless client
        algorithms lose nothing; SCAFFOLD controls and error-feedback
        residuals since that checkpoint are lost with the actor).
        """
        from raysim.client import ClientActor
        from raysim.cluster import _remote

        with contextlib.suppress(Exception):
            ray.kill(self.actors[index], no_restart=True)
        ids = self.profiles.sensor_id[self.shards[index]]
        handle = _remote(ClientActor).options(**self.actor_options).remote(self.scenario, self.fleet, ids)
        latest = self.run_dir / "checkpoints" / "latest.npz"
        if latest.is_file():
            with np.load(latest) as saved:
                handle.load_client_state.remote(_client_state(saved))
        self.actors[index] = handle
        self.replaced.append({"step": self.step_index + 1, "actor": int(index), "reason": reason})
        return handle

    def _decoder(self, positions: np.ndarray) -> Any:
        """How the coordinator decodes row k's uplink payload (None without a codec): the row's architecture's
        codec, its shared layers placed in the coordinator's layout when the run has more than one."""
        if self.codec is None:
            return None
        if self.arch.single:
            return lambda payload, row: self.codec.decode(payload)
        groups = self.group_of[positions]

        def decode(payload: bytes, row: int) -> np.ndarray:
            g = self.groups[groups[row]]
            full = np.zeros(self.arch.model_size, dtype=np.float32)
            full[g.group.columns] = g.codec.decode(payload)
            return full

        return decode

    def _downlink_payload(self, weights: np.ndarray) -> np.ndarray | bytes:
        """What goes down to the sensors: the weights, or their encoding (downlink codecs draw nothing)."""
        return self.downlink.encode(weights, np.random.default_rng(0)) if self.downlink is not None else weights

    def lr_at(self, versions: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Local learning rate of sensors ``positions`` training from these model versions (version v is
        round v + 1's): the schedule's rate, scaled by the sensor's tier's own ``lr``."""
        training = self.scenario.training
        rates = {v: training.lr_schedule.at(training.lr, v + 1, training.rounds) for v in set(versions.tolist())}
        return np.array([rates[v] for v in versions.tolist()], dtype=np.float64) * self.lr_scale[positions]

    def aggregate(self, positions: np.ndarray, trained: dict[str, np.ndarray], *, step_key: int,
                  base_versions: np.ndarray, staleness: np.ndarray, base_weights: np.ndarray | None = None) -> np.ndarray:
        """Attack, validate and aggregate one step's trained updates, then apply the server optimizer.

        Returns each row's rejection reason ("" for the updates aggregated). A
        step with fewer valid updates than the aggregator needs leaves the model
        unchanged and marks them ``too_few_valid``.
        """
        if "sums" in trained:
            return self._aggregate_sums(trained, base_versions)
        if self.arch.single:
            reasons = self._aggregate_group(self.groups[0], None, positions, trained, step_key, base_versions,
                                            staleness, base_weights)
        else:  # each architecture's model from its own sensors' updates; never changed in place (async keeps versions)
            self.weights = self.weights.copy()
            reasons = np.empty(len(positions), dtype=object)
            groups = self.group_of[positions]
            asynchronous = self.scenario.aggregation.mode == "async"
            for g in self.groups:
                rows = np.flatnonzero(groups == g.group.index)
                if len(rows):
                    # Async: FedBuff's step is a 1/K sum over the whole buffer, so an architecture moves by its
                    # own updates' mean times its share of the buffer (a slow architecture's few, stale updates
                    # do not make a full step every server step). Sync: each architecture's own FedAvg.
                    share = len(rows) / len(positions) if asynchronous else 1.0
                    reasons[rows] = self._aggregate_group(g, rows, positions, trained, step_key, base_versions,
                                                          staleness, base_weights, share)
            # The consensus the next step distills toward (none during the warm-up: each architecture alone).
            if self.arch.logits_size and self.step_index + 1 >= self.scenario.distillation.warmup:
                if "logits" in trained:  # teacher local: the accepted sensors' own logits
                    accepted = reasons == ACCEPTED
                    self._update_consensus(trained["logits"][accepted], groups[accepted])
                else:  # teacher global: the architectures' new global models
                    self._update_consensus(self._global_logits(), np.arange(len(self.groups)))
        return reasons.astype(str)

    def _aggregate_group(self, g: "_GroupState", rows: np.ndarray | None, positions: np.ndarray,
                         trained: dict[str, np.ndarray], step_key: int, base_versions: np.ndarray,
                         staleness: np.ndarray, base_weights: np.ndarray | None, share: float = 1.0) -> np.ndarray:
        """:meth:`aggregate` for one architecture: its ``rows`` of the step (None = all) and its shared
        columns of the global vector (all of it when the run has one architecture and no personal layers);
        its pseudo-gradient is scaled by ``share``."""
        scenario = self.scenario
        single = rows is None
        take = (lambda a: a) if single else (lambda a: a[rows])
        cols = None if single else g.group.columns
        updates = trained["updates"] if single else trained["updates"][np.ix_(rows, cols)]
        positions, base_versions = take(positions), np.asarray(take(np.asarray(base_versions)))
        attack = scenario.attack
        if attack is not None and self.malicious[positions].any():
            keys = (step_key,) if g.group.index == 0 else (step_key, g.group.index)
            updates = attack_updates(attack, updates, self.malicious[positions], stream(scenario.seed, ATTACK, *keys))
        expected = np.array([self.fingerprints.get(int(v), -1) for v in base_versions], dtype=np.int64)
        reasons = screen(updates, take(trained["fingerprint"]) == expected, scenario.aggregation.validation).astype(object)
        valid = reasons == ACCEPTED
        if valid.sum() < max(g.aggregator.min_updates(), 1):
            reasons[valid] = TOO_FEW
            return reasons
        bases = None
        if base_weights is not None:
            bases = take(base_weights) if single else base_weights[np.ix_(rows, cols)]
        batch = UpdateBatch(
            updates[valid],
            take(trained["num_samples"])[valid],
            staleness=np.asarray(take(np.asarray(staleness)))[valid],
            steps=take(trained["steps"])[valid],
            lr=self.lr_at(base_versions, positions)[valid],
            base_weights=bases[valid] if bases is not None else None,
            controls=take(trained["controls"])[valid] if "controls" in trained else None,
        )
        combine = g.combine if self.central_dp is None else self._private_combine(step_key)
        current = self.weights if single else self.weights[cols]
        if self.scorer is not None:
            combine = self._scored(combine, current, batch, positions[valid], step_key)
        step = g.strategy.pseudo_gradient(current, batch, combine)
        if share != 1.0:
            step = step * share
        if single:
            self.weights = g.optimizer.apply(current, step)
        else:
            self.weights[cols] = g.optimizer.apply(current, step)
        return reasons

    def _scored(self, combine: Any, current: np.ndarray, batch: UpdateBatch, positions: np.ndarray, step_key: int):
        """Score the round's valid updates (every ``contribution.every`` rounds) and, with trust, return a
        combine whose weights are multiplied by each sensor's trust (plain weights if every trust is 0)."""
        scorer = self.scorer
        if step_key % scorer.config.every == 0:
            weighting = getattr(self.strategy, "weights", None)
            a = weighting(batch) if weighting is not None else batch.num_samples
            scores, method = scorer.score(current, batch.deltas, a, stream(self.scenario.seed, CONTRIBUTION, step_key))
            scorer.record(step_key, positions, self.profiles.sensor_id[positions], scores, method)
        if not scorer.config.trust:
            return combine
        trust = scorer.trust[positions]

        def trusted(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
            scaled = weights * trust
            return combine(updates, scaled if scaled.sum() > 0 else weights)

        return trusted

    @torch.no_grad()
    def _global_logits(self) -> np.ndarray:
        """Every architecture's global model's logits on the proxy set, (G, P·K)."""
        proxy = torch.from_numpy(self.proxy_x)
        return np.stack([functional_call(g.model, g.group.layout.split(torch.from_numpy(self.weights[g.group.span])),
                                         (proxy,)).reshape(-1).numpy() for g in self.groups])

    def _update_consensus(self, logits: np.ndarray, sources: np.ndarray) -> None:
        """Each architecture's consensus for the next step: the mean of the rows of ``logits`` (P·K each) that
        come from the architectures it learns from (``sources``: each row's architecture). An architecture
        whose teachers sent nothing this step keeps its previous consensus."""
        for g, teachers in enumerate(self.arch.sources):
            rows = np.isin(sources, teachers)
            if rows.any():
                self.weights[self.arch.consensus(g)] = logits[rows].mean(axis=0, dtype=np.float64).astype(np.float32)
                self.weights[self.arch.flag(g)] = 1.0

    def _aggregate_sums(self, trained: dict[str, Any], base_versions: np.ndarray) -> np.ndarray:
        """:meth:`aggregate` for a round the client actors summed (:meth:`_reduction`): the same checks and
        the same weighted mean, from each actor's Σ w_i·u_i and Σ w_i over its finite updates."""
        expected = np.array([self.fingerprints.get(int(v), -1) for v in base_versions], dtype=np.int64)
        known = trained["fingerprint"] == expected
        finite = trained["finite"]
        reasons = np.full(len(finite), ACCEPTED, dtype=object)
        reasons[~finite] = NON_FINITE
        reasons[finite & ~known] = UNKNOWN_BASE
        valid = reasons == ACCEPTED
        if valid.sum() < max(self.aggregator.min_updates(), 1):
            reasons[valid] = TOO_FEW
            return reasons.astype(str)
        total, weight = np.zeros(self.layout.size), 0.0
        for rows, part_sum, part_weight in zip(trained["part_rows"], trained["sums"], trained["sum_weights"]):
            if known[rows].all():  # one call trains from one model: its base is known for all its rows or none
                total += part_sum
                weight += part_weight
        if not weight > 0:
            raise AggregationError("the accepted updates have no weight to average with")
        mean = (total / weight).astype(np.float32)
        self.weights = self.optimizer.apply(self.weights, self.strategy.from_mean(mean))
        return reasons.astype(str)

    def _private_combine(self, step_key: int):
        """Central DP-FedAvg's combine for one step: uniform weights, clip, sum, noise, ÷ m (weights ignored)."""
        rng = stream(self.scenario.seed, PRIVACY, step_key)
        return lambda updates, weights: self.central_dp.aggregate(updates, rng)

    def charge_steps_taken(self, plan: TaskPlan, rows: np.ndarray, positions: np.ndarray, steps: np.ndarray) -> TaskPlan:
        """The plan with each trained task's compute time cut to the share of its planned steps it took (early
        stopping), and its upload and arrival moved earlier by as much. Drops and straggler decisions were made
        on the full planned time, an upper bound."""
        planned = np.maximum(self.planned_steps[positions], 1)
        compute = plan.compute_s.copy()
        saved = compute[rows] * (1.0 - np.minimum(steps / planned, 1.0))
        compute[rows] -= saved
        arrived = plan.arrived_at.copy()
        arrived[rows] -= saved
        return replace(plan, compute_s=compute, arrived_at=arrived)

    def plan(self, positions: np.ndarray, task_keys: np.ndarray | int, dispatched_at: float) -> TaskPlan:
        return plan_tasks(self.profiles.take(positions), task_keys=task_keys, dispatched_at=dispatched_at,
                          positions=positions, bytes_down=self.bytes_down_of[positions],
                          bytes_up=self.bytes_up_of[positions], **self.clock_inputs)

    def plan_one(self, position: int, task_key: int, dispatched_at: float) -> TaskTiming:
        return plan_task(self.profiles, position, task_key=task_key, dispatched_at=dispatched_at,
                         bytes_down=int(self.bytes_down_of[position]), bytes_up=int(self.bytes_up_of[position]),
                         **self.clock_inputs)

    def record(self, row: dict[str, Any], events: dict[str, np.ndarray], staleness: np.ndarray | None = None) -> dict:
        """Evaluate if due, complete the step's metrics row, and hand both to the recorder."""
        self.step_index = row["round"]
        scenario = self.scenario
        if self.step_index % scenario.logging.eval_every == 0 or self.step_index == scenario.training.rounds:
            row.update(self._evaluate())
        self.totals["bytes_up"] += row["bytes_up"]
        self.totals["bytes_down"] += row["bytes_down"]
        self.totals["updates_applied"] += row["updates_applied"]
        wall = time.perf_counter() - self.wall_started
        row.update(
            virtual_time_s=self.virtual_time_s,
            wall_time_s=wall,
            cumulative_bytes_up=self.totals["bytes_up"],
            cumulative_bytes_down=self.totals["bytes_down"],
            uplink_compression=self.compression["uplink"],
            downlink_compression=self.compression["downlink"],
            dp_clip_norm=self.central_dp.clip_norm if self.central_dp is not None else float("nan"),
            updates_per_s=self.totals["updates_applied"] / wall if wall > 0 else 0.0,
        )
        for column in self.recorder.schema.names:  # not evaluated this step
            row.setdefault(column, float("nan"))
        actors = self._actor_work(row)
        self.recorder.record_round(row, events, staleness, actors)
        return row

    def _evaluate(self) -> dict[str, float]:
        """The evaluation columns of a metrics row.

        ``accuracy`` and ``loss`` are the global model's on the shared test
        set; with several architectures, each one's global model is evaluated
        (``accuracy.<architecture>``, ``loss.<architecture>``) and the headline
        figures are their mean weighted by each architecture's share of the
        fleet. With personalization, every sensor that has trained is
        evaluated on its own held-out samples with its own model (the global
        shared layers and its personal layers): mean, spread and 10th percentile.
        """
        out: dict[str, float] = {}
        figures = []
        for g in self.groups:
            accuracy, loss = evaluate(g.model, g.group.layout, self.weights[g.group.span], self.test_x, self.test_y)
            figures.append((accuracy, loss, float((self.group_of == g.group.index).mean())))
            if len(self.groups) > 1:
                out[f"accuracy.{g.group.name}"], out[f"loss.{g.group.name}"] = float(accuracy), float(loss)
        out["accuracy"] = float(sum(a * w for a, _, w in figures))
        out["loss"] = float(sum(l * w for _, l, w in figures))
        if self.scenario.personalization is not None:
            ref = ray.put(self._downlink_payload(self.weights))
            parts = ray.get([actor.evaluate_personal.remote(ref) for actor in self.actors])
            correct = np.concatenate([p["correct"] for p in parts])
            count = np.concatenate([p["count"] for p in parts])
            accuracy = correct / np.maximum(count, 1)
            if len(accuracy):
                out.update(personal_accuracy_mean=float(accuracy.mean()), personal_accuracy_std=float(accuracy.std()),
                           personal_accuracy_p10=float(np.percentile(accuracy, 10)))
            out["personal_sensors"] = float(len(accuracy))
        return out

    def _actor_work(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        """Wall-clock figures of the training collected since the last step: the row's ``train_wall_s``
        (first call sent to last result in) and the actors' mean and largest busy time, and one
        ``actors.parquet`` row per actor that trained."""
        done, self.trainings_done = self.trainings_done, []
        busy = np.zeros(len(self.actors))
        sensors = np.zeros(len(self.actors), dtype=np.int64)
        for training in done:
            np.add.at(busy, training.actor_indices, training.busy_s)
            np.add.at(sensors, training.actor_indices, [len(r) for r in training.rows])
        row.update(
            train_wall_s=max(t.done_at for t in done) - min(t.sent_at for t in done) if done else 0.0,
            actor_busy_mean_s=float(busy.mean()) if len(busy) else 0.0,
            actor_busy_max_s=float(busy.max()) if len(busy) else 0.0,
        )
        worked = np.flatnonzero(sensors)
        return {"actor": worked, "sensors": sensors[worked], "busy_s": busy[worked]}

    def event_rows(self, positions: np.ndarray, plan: TaskPlan, outcome: np.ndarray, *, round_index: int,
                   base_version: np.ndarray, staleness: np.ndarray, trained: dict | None,
                   trained_mask: np.ndarray, reason: np.ndarray | None = None) -> dict[str, np.ndarray]:
        count = len(positions)
        members = self.profiles.take(positions)
        train_loss = np.full(count, np.nan)
        steps = np.zeros(count, dtype=np.int64)
        if trained is not None:
            train_loss[trained_mask] = trained["train_loss"]
            steps[trained_mask] = trained["steps"]
        return {
            "sensor": members.sensor_id,
            "round": np.full(count, round_index, dtype=np.int64),
            "base_version": base_version.astype(np.int64),
            "tier": np.asarray(members.tier_names)[members.tier],
            "dispatched_at": plan.dispatched_at,
            "download_s": plan.download_s,
            "compute_s": plan.compute_s,
            "upload_s": plan.upload_s,
            "arrived_at": plan.arrived_at,
            "outcome": outcome,
            "reason": reason if reason is not None else np.full(count, "", dtype=object),
            "staleness": staleness.astype(np.int64),
            "retransmissions": plan.retransmissions,
            "num_samples": members.num_samples,
            "local_steps": steps,
            "train_loss": train_loss,
            "bytes_up": plan.up_attempts * self.bytes_up_of[positions],
            "bytes_down": plan.down_attempts * self.bytes_down_of[positions],
        }

    def finish(self) -> dict[str, Any]:
        """Write the outputs and return the summary and the final global weights.

        A run that ended early (the privacy budget) evaluates its final model
        here if its last step was not an evaluation step.
        """
        last = self.recorder.metrics[-1] if self.recorder.metrics else None
        if last is not None and math.isnan(last["accuracy"]):
            self.recorder.amend_last(**self._evaluate())
        self.checkpoint()  # writes the outputs too; resuming a finished run then has nothing left to do
        self.recorder.close()
        checkpoints = self.run_dir / "checkpoints"
        checkpoints.mkdir(exist_ok=True)
        np.savez(checkpoints / "final.npz", weights=self.weights, round=self.step_index,
                 virtual_time_s=self.virtual_time_s, **self._server_state())
        summary = summarize(self.recorder.metrics_table(), self.scenario.logging.target_accuracy)
        # Raw float32 bytes per byte sent (SCAFFOLD's control travels raw).
        summary["aggregated_on_actors"] = self.reduce is not None
        final = self.recorder.metrics[-1] if self.recorder.metrics else {}
        summary["architectures"] = [{**d, "final_accuracy": final.get(f"accuracy.{d['name']}", final.get("accuracy")),
                                     "bytes_up_per_update": int(g_up), "bytes_down_per_task": int(g_down)}
                                    for d, g_up, g_down in zip(describe(self.arch.groups), *self.group_bytes)]
        if self.scorer is not None:
            summary["contribution"] = contribution_summary(self.scorer.rows, self.scenario.contribution)
        if self.scenario.personalization is not None:
            summary["personalization"] = {k: final.get(f"personal_{k}") for k in
                                          ("accuracy_mean", "accuracy_std", "accuracy_p10", "sensors")}
        summary["actors_replaced"] = self.replaced
        summary["uplink_compression"] = self.compression["uplink"]
        summary["downlink_compression"] = self.compression["downlink"]
        if self.accountant is not None:
            summary["privacy"] = self._privacy_summary()
        actors = ray.get([actor.memory.remote() for actor in self.actors])
        summary["memory"] = {"coordinator_peak_mb": peak_rss_mb(),
                             "client_actors_peak_mb": [a["peak_mb"] for a in actors]}
        replaced = sorted({r["actor"] for r in self.replaced})
        return {"summary": summary, "weights": self.weights, "replacements": {i: self.actors[i] for i in replaced}}

    def _privacy_summary(self) -> dict[str, Any]:
        config = self.scenario.privacy
        return {
            "mode": config.mode,
            "epsilon": self.accountant.spent,
            "delta": config.delta,
            "noise_multiplier": config.noise_multiplier,
            "update_noise_multiplier": (self.central_dp.update_noise_multiplier if self.central_dp is not None
                                        else config.noise_multiplier),
            "clip_norm": self.central_dp.clip_norm if self.central_dp is not None else config.clip_norm,
            "adaptive_clipping": config.adaptive is not None,
            "target_epsilon": config.target_epsilon,
            "on_budget": config.on_budget,
            "stopped_before_round": self.stopped_for_budget,  # on_budget stop: the round that would have exceeded it
            "exceeded_at_round": self.accountant.over_budget_at,  # on_budget warn: the first round past it
        }


class _GroupState:
    """The server side of one architecture: its model (for evaluation), strategy, aggregator, server
    optimizer and uplink codec, all sized to its shared layers."""

    def __init__(self, scenario: Scenario, group: Group, fleet_size: int, fleet: FleetData) -> None:
        aggregation = scenario.aggregation
        self.group = group
        self.prefix = "" if group.index == 0 else f"group{group.index}."  # of its state in checkpoints
        self.model = group.build(fleet.channels, fleet.window, fleet.classes)
        context = ServerContext(fleet_size=fleet_size, dim=len(group.shared), momentum=scenario.training.momentum)
        self.strategy = STRATEGIES.build(aggregation.strategy, context)
        self.aggregator = AGGREGATORS.build(aggregation.aggregator)
        self.optimizer = SERVER_OPTIMIZERS.build(aggregation.server_optimizer)
        uplink = scenario.compression.uplink
        self.codec = CODECS.build(uplink, group.shared_numels) if uplink.name != "none" else None
        self.update_bytes = self.codec.payload_bytes if self.codec is not None else 4 * len(group.shared)
        self.clip = aggregation.clip_norm

    def combine(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self.aggregator.aggregate(norm_clip(updates, self.clip) if self.clip is not None else updates, weights)


CLIENT_STATE = ("controls", "residuals", "personal", "previous", "trained")  # kinds of ClientActor.client_state


def _client_state(saved: Any) -> dict[str, dict[int, np.ndarray]]:
    """The sensors' own state in a checkpoint, as ``ClientActor.load_client_state`` takes it."""
    state = {}
    for kind in CLIENT_STATE:
        sizes = saved[f"clients.{kind}.sizes"]
        parts = np.split(saved[f"clients.{kind}"], np.cumsum(sizes)[:-1]) if len(sizes) else []
        state[kind] = dict(zip(saved[f"clients.{kind}.ids"].tolist(), parts))
    return state


class _Training:
    """Training calls in progress on the client actors; ``result()`` collects them once."""

    def __init__(self, calls: list[Any], rows: list[np.ndarray], count: int, decode: Any, actor_indices: np.ndarray,
                 done: list["_Training"], *, replays: list[tuple[tuple, dict]], recover: Any, timeout_s: float,
                 sent_at: float) -> None:
        self.calls, self.rows, self.count, self.decode = calls, rows, count, decode  # decode(payload, row)
        self.replays, self.recover, self.timeout_s = replays, recover, timeout_s
        self.actor_indices = actor_indices
        self._done = done  # where a collected batch reports itself, for the step's wall-clock figures
        self.sent_at = sent_at  # just before the first call went out
        self.done_at = self.sent_at
        self.busy_s = np.zeros(len(calls))
        self._result: dict[str, Any] | None = None

    def result(self) -> dict[str, Any]:
        if self._result is None:
            parts = [self._get(i) for i in range(len(self.calls))]
            self.done_at = time.perf_counter()
            self.busy_s = np.array([p["busy_s"] for p in parts])
            self._done.append(self)
            order = np.empty(self.count, dtype=np.int64)
            order[np.concatenate(self.rows)] = np.arange(self.count)
            merged: dict[str, Any] = {key: np.concatenate([np.atleast_1d(p[key]) for p in parts])[order]
                                      for key in ("num_samples", "train_loss", "steps")}
            for key in ("updates", "fingerprint", "controls", "finite", "logits", "summary"):
                if key in parts[0]:
                    merged[key] = np.concatenate([p[key] for p in parts])[order]
            if "sum" in parts[0]:  # each actor's weighted sum of its own updates, and the rows it covers
                merged.update(sums=[p["sum"] for p in parts], sum_weights=[p["weight"] for p in parts],
                              part_rows=self.rows)
            elif "payloads" in parts[0]:
                payloads = [payload for p in parts for payload in p["payloads"]]
                merged["updates"] = np.stack([self.decode(payloads[i], row) for row, i in enumerate(order)])
            self._result, self.calls = merged, []
        return self._result

    def _get(self, i: int) -> dict[str, Any]:
        """Call i's result. If its actor died, or did not answer within the timeout, a new actor for the
        same sensors trains the same call again: the same inputs and random streams, so the same result."""
        try:
            return ray.get(self.calls[i], timeout=self.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            reason = "timed out" if isinstance(exc, ray.exceptions.GetTimeoutError) else "died"
            actor = self.recover(int(self.actor_indices[i]), reason)
            args, options = self.replays[i]
            self.calls[i] = actor.train.remote(*args, **options)
            return ray.get(self.calls[i], timeout=self.timeout_s)


def _task_figures(events: dict[str, np.ndarray], plan: TaskPlan, trained_mask: np.ndarray) -> dict[str, Any]:
    """The metrics-row figures that sum over the tasks that ended in a round or step."""
    outcome = events["outcome"]
    wasted = plan.received_model & ~trained_mask  # got the model, never trained: the saved work
    return {
        "selected": len(outcome),
        "train_loss": _weighted_mean_or_nan(events["train_loss"], events["num_samples"]),
        "updates_applied": int((outcome == APPLIED).sum()),
        "updates_late": int((outcome == LATE).sum()),
        "updates_lost": int((outcome == LOST).sum()),
        "updates_offline": int((outcome == OFFLINE).sum()),
        "updates_rejected": int((outcome == REJECTED).sum()),
        "updates_dropped": int((outcome != APPLIED).sum()),
        "retransmissions": int(plan.retransmissions.sum()),
        "trainings_skipped": int(wasted.sum()),
        "compute_saved_s": float(plan.compute_s[wasted].sum()),
        "bytes_up": int(events["bytes_up"].sum()),
        "bytes_down": int(events["bytes_down"].sum()),
    }


# ---------------------------------------------------------------------- synchronous rounds


class SyncRounds:
    """Synchronous FL rounds with a straggler policy (wait-all, deadline, over-commit, min completion)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self.all_positions = np.arange(len(coordinator.profiles))

    def step(self) -> dict[str, Any] | None:
        c = self.c
        scenario = c.scenario
        policy = scenario.aggregation.stragglers
        round_index = c.step_index + 1
        start = c.virtual_time_s
        k = scenario.aggregation.cohort
        wanted = policy.selected(k)
        online = self.all_positions[c.availability.online_at(self.all_positions, start)]
        if len(online) == 0:
            return self._idle_round(round_index, start)
        chosen = c.selector.choose(online, wanted, start, round_index, stream(scenario.seed, COHORT, round_index))
        sample_rate = len(chosen) / len(online)  # each online sensor's chance of selection; offline ones have none
        if not c.privacy_allows(chosen, sample_rate):
            return None
        plan = c.plan(chosen, round_index, start)
        outcome = plan.outcome.astype(object)
        delivered = outcome == APPLIED
        if policy.policy == "deadline":
            outcome[delivered & (plan.duration_s > policy.deadline_s)] = LATE
        elif policy.policy == "over-commit":
            arrivals = np.flatnonzero(delivered)
            by_arrival = arrivals[np.lexsort((chosen[arrivals], plan.arrived_at[arrivals]))]
            outcome[by_arrival[k:]] = LATE
        accepted = outcome == APPLIED
        target = min(k, len(chosen)) if policy.policy == "over-commit" else len(chosen)
        skipped = accepted.sum() < math.ceil(policy.min_completion * k)
        if skipped:
            outcome[accepted] = SKIPPED
            accepted[:] = False
        # The round ends at its last accepted update if it got every update it waits for,
        # otherwise at the deadline or when the last task arrived or was given up.
        trained = None
        reason = np.full(len(chosen), "", dtype=object)
        if accepted.any():
            positions = chosen[accepted]
            version = round_index - 1
            trained = c.train(positions, np.full(len(positions), round_index), np.full(len(positions), version),
                              {version: c.weights}, reduce=c.reduce).result()
            c.selector.report(positions, trained["train_loss"], round_index)
            if c.detector is not None:
                alarms = c.detector.observe(round_index, c.profiles.sensor_id[positions], trained["summary"])
            reason[accepted] = c.aggregate(positions, trained, step_key=round_index,
                                           base_versions=np.full(len(positions), version),
                                           staleness=np.zeros(len(positions), np.int64))
            outcome[accepted & (reason != "")] = REJECTED
            if scenario.training.early_stopping is not None:
                plan = c.charge_steps_taken(plan, accepted, positions, trained["steps"])
        if accepted.sum() == target and target > 0:
            end = plan.arrived_at[accepted].max()
        elif policy.policy == "deadline":
            end = start + policy.deadline_s
        else:
            end = plan.arrived_at.max()
        c.virtual_time_s = float(end)
        outcome = outcome.astype(str)
        events = c.event_rows(chosen, plan, outcome, round_index=round_index,
                              base_version=np.full(len(chosen), round_index - 1), staleness=np.zeros(len(chosen)),
                              trained=trained, trained_mask=accepted, reason=reason)
        row = {
            "round": round_index,
            "round_duration_s": float(end - start),
            "status": "skipped" if skipped else "ok",
            **_task_figures(events, plan, accepted),
            "staleness_mean": 0.0,
            "staleness_max": 0,
            "concurrency": len(chosen),
            "epsilon": c.charge_privacy(chosen, sample_rate, round_index),
            **c.selector.figures(chosen),
        }
        if c.detector is not None:
            row["drift_alarms"] = float(alarms) if accepted.any() else 0.0
        return c.record(row, events)

    def _idle_round(self, round_index: int, start: float) -> dict[str, Any]:
        """No sensor is online: the round waits until the first one comes back."""
        c = self.c
        back = float(c.availability.next_online(self.all_positions, np.full(len(self.all_positions), start)).min())
        if not math.isfinite(back):
            raise AggregationError(f"round {round_index}: no sensor is online at virtual time {start:g} s or ever after")
        c.virtual_time_s = back
        nobody = np.zeros(0, np.int64)
        plan = c.plan(nobody, round_index, start)
        empty = c.event_rows(nobody, plan, np.zeros(0, str), round_index=round_index, base_version=nobody,
                             staleness=nobody, trained=None, trained_mask=np.zeros(0, bool))
        row = {"round": round_index, "round_duration_s": back - start, "status": "idle",
               **_task_figures(empty, plan, np.zeros(0, bool)),
               "staleness_mean": 0.0, "staleness_max": 0, "concurrency": 0,
               "epsilon": c.charge_privacy(nobody, 1.0, round_index), **c.selector.figures(nobody)}
        return c.record(row, empty)


# ---------------------------------------------------------------------- asynchronous steps


@dataclass(eq=False)  # tasks are compared by identity
class _Task:
    number: int  # global dispatch order
    position: int
    key: int  # the sensor's own task count: keys its clock and training streams
    version: int  # model version it trains from
    timing: TaskTiming
    update: np.ndarray | None = None
    num_samples: int = 0
    train_loss: float = float("nan")
    steps: int = 0
    training: "_Training | None" = None  # the batch it was sent in
    row: int = 0  # its row in that batch
    trained: bool = False
    fingerprint: int = 0  # of the weights it trained from, as its client actor reports it
    logits: np.ndarray | None = None  # with distillation: its local model's proxy-set logits
    reason: str = ""  # why validation rejected it, if it did

    def collect(self) -> None:
        """Wait for this task's training batch and take its results (once; a checkpoint may have already)."""
        if self.trained:
            return
        result = self.training.result()
        self.update = result["updates"][self.row]
        self.fingerprint = int(result["fingerprint"][self.row])
        self.num_samples = int(result["num_samples"][self.row])
        self.train_loss = float(result["train_loss"][self.row])
        self.steps = int(result["steps"][self.row])
        self.logits = result["logits"][self.row] if "logits" in result else None
        self.trained = True
        self.training = None


@dataclass
class _SimulatedStep:
    """One server step as the schedule decides it: which updates it applies, and what ended before it."""

    version: int  # the model version it produces
    time_s: float  # virtual time of the step
    buffer: list[_Task] = field(default_factory=list)  # the updates it applies
    buffer_staleness: list[int] = field(default_factory=list)
    ended: list[_Task] = field(default_factory=list)  # every task that ended since the previous step
    outcomes: list[str] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)
    in_flight: int = 0  # sensors in flight at the step


class AsyncSteps:
    """FedBuff / FedAsync: ``concurrency`` sensors in flight, arrivals applied in virtual-time order.

    A sensor never has two tasks in flight. When a task ends (delivered, lost,
    dropped offline or too stale), another idle, online sensor is dispatched
    with the current model version.

    The schedule — who is dispatched when, with which version, what arrives
    when, which updates each server step applies — depends on profiles and
    availability, never on the weights, so it is simulated one step ahead of
    the model. That fixes, before the weights of version v exist, every task
    that will train from v: they are sent to the client actors as one batch as
    soon as v is computed, and train while the coordinator simulates the next
    step. Each task is trained once, in the batch of its version, and one call
    per client actor per server step is the fewest the dependencies allow.
    """

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        config = coordinator.scenario.aggregation.strategy
        self.concurrency = config.concurrency
        self.max_staleness = config.max_staleness
        self.buffer_size = coordinator.strategy.buffer_size
        fleet_size = len(coordinator.profiles)
        self.all_positions = np.arange(fleet_size)
        # The simulated schedule.
        self.clock_s = 0.0
        self.sim_version = 0
        self.heap: list[tuple[float, int]] = []  # (arrival time, task number)
        self.tasks: dict[int, _Task] = {}  # in flight in the simulation
        self.busy = np.zeros(fleet_size, dtype=bool)
        self.in_flight = 0  # = busy.sum()
        self.task_count = np.zeros(fleet_size, dtype=np.int64)
        self.next_task = 0
        self.dispatch_rng = stream(coordinator.scenario.seed, DISPATCH)
        self.pending = _SimulatedStep(version=1, time_s=0.0)
        self.simulated: list[_SimulatedStep] = []  # simulated, not yet applied to the model
        self.unsent: dict[int, list[_Task]] = {}  # version → tasks that will train from it
        # The model.
        self.version = 0
        self.versions: dict[int, np.ndarray] = {0: coordinator.weights}
        self.last_step_time = 0.0

        self._dispatch_initial()
        self._simulate_step()
        self._send(0)

    # -- the schedule

    def _dispatch_initial(self) -> None:
        """The first wave is sampled exactly like sync round 1's cohort."""
        c = self.c
        online = self.all_positions[c.availability.online_at(self.all_positions, 0.0)]
        count = min(self.concurrency, len(online))
        rng = stream(c.scenario.seed, COHORT, 1)
        if c.scenario.aggregation.selection.policy == "availability":  # predicted to stay online first
            chosen = np.sort(c.selector.available(online, count, 0.0, rng))
        else:
            chosen = np.sort(rng.choice(online, count, replace=False))
        self._dispatch(chosen, 0.0)

    def _dispatch(self, positions: np.ndarray | list[int], now: float) -> None:
        for position in positions:
            position = int(position)
            key = int(self.task_count[position]) + 1
            self.task_count[position] = key
            task = _Task(self.next_task, position, key, self.sim_version, self.c.plan_one(position, key, now))
            self.c.selector.selected[position] += 1
            self.tasks[task.number] = task
            self.busy[position] = True
            self.in_flight += 1
            heapq.heappush(self.heap, (task.timing.arrived_at, task.number))
            if task.timing.outcome == APPLIED:
                self.unsent.setdefault(task.version, []).append(task)
            self.next_task += 1

    def _refill(self, now: float) -> None:
        """Bring the sensors in flight back up to the concurrency, choosing idle online sensors uniformly.

        The schedule is simulated in one fixed order, so a single generator
        keeps it reproducible. A few random draws almost always find enough
        idle online sensors; when most of the fleet is busy or offline, a full
        permutation settles it.
        """
        free = self.concurrency - self.in_flight
        if free <= 0:
            return
        picked: list[int] = []
        fits = self.c.selector.fits  # availability-aware selection: only sensors predicted to stay online
        for candidate in self.dispatch_rng.integers(len(self.busy), size=8 * free).tolist():
            if (not self.busy[candidate] and candidate not in picked and self.c.availability.is_online(candidate, now)
                    and fits(candidate, now)):
                picked.append(candidate)
                if len(picked) == free:
                    break
        if len(picked) < free:
            rest = self.dispatch_rng.permutation(len(self.busy))
            rest = rest[~self.busy[rest] & ~np.isin(rest, picked)]
            more = rest[self.c.availability.online_at(rest, now)] if len(rest) else rest
            if self.c.scenario.aggregation.selection.policy == "availability" and len(more):
                likely = self.c.selector.stays_online(more, now)  # predicted ones first, then the others
                more = np.concatenate([more[likely], more[~likely]])
            picked.extend(more[: free - len(picked)].tolist())
        self._dispatch(picked, now)

    def _simulate_step(self) -> None:
        """Process arrivals in virtual-time order until the buffer fills: one more server step.

        The sensor dispatched in place of the arrival that fills the buffer
        gets the model that step produces.
        """
        step = self.pending
        while True:
            if not self.heap:
                self._wait_for_sensors()
                continue
            arrival, number = heapq.heappop(self.heap)
            task = self.tasks.pop(number)
            self.clock_s = arrival
            self.busy[task.position] = False
            self.in_flight -= 1
            outcome = task.timing.outcome
            staleness = self.sim_version - task.version
            if outcome == APPLIED and staleness > self.max_staleness:
                outcome = LATE
                if task in self.unsent.get(task.version, ()):
                    self.unsent[task.version].remove(task)  # known late before it was sent: never trained
            if outcome == APPLIED:
                step.buffer.append(task)
                step.buffer_staleness.append(staleness)
            step.ended.append(task)
            step.outcomes.append(outcome)
            step.staleness.append(staleness)
            if len(step.buffer) == self.buffer_size:
                break
            self._refill(arrival)
        self.sim_version += 1
        self._refill(self.clock_s)
        step.time_s = self.clock_s
        step.in_flight = self.in_flight
        self.simulated.append(step)
        self.pending = _SimulatedStep(version=self.sim_version + 1, time_s=self.clock_s)

    def _wait_for_sensors(self) -> None:
        """Nothing in flight: jump the clock to when the first idle sensor comes online."""
        idle = self.all_positions[~self.busy]
        back = self.c.availability.next_online(idle, np.full(len(idle), self.clock_s)).min() if len(idle) else np.inf
        if not math.isfinite(back):
            raise AggregationError(f"no sensor is online at virtual time {self.clock_s:g} s or ever after")
        self.clock_s = max(float(back), np.nextafter(self.clock_s, np.inf))  # always moves forward
        self._refill(self.clock_s)

    # -- checkpoints

    def state(self) -> bytes:
        """The schedule and the model versions it still needs, pickled, once every training sent so far is in.

        Collecting first means no task is half done: each is either trained
        (its update is saved with it) or not yet sent, and the sensors' own
        state on the client actors matches the schedule saved. The dispatch
        generator is saved with its state.
        """
        for task in self._tasks():
            if task.training is not None:
                task.collect()
        return pickle.dumps({key: value for key, value in self.__dict__.items() if key != "c"})

    def load(self, blob: bytes) -> None:
        """Take the schedule of :meth:`state` (replacing the one this loop started with)."""
        self.__dict__.update(pickle.loads(blob))

    def _tasks(self) -> list[_Task]:
        """Every task the loop still holds: in flight, in simulated steps, or waiting to be sent."""
        seen: dict[int, _Task] = {}
        for step in (*self.simulated, self.pending):
            for task in (*step.buffer, *step.ended):
                seen[id(task)] = task
        for task in (*self.tasks.values(), *(t for batch in self.unsent.values() for t in batch)):
            seen[id(task)] = task
        return list(seen.values())

    # -- the model

    def _send(self, version: int) -> None:
        """Send every task that trains from ``version`` to the client actors, without waiting."""
        tasks = self.unsent.pop(version, [])
        if not tasks:
            return
        training = self.c.train(
            np.array([t.position for t in tasks], dtype=np.int64),
            np.array([t.key for t in tasks], dtype=np.int64),
            np.full(len(tasks), version, dtype=np.int64),
            {version: self.versions[version]},
        )
        for row, task in enumerate(tasks):
            task.training, task.row = training, row

    def step(self) -> dict[str, Any] | None:
        """Apply the next simulated server step to the model, and record it.

        The schedule of the step after it is simulated first, while the client
        actors train the batch this step needs.
        """
        c = self.c
        if self.version + 1 < c.scenario.training.rounds:
            self._simulate_step()
        step = self.simulated.pop(0)
        if not c.privacy_allows(np.array([t.position for t in step.ended], dtype=np.int64), 1.0):
            return None
        for task in step.buffer:
            task.collect()
        staleness = np.array(step.buffer_staleness, dtype=np.int64)
        buffer = {
            "updates": np.stack([t.update for t in step.buffer]),
            "num_samples": np.array([t.num_samples for t in step.buffer], dtype=np.float64),
            "steps": np.array([t.steps for t in step.buffer], dtype=np.int64),
            "fingerprint": np.array([t.fingerprint for t in step.buffer], dtype=np.int64),
        }
        if step.buffer[0].logits is not None:
            buffer["logits"] = np.stack([t.logits for t in step.buffer])
        reasons = c.aggregate(np.array([t.position for t in step.buffer]), buffer, step_key=step.version,
                              base_versions=np.array([t.version for t in step.buffer]), staleness=staleness,
                              base_weights=np.stack([self.versions[t.version] for t in step.buffer]))
        for task, reason in zip(step.buffer, reasons):
            task.reason = str(reason)
        staleness = staleness[reasons == ACCEPTED]
        for task in step.buffer:
            task.update = task.logits = None  # applied; free the memory
        self.version = step.version
        self.versions[self.version] = c.weights
        self._send(self.version)
        # Base versions still needed: by tasks in flight or simulated but not yet applied (FedAsync mixes from them).
        in_use = {t.version for t in self.tasks.values()}
        in_use |= {t.version for s in self.simulated for t in s.buffer} | {self.version}
        self.versions = {v: w for v, w in self.versions.items() if v in in_use}
        c.virtual_time_s = step.time_s
        return self._record(step, staleness)

    def _record(self, step: _SimulatedStep, applied_staleness: np.ndarray) -> dict[str, Any]:
        c = self.c
        for task in step.ended:
            if task.training is not None:
                task.collect()  # trained but ended late: its training is reported, not hidden
        positions = np.array([t.position for t in step.ended], dtype=np.int64)
        plan = stack_timings([t.timing for t in step.ended])
        outcome = np.array([REJECTED if t.reason else o for t, o in zip(step.ended, step.outcomes)], dtype=str)
        trained_mask = np.array([t.trained for t in step.ended], dtype=bool)
        trained = {
            "train_loss": np.array([t.train_loss for t in step.ended if t.trained]),
            "steps": np.array([t.steps for t in step.ended if t.trained], dtype=np.int64),
        }
        events = c.event_rows(positions, plan, outcome, round_index=step.version,
                              base_version=np.array([t.version for t in step.ended]),
                              staleness=np.array(step.staleness), trained=trained, trained_mask=trained_mask,
                              reason=np.array([t.reason for t in step.ended], dtype=object))
        row = {
            "round": step.version,
            "round_duration_s": step.time_s - self.last_step_time,
            "status": "ok",
            **_task_figures(events, plan, trained_mask),
            "staleness_mean": float(applied_staleness.mean()) if len(applied_staleness) else float("nan"),
            "staleness_max": int(applied_staleness.max()) if len(applied_staleness) else 0,
            "concurrency": step.in_flight,
            "epsilon": c.charge_privacy(positions, 1.0, step.version),
            **c.selector.figures(positions),
        }
        self.last_step_time = step.time_s
        return c.record(row, events, applied_staleness)


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
