"""The fleet: sensor profiles and sensor data shards, synthetic or the user's Parquet.

:func:`prepare_fleet` runs once on the driver. It makes sure a train and a test
Parquet file exist (generating synthetic ones into a content-addressed cache)
and builds the columnar :class:`FleetProfiles`. Client actors then read only
their own sensors with :func:`raysim.fleet.store.read_sensors` and apply
:func:`raysim.fleet.preprocess.apply` per sensor; preprocessing is never baked
into the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from raysim.errors import DataError
from raysim.fleet import preprocess, store, synthetic
from raysim.fleet.profiles import FleetProfiles, assign_tiers, build_profiles, tier_counts
from raysim.fleet.store import FileInfo, inspect, read_all, read_sensors, write_samples

if TYPE_CHECKING:
    from raysim.scenario import Scenario, SyntheticData

__all__ = [
    "FORMAT_VERSION",
    "FileInfo",
    "FleetData",
    "FleetProfiles",
    "assign_tiers",
    "build_profiles",
    "cache_key",
    "inspect",
    "prepare_fleet",
    "preprocess",
    "read_all",
    "read_sensors",
    "store",
    "synthetic",
    "tier_counts",
    "write_samples",
]

FORMAT_VERSION = 1
"""Bump when the generator or the file layout changes, so stale caches are not reused."""

_SENSORS_PER_CHUNK = 64  # sensors generated per write chunk; bounds memory at a few MB


@dataclass(frozen=True, eq=False)
class FleetData:
    """Where the fleet's data lives and what shape it has."""

    train_path: Path
    test_path: Path
    channels: int
    window: int
    classes: int
    profiles: FleetProfiles


def cache_key(data: "SyntheticData", seed: int, sensors: int) -> str:
    """Hash of everything that determines the generated files (preprocessing does not)."""
    content = {
        "format": FORMAT_VERSION,
        "seed": int(seed),
        "sensors": int(sensors),
        "data": data.model_dump(mode="json", exclude={"preprocess"}),
    }
    blob = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _chunks(parts: Iterator[tuple[int, np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    batch: list[tuple[int, np.ndarray, np.ndarray]] = []

    def flush() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sensor = np.concatenate([np.full(len(y), i, dtype=np.int64) for i, _, y in batch])
        x = np.concatenate([x for _, x, _ in batch])
        y = np.concatenate([y for _, _, y in batch])
        return sensor, x, y

    for part in parts:
        batch.append(part)
        if len(batch) == _SENSORS_PER_CHUNK:
            yield flush()
            batch = []
    if batch:
        yield flush()


def _entry_complete(entry: Path) -> bool:
    return (entry / "train.parquet").is_file() and (entry / "test.parquet").is_file()


def _generate(data: "SyntheticData", seed: int, sensors: int, entry: Path) -> None:
    """Write the cache entry ``entry`` atomically: build it in a temp dir, then rename."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        shape = dict(channels=data.channels, window=data.window, classes=data.classes)
        write_samples(tmp / "train.parquet", _chunks(synthetic.iter_sensors(data, seed, range(sensors))), **shape)
        write_samples(tmp / "test.parquet", _chunks(synthetic.iter_test_sensors(data, seed)), **shape)
        info = {"format": FORMAT_VERSION, "seed": seed, "sensors": sensors, "data": data.model_dump(mode="json")}
        (tmp / "config.json").write_text(json.dumps(info, indent=2) + "\n")
        if entry.exists() and not _entry_complete(entry):
            # A foreign or damaged directory in our slot: move it aside, then take the slot.
            stale = entry.parent / f".{entry.name}.{uuid.uuid4().hex}.stale"
            try:
                entry.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            except FileNotFoundError:
                pass
        try:
            tmp.rename(entry)
        except OSError:
            # Another process finished the same entry first; theirs is identical.
            if not _entry_complete(entry):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _synthetic(scenario: "Scenario", cache_dir: Path) -> FleetData:
    data = scenario.fleet.data
    sensors = scenario.fleet.sensors
    entry = Path(cache_dir) / cache_key(data, scenario.seed, sensors)
    if not _entry_complete(entry):
        _generate(data, scenario.seed, sensors, entry)
    sensor_ids = np.arange(sensors, dtype=np.int64)
    counts = synthetic.num_samples(data, scenario.seed, sensor_ids)
    return FleetData(
        train_path=entry / "train.parquet",
        test_path=entry / "test.parquet",
        channels=data.channels,
        window=data.window,
        classes=data.classes,
        profiles=build_profiles(scenario, sensor_ids, counts, _tier_seconds(scenario, data.channels, data.window,
                                                                         data.classes)),
    )


def _parquet(scenario: "Scenario") -> FleetData:
    data = scenario.fleet.data
    train = inspect(scenario.resolve_path(data.path))
    test = inspect(scenario.resolve_path(data.test_path))
    if (test.channels, test.window) != (train.channels, train.window):
        raise DataError(
            f"data file {test.path}: column 'x' must have the training file's shape "
            f"(channels, window) = ({train.channels}, {train.window}) from {train.path}, "
            f"it has ({test.channels}, {test.window})"
        )
    if len(train.sensor_ids) != scenario.fleet.sensors:
        raise DataError(
            f"data file {train.path}: column 'sensor' holds {len(train.sensor_ids)} distinct sensor ids, "
            f"but the scenario's fleet.sensors is {scenario.fleet.sensors}; set fleet.sensors to "
            f"{len(train.sensor_ids)} or use a file with {scenario.fleet.sensors} sensors"
        )
    return FleetData(
        train_path=train.path,
        test_path=test.path,
        channels=train.channels,
        window=train.window,
        classes=max(train.classes, test.classes),
        profiles=build_profiles(scenario, train.sensor_ids, train.num_samples,
                                _tier_seconds(scenario, train.channels, train.window, max(train.classes, test.classes))),
    )


def _tier_seconds(scenario: "Scenario", channels: int, window: int, classes: int) -> list[float] | None:
    """Per-tier median seconds per sample when some tier derives it from its model's FLOPs, else None."""
    if all(t.seconds_per_sample is not None for t in scenario.fleet.tiers):
        return None
    from raysim.architectures import tier_seconds_per_sample

    return tier_seconds_per_sample(scenario, channels, window, classes)


def prepare_fleet(scenario: "Scenario", cache_dir: Path) -> FleetData:
    """Make the fleet's train/test files available and build its profiles.

    Synthetic data is generated into ``cache_dir / <cache_key>/{train,test}.parquet``
    and reused while the data config, seed and fleet size stay the same. A user's
    Parquet files are validated with :func:`inspect`; profile positions follow
    their sorted sensor ids.
    """
    fleet = _synthetic(scenario, Path(cache_dir)) if scenario.fleet.data.kind == "synthetic" else _parquet(scenario)
    if scenario.personalization is not None:  # the samples each sensor keeps aside are not trained on
        from raysim.architectures import holdout_counts

        counts = fleet.profiles.num_samples
        kept = counts - holdout_counts(counts, scenario.personalization.holdout)
        fleet = replace(fleet, profiles=replace(fleet.profiles, num_samples=kept))
    return fleet


def load_proxy(scenario: "Scenario", fleet: FleetData) -> np.ndarray:
    """The public unlabeled proxy set, float32 (P, C, T), each proxy sensor's windows preprocessed as that
    sensor's pipeline would (per-sensor z-score included), so the proxy set looks like the fleet's data.

    Synthetic fleets draw it from the generator; Parquet fleets read the
    first ``proxy.samples`` windows of ``proxy.path`` (labels ignored).
    """
    samples = scenario.proxy.samples
    if scenario.fleet.data.kind == "synthetic":
        x, sensor = synthetic.proxy_set(scenario.fleet.data, scenario.seed, samples)
    else:
        x, _, sensor = _side_file(scenario, fleet, scenario.proxy.path, "proxy.path", "proxy.samples", samples)
    return _per_sensor(scenario, x, sensor)


def load_validation(scenario: "Scenario", fleet: FleetData) -> tuple[np.ndarray, np.ndarray]:
    """The labelled validation set contribution scores use, ``(x, y)``, preprocessed per sensor; never the
    test set. Synthetic fleets draw ``contribution.validation_samples`` windows from their own unseen sensors;
    Parquet fleets read the first that many of ``contribution.validation_path``."""
    config = scenario.contribution
    samples = config.validation_samples
    if scenario.fleet.data.kind == "synthetic":
        x, y, sensor = synthetic.validation_set(scenario.fleet.data, scenario.seed, samples)
    else:
        x, y, sensor = _side_file(scenario, fleet, config.validation_path, "contribution.validation_path",
                                  "contribution.validation_samples", samples)
    return _per_sensor(scenario, x, sensor), np.asarray(y, dtype=np.int64)


def _side_file(scenario: "Scenario", fleet: FleetData, path: str, field: str, count_field: str,
               samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``samples`` rows ``(x, y, sensor)`` of a Parquet file beside the fleet's, checked."""
    info = inspect(scenario.resolve_path(path))
    if (info.channels, info.window) != (fleet.channels, fleet.window):
        raise DataError(f"data file {info.path} ({field}): column 'x' must have the fleet's shape "
                        f"(channels, window) = ({fleet.channels}, {fleet.window}), it has "
                        f"({info.channels}, {info.window})")
    x, y, sensor = read_all(info.path)
    if len(x) < samples:
        raise DataError(f"data file {info.path} ({field}) holds {len(x)} samples, fewer than {count_field} "
                        f"= {samples}; lower {count_field} or use a larger file")
    return x[:samples], y[:samples], sensor[:samples]


def _per_sensor(scenario: "Scenario", x: np.ndarray, sensor: np.ndarray) -> np.ndarray:
    """``x`` preprocessed one sensor at a time, as each sensor's own pipeline would."""
    out = np.empty_like(x, dtype=np.float32)
    for sid in np.unique(sensor):
        rows = sensor == sid
        out[rows] = preprocess.apply(x[rows], scenario.fleet.data.preprocess)
    return out
