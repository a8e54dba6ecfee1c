"""Scenario schema, YAML loading, ``--set`` overrides and validation errors.

A scenario is one YAML file describing a whole run. It is loaded into frozen,
typed pydantic models with every default filled in, and validated completely
before Ray starts: any problem becomes a :class:`ScenarioError` naming the file,
the field path and what was expected.
"""

from __future__ import annotations

import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from raysim.errors import ScenarioError
from raysim.models import MODELS
from raysim.attacks import Attack
from raysim.compression import CODECS
from raysim.privacy import Privacy
from raysim.strategies import STRATEGIES
from raysim.strategies.robust import AGGREGATORS
from raysim.strategies.server_optimizers import SERVER_OPTIMIZERS
from raysim.strategies.validation import Validation


class Frozen(BaseModel):
    """Base of every scenario section: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _default_tag(raw: Any, field: str, tag: str, default: str) -> Any:
    """Let a union section omit its tag (``model: {hidden: [32]}`` means the default model)."""
    if isinstance(raw, dict) and isinstance(raw.get(field), dict) and tag not in raw[field]:
        return {**raw, field: {tag: default, **raw[field]}}
    return raw


# --------------------------------------------------------------------------- fleet


class Preprocess(Frozen):
    """Steps a sensor pipeline applies to its windows before training and evaluation."""

    smoothing_window: PositiveInt = 1  # moving-average length in samples; 1 = no smoothing
    zscore: bool = False  # per-sensor, per-channel z-score normalization (stats of that sensor's own data)


class FeatureSkew(Frozen):
    """Per-sensor feature heterogeneity: each sensor draws its own calibration."""

    gain_sigma: NonNegativeFloat = 0.15  # per-channel gain = exp(N(0, gain_sigma))
    bias_sigma: NonNegativeFloat = 0.2  # per-channel additive bias ~ N(0, bias_sigma)
    rotation_deg: NonNegativeFloat = 15.0  # axis rotation of each channel triple, angle ~ U(-r, r) per axis
    noise_min: NonNegativeFloat = 0.1  # per-sensor noise level ~ U(noise_min, noise_max)
    noise_max: NonNegativeFloat = 0.4

    @model_validator(mode="after")
    def _noise_range(self) -> "FeatureSkew":
        if self.noise_max < self.noise_min:
            raise ValueError("noise_max must be at least noise_min")
        return self


class SyntheticData(Frozen):
    """Seeded human-activity-like windows: class-specific sinusoid mixtures plus coloured noise."""

    kind: Literal["synthetic"] = "synthetic"
    classes: Annotated[int, Field(ge=2, le=1000)] = 6
    channels: Annotated[int, Field(ge=1, le=1024)] = 6
    window: Annotated[int, Field(ge=4, le=100_000)] = 32
    samples_per_sensor: PositiveInt = 64  # median samples per sensor
    quantity_sigma: NonNegativeFloat = 0.5  # lognormal σ of per-sensor sample counts; 0 = all equal
    min_samples: PositiveInt = 4  # floor of a sensor's sample count
    label_alpha: PositiveFloat = 0.5  # α of the per-sensor Dirichlet(α·1) class proportions
    feature_skew: FeatureSkew = FeatureSkew()
    test_sensors: PositiveInt = 50  # unseen sensors that make up the held-out test set
    test_samples: PositiveInt = 2000  # held-out samples, class-balanced
    preprocess: Preprocess = Preprocess()


class ParquetData(Frozen):
    """The user's own sensor data, in raysim's Parquet schema (see README)."""

    kind: Literal["parquet"]
    path: str  # training samples; relative paths are resolved against the scenario file
    test_path: str  # held-out samples for evaluation, same schema
    preprocess: Preprocess = Preprocess()


DataConfig = Annotated[Union[SyntheticData, ParquetData], Field(discriminator="kind")]


class AlwaysOnline(Frozen):
    """The sensor is online whenever it is asked."""

    kind: Literal["always"] = "always"


class OnOffAvailability(Frozen):
    """An alternating on/off process with exponential durations, seeded per sensor.

    A sensor starts on with probability mean_on_s / (mean_on_s + mean_off_s)
    (the process's stationary distribution).
    """

    kind: Literal["onoff"]
    mean_on_s: PositiveFloat
    mean_off_s: PositiveFloat


class TraceAvailability(Frozen):
    """Online intervals read from a CSV or Parquet file with columns sensor, start_s, end_s.

    Sensors of the tier that the trace does not mention are always online. With
    ``period_s`` the trace repeats every ``period_s`` virtual seconds.
    """

    kind: Literal["trace"]
    path: str  # relative paths are resolved against the scenario file
    period_s: Optional[PositiveFloat] = None


AvailabilityConfig = Annotated[
    Union[AlwaysOnline, OnOffAvailability, TraceAvailability], Field(discriminator="kind")
]


class Tier(Frozen):
    """A device/network profile shared by a fraction of the fleet.

    Each sensor of the tier draws its own speed and bandwidths once, from its
    own stream: value = median × exp(σ·z), z ~ N(0, 1). Each task's compute
    time is further multiplied by exp(jitter_sigma·z) drawn per task.
    """

    name: str
    share: Annotated[float, Field(gt=0, le=1)]
    # Median compute cost of one sample in one local epoch, or derive it from the device's speed:
    seconds_per_sample: Optional[PositiveFloat] = None
    ops_per_s: Optional[PositiveFloat] = None  # sustained training FLOP/s; cost = model's training FLOPs / ops_per_s
    model: Optional[MODELS.config_union()] = None  # type: ignore[valid-type]  # this tier's model; None = scenario's
    lr: Optional[PositiveFloat] = None  # this tier's local learning rate; None = training.lr (schedules scale it)
    local_epochs: Optional[PositiveInt] = None  # this tier's local epochs; None = training.local_epochs
    speed_sigma: NonNegativeFloat = 0.0  # per-sensor lognormal spread of seconds_per_sample
    jitter_sigma: NonNegativeFloat = 0.0  # per-task lognormal jitter of the compute time
    up_mbps: PositiveFloat
    down_mbps: PositiveFloat
    bandwidth_sigma: NonNegativeFloat = 0.0  # per-sensor lognormal spread of up_mbps and down_mbps
    latency_ms: NonNegativeFloat = 0.0
    loss: Annotated[float, Field(ge=0, lt=1)] = 0.0  # probability that one transfer attempt is lost
    retransmit_timeout_s: NonNegativeFloat = 1.0  # virtual time a lost attempt costs before the retry
    max_retries: NonNegativeInt = 3  # retries per transfer; after that the update is lost
    availability: AvailabilityConfig = AlwaysOnline()

    @model_validator(mode="before")
    @classmethod
    def _availability_kind(cls, raw: Any) -> Any:
        return _default_tag(_default_tag(raw, "availability", "kind", "always"), "model", "name", "mlp")

    @model_validator(mode="after")
    def _one_speed(self) -> "Tier":
        if (self.seconds_per_sample is None) == (self.ops_per_s is None):
            raise ValueError(f"tier {self.name} needs exactly one of seconds_per_sample (seconds per sample and "
                             f"epoch) and ops_per_s (the device's training FLOP/s)")
        return self


def _default_tiers() -> tuple[Tier, ...]:
    return (Tier(name="default", share=1.0, seconds_per_sample=0.001, up_mbps=10, down_mbps=10, latency_ms=50),)


class Fleet(Frozen):
    sensors: PositiveInt = 1000
    data: DataConfig = SyntheticData()
    tiers: tuple[Tier, ...] = Field(default_factory=_default_tiers, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _data_kind(cls, raw: Any) -> Any:
        return _default_tag(raw, "data", "kind", "synthetic")

    @model_validator(mode="after")
    def _tiers_partition_the_fleet(self) -> "Fleet":
        total = sum(t.share for t in self.tiers)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"tier shares must add up to 1, they add up to {total:g}")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        return self


# --------------------------------------------------------------------------- training


class LrSchedule(Frozen):
    """Local learning rate by round (sync) or by the model version a task trains from (async).

    constant: η_r = lr;  step: η_r = lr · gamma^floor((r − 1) / every);
    cosine: η_r = min_lr + ½(lr − min_lr)(1 + cos(π (r − 1) / rounds)).
    """

    kind: Literal["constant", "step", "cosine"] = "constant"
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9  # step: factor per period
    every: PositiveInt = 3  # step: rounds per period
    min_lr: NonNegativeFloat = 0.0  # cosine: the rate it decays to

    def at(self, lr: float, round_index: int, rounds: int) -> float:
        """η for round (or model version + 1) ``round_index`` ≥ 1 of ``rounds``."""
        done = max(round_index - 1, 0)
        if self.kind == "step":
            return lr * self.gamma ** (done // self.every)
        if self.kind == "cosine":
            return self.min_lr + 0.5 * (lr - self.min_lr) * (1.0 + math.cos(math.pi * min(done / rounds, 1.0)))
        return lr


class EarlyStopping(Frozen):
    """Stop a sensor's local training once its epoch loss has not improved for ``patience`` epochs.

    After each local epoch, the mean of that epoch's batch losses is compared
    with the best so far; less than ``min_delta`` better counts as no
    improvement. The virtual clock charges only the steps taken.
    """

    patience: PositiveInt = 1
    min_delta: NonNegativeFloat = 0.0


class Training(Frozen):
    rounds: PositiveInt = 20
    local_epochs: PositiveInt = 1
    batch_size: Union[PositiveInt, Literal["full"]] = 16  # "full" = one batch of all the sensor's samples
    lr: PositiveFloat = 0.05
    weight_decay: NonNegativeFloat = 0.0
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # ρ of local SGD momentum (0 = plain SGD)
    lr_schedule: LrSchedule = LrSchedule()
    early_stopping: Optional[EarlyStopping] = None  # None = every sensor runs all its local epochs

    @model_validator(mode="after")
    def _schedule_below_lr(self) -> "Training":
        if self.lr_schedule.kind == "cosine" and self.lr_schedule.min_lr >= self.lr:
            raise ValueError(f"lr_schedule.min_lr ({self.lr_schedule.min_lr:g}) must be below lr ({self.lr:g})")
        return self
    vectorized: bool = True  # train an actor's cohort as one batched computation; False = per-sensor loop


class Stragglers(Frozen):
    """What a synchronous round does about slow sensors.

    wait-all waits for every delivered update; deadline drops updates arriving
    more than ``deadline_s`` after the round starts; over-commit selects
    ceil(cohort × overcommit) sensors and keeps the first ``cohort`` to arrive.
    With any policy, a round that accepts fewer than
    ceil(min_completion × cohort) updates is skipped: the model is unchanged,
    nothing is trained, and the round is recorded as skipped.
    """

    policy: Literal["wait-all", "deadline", "over-commit"] = "wait-all"
    deadline_s: Optional[PositiveFloat] = None
    overcommit: Annotated[float, Field(ge=1.0, le=10.0)] = 1.3
    min_completion: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0

    def selected(self, cohort: int) -> int:
        """Sensors a round selects for a cohort of ``cohort``: ceil(cohort × overcommit) with over-commit."""
        return math.ceil(cohort * self.overcommit) if self.policy == "over-commit" else cohort

    @model_validator(mode="after")
    def _policy_fields(self) -> "Stragglers":
        if self.policy == "deadline" and self.deadline_s is None:
            raise ValueError("policy deadline needs deadline_s (virtual seconds from the round's start)")
        if self.policy != "deadline" and self.deadline_s is not None:
            raise ValueError(f"deadline_s is only used by policy deadline, not {self.policy}")
        return self


class Selection(Frozen):
    """Which online sensors a synchronous round selects (see raysim/selection.py)."""

    policy: Literal["uniform", "stratified", "availability", "oort"] = "uniform"
    shares: Optional[dict[str, Annotated[float, Field(ge=0)]]] = None  # stratified: tier → cohort share
    predictor: Literal["model", "oracle"] = "model"  # availability: the tiers' models, or the simulated future
    min_probability: Annotated[float, Field(gt=0, le=1)] = 0.9  # availability, model: P(stays online) to qualify
    exploration: Annotated[float, Field(ge=0, le=1)] = 0.2  # oort: share of the cohort for sensors never tried
    preferred_duration_s: Optional[PositiveFloat] = None  # oort: T; None = the fleet's median expected task time
    slow_penalty: NonNegativeFloat = 2.0  # oort: α of the (T / t_i)^α penalty


class Aggregation(Frozen):
    """How updates become the next global model: validate → clip → aggregate → server optimizer."""

    mode: Literal["sync", "async"] = "sync"
    strategy: STRATEGIES.config_union() = Field(default_factory=lambda: STRATEGIES.entry("fedavg").config())  # type: ignore[valid-type]
    cohort: PositiveInt = 100  # sync: sensors per round (async: concurrency is the strategy's)
    stragglers: Stragglers = Stragglers()
    selection: Selection = Selection()
    validation: Validation = Validation()
    clip_norm: Optional[PositiveFloat] = None  # norm bounding: each update scaled to L2 norm ≤ clip_norm
    aggregator: AGGREGATORS.config_union() = Field(default_factory=lambda: AGGREGATORS.entry("mean").config())  # type: ignore[valid-type]
    server_optimizer: SERVER_OPTIMIZERS.config_union() = Field(  # type: ignore[valid-type]
        default_factory=lambda: SERVER_OPTIMIZERS.entry("sgd").config())

    @model_validator(mode="before")
    @classmethod
    def _strategy_name(cls, raw: Any) -> Any:
        default = "fedbuff" if isinstance(raw, dict) and raw.get("mode") == "async" else "fedavg"
        raw = _default_tag(raw, "strategy", "name", default)
        raw = _default_tag(raw, "aggregator", "name", "mean")
        return _default_tag(raw, "server_optimizer", "name", "sgd")

    @model_validator(mode="after")
    def _aggregation_fits(self) -> "Aggregation":
        updates_per_step = self.cohort if self.mode == "sync" else getattr(self.strategy, "buffer_size", 1)
        if self.strategy.name == "fedasync" and (self.aggregator.name != "mean" or self.validation.filters):
            raise ValueError("fedasync applies one update per server step: it takes aggregator mean and no "
                             "validation filters (use fedbuff to aggregate robustly)")
        needed = AGGREGATORS.build(self.aggregator).min_updates()
        if updates_per_step < needed:
            what = "aggregation.cohort" if self.mode == "sync" else "aggregation.strategy.buffer_size"
            raise ValueError(f"aggregator {self.aggregator.name} needs at least {needed} updates per step with "
                             f"these settings; {what} is {updates_per_step}")
        if self.server_optimizer.name != "sgd" and getattr(self.strategy, "server_lr", 1.0) != 1.0:
            raise ValueError(f"set the server learning rate in server_optimizer.lr, not strategy.server_lr, "
                             f"when using server optimizer {self.server_optimizer.name}")
        return self

    @model_validator(mode="after")
    def _strategy_fits_mode(self) -> "Aggregation":
        modes = type(self.strategy).modes
        if self.mode not in modes:
            names = [n for n in STRATEGIES.names() if self.mode in STRATEGIES.entry(n).config.modes]
            raise ValueError(
                f"strategy {self.strategy.name} runs in {' or '.join(modes)} mode, not {self.mode}; "
                f"{self.mode} strategies are {', '.join(names)}"
            )
        return self


class Compression(Frozen):
    """How sensors encode their updates for the uplink; the byte counts and upload times follow the payload."""

    uplink: CODECS.config_union() = Field(default_factory=lambda: CODECS.entry("none").config())  # type: ignore[valid-type]
    error_feedback: bool = False  # keep what each sensor's codec dropped and add it to its next update
    # How the coordinator encodes the global model for the downlink: none, fp16 or int8 (deterministic).
    downlink: CODECS.config_union() = Field(default_factory=lambda: CODECS.entry("none").config())  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def _codec_name(cls, raw: Any) -> Any:
        raw = _default_tag(raw, "uplink", "name", "none")
        return _default_tag(raw, "downlink", "name", "none")

    @model_validator(mode="after")
    def _downlink_codec(self) -> "Compression":
        name = self.downlink.name
        if name not in DOWNLINK_CODECS or getattr(self.downlink, "stochastic", False):
            raise ValueError(f"downlink codec {name}{' (stochastic)' if name == 'int8' else ''} is not available: "
                             f"the downlink carries the model itself, which every sensor must receive alike, so it "
                             f"takes a deterministic dense codec: {', '.join(DOWNLINK_CODECS)}")
        if self.error_feedback and self.uplink.name == "none":
            raise ValueError("error_feedback needs a lossy uplink codec; with uplink none nothing is dropped")
        return self


DOWNLINK_CODECS = ("none", "fp16", "int8")


class ClusterSection(Frozen):
    client_actors: Union[PositiveInt, Literal["auto"]] = "auto"
    sensors_per_actor: Union[PositiveInt, Literal["auto"]] = "auto"
    num_cpus: PositiveFloat = 1.0  # per client actor
    num_gpus: NonNegativeFloat = 0.0  # per client actor; fractions share a GPU
    # Custom Ray resources per client actor, e.g. {sensor_host: 0.25} to use only nodes that declare
    # `sensor_host` (see cluster.yaml), four actors per such node.
    resources: dict[str, PositiveFloat] = {}
    # Where Ray puts client actors: "spread" over as many nodes as possible, or Ray's "default" packing.
    scheduling: Literal["spread", "default"] = "spread"
    # How sensors are spread over client actors: "work" balances each actor's expected training work
    # (largest first, to the least-loaded actor); "contiguous" gives each actor a block of sensor ids.
    balance: Literal["work", "contiguous"] = "work"
    # Sensors trained in one batched computation on a client actor; bounds its memory whatever the cohort.
    sensors_per_batch: PositiveInt = 256
    # For aggregations that are a weighted mean of the updates, each client actor sums its own share and
    # sends one vector instead of one update per sensor. Results agree within float rounding either way.
    aggregate_on_actors: bool = True
    # A client actor's training call that has not answered after this many wall-clock seconds is given up:
    # the actor is replaced and the call trained again (its results do not change).
    call_timeout_s: PositiveFloat = 600.0

    @model_validator(mode="after")
    def _gpu_fraction(self) -> "ClusterSection":
        if self.num_gpus > 1 and not float(self.num_gpus).is_integer():
            raise ValueError("num_gpus above 1 must be a whole number of GPUs")
        return self


class Fault(Frozen):
    """A failure injected into a run, to exercise recovery: ``{kind, round or at_s, actors}``.

    ``kill_actor`` ends the listed client actors' processes in the middle of
    the round's training call (one without a task that round is killed then
    and found dead at its next call); ``slow_actor`` makes them sleep ``seconds`` of
    wall-clock time inside that round's call. The coordinator replaces an actor
    that dies or does not answer within ``cluster.call_timeout_s`` with a new
    one for the same sensors and trains the call again from the same inputs.
    """

    kind: Literal["kill_actor", "slow_actor"]
    round: Optional[PositiveInt] = None  # the sync round (or async server step) it happens in, or
    at_s: Optional[NonNegativeFloat] = None  # the first one that starts at or after this virtual time
    actors: tuple[NonNegativeInt, ...] = (0,)  # client actor indices (placement.json lists them)
    seconds: NonNegativeFloat = 0.0  # slow_actor: wall-clock delay

    @model_validator(mode="after")
    def _one_moment(self) -> "Fault":
        if (self.round is None) == (self.at_s is None):
            raise ValueError("a fault happens at a round or at a virtual time at_s: give exactly one")
        return self


class Personalization(Frozen):
    """FedPer-style personal layers, and evaluation of every sensor's own model on its own held-out data.

    ``layers`` names parameters (by name prefix, e.g. ``layers.2.``) that stay
    on each sensor: never uploaded, never aggregated; ``head`` is each model's
    classifier. ``layers: []`` keeps everything shared and only adds the
    per-sensor evaluation. Each sensor keeps a seeded ⌊holdout·n⌋ of its
    samples aside (never trained on) to measure its personalized accuracy.
    """

    layers: tuple[str, ...] = ("head",)
    holdout: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2


class Proxy(Frozen):
    """The public unlabeled proxy set that distillation and the MMD term use.

    Synthetic fleets draw it from the fleet generator (unseen sensors, labels
    dropped); Parquet fleets read ``path`` (raysim's schema; labels ignored).
    """

    samples: Annotated[int, Field(ge=1, le=1_000_000)] = 512  # P: proxy samples (a Parquet file's first P)
    batch: PositiveInt = 32  # proxy samples each local step adds
    path: Optional[str] = None  # Parquet fleets: the proxy set's file; relative to the scenario file


class Distillation(Frozen):
    """Knowledge exchange across architectures through soft labels on the proxy set.

    Each step the coordinator forms a consensus: P·K logits on the P proxy
    samples, the mean of the sensors' local models' logits (``teacher:
    local``, uploaded after local training as in FedMD) or of every
    architecture's global model's (``teacher: global``, an ensemble of the
    architectures as in FedDF). The consensus goes down with the next model
    (``logits`` precision), and each local step adds ``weight`` ×
    T²·KL(softmax(consensus/T) ‖ softmax(student/T)) over a proxy batch.
    Each architecture keeps its own global model, averaged over its own sensors.
    """

    temperature: PositiveFloat = 3.0
    weight: NonNegativeFloat = 1.0  # α of the distillation term
    logits: Literal["float32", "float16"] = "float32"  # precision of the logits on the wire
    # Whose logits make the consensus: "local", every sensor's freshly trained local model (uploaded,
    # FedMD); "global", every architecture's global model, computed on the coordinator after each step
    # (an ensemble of the architectures, as in FedDF; nothing extra goes up).
    teacher: Literal["local", "global"] = "local"
    # Tiers whose architectures teach (None = every tier). Each architecture learns from the consensus of
    # the teaching architectures other than itself (from itself only when the fleet has one architecture);
    # one with no other teacher trains without the distillation term.
    teachers: Optional[tuple[str, ...]] = None
    warmup: NonNegativeInt = 0  # rounds (async: server steps) each architecture trains alone before distilling


class Alignment(Frozen):
    """Feature-alignment regularizers, added to every sensor's local loss (0 = off)."""

    mmd_weight: NonNegativeFloat = 0.0  # MMD² between the sensor's and the global model's features on a proxy batch
    moon_weight: NonNegativeFloat = 0.0  # MOON model-contrastive term (Li, He & Song, CVPR 2021)
    moon_temperature: PositiveFloat = 0.5


class Contribution(Frozen):
    """Per-sensor contribution scores each synchronous round, and optional trust-weighted aggregation
    (see raysim/contribution.py)."""

    method: Literal["loo", "shapley", "loss", "cosine"] = "loo"
    max_exact: PositiveInt = 50  # loo / shapley only for rounds with at most this many valid updates
    fallback: Literal["cosine", "loss"] = "cosine"  # for larger rounds
    permutations: PositiveInt = 20  # shapley: random orders per round
    validation_samples: Annotated[int, Field(ge=1, le=100_000)] = 500  # held-out labelled windows (not the test set)
    validation_path: Optional[str] = None  # Parquet fleets: the validation file (raysim's schema)
    every: PositiveInt = 1  # score every this many rounds
    trust: bool = False  # weight aggregation by each sensor's trust (an average of [score > 0])
    trust_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5


class SensorFault(Frozen):
    """A sudden fault of a seeded share of the sensors, from ``round`` on."""

    fraction: Annotated[float, Field(ge=0, le=1)] = 0.1
    round: PositiveInt = 1
    kind: Literal["stuck", "noisy"] = "stuck"
    noise: NonNegativeFloat = 1.0  # noisy: σ of the added noise


class DriftDetection(Frozen):
    """Per-sensor drift detection on the coordinator: a two-sample KS test per channel against the
    sensor's first report, Bonferroni-corrected over channels (see raysim/drift.py)."""

    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.01  # false-alarm rate of one sensor's test
    samples: Annotated[int, Field(ge=8, le=4096)] = 64  # values per channel a sensor reports with each update


class Drift(Frozen):
    """Sensor data drifting over rounds, and its detection (see raysim/drift.py); sync runs."""

    gain_walk: NonNegativeFloat = 0.0  # σ per round of each sensor's per-channel log-gain random walk
    offset_walk: NonNegativeFloat = 0.0  # σ per round of each sensor's per-channel offset random walk
    prior_walk: NonNegativeFloat = 0.0  # σ per round of each sensor's per-class log-weight random walk
    fault: Optional[SensorFault] = None
    detection: Optional[DriftDetection] = None  # None = no detection


class Checkpoint(Frozen):
    """How often a synchronous run saves what ``raysim run --resume RUN_DIR`` needs to continue it."""

    every: PositiveInt = 10  # rounds between checkpoints (an interrupted run also saves one when it stops)


class Logging(Frozen):
    eval_every: PositiveInt = 1  # evaluate every this many rounds (sync) or server steps (async)
    target_accuracy: Optional[Annotated[float, Field(gt=0, le=1)]] = None  # for time- and bytes-to-accuracy
    tensorboard: bool = True
    progress: bool = True  # live progress bar on the terminal


# Strategies whose server step is one (uniformly weighted) mean of the deltas, which DP-FedAvg's noise calibrates to.
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")


def _privacy_fits(privacy: Privacy, aggregation: Aggregation) -> None:
    """The aggregation settings central or local DP can account for; ValueError naming the conflict."""
    if aggregation.strategy.name == "scaffold":
        raise ValueError("cannot be combined with strategy scaffold: its control variates leave the "
                         "sensors without clipping or noise")
    if privacy.mode == "local":
        return
    needs = "central DP (DP-FedAvg) needs"
    if aggregation.mode != "sync":
        raise ValueError(f"{needs} mode sync: its accounting treats each round as a subsampled Gaussian mechanism, "
                         f"which asynchronous arrivals are not (use privacy.mode local with async aggregation)")
    if aggregation.strategy.name not in CENTRAL_DP_STRATEGIES:
        raise ValueError(f"{needs} strategy {' or '.join(CENTRAL_DP_STRATEGIES)}, not {aggregation.strategy.name}: "
                         f"its noise is calibrated to one mean of clipped updates")
    if aggregation.aggregator.name != "mean":
        raise ValueError(f"{needs} aggregator mean, not {aggregation.aggregator.name}: the noise is calibrated to "
                         f"a sum of clipped updates (use privacy.mode local with robust aggregators)")
    if aggregation.clip_norm is not None:
        raise ValueError("set the clipping bound in privacy.clip_norm, not aggregation.clip_norm, with central DP")
    if aggregation.validation.filters:
        raise ValueError(f"{needs} no validation filters: an update's rejection would depend on the others' "
                         f"updates, which the sensitivity bound does not allow")
    try:
        privacy.update_noise_multiplier(aggregation.cohort)
    except ValueError as exc:
        raise ValueError(f"adaptive: {exc}") from None


def _alignment_fits(scenario: "Scenario") -> None:
    """Architectures, personal layers, distillation, alignment terms and client selection settings the rest
    of the scenario allows."""
    models = {json.dumps((t.model or scenario.model).model_dump(mode="json"), sort_keys=True)
              for t in scenario.fleet.tiers}
    several = len(models) > 1
    personal = scenario.personalization is not None and bool(scenario.personalization.layers)
    what = ("several model architectures" if several else "") + (" and " if several and personal else "") + (
        "personal layers" if personal else "")
    if several or personal:
        if scenario.aggregation.strategy.name == "scaffold":
            raise ValueError(f"strategy scaffold cannot be combined with {what}: its control variates span one "
                             f"whole shared model")
        if scenario.privacy is not None and scenario.privacy.mode == "central":
            raise ValueError(f"central DP cannot be combined with {what}: its noise is calibrated to one shared "
                             f"model (use privacy.mode local)")
    names = [t.name for t in scenario.fleet.tiers]
    selection = scenario.aggregation.selection
    strange = [n for n in (selection.shares or {}) if n not in names]
    if strange:
        raise ValueError(f"aggregation.selection.shares: {', '.join(map(repr, strange))} is not a tier; the tiers "
                         f"are {', '.join(names)}")
    if selection.shares is not None and not sum(selection.shares.values()) > 0:
        raise ValueError("aggregation.selection.shares: at least one tier needs a positive share")
    if scenario.drift is not None and scenario.aggregation.mode == "async":
        raise ValueError("drift changes a sensor's data by round: it needs aggregation.mode sync")
    if scenario.training.early_stopping is not None and scenario.aggregation.mode == "async":
        raise ValueError("training.early_stopping needs aggregation.mode sync: an async schedule fixes each "
                         "task's arrival before it trains")
    if selection.policy in ("stratified", "oort") and scenario.aggregation.mode == "async":
        raise ValueError(f"aggregation.selection.policy {selection.policy} chooses a synchronous round's cohort; "
                         f"async runs take uniform or availability")
    contribution = scenario.contribution
    if contribution is not None:
        if scenario.aggregation.mode != "sync" or several or personal:
            raise ValueError("contribution scores a synchronous round's updates of one shared model: it needs "
                             "aggregation.mode sync, one model architecture and no personal layers")
        if scenario.privacy is not None and scenario.privacy.mode == "central":
            raise ValueError("contribution cannot be combined with central DP: scores would look at each update")
        if scenario.fleet.data.kind == "parquet" and contribution.validation_path is None:
            raise ValueError("contribution.validation_path: a Parquet fleet needs a labelled validation file "
                             "(raysim's schema), kept apart from the test set")
    unknown = [n for n in (scenario.distillation.teachers or ()) if n not in names] if scenario.distillation else []
    if unknown:
        raise ValueError(f"distillation.teachers: {', '.join(map(repr, unknown))} is not a tier; the tiers are "
                         f"{', '.join(names)}")
    needs_proxy = scenario.distillation is not None or scenario.alignment.mmd_weight > 0
    data = scenario.fleet.data
    if needs_proxy and data.kind == "parquet" and scenario.proxy.path is None:
        raise ValueError("proxy.path: distillation and the MMD term need a public proxy set; with Parquet data "
                         "give its file (raysim's schema, labels ignored)")
    if scenario.proxy.path is not None and data.kind != "parquet":
        raise ValueError("proxy.path is for Parquet fleets; a synthetic fleet draws its proxy set from the generator")


class Scenario(Frozen):
    """A whole run, typed and frozen; ``load_scenario`` is the way to make one."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = "scenario"
    seed: NonNegativeInt = 0
    fleet: Fleet = Fleet()
    model: MODELS.config_union() = Field(default_factory=lambda: MODELS.entry("mlp").config())  # type: ignore[valid-type]
    training: Training = Training()
    aggregation: Aggregation = Aggregation()
    compression: Compression = Compression()
    attack: Optional[Attack] = None  # a seeded share of the fleet is malicious
    privacy: Optional[Privacy] = None  # differential privacy (DP-FedAvg central, or local noise); None = off
    cluster: ClusterSection = ClusterSection()
    logging: Logging = Logging()
    checkpoint: Checkpoint = Checkpoint()
    faults: tuple[Fault, ...] = ()
    personalization: Optional[Personalization] = None  # None = no personal layers, no per-sensor evaluation
    distillation: Optional[Distillation] = None  # None = architectures learn apart
    alignment: Alignment = Alignment()
    proxy: Proxy = Proxy()
    contribution: Optional[Contribution] = None  # None = no contribution scores
    drift: Optional[Drift] = None  # None = every sensor's data stays as it is

    # Directory relative data paths are resolved against (the scenario file's folder).
    base_dir: str = Field(default=".", exclude=True)
    source: str = Field(default="<dict>", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _model_name(cls, raw: Any) -> Any:
        return _default_tag(raw, "model", "name", "mlp")

    @model_validator(mode="after")
    def _combinations(self) -> "Scenario":
        strategy = self.aggregation.strategy
        if self.aggregation.mode == "async" and strategy.concurrency > self.fleet.sensors:
            raise ValueError(
                f"aggregation.strategy.concurrency ({strategy.concurrency}) is larger than fleet.sensors "
                f"({self.fleet.sensors}): a sensor never has two tasks in flight"
            )
        if self.aggregation.mode == "sync" and self.aggregation.cohort > self.fleet.sensors:
            raise ValueError(
                f"aggregation.cohort ({self.aggregation.cohort}) is larger than fleet.sensors ({self.fleet.sensors})"
            )
        if self.privacy is not None:
            try:
                _privacy_fits(self.privacy, self.aggregation)
            except ValueError as exc:
                raise ValueError(f"privacy: {exc}") from None
        _alignment_fits(self)
        c = self.cluster
        if c.client_actors != "auto" and c.sensors_per_actor != "auto":
            if c.client_actors * c.sensors_per_actor < self.fleet.sensors:
                raise ValueError(
                    f"cluster.client_actors × cluster.sensors_per_actor = {c.client_actors * c.sensors_per_actor} "
                    f"cannot host fleet.sensors = {self.fleet.sensors}"
                )
        return self

    def expected_cohort(self) -> int:
        """m: updates one sync round (or async server step) aggregates when every sensor delivers."""
        if self.aggregation.mode == "sync":
            return self.aggregation.cohort
        return max(getattr(self.aggregation.strategy, "buffer_size", 1), 1)

    def tier_epochs(self) -> list[int]:
        """Each tier's local epochs: its own ``local_epochs``, or ``training.local_epochs``."""
        return [t.local_epochs or self.training.local_epochs for t in self.fleet.tiers]

    def tier_lr_scale(self) -> list[float]:
        """Each tier's local learning rate relative to ``training.lr`` (its own ``lr``, or 1)."""
        return [(t.lr or self.training.lr) / self.training.lr for t in self.fleet.tiers]

    def resolve_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict[str, Any]:
        """The resolved scenario (every default filled in) as plain YAML-ready data."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def load_scenario(
    path_or_dict: str | Path | dict[str, Any] | Scenario, overrides: list[str] | dict[str, Any] | None = None
) -> Scenario:
    """Load, override and validate a scenario; raise :class:`ScenarioError` on any problem.

    ``overrides`` are ``"a.b=value"`` strings (values parsed as YAML, so
    ``training.rounds=3`` is an int and ``model.hidden=[32,16]`` a list) or a
    mapping of dotted paths to values.
    """
    if isinstance(path_or_dict, Scenario):
        if not overrides:
            return path_or_dict
        source, base_dir = path_or_dict.source, path_or_dict.base_dir
        raw = path_or_dict.to_dict()
    elif isinstance(path_or_dict, dict):
        source, base_dir = "<dict>", "."
        raw = _deep_copy(path_or_dict)
    else:
        path = Path(path_or_dict)
        source, base_dir = str(path), str(path.resolve().parent)
        raw = _read_yaml(path)
    if overrides:
        source = f"{source} (with --set overrides)"
        for dotted, value in _parse_overrides(overrides, source):
            _apply_override(raw, dotted, value, source)
    raw = {**raw, "base_dir": base_dir, "source": source}
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(_describe(exc, source)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ScenarioError(f"scenario file {path} does not exist.") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"scenario file {path} cannot be read as text: {exc}.") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(f"scenario file {path} is not valid YAML{where}: {problem}.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ScenarioError(f"scenario file {path} must hold a mapping of sections (name, fleet, model, ...), "
                            f"got a {type(raw).__name__}.")
    for key in ("base_dir", "source"):
        if key in raw:
            raise ScenarioError(f"scenario file {path}: {key!r} is not a scenario key.")
    return raw


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_deep_copy(v) for v in value]
    return value


def _parse_overrides(overrides: list[str] | dict[str, Any], source: str) -> list[tuple[str, Any]]:
    if isinstance(overrides, dict):
        return list(overrides.items())
    parsed = []
    for item in overrides:
        dotted, sep, text = item.partition("=")
        if not sep or not dotted.strip():
            raise ScenarioError(f"{source}: --set {item!r} must have the form a.b=value, e.g. training.rounds=3.")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        parsed.append((dotted.strip(), value))
    return parsed


def _apply_override(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Set ``dotted`` (``a.b.c``; a list item as ``a.items[2].c``) in ``raw`` to ``value``."""
    steps: list[str | int] = []
    for key in dotted.split("."):
        name, bracket, rest = key.partition("[")
        steps.append(name)
        while bracket:
            index, _, rest = rest.partition("]")
            if not index.strip().isdigit():
                raise ScenarioError(f"{source}: --set {dotted}: {key!r} must index a list with a whole number, "
                                    f"e.g. fleet.tiers[0].lr=0.3.")
            steps.append(int(index))
            _, bracket, rest = rest.partition("[")
    node: Any = raw
    for depth, step in enumerate(steps[:-1]):
        where = _step_path(steps[: depth + 1])
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                size = f"has {len(node)} items" if isinstance(node, list) else "is not a list in the scenario"
                raise ScenarioError(f"{source}: --set {dotted}: {_step_path(steps[:depth])} {size}, so it has no "
                                    f"item [{step}].")
            child = node[step]
        else:
            child = node.get(step) if isinstance(node, dict) else None
            if child is None:
                child = [] if isinstance(steps[depth + 1], int) else {}
                node[step] = child
        if not isinstance(child, (dict, list)):
            raise ScenarioError(f"{source}: --set {dotted}: {where} is not a section, so it has no key "
                                f"{steps[depth + 1]!r}.")
        node = child
    last = steps[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ScenarioError(f"{source}: --set {dotted}: {_step_path(steps[:-1])} has no item [{last}].")
    elif not isinstance(node, dict):
        raise ScenarioError(f"{source}: --set {dotted}: {_step_path(steps[:-1])} is a list; give an item index.")
    node[last] = value


def _step_path(steps: list[str | int]) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else ("." if i else "") + s for i, s in enumerate(steps))


# --------------------------------------------------------------------------- error messages


def _describe(exc: ValidationError, source: str) -> str:
    """One paragraph naming the file, each failing field path and what was expected."""
    by_path: dict[str, list[str]] = {}
    errors = exc.errors(include_url=False)
    for error in errors:
        if error["type"] == "too_short" and any(len(e["loc"]) > len(error["loc"]) and e["loc"][: len(error["loc"])] == error["loc"] for e in errors):
            continue  # a list whose items failed is also "too short"; the item errors say it all
        path, fields = _field_path(error["loc"])
        texts = by_path.setdefault(path, [])
        text = _explain(error, path, fields)
        if text not in texts:
            texts.append(text)
    # Alternatives of one union field fail together: say them as one expectation.
    problems = [texts[0] if len(texts) == 1 else _either(texts) for texts in by_path.values()]
    head = f"invalid scenario {source}: " if len(problems) == 1 else f"invalid scenario {source} ({len(problems)} problems): "
    return head + "; ".join(problems) + "."


def _either(texts: list[str]) -> str:
    path = texts[0].split(": ", 1)[0]
    wants, got = [], ""
    for text in texts:
        body = text.split(": ", 1)[1]
        want, sep, given = body.partition(" (got ")
        wants.append(want)
        got = f" (got {given}" if sep else got
    return f"{path}: {' or '.join(wants)}{got}"


_TYPE_TAGS = {"int", "float", "str", "bool", "list", "tuple", "dict", "none"}


def _field_path(loc: tuple[Any, ...]) -> tuple[str, list[str] | None]:
    """Turn a pydantic location into a dotted YAML path, and list the valid keys at its end.

    Discriminated-union tags and union member names that pydantic inserts into
    locations are dropped so the path is exactly what the user wrote.
    """
    parts: list[str] = []
    node: Any = Scenario
    fields: list[str] | None = None
    for item in loc:
        options = _models_in(node)
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            node = _item_type(node)
            continue
        if any(item in m.model_fields for m in options):
            fields = sorted({f for m in options for f in m.model_fields if f not in ("base_dir", "source")})
            node = next(m.model_fields[item].annotation for m in options if item in m.model_fields)
            parts.append(str(item))
            continue
        if options and item in _tags(options):
            node = next(m for m in options if item in _tags([m]))
            continue
        if "[" in item or "-" in item or item in _TYPE_TAGS:
            continue  # a union member's name that pydantic puts in the location
        fields = sorted({f for m in options for f in m.model_fields if f not in ("base_dir", "source")}) or None
        parts.append(str(item))
    return ".".join(parts) or "(top level)", fields


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _item_type(annotation: Any) -> Any:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    args = typing.get_args(annotation)
    return args[0] if args else None


def _tags(models: list[type[BaseModel]]) -> set[str]:
    tags = set()
    for m in models:
        for key in ("name", "kind"):
            field = m.model_fields.get(key)
            if field is not None:
                tags.update(str(a) for a in typing.get_args(field.annotation))
        tags.add(m.__name__)
    return tags


def _explain(error: dict[str, Any], path: str, fields: list[str] | None) -> str:
    kind = error["type"]
    given = error.get("input")
    if kind == "extra_forbidden":
        key = path.rsplit(".", 1)[-1]
        text = f"{path}: unknown key {key!r}"
        close = difflib.get_close_matches(key, fields or [], n=1, cutoff=0.5)
        if close:
            text += f" (did you mean {close[0]!r}?)"
        elif fields:
            text += f"; valid keys here are {', '.join(fields)}"
        return text
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "union_tag_invalid":
        ctx = error.get("ctx", {})
        tag = ctx.get("tag")
        expected = ctx.get("expected_tags", "")
        text = f"{path}.{ctx.get('discriminator', '').strip(chr(39))}: unknown choice {tag!r}; expected one of {expected}"
        close = difflib.get_close_matches(str(tag), [t.strip(" '") for t in str(expected).split(",")], n=1)
        return text + (f" (did you mean {close[0]!r}?)" if close else "")
    if kind == "union_tag_not_found":
        return f"{path}: needs a {error.get('ctx', {}).get('discriminator', 'name')} key"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
        if path == "(top level)":
            return message
    text = f"{path}: {message[0].lower() + message[1:]}"
    if isinstance(given, (dict, list)):
        return text
    shown = repr(given)
    return f"{text} (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
