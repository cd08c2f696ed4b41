from __future__ import annotations

import json
import shutil

import pytest

from cnn.config import TrainConfig
from cnn.layout import FORMAT, LayoutError, PublishedDataset
from cnn.splits import StoreSplit
from cnn.train import plan


@pytest.fixture
def dataset_copy(shapes_dataset, tmp_path):
    return shutil.copytree(shapes_dataset, tmp_path / "datasets" / "shapes")


def rewrite_manifest(dataset_dir, **changes):
    path = dataset_dir / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_the_reader_sees_what_the_store_published(shapes_dataset):
    dataset = PublishedDataset.open(shapes_dataset)
    manifest = json.loads((shapes_dataset / "manifest.json").read_text())
    assert dataset.name == "shapes" and dataset.classes == manifest["classes"]
    assert all(path.is_file() and path.is_relative_to(shapes_dataset) for path in dataset.files)
    assert sum(dataset.rows(split) for split in ("train", "val", "test")) == manifest["num_rows"]


@pytest.mark.parametrize("found", ["cnnpipe-dataset/2", None])
def test_an_unknown_format_is_refused_in_one_line_naming_the_manifest(dataset_copy, found):
    rewrite_manifest(dataset_copy, format=found)
    with pytest.raises(LayoutError) as caught:
        StoreSplit.open(dataset_copy, "train")
    message = str(caught.value)
    assert "\n" not in message and str(dataset_copy / "manifest.json") in message
    assert repr(found) in message and FORMAT in message


def test_training_refuses_an_unknown_format_before_reading_a_part(dataset_copy):
    rewrite_manifest(dataset_copy, format="cnnpipe-dataset/2")
    with pytest.raises(ValueError, match="cnnpipe-dataset/2"):
        plan(TrainConfig(dataset_dir=str(dataset_copy), epochs=1))


def test_a_folder_without_a_manifest_or_with_a_damaged_one_says_which(dataset_copy, tmp_path):
    with pytest.raises(LayoutError, match="no manifest.json"):
        PublishedDataset.open(tmp_path / "elsewhere")
    (dataset_copy / "manifest.json").write_text("{")
    with pytest.raises(LayoutError, match="cnnpipe datasets show shapes"):
        PublishedDataset.open(dataset_copy)


def test_checkpoints_default_to_the_home_beside_the_datasets(dataset_copy, tmp_path):
    from cnn.layout import default_checkpoint_root

    assert default_checkpoint_root(dataset_copy) == (tmp_path / "checkpoints").resolve()
