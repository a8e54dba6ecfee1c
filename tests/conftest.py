"""Shared fixtures: one Ray instance for the whole session, and a private fleet cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _fleet_cache(tmp_path_factory):
    """Generated fleets go to a per-session cache, never the user's ~/.cache."""
    os.environ["RAYSIM_CACHE"] = str(tmp_path_factory.mktemp("fleet-cache"))
    yield


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every Ray test: 2 CPUs and 2 fake GPUs for fractional placement."""
    import ray

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()

