"""Heterogeneous fleets: cross-architecture distillation (sync and async) and FedPer personalization, side by side.

Three comparisons in one Ray instance:

1. scenarios/mixed_distillation.yaml as is (800 gateway sensors on a DSCNN,
   200 low_power sensors on an MLP, sync FedAvg with server momentum), with
   distillation on the public proxy set against ``distillation=null`` (each
   architecture learning alone), for every seed. Per architecture: the final
   accuracy, the mean of the last ten evaluations (steadier), the accuracy at
   mid-run, its bytes up and down (from events.parquet, by tier), the bytes
   per update and per task (with distillation they carry P·K·4 bytes of
   logits each way) and wall time; then the mean over seeds and the
   difference distillation − alone.
2. The same fleet in async mode (FedBuff, K = 50, 100 sensors in flight,
   plain server SGD, 200 steps, evaluated every 10), with and without
   distillation, for the first seed only: the same figures (the mean is over
   the last three evaluations) and each tier's mean staleness of its applied
   updates.
3. scenarios/personalized_fedper.yaml, FedPer (the head stays on each sensor)
   against ``personalization.layers=[]`` (plain FedAvg evaluated the same way),
   for every seed: the global model's final accuracy, each sensor's own model
   on its held-out samples (mean, std, 10th percentile), bytes per update and
   wall time.

Runs are deterministic for a seed (wall time aside), so the spread over seeds
is the spread of the fleets and samplings, not of the machine.

    .venv/bin/python benchmarks/heterogeneous.py                 # the full comparison (6–8 minutes on 2 cores)
    .venv/bin/python benchmarks/heterogeneous.py --quick         # 1 seed, 30 sync / 60 async / 20 personalization rounds
    .venv/bin/python benchmarks/heterogeneous.py --seeds 7 11 --keep-runs runs/heterogeneous --out /tmp/h.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from rich.console import Console
from rich.table import Table

import raysim

ROOT = Path(__file__).resolve().parents[1]
MIXED = ROOT / "scenarios" / "mixed_distillation.yaml"
PERSONAL = ROOT / "scenarios" / "personalized_fedper.yaml"
# label → overrides; the first label of each pair is the minuend of every difference.
DISTILLATION = {"distillation": [], "alone": ["distillation=null"]}
PERSONALIZATION = {"fedper": [], "fedavg": ["personalization.layers=[]"]}
ASYNC = [
    "aggregation.mode=async",
    "aggregation.strategy={name: fedbuff, buffer_size: 50, concurrency: 100}",
    "aggregation.server_optimizer={name: sgd}",
    "logging.eval_every=10",
]
# Rounds (sync) or server steps (async) per section, full and --quick.
ROUNDS = {"sync": 100, "async": 200, "personalization": 40}
QUICK_ROUNDS = {"sync": 30, "async": 60, "personalization": 20}
# Evaluations averaged for the steadier "last" figure: every round in sync, every tenth step in async.
LAST_EVALUATIONS = {"sync": 10, "async": 3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 11, 13],
                        help="scenario seeds (default 7 11 13); async runs use the first only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "heterogeneous.json")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the first seed, 30 sync rounds, 60 async steps, 20 personalization rounds")
    parser.add_argument("--keep-runs", type=Path, default=None, metavar="DIR",
                        help="keep every run directory under DIR (default: a temporary directory, removed at the end)")
    args = parser.parse_args(argv)
    seeds = args.seeds[:1] if args.quick else args.seeds
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    if args.keep_runs is not None and args.keep_runs.exists() and any(args.keep_runs.iterdir()):
        parser.error(f"--keep-runs {args.keep_runs} is not empty")

    runs_dir = args.keep_runs if args.keep_runs is not None else Path(tempfile.mkdtemp(prefix="heterogeneous-"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    started = time.perf_counter()
    try:
        sync_runs = {label: [_mixed_run(runs_dir, "sync", label, seed, rounds["sync"], extra)
                             for seed in seeds] for label, extra in DISTILLATION.items()}
        async_runs = {label: [_mixed_run(runs_dir, "async", label, seeds[0], rounds["async"], [*ASYNC, *extra])]
                      for label, extra in DISTILLATION.items()}
        personal_runs = {label: [_personal_run(runs_dir, label, seed, rounds["personalization"], extra)
                                 for seed in seeds] for label, extra in PERSONALIZATION.items()}
    finally:
        ray.shutdown()
        if args.keep_runs is None:
            shutil.rmtree(runs_dir, ignore_errors=True)

    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__},
        "quick": args.quick,
        "seeds": seeds,
        "rounds": rounds,
        "total_wall_s": time.perf_counter() - started,
        "mixed_sync": _section(sync_runs, "sync"),
        "mixed_async": _section(async_runs, "async"),
        "personalization": _personal_section(personal_runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    _print_tables(report)
    plot = _plot(report, args.out.with_suffix(".png"))
    print(f"written to {args.out}" + (f" and {plot}" if plot else ""))
    return 0


# --- one run ------------------------------------------------------------------------------------------

def _run(runs_dir: Path, name: str, scenario_path: Path, overrides: list[str]):
    scenario = raysim.load_scenario(scenario_path, overrides)  # checked before Ray is asked for anything
    run_dir = runs_dir / name
    started = time.perf_counter()
    result = raysim.run(scenario, out_dir=run_dir)
    wall_s = time.perf_counter() - started
    print(f"{name:38s} done in {wall_s:6.1f} s", file=sys.stderr, flush=True)
    return scenario, result, wall_s


def _mixed_run(runs_dir: Path, mode: str, label: str, seed: int, rounds: int, extra: list[str]) -> dict[str, Any]:
    """One mixed-architecture run and its per-architecture figures."""
    overrides = ["logging.progress=false", f"seed={seed}", f"training.rounds={rounds}", *extra]
    scenario, result, wall_s = _run(runs_dir, f"mixed-{mode}-{label}-seed{seed}", MIXED, overrides)
    metrics = result.metrics.to_pydict()
    events = pq.read_table(result.run_dir / "events.parquet", columns=["tier", "outcome", "staleness",
                                                                         "bytes_up", "bytes_down"])
    applied = events.filter(pc.equal(events["outcome"], "applied"))
    # P·K float32 soft labels each way per task when distillation is on (architectures.logits_bytes).
    logits_bytes = scenario.proxy.samples * scenario.fleet.data.classes * 4 if scenario.distillation else 0
    mid_round = rounds // 2
    architectures = {}
    for arch in result.summary["architectures"]:
        column = f"accuracy.{arch['name']}" if f"accuracy.{arch['name']}" in metrics else "accuracy"
        curve = [(r, a) for r, a in zip(metrics["round"], metrics[column]) if a is not None and not math.isnan(a)]
        tiers = arch["name"].split("+")
        mine = events.filter(pc.is_in(events["tier"], value_set=_strings(tiers)))
        mine_applied = applied.filter(pc.is_in(applied["tier"], value_set=_strings(tiers)))
        architectures[arch["name"]] = {
            "model": arch["model"],
            "parameters": arch["parameters"],
            "final_accuracy": curve[-1][1] if curve else None,
            "final_round": curve[-1][0] if curve else None,
            f"mean_last_{LAST_EVALUATIONS[mode]}": statistics.fmean(a for _, a in curve[-LAST_EVALUATIONS[mode]:])
            if curve else None,
            "mid_round": mid_round,
            "mid_accuracy": _at_or_before(curve, mid_round),
            "bytes_up": pc.sum(mine["bytes_up"]).as_py() or 0,
            "bytes_down": pc.sum(mine["bytes_down"]).as_py() or 0,
            "updates_applied": mine_applied.num_rows,
            "bytes_up_per_update": arch["bytes_up_per_update"],
            "bytes_down_per_task": arch["bytes_down_per_task"],
            "logits_bytes_each_way": logits_bytes,
            "staleness_mean": pc.mean(mine_applied["staleness"]).as_py() if mine_applied.num_rows else None,
            "accuracy_curve": curve,
        }
    return {
        "seed": seed,
        "scenario": str(MIXED.relative_to(ROOT)),
        "overrides": overrides,
        "wall_s": wall_s,
        "run_wall_time_s": result.summary["wall_time_s"],
        "virtual_time_s": result.summary["virtual_time_s"],
        "bytes_up": metrics["cumulative_bytes_up"][-1],
        "bytes_down": metrics["cumulative_bytes_down"][-1],
        "final_accuracy": result.summary.get("final_accuracy"),
        "architectures": architectures,
    }


def _personal_run(runs_dir: Path, label: str, seed: int, rounds: int, extra: list[str]) -> dict[str, Any]:
    overrides = ["logging.progress=false", f"seed={seed}", f"training.rounds={rounds}", *extra]
    _, result, wall_s = _run(runs_dir, f"personal-{label}-seed{seed}", PERSONAL, overrides)
    metrics = result.metrics.to_pydict()
    evaluated = [i for i, a in enumerate(metrics["personal_accuracy_mean"]) if a is not None and not math.isnan(a)]
    last = evaluated[-1] if evaluated else None
    personal = {k: metrics[f"personal_{k}"][last] if last is not None else None
                for k in ("accuracy_mean", "accuracy_std", "accuracy_p10", "sensors")}
    arch = result.summary["architectures"][0]
    return {
        "seed": seed,
        "scenario": str(PERSONAL.relative_to(ROOT)),
        "overrides": overrides,
        "wall_s": wall_s,
        "run_wall_time_s": result.summary["wall_time_s"],
        "final_round": metrics["round"][last] if last is not None else None,
        "global_accuracy": result.summary.get("final_accuracy"),
        **{f"personal_{k}": v for k, v in personal.items()},
        "bytes_up_per_update": arch["bytes_up_per_update"],
        "bytes_down_per_task": arch["bytes_down_per_task"],
        "shared_parameters": arch["shared_parameters"],
        "parameters": arch["parameters"],
        "personal_layers": arch["personal_layers"],
        "bytes_up": metrics["cumulative_bytes_up"][-1],
        "summary_personalization": result.summary.get("personalization"),
    }


def _at_or_before(curve: list[tuple[int, float]], round_index: int) -> float | None:
    """The accuracy of the last evaluation at or before ``round_index`` (every round is evaluated in sync)."""
    before = [a for r, a in curve if r <= round_index]
    return before[-1] if before else None


def _strings(values: list[str]) -> pa.Array:
    return pa.array(values, pa.string())


# --- aggregation over seeds ----------------------------------------------------------------------------

# Per-architecture figures that are averaged over seeds and differenced between variants.
ARCH_FIGURES = ("final_accuracy", "mean_last", "mid_accuracy", "bytes_up", "bytes_down", "bytes_up_per_update",
                "bytes_down_per_task", "logits_bytes_each_way", "staleness_mean")
RUN_FIGURES = ("wall_s", "bytes_up", "bytes_down", "virtual_time_s")
PERSONAL_FIGURES = ("global_accuracy", "personal_accuracy_mean", "personal_accuracy_std", "personal_accuracy_p10",
                    "bytes_up_per_update", "wall_s")


def _section(runs: dict[str, list[dict]], mode: str) -> dict[str, Any]:
    """Every run, the mean over seeds of each variant, and the differences first variant − second."""
    last_key = f"mean_last_{LAST_EVALUATIONS[mode]}"
    means = {}
    for label, seed_runs in runs.items():
        names = list(seed_runs[0]["architectures"])
        means[label] = {
            **{k: _mean([r[k] for r in seed_runs]) for k in RUN_FIGURES},
            "architectures": {name: {k: _mean([r["architectures"][name][last_key if k == "mean_last" else k]
                                               for r in seed_runs]) for k in ARCH_FIGURES} for name in names},
        }
    first, second = list(runs)
    difference = {
        **{k: _sub(means[first][k], means[second][k]) for k in RUN_FIGURES},
        "architectures": {name: {k: _sub(v, means[second]["architectures"][name][k]) for k, v in figures.items()}
                          for name, figures in means[first]["architectures"].items()},
    }
    return {"last_evaluations": LAST_EVALUATIONS[mode], "runs": runs, "mean_over_seeds": means,
            f"difference_{first}_minus_{second}": difference}


def _personal_section(runs: dict[str, list[dict]]) -> dict[str, Any]:
    means = {label: {k: _mean([r[k] for r in seed_runs]) for k in PERSONAL_FIGURES} for label, seed_runs in runs.items()}
    first, second = list(runs)
    difference = {k: _sub(means[first][k], means[second][k]) for k in PERSONAL_FIGURES}
    return {"runs": runs, "mean_over_seeds": means, f"difference_{first}_minus_{second}": difference}


def _mean(values: list) -> float | None:
    finite = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(finite) if finite else None


def _sub(a, b):
    return a - b if a is not None and b is not None else None


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# --- tables ---------------------------------------------------------------------------------------------

def _print_tables(report: dict) -> None:
    console = Console(width=180)
    rounds = report["rounds"]
    for key, title in (("mixed_sync", f"Mixed architectures, sync FedAvg + momentum, {rounds['sync']} rounds"),
                       ("mixed_async", f"Mixed architectures, async FedBuff K = 50, {rounds['async']} steps")):
        section = report[key]
        last = section["last_evaluations"]
        async_mode = key == "mixed_async"
        table = Table(title=title)
        mid = rounds["async" if async_mode else "sync"] // 2
        for column in ("variant", "seed", "architecture", "final acc", f"mean last {last}", f"acc @ {mid}",
                       "MB up", "MB down", "B up/update", "B down/task", "logits B", "wall s"):
            table.add_column(column, justify="left" if column in ("variant", "architecture", "seed") else "right",
                             no_wrap=column in ("variant", "architecture"))
        if async_mode:
            table.add_column("staleness", justify="right")
        for label, seed_runs in section["runs"].items():
            for run in seed_runs:
                for name, a in run["architectures"].items():
                    table.add_row(label, str(run["seed"]), name, _f(a["final_accuracy"]), _f(a[f"mean_last_{last}"]),
                                  _f(a["mid_accuracy"]), _mb(a["bytes_up"]), _mb(a["bytes_down"]),
                                  _int(a["bytes_up_per_update"]), _int(a["bytes_down_per_task"]),
                                  _int(a["logits_bytes_each_way"]), f"{run['wall_s']:.1f}",
                                  *([_f(a["staleness_mean"], 2)] if async_mode else []))
            table.add_section()
        summaries = [(f"mean {label}", m) for label, m in section["mean_over_seeds"].items()]
        summaries += [(k.removeprefix("difference_").replace("_minus_", " − "), v)
                      for k, v in section.items() if k.startswith("difference_")]
        for label, m in summaries:
            signed = "−" in label
            for name, a in m["architectures"].items():
                table.add_row(label, "", name, _f(a["final_accuracy"], signed=signed), _f(a["mean_last"], signed=signed),
                              _f(a["mid_accuracy"], signed=signed), _mb(a["bytes_up"], signed), _mb(a["bytes_down"], signed),
                              _int(a["bytes_up_per_update"], signed), _int(a["bytes_down_per_task"], signed),
                              _int(a["logits_bytes_each_way"], signed), _f(m["wall_s"], 1, signed),
                              *([_f(a["staleness_mean"], 2, signed)] if async_mode else []))
        console.print(table)

    section = report["personalization"]
    table = Table(title=f"Personalization, {rounds['personalization']} rounds: FedPer (head on sensor) vs FedAvg")
    for column in ("variant", "seed", "global acc", "personal mean", "personal std", "personal p10", "sensors",
                   "B up/update", "wall s"):
        table.add_column(column, justify="left" if column in ("variant", "seed") else "right", no_wrap=column in ("variant", "architecture"))
    for label, seed_runs in section["runs"].items():
        for run in seed_runs:
            table.add_row(label, str(run["seed"]), _f(run["global_accuracy"]), _f(run["personal_accuracy_mean"]),
                          _f(run["personal_accuracy_std"]), _f(run["personal_accuracy_p10"]),
                          _int(run["personal_sensors"]), _int(run["bytes_up_per_update"]), f"{run['wall_s']:.1f}")
    table.add_section()
    summaries = [(f"mean {label}", m) for label, m in section["mean_over_seeds"].items()]
    summaries += [(k.removeprefix("difference_").replace("_minus_", " − "), v)
                  for k, v in section.items() if k.startswith("difference_")]
    for label, m in summaries:
        signed = "−" in label
        table.add_row(label, "", _f(m["global_accuracy"], signed=signed), _f(m["personal_accuracy_mean"], signed=signed),
                      _f(m["personal_accuracy_std"], signed=signed), _f(m["personal_accuracy_p10"], signed=signed), "",
                      _int(m["bytes_up_per_update"], signed), _f(m["wall_s"], 1, signed))
    console.print(table)
    console.print(f"total wall time {report['total_wall_s']:.0f} s on {report['machine']['cpus']} CPUs")


def _plot(report: dict, path: Path) -> Path | None:
    """Accuracy against round of each architecture, distillation (solid) against alone (dashed), sync
    (first seed) and async; None, with a line saying why, when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        print(f"plot skipped: matplotlib is not installed ({exc}); pip install 'raysim[plot]'", file=sys.stderr)
        return None
    fig = Figure(figsize=(11, 4))
    for position, key in enumerate(("mixed_sync", "mixed_async"), start=1):
        ax = fig.add_subplot(1, 2, position)
        for label, seed_runs in report[key]["runs"].items():
            run = seed_runs[0]
            for colour, (name, arch) in zip(("C0", "C1", "C2", "C3"), run["architectures"].items()):
                rounds, accuracy = zip(*arch["accuracy_curve"])
                ax.plot(rounds, accuracy, color=colour, linestyle="-" if label == "distillation" else "--",
                        label=f"{name}, {label}")
        ax.set_xlabel("round" if key == "mixed_sync" else "server step")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{'sync' if key == 'mixed_sync' else 'async FedBuff'}, seed {seed_runs[0]['seed']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    return path


def _f(value, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _int(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+,.0f}" if signed else f"{value:,.0f}"


def _mb(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:+,.1f}" if signed else f"{value / 1e6:,.1f}"


if __name__ == "__main__":
    sys.exit(main())
