"""The gate's majority-class test: the exact binomial tail and the validation split's figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cnn.layout import FORMAT
from cnnpipe.models.majority import binomial_tail, majority_baseline, majority_test


@pytest.mark.parametrize(("k", "n", "p", "expected"), [
    (8, 10, 0.5, 56 / 1024),          # C(10,8) + C(10,9) + C(10,10) over 2^10
    (4, 4, 0.25, 1 / 256),
    (1, 4, 0.25, 1 - 0.75 ** 4),
    (2, 3, 0.5, 0.5),
    (3, 5, 0.2, (10 * 0.2 ** 3 * 0.8 ** 2) + (5 * 0.2 ** 4 * 0.8) + 0.2 ** 5),
    (0, 7, 0.3, 1.0),                 # everything is at least 0
    (-2, 7, 0.3, 1.0),
    (8, 7, 0.3, 0.0),                 # more than n successes never happen
    (0, 0, 0.5, 1.0),
    (1, 0, 0.5, 0.0),
    (1, 10, 0.0, 0.0),                # p = 0: never a success
    (0, 10, 0.0, 1.0),
    (10, 10, 1.0, 1.0),               # p = 1: always n successes
])
def test_binomial_tail_small_cases_by_hand(k, n, p, expected):
    assert binomial_tail(k, n, p) == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_binomial_tail_refuses_nonsense():
    for n, p in ((10, -0.1), (10, 1.5), (10, math.nan), (-1, 0.5)):
        with pytest.raises(ValueError):
            binomial_tail(1, n, p)


@pytest.mark.parametrize(("n", "p"), [(20, 0.25), (400, 0.25), (1000, 0.7), (10_000, 0.1), (12_345, 0.5)])
def test_binomial_tail_matches_scipy_on_every_k_region(n, p):
    stats = pytest.importorskip("scipy.stats")
    sd = math.sqrt(n * p * (1 - p))
    for k in sorted({0, 1, max(0, int(n * p - 3 * sd)), int(n * p), int(n * p) + 1, int(n * p + 2 * sd),
                     int(n * p + 6 * sd), min(n, int(n * p + 20 * sd)), n}):
        expected = stats.binom.sf(k - 1, n, p)
        assert binomial_tail(k, n, p) == pytest.approx(expected, rel=1e-9, abs=1e-15), (k, n, p)


def test_binomial_tail_is_exact_for_millions():
    n, p = 3_000_000, 0.1
    sd = math.sqrt(n * p * (1 - p))
    values = [binomial_tail(int(n * p + z * sd), n, p) for z in (-4, 0, 1, 2.33, 5)]
    stats = pytest.importorskip("scipy.stats")
    for z, value in zip((-4, 0, 1, 2.33, 5), values):
        assert value == pytest.approx(stats.binom.sf(int(n * p + z * sd) - 1, n, p), rel=1e-6), z


def _dataset(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    """A dataset folder with only what the gate reads: its manifest."""
    root.mkdir(parents=True, exist_ok=True)
    classes = sorted({label for split in counts.values() for label in split})
    (root / "manifest.json").write_text(json.dumps({"format": FORMAT, "name": "fake", "version_id": "v-fake", "classes": classes,
                                                    "files": [], "counts": counts}))
    return root


def test_majority_baseline_reads_the_validation_split(tmp_path):
    dataset = _dataset(tmp_path / "d", {"train": {"a": 900, "b": 100}, "val": {"a": 30, "b": 70}, "test": {"a": 5}})
    assert majority_baseline(dataset) == (100, pytest.approx(0.70), "val")


def test_majority_baseline_falls_back_to_test_without_a_val_split(tmp_path):
    dataset = _dataset(tmp_path / "d", {"train": {"a": 10, "b": 10}, "val": {}, "test": {"a": 6, "b": 2}})
    assert majority_baseline(dataset) == (8, pytest.approx(0.75), "test")
    assert "of 8 validation images (the test split)" in majority_test(0.9, dataset).clause


def test_the_majority_test_threshold_on_a_balanced_split(tmp_path):
    dataset = _dataset(tmp_path / "d", {"train": {c: 100 for c in "abcd"}, "val": {c: 100 for c in "abcd"}})
    threshold = next(k for k in range(401) if binomial_tail(k, 400, 0.25) < 0.01)
    assert 110 < threshold < 125  # a little over two standard deviations above 100
    below, at = majority_test((threshold - 1) / 400, dataset), majority_test(threshold / 400, dataset)
    assert not below.passed and below.p_value >= 0.01 and below.correct == threshold - 1
    assert at.passed and at.p_value < 0.01 and at.correct == threshold
    chance = majority_test(0.25, dataset)
    assert not chance.passed and chance.p_value > 0.4 and (chance.n, chance.majority_rate) == (400, 0.25)
    assert majority_test(0.2650, dataset).clause == (
        "does not clearly beat the majority-class rate 0.2500 of 400 validation images (binomial p=0.26 >= 0.01)")


def test_the_majority_test_uses_the_largest_class_not_one_over_the_classes(tmp_path):
    # 4 classes, but 70% of the validation images are "a": 60% top-1 is worse than always answering "a".
    dataset = _dataset(tmp_path / "d", {"val": {"a": 140, "b": 20, "c": 20, "d": 20}})
    result = majority_test(0.60, dataset)
    assert not result.passed and result.majority_rate == pytest.approx(0.70) and result.p_value > 0.99
    assert majority_test(0.80, dataset).passed


def test_the_majority_test_refuses_what_it_cannot_measure(tmp_path):
    empty = _dataset(tmp_path / "empty", {"train": {"a": 3}, "val": {}, "test": {}})
    result = majority_test(1.0, empty)
    assert not result.passed and result.n == 0 and "no images" in result.clause
    missing = majority_test(1.0, tmp_path / "nowhere")
    assert not missing.passed and "unreadable" in missing.clause
    balanced = _dataset(tmp_path / "b", {"val": {"a": 50, "b": 50}})
    assert not majority_test(math.nan, balanced).passed
    single = _dataset(tmp_path / "s", {"val": {"a": 50}})
    assert not majority_test(1.0, single).passed  # one class: nothing beats always answering it
