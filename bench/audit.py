"""`cnnpipe audit` against known answers: planted leaks, flipped labels, and the CIFAR-10 archive.

    python bench/audit.py [--part leaks|labels|cifar|all] [--folds 2] [--epochs N]

- leaks: 3,000 train and 1,000 test images of CIFAR-10 (300 and 100 a class), plus 50 train images
  copied into test after JPEG re-encoding at quality 75, resizing by 0.9 and a brightness shift of
  +15%. Target: the audit finds >= 48 of them with <= 5 false pairs across splits.
- labels: scikit-learn's 1,797 8x8 digits upscaled to 28 px (80% train, 20% test), 5% of the train
  labels flipped to another digit at random (seed 0). Target: label_issues has >= 80% precision
  and >= 80% recall on the flipped images.
- cifar: the whole archive (50,000 train, 10,000 test). The share of test images with a twin in
  train, beside the 3.3% of Barz & Denzler (2020), and the time of the twin check once hashes
  exist (target < 10 s), on hashes alone (no folds) and, with --folds, confirmed by embeddings.

Every part runs the audit as `cnnpipe audit` does (`cnnpipe.monitoring.audit.audit_dataset`) on a
fresh store under a temporary home, and prints a table. Needs ../shared/data/cifar10-jpeg.tar.gz
for leaks and cifar.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnn.config import TrainConfig  # noqa: E402
from cnnpipe.monitoring.audit import audit_dataset, check_twins  # noqa: E402
from cnnpipe.settings import Settings  # noqa: E402
from cnnpipe.sources import open_source  # noqa: E402
from cnnpipe.store import DatasetStore, IngestOptions  # noqa: E402
from cnnpipe.store.twins import CANDIDATE_BITS  # noqa: E402

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
LEAKS = 50


def cifar_members(per_class: dict[str, int]) -> dict[str, list[tuple[str, bytes]]]:
    """The first `per_class[split]` images of each class of each split, as (class, bytes)."""
    taken: dict[str, list[tuple[str, bytes]]] = {split: [] for split in per_class}
    seen: dict[tuple[str, str], int] = {}
    with tarfile.open(ARCHIVE) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in per_class:
                continue
            split, label = parts[-3], parts[-2]
            if seen.get((split, label), 0) < per_class[split]:
                seen[(split, label)] = seen.get((split, label), 0) + 1
                taken[split].append((label, archive.extractfile(member).read()))
    return taken


def leaked_copy(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image = image.resize((round(image.width * 0.9), round(image.height * 0.9)), Image.Resampling.BILINEAR)
        image = ImageEnhance.Brightness(image).enhance(1.15)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=75)
        return out.getvalue()


def write(root: Path, split: str, label: str, name: str, data: bytes) -> None:
    folder = root / split / label
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def ingest(home: Path, name: str, source: Path) -> DatasetStore:
    store = DatasetStore(name, Settings(home=home, mlflow_tracking_uri=""))
    with store.lock():
        store.commit(store.stage(open_source(str(source)), IngestOptions()))
    return store


def config(store: DatasetStore, args) -> TrainConfig:
    return TrainConfig(dataset_dir=str(store.local_copy()), epochs=args.epochs, device="cpu")


def leaks(args, home: Path) -> None:
    taken = cifar_members({"train": 300, "test": 100})
    source = home / "leaks-src"
    rng = np.random.default_rng(0)
    for i, (label, data) in enumerate(taken["train"]):
        write(source, "train", label, f"{i:05d}.jpg", data)
    for i, (label, data) in enumerate(taken["test"]):
        write(source, "test", label, f"{i:05d}.jpg", data)
    planted = {}
    for i in rng.choice(len(taken["train"]), LEAKS, replace=False).tolist():
        label, data = taken["train"][i]
        copy = leaked_copy(data)
        write(source, "test", label, f"leak-{i:05d}.jpg", copy)
        planted[_sha(copy)] = _sha(data)
    store = ingest(home, "leaks", source)
    started = time.perf_counter()
    findings = audit_dataset(store, config(store, args), args.folds, home / "work")
    seconds = time.perf_counter() - started
    cross = [t for t in findings.twins.twins if t.split != t.twin_split]
    found = sum(1 for t in cross if planted.get(t.image_sha256) == t.twin_sha256)
    false = [t for t in cross if planted.get(t.image_sha256) != t.twin_sha256]
    print("\n| planted leaks | found | false pairs across splits | pairs within splits | hash candidates | audit s |")
    print("|---|---|---|---|---|---|")
    print(f"| {LEAKS} | {found} | {len(false)} | {sum(findings.twins.within().values())} | {findings.twins.candidates} "
          f"| {seconds:.0f} |")
    print("\n".join(findings.lines()))
    if args.verbose:
        _distances(findings, planted)


def _distances(findings, planted: dict[str, str]) -> None:
    """Every candidate pair's embedding distance and rank, planted or not: how TWIN_RANK was chosen."""
    for twin in sorted(findings.twins.twins + findings.twins.look_alikes, key=lambda t: t.embedding_distance or 0):
        kind = "planted" if planted.get(twin.image_sha256) == twin.twin_sha256 else "other"
        print(f"{kind:8s} bits {twin.hash_distance:2d} distance {twin.embedding_distance} rank {twin.embedding_rank} "
              f"{twin.split}-{twin.twin_split}")


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def labels(args, home: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.images))
    source, flipped = home / "digits-src", set()
    train_count = int(0.8 * len(order))
    for position, i in enumerate(order.tolist()):
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(pixels, "L").resize((28, 28), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        data, label = buffer.getvalue(), int(digits.target[i])
        split = "train" if position < train_count else "test"
        if split == "train" and rng.random() < 0.05:
            label = int(rng.choice([d for d in range(10) if d != label]))
            flipped.add(_sha(data))
        write(source, split, str(label), f"{i:05d}.png", data)
    store = ingest(home, "digits", source)
    started = time.perf_counter()
    findings = audit_dataset(store, config(store, args), args.folds, home / "work")
    seconds = time.perf_counter() - started
    flagged = {issue.image_sha256 for issue in findings.label_issues if issue.split == "train"}
    hits = len(flagged & flipped)
    precision, recall = hits / max(1, len(flagged)), hits / max(1, len(flipped))
    print("\n| train images | flipped | flagged in train | of them flipped | precision | recall | fold top-1 | audit s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {train_count} | {len(flipped)} | {len(flagged)} | {hits} | {precision:.1%} | {recall:.1%} | "
          f"{' / '.join(f'{t:.1%}' for t in findings.fold_top1)} | {seconds:.0f} |")
    test_flagged = [i for i in findings.label_issues if i.split == "test"]
    print(f"test images flagged (labels as the set ships them): {len(test_flagged)}")


def cifar(args, home: Path) -> None:
    started = time.perf_counter()
    store = ingest(home, "cifar10", ARCHIVE)
    ingest_seconds = time.perf_counter() - started
    print(f"ingest of {ARCHIVE.name}: {ingest_seconds:.0f} s")
    rows = []
    started = time.perf_counter()
    hashes_only = check_twins(store)
    rows.append(("hashes alone (--folds 0)", hashes_only, time.perf_counter() - started))
    if args.folds:
        started = time.perf_counter()
        findings = audit_dataset(store, config(store, args), args.folds, home / "work")
        rows.append((f"confirmed by embeddings ({args.folds} folds, {args.epochs or 'auto'} epochs)", findings.twins,
                     time.perf_counter() - started))
    print("\n| twin check | test images with a twin in train | share | Barz & Denzler | pairs within train | check s |")
    print("|---|---|---|---|---|---|")
    for name, check, seconds in rows:
        leaked = len(check.leaked("test"))
        print(f"| {name} | {leaked} of {check.images.get('test', 0)} | {leaked / max(1, check.images.get('test', 1)):.2%} "
              f"| 3.3% | {check.within().get('train', 0)} | {seconds:.1f} (twin check {check.seconds:.1f}) |")
    candidates = {t.image_sha256 for t in hashes_only.twins + hashes_only.look_alikes if t.leak}
    print(f"\ntest images with a train image within {CANDIDATE_BITS} bits (candidates, before a model confirms them): "
          f"{len(candidates)} ({len(candidates) / hashes_only.images['test']:.2%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["leaks", "labels", "cifar", "all"], default="all")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="per fold; empty: the automatic recipe")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    parts = ["leaks", "labels", "cifar"] if args.part == "all" else [args.part]
    for part in parts:
        with tempfile.TemporaryDirectory(prefix=f"bench-audit-{part}-") as home:
            print(f"## {part}")
            globals()[part](args, Path(home))


if __name__ == "__main__":
    main()
