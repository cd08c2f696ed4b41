"""A dataset's audit: twins within and across splits (a test image whose twin is in train is a leak),
labels that confident learning doubts, and images far from every other.

Twins are pairs whose perceptual hashes lie within `cnnpipe.store.twins.CANDIDATE_BITS` bits,
confirmed by one model's embeddings: look-alikes (two plain skies) share a hash far more often
than the model mistakes them for one picture. Near-identical hashes (`SURE_BITS`) need no model,
only colour thumbnails that agree.
Label issues and outliers come from cleanlab, on out-of-sample probabilities and embeddings that
`cnn.crossval.out_of_sample` computes by K-fold training.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from cnn.config import TrainConfig
from cnn.crossval import out_of_sample
from cnnpipe.predictions.database import transaction
from cnnpipe.store import DatasetStore
from cnnpipe.store.twins import hash_pairs, image_hashes, stored_images

log = logging.getLogger("cnnpipe.audit")

# A candidate pair is one picture when the model puts the two closer together than it puts either
# to all but this share of a sample of the dataset's images: a scale that holds for any model,
# however well trained.
TWIN_RANK = 0.01
SAMPLE_IMAGES = 500
# Hashes this close are one picture, whatever a model says, when their colour thumbnails agree too.
# bench/audit.py: 49 of 50 planted leaks (JPEG 75, 0.9x, +15% brightness) lay within 4 bits, and
# each of 32 random CIFAR-10 test-train pairs within 4 bits was one picture when looked at; the
# model is no help there: a CIFAR-10 model (57% top-1) put planted copies further apart than 8 to
# 16% of unrelated images. The hash sees grey structure alone: the demo's shapes, a circle of one
# colour and one of another in one place, lie within 4 bits. Thumbnails of 300 planted CIFAR-10
# copies correlated at 0.95 or more with their originals; such circles at 0.55 to 0.75.
SURE_BITS = 4
THUMBNAIL_CORRELATION = 0.9
# The share of images reported as outliers: the farthest from their nearest neighbours.
OUTLIER_SHARE = 0.01
HELD_OUT_SPLITS = ("val", "test")

Embed = Callable[[list[str]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Twin:
    image_sha256: str
    split: str
    twin_sha256: str
    twin_split: str
    hash_distance: int
    embedding_distance: float | None
    # The share of sampled images closer to either of the two than they are to each other.
    embedding_rank: float | None = None
    # How their standardised 16x16 colour thumbnails correlate, for pairs within SURE_BITS.
    thumbnail_correlation: float | None = None

    @property
    def leak(self) -> bool:
        """A held-out image whose twin is in train: every figure measured on it is inflated."""
        return self.split in HELD_OUT_SPLITS and self.twin_split == "train"


@dataclass
class TwinCheck:
    images: dict[str, int]  # per split
    twins: list[Twin]
    look_alikes: list[Twin]  # pairs whose hashes were close enough to look at, but are not one picture
    labels: dict[str, str]  # the label of every image of a twin
    seconds: float = 0.0

    @property
    def candidates(self) -> int:
        return len(self.twins) + len(self.look_alikes)

    def leaked(self, split: str) -> set[str]:
        """The images of a held-out split with a twin in train."""
        return {t.image_sha256 for t in self.twins if t.leak and t.split == split}

    def within(self) -> Counter:
        return Counter(t.split for t in self.twins if t.split == t.twin_split)

    def lines(self) -> list[str]:
        lines = []
        for split in HELD_OUT_SPLITS:
            if self.images.get(split):
                leaked = len(self.leaked(split))
                lines.append(f"{split}: {leaked} of {self.images[split]} images ({leaked / self.images[split]:.1%}) "
                             "have a twin in train")
        within = self.within()
        lines.append("twins within a split: " + (", ".join(f"{split} {n} pairs" for split, n in sorted(within.items()))
                                                 or "none"))
        return lines


def check_twins(store: DatasetStore, embed: Embed | None = None) -> TwinCheck:
    """Every pair of the dataset's images that is one picture. `embed` gives embeddings of images by
    hash, from one model; it is asked only for the images of candidate pairs and of a sample that
    says how far apart this model puts unrelated images."""
    started = time.perf_counter()
    hashes = image_hashes(store)
    sha256, splits = hashes["sha256"].to_pylist(), hashes["split"].to_pylist()
    pairs = hash_pairs(hashes["phash"].to_numpy(zero_copy_only=False))
    vectors, sample = {}, np.empty((0, 0))
    if embed is not None and len(pairs):
        candidates = sorted({sha256[i] for i in (*pairs.first.tolist(), *pairs.second.tolist())})
        others = np.random.default_rng(0).choice(len(sha256), min(len(sha256), SAMPLE_IMAGES), replace=False)
        vectors = embed(candidates + [sha256[i] for i in others.tolist()])
        sample = _unit(np.stack([vectors[sha256[i]] for i in others.tolist() if sha256[i] in vectors]))
    close = [(sha256[i], sha256[j]) for i, j, bits in zip(pairs.first.tolist(), pairs.second.tolist(),
                                                           pairs.bits.tolist()) if bits <= SURE_BITS]
    thumbnails = {sha: _thumbnail(data) for sha, data in
                  stored_images(store, {sha for pair in close for sha in pair}).items()} if close else {}
    twins, look_alikes = [], []
    for first, second, bits in zip(pairs.first.tolist(), pairs.second.tolist(), pairs.bits.tolist()):
        a, b = sha256[first], sha256[second]
        distance = rank = correlation = None
        if a in vectors and b in vectors:
            distance = _cosine_distance(vectors[a], vectors[b])
            rank = max(_closer_share(vectors[a], distance, sample), _closer_share(vectors[b], distance, sample))
        if a in thumbnails and b in thumbnails:
            correlation = float(np.mean(thumbnails[a] * thumbnails[b]))
        # A held-out image comes first, so that a leak reads from the image that leaked.
        if _split_rank(splits[second]) < _split_rank(splits[first]):
            first, second, a, b = second, first, b, a
        pair = Twin(a, splits[first], b, splits[second], bits, distance, rank, correlation)
        one_picture = ((correlation is not None and correlation >= THUMBNAIL_CORRELATION)
                       or (rank is not None and rank <= TWIN_RANK))
        (twins if one_picture else look_alikes).append(pair)
    labels = hashes["label"].to_pylist()
    in_twins = {i for pair in zip(pairs.first.tolist(), pairs.second.tolist()) for i in pair}
    return TwinCheck(dict(Counter(splits)), twins, look_alikes, {sha256[i]: labels[i] for i in in_twins},
                     time.perf_counter() - started)


def _thumbnail(data: bytes) -> np.ndarray:
    """A 16x16 colour thumbnail, standardised: the same picture brightened or re-encoded keeps it."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB").resize((16, 16), Image.Resampling.BOX), dtype=np.float64).ravel()
    return (pixels - pixels.mean()) / (pixels.std() or 1.0)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1)


def _closer_share(vector: np.ndarray, distance: float, sample: np.ndarray) -> float:
    """The share of the sample's images that lie as close to `vector` as `distance`, or closer (the
    image itself, if sampled, does not count): a model that puts every image equally far apart
    confirms no pair."""
    if not len(sample):
        return 0.0
    distances = 1 - sample @ _unit(vector)
    others = distances[distances > 1e-6]
    return float((others <= distance).mean()) if len(others) else 0.0


def _split_rank(split: str) -> int:
    return {"test": 0, "val": 1}.get(split, 2)


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 - float(np.dot(a, b)) / norm if norm else 1.0


@dataclass(frozen=True)
class LabelIssue:
    image_sha256: str
    split: str
    given_label: str
    suggested_label: str
    label_quality: float
    rank: int


@dataclass(frozen=True)
class Outlier:
    image_sha256: str
    split: str
    label: str
    outlier_score: float
    rank: int


def find_label_issues(sha256: list[str], splits: list[str], labels: np.ndarray, probabilities: np.ndarray,
                      classes: list[str]) -> list[LabelIssue]:
    """The images whose given label confident learning doubts, most doubtful first."""
    from cleanlab.filter import find_label_issues as confident_learning
    from cleanlab.rank import get_label_quality_scores

    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    # One process: the pruning is quick, and starting a pool of them is not.
    ranked = confident_learning(labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(labels, probabilities)
    suggested = probabilities.argmax(axis=1)
    return [LabelIssue(sha256[i], splits[i], classes[labels[i]], classes[suggested[i]], float(quality[i]), rank)
            for rank, i in enumerate(ranked.tolist(), start=1)]


def find_outliers(sha256: list[str], splits: list[str], labels: list[str], embeddings: np.ndarray,
                  share: float = OUTLIER_SHARE) -> list[Outlier]:
    """The `share` of images farthest from their nearest neighbours in embedding space, by cleanlab's
    out-of-distribution score (lower: farther), farthest first."""
    from cleanlab.outlier import OutOfDistribution

    if len(sha256) < 12:  # cleanlab's default k is 10 neighbours
        return []
    scores = OutOfDistribution().fit_score(features=np.asarray(embeddings, dtype=np.float32), verbose=False)
    shown = max(1, round(share * len(sha256)))
    order = np.argsort(scores, kind="stable")[:shown]
    return [Outlier(sha256[i], splits[i], labels[i], float(scores[i]), rank)
            for rank, i in enumerate(order.tolist(), start=1)]


@dataclass
class AuditFindings:
    dataset: str
    dataset_version: str
    twins: TwinCheck
    label_issues: list[LabelIssue] = field(default_factory=list)
    outliers: list[Outlier] = field(default_factory=list)
    fold_top1: list[float] = field(default_factory=list)
    folds: int = 0

    def metrics(self) -> dict[str, float]:
        figures = {f"{split}_images_with_twin_in_train": float(len(self.twins.leaked(split)))
                   for split in HELD_OUT_SPLITS}
        figures["twin_pairs"] = float(len(self.twins.twins))
        if self.folds:
            figures |= {"label_issues": float(len(self.label_issues)), "outliers": float(len(self.outliers)),
                        **{f"fold_{k}_top1": top1 for k, top1 in enumerate(self.fold_top1)}}
        return figures

    def lines(self) -> list[str]:
        lines = [f"audit of {self.dataset} version {self.dataset_version}: "
                 f"{sum(self.twins.images.values())} images ({', '.join(f'{k} {v}' for k, v in sorted(self.twins.images.items()))})"]
        lines += self.twins.lines()
        if self.folds:
            lines.append(f"{self.folds}-fold out-of-sample top-1: "
                         + ", ".join(f"{top1:.1%}" for top1 in self.fold_top1))
            lines.append(f"likely wrong labels: {len(self.label_issues)}"
                         + "".join(f"; {issue.given_label} -> {issue.suggested_label} {issue.image_sha256[:12]}"
                                   for issue in self.label_issues[:3]))
            lines.append(f"outliers: {len(self.outliers)} (the {OUTLIER_SHARE:.0%} farthest from their neighbours)")
        return lines


@dataclass
class LeakCheck:
    """What a training run's held-out figure owes to leaks: its held-out images with a twin in
    train, and its top-1 on the others."""

    dataset: str
    twins: TwinCheck
    split: str
    leaked: int
    images: int
    top1: float
    top1_without_leaks: float | None

    def line(self) -> str:
        if not self.leaked:
            return f"leak check: none of the {self.images} {self.split} images has a twin in train"
        without = "n/a" if self.top1_without_leaks is None else f"{self.top1_without_leaks:.1%}"
        return (f"leak check: {self.leaked} of the {self.images} {self.split} images have a twin in train; "
                f"{self.split} top-1 {self.top1:.1%} with them, {without} without "
                f"(`cnnpipe audit {self.dataset} --folds 0` lists the pairs)")


def leak_check(store: DatasetStore, checkpoint: str, split: str, images: int, top1: float,
               device: str = "cpu") -> LeakCheck:
    """The twin check of a dataset with a trained model's embeddings, and the model's top-1 on the
    `images` images of its held-out `split` (`top1` over all of them) once those with a twin in
    train are left out. It costs seconds: only the images of candidate pairs are embedded."""
    from cnn.decoding import decode_images
    from cnn.predict import Predictor

    predictor = Predictor(checkpoint, device)

    def outputs(wanted: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        stored = stored_images(store, set(wanted))
        shas = [sha for sha in wanted if sha in stored]
        if not shas:
            return [], np.empty((0, len(predictor.classes))), np.empty((0, 0))
        batch = decode_images([stored[sha] for sha in shas], predictor.decode_size, fit=predictor.resize)
        probabilities, embeddings = predictor.outputs(batch)
        return shas, probabilities.numpy(), embeddings.numpy()

    def embed(wanted: list[str]) -> dict[str, np.ndarray]:
        shas, _, embeddings = outputs(wanted)
        return dict(zip(shas, embeddings))

    twins = check_twins(store, embed if predictor.projection is not None else None)
    leaked = sorted(twins.leaked(split))
    top1_without: float | None = top1
    if leaked:
        shas, probabilities, _ = outputs(leaked)
        right = sum(predictor.classes[row.argmax()] == twins.labels[sha] for sha, row in zip(shas, probabilities))
        kept = images - len(leaked)
        top1_without = (top1 * images - right) / kept if kept > 0 else None
    return LeakCheck(store.name, twins, split, len(leaked), images, top1, top1_without)


def audit_dataset(store: DatasetStore, config: TrainConfig, folds: int, work_dir: Path) -> AuditFindings:
    """Audit the dataset's current version: `folds` trainings with `config` (its `dataset_dir` is the
    store's local copy) for label issues, outliers and the embeddings that confirm twins; with 0
    folds, only the twin check, on hashes alone."""
    version = store.manifest()["version_id"]
    if not folds:
        return AuditFindings(store.name, version, check_twins(store))
    found = out_of_sample(config, folds, work_dir)
    vectors = dict(zip(found.sha256, found.embeddings)) if found.embeddings is not None else {}
    twins = check_twins(store, (lambda wanted: {sha: vectors[sha] for sha in wanted if sha in vectors})
                        if vectors else None)
    labels = [found.classes[i] for i in found.labels]
    return AuditFindings(
        store.name, version, twins,
        find_label_issues(found.sha256, found.split, found.labels, found.probabilities, found.classes),
        find_outliers(found.sha256, found.split, labels, found.embeddings) if vectors else [],
        found.fold_top1, folds)


def write_findings(database: Path, findings: AuditFindings) -> None:
    """Replace the dataset's rows of near_duplicates, label_issues and outliers, in one transaction.
    Tables the audit did not compute this time (no folds: no label issues) keep their rows."""
    key = {"dataset": findings.dataset, "dataset_version": findings.dataset_version}
    tables = {"near_duplicates": _rows(key, findings.twins.twins)}
    if findings.folds:
        tables |= {"label_issues": _rows(key, findings.label_issues), "outliers": _rows(key, findings.outliers)}
    with transaction(database) as connection:
        for table, rows in tables.items():
            connection.execute(f"DELETE FROM {table} WHERE dataset = ?", [findings.dataset])
            if len(rows):
                connection.register("found", rows)
                connection.execute(f"INSERT INTO {table} BY NAME SELECT * FROM found")
                connection.unregister("found")


def _rows(key: dict, items: list) -> pa.Table:
    if not items:
        return pa.table({})
    names = list(vars(items[0]))
    return pa.table({**{k: [v] * len(items) for k, v in key.items()},
                     **{name: [getattr(item, name) for item in items] for name in names}})


def twin_thumbnails(store_images: dict[str, bytes], twins: list[Twin], path: Path, shown: int = 8) -> Path | None:
    """Leak pairs side by side (held-out image left, its train twin right), for the report."""
    leaks = [t for t in twins if t.leak][:shown]
    if not leaks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(leaks), 2, figsize=(4, 2 * len(leaks)), squeeze=False)
    for row, twin in zip(axes, leaks):
        for axis, sha, split in ((row[0], twin.image_sha256, twin.split), (row[1], twin.twin_sha256, twin.twin_split)):
            with Image.open(io.BytesIO(store_images[sha])) as image:
                axis.imshow(image.convert("RGB"))
            axis.set_title(f"{split} {sha[:10]}", fontsize=7)
            axis.axis("off")
    figure.suptitle("held-out images and their twins in train", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
