"""raysim: fast federated-learning simulation over fleets of heterogeneous sensors, on Ray."""

from raysim.api import RunResult, run
from raysim.errors import AggregationError, ClusterError, DataError, RaysimError, ScenarioError
from raysim.scenario import Scenario, load_scenario

__version__ = "0.1.0"

__all__ = [
    "AggregationError",
    "ClusterError",
    "DataError",
    "RaysimError",
    "RunResult",
    "Scenario",
    "ScenarioError",
    "load_scenario",
    "run",
]
