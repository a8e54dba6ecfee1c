"""Straggler policies and asynchronous aggregation on the heavy-tailed three-tier fleet.

Runs sync FedAvg (wait-all, deadline, over-commit) and FedBuff side by side in
one Ray instance and reports, for each, the virtual time and bytes at which
the global model first reaches the scenarios' target accuracy, plus wall-clock
throughput (sensor updates per second) of async runs against sync runs of the
same size: the same fleet, and as many updates per model step (FedBuff's
buffer K against the sync cohort) — K = 20 against cohort 20, and K = 100
against cohort 100, each with 100 sensors in flight.

    .venv/bin/python benchmarks/stragglers.py [--sensors 1000] [--repeats 5] [--out benchmarks/results/stragglers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

import raysim

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "sync wait-all": ("three_tier_wait_all.yaml", []),
    # Throughput pairs run back to back: as many updates per model step as the sync cohort, and in all.
    "fedbuff, K = 100": ("three_tier_fedbuff.yaml", ["aggregation.strategy.buffer_size=100", "training.rounds=30"]),
    "sync deadline": ("three_tier_deadline.yaml", []),
    "sync over-commit": ("three_tier_overcommit.yaml", []),
    "fedbuff": ("three_tier_fedbuff.yaml", []),
    "sync wait-all, cohort 20": ("three_tier_wait_all.yaml", ["aggregation.cohort=20", "training.rounds=120"]),
}
# (async, sync of the same size) pairs whose throughput is compared.
PAIRS = {"K = 20": ("fedbuff", "sync wait-all, cohort 20"), "K = 100": ("fedbuff, K = 100", "sync wait-all")}
THROUGHPUT = tuple(label for pair in PAIRS.values() for label in pair)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, default=1000)
    parser.add_argument("--target", type=float, default=None, help="target accuracy (default: the scenarios')")
    parser.add_argument("--repeats", type=int, default=5,
                        help="runs of each throughput variant, interleaved; medians are reported (wall clock is noisy)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stragglers.json")
    args = parser.parse_args(argv)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    results = {}
    throughput: dict[str, list[float]] = {label: [] for label in THROUGHPUT}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for label, (file, extra) in VARIANTS.items():
                if repeat and label not in THROUGHPUT:
                    continue  # virtual-time figures are deterministic: one run is enough
                overrides = [f"fleet.sensors={args.sensors}", "logging.progress=false", *extra]
                if args.target is not None:
                    overrides.append(f"logging.target_accuracy={args.target}")
                scenario = raysim.load_scenario(ROOT / "scenarios" / file, overrides)
                started = time.perf_counter()
                run_dir = Path(scratch) / f"{label.replace(' ', '-').replace(',', '')}-{repeat}"
                s = raysim.run(scenario, out_dir=run_dir).summary
                if label in throughput:
                    throughput[label].append(s["updates_per_s"])
                if repeat == 0:
                    results[label] = _figures(file, s, time.perf_counter() - started)
                print(f"{label:26s} run {repeat + 1} done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    ray.shutdown()
    for label, rates in throughput.items():
        results[label]["updates_per_s_runs"] = rates
        results[label]["updates_per_s"] = statistics.median(rates)

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "sensors": args.sensors,
        "repeats": args.repeats,
        "variants": results,
        "fedbuff_vs_wait_all_time_to_target": _ratio(results["fedbuff"]["time_to_target_s"],
                                                     results["sync wait-all"]["time_to_target_s"]),
        # Per pair: each repeat's async / sync ratio (the two run back to back, so they share the
        # machine's momentary load) and the median of those ratios.
        "async_vs_sync_throughput": {pair: _paired(throughput[a], throughput[b]) for pair, (a, b) in PAIRS.items()},
        "fedbuff_k20_vs_sync_cohort_100_throughput": _ratio(results["fedbuff"]["updates_per_s"],
                                                            results["sync wait-all"]["updates_per_s"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report)
    print(f"written to {args.out}")
    return 0


def _figures(file: str, s: dict, wall_s: float) -> dict:
    return {
        "scenario": file,
        "target_accuracy": s.get("target_accuracy"),
        "time_to_target_s": s.get("time_to_target_s"),
        "bytes_to_target": s.get("bytes_to_target"),
        "round_to_target": s.get("round_to_target"),
        "final_accuracy": s.get("final_accuracy"),
        "virtual_time_s": s["virtual_time_s"],
        "updates_applied": s["updates_applied"],
        "updates_late": s["updates_late"],
        "updates_lost": s["updates_lost"],
        "updates_offline": s["updates_offline"],
        "trainings_skipped": s["trainings_skipped"],
        "wall_s": wall_s,
        "updates_per_s": s["updates_per_s"],
    }


def _paired(async_rates: list[float], sync_rates: list[float]) -> dict:
    runs = [a / b for a, b in zip(async_rates, sync_rates)]
    return {"median": statistics.median(runs), "runs": runs}


def _ratio(a, b):
    return a / b if a is not None and b else None


def _print_table(report: dict) -> None:
    header = f"{'variant':26s} {'time→target s':>14s} {'MB→target':>10s} {'final acc':>9s} {'applied':>8s} " \
             f"{'late':>6s} {'lost':>5s} {'offline':>7s} {'updates/s':>10s}"
    print(header)
    for label, r in report["variants"].items():
        ttt = f"{r['time_to_target_s']:.1f}" if r["time_to_target_s"] is not None else "not reached"
        mb = f"{r['bytes_to_target'] / 1e6:.1f}" if r["bytes_to_target"] is not None else "-"
        print(f"{label:26s} {ttt:>14s} {mb:>10s} {r['final_accuracy']:9.3f} {r['updates_applied']:8d} "
              f"{r['updates_late']:6d} {r['updates_lost']:5d} {r['updates_offline']:7d} {r['updates_per_s']:10.0f}")
    ratio = report["fedbuff_vs_wait_all_time_to_target"]
    print(f"FedBuff time-to-target / wait-all: {ratio:.2f}" if ratio else "FedBuff or wait-all did not reach the target")
    for pair, ratio in report["async_vs_sync_throughput"].items():
        runs = ", ".join(f"{r:.2f}" for r in ratio["runs"])
        print(f"FedBuff {pair} / sync cohort {pair.split()[-1]} throughput: {ratio['median']:.2f} (runs: {runs})")
    print(f"FedBuff K = 20 / sync cohort 100 throughput: {report['fedbuff_k20_vs_sync_cohort_100_throughput']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
