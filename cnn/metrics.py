"""Classification metrics from predicted probabilities, computed in one pass.

Top-1 and top-5 error as the paper reports them, per-class precision, recall, F1 and
support with macro and weighted averages, the confusion matrix, and the expected
calibration error with the table behind a reliability diagram.
"""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    """How many targets are among the k highest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum())


def confusion_matrix(predicted: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted ones, as in scikit-learn."""
    flat = targets.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def calibration(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width confidence bins, and the bins themselves."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == targets).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # Bin i holds confidences in (edge_i, edge_i+1]; a confidence of exactly 0 goes to bin 0.
    index = (torch.bucketize(confidence.double(), edges, right=False) - 1).clamp(0, bins - 1)
    table, ece, total = [], 0.0, len(targets)
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if count:
            mean_confidence = float(confidence[members].double().mean())
            accuracy = float(correct[members].mean())
            ece += count / total * abs(accuracy - mean_confidence)
        else:
            mean_confidence = accuracy = float("nan")
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                      "confidence": mean_confidence, "accuracy": accuracy})
    return ece, table


def classification_report(probabilities: torch.Tensor, targets: torch.Tensor, classes: list[str],
                          bins: int = 15) -> dict:
    probabilities, targets = probabilities.detach().float().cpu(), targets.detach().long().cpu()
    count, num_classes = probabilities.shape
    predicted = probabilities.argmax(dim=1)
    matrix = confusion_matrix(predicted, targets, num_classes)
    true_positive = matrix.diag().double()
    support = matrix.sum(dim=1).double()
    predicted_count = matrix.sum(dim=0).double()
    precision = torch.where(predicted_count > 0, true_positive / predicted_count.clamp_min(1), 0.0)
    recall = torch.where(support > 0, true_positive / support.clamp_min(1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-300), 0.0)
    weights = support / support.sum()
    top1 = topk_correct(probabilities, targets, 1) / count
    top5 = topk_correct(probabilities, targets, 5) / count
    ece, reliability = calibration(probabilities, targets, bins)
    return {
        "images": count, "top1": top1, "top5": top5, "top1_error": 1 - top1, "top5_error": 1 - top5,
        "per_class": [{"class": name, "precision": float(precision[i]), "recall": float(recall[i]),
                       "f1": float(f1[i]), "support": int(support[i])} for i, name in enumerate(classes)],
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "weighted": {"precision": float((precision * weights).sum()), "recall": float((recall * weights).sum()),
                     "f1": float((f1 * weights).sum())},
        "confusion_matrix": matrix.tolist(),
        "ece": ece, "reliability": reliability,
    }
