"""Ingestion benchmark: cnnpipe against a bare floor and Hugging Face `datasets`, in one run.

    python bench/ingest.py [--skip-peer] [--skip-scale]

Input is ../shared/data/cifar10-jpeg.tar.gz (60,000 JPEGs) and the same files extracted
to a folder. Every case runs in its own process, so peak RSS is per case (the largest of
the process and its decoding workers); its imports happen before its clock starts.

- floor: read each file's bytes and write them to Parquet; no decoding, no hashing;
- cnnpipe: the store's full path: hash, deduplicate, decode every image, write Parquet,
  commit a version (the library call that the `ingest` flow's tasks make);
- peer: `datasets.load_dataset("imagefolder")` followed by `to_parquet`;
- scale: the same on a source 4x larger (every file repeated under new names with one
  byte appended), to show that memory does not grow with the dataset.

Targets: cnnpipe <= 2.5x the floor, >= 10x faster than the peer, peak RSS < 1 GB.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CIFAR = Path(os.environ.get("CNNPIPE_SHARED", REPO.parent / "shared")) / "data" / "cifar10-jpeg.tar.gz"


def floor(source: str, out: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("path", pa.string()), ("image", pa.binary())])
    writer = pq.ParquetWriter(out, schema, compression="none")
    paths, images = [], []

    def flush() -> None:
        writer.write_table(pa.table({"path": paths, "image": images}, schema=schema))
        paths.clear(), images.clear()

    count = 0
    if os.path.isdir(source):
        for folder, _, names in os.walk(source):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as handle:
                    paths.append(path), images.append(handle.read())
                count += 1
                if len(paths) == 1024:
                    flush()
    else:
        with tarfile.open(source, "r|*") as tar:
            for member in tar:
                tar.members.clear()
                if member.isfile():
                    paths.append(member.name), images.append(tar.extractfile(member).read())
                    count += 1
                    if len(paths) == 1024:
                        flush()
    flush()
    writer.close()
    return count


def cnnpipe_ingest(source: str, home: str) -> int:
    os.environ["CNNPIPE_HOME"] = home
    from cnnpipe.sources import open_source
    from cnnpipe.store import DatasetStore, IngestOptions

    store = DatasetStore("bench")
    with store.lock():
        store.recover()
        summary = store.commit(store.stage(open_source(source), IngestOptions()))
    assert not summary.rejected, summary.rejected[:3]
    return summary.added


def peer(source: str, out: str) -> int:
    from datasets import load_dataset

    splits = load_dataset("imagefolder", data_dir=source, cache_dir=out + ".cache")
    for name, dataset in splits.items():
        dataset.to_parquet(f"{out}-{name}.parquet")
    return sum(len(dataset) for dataset in splits.values())


CASES = {"floor": floor, "cnnpipe": cnnpipe_ingest, "peer": peer}
# Imported before the clock starts: interpreter start-up is not ingestion, for any case.
IMPORTS = {"floor": ["pyarrow.parquet"], "cnnpipe": ["cnnpipe.store", "cnnpipe.sources"], "peer": ["datasets"]}


def run_case(case: str, source: str) -> dict:
    """Run one case in a fresh process and read its time, count and peak memory."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as scratch:
        target = os.path.join(scratch, "out")
        completed = subprocess.run([sys.executable, __file__, "--child", case, source, target],
                                   capture_output=True, text=True)
        if completed.returncode != 0:
            raise SystemExit(f"{case} on {source} failed:\n{completed.stderr[-3000:]}")
        return json.loads(completed.stdout.strip().splitlines()[-1])


def child(case: str, source: str, target: str) -> None:
    import importlib

    for module in IMPORTS[case]:
        importlib.import_module(module)
    started = time.perf_counter()
    count = CASES[case](source, target)
    seconds = time.perf_counter() - started
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"seconds": seconds, "images": count, "peak_rss_mb": rss / 1024}))


def make_scaled_tar(files: list[tuple[str, bytes]], copies: int, path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for copy in range(copies):
            for name, data in files:
                # One appended byte makes each copy a distinct image that still decodes.
                blob = data + bytes([copy]) if copy else data
                stem, dot, suffix = name.rpartition(".")
                info = tarfile.TarInfo(f"{stem}-{copy}.{suffix}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-peer", action="store_true", help="leave out Hugging Face datasets (slow)")
    parser.add_argument("--skip-scale", action="store_true", help="leave out the 4x larger source")
    args = parser.parse_args()
    if not CIFAR.exists():
        raise SystemExit(f"{CIFAR} is missing: this benchmark needs ../shared beside the checkout")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as scratch:
        folder = Path(scratch) / "cifar10"
        folder.mkdir()
        with tarfile.open(CIFAR) as tar:
            tar.extractall(folder, filter="data")
        rows = []
        for label, source in (("folder", str(folder)), ("tar.gz", str(CIFAR))):
            floor_result = run_case("floor", source)
            ours = run_case("cnnpipe", source)
            rows.append((f"cnnpipe, {label}", ours, ours["seconds"] / floor_result["seconds"], "<= 2.5x floor"))
            rows.append((f"floor, {label}", floor_result, 1.0, ""))
            if label == "folder" and not args.skip_peer:
                peer_result = run_case("peer", source)
                rows.append(("HF datasets, folder", peer_result, peer_result["seconds"] / floor_result["seconds"],
                             f"cnnpipe {peer_result['seconds'] / ours['seconds']:.1f}x faster (>= 10x)"))
        if not args.skip_scale:
            files = []
            with tarfile.open(CIFAR) as tar:
                files = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
            scaled = Path(scratch) / "cifar10-x4.tar"
            make_scaled_tar(files, 4, scaled)
            del files
            floor_result = run_case("floor", str(scaled))
            ours = run_case("cnnpipe", str(scaled))
            rows.append(("cnnpipe, 4x tar", ours, ours["seconds"] / floor_result["seconds"], "<= 2.5x floor, RSS < 1 GB"))
            rows.append(("floor, 4x tar", floor_result, 1.0, ""))
    print(f"\nIngest benchmark, {os.cpu_count()} cores, {CIFAR.name}\n")
    print(f"| {'case':<22} | {'images':>8} | {'seconds':>8} | {'images/s':>9} | {'x floor':>7} | {'peak RSS MB':>11} | target")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 10}|{'-' * 11}|{'-' * 9}|{'-' * 13}|-------")
    for name, result, ratio, target in rows:
        print(f"| {name:<22} | {result['images']:>8,} | {result['seconds']:>8.2f} | "
              f"{result['images'] / result['seconds']:>9,.0f} | {ratio:>7.2f} | {result['peak_rss_mb']:>11.0f} | {target}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
    else:
        main()
