"""bench/photos.py writes a photo-size data set that ingestion reads as train and test splits."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.photos import CLASSES, main, write_photo_dataset
from cnnpipe.sources import open_source
from cnnpipe.sources.images import check_image


def files(root) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_the_photos_are_jpegs_in_split_and_class_folders_that_ingestion_reads(tmp_path):
    written = write_photo_dataset(tmp_path, classes=3, per_class=2, test_per_class=1, size=(96, 72), seed=1)
    assert written == {"train": 6, "test": 3}
    entries = list(open_source(str(tmp_path)).entries())
    assert Counter((entry.split, entry.label) for entry in entries) == {
        **{("train", label): 2 for label in CLASSES[:3]}, **{("test", label): 1 for label in CLASSES[:3]}}
    checked = [check_image(entry.data) for entry in entries]
    assert {(image.format, image.width, image.height) for image in checked} == {("JPEG", 96, 72)}


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_images(tmp_path):
    main([str(tmp_path / "a"), "--classes", "2", "--per-class", "2", "--test-per-class", "1", "--size", "64x48"])
    write_photo_dataset(tmp_path / "b", classes=2, per_class=2, test_per_class=1, size=(64, 48), seed=0)
    write_photo_dataset(tmp_path / "c", classes=2, per_class=2, test_per_class=1, size=(64, 48), seed=1)
    first, again, other = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(first) == 6 and first == again
    assert first.keys() == other.keys() and not set(first.values()) & set(other.values())
    assert len(set(first.values())) == 6


@pytest.mark.parametrize("argv, message", [(["--classes", "11"], "classes must be between 2 and 10, not 11"),
                                           (["--size", "320"], "expected WIDTHxHEIGHT")])
def test_bad_arguments_are_refused_in_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
