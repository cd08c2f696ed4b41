"""Arrow arrays built from NumPy buffers and Python strings and bytes, without a Python value per cell.

A classify part holds 8,192 rows of 16 columns, among them a top-5 list of structs and a
64-float embedding per image: built from Python values, a row at a time, that cost a tenth of
the model's own time on a 2-core CPU. These builders take the model's output arrays whole.
They also keep away from `pa.array` and `pa.table`, which import pandas, when it is installed,
only to ask whether the values are a pandas object: on a 2-core machine that import was over
half a second of every small `cnnpipe classify`, and 0.3 s of an ingest of 2,000 photos.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NUMPY = {pa.float64(): np.float64, pa.float32(): np.float32, pa.int64(): np.int64, pa.int32(): np.int32}
# Arrow's string and binary arrays address their bytes with 32-bit offsets.
_CHUNK_BYTES = 2**31 - 1


def strings(values: Sequence[str | None]) -> pa.Array:
    """A string array of `values`, null where one is None."""
    return _variable(pa.string(), [b"" if value is None else value.encode() for value in values],
                     _validity([value is not None for value in values]) if None in values else None)


def binaries(values: Sequence[bytes]) -> pa.Array | pa.ChunkedArray:
    """A binary array of `values` (no None); chunked where they hold more than 32-bit offsets can address."""
    if sum(map(len, values)) <= _CHUNK_BYTES:
        return _variable(pa.binary(), values)
    chunks, start, size = [], 0, 0
    for end, value in enumerate(values):
        if size + len(value) > _CHUNK_BYTES and end > start:
            chunks.append(_variable(pa.binary(), values[start:end]))
            start, size = end, 0
        size += len(value)
    chunks.append(_variable(pa.binary(), values[start:]))
    return pa.chunked_array(chunks, pa.binary())


def numbers(values: np.ndarray, kind: pa.DataType, valid: np.ndarray | None = None) -> pa.Array:
    """`values` as an Arrow array of `kind` (a float or integer type), null where `valid` is False."""
    values = np.ascontiguousarray(values, dtype=_NUMPY[kind])
    validity = None if valid is None or valid.all() else _validity(valid)
    return pa.Array.from_buffers(kind, len(values), [validity, pa.py_buffer(values)])


def optional_integers(values: Sequence[int | None], kind: pa.DataType) -> pa.Array:
    """An integer array of `values`, null where one is None."""
    if None not in values:
        return numbers(np.array(values, dtype=_NUMPY[kind]), kind)
    return numbers(np.array([0 if value is None else value for value in values], dtype=_NUMPY[kind]), kind,
                   valid=np.array([value is not None for value in values]))


def taken(dictionary: pa.Array, indices: np.ndarray) -> pa.Array:
    """`dictionary[indices]`: class names by class index, say."""
    return dictionary.take(numbers(indices.reshape(-1), pa.int64()))


def repeated(value: str | None, count: int) -> pa.Array:
    """A string array holding `value` (None: null) `count` times."""
    if value is None:
        return pa.nulls(count, pa.string())
    return taken(strings([value]), np.zeros(count, np.int64))


def timestamps(moment_micros: np.ndarray) -> pa.Array:
    """UTC timestamps, in microseconds since the epoch."""
    return numbers(moment_micros, pa.int64()).view(pa.timestamp("us", tz="UTC"))


def moments(values: Sequence[datetime]) -> pa.Array:
    """UTC timestamps of aware datetimes (a column holds few distinct ones: each converts once)."""
    micros = {moment: (moment - _EPOCH) // timedelta(microseconds=1) for moment in set(values)}
    return timestamps(np.fromiter((micros[moment] for moment in values), np.int64, len(values)))


def lists(values: pa.Array, width: int, kind: pa.DataType) -> pa.Array:
    """A list array of `kind` whose every row holds the next `width` of `values`."""
    count = len(values) // width
    return pa.Array.from_buffers(kind, count, [None, _offsets(np.full(count, width, np.int32))], children=[values])


def _variable(kind: pa.DataType, encoded: Sequence[bytes], validity: pa.Buffer | None = None) -> pa.Array:
    lengths = np.fromiter(map(len, encoded), np.int32, len(encoded))
    return pa.Array.from_buffers(kind, len(encoded), [validity, _offsets(lengths), pa.py_buffer(b"".join(encoded))])


def _validity(valid) -> pa.Buffer:
    return pa.py_buffer(np.packbits(np.asarray(valid, dtype=bool), bitorder="little"))


def _offsets(lengths: np.ndarray) -> pa.Buffer:
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.py_buffer(offsets)
