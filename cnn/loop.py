"""The epoch loops, as in torchvision's reference: `train_one_epoch` and a pure `evaluate`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cnn.augment import ColourStats, centre_crop, normalise, ten_crops
from cnn.device import autocast
from cnn.metrics import topk_correct

STEPS_PER_REPORT = 10


class TrainingDiverged(ValueError):
    """A loss, or the weights, became nan or infinite: every later step would be too. `step`,
    when known, counts from 1 within the epoch; `fit` adds the epoch and the run's folder."""

    def __init__(self, what: str, step: int | None = None):
        super().__init__(what if step is None else f"{what} at step {step} of the epoch")
        self.what, self.step = what, step
        self.epoch: int | None = None
        self.run_dir: Path | None = None


def _non_finite(value: float) -> str:
    return "nan" if math.isnan(value) else "infinite"


def train_one_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], augment: Callable,
                    optimizer: torch.optim.Optimizer, scheduler, generator: torch.Generator,
                    label_smoothing: float = 0.0, per_batch_scheduler: bool = False,
                    on_step: Callable[[dict], None] | None = None, shard: tuple[int, int] | None = None,
                    precision: str = "auto", local_batches: bool = False) -> dict:
    """One pass over `batches`. With `shard=(rank, world)` (DDP), every rank draws the same
    global batch and augmentation and trains on its slice, so the run matches one process;
    with `local_batches` too, `batches` already yields only this rank's slice (streaming)."""
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    # Steps before the first non-finite loss, counted on the device: a nan or inf loss leaves
    # `loss_sum` non-finite for good, so it is read only where the loop reads the device anyway.
    finite_steps = torch.zeros((), device=device, dtype=torch.long)
    seen = steps = reported = 0
    started = time.perf_counter()
    for images, labels in batches:
        if local_batches:
            inputs = augment(images, generator, shard)
        else:
            inputs = augment(images, generator)
        if shard is not None and not local_batches:
            rank, world = shard
            inputs, labels = inputs.chunk(world)[rank], labels.chunk(world)[rank]
        with autocast(device, precision):
            logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if per_batch_scheduler:
            scheduler.step()
        loss_sum += loss.detach() * len(labels)
        finite_steps += torch.isfinite(loss_sum)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        steps += 1
        # Reading the loss waits for the GPU, so progress is reported every few steps only.
        if on_step is not None and steps % STEPS_PER_REPORT == 0:
            latest, total, healthy = torch.stack([loss.detach().double(), loss_sum.double(),
                                                  finite_steps.double()]).tolist()
            # Under DDP every rank must stop together: the ranks check at the epoch's end.
            if shard is None and not math.isfinite(total):
                raise TrainingDiverged(f"the loss became {_non_finite(total)}", int(healthy) + 1)
            on_step({"images": seen - reported, "loss": latest, "lr": optimizer.param_groups[0]["lr"]})
            reported = seen
    # The last step's update is seen by no loss of this epoch; the checkpoint must not keep it if broken.
    weights_finite = torch.stack([torch.isfinite(tensor).all() for tensor in (*model.parameters(), *model.buffers())
                                  if tensor.is_floating_point()]).all()
    totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=device).double()])
    if shard is not None:
        dist.all_reduce(totals)
    loss_total, correct_total, seen = totals.tolist()
    # Only now: `tolist` waits for the device, whose queue may still hold the last steps.
    seconds = time.perf_counter() - started
    if seen == 0:
        raise ValueError("the training split has no batches: too few images for one batch")
    if not math.isfinite(loss_total):
        raise TrainingDiverged(f"the loss became {_non_finite(loss_total)}", min(int(finite_steps) + 1, steps))
    if not weights_finite:  # the same on every rank: DDP keeps their weights equal
        raise TrainingDiverged("the weights became nan or infinite", steps)
    return {"train_loss": loss_total / seen, "train_accuracy": correct_total / seen,
            "lr": optimizer.param_groups[0]["lr"], "images_per_second": seen / seconds}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], stats: ColourStats,
             crop: int, ten_crop: bool = False, keep_predictions: bool = False, mistakes: int = 0,
             precision: str = "auto") -> dict:
    """Loss, top-1 and top-5 accuracy on `batches`, without touching the model's training state.

    With `keep_predictions`, the probabilities and targets come back too (on the CPU), for
    `cnn.metrics.classification_report`. With `mistakes=k`, so do the k wrong predictions
    made with the highest confidence, each with its (centre-cropped, uint8) image.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, top1, top5, seen = 0.0, 0, 0, 0
    kept_probabilities, kept_targets = [], []
    worst = MistakeCollector(mistakes)
    try:
        for images, labels in batches:
            views = ten_crops(images, crop) if ten_crop else [centre_crop(images, crop)]
            with autocast(device, precision):
                probabilities = sum(model(normalise(view, stats)).float().softmax(1) for view in views) / len(views)
            loss_sum += float(nn.functional.nll_loss(probabilities.clamp_min(1e-12).log(), labels, reduction="sum"))
            top1 += topk_correct(probabilities, labels, 1)
            top5 += topk_correct(probabilities, labels, 5)
            seen += len(labels)
            if keep_predictions:
                kept_probabilities.append(probabilities.cpu())
                kept_targets.append(labels.cpu())
            if mistakes:
                worst.add(centre_crop(images, crop), probabilities, labels)
    finally:
        model.train(was_training)
    if seen == 0:
        return {"loss": math.nan, "top1": math.nan, "top5": math.nan, "images": 0}
    result = {"loss": loss_sum / seen, "top1": top1 / seen, "top5": top5 / seen, "images": seen}
    if keep_predictions:
        result.update(probabilities=torch.cat(kept_probabilities), targets=torch.cat(kept_targets))
    if mistakes:
        result["mistakes"] = worst.ranked()
    return result


class MistakeCollector:
    """The k most confident wrong predictions seen so far, kept with their images."""

    def __init__(self, k: int):
        self.k = k
        self.kept: list[dict] = []

    def add(self, images: torch.Tensor, probabilities: torch.Tensor, targets: torch.Tensor) -> None:
        confidence, predicted = probabilities.max(dim=1)
        wrong = (predicted != targets).nonzero().flatten()
        if len(wrong) == 0:
            return
        # Only the batch's own top k can enter the overall top k.
        wrong = wrong[confidence[wrong].argsort(descending=True)[:self.k]].cpu()
        for i in wrong.tolist():
            self.kept.append({"image": images[i].cpu(), "target": int(targets[i]), "predicted": int(predicted[i]),
                              "confidence": float(confidence[i])})
        self.kept = self.ranked()

    def ranked(self) -> list[dict]:
        return sorted(self.kept, key=lambda m: m["confidence"], reverse=True)[:self.k]
