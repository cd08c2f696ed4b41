from __future__ import annotations

import json

import pytest

from cnn.config import TrainConfig
from cnn.layout import FORMAT
from cnn.splits import MIN_TRAIN_IMAGES_PER_CLASS, require_trainable_split
from cnn.train import plan
from cnnpipe.settings import Settings
from cnnpipe.sources import open_source
from cnnpipe.store import DatasetStore, IngestOptions
from tests.imagefactory import write_class_folders


def ingest_folder(root, name, classes):
    write_class_folders(root / "source", classes, split="train")
    store = DatasetStore(name, Settings(home=root / "home", mlflow_tracking_uri=""))
    with store.lock():
        store.commit(store.stage(open_source(str(root / "source")), IngestOptions(workers=0)))
    return store.root


def test_a_train_split_of_one_class_is_refused_in_one_line_saying_why(tmp_path):
    dataset = ingest_folder(tmp_path, "cats", {"cat": 12})
    with pytest.raises(ValueError) as refused:
        plan(TrainConfig(str(dataset), device="cpu", checkpoint_root=str(tmp_path / "runs")))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("the train split of cats has only class 'cat': a classifier needs images of at least two")


def test_a_train_split_of_two_classes_plans(tmp_path):
    dataset = ingest_folder(tmp_path, "pets", {"cat": 12, "dog": 12})
    assert plan(TrainConfig(str(dataset), device="cpu", checkpoint_root=str(tmp_path / "runs"))).config.epochs > 0


def published(root, counts: dict[str, dict[str, int]]):
    """A dataset folder holding only the manifest the checks before a run read."""
    classes = sorted({label for split in counts.values() for label in split})
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"format": FORMAT, "name": root.name, "version_id": "v1",
                                                    "classes": classes, "counts": counts, "files": []}))
    return root


def test_too_few_images_of_many_classes_names_those_below_the_floor_first_and_how_many_there_are(tmp_path):
    train = {f"class-{i:03d}": 50 for i in range(300)} | {"class-007": 3, "class-250": 0}
    dataset = published(tmp_path / "many", {"train": train, "test": {"class-000": 5}})
    with pytest.raises(ValueError) as refused:
        require_trainable_split(dataset)
    shown = ", ".join(["class-007 3", "class-250 0"] + [f"class-{i:03d} 50" for i in (0, 1, 2, 3, 4, 5, 6, 8)])
    assert str(refused.value) == (
        f"the train split of many has too few images to train on: {shown} and 290 more classes (at least "
        f"{MIN_TRAIN_IMAGES_PER_CLASS} a class are needed; 2 of 300 classes have fewer); ingest more images")


def test_a_dataset_with_nothing_held_out_is_refused_as_it_cannot_be_validated_or_reported_on(tmp_path):
    dataset = published(tmp_path / "pets", {"train": {"cat": 12, "dog": 12}})
    with pytest.raises(ValueError, match="^pets has no validation or test images, so a run would have nothing"):
        require_trainable_split(dataset)
    require_trainable_split(published(tmp_path / "tested", {"train": {"cat": 12, "dog": 12}, "test": {"cat": 1}}))
