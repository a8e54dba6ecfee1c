"""Upload bytes against accuracy for every codec, on the quickstart fleet, side by side in one run.

Runs scenarios/quickstart.yaml (1,000 sensors, 100 per round, sync FedAvg)
for the same number of rounds with each uplink codec, in one Ray instance,
and reports each run's upload bytes, its compression against raw float32,
its final test accuracy (and the mean of the last five evaluations, which
is steadier), the gap to the uncompressed run, and the uplink bytes it took
to reach the target accuracy. Runs are deterministic, so one of each suffices.

Error feedback in cross-device FL delays what a sensor's codec drops until
that sensor's next participation (every ten rounds or so at 100 of 1,000), so
top-k at 1 % needs more rounds than the uncompressed run to catch up; the
default round count is chosen for that, and the JSON keeps every run's whole
accuracy curve (runs are deterministic, so a shorter run's final accuracy is
its curve at that round).

    .venv/bin/python benchmarks/communication.py [--rounds N] [--codecs none,int8,...] [--out FILE]
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
SCENARIO = ROOT / "scenarios" / "quickstart.yaml"
TARGET_ACCURACY = 0.8
# label → scenario overrides (the uncompressed run first: every gap is measured against it).
CODECS = {
    "none": ["compression.uplink={name: none}"],
    "fp16": ["compression.uplink={name: fp16}"],
    "int8": ["compression.uplink={name: int8}"],
    "qsgd 15 levels": ["compression.uplink={name: qsgd, levels: 15}"],
    "sign + EF": ["compression.uplink={name: sign}", "compression.error_feedback=true"],
    "random-k 10 %": ["compression.uplink={name: randk, fraction: 0.1}"],
    "top-k 10 % + EF": ["compression.uplink={name: topk, fraction: 0.1}", "compression.error_feedback=true"],
    "top-k 1 %": ["compression.uplink={name: topk, fraction: 0.01}"],
    "top-k 1 % + EF": ["compression.uplink={name: topk, fraction: 0.01}", "compression.error_feedback=true"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000, help="rounds per run (default 1000)")
    parser.add_argument("--eval-every", type=int, default=20, help="evaluate every this many rounds (default 20)")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated labels to run (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "communication.json")
    args = parser.parse_args(argv)
    labels = [label.strip() for label in args.codecs.split(",")]
    unknown = [label for label in labels if label not in CODECS]
    if unknown:
        parser.error(f"unknown codec label(s) {unknown}; choose from {list(CODECS)}")

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, label in enumerate(labels):
            overrides = ["logging.progress=false", "logging.tensorboard=false", f"training.rounds={args.rounds}",
                         f"logging.eval_every={args.eval_every}", f"logging.target_accuracy={TARGET_ACCURACY}",
                         *CODECS[label]]
            started = time.perf_counter()
            run = raysim.run(raysim.load_scenario(SCENARIO, overrides), out_dir=Path(scratch) / f"run-{index}")
            evaluated = [(r, a) for r, a in zip(run.metrics.column("round").to_pylist(),
                                                run.metrics.column("accuracy").to_pylist()) if a == a]
            accuracy = [a for _, a in evaluated]
            summary = run.summary
            results[label] = {
                "overrides": CODECS[label],
                "bytes_up": summary["bytes_up"],
                "bytes_up_per_update": summary["bytes_up"] / max(summary["updates_applied"], 1),
                "uplink_compression": summary["uplink_compression"],
                "final_accuracy": summary["final_accuracy"],
                "last5_mean_accuracy": sum(accuracy[-5:]) / len(accuracy[-5:]),
                "best_accuracy": summary["best_accuracy"],
                # The curve, every evaluation: a shorter run's final accuracy is this curve at its last round.
                "accuracy_by_round": {r: a for r, a in evaluated},
                "round_to_target": summary["round_to_target"],
                "bytes_up_to_target": _uplink_bytes_at(run.metrics, summary["round_to_target"]),
                "wall_s": time.perf_counter() - started,
            }
            print(f"{label:18s} done in {results[label]['wall_s']:.0f} s", file=sys.stderr)
    ray.shutdown()

    reference = results.get("none")
    for r in results.values():
        if reference is not None:
            r["bytes_ratio_to_none"] = reference["bytes_up"] / r["bytes_up"]
            r["gap_to_none"] = reference["final_accuracy"] - r["final_accuracy"]
            r["last5_gap_to_none"] = reference["last5_mean_accuracy"] - r["last5_mean_accuracy"]
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "scenario": SCENARIO.name,
        "rounds": args.rounds,
        "target_accuracy": TARGET_ACCURACY,
        "codecs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'codec':18s} {'MB up':>9s} {'÷ bytes':>8s} {'final':>6s} {'gap':>7s} {'last 5':>7s} {'gap':>7s} "
          f"{'MB to ' + format(TARGET_ACCURACY, '.0%'):>9s}")
    for label, r in results.items():
        to_target = "-" if r["bytes_up_to_target"] is None else f"{r['bytes_up_to_target'] / 1e6:,.1f}"
        print(f"{label:18s} {r['bytes_up'] / 1e6:9,.1f} {r.get('bytes_ratio_to_none', float('nan')):8.1f} "
              f"{r['final_accuracy']:6.3f} {r.get('gap_to_none', float('nan')):+7.3f} {r['last5_mean_accuracy']:7.3f} "
              f"{r.get('last5_gap_to_none', float('nan')):+7.3f} {to_target:>9s}")
    print(f"written to {args.out}")
    return 0


def _uplink_bytes_at(metrics, round_index: int | None) -> int | None:
    """Cumulative uplink bytes at the end of ``round_index`` (None if the target was never reached)."""
    if round_index is None:
        return None
    rounds = metrics.column("round").to_pylist()
    return metrics.column("cumulative_bytes_up").to_pylist()[rounds.index(round_index)]


if __name__ == "__main__":
    sys.exit(main())
