"""Tables built from buffers must equal what `pa.table` builds from the same values."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from cnnpipe.predictions.arrow_rows import table_from_columns
from cnnpipe.predictions.classify import PART_SCHEMA


def part_rows(count: int, nulls: bool) -> dict[str, list]:
    now = datetime(2026, 12, 3, 13, 0, 0, 123456, tzinfo=timezone.utc)
    rows = {
        "image_sha256": [f"{i:064x}" for i in range(count)], "source_uri": ["file:///data/ünïcødé/"] * count,
        "member_path": [f"dir/{'é' * (i % 3)}{i}.png" for i in range(count)], "model_name": ["m"] * count,
        "model_version": [str(i % 2 + 1) for i in range(count)], "mlflow_run_id": ["abc"] * count,
        "label": [("cat", "dog", "")[i % 3] for i in range(count)], "confidence": [i / count for i in range(count)],
        "top5": [[{"label": "cat", "probability": 0.5 - j / 10} for j in range(i % 6)] for i in range(count)],
        "width": [32 + i for i in range(count)], "height": [2**31 - 1 - i for i in range(count)],
        "classify_run_id": ["run"] * count, "predicted_at": [now + timedelta(microseconds=i) for i in range(count)],
        "calibrated_confidence": [i / 7 for i in range(count)],
        "brightness": [i / 3 for i in range(count)],
        "embedding": [[i + j / 8 for j in range(i % 4 + 1)] for i in range(count)],
    }
    if nulls:
        for name in rows:
            rows[name][::3] = [None] * len(rows[name][::3])
    return rows


@pytest.mark.parametrize("nulls", [False, True], ids=["no-nulls", "nulls"])
def test_a_part_built_from_buffers_equals_pyarrows_own(nulls):
    rows = part_rows(50, nulls)
    built = table_from_columns(rows, PART_SCHEMA)
    built.validate(full=True)
    assert built.equals(pa.table(rows, schema=PART_SCHEMA))


def test_an_empty_part():
    assert table_from_columns({name: [] for name in PART_SCHEMA.names}, PART_SCHEMA).num_rows == 0


def test_a_type_without_a_builder_is_refused():
    with pytest.raises(TypeError, match="bool"):
        table_from_columns({"flag": [True]}, pa.schema([("flag", pa.bool_())]))
