"""Contribution scores and trust-weighted aggregation against corrupted sensors, side by side.

1. Ranking: 60 sensors, 20 a round, 30 rounds, 20 % of them corrupted (label
   flipping, or duplicated data: a quarter of their windows repeated); for each
   scoring method, how many of the corrupted sensors are among the lowest mean
   scores (as many places as there are corrupted sensors).
2. Trust: 100 sensors, 20 a round, 30 rounds, 40 % label-flipping, plain
   FedAvg against FedAvg weighted by trust from leave-one-out and from cosine
   scores; final accuracy and the mean of the last five rounds, per seed.

Both on a fleet of alike honest sensors (same sample count, calibration and
label mix) and, for the trust comparison, also on the default, skewed fleet.

    .venv/bin/python benchmarks/contribution.py          # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
from rich.console import Console
from rich.table import Table

import raysim
from raysim.attacks import choose_attackers

ROOT = Path(__file__).resolve().parents[1]
ALIKE = {"quantity_sigma": 0, "label_alpha": 100,
         "feature_skew": {"gain_sigma": 0, "bias_sigma": 0, "rotation_deg": 0, "noise_min": 0.2, "noise_max": 0.2}}


def spec(sensors: int, data: dict[str, Any], attack: dict[str, Any], seed: int, contribution: dict | None) -> dict:
    return {
        "name": "contribution-bench", "seed": seed,
        "fleet": {"sensors": sensors, "data": {"kind": "synthetic", "samples_per_sensor": 64, "test_samples": 1000,
                                               "test_sensors": 20, "preprocess": {"zscore": True}, **data}},
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"rounds": 30, "batch_size": 16, "lr": 0.2},
        "aggregation": {"cohort": 20},
        "attack": attack,
        "contribution": contribution,
        "cluster": {"num_cpus": 0.5, "client_actors": 2},
        "logging": {"progress": False, "tensorboard": False},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[5, 6])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "contribution.json")
    args = parser.parse_args(argv)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ranking, trust = [], []
    try:
        with tempfile.TemporaryDirectory() as runs:
            runs = Path(runs)
            for kind, attack in (("label_flip", {"kind": "label_flip", "fraction": 0.2}),
                                 ("duplicate", {"kind": "duplicate", "fraction": 0.2, "keep": 0.25})):
                for method in ("loo", "shapley", "loss", "cosine"):
                    seed = args.seeds[0]
                    result = raysim.run(spec(60, ALIKE, attack, seed, {"method": method}), runs / f"{kind}-{method}")
                    scores = pq.read_table(result.run_dir / "contributions.parquet").to_pandas()
                    mean = scores.groupby("sensor").score.mean()
                    corrupted = set(np.flatnonzero(choose_attackers(seed, np.arange(60), 0.2)).tolist())
                    found = len(set(mean.sort_values().index[: len(corrupted)].tolist()) & corrupted)
                    ranking.append({"attack": kind, "method": method, "found": found, "corrupted": len(corrupted)})
                    print(f"ranking {kind:10s} {method:8s} {found}/{len(corrupted)}", file=sys.stderr)
            for fleet, data in (("alike", ALIKE), ("skewed", {})):
                for label, contribution in (("FedAvg", None), ("trust from loo", {"method": "loo", "trust": True}),
                                            ("trust from cosine", {"method": "cosine", "trust": True})):
                    for seed in args.seeds:
                        attack = {"kind": "label_flip", "fraction": 0.4}
                        result = raysim.run(spec(100, data, attack, seed, contribution), runs / f"{fleet}-{label}-{seed}")
                        accuracy = result.metrics["accuracy"].to_pylist()
                        trust.append({"fleet": fleet, "aggregation": label, "seed": seed, "final": accuracy[-1],
                                      "last5": statistics.fmean(accuracy[-5:])})
                        print(f"trust {fleet} {label:18s} seed {seed} {accuracy[-1]:.3f}", file=sys.stderr)
    finally:
        ray.shutdown()
    _print(ranking, trust)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"platform": platform.platform(), "ray": ray.__version__},
                                    "ranking": ranking, "trust": trust}, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


def _print(ranking: list[dict[str, Any]], trust: list[dict[str, Any]]) -> None:
    table = Table(title="corrupted sensors among the lowest mean contribution scores (60 sensors, 12 corrupted)")
    for name in ("attack", "method", "found"):
        table.add_column(name)
    for r in ranking:
        table.add_row(r["attack"], r["method"], f"{r['found']} / {r['corrupted']}")
    Console().print(table)
    table = Table(title="40 % label-flipping sensors: final accuracy (mean of the last 5 rounds)")
    for name in ("fleet", "aggregation", *(f"seed {s}" for s in sorted({t['seed'] for t in trust}))):
        table.add_column(name)
    for fleet in dict.fromkeys(t["fleet"] for t in trust):
        for label in dict.fromkeys(t["aggregation"] for t in trust):
            cells = [f"{t['final']:.3f} ({t['last5']:.3f})" for t in trust if t["fleet"] == fleet and t["aggregation"] == label]
            table.add_row(fleet, label, *cells)
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
