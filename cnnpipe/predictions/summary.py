"""The prediction summaries and the monitoring views over them: what a model predicted in a classify run,
or on a day, against its reference profile, and how often it was right once labels arrived. Part of the
predictions database's schema; `cnnpipe.monitoring` reads them.

For each batch of predictions by a version with a reference profile (`reference_profiles`,
written when the version was registered):
- `psi` and `js_distance`: the population stability index and the Jensen-Shannon distance
  (base 2, in [0, 1]) between the predicted-class shares and the reference's, with shares
  floored at 1e-4 so that a class never predicted is a large shift, not a division by zero;
  `psi_limit`, what PSI must pass to alert: its threshold, or what chance alone reaches one
  time in 1,000 between a batch and a reference of these sizes, whichever is larger (a small
  held-out split makes a noisy reference);
- `estimated_accuracy`: the mean calibrated confidence, which estimates accuracy without
  labels when confidences are calibrated (the idea behind NannyML's CBPE), and
  `confidence_shift`, its distance from the reference's;
- `low_confidence_share` (calibrated confidence below 0.5) and its shift;
- `rejected_rate`: inputs rejected as unreadable or unsafe, of all inputs;
- `size_shift`: the relative change of the mean width or height, whichever is larger;
  `brightness_shift`: the change of mean brightness (0-1);
- `embedding_shift`: how far the batch's mean embedding lies from the reference's, in the
  reference's standard deviations (the root mean square over the embedding's dimensions), and
  `embedding_shift_limit`, what it must pass to alert: its threshold, or what chance alone
  reaches one time in 1,000 between a batch and a reference of these sizes. It sees inputs the
  model still labels as confidently as ever but sees otherwise (recoloured, another camera);
  NULL for a version whose reference has no embeddings (registered before them);
- `alert`: true when any figure passes its threshold in `drift_thresholds`.
Predictions made before a version had a temperature fall back to their raw confidence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from cnn.config import EMBEDDING_DIM
from cnnpipe.errors import CnnpipeError

# Thresholds a team may change in its database (`cnnpipe monitor thresholds --set`); the defaults fire on
# under 5% of in-distribution batches of 1,000 images and on over 95% of shifted ones (tests/cnnpipe/test_drift.py).
DEFAULT_THRESHOLDS = {
    "psi": (0.05, "population stability index of the predicted classes above this, and above chance"),
    "confidence_drop": (0.1, "mean calibrated confidence this far below the reference"),
    "low_confidence_rise": (0.15, "share of low-confidence predictions this far above the reference"),
    "rejected_rate": (0.1, "share of inputs rejected above this"),
    "size_shift": (0.25, "mean width or height this far from the reference, relatively"),
    "brightness_shift": (0.1, "mean brightness (0-1) this far from the reference"),
    "embedding_shift": (0.1, "mean embedding this many reference standard deviations away, and above chance"),
}
# What a threshold can sensibly be: each is compared with a distance, so never below 0; the confidence,
# share and brightness figures live in 0-1, so a threshold above 1 could never fire. PSI, the
# relative size change and the embedding shift (in standard deviations) have no upper bound.
THRESHOLD_RANGES = {"psi": (0.0, math.inf), "confidence_drop": (0.0, 1.0), "low_confidence_rise": (0.0, 1.0),
                    "rejected_rate": (0.0, 1.0), "size_shift": (0.0, math.inf), "brightness_shift": (0.0, 1.0),
                    "embedding_shift": (0.0, math.inf)}
SMALLEST_SHARE = 1e-4
# A calibrated confidence under this is a low-confidence prediction, in every view and command.
LOW_CONFIDENCE = 0.5


# What every monitoring view sums, kept in two tables as predictions arrive (`fold_into_summary`) and
# labels change (`note_labels`, then `rescore_summary`), in the writer's own transaction, so that no
# committed prediction or label is ever left out of them and the views read only these tables:
# - `run_summary`, per classify run, model version and predicted label, for `drift_by_run`;
# - `daily_summary`, per day, model version and predicted label, for `drift_daily`,
#   `production_accuracy` and `class_counts`; only it counts labels.
# Each is as fine as its views need and no finer. The one table they replace (`LEGACY_SUMMARY`) kept a
# row per run *and* day: a run's rows spread over every day it had predictions, so it grew with
# history, and drift_daily and production_accuracy grew with it (4x and 2.5x from 3 M to 30 M
# predictions in bench/views.py). Runs times labels and days times labels stay small for years.
_FIGURES = ("predicted", "confidence_sum", "low_confidence", "width_sum", "sized", "height_sum", "brightness_sum",
            "measured")
_LABEL_FIGURES = ("labelled", "correct")
_FIGURE_TYPES = ("predicted BIGINT, confidence_sum DOUBLE, low_confidence BIGINT, width_sum HUGEINT, sized BIGINT, "
                 "height_sum HUGEINT, brightness_sum DOUBLE, measured BIGINT")
_EMBEDDING_TYPES = f"embedded BIGINT, embedding_sum DOUBLE[{EMBEDDING_DIM}]"
# Each summary table and its key.
SUMMARY_KEYS = {"run_summary": ("classify_run", "model_name", "model_version", "label"),
                "daily_summary": ("day", "model_name", "model_version", "label")}
SUMMARY_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS run_summary (
    classify_run VARCHAR NOT NULL, model_name VARCHAR NOT NULL, model_version VARCHAR NOT NULL, label VARCHAR NOT NULL,
    {_FIGURE_TYPES}, {_EMBEDDING_TYPES},
    PRIMARY KEY (classify_run, model_name, model_version, label)
);
CREATE TABLE IF NOT EXISTS daily_summary (
    day DATE NOT NULL, model_name VARCHAR NOT NULL, model_version VARCHAR NOT NULL, label VARCHAR NOT NULL,
    {_FIGURE_TYPES}, labelled BIGINT, correct BIGINT, {_EMBEDDING_TYPES},
    PRIMARY KEY (day, model_name, model_version, label)
);
"""
# The summary of releases before issue 32, per classify run *and* day. A database that has it gets the
# two tables above summed from it, which is exact and reads thousands of rows rather than every
# prediction, unless it lacks the embedding columns (older still): then they are rebuilt from the
# predictions and embeddings. It is dropped once they are in place (`cnnpipe.predictions.database`).
LEGACY_SUMMARY = "prediction_summary"


def _summed(vectors: str) -> str:
    """SQL for the element-wise sum of the EMBEDDING_DIM-long vectors `vectors` over a group: DuckDB
    has no such aggregate, and a list of per-element sums stays one pass over the rows."""
    return f"[{', '.join(f'sum({vectors}[{k}])' for k in range(1, EMBEDDING_DIM + 1))}]"


# The figures of relation `rows` (predictions' columns) per classify run, day, model version and
# label, with their labels and embeddings: the finest grain, which each table then sums over. Never
# NULL: sum() of only NULLs is NULL, and so is count_if() of only NULLs (no label yet), which the
# `+` of a later commit would keep NULL for good; 0 is what the views read where nothing was counted.
_GRAINED = f"""
SELECT coalesce(p.classify_run_id, '') AS classify_run, CAST(p.predicted_at AS DATE) AS day, p.model_name,
       p.model_version, p.label, count(*) AS predicted,
       sum(coalesce(p.calibrated_confidence, p.confidence)) AS confidence_sum,
       count_if(coalesce(p.calibrated_confidence, p.confidence) < {LOW_CONFIDENCE}) AS low_confidence,
       coalesce(sum(p.width), 0) AS width_sum, count(p.width) AS sized, coalesce(sum(p.height), 0) AS height_sum,
       coalesce(sum(p.brightness), 0) AS brightness_sum, count(p.brightness) AS measured,
       count(g.label) AS labelled, count_if(coalesce(g.label = p.label, false)) AS correct,
       count(e.embedding) AS embedded, CASE WHEN count(e.embedding) > 0 THEN {_summed("e.embedding")} END
           AS embedding_sum
FROM {{rows}} p LEFT JOIN ground_truth g USING (image_sha256)
LEFT JOIN {{embeddings}} e USING (image_sha256, model_name, model_version)
GROUP BY ALL
"""


def _roll_up(table: str) -> str:
    """SQL adding relation `{grained}` (`_GRAINED`'s columns) into summary `table`, summed to its key."""
    figures = _FIGURES + (_LABEL_FIGURES if table == "daily_summary" else ())
    key = ", ".join(SUMMARY_KEYS[table])
    return f"""
INSERT INTO {table} BY NAME
SELECT {key}, {", ".join(f"coalesce(sum({c}), 0) AS {c}" for c in figures)}, coalesce(sum(embedded), 0) AS embedded,
       CASE WHEN sum(embedded) > 0 THEN {_summed("embedding_sum")} END AS embedding_sum
FROM {{grained}} GROUP BY ALL
ON CONFLICT ({key}) DO UPDATE SET {", ".join(f"{c} = {table}.{c} + EXCLUDED.{c}" for c in figures)},
    embedded = {table}.embedded + EXCLUDED.embedded,
    embedding_sum = CASE WHEN {table}.embedding_sum IS NULL THEN EXCLUDED.embedding_sum
                         WHEN EXCLUDED.embedding_sum IS NULL THEN {table}.embedding_sum
                         ELSE list_transform(range(1, {EMBEDDING_DIM + 1}),
                                             lambda k: {table}.embedding_sum[k] + EXCLUDED.embedding_sum[k])
                    END
"""


def _add_to_summaries(connection, grained: str) -> None:
    for table in SUMMARY_KEYS:
        connection.execute(_roll_up(table).format(grained=grained))


def fold_into_summary(connection, rows: str, embeddings: str = "embeddings") -> None:
    """Add the predictions in relation `rows` (new ones, never seen before) to the summaries, with
    their labels and their embeddings from relation `embeddings` (at most one row per image and
    model version). Run it in the transaction that inserts them."""
    # Grouped once into a temporary table that both summaries sum: the joins run once, not once a table.
    connection.execute("CREATE OR REPLACE TEMP TABLE summary_grained AS "
                       + _GRAINED.format(rows=rows, embeddings=embeddings))
    _add_to_summaries(connection, "summary_grained")
    connection.execute("DROP TABLE summary_grained")


def summary_from_legacy(connection) -> None:
    """Fill the summaries from `LEGACY_SUMMARY` (with its embedding columns), which has their columns
    at a finer grain: the same sums without reading a prediction."""
    _add_to_summaries(connection, LEGACY_SUMMARY)


def note_labels(connection, images: str, parameters: list | None = None) -> None:
    """Before `ground_truth` changes: note the labels of the images in relation `images` (a column
    `image_sha256`), every image the change may touch, for `rescore_summary` to compare."""
    connection.execute("CREATE OR REPLACE TEMP TABLE label_moves AS SELECT i.image_sha256, g.label AS old_label "
                       f"FROM (SELECT DISTINCT image_sha256 FROM {images}) i LEFT JOIN ground_truth g "
                       "USING (image_sha256)", parameters or [])


# Only the images whose label changed move counts, by what their predictions lose with the old label
# and gain with the new: so a label commit joins only those images with the predictions (one pass over
# five of predictions' columns, none when no label changed) and updates the few summary rows they fall
# in, where recounting would join every prediction with every label and rewrite every row each time.
_MOVED = """
SELECT n.image_sha256, n.old_label, g.label AS new_label
FROM label_moves n LEFT JOIN ground_truth g USING (image_sha256) WHERE n.old_label IS DISTINCT FROM g.label
"""
_RESCORE = """
UPDATE daily_summary s SET labelled = s.labelled + d.labelled, correct = s.correct + d.correct
FROM (SELECT CAST(p.predicted_at AS DATE) AS day, p.model_name, p.model_version, p.label,
             sum(CAST(m.new_label IS NOT NULL AS BIGINT) - CAST(m.old_label IS NOT NULL AS BIGINT)) AS labelled,
             sum(CAST(coalesce(m.new_label = p.label, false) AS BIGINT)
                 - CAST(coalesce(m.old_label = p.label, false) AS BIGINT)) AS correct
      FROM predictions p JOIN moved m USING (image_sha256) GROUP BY ALL) d
WHERE s.day = d.day AND s.model_name = d.model_name AND s.model_version = d.model_version AND s.label = d.label
"""


def rescore_summary(connection) -> int:
    """After `ground_truth` changed for the images `note_labels` noted: move the labelled and correct
    counts of their predictions from the old labels to the new. Returns how many images changed label."""
    connection.execute(f"CREATE OR REPLACE TEMP TABLE moved AS {_MOVED}")
    changed = connection.execute("SELECT count(*) FROM moved").fetchone()[0]
    if changed:
        connection.execute(_RESCORE)
    connection.execute("DROP TABLE moved; DROP TABLE label_moves")
    return changed


def rebuild_summary(connection) -> None:
    """Both summaries from every prediction, label and embedding, for a database written before they existed."""
    for table in SUMMARY_KEYS:
        connection.execute(f"DELETE FROM {table}")
    fold_into_summary(connection, "predictions")


def parse_thresholds(assignments: Iterable[str]) -> dict[str, float]:
    """New thresholds from METRIC=VALUE assignments, each checked before any is written."""
    thresholds: dict[str, float] = {}
    for assignment in assignments:
        metric, equals, text = (part.strip() for part in assignment.partition("="))
        if not equals:
            raise CnnpipeError(f"--set {assignment}: expected METRIC=VALUE, e.g. psi=0.1")
        if metric not in THRESHOLD_RANGES:
            raise CnnpipeError(f"--set {assignment}: no threshold named {metric!r}; the thresholds are "
                               f"{', '.join(sorted(THRESHOLD_RANGES))}")
        try:
            value = float(text)
        except ValueError:
            raise CnnpipeError(f"--set {assignment}: {metric} must be a number, not {text!r}") from None
        low, high = THRESHOLD_RANGES[metric]
        if not math.isfinite(value):
            raise CnnpipeError(f"--set {assignment}: {metric} must be a finite number")
        if not low <= value <= high:
            raise CnnpipeError(f"--set {assignment}: {metric} must be between {low:g} and {high:g}" if high < math.inf
                               else f"--set {assignment}: {metric} must be at least {low:g}")
        if thresholds.get(metric, value) != value:
            raise CnnpipeError(f"--set {assignment}: {metric} is set twice, to {thresholds[metric]:g} and {value:g}")
        thresholds[metric] = value
    return thresholds


def change_thresholds(connection, thresholds: dict[str, float]) -> list[tuple[str, float, float]]:
    """Write `thresholds`; returns (metric, old, new) for each, in the order given."""
    old = dict(connection.execute("SELECT metric, threshold FROM drift_thresholds").fetchall())
    connection.executemany("UPDATE drift_thresholds SET threshold = ? WHERE metric = ?",
                           [[value, metric] for metric, value in thresholds.items()])
    return [(metric, old[metric], value) for metric, value in thresholds.items()]


def _chance_quantile(degrees: str) -> str:
    """SQL for what a chi-square variable with `degrees` (an SQL expression) degrees of freedom
    passes one time in 1,000, by the Wilson-Hilferty approximation: at most 3% above the exact
    quantile, 0.1% from 60 degrees on."""
    return f"{degrees} * pow(1 - 2 / (9 * {degrees}) + 3.09 * sqrt(2 / (9 * {degrees})), 3)"


# A version's embedding reference (`cnn.monitoring.embedding_reference`), as its profile keeps it:
# images, and the mean and standard deviation of each dimension over its held-out images, 0 for a
# dimension they do not vary along, which no shift can be measured in. Read from the profile's JSON,
# which a reference written before embeddings lacks: such a version has no row here. With them,
# what a squared distance from the mean in standard deviations, sum of ((x - mean) / std)^2, takes
# as inner products, which DuckDB computes over arrays far faster than a lambda over each element
# (`cnnpipe review export --outliers` scores every image): `weight` (1 / std^2, 0 where std is),
# `weighted_mean` (mean / std^2) and `offset` (sum of mean^2 / std^2), so that the sum is
# inner(x^2, weight) - 2 inner(x, weighted_mean) + offset.
REFERENCE_EMBEDDINGS = f"""
CREATE OR REPLACE VIEW reference_embeddings AS
SELECT model_name, model_version, images, mean, std, len(list_filter(std, lambda s: s > 0)) AS dimensions,
       CAST(list_transform(std, lambda s: CASE WHEN s > 0 THEN 1 / (s * s) ELSE 0 END) AS DOUBLE[{EMBEDDING_DIM}])
           AS weight,
       CAST(list_transform(list_zip(mean, std), lambda p: CASE WHEN p[2] > 0 THEN p[1] / (p[2] * p[2]) ELSE 0 END)
            AS DOUBLE[{EMBEDDING_DIM}]) AS weighted_mean,
       list_sum(list_transform(list_zip(mean, std), lambda p: CASE WHEN p[2] > 0 THEN p[1] * p[1] / (p[2] * p[2])
                                                                   ELSE 0 END)) AS offset
FROM (SELECT model_name, model_version, CAST(json_extract(profile, '$.embedding.images') AS BIGINT) AS images,
             CAST(json_extract(profile, '$.embedding.mean') AS DOUBLE[]) AS mean,
             CAST(json_extract(profile, '$.embedding.std') AS DOUBLE[]) AS std
      FROM reference_profiles WHERE json_exists(profile, '$.embedding'))
WHERE images > 0 AND len(mean) = {EMBEDDING_DIM} AND len(std) = {EMBEDDING_DIM};
"""


@dataclass(frozen=True)
class DriftView:
    """How a drift view groups: `key`, an expression over its summary's columns, named `key_column`;
    `runs_key`, the same key over `classify_runs`, for the rejected inputs; `summary`, the table it reads."""
    key: str
    key_column: str
    runs_key: str
    summary: str


DRIFT_VIEWS = {
    "drift_by_run": DriftView("nullif(classify_run, '')", "classify_run_id", "classify_run_id", "run_summary"),
    "drift_daily": DriftView("day", "day", "CAST(finished_at AS DATE)", "daily_summary"),
}


def drift_query(view: DriftView, source: str | None = None) -> str:
    """The SELECT behind a drift view, reading `source` (a relation with the summary's columns, the
    view's own summary table by default): tests/cnnpipe/test_summary.py gives it one summed from a
    plain scan of the predictions, to check the view against."""
    key, key_column, runs_key, source = view.key, view.key_column, view.runs_key, source or view.summary
    return f"""
WITH per_label AS (  -- every figure below is a sum of these
    SELECT {key} AS {key_column}, model_name, model_version, label, sum(predicted) AS predicted,
           sum(confidence_sum) AS confidence_sum, sum(low_confidence) AS low_confidence,
           sum(width_sum) AS width_sum, sum(sized) AS sized, sum(height_sum) AS height_sum,
           sum(brightness_sum) AS brightness_sum, sum(measured) AS measured
    FROM {source} p
    WHERE EXISTS (SELECT 1 FROM reference_profiles r
                  WHERE r.model_name = p.model_name AND r.model_version = p.model_version)
    GROUP BY ALL
), batches AS (
    SELECT {key_column}, model_name, model_version, sum(predicted) AS images,
           sum(confidence_sum) / sum(predicted) AS mean_confidence,
           sum(low_confidence) / sum(predicted) AS low_confidence_share,
           sum(width_sum) / nullif(sum(sized), 0) AS mean_width,
           sum(height_sum) / nullif(sum(sized), 0) AS mean_height,
           sum(brightness_sum) / nullif(sum(measured), 0) AS mean_brightness
    FROM per_label GROUP BY ALL
), divergence AS (
    SELECT {key_column}, model_name, model_version, sum((q - p) * ln(q / p)) AS psi,
           sqrt(greatest(0.0, sum(0.5 * p * ln(2 * p / (p + q)) + 0.5 * q * ln(2 * q / (p + q))) / ln(2)))
               AS js_distance,
           -- What PSI reaches by chance alone, 1 time in 1,000, between samples of these two sizes: a
           -- chi-square quantile with classes - 1 degrees of freedom, times 1/n + 1/m.
           {_chance_quantile("(count(*) - 1)")} * (1 / any_value(reference_images) + 1 / any_value(images))
               AS psi_noise
    FROM (SELECT b.{key_column}, b.model_name, b.model_version, b.images, r.images AS reference_images,
                 greatest(c.predicted_share, {SMALLEST_SHARE}) AS p,
                 greatest(coalesce(s.predicted, 0) / b.images, {SMALLEST_SHARE}) AS q
          FROM batches b JOIN reference_classes c USING (model_name, model_version)
          JOIN reference_profiles r USING (model_name, model_version)
          LEFT JOIN per_label s ON s.{key_column} = b.{key_column} AND s.model_name = b.model_name
                               AND s.model_version = b.model_version AND s.label = c.label)
    GROUP BY ALL
), embedding_batches AS (  -- summed at insert, so the embeddings table itself is never scanned here
    SELECT {key} AS {key_column}, model_name, model_version, sum(embedded) AS embedded,
           {_summed("embedding_sum")} AS embedding_sum
    FROM {source} WHERE embedded > 0 GROUP BY ALL
), embedding_drift AS (
    -- Each dimension's difference of means in reference standard deviations, z, is under no shift
    -- about normal with variance 1/n + 1/m (n embedded images in the batch, m in the reference), and
    -- the projection's dimensions are principal components, close to uncorrelated: so the sum of z^2
    -- over d dimensions is about (1/n + 1/m) times a chi-square with d degrees of freedom, and
    -- embedding_shift = sqrt(sum z^2 / d) passes sqrt(quantile / d * (1/n + 1/m)) one time in 1,000.
    -- A small reference thus raises the limit instead of crying wolf; the threshold (0.1 standard
    -- deviations by default) keeps large batches from alerting on differences too small to matter.
    SELECT e.{key_column}, e.model_name, e.model_version,
           sqrt(list_sum(list_transform(range(1, {EMBEDDING_DIM + 1}), lambda k: CASE WHEN r.std[k] > 0
                THEN pow((e.embedding_sum[k] / e.embedded - r.mean[k]) / r.std[k], 2) ELSE 0 END))
                / r.dimensions) AS embedding_shift,
           sqrt({_chance_quantile("r.dimensions")} / r.dimensions * (1 / e.embedded + 1 / r.images))
               AS embedding_noise
    FROM embedding_batches e JOIN reference_embeddings r USING (model_name, model_version)
    WHERE r.dimensions > 0
), rejected AS (
    SELECT {runs_key} AS {key_column}, model_name, model_version,
           sum(rejected) / nullif(sum(classified + rejected), 0) AS rejected_rate
    FROM classify_runs GROUP BY ALL
), limits AS (
    SELECT {", ".join(f"max(threshold) FILTER (WHERE metric = '{metric}') AS {metric}" for metric in DEFAULT_THRESHOLDS)}
    FROM drift_thresholds
)
SELECT b.{key_column}, b.model_name, b.model_version, b.images, d.psi, d.js_distance,
       b.mean_confidence AS estimated_accuracy, b.mean_confidence - r.mean_confidence AS confidence_shift,
       b.low_confidence_share, b.low_confidence_share - r.low_confidence_share AS low_confidence_shift,
       coalesce(j.rejected_rate, 0.0) AS rejected_rate,
       greatest(abs(b.mean_width / r.mean_width - 1), abs(b.mean_height / r.mean_height - 1)) AS size_shift,
       b.mean_brightness - r.mean_brightness AS brightness_shift,
       m.embedding_shift,
       greatest(l.psi, d.psi_noise) AS psi_limit,
       CASE WHEN m.embedding_shift IS NOT NULL THEN greatest(l.embedding_shift, m.embedding_noise) END
           AS embedding_shift_limit,
       coalesce(d.psi > greatest(l.psi, d.psi_noise), false)
       OR coalesce(r.mean_confidence - b.mean_confidence > l.confidence_drop, false)
       OR coalesce(b.low_confidence_share - r.low_confidence_share > l.low_confidence_rise, false)
       OR coalesce(j.rejected_rate > l.rejected_rate, false)
       OR coalesce(greatest(abs(b.mean_width / r.mean_width - 1), abs(b.mean_height / r.mean_height - 1))
                   > l.size_shift, false)
       OR coalesce(abs(b.mean_brightness - r.mean_brightness) > l.brightness_shift, false)
       OR coalesce(m.embedding_shift > greatest(l.embedding_shift, m.embedding_noise), false) AS alert
FROM batches b
JOIN reference_profiles r USING (model_name, model_version)
LEFT JOIN divergence d USING ({key_column}, model_name, model_version)
LEFT JOIN embedding_drift m USING ({key_column}, model_name, model_version)
LEFT JOIN rejected j USING ({key_column}, model_name, model_version)
CROSS JOIN limits l
"""


DRIFT_SCHEMA = f"""{SUMMARY_SCHEMA}
CREATE OR REPLACE VIEW production_accuracy AS
SELECT model_name, model_version, day, sum(labelled) AS labelled, sum(correct) / sum(labelled) AS top1
FROM daily_summary GROUP BY ALL HAVING sum(labelled) > 0;
CREATE TABLE IF NOT EXISTS drift_thresholds (metric VARCHAR PRIMARY KEY, threshold DOUBLE NOT NULL, meaning VARCHAR);
INSERT OR IGNORE INTO drift_thresholds VALUES {", ".join(
    f"('{metric}', {threshold}, '{meaning}')" for metric, (threshold, meaning) in DEFAULT_THRESHOLDS.items())};
{REFERENCE_EMBEDDINGS}
{"".join(f"CREATE OR REPLACE VIEW {name} AS {drift_query(view)};" for name, view in DRIFT_VIEWS.items())}
"""
