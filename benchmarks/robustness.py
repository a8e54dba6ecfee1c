"""Robust aggregation against 20 % sign-flipping sensors, side by side with the clean run.

Runs scenarios/robust_sign_flip.yaml without the attack (FedAvg, the clean
reference) and with it under plain FedAvg, the coordinate-wise median, the
trimmed mean, Multi-Krum and Bulyan, in one Ray instance, and reports each
run's final and best test accuracy and its gap to the clean run. Runs are
deterministic, so one of each suffices.

    .venv/bin/python benchmarks/robustness.py [--rounds 30] [--out benchmarks/results/robustness.json]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default: the scenario's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robustness.json")
    args = parser.parse_args(argv)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (label, overrides) in enumerate(VARIANTS.items()):
            extra = ["logging.progress=false", *overrides]
            if args.rounds:
                extra.append(f"training.rounds={args.rounds}")
            scenario = raysim.load_scenario(SCENARIO, extra)
            started = time.perf_counter()
            summary = raysim.run(scenario, out_dir=Path(scratch) / f"run-{index}").summary
            results[label] = {
                "final_accuracy": summary.get("final_accuracy"),
                "best_accuracy": summary.get("best_accuracy"),
                "round_to_target": summary.get("round_to_target"),
                "updates_applied": summary["updates_applied"],
                "wall_s": time.perf_counter() - started,
            }
            print(f"{label:38s} done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    ray.shutdown()
    clean = results["clean, FedAvg"]["final_accuracy"]
    for r in results.values():
        r["gap_to_clean"] = clean - r["final_accuracy"]
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "scenario": SCENARIO.name,
        "variants": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'variant':38s} {'final acc':>9s} {'best acc':>8s} {'gap to clean':>12s}")
    for label, r in results.items():
        print(f"{label:38s} {r['final_accuracy']:9.3f} {r['best_accuracy']:8.3f} {r['gap_to_clean']:+12.3f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
