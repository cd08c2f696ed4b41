"""A model's reference profile: what its predictions look like on held-out images it was trained for.

Drift is measured against this: the predicted and true class distributions, calibrated
confidence (its histogram and the accuracy per confidence bin), the size and mean
brightness of the images, and the mean and spread of their embeddings. Confidences are
calibrated by temperature scaling (Guo et al., 2017), the temperature fitted on the
validation split, so that the mean confidence of a batch estimates its accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cnn.metrics import calibration

CONFIDENCE_BINS = 20
# Below this calibrated confidence a prediction counts as low-confidence, here and in the views.
LOW_CONFIDENCE = 0.5
# A dimension of the embedding whose spread is this small beside the largest one's is rounding, not variation.
DEGENERATE_SPREAD = 1e-6
# Temperatures are searched over [e^-3, e^3]: far beyond what any trained network needs.
LOG_TEMPERATURE_RANGE = (-3.0, 3.0)


def calibrate(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax outputs rescaled by `temperature`: log-probabilities are logits up to a constant per row."""
    return torch.softmax(probabilities.double().clamp_min(1e-12).log() / temperature, dim=1)


def fit_temperature(probabilities: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature that minimises the negative log-likelihood of `targets` (golden-section search)."""
    if len(targets) == 0:
        return 1.0
    log_probabilities = probabilities.double().clamp_min(1e-12).log()
    targets = targets.long()

    def nll(log_temperature: float) -> float:
        scaled = torch.log_softmax(log_probabilities / math.exp(log_temperature), dim=1)
        return float(-scaled.gather(1, targets[:, None]).mean())

    low, high = LOG_TEMPERATURE_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    nll_a, nll_b = nll(a), nll(b)
    for _ in range(60):
        if nll_a < nll_b:
            high, b, nll_b = b, a, nll_a
            a = high - ratio * (high - low)
            nll_a = nll(a)
        else:
            low, a, nll_a = a, b, nll_b
            b = low + ratio * (high - low)
            nll_b = nll(b)
    return math.exp((low + high) / 2)


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean pixel value of each uint8 image, in [0, 1]: one figure per image, whatever its channels."""
    return images.float().mean(dim=tuple(range(1, images.dim()))) / 255.0


def reference_profile(probabilities: torch.Tensor, targets: torch.Tensor, classes: Sequence[str], temperature: float,
                      widths: Sequence[int], heights: Sequence[int], brightnesses: torch.Tensor) -> dict:
    """The profile of held-out predictions (raw softmax outputs) against their true classes."""
    calibrated = calibrate(probabilities, temperature)
    confidence, predicted = calibrated.max(dim=1)
    count = max(len(targets), 1)
    _, reliability = calibration(calibrated, targets, CONFIDENCE_BINS)
    predicted_counts = torch.bincount(predicted, minlength=len(classes)).tolist()
    true_counts = torch.bincount(targets.long(), minlength=len(classes)).tolist()
    return {
        "images": len(targets),
        "temperature": temperature,
        "top1": float((predicted == targets).double().mean()) if len(targets) else math.nan,
        "classes": [{"label": label, "predicted_share": predicted_counts[i] / count, "true_share": true_counts[i] / count}
                    for i, label in enumerate(classes)],
        "confidence_bins": [{"low": row["low"], "high": row["high"], "share": row["count"] / count,
                             "accuracy": None if math.isnan(row["accuracy"]) else row["accuracy"]}
                            for row in reliability],
        "mean_confidence": float(confidence.mean()) if len(targets) else math.nan,
        "low_confidence_share": float((confidence < LOW_CONFIDENCE).double().mean()) if len(targets) else math.nan,
        "width": _summary(torch.tensor(list(widths), dtype=torch.float64)),
        "height": _summary(torch.tensor(list(heights), dtype=torch.float64)),
        "brightness": _summary(brightnesses.double()),
    }


def embedding_reference(embeddings: torch.Tensor) -> dict | None:
    """The mean and standard deviation of each dimension of held-out embeddings (images x
    dimensions): what a batch's mean embedding is compared with (`embedding_shift` in the drift
    views); None for fewer than two images, which have no spread. A dimension the images hardly
    vary along (a projection fitted on fewer images or features than it has dimensions leaves
    some at zero) gets a spread of 0: no shift can be measured in units of it."""
    if len(embeddings) < 2:
        return None
    embeddings = embeddings.double()
    std = embeddings.std(0, correction=0)
    std[std <= DEGENERATE_SPREAD * std.max()] = 0.0
    return {"images": len(embeddings), "mean": embeddings.mean(0).tolist(), "std": std.tolist()}


def _summary(values: torch.Tensor) -> dict:
    if len(values) == 0:
        return {"mean": None, "std": None, "p05": None, "p50": None, "p95": None}
    quantiles = torch.quantile(values, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"mean": float(values.mean()), "std": float(values.std(correction=0)), "p05": quantiles[0],
            "p50": quantiles[1], "p95": quantiles[2]}
