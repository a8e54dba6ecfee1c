"""Model architectures of a fleet: one per distinct tier model, each with its own global model.

A tier may run its own model (``fleet.tiers[].model``; tiers without one run
the scenario's ``model``). Tiers running the same model config form one
architecture *group*; each group keeps its own global model and is aggregated
only with its own sensors' updates (plain FedAvg cannot average models of
different shapes). Groups share knowledge through distillation on a public
proxy set (:mod:`raysim.alignment`).

Everything the coordinator sends down for one model version is still one flat
float32 vector (DESIGN.md, "Performance architecture"):

    [ group 0's weights | group 1's weights | ... | G consensus logits (P·K each) | G consensus flags ]

The last two parts exist only with ``distillation``. Group g's consensus is
the mean logits, on the proxy set's P samples, of the teaching architectures
it learns from (:attr:`Architectures.sources`: every teaching architecture but
itself, or itself when it is the only architecture); its flag is 1 once that
consensus exists. With one group and no distillation the vector is exactly
the model's weights.

Personal layers (FedPer, Arivazhagan et al. 2019) are parameters that stay on
each sensor: they are never uploaded, never aggregated, and the coordinator's
copy of them keeps its initial values. :attr:`Group.shared` lists the
coordinates that do travel; codecs and byte counts cover only those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from raysim.models import ParamLayout, build_model
from raysim.models.base import training_flops_per_sample

if TYPE_CHECKING:
    from raysim.scenario import Scenario

HEAD = "head"  # personal-layer alias: the model's classifier (its ``head`` name prefix)


@dataclass(frozen=True, eq=False)
class Group:
    """One architecture: the tiers that run it, and where its weights sit in the global vector."""

    index: int
    name: str  # its tiers' names joined by "+": the suffix of its per-architecture metrics
    config: BaseModel  # the model config
    tiers: tuple[int, ...]  # indices into scenario.fleet.tiers
    offset: int  # its weights are global[offset : offset + layout.size]
    layout: ParamLayout
    personal: np.ndarray  # bool (layout.size,): coordinates that stay on the sensor
    personal_names: tuple[str, ...]  # the parameters that stay on the sensor

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def span(self) -> slice:
        return slice(self.offset, self.offset + self.layout.size)

    @property
    def shared(self) -> np.ndarray:
        """Indices (within the group's layout) of the coordinates that are uploaded and aggregated."""
        return np.flatnonzero(~self.personal)

    @property
    def shared_numels(self) -> tuple[int, ...]:
        """Lengths of the shared parameter tensors, in layout order: what a codec is built for."""
        return tuple(n for name, n in zip(self.layout.names, self.layout.numels) if name not in self.personal_names)

    @property
    def columns(self) -> np.ndarray:
        """Global-vector indices of the shared coordinates."""
        return self.offset + self.shared

    def build(self, channels: int, window: int, classes: int) -> nn.Module:
        return build_model(self.config, channels, window, classes)


@dataclass(frozen=True, eq=False)
class Architectures:
    """Every group of a run, the tier → group map and the layout of the global vector."""

    groups: tuple[Group, ...]
    tier_group: np.ndarray  # int64 (tiers,): group of each tier
    model_size: int  # Σ group sizes
    logits_size: int  # P·K with distillation, else 0
    classes: int
    sources: tuple[tuple[int, ...], ...] = ()  # per group: the groups whose logits make its consensus

    @property
    def consensus_size(self) -> int:
        """Length of all the groups' consensus logits."""
        return len(self.groups) * self.logits_size

    @property
    def size(self) -> int:
        """Length of the global vector: the models, then (with distillation) the consensus logits and flags."""
        return self.model_size + (self.consensus_size + len(self.groups) if self.logits_size else 0)

    def consensus(self, group: int) -> slice:
        start = self.model_size + group * self.logits_size
        return slice(start, start + self.logits_size)

    def flag(self, group: int) -> int:
        return self.model_size + self.consensus_size + group

    @property
    def teaching(self) -> set[int]:
        """Groups some other group learns from."""
        return {t for sources in self.sources for t in sources}

    @property
    def single(self) -> bool:
        """One group, nothing personal, no consensus: the global vector is one model's weights."""
        return len(self.groups) == 1 and not self.groups[0].personal.any() and not self.logits_size

    @property
    def numels(self) -> tuple[int, ...]:
        """Segments of the global vector: every group's parameter tensors, then the consensus with its flag."""
        tail = (self.consensus_size + len(self.groups),) if self.logits_size else ()
        return tuple(n for g in self.groups for n in g.layout.numels) + tail

    def group_of(self, tiers: np.ndarray) -> np.ndarray:
        return self.tier_group[np.asarray(tiers, dtype=np.int64)]

    def init_weights(self, seed: int, channels: int, window: int, classes: int) -> np.ndarray:
        """The initial global vector: each group's model initialised from ``seed``, no consensus yet."""
        out = np.zeros(self.size, dtype=np.float32)
        for group in self.groups:
            module = build_model(group.config, channels, window, classes, seed=seed)
            out[group.span] = group.layout.flatten(module)
        return out


def model_groups(scenario: "Scenario") -> tuple[list[BaseModel], np.ndarray]:
    """The distinct model configs in tier order, and each tier's index into them."""
    configs: list[BaseModel] = []
    keys: list[str] = []
    tier_group = []
    for tier in scenario.fleet.tiers:
        config = tier.model if tier.model is not None else scenario.model
        key = json.dumps(config.model_dump(mode="json"), sort_keys=True)
        if key not in keys:
            keys.append(key)
            configs.append(config)
        tier_group.append(keys.index(key))
    return configs, np.array(tier_group, dtype=np.int64)


def build_architectures(scenario: "Scenario", channels: int, window: int, classes: int) -> Architectures:
    """The groups of ``scenario`` for data of this shape.

    A personal-layer name that matches no parameter of some group's model, or
    that leaves a model with nothing shared, is a ValueError naming both.
    """
    configs, tier_group = model_groups(scenario)
    layers = scenario.personalization.layers if scenario.personalization is not None else ()
    groups, offset = [], 0
    for index, config in enumerate(configs):
        module = build_model(config, channels, window, classes)
        layout = ParamLayout.of(module)
        prefixes = [getattr(module, "head", None) if name == HEAD else name for name in layers]
        tiers = tuple(int(t) for t in np.flatnonzero(tier_group == index))
        label = "+".join(scenario.fleet.tiers[t].name for t in tiers)
        for name, prefix in zip(layers, prefixes):
            if prefix is None or not any(p.startswith(prefix) for p in layout.names):
                raise ValueError(f"personalization.layers: {name!r} names no parameter of model {config.name} "
                                 f"(tiers {label}); its parameters are {', '.join(layout.names)}"
                                 + ("" if name == HEAD else f", and {HEAD!r} names its classifier"))
        personal_names = tuple(p for p in layout.names if any(p.startswith(prefix) for prefix in prefixes))
        personal = np.zeros(layout.size, dtype=bool)
        for name, start, numel in zip(layout.names, layout.offsets, layout.numels):
            if name in personal_names:
                personal[start : start + numel] = True
        if personal.all():
            raise ValueError(f"personalization.layers: {', '.join(layers)} covers every parameter of model "
                             f"{config.name} (tiers {label}); at least one layer must be shared")
        groups.append(Group(index, label, config, tiers, offset, layout, personal, personal_names))
        offset += layout.size
    distill = scenario.distillation
    if distill is None:
        return Architectures(tuple(groups), tier_group, offset, 0, classes)
    names = [t.name for t in scenario.fleet.tiers]
    teachers = {int(tier_group[names.index(n)]) for n in (distill.teachers or names)}
    sources = tuple(tuple(sorted(teachers - {g} if len(groups) > 1 else teachers)) for g in range(len(groups)))
    return Architectures(tuple(groups), tier_group, offset, scenario.proxy.samples * classes, classes, sources)


def tier_seconds_per_sample(scenario: "Scenario", channels: int, window: int, classes: int) -> list[float]:
    """Median compute seconds of one sample in one local epoch, per tier.

    A tier's ``seconds_per_sample`` as given, or, for a tier that gives its
    device's ``ops_per_s`` instead, the training FLOPs of one sample with the
    tier's model (forward and backward, about 3× the forward pass) divided by it.
    """
    configs, tier_group = model_groups(scenario)
    flops = [training_flops_per_sample(build_model(c, channels, window, classes), channels, window) for c in configs]
    return [t.seconds_per_sample if t.seconds_per_sample is not None else flops[tier_group[i]] / t.ops_per_s
            for i, t in enumerate(scenario.fleet.tiers)]


def holdout_counts(num_samples: np.ndarray, holdout: float) -> np.ndarray:
    """Samples each sensor keeps aside for personalized evaluation: ⌊holdout·n⌋, leaving at least one to train on."""
    n = np.asarray(num_samples, dtype=np.int64)
    return np.clip(np.floor(holdout * n).astype(np.int64), 0, np.maximum(n - 1, 0))


def work_factor(scenario: "Scenario", num_samples: np.ndarray, uploads_logits: np.ndarray | None = None) -> np.ndarray:
    """Each sensor's local compute relative to plain training on its own samples, for the virtual clock.

    Distillation and MMD add a proxy batch of P_b samples to every local step
    (steps = epochs·⌈n/B⌉), MMD a second forward pass of it through the global
    model, and MOON two extra forward passes of every private batch; a sensor
    that uploads its logits (``uploads_logits``) runs the P proxy samples
    through its model once more. A forward pass counts a third of a training pass.
    """
    n = np.maximum(np.asarray(num_samples, dtype=np.float64), 1.0)
    epochs = scenario.training.local_epochs
    batch = n if scenario.training.batch_size == "full" else float(scenario.training.batch_size)
    steps_per_epoch = np.ceil(n / batch)
    factor = np.ones(len(n))
    alignment = scenario.alignment
    if scenario.distillation is not None or alignment.mmd_weight:
        proxy = steps_per_epoch * scenario.proxy.batch * (1.0 + (alignment.mmd_weight > 0) / 3.0)
        factor += proxy / n  # per epoch, like the n private samples
    if alignment.moon_weight:
        factor += 2.0 / 3.0
    if uploads_logits is not None:
        factor += np.asarray(uploads_logits, dtype=bool) * scenario.proxy.samples / 3.0 / (n * epochs)
    return factor


def logits_bytes(scenario: "Scenario", arch: Architectures) -> tuple[list[int], list[int]]:
    """Bytes of proxy-set logits on the wire per task of each group, (up, down): a teaching sensor's own
    logits up (teacher local) and its group's consensus down, P·K float32 or float16 values each."""
    distill = scenario.distillation
    if distill is None:
        return [0] * len(arch.groups), [0] * len(arch.groups)
    size = arch.logits_size * (2 if distill.logits == "float16" else 4)
    up = [size if distill.teacher == "local" and g in arch.teaching else 0 for g in range(len(arch.groups))]
    down = [size if arch.sources[g] else 0 for g in range(len(arch.groups))]
    return up, down


def describe(groups: tuple[Group, ...]) -> list[dict[str, Any]]:
    """The groups as summary.json lists them."""
    return [{"name": g.name, "model": g.config.model_dump(mode="json"), "parameters": g.size,
             "shared_parameters": int((~g.personal).sum()), "personal_layers": list(g.personal_names)}
            for g in groups]


def stacked_forward(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of S models at once, x (S, B, C, T) → (S, B, K): ``forward_batched`` or ``vmap``."""
    forward = getattr(model, "forward_batched", None)
    if forward is not None:
        return forward(params, x)
    from torch.func import functional_call, vmap

    return vmap(lambda p, xb: functional_call(model, p, (xb,)))(params, x)
