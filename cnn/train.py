"""Training: `train_one_epoch`, a pure `evaluate`, and `fit(config)`, as in torchvision's reference.

    from cnn.train import TrainConfig, fit
    result = fit(TrainConfig(dataset_dir=".cnnpipe/datasets/cifar10"))   # the automatic recipe
    result = fit(TrainConfig(dataset_dir=".cnnpipe/datasets/cifar10", batch_size=128, lr=0.05, epochs=10))
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cnn import monitoring
from cnn import recipe as auto_recipe
from cnn.checkpoint import (CheckpointError, CheckpointWriter, Resumption, checkpoints, load_checkpoint,
                            load_latest, restore_rng_state, rng_state)
from cnn.config import TrainConfig
from cnn.data import (Augment, ColourStats, ResidentImages, StoreSplit, StreamingImages, centre_crop,
                      colour_stats_for, normalise, ten_crops)
from cnn.failpoints import failpoint
from cnn.layout import PublishedDataset, default_checkpoint_root
from cnn.metrics import classification_report, topk_correct
from cnn.model import build_model, decode_size, input_size

STEPS_PER_REPORT = 10
MISTAKES_KEPT = 25


@dataclass
class FitResult:
    run_dir: str
    checkpoint: str
    classes: list[str]
    history: list[dict]
    held_out: dict
    held_out_split: str
    best_val_top1: float
    epochs_run: int
    seed: int
    device: str
    dataset_version: str
    stopped_early: bool = False
    # The held-out split's most confident wrong predictions, each with its uint8 image.
    mistakes: list[dict] = field(default_factory=list)
    # What drift is measured against: `cnn.monitoring.reference_profile` of the held-out split.
    reference: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)



def cpu_has_amx() -> bool:
    # A private probe, present since torch 2.1; without it, assume no AMX.
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether a run computes in bf16. `auto`: on CUDA, and on a CPU with AMX tiles, whose
    bf16 matrix units train alexnet-cifar about 3x faster than fp32 (on this project's
    2-core Xeon, 180 to 430-580 images/s); elsewhere bf16 is emulated, slower than fp32."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_amx())


# A split is decoded once into device memory when it fits this share of what the device has
# free; the rest holds the model, its optimizer state and a batch's activations. Each split is
# checked alone: validation and held-out splits are usually a fraction of the training split.
MEMORY_BUDGET_SHARE = 0.4


def memory_budget(device: torch.device, budget_mb: int | None = None) -> tuple[int, str]:
    """The memory budget in MB and where it comes from: `budget_mb` when set, otherwise a share
    of the GPU's free memory on CUDA, or of the RAM available on the CPU."""
    if budget_mb is not None:
        return budget_mb, "set"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"free on {device}"
    else:
        free = psutil.virtual_memory().available
        where = "of RAM available"
    why = f"auto: {MEMORY_BUDGET_SHARE:.0%} of the {free / 2**30:.1f} GB {where}"
    return int(free * MEMORY_BUDGET_SHARE) // 2**20, why


def memory_budget_line(config: TrainConfig) -> str:
    device = resolve_device(config.device)
    budget_mb, why = memory_budget(device, config.memory_budget_mb)
    return (f"memory budget: {budget_mb} MB a split, decoded once into {device.type} memory within it and "
            f"streamed from Parquet beyond it ({why})")


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context for the forward pass; losses and softmax stay in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


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
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        steps += 1
        # Reading the loss waits for the GPU, so progress is reported every few steps only.
        if on_step is not None and steps % STEPS_PER_REPORT == 0:
            on_step({"images": seen - reported, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
            reported = seen
    totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=device).double()])
    if shard is not None:
        dist.all_reduce(totals)
    loss_total, correct_total, seen = totals.tolist()
    # Only now: `tolist` waits for the device, whose queue may still hold the last steps.
    seconds = time.perf_counter() - started
    if seen == 0:
        raise ValueError("the training split has no batches: too few images for one batch")
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


def _init_distributed(config: TrainConfig) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        gpu = config.device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if gpu else "gloo")
    return dist.get_rank(), dist.get_world_size()


@functools.cache  # once per process, not once per checkpoint
def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _run_dir(config: TrainConfig) -> tuple[Path, bool]:
    """Where this run's checkpoints go, and whether it resumes an earlier run."""
    root = Path(config.checkpoint_root or default_checkpoint_root(config.dataset_dir))
    family = root / f"{config.dataset_name}__{config.model}"
    if isinstance(config.resume, str) and config.resume:
        path = Path(config.resume)
        run_dir = path.parent if path.is_file() else path
        if not checkpoints(run_dir):
            raise CheckpointError(f"nothing to resume: {run_dir} holds no checkpoint")
        return run_dir, True
    if config.resume:
        unfinished = sorted(p for p in family.glob("*") if p.is_dir() and not (p / "done").exists()
                            and checkpoints(p))
        if not unfinished:
            raise CheckpointError(f"nothing to resume: no unfinished run of {config.dataset_name} with "
                                  f"{config.model} under {family}; run without --resume to start one")
        return unfinished[-1], True
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return family / stamp, False


def resume_point(config: TrainConfig) -> Resumption | None:
    """Where a `resume` config really continues: the run folder and its newest checkpoint that
    loads; None when the config starts afresh. Raises CheckpointError when there is nothing to resume."""
    if not config.resume:
        return None
    run_dir, _ = _run_dir(config)
    return Resumption.of(run_dir)


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    # One step more than the run takes: OneCycleLR extrapolates past its last step.
    total = config.epochs * steps_per_epoch + 1
    if config.schedule == "onecycle":
        # The warm-up is a quarter of the run, but at least a step and a half: OneCycleLR
        # divides by the length of each phase, so a short run must not leave one empty.
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total,
                                                   pct_start=max(0.25, 1.5 / total), anneal_strategy="linear"), True
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total), True
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, config.epochs // 3), gamma=0.1), False
    # The paper: divide the learning rate by 10 when validation accuracy stops improving.
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=2), False


def _build(config: dict, num_classes: int) -> nn.Module:
    if not config["model"].startswith("alexnet"):
        return build_model(config["model"], num_classes)
    # The alexnet-cifar recipe uses batch norm; the 224 network keeps the paper's LRN.
    norm = config["norm"] or ("batch" if config["model"] == "alexnet-cifar" else "lrn")
    return build_model(config["model"], num_classes, padding=config["padding"], pool=config["pool"],
                       dropout=config["dropout"], norm=norm)


def restore_latest(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                   generator: torch.Generator) -> dict:
    """Put the run's latest checkpoint back into the model, optimizer, scheduler and every RNG; return it."""
    loaded = load_latest(run_dir)
    if loaded is None:
        raise CheckpointError(f"{run_dir}: nothing to resume from")
    state, _ = loaded
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"], generator)
    return state


def augmentation(stats: ColourStats, crop: int, stored: int) -> Augment:
    """The paper's at 224 (random crops of 256 images, flips, PCA lighting); padded crops and
    flips without lighting for images stored at the model's size, as in the GPU prototype's
    recipe reported to reach 88% CIFAR-10 top-1 in 30 epochs."""
    if stored > crop:
        return Augment(stats, crop)
    return Augment(stats, crop, pad=crop // 8, lighting=0.0)


def _load_split(split: StoreSplit, size: int, device: torch.device, budget_mb: int,
                shard: tuple[int, int] | None = None):
    if split.rows * 3 * size * size <= budget_mb * 2**20:
        return ResidentImages.load(split, size, device)
    return StreamingImages(split, size, device, shard=shard)


def fit(config: TrainConfig, on_step: Callable[[dict], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train as `config` says. Under torchrun (WORLD_SIZE > 1) this runs DDP: NCCL on GPUs, gloo on CPUs."""
    rank, world = _init_distributed(config)
    shard = (rank, world) if world > 1 else None
    leader = rank == 0
    device = resolve_device(config.device)
    if shard and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if device.type == "cuda":
        # Training batches all have one shape (drop_last), so cuDNN's one-off search for the
        # fastest convolution algorithms pays for itself within the first epoch.
        torch.backends.cudnn.benchmark = True
    # Before the model takes its share, as `memory_budget_line` measured it when the run was planned.
    budget_mb, _ = memory_budget(device, config.memory_budget_mb)
    seed_everything(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    train_split = StoreSplit.open(config.dataset_dir, "train")
    config, _ = auto_recipe.apply(config, train_split.rows)
    classes = list(train_split.classes)
    val_split = validation_split(config.dataset_dir, classes)
    test_split = StoreSplit.open(config.dataset_dir, "test", classes)
    held_out_split = test_split if test_split.rows else val_split

    model = _build(asdict(config), len(classes)).to(device, memory_format=torch.channels_last)
    crop = input_size(model)
    # Large models train on random 224 crops of 256 images, as in the paper; small ones on padded crops.
    stored = decode_size(crop)
    # Under DDP a streamed split is dealt out by row group, so that no rank decodes all of it.
    train = _load_split(train_split, stored, device, budget_mb, shard)
    if len(train) == 0:
        raise ValueError(f"{config.dataset_dir}: the train split is empty")
    # The same first images on every rank, so that every rank normalises alike.
    sample = train.images if isinstance(train, ResidentImages) \
        else next(iter(StreamingImages(train_split, stored, device).batches(4096)))[0]
    stats = colour_stats_for(train_split, sample)
    augment = augmentation(stats, crop, stored)
    val = _load_split(val_split, stored, device, budget_mb)

    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)
    steps_per_epoch = max(1, len(train) // config.batch_size)
    scheduler, per_batch = _scheduler(config, optimizer, steps_per_epoch)
    trainable = model
    if shard:
        if config.batch_size % world:
            raise ValueError(f"batch size {config.batch_size} must divide evenly over {world} processes")
        if device.type == "cuda":  # batch statistics over the global batch; SyncBatchNorm needs a GPU
            trainable = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trainable = DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        trainable = torch.compile(trainable)

    run_dir, resuming = _run_dir(config)
    if shard:  # every rank follows the leader's choice of run folder
        shared = [str(run_dir), resuming]
        dist.broadcast_object_list(shared, src=0)
        run_dir, resuming = Path(shared[0]), shared[1]
    history: list[dict] = []
    best, since_best, start_epoch = -1.0, 0, 0
    if resuming:
        state = restore_latest(run_dir, model, optimizer, scheduler, generator)
        history, best, since_best, start_epoch = state["history"], state["best"], state["since_best"], state["epoch"]
    elif leader:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))

    stopped_early = False
    latest = None
    with CheckpointWriter() as writer:
        for epoch in range(start_epoch, config.epochs):
            try:
                metrics = train_one_epoch(trainable, train.batches(config.batch_size, generator, drop_last=True),
                                          augment, optimizer, scheduler, generator, config.label_smoothing, per_batch,
                                          on_step if leader else None, shard, config.precision,
                                          local_batches=isinstance(train, StreamingImages) and shard is not None)
            except torch.OutOfMemoryError:
                raise RuntimeError(f"out of device memory in epoch {epoch + 1} at batch size {config.batch_size}: "
                                   f"try --batch-size {max(1, config.batch_size // 2)}; the checkpoints of finished "
                                   "epochs are intact") from None
            validation = evaluate(model, val.batches(config.batch_size * 2), stats, crop, precision=config.precision)
            if not per_batch:
                scheduler.step(validation["top1"]) if config.schedule == "plateau" else scheduler.step()
            record = {"epoch": epoch + 1, **metrics, "val_loss": validation["loss"], "val_top1": validation["top1"],
                      "val_top5": validation["top5"]}
            history.append(record)
            if validation["top1"] > best:
                best, since_best = validation["top1"], 0
            else:
                since_best += 1
            if leader:
                latest = writer.save({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "rng": rng_state(generator),
                    "config": asdict(config), "classes": classes, "colour_stats": asdict(stats),
                    "dataset_version": train_split.version_id, "git_sha": _git_sha(),
                    "history": history, "best": best, "since_best": since_best,
                }, run_dir, epoch + 1, config.keep_checkpoints)
            failpoint("train.after_checkpoint")
            if on_epoch is not None and leader:
                on_epoch(record)
            if config.patience is not None and since_best > config.patience:
                stopped_early = True
                break
        # The held-out evaluation overlaps the last checkpoint's write; `done` waits for it.
        held_out_images = _load_split(held_out_split, stored, device, budget_mb)
        held_out = evaluate(model, held_out_images.batches(config.batch_size * 2), stats, crop, keep_predictions=True,
                            mistakes=MISTAKES_KEPT, precision=config.precision)
        probabilities, targets = held_out.pop("probabilities"), held_out.pop("targets")
        report = classification_report(probabilities, targets, classes)
        mistakes = held_out.pop("mistakes")
        if config.ten_crop:
            ten = evaluate(model, held_out_images.batches(config.batch_size * 2), stats, crop, ten_crop=True,
                           precision=config.precision)
            held_out.update({"ten_crop_top1": ten["top1"], "ten_crop_top5": ten["top5"]})
        reference = _reference_profile(model, val, held_out_split, held_out_images, probabilities, targets, stats,
                                       crop, config.batch_size * 2, config.precision)
    if latest is None and leader:
        loaded = load_latest(run_dir)
        latest = loaded[1] if loaded else None
    if leader:
        (run_dir / "done").write_text(json.dumps(held_out))
    if shard:
        dist.barrier()
        dist.destroy_process_group()
    return FitResult(str(run_dir), str(latest), classes, history, held_out, held_out_split.split, best,
                     len(history), config.seed, str(device), train_split.version_id, stopped_early, mistakes,
                     reference, extra={"report": report})


def _reference_profile(model: nn.Module, val, held_out_split: StoreSplit, held_out_images, probabilities: torch.Tensor,
                       targets: torch.Tensor, stats: ColourStats, crop: int, batch_size: int, precision: str) -> dict:
    """The model's held-out predictions as drift is measured against them, calibrated on validation."""
    validation = evaluate(model, val.batches(batch_size), stats, crop, keep_predictions=True, precision=precision)
    temperature = monitoring.fit_temperature(validation.get("probabilities", probabilities),
                                             validation.get("targets", targets))
    brightness = [monitoring.brightness(images).cpu() for images, _ in held_out_images.batches(batch_size)]
    widths, heights = held_out_split.image_sizes()
    return monitoring.reference_profile(probabilities, targets, held_out_split.classes, temperature, widths, heights,
                                        torch.cat(brightness) if brightness else torch.empty(0))


@dataclass
class TrainingPlan:
    """What a run will do, known before it starts: the config with every knob chosen, the
    recipe that says which were automatic, the run it resumes, and why it may not learn."""

    config: TrainConfig
    recipe: auto_recipe.Recipe
    resuming: Resumption | None
    warnings: list[str]

    def lines(self) -> list[str]:
        lines = [self.recipe.line(), precision_line(self.config), memory_budget_line(self.config)]
        if resuming := self.resuming:
            lines.append(f"resuming {resuming.run_dir} after epoch {resuming.epoch} of {self.config.epochs}")
        return lines


def precision_line(config: TrainConfig) -> str:
    """What the run computes in, and why: `uses_bf16` depends on the machine, so it is said."""
    device = resolve_device(config.device)
    bf16 = uses_bf16(device, config.precision)
    if config.precision != "auto":
        why = "set"
    elif device.type == "cpu":
        why = f"auto: this CPU {'has' if bf16 else 'has no'} AMX"
    else:
        why = f"auto on {device.type}"
    return f"precision: {'bf16 autocast' if bf16 else 'fp32'} on {device.type} ({why})"


def plan(config: TrainConfig) -> TrainingPlan:
    """Choose the unset knobs for the dataset's train split and check the run can start.
    Raises ValueError (naming the flag) or CheckpointError (nothing to resume) in one line.
    A resumed run takes the knobs left unset from the run, and refuses one set otherwise."""
    require_two_train_classes(config.dataset_dir)
    train_split = StoreSplit.open(config.dataset_dir, "train")
    resuming = resume_point(config)
    if resuming:
        config = resuming.continued(config, train_split.version_id)
    config, recipe = auto_recipe.apply(config, train_split.rows)
    warnings = [text for text in (auto_recipe.few_steps_warning(recipe), validation_warning(config.dataset_dir))
                if text]
    return TrainingPlan(config, recipe, resuming, warnings + (resuming.warnings() if resuming else []))


def require_two_train_classes(dataset_dir: str | os.PathLike) -> None:
    """Refuse a train split of one class: the model would learn to answer that class always, score
    100% on a validation split of the same class, and be crowned champion."""
    counts = PublishedDataset.open(dataset_dir).counts("train")
    classes = sorted(label for label, images in counts.items() if images)
    if len(classes) < 2:
        found = f"only class {classes[0]!r}" if classes else "no images"
        raise ValueError(f"the train split of {Path(dataset_dir).name} has {found}: a classifier needs images of "
                         "at least two classes; ingest another class's images into it first")


def validation_split(dataset_dir: str | os.PathLike, classes: list[str]) -> StoreSplit:
    """The split a run validates on: `val`, or `test` for a dataset without one."""
    val = StoreSplit.open(dataset_dir, "val", classes)
    return val if val.rows else StoreSplit.open(dataset_dir, "test", classes)


def validation_warning(dataset_dir: str | os.PathLike) -> str | None:
    """What it costs when a dataset has no validation split: model selection sees the test images."""
    split = validation_split(dataset_dir, [])
    if split.split == "val":
        return None
    return (f"{Path(dataset_dir).name} has no validation split, so training validates on its {split.split} split: "
            "early stopping, plateau schedules and the champion gate choose on the very images the held-out "
            "figure is reported on, which flatters it; ingest the source again into a new dataset to carve "
            "a validation split out of train (--val-fraction)")


def inference_state(checkpoint: dict) -> dict:
    """What inference needs from a training checkpoint: weights, classes, preprocessing, config."""
    keep = ("model", "config", "classes", "colour_stats", "dataset_version", "git_sha", "epoch")
    return {key: checkpoint[key] for key in keep}


def evaluate_checkpoint(checkpoint: str | os.PathLike, dataset_dir: str | os.PathLike,
                        device: str | torch.device = "cpu", batch_size: int = 512) -> dict:
    """A trained model's validation figures on a dataset's current version, as `fit` computes them."""
    device = torch.device(device)
    model, state = _model_for(checkpoint, dataset_dir, device)
    crop = input_size(model)
    images = _load_split(validation_split(dataset_dir, state["classes"]), decode_size(crop), device,
                         memory_budget(device)[0])
    return evaluate(model, images.batches(batch_size), ColourStats(**state["colour_stats"]), crop,
                    precision=state["config"].get("precision", "auto"))


def profile_checkpoint(checkpoint: str | os.PathLike, dataset_dir: str | os.PathLike,
                       device: str | torch.device = "cpu", batch_size: int = 512) -> dict:
    """A trained model's reference profile on a dataset's current version, as `fit` computes it:
    for versions trained before `fit` kept one."""
    device = torch.device(device)
    model, state = _model_for(checkpoint, dataset_dir, device)
    classes, stats, crop = state["classes"], ColourStats(**state["colour_stats"]), input_size(model)
    precision = state["config"].get("precision", "auto")
    budget = memory_budget(device)[0]
    test_split = StoreSplit.open(dataset_dir, "test", classes)
    val_split = validation_split(dataset_dir, classes)
    held_out_split = test_split if test_split.rows else val_split
    held_out_images = _load_split(held_out_split, decode_size(crop), device, budget)
    held_out = evaluate(model, held_out_images.batches(batch_size), stats, crop, keep_predictions=True,
                        precision=precision)
    return _reference_profile(model, _load_split(val_split, decode_size(crop), device, budget), held_out_split,
                              held_out_images, held_out["probabilities"], held_out["targets"], stats, crop, batch_size,
                              precision)


def _model_for(checkpoint: str | os.PathLike, dataset_dir: str | os.PathLike,
               device: torch.device) -> tuple[nn.Module, dict]:
    model, state = load_trained_model(checkpoint, device)
    manifest_classes = PublishedDataset.open(dataset_dir).classes
    if sorted(manifest_classes) != sorted(state["classes"]):
        raise ValueError(f"the model knows classes {state['classes']}, the dataset has {manifest_classes}")
    return model.to(memory_format=torch.channels_last), state


def load_trained_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A model and its metadata (classes, colour stats, config) from a checkpoint, safely."""
    state = load_checkpoint(Path(checkpoint))
    model = _build(state["config"], len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def main(argv: list[str] | None = None) -> None:
    """`python -m cnn.train CONFIG.json [RESULT.json]`: the entry point torchrun launches per process."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    config = TrainConfig(**json.loads(Path(args[0]).read_text()))
    result = fit(config, on_epoch=lambda record: print(json.dumps(record), flush=True))
    if len(args) > 1 and int(os.environ.get("RANK", "0")) == 0:
        # Images go beside the JSON, as tensors that load with weights_only=True.
        torch.save(result.mistakes, Path(args[1]).with_suffix(".mistakes.pt"))
        Path(args[1]).write_text(json.dumps(asdict(replace(result, mistakes=[])), indent=2))


if __name__ == "__main__":
    main()
