"""The automatic recipe on real images: a 1,000-image CIFAR-10 subset, no training flags."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import pytest

from cnn.config import TrainConfig
from cnn.train import fit, plan
from tests.conftest import CIFAR_TARBALL, needs_cifar

pytestmark = [needs_cifar, pytest.mark.slow]

TRAIN_PER_CLASS, TEST_PER_CLASS = 100, 30


def cifar_subset(folder: Path) -> Path:
    """train/<class>/ (ingest carves validation out of it) and test/<class>/, from the tarball's stream."""
    wanted = {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS}
    taken: Counter = Counter()
    with tarfile.open(CIFAR_TARBALL, "r|*") as tar:
        for member in tar:
            parts = Path(member.name).parts[-3:]
            if not member.isfile() or len(parts) != 3 or parts[0] not in wanted:
                continue
            split, label, name = parts
            if taken[split, label] >= wanted[split]:
                continue
            taken[split, label] += 1
            target = folder / split / label / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            if len(taken) == 20 and all(taken[key] >= wanted[key[0]] for key in taken):
                break
    return folder


def test_a_thousand_cifar_images_learn_well_above_chance_with_no_flags(tmp_path):
    from cnnpipe.settings import Settings
    from cnnpipe.sources import open_source
    from cnnpipe.store import DatasetStore, IngestOptions

    home = tmp_path / "home"
    store = DatasetStore("cifar-1k", Settings(home=home, mlflow_tracking_uri=""))
    with store.lock():
        store.commit(store.stage(open_source(str(cifar_subset(tmp_path / "source"))), IngestOptions(workers=0)))
    config = TrainConfig(dataset_dir=str(home / "datasets" / "cifar-1k"), epochs=3, device="cpu",
                         checkpoint_root=str(tmp_path / "checkpoints"))
    planned = plan(config)
    # What the recipe chose for about 900 images, instead of CIFAR-10's batch 512 (one step an epoch).
    assert planned.recipe.batch_size == 32 and planned.recipe.steps_per_epoch >= 25
    result = fit(config)
    assert result.held_out_split == "test" and result.held_out["images"] == 10 * TEST_PER_CLASS
    # Chance is 10%; bench/recipe.py measured 38% for the same recipe and epochs on its own
    # 1,000-image subset (2-core CPU). Half of that leaves room for another subset and machine.
    assert result.held_out["top1"] > 0.2, result.history
