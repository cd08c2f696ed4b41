"""The SQL views at scale: a synthetic predictions table of 10 M rows.

    python bench/views.py [--rows 10000000]

Builds `predictions` with the real schema (two model versions of one model over
`rows / 2` images, version 2 the champion, 10 labels, a month of timestamps) and times,
through `cnnpipe sql`'s hardened read-only connection (its memory and thread caps included):
- `class_counts` for the last 7 days;
- the 20 least confident latest predictions (`low_confidence` ... ORDER BY ... LIMIT);
- the baseline: one full scan, `SELECT count(*), avg(confidence) FROM predictions`;
- the monitoring views (issue 14): `drift_by_run` (all runs), `drift_daily` for the last 7
  days, and `production_accuracy`, with reference profiles for both versions and labels for
  half of the images in `ground_truth`.

Targets: each view query under 0.5 s on this 2-core CPU; each monitoring view under 1 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnnpipe.predictions.database import connect_for_writing  # noqa: E402
from cnnpipe.predictions.records import set_champion  # noqa: E402
from cnnpipe.predictions.sql import run_query  # noqa: E402
from cnnpipe.predictions.summary import rebuild_summary  # noqa: E402

QUERIES = {
    "baseline: full scan count + avg": "SELECT count(*), avg(confidence) FROM predictions",
    "class_counts, last 7 days": "SELECT label, sum(images) AS images FROM class_counts "
                                 "WHERE day >= DATE '2026-11-01' - 7 GROUP BY label ORDER BY label",
    "low_confidence, 20 least confident": "SELECT member_path, label, confidence FROM low_confidence "
                                          "ORDER BY confidence LIMIT 20",
    "latest_predictions per label": "SELECT label, count(*) FROM latest_predictions GROUP BY label",
    "drift_by_run, every run": "SELECT * FROM drift_by_run",
    "drift_daily, last 7 days": "SELECT * FROM drift_daily WHERE day >= DATE '2026-11-01' - 7",
    "production_accuracy": "SELECT * FROM production_accuracy",
}
MONITORING = ("drift_by_run, every run", "drift_daily, last 7 days", "production_accuracy")


def build(database: Path, rows: int) -> None:
    images = rows // 2
    with connect_for_writing(database) as connection:
        connection.execute(f"""
            INSERT INTO predictions
            SELECT sha256(CAST(i AS VARCHAR)) AS image_sha256, 'file:///archive.tar' AS source_uri,
                   'images/' || i || '.jpg' AS member_path, 'cnn-classifier' AS model_name,
                   CAST(v AS VARCHAR) AS model_version, 'run' || v AS mlflow_run_id,
                   'class' || ((i * 7 + v) % 10) AS label, ((i * 2654435761) % 1000) / 1000.0 AS confidence,
                   [{{'label': 'class' || ((i * 7 + v) % 10), 'probability': 0.5}}] AS top5,
                   32 AS width, 32 AS height, 'classify-' || v || '-' || (i % 3000) AS classify_run_id,
                   TIMESTAMPTZ '2026-10-01 00:00:00+00' + to_seconds(CAST(i % 2592000 AS BIGINT)) AS predicted_at,
                   ((i * 2654435761) % 1000) / 1000.0 AS calibrated_confidence, (i % 256) / 255.0 AS brightness
            FROM range({images}) AS images(i), (VALUES (1), (2)) AS versions(v)
        """)
        set_champion(connection, "cnn-classifier", "2")
        # 3,000 classify runs a version, each with its row in classify_runs, a reference profile for
        # both versions, and labels for half of the images.
        connection.execute("""
            INSERT INTO classify_runs (classify_run_id, model_name, model_version, finished_at, classified, rejected)
            SELECT 'classify-' || v || '-' || r, 'cnn-classifier', CAST(v AS VARCHAR),
                   TIMESTAMPTZ '2026-10-01 00:00:00+00' + to_seconds(CAST(r * 864 AS BIGINT)), 1000, r % 7
            FROM range(3000) AS runs(r), (VALUES (1), (2)) AS versions(v);
            INSERT INTO reference_profiles (model_name, model_version, images, temperature, top1, mean_confidence,
                                            low_confidence_share, mean_width, mean_height, mean_brightness)
            VALUES ('cnn-classifier', '1', 10000, 1.2, 0.8, 0.5, 0.5, 32, 32, 0.5),
                   ('cnn-classifier', '2', 10000, 1.1, 0.85, 0.5, 0.5, 32, 32, 0.5);
            INSERT INTO reference_classes SELECT 'cnn-classifier', CAST(v AS VARCHAR), 'class' || c, 0.1, 0.1
            FROM range(10) AS classes(c), (VALUES (1), (2)) AS versions(v);
        """)
        connection.execute(f"""
            INSERT INTO ground_truth SELECT sha256(CAST(i AS VARCHAR)), 'class' || ((i * 7) % 10), 'bench', 'v1',
                                            TIMESTAMPTZ '2026-11-01 00:00:00+00'
            FROM range(0, {images}, 2) AS images(i)
        """)
        rebuild_summary(connection)  # what add_predictions and record_ground_truth keep up to date
        connection.execute("CHECKPOINT")


def timed(query: str, database: Path, repeats: int = 3) -> float:
    run_query(query, database)  # warm the file cache
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run_query(query, database)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        database = Path(scratch) / "predictions.duckdb"
        started = time.perf_counter()
        build(database, args.rows)
        print(f"built {args.rows:,} rows in {time.perf_counter() - started:.1f} s "
              f"({database.stat().st_size / 2**20:,.0f} MiB)")
        seconds = {name: timed(query, database) for name, query in QUERIES.items()}
    base = seconds["baseline: full scan count + avg"]
    print(f"\nViews over {args.rows:,} predictions on CPU, {os.cpu_count()} cores (best of 3, hardened connection)\n")
    print(f"| {'query':<36} | {'seconds':>8} | {'x full scan':>11} | target")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 13}|-------")
    for name, value in seconds.items():
        target = "< 1 s" if name in MONITORING else "" if name.startswith("baseline") or \
            "latest_predictions" in name else "< 0.5 s"
        print(f"| {name:<36} | {value:>8.3f} | {value / base:>11.2f} | {target}")


if __name__ == "__main__":
    main()
