"""ClientActor: a Ray actor hosting a shard of sensors and training them.

Each actor reads its own sensors' data from the fleet's Parquet file once, at
start, and keeps it. One remote call per round trains every sensor of the
round's cohort that it hosts, against one shared copy of the global weights.
The training itself lives in :mod:`raysim.training`.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import torch

from raysim.fleet import FleetData, preprocess, store
from raysim.metrics import process_memory, reset_peak_rss
from raysim.models import ParamLayout, build_model
from raysim.scenario import Scenario
from raysim.streams import COMPRESS, PRIVACY, TRAIN, keyed_streams, stream
from raysim.attacks import choose_attackers, flip_labels
from raysim.compression import CODECS, ErrorFeedback
from raysim.privacy import local_dp
from raysim.strategies import client_settings
from raysim.strategies.validation import fingerprint
from raysim.training import LocalTraining, scaffold_control_update, train_reference, train_vectorized


class ClientActor:
    """Hosts ``sensor_ids`` of the fleet; run as a Ray actor by ``cluster.start_client_actors``
    with the scenario's ``num_cpus`` / ``num_gpus``."""

    def __init__(self, scenario: Scenario, fleet: FleetData, sensor_ids: np.ndarray) -> None:
        threads = max(1, int(scenario.cluster.num_cpus))
        torch.set_num_threads(threads)
        self.scenario = scenario
        client = client_settings(scenario.aggregation.strategy)
        self.local = replace(LocalTraining.from_scenario(scenario.training), prox_mu=client["prox_mu"])
        self.scaffold = bool(client["scaffold"])
        self.controls: dict[int, np.ndarray] = {}  # SCAFFOLD: each hosted sensor's control variate c_i
        self.model = build_model(scenario.model, fleet.channels, fleet.window, fleet.classes)
        self.layout = ParamLayout.of(self.model)
        uplink = scenario.compression.uplink
        self.codec = CODECS.build(uplink, self.layout.numels) if uplink.name != "none" else None
        self.feedback = ErrorFeedback(self.codec, self.layout.size) if self.codec and scenario.compression.error_feedback else None
        downlink = scenario.compression.downlink
        self.downlink = CODECS.build(downlink, self.layout.numels) if downlink.name != "none" else None
        privacy = scenario.privacy
        self.local_dp = privacy if privacy is not None and privacy.mode == "local" else None
        prep = scenario.fleet.data.preprocess
        # The shard's samples, columnar (one array for all hosted sensors), preprocessed in place per sensor.
        self.shard = store.read_shard(fleet.train_path, np.asarray(sensor_ids))
        flipped: set[int] = set()
        if scenario.attack is not None and scenario.attack.kind == "label_flip":
            ids = fleet.profiles.sensor_id
            flipped = set(ids[choose_attackers(scenario.seed, ids, scenario.attack.fraction)].tolist())
        for sid, start, count in zip(self.shard.ids.tolist(), self.shard.starts.tolist(), self.shard.counts.tolist()):
            rows = slice(start, start + count)
            raw = self.shard.x[rows]
            processed = preprocess.apply(raw, prep)
            if processed is not raw:  # no preprocessing hands the same view back
                raw[...] = processed
            if sid in flipped:
                self.shard.y[rows] = flip_labels(self.shard.y[rows], fleet.classes)
        self.sensors_per_batch = int(scenario.cluster.sensors_per_batch)
        self._warm_up()

    def reload(self, scenario: Scenario, fleet: FleetData, sensor_ids: np.ndarray) -> None:
        """Become a new actor for another run, in this process (see ``raysim.cluster.ACTOR_POOL``):
        every attribute dropped, the constructor run again, and the peak-memory figure started afresh."""
        self.__dict__.clear()
        reset_peak_rss()
        self.__init__(scenario, fleet, sensor_ids)

    def _encode(self, sensor_id: int, task_key: int, update: np.ndarray) -> bytes:
        rng = stream(self.scenario.seed, COMPRESS, sensor_id, task_key)
        if self.feedback is not None:
            return self.feedback.send(sensor_id, update, rng)
        return self.codec.encode(update, rng)

    def _warm_up(self) -> None:
        # torch.func.vmap's first call in a process pays a one-off set-up cost (about 2 s); models
        # without a batched forward train through it, so pay that before round 1.
        if self.scenario.training.vectorized and len(self.shard.ids) and not hasattr(self.model, "forward_batched"):
            x, y = self.shard.samples(int(self.shard.ids[0]))
            plan = self.local.plan(len(y), stream(0, TRAIN, 0, 0))[:1]
            train_vectorized(self.model, self.layout, self.layout.flatten(self.model), [(x, y)], [plan], self.local)

    def placement(self) -> dict[str, Any]:
        """Where Ray put this actor: node and accelerator ids (for placement checks)."""
        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
            "sensors": len(self.shard.ids),
        }

    def client_state(self) -> dict[str, dict[int, np.ndarray]]:
        """The hosted sensors' own state, by sensor id: SCAFFOLD control variates and error-feedback residuals."""
        return {"controls": dict(self.controls),
                "residuals": self.feedback.state() if self.feedback is not None else {}}

    def load_client_state(self, state: dict[str, dict[int, np.ndarray]]) -> None:
        """Restore what :meth:`client_state` returned (for this actor's sensors; others are ignored)."""
        hosted = set(self.shard.ids.tolist())
        self.controls = {int(k): np.array(v, dtype=np.float32) for k, v in state["controls"].items() if int(k) in hosted}
        if self.feedback is not None:
            self.feedback.load({k: v for k, v in state["residuals"].items() if int(k) in hosted})

    def memory(self) -> dict[str, Any]:
        """This actor's process id and peak resident memory so far, in MB (``getrusage`` high-water mark)."""
        return process_memory()

    def train(
        self,
        task_keys: np.ndarray,
        sensor_ids: np.ndarray,
        version_slots: np.ndarray,
        lr: np.ndarray,
        *weights: np.ndarray,
        control: np.ndarray | None = None,
        reduce: str | None = None,
        delay_s: float = 0.0,
        crash: bool = False,
    ) -> dict[str, Any]:
        """Train hosted sensors; one call per training batch.

        Task i trains sensor ``sensor_ids[i]`` from ``weights[version_slots[i]]``
        (each version is one shared ``ray.put`` object) at learning rate
        ``lr[i]``, with its batch order drawn from the stream keyed by (sensor,
        ``task_keys[i]``). Each result carries the fingerprint of the weights it
        trained from. With SCAFFOLD, ``control`` is the server's c: gradients are
        corrected by c − c_i, c_i is updated, and its change is returned.

        Sensors train in batches of at most ``cluster.sensors_per_batch``. By
        default every update (or its encoded payload) is returned. With
        ``reduce`` ("samples" or "uniform") only their weighted sum is:
        ``sum`` = Σ w_i·u_i in float64 and ``weight`` = Σ w_i over the finite
        updates u_i (as the coordinator would decode them), w_i the sensor's
        sample count or 1, and ``finite`` marks which updates were; memory then
        stays bounded by one batch whatever the number of tasks. ``busy_s`` is
        the wall time spent in this call; ``delay_s`` adds that much wall-clock
        sleep first (a slow machine, injected by ``faults``); ``crash`` ends the
        actor's process in the middle of the call, as a killed machine would.
        """
        started = time.perf_counter()
        if delay_s:
            time.sleep(delay_s)
        if crash:
            os._exit(1)
        if self.downlink is not None:  # the model arrives encoded
            weights = tuple(self.downlink.decode(w) for w in weights)
        sensor_ids = np.asarray(sensor_ids)
        version_slots = np.asarray(version_slots, dtype=np.int64)
        lr = np.asarray(lr, dtype=np.float64)
        if self.scaffold and control is None:
            raise ValueError("SCAFFOLD training needs the server's control variate")
        parts = [self._train_batch(task_keys[b], sensor_ids[b], version_slots[b], lr[b], weights, control, reduce)
                 for b in _batches(len(sensor_ids), self.sensors_per_batch)]
        out: dict[str, Any] = {}
        if reduce is not None:
            out["sum"] = sum((p.pop("sum") for p in parts), np.zeros(self.layout.size))
            out["weight"] = float(sum(p.pop("weight") for p in parts))
        if parts and "payloads" in parts[0]:
            out["payloads"] = [payload for p in parts for payload in p.pop("payloads")]
        for key in parts[0] if parts else ():
            out[key] = np.concatenate([p[key] for p in parts])
        prints = np.array([fingerprint(w) for w in weights], dtype=np.int64)
        out["fingerprint"] = prints[version_slots]
        out["busy_s"] = time.perf_counter() - started
        return out

    def _train_batch(self, task_keys: np.ndarray, sensor_ids: np.ndarray, version_slots: np.ndarray, lr: np.ndarray,
                     weights: tuple[np.ndarray, ...], control: np.ndarray | None, reduce: str | None) -> dict[str, Any]:
        """:meth:`train` for one batch of sensors trained together."""
        seed = self.scenario.seed
        where = self.shard.index(sensor_ids)
        x, y, starts, counts = self.shard.x, self.shard.y, self.shard.starts[where], self.shard.counts[where]
        datasets = [(x[s : s + c], y[s : s + c]) for s, c in zip(starts.tolist(), counts.tolist())]
        # Each task's batch order from stream(seed, TRAIN, sensor, key), the generators seeded in bulk.
        rngs = keyed_streams(seed, TRAIN, np.stack([sensor_ids, task_keys], axis=1).astype(np.int64))
        plans = [self.local.plan(int(n), rng) for n, rng in zip(counts.tolist(), rngs)]
        start = weights[0] if len(weights) == 1 else np.stack([weights[v] for v in version_slots])
        trainer = train_vectorized if self.scenario.training.vectorized else train_reference
        out: dict[str, Any] = {}
        if self.scaffold:
            local = np.stack([self.controls.get(int(sid), np.zeros(self.layout.size, np.float32)) for sid in sensor_ids])
            result = trainer(self.model, self.layout, start, datasets, plans, self.local, lr=lr,
                             correction=(control[None, :] - local).astype(np.float32))
            updated = scaffold_control_update(local, control, result.updates, result.steps, lr)
            for sid, c_i in zip(sensor_ids, updated):
                self.controls[int(sid)] = c_i
            out["controls"] = updated - local
        else:
            result = trainer(self.model, self.layout, start, datasets, plans, self.local, lr=lr)
        updates = result.updates
        if self.local_dp is not None:  # clipped and noised on the sensor, before anything leaves it
            p = self.local_dp
            updates = np.stack([local_dp(u, p.clip_norm, p.noise_multiplier, stream(seed, PRIVACY, int(sid), int(key)))
                                for sid, key, u in zip(sensor_ids, task_keys, updates)])
        num_samples = np.array([len(y) for _, y in datasets], dtype=np.int64)
        if self.codec is not None:  # what goes on the wire
            payloads = [self._encode(int(sid), int(key), update) for sid, key, update in zip(sensor_ids, task_keys, updates)]
            if reduce is None:
                out["payloads"] = payloads
            else:  # decoded here exactly as the coordinator would
                updates = np.stack([self.codec.decode(payload) for payload in payloads])
        if reduce is not None:
            finite = np.isfinite(updates).all(axis=1)
            w = (num_samples if reduce == "samples" else np.ones(len(updates)))[finite].astype(np.float64)
            out.update(sum=w @ updates[finite].astype(np.float64), weight=w.sum(), finite=finite)
        elif self.codec is None:
            out["updates"] = updates
        out.update(num_samples=num_samples, train_loss=result.train_loss, steps=result.steps)
        return out


def _batches(count: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]

