"""Client selection policies side by side on the three-tier fleet (scenarios/three_tier_wait_all.yaml).

For each seed, every policy runs the same 30 synchronous rounds of 100 sensors:
uniform, availability-aware (model predictor, and the oracle that asks the
simulated future), stratified by tier and Oort. Reported per policy: updates
lost to sensors going offline mid-task, updates applied, virtual time, final
accuracy, Jain's participation fairness at the end, and the sensors selected
per tier; then the mean over seeds.

    .venv/bin/python benchmarks/selection.py                   # seeds 11 12 13 (about 2 minutes on 2 cores)
    .venv/bin/python benchmarks/selection.py --seeds 11 --out /tmp/selection.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.table import Table

import raysim

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "three_tier_wait_all.yaml"
POLICIES = {
    "uniform": ["aggregation.selection.policy=uniform"],
    "availability (model)": ["aggregation.selection.policy=availability", "aggregation.selection.predictor=model"],
    "availability (oracle)": ["aggregation.selection.policy=availability", "aggregation.selection.predictor=oracle"],
    "stratified": ["aggregation.selection.policy=stratified"],
    "oort": ["aggregation.selection.policy=oort"],
}
FIGURES = ("offline", "applied", "virtual_s", "accuracy", "fairness")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13], help="scenario seeds (default 11 12 13)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "selection.json")
    args = parser.parse_args(argv)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    records = []
    try:
        with tempfile.TemporaryDirectory() as runs:
            for seed in args.seeds:
                for label, overrides in POLICIES.items():
                    records.append(_run(Path(runs), label, seed, overrides))
    finally:
        ray.shutdown()
    means = {label: {k: statistics.fmean(r[k] for r in records if r["policy"] == label) for k in FIGURES}
             for label in POLICIES}
    _print(records, means)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "ray": ray.__version__},
        "scenario": str(SCENARIO.relative_to(ROOT)), "runs": records, "mean": means}, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


def _run(runs: Path, label: str, seed: int, overrides: list[str]) -> dict[str, Any]:
    overrides = [*overrides, f"seed={seed}", "logging.progress=false", "logging.tensorboard=false"]
    started = time.perf_counter()
    result = raysim.run(raysim.load_scenario(SCENARIO, overrides=overrides),
                        out_dir=runs / f"{label.replace(' ', '_')}-{seed}")
    metrics = result.metrics.to_pydict()
    tiers = [c.split(".", 1)[1] for c in result.metrics.column_names if c.startswith("selected.")]
    print(f"{label:24s} seed {seed}  done in {time.perf_counter() - started:5.1f} s", file=sys.stderr)
    return {
        "policy": label, "seed": seed, "overrides": overrides,
        "offline": sum(metrics["updates_offline"]), "applied": sum(metrics["updates_applied"]),
        "virtual_s": metrics["virtual_time_s"][-1], "accuracy": metrics["accuracy"][-1],
        "fairness": metrics["participation_fairness"][-1],
        "selected_per_tier": {t: sum(metrics[f"selected.{t}"]) for t in tiers},
    }


def _print(records: list[dict[str, Any]], means: dict[str, dict[str, float]]) -> None:
    table = Table(title="Client selection on three_tier_wait_all.yaml, 30 rounds of 100")
    for name in ("policy", "seed", "offline drops", "applied", "virtual s", "final accuracy", "Jain fairness",
                 "selected per tier"):
        table.add_column(name, justify="left" if name == "policy" else "right")
    for r in records:
        table.add_row(r["policy"], str(r["seed"]), str(r["offline"]), str(r["applied"]), f"{r['virtual_s']:,.1f}",
                      f"{r['accuracy']:.3f}", f"{r['fairness']:.3f}",
                      " / ".join(f"{t} {n:,.0f}" for t, n in r["selected_per_tier"].items()))
    for label, m in means.items():
        table.add_row(f"mean {label}", "", f"{m['offline']:.1f}", f"{m['applied']:,.0f}", f"{m['virtual_s']:,.1f}",
                      f"{m['accuracy']:.3f}", f"{m['fairness']:.3f}", "")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
