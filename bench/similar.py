"""`cnnpipe similar` over many stored embeddings, beside a plain full scan of the same table.

    python bench/similar.py [--rows 1000000] [--versions 2]

Fills a fresh predictions database with `--rows` embeddings (FLOAT[64], seeded random unit
vectors) of one model version, plus as many again of other versions (a query stays within its
version, so it must skip them), and their prediction rows. Then times, each the median of 5
runs after one warm-up, in one process:
- full scan: `SELECT count(*), max(embedding[1]) FROM embeddings` over the whole table;
- similar: the 10 nearest images to a stored one, as `cnnpipe similar` asks DuckDB for them
  (`cnnpipe.predictions.similar.nearest`: cosine distances to the stored embedding, joined with predictions),
  without the command's process start-up.
Target: similar < 1 s at 1,000,000 embeddings of the version queried.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnn.config import EMBEDDING_DIM  # noqa: E402
from cnnpipe.predictions.database import connect, transaction  # noqa: E402
from cnnpipe.predictions.similar import nearest  # noqa: E402

CHUNK = 200_000


def fill(database: Path, rows: int, versions: int) -> str:
    """`rows` embeddings for each of `versions` versions of model m; returns a stored sha of version 1."""
    rng = np.random.default_rng(0)
    for version in range(1, versions + 1):
        for start in range(0, rows, CHUNK):
            count = min(CHUNK, rows - start)
            vectors = rng.standard_normal((count, EMBEDDING_DIM), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            shas = [f"{version:04d}{start + i:060x}" for i in range(count)]
            table = pa.table({
                "image_sha256": shas, "model_name": ["m"] * count, "model_version": [str(version)] * count,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), EMBEDDING_DIM)})
            with transaction(database) as connection:
                connection.register("made", table)
                connection.execute(f"INSERT INTO embeddings SELECT image_sha256, model_name, model_version, "
                                   f"embedding::FLOAT[{EMBEDDING_DIM}] FROM made")
                connection.execute("INSERT INTO predictions (image_sha256, source_uri, member_path, model_name, "
                                   "model_version, label, confidence, top5, predicted_at) SELECT image_sha256, "
                                   "'inbox', image_sha256, model_name, model_version, 'c' || (hash(image_sha256) % 10), "
                                   "0.5, [{'label': 'c0', 'probability': 0.5}], now() FROM made")
                connection.unregister("made")
    return f"{1:04d}{rows // 2:060x}"


def timed(run) -> float:
    run()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--versions", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-similar-", dir=os.environ.get("BENCH_TMP")) as scratch:
        database = Path(scratch) / "predictions.duckdb"
        started = time.perf_counter()
        sha = fill(database, args.rows, args.versions)
        filled = time.perf_counter() - started

        def scan() -> None:
            with connect(database, read_only=True) as connection:
                connection.execute("SELECT count(*), max(embedding[1]) FROM embeddings").fetchall()

        answer = nearest(database, sha, "m", "1", 10)
        scan_seconds = timed(scan)
        similar_seconds = timed(lambda: nearest(database, sha, "m", "1", 10))
    total = args.rows * args.versions
    print(f"\n`cnnpipe similar` on {os.cpu_count()} CPUs: {args.rows:,} embeddings of the version queried, "
          f"{total:,} in the table ({filled:.0f} s to fill)\n")
    print("| query | seconds (median of 5) | x full scan | target |")
    print("|---|---|---|---|")
    print(f"| full scan of the embeddings table | {scan_seconds:.3f} | 1.00 | |")
    print(f"| similar: 10 nearest, with predictions | {similar_seconds:.3f} | {similar_seconds / scan_seconds:.2f} | "
          f"< 1 s: {'met' if similar_seconds < 1 else 'missed'} |")
    print(f"\nnearest distance {answer.rows[0][1]}, {len(answer.rows)} rows")


if __name__ == "__main__":
    main()
