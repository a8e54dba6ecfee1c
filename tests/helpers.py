"""Helpers shared by tests: scenario variants and table comparisons."""

from __future__ import annotations


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
