"""Early stopping of local training on the quickstart fleet: simulated compute and accuracy, side by side.

The quickstart scenario with 5 local epochs per round, with and without
``training.early_stopping`` (min_delta 0.01, patience 1 or 2), for each seed:
final accuracy, total simulated compute seconds (events.parquet), SGD steps
taken and virtual time.

    .venv/bin/python benchmarks/local_work.py           # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import ray
from rich.console import Console
from rich.table import Table

import raysim

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"all epochs": ["training.early_stopping=null"],
            "early stopping, patience 1": ["training.early_stopping={patience: 1, min_delta: 0.01}"],
            "early stopping, patience 2": ["training.early_stopping={patience: 2, min_delta: 0.01}"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "local_work.json")
    args = parser.parse_args(argv)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as runs:
            for seed in args.seeds:
                for label, extra in VARIANTS.items():
                    overrides = ["training.local_epochs=5", f"seed={seed}", "logging.progress=false",
                                 "logging.tensorboard=false", *extra]
                    result = raysim.run(raysim.load_scenario(ROOT / "scenarios" / "quickstart.yaml", overrides),
                                        out_dir=Path(runs) / f"{label}-{seed}".replace(" ", "_"))
                    events = pq.read_table(result.run_dir / "events.parquet").to_pandas()
                    rows.append({"variant": label, "seed": seed, "overrides": overrides,
                                 "final_accuracy": result.metrics["accuracy"].to_pylist()[-1],
                                 "compute_s": float(events.compute_s.sum()), "steps": int(events.local_steps.sum()),
                                 "virtual_time_s": result.summary["virtual_time_s"]})
    finally:
        ray.shutdown()
    table = Table(title="quickstart, 5 local epochs, 20 rounds")
    for name in ("variant", "seed", "final accuracy", "simulated compute s", "SGD steps", "virtual time s"):
        table.add_column(name)
    for r in rows:
        table.add_row(r["variant"], str(r["seed"]), f"{r['final_accuracy']:.3f}", f"{r['compute_s']:,.0f}",
                      f"{r['steps']:,}", f"{r['virtual_time_s']:,.1f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"platform": platform.platform()}, "runs": rows}, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
