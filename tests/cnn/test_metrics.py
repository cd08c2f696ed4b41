"""Every figure against scikit-learn or a hand computation, on small fixed inputs."""

from __future__ import annotations

import math

import pytest
import torch

from cnn.metrics import calibration, classification_report, confusion_matrix, topk_correct

sklearn_metrics = pytest.importorskip("sklearn.metrics")

PROBABILITIES = torch.tensor([
    [0.70, 0.20, 0.10],
    [0.10, 0.80, 0.10],
    [0.35, 0.25, 0.40],
    [0.20, 0.50, 0.30],
    [0.05, 0.05, 0.90],
    [0.60, 0.30, 0.10],
])
TARGETS = torch.tensor([0, 1, 0, 2, 2, 1])
CLASSES = ["cat", "dog", "eel"]


def test_report_matches_scikit_learn():
    report = classification_report(PROBABILITIES, TARGETS, CLASSES)
    predicted = PROBABILITIES.argmax(1).numpy()
    truth = TARGETS.numpy()
    assert report["confusion_matrix"] == sklearn_metrics.confusion_matrix(truth, predicted).tolist()
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(truth, predicted, zero_division=0)
    for i, row in enumerate(report["per_class"]):
        assert row["class"] == CLASSES[i]
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]
    for average in ("macro", "weighted"):
        p, r, f, _ = sklearn_metrics.precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
        assert report[average] == pytest.approx({"precision": p, "recall": r, "f1": f})
    assert report["top1"] == pytest.approx(sklearn_metrics.accuracy_score(truth, predicted))
    assert report["top1_error"] == pytest.approx(1 - report["top1"])


def test_top_k_by_hand():
    # Targets' ranks: 1, 1, 2, 2, 1, 2 -> top-1 3/6, top-2 6/6.
    assert topk_correct(PROBABILITIES, TARGETS, 1) == 3
    assert topk_correct(PROBABILITIES, TARGETS, 2) == 6
    assert topk_correct(PROBABILITIES, TARGETS, 5) == 6  # capped at the class count
    assert classification_report(PROBABILITIES, TARGETS, CLASSES)["top5_error"] == 0.0


def test_expected_calibration_error_by_hand():
    probabilities = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    targets = torch.tensor([0, 1, 0, 0])
    ece, table = calibration(probabilities, targets, bins=10)
    # Bin (0.8, 0.9]: confidence 0.9, accuracy 0.5; bin (0.5, 0.6]: confidence 0.6, accuracy 0.5.
    assert ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    filled = [row for row in table if row["count"]]
    assert [(row["count"], row["accuracy"]) for row in filled] == [(2, 0.5), (2, 0.5)]
    assert all(math.isnan(row["accuracy"]) for row in table if not row["count"])


def test_confusion_matrix_counts_every_prediction():
    matrix = confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]), 3)
    assert matrix.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]


def test_mistake_collector_keeps_the_most_confident_wrong_predictions_across_batches():
    from cnn.loop import MistakeCollector

    collector = MistakeCollector(2)
    images = torch.arange(4, dtype=torch.uint8).reshape(4, 1, 1, 1)
    # Rows 0 and 2 are wrong (0.9 and 0.6), row 1 is right with 0.99, row 3 wrong with 0.7.
    probabilities = torch.tensor([[0.1, 0.9], [0.99, 0.01], [0.4, 0.6], [0.3, 0.7]])
    collector.add(images[:2], probabilities[:2], torch.tensor([0, 0]))
    collector.add(images[2:], probabilities[2:], torch.tensor([0, 0]))
    kept = collector.ranked()
    assert [m["confidence"] for m in kept] == pytest.approx([0.9, 0.7])
    assert [int(m["image"]) for m in kept] == [0, 3] and all(m["predicted"] == 1 for m in kept)
