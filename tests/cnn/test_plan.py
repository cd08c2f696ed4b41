from __future__ import annotations

import pytest

from cnn.config import TrainConfig
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
