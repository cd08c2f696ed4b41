"""What goes into the predictions database and what its writers read back: predictions, champions,
labels, reference profiles. Each write runs in one `transaction` of `cnnpipe.predictions.database`."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import duckdb

from cnn.config import EMBEDDING_DIM
from cnnpipe.errors import CnnpipeError
from cnnpipe.models.refs import CHAMPION, parse_model_ref
from cnnpipe.predictions.database import (_ADDED_COLUMNS, _FOLD_INTO_LATEST, _SUMMARISED, connect_for_writing,
                                          rebuild_latest, transaction)
from cnnpipe.predictions.summary import fold_into_summary, note_labels, rescore_summary


def add_predictions(connection: duckdb.DuckDBPyConnection, select: str, parameters: list | None = None) -> int:
    """Insert the rows of `select` (the predictions columns, by name, and an `embedding` list
    when the model has one) into `predictions` and `embeddings`, skipping ones already there,
    and fold them into `latest_by_image`. Returns how many were new. Run it inside
    the caller's transaction, so both tables change together or not at all."""
    connection.execute(f"CREATE OR REPLACE TEMP TABLE incoming AS {select}", parameters or [])
    # Parts staged before a column was added (a run killed across an upgrade) still commit.
    for name, kind in (*_ADDED_COLUMNS, ("embedding", "FLOAT[]")):
        connection.execute(f"ALTER TABLE incoming ADD COLUMN IF NOT EXISTS {name} {kind}")
    connection.execute(f"INSERT INTO embeddings SELECT image_sha256, model_name, model_version, "
                       f"embedding::FLOAT[{EMBEDDING_DIM}] FROM incoming WHERE embedding IS NOT NULL "
                       "ON CONFLICT DO NOTHING")
    cursor = connection.execute("INSERT INTO predictions BY NAME SELECT * EXCLUDE (embedding) FROM incoming "
                                f"ON CONFLICT DO NOTHING RETURNING {', '.join(_SUMMARISED)}")
    with warnings.catch_warnings():  # the copy it warns of is of one part's new rows, a few columns
        warnings.filterwarnings("ignore", "Arrow output on a DB-API result")
        new_rows = cursor.to_arrow_table()
    connection.register("new_rows", new_rows)
    # The new rows' embeddings from this part rather than the embeddings table, which a join would scan
    # whole; one a key, as the embeddings table keeps one of an image a part holds twice.
    fold_into_summary(connection, "new_rows", "(SELECT image_sha256, model_name, model_version, any_value(embedding) "
                                              "AS embedding FROM incoming WHERE embedding IS NOT NULL GROUP BY ALL)")
    connection.unregister("new_rows")
    connection.execute("ALTER TABLE incoming DROP COLUMN embedding")
    connection.execute(_FOLD_INTO_LATEST)
    connection.execute("DROP TABLE incoming")
    return len(new_rows)


def set_champion(connection: duckdb.DuckDBPyConnection, model_name: str, model_version: str | None) -> None:
    """Record the champion (None: no champion) and recompute which prediction is latest per image."""
    connection.execute("DELETE FROM champions WHERE model_name = ?", [model_name])
    if model_version is not None:
        connection.execute("INSERT INTO champions VALUES (?, ?, now())", [model_name, model_version])
    rebuild_latest(connection)


def labelled_version(database: Path, dataset: str) -> str | None:
    """The dataset version whose labels `ground_truth` holds, or None."""
    with connect_for_writing(database) as connection:
        found = connection.execute("SELECT any_value(dataset_version) FROM ground_truth WHERE dataset = ?",
                                   [dataset]).fetchone()
    return found[0] if found else None


def record_ground_truth(database: Path, dataset: str, version_id: str, labels) -> int:
    """Replace the dataset's labels with `labels` (an Arrow table of `sha256` and `label`), those of
    version `version_id`, in one transaction. Returns how many images are labelled."""
    with transaction(database) as connection:
        connection.register("labels", labels)
        # Every image whose label this can change: the dataset's until now, which lose theirs unless
        # relabelled, and those it labels now, another dataset's included (the label recorded last counts).
        note_labels(connection, "(SELECT image_sha256 FROM ground_truth WHERE dataset = ? UNION ALL "
                                "SELECT sha256 FROM labels)", [dataset])
        connection.execute("DELETE FROM ground_truth WHERE dataset = ?", [dataset])
        connection.execute("INSERT OR REPLACE INTO ground_truth SELECT sha256, any_value(label), ?, ?, now() "
                           "FROM labels GROUP BY sha256", [dataset, version_id])
        connection.unregister("labels")
        rescore_summary(connection)
    return len(labels)


def record_reference_profile(database: Path, model_name: str, model_version: str, dataset_version: str,
                             profile: dict) -> None:
    """Keep a version's reference profile (`cnn.monitoring.reference_profile`), replacing an older one."""
    key = [model_name, model_version]
    with transaction(database) as connection:
        for table in ("reference_profiles", "reference_classes", "reference_confidence"):
            connection.execute(f"DELETE FROM {table} WHERE model_name = ? AND model_version = ?", key)
        connection.execute("INSERT INTO reference_profiles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())", [
            *key, dataset_version, profile["images"], profile["temperature"], finite_or_null(profile["top1"]),
            finite_or_null(profile["mean_confidence"]), finite_or_null(profile["low_confidence_share"]), profile["width"]["mean"],
            profile["height"]["mean"], profile["brightness"]["mean"], profile["brightness"]["std"],
            json.dumps(profile)])
        connection.executemany("INSERT INTO reference_classes VALUES (?, ?, ?, ?, ?)", [
            [*key, row["label"], row["predicted_share"], row["true_share"]] for row in profile["classes"]])
        connection.executemany("INSERT INTO reference_confidence VALUES (?, ?, ?, ?, ?, ?, ?)", [
            [*key, index, row["low"], row["high"], row["share"], row["accuracy"]]
            for index, row in enumerate(profile["confidence_bins"])])


def version_condition(model_ref: str, table: str) -> str:
    """SQL keeping the rows of `table` (any with model_name and model_version) that one model
    made: NAME (every version), NAME/VERSION, or NAME@champion (its version in `champions`)."""
    ref = parse_model_ref(model_ref) if "@" in model_ref or "/" in model_ref else None
    name = _quoted(ref.name if ref else model_ref.strip())
    if ref is None:
        return f"{table}.model_name = {name}"
    if ref.version:
        return f"{table}.model_name = {name} AND {table}.model_version = {_quoted(ref.version)}"
    if ref.alias == CHAMPION:
        return (f"{table}.model_name = {name} AND {table}.model_version = "
                f"(SELECT model_version FROM champions c WHERE c.model_name = {name})")
    raise CnnpipeError(f"--model {model_ref}: give NAME, NAME/VERSION or NAME@{CHAMPION}; the predictions "
                       f"database knows no other alias")


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def finite_or_null(value: float | None) -> float | None:
    """A figure as SQL keeps it: NaN and infinities (nothing measured) become NULL."""
    return value if value is not None and math.isfinite(value) else None


def reference_temperature(database: Path, model_name: str, model_version: str) -> float | None:
    """The temperature that calibrates a version's confidences, from its reference profile, if it has one."""
    if not database.exists():
        return None
    with connect_for_writing(database) as connection:
        found = connection.execute("SELECT temperature FROM reference_profiles WHERE model_name = ? AND "
                                   "model_version = ?", [model_name, model_version]).fetchone()
    return found[0] if found else None
