"""Sensor samples in Parquet: one row per sample, sorted by sensor.

Schema (what :func:`write_samples` writes and :func:`inspect` accepts):

=========  ==========================================  =================================
column     type                                        meaning
=========  ==========================================  =================================
sensor     int64 (any integer type is accepted)        sensor id; any int64 values
label      int32 (any integer type is accepted)        class index, 0 ≤ label < classes
x          fixed_size_list<float32>[channels·window]   the window, row-major (channels, window)
=========  ==========================================  =================================

Schema metadata ``raysim.channels``, ``raysim.window`` and ``raysim.classes``
give the shape. A user's file may leave them out: then ``x`` may also be a
variable-length ``list<float>``/``list<double>`` column provided every row has
the same length, ``channels`` defaults to 1, ``window`` to that length and
``classes`` to the largest label + 1.

Rows are written sorted by sensor in row groups of moderate size, so reading a
shard of sensors with a filter skips the row groups that cannot hold them.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysim.errors import DataError

META_CHANNELS = b"raysim.channels"
META_WINDOW = b"raysim.window"
META_CLASSES = b"raysim.classes"

ROWS_PER_GROUP = 8192  # ~6 MB of float32 at 6×32; small enough that shards prune groups


def schema(channels: int, window: int, classes: int) -> pa.Schema:
    """The Arrow schema raysim writes, with its shape metadata."""
    return pa.schema(
        [
            pa.field("sensor", pa.int64(), nullable=False),
            pa.field("label", pa.int32(), nullable=False),
            pa.field("x", pa.list_(pa.float32(), channels * window), nullable=False),
        ],
        metadata={META_CHANNELS: str(channels), META_WINDOW: str(window), META_CLASSES: str(classes)},
    )


def _table(sensor: np.ndarray, x: np.ndarray, y: np.ndarray, sch: pa.Schema) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.Table.from_arrays(
        [
            pa.array(sensor, type=pa.int64()),
            pa.array(y, type=pa.int32()),
            pa.FixedSizeListArray.from_arrays(flat, type=sch.field("x").type),
        ],
        schema=sch,
    )


def write_samples(
    path: str | os.PathLike,
    chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    channels: int,
    window: int,
    classes: int,
) -> Path:
    """Stream ``(sensor_ids (n,), x (n, channels, window), y (n,))`` chunks into one Parquet file.

    Chunks must come in non-decreasing sensor order (rows within a chunk are
    stably sorted by sensor). The file appears atomically: it is written to a
    temporary name next to ``path`` and renamed, so readers never see half a file.
    """
    path = Path(path)
    sch = schema(channels, window, classes)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    pending: list[pa.Table] = []
    pending_rows = 0
    last_sensor: int | None = None
    try:
        with pq.ParquetWriter(tmp, sch, compression="zstd") as writer:
            for sensor, x, y in chunks:
                sensor = np.asarray(sensor, dtype=np.int64).reshape(-1)
                x = np.asarray(x)
                y = np.asarray(y).reshape(-1)
                if x.shape != (len(sensor), channels, window) or len(y) != len(sensor):
                    raise ValueError(
                        f"chunk shapes sensor {sensor.shape}, x {x.shape}, y {y.shape} do not match "
                        f"(n,), (n, {channels}, {window}), (n,)"
                    )
                if len(sensor) == 0:
                    continue
                order = np.argsort(sensor, kind="stable")
                sensor, x, y = sensor[order], x[order], y[order]
                if last_sensor is not None and sensor[0] < last_sensor:
                    raise ValueError(f"chunks must come in sensor order: sensor {sensor[0]} after {last_sensor}")
                last_sensor = int(sensor[-1])
                pending.append(_table(sensor, x, y, sch))
                pending_rows += len(sensor)
                if pending_rows >= ROWS_PER_GROUP:
                    writer.write_table(pa.concat_tables(pending), row_group_size=ROWS_PER_GROUP)
                    pending, pending_rows = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROWS_PER_GROUP)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass(frozen=True, eq=False)
class FileInfo:
    """What :func:`inspect` learned about a valid sample file."""

    path: Path
    channels: int
    window: int
    classes: int
    sensor_ids: np.ndarray  # sorted unique int64
    num_samples: np.ndarray  # int64, aligned with sensor_ids

    @property
    def rows(self) -> int:
        return int(self.num_samples.sum())


def _fail(path: Path, message: str) -> DataError:
    return DataError(f"data file {path}: {message}")


def _open(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise _fail(path, "does not exist; expected a Parquet file with columns 'sensor', 'label' and 'x'")
    if not path.is_file():
        raise _fail(path, "is not a file; expected a Parquet file with columns 'sensor', 'label' and 'x'")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise _fail(path, f"is not a readable Parquet file ({exc})") from None


def _metadata_int(path: Path, meta: dict[bytes, bytes], key: bytes) -> int | None:
    if key not in meta:
        return None
    raw = meta[key].decode(errors="replace")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise _fail(path, f"schema metadata '{key.decode()}' must be a positive integer, got {raw!r}")
    return value


def _check_schema(path: Path, sch: pa.Schema) -> pa.DataType:
    names = set(sch.names)
    for column in ("sensor", "label", "x"):
        if column not in names:
            raise _fail(
                path,
                f"column '{column}' is missing (it has {', '.join(repr(n) for n in sch.names) or 'no columns'}); "
                "expected columns 'sensor' (integer sensor id), 'label' (integer class) and "
                "'x' (list of float32, the window row-major (channels, window))",
            )
    for column, meaning in (("sensor", "integer sensor ids"), ("label", "integer class indices")):
        kind = sch.field(column).type
        if not pa.types.is_integer(kind):
            raise _fail(path, f"column '{column}' must hold {meaning} (e.g. int64), it has type {kind}")
    x_type = sch.field("x").type
    if not (pa.types.is_fixed_size_list(x_type) or pa.types.is_list(x_type) or pa.types.is_large_list(x_type)):
        raise _fail(path, f"column 'x' must be a list of float32 (one window per row), it has type {x_type}")
    item = x_type.value_type
    if not (pa.types.is_floating(item) or pa.types.is_integer(item)):
        raise _fail(path, f"column 'x' must be a list of numbers (float32), its items have type {item}")
    return x_type


def inspect(path: str | os.PathLike) -> FileInfo:
    """Validate a sample file and summarize it.

    Raises :class:`DataError` with one paragraph naming the file, the column
    and what was expected, for: a missing or non-Parquet file, missing columns,
    wrong column types, null values, rows whose window length differs,
    negative or out-of-range labels, NaN/Inf features, or no rows at all.
    """
    path = Path(path)
    pf = _open(path)
    sch = pf.schema_arrow
    x_type = _check_schema(path, sch)
    meta = sch.metadata or {}
    channels = _metadata_int(path, meta, META_CHANNELS)
    window = _metadata_int(path, meta, META_WINDOW)
    classes = _metadata_int(path, meta, META_CLASSES)
    expected_len: int | None = None
    if channels is not None and window is not None:
        expected_len = channels * window
    if pa.types.is_fixed_size_list(x_type):
        if expected_len is not None and x_type.list_size != expected_len:
            raise _fail(
                path,
                f"column 'x' must be a list of float32 of length channels×window = {channels}×{window} = "
                f"{expected_len}, it has fixed length {x_type.list_size}",
            )
    counts: dict[int, int] = {}
    label_max = -1
    row = 0
    length = expected_len
    try:
        batches = pf.iter_batches(columns=["sensor", "label", "x"], batch_size=65536)
        for batch in batches:
            n = batch.num_rows
            for column in ("sensor", "label", "x"):
                arr = batch.column(column)
                if arr.null_count:
                    first = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
                    raise _fail(path, f"column '{column}' must not hold nulls, row {row + first} is null")
            sensor = batch.column("sensor").to_numpy().astype(np.int64)
            label = batch.column("label").to_numpy()
            if len(label) and label.min() < 0:
                first = int(np.flatnonzero(label < 0)[0])
                raise _fail(
                    path, f"column 'label' must hold class indices ≥ 0, row {row + first} has {int(label[first])}"
                )
            if len(label):
                label_max = max(label_max, int(label.max()))
            if classes is not None and label_max >= classes:
                first = int(np.flatnonzero(label >= classes)[0])
                raise _fail(
                    path,
                    f"column 'label' must hold class indices below raysim.classes = {classes}, "
                    f"row {row + first} has {int(label[first])}",
                )
            x = batch.column("x")
            lengths = pc.list_value_length(x).to_numpy(zero_copy_only=False)
            if length is None and n:
                length = int(lengths[0])
            bad = np.flatnonzero(lengths != length)
            if len(bad):
                if expected_len is not None:
                    what = f"of length channels×window = {channels}×{window} = {expected_len}"
                else:
                    what = f"of the same length in every row (row 0 has {length})"
                got = int(lengths[bad[0]])
                raise _fail(
                    path,
                    f"column 'x' must be a list of float32 {what}, row {row + int(bad[0])} has "
                    f"{got} value{'' if got == 1 else 's'}",
                )
            values = x.flatten()
            if values.null_count:
                first = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // max(length, 1)
                raise _fail(path, f"column 'x' must not hold null values, row {row + first} has one")
            v = values.to_numpy(zero_copy_only=False)
            if v.dtype.kind == "f":
                finite = np.isfinite(v)
                if not finite.all():
                    first = int(np.flatnonzero(~finite)[0]) // max(length, 1)
                    raise _fail(path, f"column 'x' must hold finite numbers, row {row + first} has NaN or Inf")
            ids, id_counts = np.unique(sensor, return_counts=True)
            for i, c in zip(ids.tolist(), id_counts.tolist()):
                counts[i] = counts.get(i, 0) + c
            row += n
    except pa.ArrowException as exc:
        raise _fail(path, f"cannot be read past row {row} ({exc})") from None
    if row == 0:
        raise _fail(path, "has no rows; expected at least one sample in columns 'sensor', 'label' and 'x'")
    if length == 0:
        raise _fail(path, "column 'x' must hold at least one value per row, every row is empty")
    if channels is None and window is None:
        channels, window = 1, length
    elif channels is None or window is None:
        given, name = (channels, "raysim.channels") if channels is not None else (window, "raysim.window")
        if length % given:
            raise _fail(
                path,
                f"column 'x' has {length} values per row, which is not a multiple of schema metadata {name} = {given}",
            )
        channels, window = (given, length // given) if channels is not None else (length // given, given)
    if classes is None:
        classes = label_max + 1
    sensor_ids = np.array(sorted(counts), dtype=np.int64)
    num_samples = np.array([counts[i] for i in sensor_ids.tolist()], dtype=np.int64)
    return FileInfo(path, int(channels), int(window), int(classes), sensor_ids, num_samples)


def _shape(pf: pq.ParquetFile, path: Path) -> tuple[int, int]:
    # Trusts a file inspect() accepted; the shape rules are the same.
    meta = pf.schema_arrow.metadata or {}
    channels = _metadata_int(path, meta, META_CHANNELS)
    window = _metadata_int(path, meta, META_WINDOW)
    return channels or 0, window or 0


def _columns(table: pa.Table, path: Path, channels: int, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sensor = table.column("sensor").to_numpy().astype(np.int64, copy=False)
    y = table.column("label").to_numpy().astype(np.int64, copy=False)
    chunks = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in table.column("x").chunks]
    flat = np.concatenate(chunks) if chunks else np.empty(0)
    n = len(sensor)
    length = len(flat) // n if n else channels * window
    if not channels and not window:
        channels, window = 1, length
    elif not channels:
        channels = length // window
    elif not window:
        window = length // channels
    x = flat.astype(np.float32, copy=False).reshape(n, channels, window)
    return x, y, sensor


@dataclass(frozen=True, eq=False)
class Shard:
    """Some sensors' samples, columnar: sensor ``ids[i]`` owns rows ``starts[i] : starts[i] + counts[i]``."""

    ids: np.ndarray  # sorted unique int64
    starts: np.ndarray  # int64
    counts: np.ndarray  # int64
    x: np.ndarray  # float32 (rows, channels, window), one contiguous array
    y: np.ndarray  # int64 (rows,)

    def index(self, sensor_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Positions in ``ids`` of these sensor ids (each must be in the shard)."""
        sensor_ids = np.asarray(sensor_ids, dtype=np.int64)
        where = np.searchsorted(self.ids, sensor_ids)
        if len(sensor_ids) and (where.max() >= len(self.ids) or (self.ids[where] != sensor_ids).any()):
            raise KeyError(f"sensor ids not in this shard: {sorted(set(sensor_ids.tolist()) - set(self.ids.tolist()))[:10]}")
        return where

    def samples(self, sensor_id: int) -> tuple[np.ndarray, np.ndarray]:
        """One sensor's ``(x, y)``, as views of the shard's arrays."""
        i = int(self.index([sensor_id])[0])
        rows = slice(int(self.starts[i]), int(self.starts[i] + self.counts[i]))
        return self.x[rows], self.y[rows]


def read_shard(path: str | os.PathLike, sensor_ids: Sequence[int]) -> Shard:
    """Just these sensors' samples, as one columnar :class:`Shard`.

    Two passes over the row groups that may hold them (a group whose
    ``sensor`` statistics rule out every requested id is never read): the
    first reads only the ``sensor`` column to size the arrays, the second
    fills them one row group at a time, so memory peaks at the result plus one
    row group however large the file. Rows keep the file's order within a sensor.
    """
    path = Path(path)
    wanted = np.array(sorted({int(i) for i in sensor_ids}), dtype=np.int64)
    pf = _open(path)
    channels, window = _shape(pf, path)
    try:
        groups = _groups_that_may_hold(pf, wanted) if len(wanted) else []
        counts = np.zeros(len(wanted), dtype=np.int64)
        for group in groups:
            sensor = pf.read_row_group(group, columns=["sensor"]).column("sensor").to_numpy().astype(np.int64)
            hit = sensor[np.isin(sensor, wanted)]
            np.add.at(counts, np.searchsorted(wanted, hit), 1)
        missing = wanted[counts == 0].tolist()
        if missing:
            shown = ", ".join(str(i) for i in missing[:10]) + (" …" if len(missing) > 10 else "")
            raise _fail(path, f"column 'sensor' has no rows for sensor ids {shown}")
        starts = np.cumsum(counts) - counts
        fill = starts.copy()  # next free row of each sensor
        x = None
        y = np.empty(int(counts.sum()), dtype=np.int64)
        for group in groups:
            table = pf.read_row_group(group, columns=["sensor", "label", "x"])
            gx, gy, sensor = _columns(table, path, channels, window)
            if x is None:
                x = np.empty((len(y), *gx.shape[1:]), dtype=np.float32)
            keep = np.flatnonzero(np.isin(sensor, wanted))
            keep = keep[np.argsort(sensor[keep], kind="stable")]
            owner = np.searchsorted(wanted, sensor[keep])
            # Rows of one sensor are consecutive in `keep`; each goes to its sensor's next free rows.
            rank = np.arange(len(keep)) - np.searchsorted(owner, owner)
            rows = fill[owner] + rank
            x[rows], y[rows] = gx[keep], gy[keep]
            np.add.at(fill, owner, 1)
    except pa.ArrowException as exc:
        raise _fail(path, f"cannot be read ({exc})") from None
    if x is None:
        x = np.empty((0, channels, window), dtype=np.float32)
    return Shard(wanted, starts, counts, x, y)


def read_sensors(path: str | os.PathLike, sensor_ids: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{sensor_id: (x float32 (n, channels, window), y int64 (n,))}`` for just these sensors
    (views of one :func:`read_shard`)."""
    shard = read_shard(path, sensor_ids)
    return {int(i): (shard.x[s : s + c], shard.y[s : s + c])
            for i, s, c in zip(shard.ids, shard.starts, shard.counts)}


def _groups_that_may_hold(pf: pq.ParquetFile, wanted: np.ndarray) -> list[int]:
    """Row groups whose ``sensor`` min/max statistics admit one of the sorted ids ``wanted`` (all without statistics)."""
    meta = pf.metadata
    column = next((i for i in range(meta.num_columns) if meta.schema.column(i).path == "sensor"), None)
    groups = []
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(column).statistics if column is not None else None
        if stats is not None and stats.has_min_max:
            first = np.searchsorted(wanted, int(stats.min))
            if first == len(wanted) or wanted[first] > int(stats.max):
                continue
        groups.append(group)
    return groups


def read_all(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row as ``(x float32 (n, channels, window), y int64 (n,), sensor int64 (n,))``, in file order."""
    path = Path(path)
    pf = _open(path)
    channels, window = _shape(pf, path)
    try:
        table = pf.read(columns=["sensor", "label", "x"])
    except pa.ArrowException as exc:
        raise _fail(path, f"cannot be read ({exc})") from None
    return _columns(table, path, channels, window)
