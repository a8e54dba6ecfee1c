"""raysim: fast federated-learning simulation over fleets of heterogeneous sensors, on Ray."""

from __future__ import annotations

from typing import Any

from raysim.errors import AggregationError, ClusterError, DataError, RaysimError, RaysimWarning, ScenarioError
from raysim.scenario import Scenario, load_scenario

__version__ = "0.1.0"

__all__ = [
    "AggregationError",
    "ClusterError",
    "DataError",
    "RaysimError",
    "RaysimWarning",
    "RunResult",
    "Scenario",
    "ScenarioError",
    "load_scenario",
    "run",
]


def __getattr__(name: str) -> Any:
    # `run` pulls in Ray; keep `import raysim` (and `raysim validate`) light.
    if name in ("run", "RunResult"):
        from raysim import api

        return getattr(api, name)
    raise AttributeError(f"module 'raysim' has no attribute {name!r}")
