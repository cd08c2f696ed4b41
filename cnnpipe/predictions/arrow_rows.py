"""Arrow tables from columns of Python values, built from their buffers.

`pa.array` and `pa.table` import pandas, when it is installed, only to ask whether the values
are a pandas object; on a 2-core machine that import was over half a second of every small
`cnnpipe classify`. These builders cover the types a classify part holds.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from itertools import chain
from operator import itemgetter

import numpy as np
import pyarrow as pa

_NUMPY = {pa.float64(): np.float64, pa.float32(): np.float32, pa.int64(): np.int64, pa.int32(): np.int32}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def table_from_columns(columns: dict[str, list], schema: pa.Schema) -> pa.Table:
    """What `pa.table(columns, schema=schema)` gives, for string, integer, float, UTC timestamp,
    struct and list fields; None is null."""
    return pa.Table.from_arrays([column(columns[field.name], field.type) for field in schema], schema=schema)


def column(values: list, kind: pa.DataType) -> pa.Array:
    count = len(values)
    nulls = None in values
    validity = pa.py_buffer(np.packbits([value is not None for value in values], bitorder="little")) if nulls else None
    if pa.types.is_string(kind):
        encoded = [b"" if value is None else value.encode() for value in values] if nulls else \
            [value.encode() for value in values]
        return pa.Array.from_buffers(kind, count, [validity, _offsets(map(len, encoded), count),
                                                   pa.py_buffer(b"".join(encoded))])
    if pa.types.is_list(kind):
        present = [value for value in values if value is not None] if nulls else values
        lengths = [0 if value is None else len(value) for value in values] if nulls else map(len, values)
        return pa.Array.from_buffers(kind, count, [validity, _offsets(lengths, count)],
                                     children=[column(list(chain.from_iterable(present)), kind.value_type)])
    if pa.types.is_struct(kind):
        return pa.Array.from_buffers(kind, count, [validity], children=[
            column([None if value is None else value[field.name] for value in values] if nulls else
                   list(map(itemgetter(field.name), values)), field.type) for field in kind])
    if pa.types.is_timestamp(kind) and kind.unit == "us":
        # A part's rows share a handful of timestamps: each is converted once.
        micros = {value: (value - _EPOCH) // timedelta(microseconds=1) for value in set(values) - {None}}
        numbers = np.fromiter((micros.get(value, 0) for value in values), np.int64, count)
    elif kind in _NUMPY:
        numbers = np.fromiter((0 if value is None else value for value in values), _NUMPY[kind], count) if nulls \
            else np.fromiter(values, _NUMPY[kind], count)
    else:
        raise TypeError(f"no buffer builder for Arrow type {kind}")
    return pa.Array.from_buffers(kind, count, [validity, pa.py_buffer(numbers)])


def _offsets(lengths, count: int) -> pa.Buffer:
    offsets = np.zeros(count + 1, np.int32)
    np.cumsum(np.fromiter(lengths, np.int32, count), out=offsets[1:])
    return pa.py_buffer(offsets)
