"""Robust aggregation against 20 % sign-flipping sensors, side by side with the clean run.

Runs scenarios/robust_sign_flip.yaml without the attack (FedAvg, the clean
reference) and with it under plain FedAvg, the coordinate-wise median, the
trimmed mean, Multi-Krum and Bulyan, in one Ray instance, and reports each
run's final and best test accuracy and its gap to the clean run; all of it at
the scenario's mild label skew (Dirichlet α = 5) and at a strong one (α = 0.5).
Runs are deterministic, so one of each suffices.

    .venv/bin/python benchmarks/robustness.py [--rounds N] [--out benchmarks/results/robustness.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import ray

import raysim

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "robust_sign_flip.yaml"
# f = 10 attackers expected among 50 per round (20 %); Multi-Krum keeps n − f.
VARIANTS = {
    "clean, FedAvg": ["attack=null", "aggregation.aggregator={name: mean}"],
    "attacked, FedAvg": ["aggregation.aggregator={name: mean}"],
    "attacked, median": ["aggregation.aggregator={name: median}"],
    "attacked, trimmed mean β = 0.2": ["aggregation.aggregator={name: trimmed_mean, beta: 0.2}"],
    "attacked, Multi-Krum f = 10, m = 40": ["aggregation.aggregator={name: krum, num_byzantine: 10, num_selected: 40}"],
    "attacked, Bulyan f = 10": ["aggregation.aggregator={name: bulyan, num_byzantine: 10}"],
}
SKEWS = {"α = 5": [], "α = 0.5": ["fleet.data.label_alpha=0.5"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default: the scenario's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robustness.json")
    args = parser.parse_args(argv)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    results: dict[str, dict[str, dict]] = {skew: {} for skew in SKEWS}
    with tempfile.TemporaryDirectory() as scratch:
        for skew, skew_overrides in SKEWS.items():
            for label, overrides in VARIANTS.items():
                extra = ["logging.progress=false", *skew_overrides, *overrides]
                if args.rounds:
                    extra.append(f"training.rounds={args.rounds}")
                scenario = raysim.load_scenario(SCENARIO, extra)
                started = time.perf_counter()
                run_dir = Path(scratch) / f"run-{len(results[skew])}-{skew_overrides}"
                summary = raysim.run(scenario, out_dir=run_dir).summary
                results[skew][label] = {
                    "final_accuracy": summary.get("final_accuracy"),
                    "best_accuracy": summary.get("best_accuracy"),
                    "updates_applied": summary["updates_applied"],
                    "wall_s": time.perf_counter() - started,
                }
                print(f"{skew:8s} {label:38s} done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    ray.shutdown()
    for runs in results.values():
        clean = runs["clean, FedAvg"]["final_accuracy"]
        for r in runs.values():
            r["gap_to_clean"] = clean - r["final_accuracy"]
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "scenario": SCENARIO.name,
        "label_skews": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'variant':38s} " + " ".join(f"{'final ' + skew:>14s} {'gap':>7s}" for skew in SKEWS))
    for label in VARIANTS:
        cells = " ".join(f"{results[skew][label]['final_accuracy']:14.3f} {results[skew][label]['gap_to_clean']:+7.3f}"
                         for skew in SKEWS)
        print(f"{label:38s} {cells}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
