"""Ray start-up and connection, and placement of client actors.

Placement is decided on the driver, before any actor starts, and checked
against what the cluster has: a request the cluster can never satisfy is a
:class:`ClusterError` now rather than an actor that waits forever.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import logging
import math
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from raysim.errors import ClusterError
from raysim.scenario import Scenario


def connect(address: str | None = None) -> bool:
    """Make sure Ray is running; return True if this call started it (and so must stop it).

    Without an address and with no Ray already initialized in this process, a
    local instance sized to the machine is started.
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "configure_logging": True}
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise ClusterError(f"could not connect to {where}: {exc}") from None
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a clear message, when nothing answers at a HOST:PORT or ray://HOST:PORT address
    (Ray itself retries for minutes). "auto" is left to Ray."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r}: expected auto, HOST:PORT (the head's GCS port, 6379 by default) "
                           "or ray://HOST:10001")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(
            f"could not reach the Ray cluster at {address!r}: nothing answered at {host}:{port} within "
            f"{timeout_s:g} s ({exc.strerror or exc}). Check the address, that the head node is up (`ray status` "
            f"on it) and that port {port} is open to this machine.") from None


@dataclass(frozen=True)
class Placement:
    """How the fleet is spread: contiguous blocks of sensor positions per client actor."""

    client_actors: int
    sensors_per_actor: int  # at most; exactly, for all but the last, with contiguous shards
    num_cpus: float
    num_gpus: float
    fixed_size: bool = False  # cluster.sensors_per_actor was given: balanced shards must not exceed it either
    resources: tuple[tuple[str, float], ...] = ()  # custom Ray resources per actor, sorted by name
    scheduling: str = "spread"  # "spread" | "default"

    def actor_options(self) -> dict[str, Any]:
        """Ray options of every client actor: its CPU, GPU and custom-resource share, and its scheduling."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.scheduling == "spread":
            options["scheduling_strategy"] = "SPREAD"
        return options

    def shards(self, sensors: int) -> list[np.ndarray]:
        """Contiguous blocks of ``sensors_per_actor`` positions (``cluster.balance: contiguous``)."""
        return [
            np.arange(start, min(start + self.sensors_per_actor, sensors))
            for start in range(0, sensors, self.sensors_per_actor)
        ]

    def balanced_shards(self, work: np.ndarray) -> list[np.ndarray]:
        """Positions per actor so that every actor gets about the same total ``work`` (``cluster.balance: work``).

        Longest processing time first (Graham 1969): sensors in decreasing order
        of work, each to the actor with the least work so far (ties to the lower
        actor index), which leaves the busiest actor within one sensor's work of
        the mean. With a fixed ``sensors_per_actor``, a full actor takes no more.
        Each shard is sorted.
        """
        work = np.asarray(work, dtype=np.float64)
        actors = min(self.client_actors, len(work))
        room = [self.sensors_per_actor if self.fixed_size else len(work)] * actors
        owner = np.empty(len(work), dtype=np.int64)
        heap = [(0.0, index) for index in range(actors)]
        for position in np.argsort(-work, kind="stable").tolist():
            load, index = heapq.heappop(heap)
            owner[position] = index
            room[index] -= 1
            if room[index]:
                heapq.heappush(heap, (load + work[position], index))
        return [np.flatnonzero(owner == index) for index in range(actors)]


def expected_work(scenario: Scenario, num_samples: np.ndarray) -> np.ndarray:
    """Each sensor's training work in a task, in samples pushed through the model.

    Batched training pads every step to the batch size, so a sensor of n
    samples costs epochs × ceil(n / B) × B (epochs × n with full batches).
    """
    training = scenario.training
    n = np.asarray(num_samples, dtype=np.int64)
    if training.batch_size == "full":
        return (training.local_epochs * n).astype(np.float64)
    batch = int(training.batch_size)
    return (training.local_epochs * -(-n // batch) * batch).astype(np.float64)


def shard_sensors(scenario: Scenario, fleet: Any, placement: Placement) -> list[np.ndarray]:
    """Fleet positions hosted by each client actor, as ``cluster.balance`` asks."""
    if scenario.cluster.balance == "contiguous":
        return placement.shards(len(fleet.profiles))
    return placement.balanced_shards(expected_work(scenario, fleet.profiles.num_samples))


def plan_placement(scenario: Scenario, resources: dict[str, float]) -> Placement:
    """Resolve ``cluster.client_actors`` / ``sensors_per_actor`` ('auto' included) against the cluster."""
    section = scenario.cluster
    sensors = scenario.fleet.sensors
    cpus = float(resources.get("CPU", 0))
    gpus = float(resources.get("GPU", 0))
    if section.sensors_per_actor != "auto":
        per_actor = section.sensors_per_actor
        actors = math.ceil(sensors / per_actor)
    else:
        if section.client_actors != "auto":
            actors = section.client_actors
        else:
            # As many actors as the cluster can run at once, one per whole share it offers.
            actors = max(1, int(cpus // section.num_cpus + 1e-9))
            if section.num_gpus > 0:
                actors = min(actors, max(1, int(gpus // section.num_gpus + 1e-9)))
        actors = min(actors, sensors)
        per_actor = math.ceil(sensors / actors)
        actors = math.ceil(sensors / per_actor)
    placement = Placement(actors, per_actor, section.num_cpus, section.num_gpus,
                          fixed_size=section.sensors_per_actor != "auto",
                          resources=tuple(sorted(section.resources.items())), scheduling=section.scheduling)
    _check_fits(placement, cpus, gpus, scenario.source)
    for name, share in placement.resources:
        have = float(resources.get(name, 0))
        if actors * share > have + 1e-9:
            raise ClusterError(
                f"{scenario.source}: cluster.resources.{name}: {actors} client actors × {share:g} = {actors * share:g} "
                f"of the custom resource '{name}', but the Ray cluster has {have:g}"
                + ("" if have else f" (no node declares it; start nodes with --resources='{{\"{name}\": N}}' "
                                   "or see cluster.yaml)") + ". Lower the share or use fewer actors.")
    return placement


def _check_fits(placement: Placement, cpus: float, gpus: float, source: str) -> None:
    need_cpu = placement.client_actors * placement.num_cpus
    need_gpu = placement.client_actors * placement.num_gpus
    if need_cpu > cpus + 1e-9:
        raise ClusterError(
            f"{source}: {placement.client_actors} client actors × cluster.num_cpus {placement.num_cpus:g} = "
            f"{need_cpu:g} CPUs, but the Ray cluster has {cpus:g}. Lower cluster.num_cpus (fractions are fine, "
            f"e.g. {max(cpus / placement.client_actors, 0.001):.3g}) or raise cluster.sensors_per_actor."
        )
    if need_gpu > gpus + 1e-9:
        raise ClusterError(
            f"{source}: {placement.client_actors} client actors × cluster.num_gpus {placement.num_gpus:g} = "
            f"{need_gpu:g} GPUs, but the Ray cluster has {gpus:g}. Lower cluster.num_gpus or use fewer actors."
        )


def cluster_resources() -> dict[str, float]:
    return dict(ray.cluster_resources())


@functools.cache
def _remote(cls: type) -> Any:
    # The classes stay plain (importable, so Ray pickles them by reference); Ray wraps them here.
    return ray.remote(cls)


class _ActorPool:
    """Client actors and coordinators kept alive between runs in one Ray session, to be reloaded.

    Starting an actor costs a process and its imports (seconds, with torch);
    reloading one runs its constructor again in the same process, which resets
    every piece of its state. Only the actors of the last finished run are
    kept, and any that the next run does not reuse are killed before it starts
    new ones, so idle actors never hold resources another raysim run needs.
    They do hold their resources until then: :func:`release_idle` frees them
    (e.g. before other work on a shared cluster from the same driver).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.job: str | None = None  # the Ray job the handles belong to
        self.idle: list[tuple[tuple, Any]] = []  # (kind, handle); kind = (class name, its Ray options)
        self.leased: dict[int, tuple] = {}  # id(handle) → kind, for handles lent to a run

    def start(self, cls: type, options: dict[str, float], args_per_actor: list[tuple]) -> list[Any]:
        """One actor of ``cls`` per argument tuple: idle ones of the same kind reloaded, the rest started."""
        kind = (cls.__name__, _options_key(options))  # actors with the same options are interchangeable
        with self.lock:
            job = ray.get_runtime_context().get_job_id()
            if job != self.job:  # a new Ray session: the old handles are gone with the old one
                self.job, self.idle, self.leased = job, [], {}
            reuse = [handle for k, handle in self.idle if k == kind][: len(args_per_actor)]
            others = []  # idle actors of other classes stay for their own start() call
            for k, handle in self.idle:
                if k[0] != cls.__name__:
                    others.append((k, handle))
                elif not any(handle is r for r in reuse):
                    _kill(handle)
            self.idle = others
            handles = []
            for i, args in enumerate(args_per_actor):
                if i < len(reuse):
                    reuse[i].reload.remote(*args)  # ordered before any later call on the handle
                    handles.append(reuse[i])
                else:
                    handles.append(_remote(cls).options(**options).remote(*args))
                self.leased[id(handles[-1])] = kind
        return handles

    def release(self, handles: list[Any], keep: bool) -> None:
        """A run is over: keep its actors for the next run (``keep``), or kill them."""
        with self.lock:
            for handle in handles:
                kind = self.leased.pop(id(handle), None)
                if keep and kind is not None and ray.is_initialized():
                    self.idle.append((kind, handle))
                else:
                    _kill(handle)


def _options_key(options: dict[str, Any]) -> str:
    """A stable text of Ray actor options (a node-affinity strategy by its node and softness)."""
    def stable(value: Any) -> Any:
        if hasattr(value, "node_id") and hasattr(value, "soft"):
            return f"node:{value.node_id}:{value.soft}"
        return value

    return repr(sorted((key, stable(value)) for key, value in options.items()))


def _kill(handle: Any) -> None:
    with contextlib.suppress(Exception):
        ray.kill(handle)


ACTOR_POOL = _ActorPool()


def start_client_actors(scenario: Scenario, fleet: Any, placement: Placement, shards: list[np.ndarray]) -> list[Any]:
    """One ClientActor per shard (fleet positions, see :func:`shard_sensors`) with the placement's CPU / GPU
    share; each loads its sensors.

    Actors idle from the previous run in this Ray session are reloaded rather
    than started (see :class:`_ActorPool`); hand them back with :func:`release`.
    """
    from raysim.client import ClientActor

    return ACTOR_POOL.start(ClientActor, placement.actor_options(),
                            [(scenario, fleet, fleet.profiles.sensor_id[s]) for s in shards])


def start_coordinator(
    scenario: Scenario, fleet: Any, availability: Any, actors: list[Any], shards: list[np.ndarray],
    placement: Placement, run_dir: str,
) -> Any:
    """Start (or reload) the Coordinator actor on the driver's node (it writes the run directory there, and
    outlives the loss of any other node); it mostly waits on client actors, so it reserves no CPU."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raysim.coordinator import Coordinator

    args = (scenario, fleet, availability, actors, shards, run_dir, placement.actor_options())
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ACTOR_POOL.start(Coordinator, {"num_cpus": 0, "scheduling_strategy": here}, [args])[0]


def release_idle() -> None:
    """Kill the actors kept idle from the last run, e.g. before measuring a run in fresh processes."""
    with ACTOR_POOL.lock:
        idle, ACTOR_POOL.idle = ACTOR_POOL.idle, []
    for _, handle in idle:
        _kill(handle)


def release(handles: list[Any], keep: bool = True) -> None:
    """Hand back the actors of a finished run: kept for the next run in this Ray session, or killed."""
    ACTOR_POOL.release(handles, keep)
