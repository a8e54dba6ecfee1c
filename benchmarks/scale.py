"""How raysim scales: throughput, the plain-PyTorch baseline, memory and communication, in one run.

The same harness as ``raysim bench`` (see raysim/bench.py for the suites and
the definitions of steady state, makespan, balance and peak memory), writing
benchmarks/results/scale.json and benchmarks/results/scale_*.png by default.

    .venv/bin/python benchmarks/scale.py                  # every suite at the issue's sizes (several minutes)
    .venv/bin/python benchmarks/scale.py --smoke          # a tiny configuration, to check the harness
    .venv/bin/python benchmarks/scale.py --suite baseline --models mlp
    .venv/bin/python benchmarks/scale.py --cohorts 100,1000,10000 --actors 1,2,4 --rounds 5 --fleet-for-memory 100000

The first run at 10,000 and 100,000 sensors generates those fleets (about 2
minutes for 100,000) into ~/.cache/raysim (or $RAYSIM_CACHE); later runs reuse them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from raysim.bench import main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_out=ROOT / "benchmarks" / "results" / "scale.json",
                  prog="benchmarks/scale.py"))
