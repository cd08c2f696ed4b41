"""Ingestion benchmark: cnnpipe against a bare floor and Hugging Face `datasets`, in one run.

    python bench/ingest.py [--skip-peer] [--skip-scale] [--skip-photos] [--repeats R]
    python bench/ingest.py --profile    # and where cnnpipe's ingest of the CIFAR-10 folder spends its time

Input is ../shared/data/cifar10-jpeg.tar.gz (60,000 JPEGs) and the same files extracted
to a folder. Every case runs in its own process, so peak RSS is per case (the largest of
the process and its decoding workers); its imports happen before its clock starts. The floor,
decode and cnnpipe cases of a source run R times in turns (3 by default), and each figure is its
run of median time; each round's cnnpipe time against its own baseline (the floor, or the larger of
floor and decode) gives the paired ratio, whose median the targets are judged on.

- floor: read each file's bytes and write them to Parquet; no decoding, no hashing;
- check bound (folders): read each file and check it as ingest's decoders do (`check_batch`: a full
  decode, the perceptual hash that near-duplicate search keeps), in as many processes as ingest decodes
  in, started as its decoders are (their start-up included), writing nothing;
- work bound (folders): the CPU time of the floor with guarantees (below) and of the check alone, spread
  perfectly over the cores, with nothing for starting the decoders, sending them the bytes or admitting
  the rows: the least that an ingest which keeps its guarantees needs. Above 1.25x the floor, the
  folder's target is out of reach on this machine;
- floor + guarantees (folders): the floor, plus what cnnpipe's guarantees cost the process that reads,
  before any decoding or admission: each file's size before it is read, its sha256, an fsync of the
  Parquet written. cnnpipe's main process does all of this and more while the decoders share its cores;
- cnnpipe: the store's full path: hash, deduplicate, decode every image, write Parquet,
  commit a version (the library call that the `ingest` flow's tasks make);
- peer: `datasets.load_dataset("imagefolder")` followed by `to_parquet`;
- scale: the same on a source 4x larger (every file repeated under new names with one
  byte appended), to show that memory does not grow with the dataset;
- photos: PHOTOS JPEGs of 500x375, bench/photos.py's synthetic photos (textured, about
  50 KB each, written once per run), where decoding rather than copying bytes is the floor.
  Its second baseline, decode, reads every file and decodes it fully with Pillow in as many
  processes as ingest decodes in (one a core), started as ingest's are.

With --profile, one more cnnpipe run on the folder, under cProfile in its main process, gives
a table of where that process spends the run (reading, hashing, waiting for the decoders,
Arrow and Parquet, the version commit) beside the CPU time of its decoding processes
(the decode check and the perceptual hash).

Targets (issue 32): CIFAR-10 <= 1.25x the floor; photos <= 1.2x max(floor, decode);
>= 10x faster than the peer; peak RSS < 1 GB.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Photo-size JPEGs: 10 classes x 200, at the size of a phone photo shrunk for the web.
PHOTOS = {"classes": 10, "per_class": 200, "size": (500, 375)}
CIFAR = Path(os.environ.get("CNNPIPE_SHARED", REPO.parent / "shared")) / "data" / "cifar10-jpeg.tar.gz"


def floor(source: str, out: str, guarantees: bool = False) -> int:
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("path", pa.string()), ("image", pa.binary())] + [("sha256", pa.string())] * guarantees)
    writer = pq.ParquetWriter(out, schema, compression="none")
    paths, images, hashes = [], [], []

    def flush() -> None:
        writer.write_table(pa.table({"path": paths, "image": images, **({"sha256": hashes} if guarantees else {})},
                                    schema=schema))
        paths.clear(), images.clear(), hashes.clear()

    count = 0
    if os.path.isdir(source):
        for folder, _, names in os.walk(source):
            for name in names:
                path = os.path.join(folder, name)
                if guarantees:
                    os.lstat(path)
                with open(path, "rb") as handle:
                    paths.append(path), images.append(handle.read())
                if guarantees:
                    hashes.append(hashlib.sha256(images[-1]).hexdigest())
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
    if guarantees:
        descriptor = os.open(out, os.O_RDONLY)
        os.fsync(descriptor)
        os.close(descriptor)
    return count


def floor_with_guarantees(source: str, out: str) -> int:
    """The floor, plus what cnnpipe's guarantees cost in the process that reads: each file's size before
    it is read (`lstat`: a file that changed since is refused), its sha256 (deduplication) and an fsync of
    the Parquet written (a crash keeps what was staged). Nothing decoded, nothing admitted."""
    return floor(source, out, guarantees=True)


def _decode_files(paths: list[str]) -> int:
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            image.load()
    return len(paths)


def _pool(preload: str):
    """Processes as ingest's decoders are: one a core, forked from a server that imported `preload`."""
    from concurrent.futures import ProcessPoolExecutor

    from cnn.cores import usable_cores
    from cnnpipe.store.decoders import decoder_context

    return ProcessPoolExecutor(usable_cores(), mp_context=decoder_context([preload]))


def decode(source: str, out: str) -> int:
    """Every file of a folder read and fully decoded by Pillow, in processes started as ingest's decoders."""
    paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(source) for name in names)
    chunks = [paths[start:start + 256] for start in range(0, len(paths), 256)]
    with _pool("PIL.Image") as pool:
        return sum(pool.map(_decode_files, chunks))


def _check_files(paths: list[str]) -> tuple[int, int, float]:
    """(files checked, files refused, CPU seconds in the check alone)."""
    from cnnpipe.sources.images import check_batch

    datas = []
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            datas.append(os.read(descriptor, 1 << 24))
        finally:
            os.close(descriptor)
    started = time.thread_time_ns()
    checked = check_batch(datas, None)
    return len(checked), len(checked.refused), (time.thread_time_ns() - started) / 1e9


def check_bound(source: str, out: str) -> dict:
    """Every file of a folder read and checked as ingest's decoders check it, in processes started as
    they are; with the CPU seconds that the check alone took."""
    paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(source) for name in names)
    chunks = [paths[start:start + 1024] for start in range(0, len(paths), 1024)]
    with _pool("cnnpipe.sources.images") as pool:
        counts, refused, checking = zip(*pool.map(_check_files, chunks)) if chunks else ((), (), ())
    return {"images": sum(counts), "refused": sum(refused), "decode_cpu": sum(checking)}


def work_bound(guarantees_result: dict, check_result: dict) -> float:
    """The least wall time, in seconds, of an ingest that does the floor's work with its guarantees (read
    every file, its size first, hash it, write its bytes to Parquet, fsync) and checks every image as
    ingest's decoders do, spread perfectly over this machine's cores."""
    from cnn.cores import usable_cores

    return (guarantees_result["cpu"] + check_result["decode_cpu"]) / usable_cores()


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


# Where the main process of an ingest goes (--profile): each stage by the functions that are it,
# cumulative seconds. Decoding runs in other processes, which the main process sees as waiting.
PROFILE_STAGES = {
    "reading the files": (("sources/folder.py", "entries"),),
    "hashing and admission (sha256, dedup)": (("store/admission.py", "admit"),),
    "waiting for the decoding processes": (("store/decoders.py", "_collect"),),
    "rows to Arrow, Parquet row groups written": (("store/parts.py", "add"), ("store/parts.py", "close")),
    "  of which Parquet written": (("pyarrow/parquet/core.py", "write_table"),),
    "version commit": (("store/dataset.py", "commit"),),
}


def profiled_ingest(source: str, home: str) -> dict:
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    count = cnnpipe_ingest(source, home)
    profile.disable()
    stats = pstats.Stats(profile).stats
    return {"images": count, "stages": {
        stage: sum(cumulative for (path, _, name), (_, _, _, cumulative, _) in stats.items()
                   if any(path.endswith(file) and name == function for file, function in functions))
        for stage, functions in PROFILE_STAGES.items()}}


CASES = {"floor": floor, "guarantees": floor_with_guarantees, "decode": decode, "check": check_bound,
         "cnnpipe": cnnpipe_ingest, "peer": peer, "profile": profiled_ingest}
# Imported before the clock starts: interpreter start-up is not ingestion, for any case.
IMPORTS = {"floor": ["pyarrow.parquet"], "guarantees": ["pyarrow.parquet", "hashlib"],
           "decode": ["PIL.Image", "cnn.cores", "cnnpipe.store.decoders"],
           "check": ["cnnpipe.sources.images", "cnn.cores", "cnnpipe.store.decoders"],
           "cnnpipe": ["cnnpipe.store", "cnnpipe.sources"], "peer": ["datasets"], "profile": ["cnnpipe.store", "cnnpipe.sources"]}


def run_case(case: str, source: str) -> dict:
    """Run one case in a fresh process and read its time, count and peak memory."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as scratch:
        target = os.path.join(scratch, "out")
        completed = subprocess.run([sys.executable, __file__, "--child", case, source, target],
                                   capture_output=True, text=True)
        if completed.returncode != 0:
            raise SystemExit(f"{case} on {source} failed:\n{completed.stderr[-3000:]}")
        return json.loads(completed.stdout.strip().splitlines()[-1])


def run_cases(cases: tuple[str, ...], source: str, repeats: int,
              baselines: int | None = None) -> tuple[list[dict], float, list[list[dict]]]:
    """Each case `repeats` times, the cases in turns: for each case its run of median time, the median
    over the rounds of the last case's time against the largest of the first `baselines` cases' (all
    the others by default) in that round, and the rounds. On a shared VM one case's time moved by half
    from one run to the next, and its baseline's with it."""
    rounds = [[run_case(case, source) for case in cases] for _ in range(repeats)]
    medians = [sorted((round_[index] for round_ in rounds), key=lambda result: result["seconds"])[repeats // 2]
               for index in range(len(cases))]
    paired = statistics.median(round_[-1]["seconds"] / max(result["seconds"] for result in round_[:baselines or -1])
                               for round_ in rounds)
    return medians, paired, rounds


def child(case: str, source: str, target: str) -> None:
    import importlib

    for module in IMPORTS[case]:
        importlib.import_module(module)
    started, cpu = time.perf_counter(), time.process_time()
    outcome = CASES[case](source, target)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    # Ingest's decoders fork from a server that lives as long as this process: end it, so that their
    # CPU time and memory count among its children's.
    from multiprocessing import forkserver

    forkserver._forkserver._stop()
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_rss_mb": rss / 1024,
                      "children_cpu": workers.ru_utime + workers.ru_stime,
                      **(outcome if isinstance(outcome, dict) else {"images": outcome})}))


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
    parser.add_argument("--skip-photos", action="store_true", help="leave out the photo-size JPEGs")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each case but the peer and the 4x source, in turns; the median is reported")
    parser.add_argument("--profile", action="store_true",
                        help="also profile cnnpipe's ingest of the CIFAR-10 folder and print where it went")
    args = parser.parse_args()
    if not CIFAR.exists():
        raise SystemExit(f"{CIFAR} is missing: this benchmark needs ../shared beside the checkout")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as scratch:
        folder = Path(scratch) / "cifar10"
        folder.mkdir()
        with tarfile.open(CIFAR) as tar:
            tar.extractall(folder, filter="data")
        rows = []
        profile = None
        for label, source in (("folder", str(folder)), ("tar.gz", str(CIFAR))):
            if label == "folder":
                (floor_result, bound, guarded, ours), paired, rounds = run_cases(
                    ("floor", "check", "guarantees", "cnnpipe"), source, args.repeats, baselines=1)
                # Each round's bounds against that round's floor, as the paired ratios are.
                least = statistics.median(work_bound(guarded_round, check_round) / floor_round["seconds"]
                                          for floor_round, check_round, guarded_round, _ in rounds)
                guarded_paired = statistics.median(guarded_round["seconds"] / floor_round["seconds"]
                                                   for floor_round, _, guarded_round, _ in rounds)
            else:
                (floor_result, ours), paired, _ = run_cases(("floor", "cnnpipe"), source, args.repeats)
            if label == "folder" and args.profile:  # a run of its own: the profiler's cost skews its time
                profile = run_case("profile", source)
                profile["floor"] = floor_result["seconds"]
            rows.append((f"cnnpipe, {label}", ours, ours["seconds"] / floor_result["seconds"],
                         f"<= 1.25x floor: {paired:.2f}x paired"))
            rows.append((f"floor, {label}", floor_result, 1.0, ""))
            if label == "folder":
                rows.append(("check bound, folder", bound, bound["seconds"] / floor_result["seconds"],
                             f"checking alone; cnnpipe {ours['seconds'] / bound['seconds']:.2f}x it"))
                least_seconds = work_bound(guarded, bound)
                rows.append(("work bound, folder", {"images": bound["images"], "peak_rss_mb": None,
                                                    "seconds": least_seconds},
                             least_seconds / floor_result["seconds"],
                             f"floor + guarantees + check, on all cores: {least:.2f}x paired, so 1.25x is "
                             f"{'within reach' if least <= 1.25 else 'out of reach'} here"))
                rows.append(("floor + guarantees, folder", guarded, guarded["seconds"] / floor_result["seconds"],
                             f"lstat, sha256, fsync, in one process: {guarded_paired:.2f}x paired"))
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
            rows.append(("cnnpipe, 4x tar", ours, ours["seconds"] / floor_result["seconds"], "<= 1.25x floor, RSS < 1 GB"))
            rows.append(("floor, 4x tar", floor_result, 1.0, ""))
        if not args.skip_photos:
            from bench.photos import write_photo_dataset

            photos = Path(scratch) / "photos"
            write_photo_dataset(photos, PHOTOS["classes"], PHOTOS["per_class"], 0, PHOTOS["size"])
            (floor_result, decode_result, ours), paired, _ = run_cases(("floor", "decode", "cnnpipe"), str(photos),
                                                                       args.repeats)
            base = max(floor_result["seconds"], decode_result["seconds"])
            width, height = PHOTOS["size"]
            rows.append((f"cnnpipe, {width}x{height}", ours, ours["seconds"] / base,
                         f"<= 1.2x max(floor, decode): {paired:.2f}x paired"))
            rows.append((f"floor, {width}x{height}", floor_result, floor_result["seconds"] / base, ""))
            rows.append((f"decode, {width}x{height}", decode_result, decode_result["seconds"] / base, ""))
    print(f"\nIngest benchmark, {os.cpu_count()} cores, {CIFAR.name}\n")
    print(f"| {'case':<26} | {'images':>8} | {'seconds':>8} | {'images/s':>9} | {'x base':>7} | {'peak RSS MB':>11} | target")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 10}|{'-' * 11}|{'-' * 9}|{'-' * 13}|-------")
    for name, result, ratio, target in rows:
        rss = "" if result["peak_rss_mb"] is None else f"{result['peak_rss_mb']:.0f}"
        print(f"| {name:<26} | {result['images']:>8,} | {result['seconds']:>8.2f} | "
              f"{result['images'] / result['seconds']:>9,.0f} | {ratio:>7.2f} | {rss:>11} | {target}")
    if profile:
        print_profile(profile)


def print_profile(profile: dict) -> None:
    seconds = profile["seconds"]
    print(f"\nWhere cnnpipe's ingest of the CIFAR-10 folder goes (cProfile, {profile['images']:,} images; "
          f"the profiler slows the main process, so shares matter more than seconds)\n")
    print(f"| {'main process':<44} | {'seconds':>8} | share")
    print(f"|{'-' * 46}|{'-' * 10}|------")
    for stage, spent in profile["stages"].items():
        print(f"| {stage:<44} | {spent:>8.2f} | {100 * spent / seconds:5.1f}%")
    print(f"| {'whole run, profiled':<44} | {seconds:>8.2f} | 100.0%")
    print(f"| {'floor, the same folder, unprofiled':<44} | {profile['floor']:>8.2f} |")
    print(f"| {'decoding processes, CPU seconds in all':<44} | {profile['children_cpu']:>8.2f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
    else:
        main()
