"""The reference profile's statistics, on synthetic predictions whose answers are known."""

from __future__ import annotations

import pytest
import torch

from cnn import monitoring


def test_temperature_scaling_recovers_the_temperature_that_made_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 10, generator=generator) * 3
    # Labels drawn from softmax(logits / 2.5): a model reporting softmax(logits) is overconfident by 2.5.
    targets = torch.multinomial(torch.softmax(logits / 2.5, dim=1), 1, generator=generator).squeeze(1)
    fitted = monitoring.fit_temperature(torch.softmax(logits, dim=1), targets)
    assert fitted == pytest.approx(2.5, rel=0.08)
    calibrated = monitoring.calibrate(torch.softmax(logits, dim=1), fitted)
    # Calibrated, mean confidence estimates accuracy; uncalibrated it overstates it.
    accuracy = float((calibrated.argmax(1) == targets).double().mean())
    assert float(calibrated.max(1).values.mean()) == pytest.approx(accuracy, abs=0.02)
    assert float(torch.softmax(logits, dim=1).max(1).values.mean()) > accuracy + 0.1


def test_temperature_one_changes_nothing():
    probabilities = torch.softmax(torch.randn(50, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    torch.testing.assert_close(monitoring.calibrate(probabilities, 1.0), probabilities.double())


def test_the_profile_counts_classes_confidence_and_images():
    # Four images, three classes: predicted 0, 0, 1, 2 against true 0, 1, 1, 2.
    probabilities = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    targets = torch.tensor([0, 1, 1, 2])
    images = torch.stack([torch.full((3, 8, 8), value, dtype=torch.uint8) for value in (0, 51, 102, 255)])
    profile = monitoring.reference_profile(probabilities, targets, ["a", "b", "c"], 1.0, [32, 32, 64, 64],
                                           [32, 48, 64, 80], monitoring.brightness(images))
    assert profile["images"] == 4 and profile["top1"] == pytest.approx(0.75)
    assert [(row["label"], row["predicted_share"], row["true_share"]) for row in profile["classes"]] == [
        ("a", 0.5, 0.25), ("b", 0.25, 0.5), ("c", 0.25, 0.25)]
    assert len(profile["confidence_bins"]) == monitoring.CONFIDENCE_BINS
    assert sum(row["share"] for row in profile["confidence_bins"]) == pytest.approx(1)
    assert profile["mean_confidence"] == pytest.approx((0.9 + 0.6 + 0.8 + 0.6) / 4)
    assert profile["low_confidence_share"] == 0
    assert profile["width"]["mean"] == 48 and profile["height"]["p50"] == pytest.approx(56)
    assert profile["brightness"]["mean"] == pytest.approx((0 + 51 + 102 + 255) / 4 / 255)


def test_the_embedding_reference_keeps_each_dimension_s_mean_and_spread_and_none_where_only_rounding_varies():
    generator = torch.Generator().manual_seed(2)
    # The last dimension varies by rounding alone, as one a low-rank projection leaves empty does.
    embeddings = torch.randn(5_000, 4, generator=generator) * torch.tensor([3.0, 1.0, 0.5, 1e-9]) \
        + torch.tensor([7.0, 7.0, 7.0, 0.0])
    reference = monitoring.embedding_reference(embeddings)
    assert reference["images"] == 5_000
    assert reference["mean"] == pytest.approx([7, 7, 7, 0], abs=0.1)
    assert reference["std"][:3] == pytest.approx([3.0, 1.0, 0.5], rel=0.05)
    assert reference["std"][3] == 0.0  # else a shift of nothing there would count as a billion spreads
    assert monitoring.embedding_reference(embeddings[:1]) is None
