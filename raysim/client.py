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

from raysim.architectures import Group, build_architectures, holdout_counts, stacked_forward
from raysim.fleet import FleetData, load_proxy, preprocess, store
from raysim.metrics import process_memory, reset_peak_rss
from raysim.models import ParamLayout, build_model
from raysim.scenario import Scenario
from raysim.streams import COMPRESS, HOLDOUT, PRIVACY, PROXY, TRAIN, keyed_streams, stream
from raysim.attacks import choose_attackers, flip_labels
from raysim.compression import CODECS, ErrorFeedback
from raysim.drift import SensorDrift
from raysim.privacy import local_dp
from raysim.strategies import client_settings
from raysim.strategies.validation import fingerprint
from raysim.training import (LocalTraining, Regularizers, scaffold_control_update, train_reference,
                             train_vectorized)


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
        self.arch = build_architectures(scenario, fleet.channels, fleet.window, fleet.classes)
        self.models = [group.build(fleet.channels, fleet.window, fleet.classes) for group in self.arch.groups]
        self.model, self.layout = self.models[0], self.arch.groups[0].layout
        uplink = scenario.compression.uplink
        self.codecs = [CODECS.build(uplink, g.shared_numels) if uplink.name != "none" else None for g in self.arch.groups]
        self.codec = self.codecs[0]
        self.feedbacks = [ErrorFeedback(codec, len(g.shared)) if codec and scenario.compression.error_feedback else None
                          for codec, g in zip(self.codecs, self.arch.groups)]
        self.feedback = self.feedbacks[0]
        downlink = scenario.compression.downlink
        self.downlink = CODECS.build(downlink, self.arch.numels) if downlink.name != "none" else None
        privacy = scenario.privacy
        self.local_dp = privacy if privacy is not None and privacy.mode == "local" else None
        prep = scenario.fleet.data.preprocess
        # The shard's samples, columnar (one array for all hosted sensors), preprocessed in place per sensor.
        self.shard = store.read_shard(fleet.train_path, np.asarray(sensor_ids))
        flipped: set[int] = set()
        duplicated: set[int] = set()
        if scenario.attack is not None and scenario.attack.kind in ("label_flip", "duplicate"):
            ids = fleet.profiles.sensor_id
            chosen = set(ids[choose_attackers(scenario.seed, ids, scenario.attack.fraction)].tolist())
            flipped, duplicated = (chosen, set()) if scenario.attack.kind == "label_flip" else (set(), chosen)
        personalization = scenario.personalization
        held = (holdout_counts(self.shard.counts, personalization.holdout) if personalization is not None
                else np.zeros(len(self.shard.ids), dtype=np.int64))
        self.train_counts = self.shard.counts - held  # a sensor's first train_counts rows train; the rest are held out
        for sid, start, count, keep in zip(self.shard.ids.tolist(), self.shard.starts.tolist(),
                                           self.shard.counts.tolist(), self.train_counts.tolist()):
            rows = slice(start, start + count)
            raw = self.shard.x[rows]
            processed = preprocess.apply(raw, prep)
            if processed is not raw:  # no preprocessing hands the same view back
                raw[...] = processed
            if sid in flipped:
                self.shard.y[rows] = flip_labels(self.shard.y[rows], fleet.classes)
            if sid in duplicated:  # a few distinct windows, repeated to fill its n samples
                distinct = max(1, int(round(scenario.attack.keep * count)))
                copies = np.arange(count) % distinct
                self.shard.x[rows] = self.shard.x[rows][copies]
                self.shard.y[rows] = self.shard.y[rows][copies]
            if keep < count:  # a seeded choice of the held-out samples, moved to the end of the sensor's rows
                order = stream(scenario.seed, HOLDOUT, sid).permutation(count)
                self.shard.x[rows] = self.shard.x[rows][order]
                self.shard.y[rows] = self.shard.y[rows][order]
        positions = fleet.profiles.positions(self.shard.ids)
        self.sensor_group = self.arch.group_of(fleet.profiles.tier[positions])  # aligned with shard.ids
        self.sensor_epochs = np.array(scenario.tier_epochs())[fleet.profiles.tier[positions]]  # its local epochs
        # Sensors' own state beyond SCAFFOLD and error feedback, by sensor id: personal layers' values,
        # the previous local model (MOON), and which sensors have trained (personalized evaluation).
        self.personal: dict[int, np.ndarray] = {}
        self.previous: dict[int, np.ndarray] = {}
        self.trained: set[int] = set()
        needs_proxy = scenario.distillation is not None or scenario.alignment.mmd_weight > 0
        self.proxy_x = load_proxy(scenario, fleet) if needs_proxy else None
        self.classes = fleet.classes
        self.drift = (SensorDrift(scenario.drift, scenario.seed, fleet.profiles.sensor_id, fleet.channels)
                      if scenario.drift is not None else None)
        self.sensors_per_batch = int(scenario.cluster.sensors_per_batch)
        self._warm_up()

    def reload(self, scenario: Scenario, fleet: FleetData, sensor_ids: np.ndarray) -> None:
        """Become a new actor for another run, in this process (see ``raysim.cluster.ACTOR_POOL``):
        every attribute dropped, the constructor run again, and the peak-memory figure started afresh."""
        self.__dict__.clear()
        reset_peak_rss()
        self.__init__(scenario, fleet, sensor_ids)

    def _encode(self, group: int, sensor_id: int, task_key: int, update: np.ndarray) -> bytes:
        rng = stream(self.scenario.seed, COMPRESS, sensor_id, task_key)
        if self.feedbacks[group] is not None:
            return self.feedbacks[group].send(sensor_id, update, rng)
        return self.codecs[group].encode(update, rng)

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
        """The hosted sensors' own state, by kind (:data:`CLIENT_STATE`) and sensor id: SCAFFOLD control
        variates, error-feedback residuals, personal layers, previous local models, and who has trained."""
        residuals = {k: v for f in self.feedbacks if f is not None for k, v in f.state().items()}
        return {"controls": dict(self.controls), "residuals": residuals, "personal": dict(self.personal),
                "previous": dict(self.previous), "trained": {sid: _EMPTY for sid in self.trained}}

    def load_client_state(self, state: dict[str, dict[int, np.ndarray]]) -> None:
        """Restore what :meth:`client_state` returned (for this actor's sensors; others are ignored)."""
        hosted = set(self.shard.ids.tolist())

        def mine(kind: str) -> dict[int, np.ndarray]:
            return {int(k): np.array(v, dtype=np.float32) for k, v in state.get(kind, {}).items() if int(k) in hosted}

        self.controls, self.personal, self.previous = mine("controls"), mine("personal"), mine("previous")
        self.trained = set(mine("trained"))
        residuals = mine("residuals")
        for index, feedback in enumerate(self.feedbacks):
            if feedback is not None:
                group_ids = set(self.shard.ids[self.sensor_group == index].tolist())
                feedback.load({k: v for k, v in residuals.items() if k in group_ids})

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
        """:meth:`train` for one batch of sensors, trained together per (architecture, model version)."""
        where = self.shard.index(sensor_ids)
        if self.arch.single:
            return self._train_cohort(self.arch.groups[0], task_keys, sensor_ids, version_slots, lr, where, weights,
                                      control, reduce)
        parts, rows = [], []
        for group, slot in sorted({(int(g), int(v)) for g, v in zip(self.sensor_group[where], version_slots)}):
            mine = np.flatnonzero((self.sensor_group[where] == group) & (version_slots == slot))
            rows.append(mine)
            parts.append(self._train_cohort(self.arch.groups[group], task_keys[mine], sensor_ids[mine],
                                            version_slots[mine], lr[mine], where[mine], weights, control, reduce))
        order = np.empty(len(sensor_ids), dtype=np.int64)
        order[np.concatenate(rows)] = np.arange(len(sensor_ids))
        out: dict[str, Any] = {}
        if "payloads" in parts[0]:
            payloads = [payload for p in parts for payload in p.pop("payloads")]
            out["payloads"] = [payloads[i] for i in order]
        for key in parts[0]:
            out[key] = np.concatenate([p[key] for p in parts])[order]
        return out

    def _train_cohort(self, group: Group, task_keys: np.ndarray, sensor_ids: np.ndarray, version_slots: np.ndarray,
                      lr: np.ndarray, where: np.ndarray, weights: tuple[np.ndarray, ...], control: np.ndarray | None,
                      reduce: str | None) -> dict[str, Any]:
        """Train sensors of one architecture (and, unless the run has just one, one model version) together."""
        seed = self.scenario.seed
        model, layout = self.models[group.index], group.layout
        x, y, starts, counts = self.shard.x, self.shard.y, self.shard.starts[where], self.train_counts[where]
        datasets = [(x[s : s + c], y[s : s + c]) for s, c in zip(starts.tolist(), counts.tolist())]
        reports = None
        if self.drift is not None:  # sync: the task key is the round
            datasets = [self.drift.resample(int(sid), int(key), dx, dy, self.classes)
                        for sid, key, (dx, dy) in zip(sensor_ids.tolist(), task_keys.tolist(), datasets)]
            datasets = [(self.drift.apply(int(sid), int(key), dx), dy)
                        for sid, key, (dx, dy) in zip(sensor_ids.tolist(), task_keys.tolist(), datasets)]
            detection = self.scenario.drift.detection
            if detection is not None:  # what each sensor reports of its windows, for drift detection
                reports = np.stack([self.drift.report(int(sid), int(key), dx, detection.samples)
                                    for sid, key, (dx, _) in zip(sensor_ids.tolist(), task_keys.tolist(), datasets)])
        # Each task's batch order from stream(seed, TRAIN, sensor, key), the generators seeded in bulk.
        keys = np.stack([sensor_ids, task_keys], axis=1).astype(np.int64)
        plans = [self.local.plan(int(n), rng, int(e)) for n, e, rng in
                 zip(counts.tolist(), self.sensor_epochs[where].tolist(), keyed_streams(seed, TRAIN, keys))]
        span = group.span
        start = weights[0][span] if len(weights) == 1 else np.stack([weights[v][span] for v in version_slots])
        personal = group.personal.any()
        if personal:  # each sensor starts from the shared global layers and its own personal layers
            start = np.array(np.broadcast_to(start, (len(sensor_ids), group.size)), dtype=np.float32)
            for row, sid in enumerate(sensor_ids.tolist()):
                if sid in self.personal:
                    start[row, group.personal] = self.personal[sid]
        regularizers = self._regularizers(group, weights[int(version_slots[0])], keys, plans, start)
        trainer = train_vectorized if self.scenario.training.vectorized else train_reference
        out: dict[str, Any] = {}
        if self.scaffold:
            local = np.stack([self.controls.get(int(sid), np.zeros(layout.size, np.float32)) for sid in sensor_ids])
            result = trainer(model, layout, start, datasets, plans, self.local, lr=lr,
                             correction=(control[None, :] - local).astype(np.float32), regularizers=regularizers)
            updated = scaffold_control_update(local, control, result.updates, result.steps, lr)
            for sid, c_i in zip(sensor_ids, updated):
                self.controls[int(sid)] = c_i
            out["controls"] = updated - local
        else:
            result = trainer(model, layout, start, datasets, plans, self.local, lr=lr, regularizers=regularizers)
        updates = result.updates
        local_models = None
        if personal or self.scenario.alignment.moon_weight or self.scenario.distillation is not None:
            local_models = np.broadcast_to(start, updates.shape) + updates
            for row, sid in enumerate(sensor_ids.tolist()):
                if personal:  # kept on the sensor, never sent
                    self.personal[sid] = local_models[row, group.personal].copy()
                if self.scenario.alignment.moon_weight:
                    self.previous[sid] = local_models[row].copy()
        self.trained.update(sensor_ids.tolist())
        if personal:
            updates = updates[:, group.shared]  # only the shared layers leave the sensor
        if self.local_dp is not None:  # clipped and noised on the sensor, before anything leaves it
            p = self.local_dp
            updates = np.stack([local_dp(u, p.clip_norm, p.noise_multiplier, stream(seed, PRIVACY, int(sid), int(key)))
                                for sid, key, u in zip(sensor_ids, task_keys, updates)])
        num_samples = np.array([len(y) for _, y in datasets], dtype=np.int64)
        codec = self.codecs[group.index]
        if codec is not None:  # what goes on the wire
            payloads = [self._encode(group.index, int(sid), int(key), update)
                        for sid, key, update in zip(sensor_ids, task_keys, updates)]
            if reduce is None:
                out["payloads"] = payloads
            else:  # decoded here exactly as the coordinator would
                updates = np.stack([codec.decode(payload) for payload in payloads])
        if reduce is not None:
            finite = np.isfinite(updates).all(axis=1)
            w = (num_samples if reduce == "samples" else np.ones(len(updates)))[finite].astype(np.float64)
            out.update(sum=w @ updates[finite].astype(np.float64), weight=w.sum(), finite=finite)
        elif codec is None:
            out["updates"] = updates if self.arch.single else self._expand(group, updates)
        if self.scenario.distillation is not None and self.scenario.distillation.teacher == "local":
            # A teaching sensor uploads its logits; the others send none (NaN rows keep the results aligned).
            out["logits"] = (self._proxy_logits(group, local_models) if group.index in self.arch.teaching
                             else np.full((len(sensor_ids), self.arch.logits_size), np.nan, dtype=np.float32))
        if reports is not None:
            out["summary"] = reports
        out.update(num_samples=num_samples, train_loss=result.train_loss, steps=result.steps)
        return out

    def _expand(self, group: Group, updates: np.ndarray) -> np.ndarray:
        """Shared-layer updates of one architecture, placed in the coordinator's layout (zeros elsewhere)."""
        full = np.zeros((len(updates), self.arch.model_size), dtype=np.float32)
        full[:, group.columns] = updates
        return full

    def _regularizers(self, group: Group, weights: np.ndarray, keys: np.ndarray, plans: list,
                      start: np.ndarray) -> Regularizers | None:
        """The distillation, MMD and MOON terms of one cohort (None when the scenario has none)."""
        scenario = self.scenario
        distill, alignment = scenario.distillation, scenario.alignment
        if distill is None and not alignment.mmd_weight and not alignment.moon_weight:
            return None
        teacher = None
        if distill is not None and weights[self.arch.flag(group.index)] == 1.0:  # its teachers' consensus exists
            teacher = weights[self.arch.consensus(group.index)].reshape(scenario.proxy.samples, self.arch.classes)
        proxy_plans: list = []
        if teacher is not None or alignment.mmd_weight:
            batch, samples = scenario.proxy.batch, scenario.proxy.samples
            proxy_plans = [list(rng.integers(samples, size=(len(plan), batch)))
                           for plan, rng in zip(plans, keyed_streams(scenario.seed, PROXY, keys))]
        previous = None
        if alignment.moon_weight:
            rows = np.broadcast_to(start, (len(keys), start.shape[-1]))
            previous = np.stack([self.previous.get(int(sid), rows[i]) for i, sid in enumerate(keys[:, 0].tolist())])
        return Regularizers(proxy_x=self.proxy_x, proxy_plans=proxy_plans, teacher=teacher,
                            kd_weight=distill.weight if distill is not None else 0.0,
                            temperature=distill.temperature if distill is not None else 1.0,
                            mmd_weight=alignment.mmd_weight, moon_weight=alignment.moon_weight,
                            moon_temperature=alignment.moon_temperature, previous=previous)

    @torch.no_grad()
    def _proxy_logits(self, group: Group, local_models: np.ndarray) -> np.ndarray:
        """Each trained local model's logits on the whole proxy set, flattened (S, P·K), at wire precision."""
        params = group.layout.split(torch.from_numpy(np.ascontiguousarray(local_models, dtype=np.float32)))
        proxy = torch.from_numpy(self.proxy_x).expand(len(local_models), *self.proxy_x.shape)
        logits = stacked_forward(self.models[group.index], params, proxy).reshape(len(local_models), -1).numpy()
        if self.scenario.distillation.logits == "float16":
            logits = logits.astype(np.float16)
        return logits.astype(np.float32)

    @torch.no_grad()
    def evaluate_personal(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Each hosted sensor that has trained, on its own held-out samples, with its own model (the
        global shared layers and its personal layers): ids, correct predictions and held-out counts."""
        if self.downlink is not None:
            weights = self.downlink.decode(weights)
        ids, correct, held = [], [], []
        for group in self.arch.groups:
            rows = [i for i in np.flatnonzero(self.sensor_group == group.index)
                    if int(self.shard.ids[i]) in self.trained and self.shard.counts[i] > self.train_counts[i]]
            for chunk in _batches(len(rows), self.sensors_per_batch):
                mine = np.array(rows[chunk], dtype=np.int64)
                if not len(mine):
                    continue
                params = np.array(np.broadcast_to(weights[group.span], (len(mine), group.size)), dtype=np.float32)
                for row, i in enumerate(mine.tolist()):
                    sid = int(self.shard.ids[i])
                    if sid in self.personal:
                        params[row, group.personal] = self.personal[sid]
                first = self.shard.starts[mine] + self.train_counts[mine]
                count = self.shard.counts[mine] - self.train_counts[mine]
                width = int(count.max())
                index = first[:, None] + np.minimum(np.arange(width)[None, :], count[:, None] - 1)
                x = torch.from_numpy(self.shard.x[index.reshape(-1)]).view(len(mine), width, *self.shard.x.shape[1:])
                logits = stacked_forward(self.models[group.index], group.layout.split(torch.from_numpy(params)), x)
                hit = (logits.argmax(-1).numpy() == self.shard.y[index]) & (np.arange(width)[None, :] < count[:, None])
                ids.append(self.shard.ids[mine])
                correct.append(hit.sum(1))
                held.append(count)
        if not ids:
            return {"ids": np.zeros(0, np.int64), "correct": np.zeros(0, np.int64), "count": np.zeros(0, np.int64)}
        return {"ids": np.concatenate(ids), "correct": np.concatenate(correct), "count": np.concatenate(held)}


def _batches(count: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]



_EMPTY = np.zeros(0, dtype=np.float32)  # the value of a "trained" marker in client_state
