"""The prediction summary and the drift views over it: what a model predicted in a classify run, or on a
day, against its reference profile. Part of the predictions database's schema; `cnnpipe.monitoring` reads them.

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
- `alert`: true when any figure passes its threshold in `drift_thresholds`.
Predictions made before a version had a temperature fall back to their raw confidence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

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
}
# What a threshold can sensibly be: each is compared with a distance, so never below 0; the confidence,
# share and brightness figures live in 0-1, so a threshold above 1 could never fire. PSI and the
# relative size change have no upper bound.
THRESHOLD_RANGES = {"psi": (0.0, math.inf), "confidence_drop": (0.0, 1.0), "low_confidence_rise": (0.0, 1.0),
                    "rejected_rate": (0.0, 1.0), "size_shift": (0.0, math.inf), "brightness_shift": (0.0, 1.0)}
SMALLEST_SHARE = 1e-4
# A calibrated confidence under this is a low-confidence prediction, in every view and command.
LOW_CONFIDENCE = 0.5


# What every monitoring view sums, kept per classify run, day, model version and predicted label as
# predictions arrive (`fold_into_summary`) and labels change (`rescore_summary`): the views then
# read thousands of rows instead of scanning tens of millions of predictions (bench/monitor.py).
_SUMMARY_KEY = "classify_run, day, model_name, model_version, label"
_SUMMARY_FIGURES = f"""
    coalesce(p.classify_run_id, '') AS classify_run, CAST(p.predicted_at AS DATE) AS day, p.model_name,
    p.model_version, p.label, count(*) AS predicted, sum(coalesce(p.calibrated_confidence, p.confidence)) AS
    confidence_sum, count_if(coalesce(p.calibrated_confidence, p.confidence) < {LOW_CONFIDENCE}) AS low_confidence,
    sum(p.width) AS width_sum, count(p.width) AS sized, sum(p.height) AS height_sum,
    sum(p.brightness) AS brightness_sum, count(p.brightness) AS measured"""
SUMMARY_SCHEMA = """
CREATE TABLE IF NOT EXISTS prediction_summary (
    classify_run VARCHAR NOT NULL, day DATE NOT NULL, model_name VARCHAR NOT NULL, model_version VARCHAR NOT NULL,
    label VARCHAR NOT NULL, predicted BIGINT, confidence_sum DOUBLE, low_confidence BIGINT, width_sum HUGEINT,
    sized BIGINT, height_sum HUGEINT, brightness_sum DOUBLE, measured BIGINT, labelled BIGINT, correct BIGINT,
    PRIMARY KEY (classify_run, day, model_name, model_version, label)
);
"""
_ADDED = ("predicted", "confidence_sum", "low_confidence", "width_sum", "sized", "height_sum", "brightness_sum",
          "measured", "labelled", "correct")
_FOLD = f"""
INSERT INTO prediction_summary BY NAME
SELECT {_SUMMARY_FIGURES}, count(g.label) AS labelled, count_if(g.label = p.label) AS correct
FROM {{rows}} p LEFT JOIN ground_truth g USING (image_sha256)
GROUP BY ALL
ON CONFLICT ({_SUMMARY_KEY}) DO UPDATE SET {", ".join(f"{c} = prediction_summary.{c} + EXCLUDED.{c}" for c in _ADDED)}
"""
_RESCORE = """
UPDATE prediction_summary SET labelled = 0, correct = 0 WHERE labelled > 0;
UPDATE prediction_summary s SET labelled = a.labelled, correct = a.correct
FROM (SELECT coalesce(p.classify_run_id, '') AS classify_run, CAST(p.predicted_at AS DATE) AS day, p.model_name,
             p.model_version, p.label, count(*) AS labelled, count_if(g.label = p.label) AS correct
      FROM predictions p JOIN ground_truth g USING (image_sha256) GROUP BY ALL) a
WHERE s.classify_run = a.classify_run AND s.day = a.day AND s.model_name = a.model_name
  AND s.model_version = a.model_version AND s.label = a.label;
"""


def fold_into_summary(connection, rows: str) -> None:
    """Add the predictions in relation `rows` (new ones, never seen before) to the summary."""
    connection.execute(_FOLD.format(rows=rows))


def rescore_summary(connection) -> None:
    """Recount labelled and correct predictions after `ground_truth` changed."""
    connection.execute(_RESCORE)


def rebuild_summary(connection) -> None:
    """The summary from every prediction, for a database written before it existed."""
    connection.execute("DELETE FROM prediction_summary")
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


def _drift_view(name: str, key: str, key_column: str, runs_key: str) -> str:
    """One view keyed by `key` (an expression over `prediction_summary`, named `key_column`), with
    `runs_key` the same key over `classify_runs` for the rejected inputs."""
    return f"""
CREATE OR REPLACE VIEW {name} AS
WITH per_label AS (  -- every figure below is a sum of these
    SELECT {key} AS {key_column}, model_name, model_version, label, sum(predicted) AS predicted,
           sum(confidence_sum) AS confidence_sum, sum(low_confidence) AS low_confidence,
           sum(width_sum) AS width_sum, sum(sized) AS sized, sum(height_sum) AS height_sum,
           sum(brightness_sum) AS brightness_sum, sum(measured) AS measured
    FROM prediction_summary p
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
           -- chi-square quantile (Wilson-Hilferty) with classes - 1 degrees of freedom, times 1/n + 1/m.
           (count(*) - 1) * pow(1 - 2 / (9 * (count(*) - 1)) + 3.09 * sqrt(2 / (9 * (count(*) - 1))), 3)
               * (1 / any_value(reference_images) + 1 / any_value(images)) AS psi_noise
    FROM (SELECT b.{key_column}, b.model_name, b.model_version, b.images, r.images AS reference_images,
                 greatest(c.predicted_share, {SMALLEST_SHARE}) AS p,
                 greatest(coalesce(s.predicted, 0) / b.images, {SMALLEST_SHARE}) AS q
          FROM batches b JOIN reference_classes c USING (model_name, model_version)
          JOIN reference_profiles r USING (model_name, model_version)
          LEFT JOIN per_label s ON s.{key_column} = b.{key_column} AND s.model_name = b.model_name
                               AND s.model_version = b.model_version AND s.label = c.label)
    GROUP BY ALL
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
       greatest(l.psi, d.psi_noise) AS psi_limit,
       coalesce(d.psi > greatest(l.psi, d.psi_noise), false)
       OR coalesce(r.mean_confidence - b.mean_confidence > l.confidence_drop, false)
       OR coalesce(b.low_confidence_share - r.low_confidence_share > l.low_confidence_rise, false)
       OR coalesce(j.rejected_rate > l.rejected_rate, false)
       OR coalesce(greatest(abs(b.mean_width / r.mean_width - 1), abs(b.mean_height / r.mean_height - 1))
                   > l.size_shift, false)
       OR coalesce(abs(b.mean_brightness - r.mean_brightness) > l.brightness_shift, false) AS alert
FROM batches b
JOIN reference_profiles r USING (model_name, model_version)
LEFT JOIN divergence d USING ({key_column}, model_name, model_version)
LEFT JOIN rejected j USING ({key_column}, model_name, model_version)
CROSS JOIN limits l;
"""


DRIFT_SCHEMA = f"""{SUMMARY_SCHEMA}
CREATE OR REPLACE VIEW production_accuracy AS
SELECT model_name, model_version, day, sum(labelled) AS labelled, sum(correct) / sum(labelled) AS top1
FROM prediction_summary GROUP BY ALL HAVING sum(labelled) > 0;
CREATE TABLE IF NOT EXISTS drift_thresholds (metric VARCHAR PRIMARY KEY, threshold DOUBLE NOT NULL, meaning VARCHAR);
INSERT OR IGNORE INTO drift_thresholds VALUES {", ".join(
    f"('{metric}', {threshold}, '{meaning}')" for metric, (threshold, meaning) in DEFAULT_THRESHOLDS.items())};
{_drift_view("drift_by_run", "nullif(classify_run, '')", "classify_run_id", "classify_run_id")}
{_drift_view("drift_daily", "day", "day", "CAST(finished_at AS DATE)")}
"""
