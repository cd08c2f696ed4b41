"""Arrow arrays built from NumPy buffers and Python strings, without a Python value per cell.

A classify part holds 4,096 rows of 16 columns, among them a top-5 list of structs and a
64-float embedding per image: built from Python values, a row at a time, that cost a tenth of
the model's own time on a 2-core CPU. These builders take the model's output arrays whole.
They also keep away from `pa.array` and `pa.table`, which import pandas, when it is installed,
only to ask whether the values are a pandas object: on a 2-core machine that import was over
half a second of every small `cnnpipe classify`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_NUMPY = {pa.float64(): np.float64, pa.float32(): np.float32, pa.int64(): np.int64, pa.int32(): np.int32}


def strings(values: list[str]) -> pa.Array:
    """A string array of `values` (no None)."""
    encoded = [value.encode() for value in values]
    return pa.Array.from_buffers(pa.string(), len(values), [None, _offsets(np.fromiter(map(len, encoded), np.int32,
                                                                                       len(values))),
                                                            pa.py_buffer(b"".join(encoded))])


def numbers(values: np.ndarray, kind: pa.DataType, valid: np.ndarray | None = None) -> pa.Array:
    """`values` as an Arrow array of `kind` (a float or integer type), null where `valid` is False."""
    values = np.ascontiguousarray(values, dtype=_NUMPY[kind])
    validity = None if valid is None or valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(kind, len(values), [validity, pa.py_buffer(values)])


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


def lists(values: pa.Array, width: int, kind: pa.DataType) -> pa.Array:
    """A list array of `kind` whose every row holds the next `width` of `values`."""
    count = len(values) // width
    return pa.Array.from_buffers(kind, count, [None, _offsets(np.full(count, width, np.int32))], children=[values])


def _offsets(lengths: np.ndarray) -> pa.Buffer:
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.py_buffer(offsets)
