"""Classification metrics from logits, as the paper reports them (top-1 and top-5 error)."""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    """How many targets are among the k highest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum())
