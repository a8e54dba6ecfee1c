"""Helpers shared by tests: scenario variants and table comparisons."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def assert_tables_identical(left, right, rtol: float = 0.0) -> None:
    """Every column equal, bit for bit, with NaN equal to NaN (pyarrow's equals says NaN != NaN);
    with ``rtol``, float columns only within that relative tolerance."""
    import numpy as np

    assert left.column_names == right.column_names
    assert left.num_rows == right.num_rows
    for name in left.column_names:
        a = left[name].to_numpy(zero_copy_only=False)
        b = right[name].to_numpy(zero_copy_only=False)
        if a.dtype.kind == "f":
            same = np.allclose(a, b, rtol=rtol, atol=0.0, equal_nan=True) if rtol else np.array_equal(a, b, equal_nan=True)
        else:
            same = np.array_equal(a, b)
        assert same, f"column {name} differs"


def with_changes(spec: dict, changes: dict) -> dict:
    """``spec`` with dotted keys set, e.g. {"training.rounds": 3} (nested sections are created)."""
    import copy

    spec = copy.deepcopy(spec)
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return spec


def assert_same_run(run, reference, events_rtol: float = 0.0) -> None:
    """Two raysim RunResults are the same run: the same rounds, once each; every metrics column but the
    wall-clock ones equal (within 1e-6); events.parquet identical (floats within ``events_rtol`` if given);
    final weights within 1e-6."""
    import numpy as np
    import pyarrow.parquet as pq
    import pytest

    from raysim.metrics import WALL_CLOCK_COLUMNS

    assert run.metrics["round"].to_pylist() == reference.metrics["round"].to_pylist()  # none missing or repeated
    for column in reference.metrics.column_names:
        ours, theirs = run.metrics[column].to_pylist(), reference.metrics[column].to_pylist()
        if isinstance(theirs[0], str):
            assert ours == theirs, column
        elif column not in WALL_CLOCK_COLUMNS:
            assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6, nan_ok=True), column
    assert_tables_identical(pq.read_table(run.run_dir / "events.parquet"),
                            pq.read_table(reference.run_dir / "events.parquet"), rtol=events_rtol)
    np.testing.assert_allclose(run.global_weights, reference.global_weights, atol=1e-6)


# --------------------------------------------------------------------- runs stopped mid-way (for --resume tests)

ROOT = Path(__file__).resolve().parents[1]


def round_of(checkpoint: Path) -> int:
    try:
        with np.load(checkpoint) as saved:
            return int(saved["round"])
    except (OSError, ValueError, KeyError):  # not there yet
        return 0


def start_run(scenario_file: Path, run_dir: Path) -> subprocess.Popen:
    """`raysim run` in its own process group (its own local Ray), so the test can stop exactly what it started."""
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from raysim.cli import main; sys.exit(main())", "run", str(scenario_file),
         "--out", str(run_dir)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_at_round(process: subprocess.Popen, run_dir: Path, at_least: int, sig: int) -> tuple[int, str]:
    checkpoint = run_dir / "checkpoints" / "latest.npz"
    deadline = time.monotonic() + 180
    while round_of(checkpoint) < at_least and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be stopped: " + process.stderr.read()[-2000:]
    if sig == signal.SIGKILL:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever is left of its process group (its Ray)
    return process.returncode, err


def run_stopped_at(spec: dict, tmp_path, at_least: int, sig: int):
    """Run ``spec`` with ``raysim run`` in a subprocess, stop it with ``sig`` once a checkpoint holds round
    ``at_least`` or later, and return its run directory (checked to hold an unfinished checkpoint)."""
    import yaml

    scenario_file = tmp_path / "stopped.yaml"
    scenario_file.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "stopped"
    code, err = stop_at_round(start_run(scenario_file, run_dir), run_dir, at_least=at_least, sig=sig)
    assert code in (-signal.SIGKILL, 130), err[-2000:]
    assert at_least <= round_of(run_dir / "checkpoints" / "latest.npz") < spec["training"]["rounds"]
    return run_dir
