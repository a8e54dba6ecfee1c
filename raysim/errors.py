"""The one error hierarchy raysim raises for problems the user can fix.

The CLI turns any :class:`RaysimError` into a one-paragraph message and exit
status 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class RaysimError(Exception):
    """Base class of every error caused by bad input or an unusable environment."""


class ScenarioError(RaysimError):
    """A scenario file, a ``--set`` override or a CLI flag is invalid."""


class DataError(RaysimError):
    """A sensor data file is missing, unreadable or does not match the schema."""


class ClusterError(RaysimError):
    """Ray cannot be reached or cannot host the requested actors."""


class AggregationError(RaysimError):
    """A strategy cannot aggregate the updates it was given."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C after saving a checkpoint: ``raysim run --resume run_dir`` continues it."""

    def __init__(self, run_dir: object, round_index: int | None) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir
        self.round = round_index


class RaysimWarning(UserWarning):
    """Something the user asked for happened, but not as they would want (e.g. a privacy budget exceeded)."""
