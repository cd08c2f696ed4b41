"""A classify part built from the model's output arrays must equal the table that pyarrow
builds from the same rows as Python values, nulls included."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from cnnpipe.predictions.classify import PART_SCHEMA, PartRows

CLASSES = ["cat", "dög", ""]


def model_output(count: int, k: int, embedding_width: int):
    rng = np.random.default_rng(count)
    values = np.sort(rng.random((count, k), dtype=np.float32), axis=1)[:, ::-1].copy()
    indices = np.stack([rng.permutation(len(CLASSES))[:k] for _ in range(count)])
    calibrated = rng.random(count, dtype=np.float32)
    calibrated[::3] = np.nan
    return values, indices, calibrated, rng.random(count, dtype=np.float32), \
        rng.random((count, embedding_width), dtype=np.float32)


def as_python_rows(items, values, indices, calibrated, brightness, embeddings, run_id, predictor, built_at):
    """The rows as the per-row builder wrote them, one Python value a cell."""
    return {
        "image_sha256": [sha for sha, *_ in items], "source_uri": ["file:///data/ünïcødé/"] * len(items),
        "member_path": [path for _, path, *_ in items], "model_name": [predictor.name] * len(items),
        "model_version": [predictor.version] * len(items), "mlflow_run_id": [predictor.run_id] * len(items),
        "label": [CLASSES[row[0]] for row in indices.tolist()], "confidence": [row[0] for row in values.tolist()],
        "top5": [[{"label": CLASSES[i], "probability": p} for i, p in zip(row_indices, row_values)]
                 for row_indices, row_values in zip(indices.tolist(), values.tolist())],
        "width": [width for *_, width, _ in items], "height": [height for *_, height in items],
        "classify_run_id": [run_id] * len(items), "predicted_at": [built_at] * len(items),
        "calibrated_confidence": [None if c != c else c for c in calibrated.tolist()],
        "brightness": brightness.tolist(),
        "embedding": embeddings.tolist() if embeddings.shape[1] else [None] * len(items),
    }


@pytest.mark.parametrize("k, embedding_width, run_id", [(3, 64, "run"), (1, 0, "run"), (2, 8, None)],
                         ids=["top-3-embedded", "top-1-no-projection", "no-mlflow-run"])
def test_a_part_built_from_the_models_arrays_equals_pyarrows_own_from_python_rows(k, embedding_width, run_id):
    predictor = SimpleNamespace(classes=CLASSES, name="m", version="7", run_id=run_id)
    items = [(f"{i:064x}", f"dir/{'é' * (i % 3)}{i}.png", 32 + i, 2**31 - 1 - i) for i in range(50)]
    output = model_output(len(items), k, embedding_width)
    built = PartRows("file:///data/ünïcødé/", predictor, "run").batch(items, *output)
    built.validate(full=True)
    # Every row of a batch shares the moment it was built.
    built_at = datetime.fromtimestamp(built.column("predicted_at")[0].value / 1e6, timezone.utc)
    expected = pa.RecordBatch.from_pydict(as_python_rows(items, *output, "run", predictor, built_at),
                                          schema=PART_SCHEMA)
    assert built.equals(expected)
    assert pa.Table.from_batches([built, built]).num_rows == 100
