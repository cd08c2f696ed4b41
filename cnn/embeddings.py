"""What a model sees in an image: the activations its classifier reads (the input of its last
Linear layer), projected to EMBEDDING_DIM dimensions by a PCA fitted on the train split when
training ends.

The projection is saved with the model (`embedding.pt` beside a run's checkpoints, and inside a
registered version's `weights.pt`), so every embedding of one model version lies in the same
space and cosine distances between them compare; embeddings of two versions never do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnn.augment import ColourStats, centre_crop, normalise
from cnn.config import EMBEDDING_DIM
from cnn.device import autocast
from cnn.model import head_name

# Enough images to estimate 64 principal directions of a 1024- or 4096-wide layer.
PROJECTION_IMAGES = 10_000
PROJECTION_FILE = "embedding.pt"


@dataclass(frozen=True)
class Projection:
    mean: torch.Tensor  # (features,)
    components: torch.Tensor  # (features, EMBEDDING_DIM)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.mean.to(features.device)) @ self.components.to(features.device)

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "components": self.components}

    @classmethod
    def from_state(cls, state: dict | None) -> Projection | None:
        return cls(state["mean"].float(), state["components"].float()) if state else None


def fit_projection(features: torch.Tensor, dim: int = EMBEDDING_DIM) -> Projection:
    """The PCA of `features` (images x features) onto its `dim` leading directions; a split with
    fewer images or features than `dim` leaves the remaining dimensions at zero."""
    features = features.float()
    mean = features.mean(0)
    rank = min(dim, *features.shape)
    _, _, directions = torch.pca_lowrank(features - mean, q=rank, center=False, niter=4)
    components = torch.zeros(features.shape[1], dim)
    components[:, :rank] = directions[:, :rank].cpu()
    return Projection(mean.cpu(), components)


def save_projection(projection: Projection, run_dir: Path) -> Path:
    """Written aside and renamed: a run killed meanwhile leaves none rather than half of one."""
    path = run_dir / PROJECTION_FILE
    partial = path.with_name(f".{PROJECTION_FILE}.tmp")
    torch.save(projection.state(), partial)
    os.replace(partial, path)
    return path


@contextmanager
def classifier_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The inputs of the model's last Linear layer, one tensor a forward pass, while in the block."""
    captured: list[torch.Tensor] = []
    head = dict(model.named_modules())[head_name(model)]
    handle = head.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0].detach()))
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def features(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], stats: ColourStats, crop: int,
             precision: str = "auto", limit: int = PROJECTION_IMAGES) -> torch.Tensor:
    """Classifier inputs of up to `limit` images of `batches`, as evaluation preprocesses them."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kept, seen = [], 0
    try:
        with classifier_inputs(model) as captured:
            for images, _ in batches:
                with autocast(device, precision):
                    model(normalise(centre_crop(images, crop), stats))
                kept.append(captured.pop().float().cpu())
                seen += len(images)
                if seen >= limit:
                    break
    finally:
        model.train(was_training)
    return torch.cat(kept)[:limit] if kept else torch.empty(0)


# Points in the picture of a run's validation embeddings: enough to see the classes' clusters.
MAP_IMAGES = 2_000


@torch.no_grad()
def embedding_map(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], stats: ColourStats,
                  crop: int, projection: Projection, precision: str = "auto", limit: int = MAP_IMAGES) -> dict:
    """Up to `limit` images of `batches` on the projection's two leading directions (the train
    split's first two principal components), with their true and predicted classes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    points, targets, predicted, seen = [], [], [], 0
    try:
        with classifier_inputs(model) as captured:
            for images, labels in batches:
                with autocast(device, precision):
                    logits = model(normalise(centre_crop(images, crop), stats))
                points.append(projection(captured.pop().float())[:, :2].cpu())
                targets.append(labels.cpu())
                predicted.append(logits.argmax(1).cpu())
                seen += len(images)
                if seen >= limit:
                    break
    finally:
        model.train(was_training)
    if not points:
        return {"x": [], "y": [], "target": [], "predicted": []}
    xy = torch.cat(points)[:limit]
    return {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(), "target": torch.cat(targets)[:limit].tolist(),
            "predicted": torch.cat(predicted)[:limit].tolist()}
