"""``raysim.run``: one federated run, from scenario to run directory."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raysim import cluster
from raysim.availability import Availability
from raysim.compression import CODECS
from raysim.errors import RaysimError, RaysimWarning, RunInterrupted, ScenarioError
from raysim.architectures import build_architectures
from raysim.fleet import load_proxy, load_validation, prepare_fleet
from raysim.metrics import peak_rss_mb, reset_peak_rss, write_json
from raysim.scenario import Scenario, load_scenario

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: pa.Table  # one row per round
    global_weights: np.ndarray  # flat float32, the model's stable layout
    summary: dict[str, Any]


def default_cache_dir() -> Path:
    """Where generated fleets are cached (``RAYSIM_CACHE`` overrides)."""
    return Path(os.environ.get("RAYSIM_CACHE", Path.home() / ".cache" / "raysim"))


def default_run_dir(scenario: Scenario) -> Path:
    return Path("runs") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(
    scenario: Scenario | str | Path | dict[str, Any],
    out_dir: str | Path | None = None,
    address: str | None = None,
    *,
    progress: ProgressCallback | None = None,
    resume: str | Path | None = None,
) -> RunResult:
    """Run a scenario end to end and return its results.

    With ``resume`` (a run directory), continue that run from its last
    checkpoint instead; ``scenario`` may then be None (the run's own resolved
    scenario is used) or must resolve to the same scenario. A synchronous run
    checkpoints every ``checkpoint.every`` rounds and when Ctrl-C stops it
    (:class:`raysim.errors.RunInterrupted`).

    Everything that can be checked is checked before the run directory is
    created, so bad input never leaves a half-written run behind. In a Ray
    session this call did not start, a finished run's actors stay idle for the
    next run, which reloads them instead of starting processes;
    ``raysim.cluster.release_idle()`` frees them. Without an
    ``address`` a local Ray instance sized to the machine is started (or the
    one already initialized in this process is used); with one, raysim
    connects to that cluster. ``progress`` is called with each round's row.
    """
    checkpoint = None
    if resume is not None:
        scenario, run_dir, checkpoint = _resumable(scenario, Path(resume), out_dir)
    else:
        if not isinstance(scenario, Scenario):
            scenario = load_scenario(scenario)
        run_dir = Path(out_dir) if out_dir is not None else default_run_dir(scenario)
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise ScenarioError(f"run directory {run_dir} already exists and is not empty; choose another --out "
                                f"(or continue it with --resume {run_dir}).")
    fleet = prepare_fleet(scenario, default_cache_dir())
    availability = Availability.from_scenario(scenario, fleet.profiles)  # reads and checks any trace files
    _check_models(scenario, fleet)
    _check_privacy_budget(scenario)

    reset_peak_rss()  # the summary's driver figure is this run's peak
    started_ray = cluster.connect(address)
    created: list[Any] = []
    made_dir = False
    finished = False
    try:
        placement = cluster.plan_placement(scenario, cluster.cluster_resources())
        if checkpoint is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            made_dir = True
            (run_dir / "scenario.yaml").write_text(scenario.to_yaml())
        result = _drive(scenario, fleet, availability, placement, run_dir, created, progress, checkpoint)
        finished = True
    except RaysimError:
        if made_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        # A finished run's actors wait, reloadable, for the next run in this Ray session; any other run's die.
        cluster.release(created, keep=finished and not started_ray)
        if started_ray:
            ray.shutdown()
    return result


def _model_figures(summary: dict[str, Any], weights: np.ndarray) -> dict[str, Any]:
    """The summary's model and parameter count: the model's, or with several architectures each one's."""
    groups = summary.get("architectures", [])
    if len(groups) > 1:
        return {"model": " + ".join(f"{g['model']['name']} ({g['name']})" for g in groups),
                "parameters": int(sum(g["parameters"] for g in groups))}
    return {"model": groups[0]["model"]["name"] if groups else "?", "parameters": int(groups[0]["parameters"]) if groups
            else int(weights.size)}


def _check_models(scenario: Scenario, fleet: Any) -> None:
    """What depends on the built models: personal-layer names, and codec settings that depend on a model's
    size (top-k's k ≤ d); and a Parquet fleet's proxy file. Checked before anything starts."""
    try:
        arch = build_architectures(scenario, fleet.channels, fleet.window, fleet.classes)
    except ValueError as exc:
        raise ScenarioError(f"invalid scenario {scenario.source}: {exc}.") from None
    segments = [("uplink", g.shared_numels) for g in arch.groups] + [("downlink", arch.numels)]
    for direction, numels in segments:
        try:
            CODECS.build(getattr(scenario.compression, direction), numels)
        except ValueError as exc:
            raise ScenarioError(f"invalid scenario {scenario.source}: compression.{direction}: {exc}.") from None
    if scenario.proxy.path is not None:
        load_proxy(scenario, fleet)
    if scenario.contribution is not None and scenario.contribution.validation_path is not None:
        load_validation(scenario, fleet)


def _check_privacy_budget(scenario: Scenario) -> None:
    """A target ε that even the first round would exceed leaves nothing to run: say so before starting."""
    privacy = scenario.privacy
    if privacy is None or privacy.target_epsilon is None or privacy.on_budget != "stop":
        return
    from raysim.privacy import epsilon

    sensors = scenario.fleet.sensors
    if privacy.mode == "central":
        selected = scenario.aggregation.stragglers.selected(scenario.aggregation.cohort)
        sample_rate = min(selected, sensors) / sensors  # the least a round can cost: every sensor online
    else:
        sample_rate = 1.0
    first = epsilon(sample_rate, privacy.noise_multiplier, 1, privacy.delta)
    if first > privacy.target_epsilon:
        raise ScenarioError(
            f"invalid scenario {scenario.source}: privacy.target_epsilon: the budget ε = {privacy.target_epsilon:g} "
            f"is below what one round spends (ε = {first:.4g} at δ = {privacy.delta:g}, noise multiplier "
            f"{privacy.noise_multiplier:g}, sampling rate {sample_rate:.4g}); raise target_epsilon or "
            f"noise_multiplier, or lower the cohort.")


def _placement_record(placement: cluster.Placement, where: list[dict[str, Any]]) -> dict[str, Any]:
    """placement.json: what each client actor asked for and the node and GPUs Ray gave it."""
    return {
        "client_actors": placement.client_actors,
        "scheduling": placement.scheduling,
        "per_actor": {"num_cpus": placement.num_cpus, "num_gpus": placement.num_gpus,
                      "resources": dict(placement.resources)},
        "nodes": sorted({w["node_id"] for w in where}),
        "actors": [{"actor": index, **w} for index, w in enumerate(where)],
    }


def _resumable(scenario: Any, run_dir: Path, out_dir: Any) -> tuple[Scenario, Path, Path]:
    """The scenario, run directory and checkpoint of a run to resume, checked."""
    checkpoint = run_dir / "checkpoints" / "latest.npz"
    if out_dir is not None and Path(out_dir) != run_dir:
        raise ScenarioError(f"--resume {run_dir} continues that run in its own directory; leave out --out {out_dir}.")
    if not (run_dir / "scenario.yaml").is_file():
        raise ScenarioError(f"--resume {run_dir}: not a run directory (it has no scenario.yaml).")
    saved = load_scenario(run_dir / "scenario.yaml")
    if not checkpoint.is_file():
        raise ScenarioError(f"--resume {run_dir}: it has no checkpoint yet (checkpoints/latest.npz is written every "
                            f"checkpoint.every = {saved.checkpoint.every} rounds and when Ctrl-C stops a run).")
    if scenario is not None:
        given = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        if given.to_dict() != saved.to_dict():
            raise ScenarioError(f"--resume {run_dir}: the scenario given ({given.source}) differs from the run's own "
                                f"{run_dir / 'scenario.yaml'}; leave the scenario out to continue the run as it was.")
    return saved, run_dir, checkpoint


def _drive(scenario, fleet, availability, placement, run_dir: Path, created: list, progress,
           checkpoint: Path | None = None) -> RunResult:
    shards = cluster.shard_sensors(scenario, fleet, placement)
    actors = cluster.start_client_actors(scenario, fleet, placement, shards)
    created.extend(actors)
    # The coordinator starts while the client actors load their shards; the clock starts once all are up.
    coordinator = cluster.start_coordinator(scenario, fleet, availability, actors, shards, placement, str(run_dir))
    created.append(coordinator)
    where = ray.get([actor.placement.remote() for actor in actors])  # also waits until every shard is loaded
    write_json(_placement_record(placement, where), run_dir / "placement.json")
    done = ray.get(coordinator.restore.remote(str(checkpoint))) if checkpoint is not None else 0
    ray.get(coordinator.start_clock.remote())
    budget = scenario.privacy.target_epsilon if scenario.privacy is not None else None
    for _ in range(done, scenario.training.rounds):
        try:
            row = ray.get(coordinator.step.remote())
        except KeyboardInterrupt:
            # The coordinator finishes the round under way, then saves it: nothing half-done is kept.
            raise RunInterrupted(run_dir, ray.get(coordinator.checkpoint.remote())) from None
        if row is None:  # the privacy budget allows no more rounds
            break
        if progress is not None:
            progress(row)
        if budget is not None and row["epsilon"] > budget:
            warnings.warn(RaysimWarning(
                f"round {row['round']} took the privacy spent to ε = {row['epsilon']:.4g}, above "
                f"privacy.target_epsilon = {budget:g} (on_budget: warn, so the run goes on)"), stacklevel=2)
            budget = None  # once
    final = ray.get(coordinator.finish.remote())
    for index, replacement in final["replacements"].items():
        # An actor that failed is never kept for another run; the one that replaced it stops with this run.
        created.remove(actors[index])
        cluster.release([actors[index]], keep=False)
        created.append(replacement)
    summary = {
        "name": scenario.name,
        "seed": scenario.seed,
        "sensors": scenario.fleet.sensors,
        "mode": scenario.aggregation.mode,
        "strategy": scenario.aggregation.strategy.name,
        "aggregator": scenario.aggregation.aggregator.name,
        "server_optimizer": scenario.aggregation.server_optimizer.name,
        "uplink_codec": scenario.compression.uplink.name,
        "attack": scenario.attack.kind if scenario.attack is not None else None,
        "cohort": scenario.aggregation.cohort if scenario.aggregation.mode == "sync"
        else scenario.aggregation.strategy.concurrency,
        **_model_figures(final["summary"], final["weights"]),
        "client_actors": placement.client_actors,
        "nodes": len({w["node_id"] for w in where}),
        "sensors_per_actor": placement.sensors_per_actor,
        **final["summary"],
    }
    memory = summary["memory"]
    memory["driver_peak_mb"] = peak_rss_mb()
    # Each process's own peak, summed: an upper bound of the peak of the total.
    memory["total_peak_mb"] = memory["driver_peak_mb"] + memory["coordinator_peak_mb"] + sum(
        memory["client_actors_peak_mb"])
    write_json(summary, run_dir / "summary.json")
    return RunResult(
        run_dir=run_dir,
        metrics=pq.read_table(run_dir / "metrics.parquet"),
        global_weights=np.asarray(final["weights"], dtype=np.float32),
        summary=summary,
    )
