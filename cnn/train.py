"""Training: `fit(config)`, as in torchvision's reference, and `plan(config)`, what a run will do.

    from cnn.config import TrainConfig
    from cnn.train import fit
    result = fit(TrainConfig(dataset_dir=".cnnpipe/datasets/cifar10"))   # the automatic recipe
    result = fit(TrainConfig(dataset_dir=".cnnpipe/datasets/cifar10", batch_size=128, lr=0.05, epochs=10))

The epoch loops live in `cnn.loop`, the device and precision in `cnn.device`, run folders,
resume and checkpoint evaluation in `cnn.runs`, the images in `cnn.loaders` and `cnn.augment`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cnn import recipe as auto_recipe
from cnn.augment import Augment, ColourStats, colour_stats_for
from cnn.checkpoint import CheckpointWriter, Resumption, load_latest, rng_state
from cnn.config import TrainConfig
from cnn.device import memory_budget, memory_budget_line, precision_line, resolve_device, reuse_freed_memory
from cnn.embeddings import embedding_map, features, fit_projection, save_projection
from cnn.failpoints import failpoint
from cnn.loaders import ResidentImages, StreamingImages, _load_split
from cnn.loop import TrainingDiverged, evaluate, train_one_epoch
from cnn.metrics import classification_report
from cnn.model import NATIVE_SIZES, decode_size, has_linear_head, input_size
from cnn.runs import _build, _embedding_reference, _reference_profile, _run_dir, restore_latest, resume_point
from cnn.splits import StoreSplit, require_trainable_split, validation_split, validation_warning
from cnn.timing import seconds_per_image
from cnn.warm_start import ClassMatch, StartingWeights, check, starting_weights, transfer

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def augmentation(stats: ColourStats, crop: int, stored: int) -> Augment:
    """The paper's at 224 (random crops of 256 images, flips, PCA lighting); padded crops and
    flips without lighting for images stored at the model's size, as in the GPU prototype's
    recipe reported to reach 88% CIFAR-10 top-1 in 30 epochs."""
    if stored > crop:
        return Augment(stats, crop)
    return Augment(stats, crop, pad=crop // 8, lighting=0.0)


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
    reuse_freed_memory(device)
    # Before the model takes its share, as `memory_budget_line` measured it when the run was planned.
    budget_mb, _ = memory_budget(device, config.memory_budget_mb)
    seed_everything(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    train_split = StoreSplit.open(config.dataset_dir, "train")
    # A resumed run continues from its own checkpoint, wherever it started.
    start = None if config.resume else starting_weights(config.init, config.model)
    config, _ = _chosen(config, train_split, start)
    classes = list(train_split.classes)
    val_split = validation_split(config.dataset_dir, classes)
    test_split = StoreSplit.open(config.dataset_dir, "test", classes)
    held_out_split = test_split if test_split.rows else val_split

    model = _build(asdict(config), len(classes))
    init_match = transfer(model, start, classes, config.model) if start else None
    model = model.to(device, memory_format=torch.channels_last)
    crop = input_size(model)
    # Large models train on random 224 crops of 256 images, as in the paper; small ones on padded crops.
    stored = decode_size(crop)
    # Under DDP a streamed split is dealt out by row group, so that no rank decodes all of it.
    train = _load_split(train_split, stored, device, budget_mb, shard, fit=config.resize)
    if len(train) == 0:
        raise ValueError(f"{config.dataset_dir}: the train split is empty")
    # The same first images on every rank, so that every rank normalises alike.
    sample = train.images if isinstance(train, ResidentImages) \
        else next(iter(StreamingImages(train_split, stored, device, fit=config.resize).batches(4096)))[0]
    stats = colour_stats_for(train_split, sample)
    augment = augmentation(stats, crop, stored)
    val = _load_split(val_split, stored, device, budget_mb, fit=config.resize)

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
                validation = evaluate(model, val.batches(config.batch_size * 2), stats, crop,
                                      precision=config.precision)
                # No training loss sees the epoch's last updates; the validation loss does. Raised before
                # the checkpoint, so that the last one kept, and resumed from, is of a model that still works.
                if math.isnan(validation["loss"]) and not math.isnan(validation["top1"]):
                    raise TrainingDiverged("the validation loss became nan")
            except torch.OutOfMemoryError:
                raise RuntimeError(f"out of device memory in epoch {epoch + 1} at batch size {config.batch_size}: "
                                   f"try --batch-size {max(1, config.batch_size // 2)}; the checkpoints of finished "
                                   "epochs are intact") from None
            except TrainingDiverged as diverged:
                diverged.epoch, diverged.run_dir = epoch + 1, run_dir
                raise
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
        held_out_images = _load_split(held_out_split, stored, device, budget_mb, fit=config.resize)
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
        embeddings = {}
        if leader and has_linear_head(model):  # a model whose classifier is a convolution (SqueezeNet) has none
            projection = fit_projection(features(model, train.batches(config.batch_size * 2), stats, crop,
                                                 config.precision))
            save_projection(projection, run_dir)
            # Known only once the projection is: the profile's embeddings, of the same held-out images.
            if (embedded := _embedding_reference(model, held_out_images, projection, stats, crop,
                                                 config.batch_size * 2, config.precision)) is not None:
                reference["embedding"] = embedded
            embeddings = embedding_map(model, val.batches(config.batch_size * 2), stats, crop, projection,
                                       config.precision)
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
                     reference, extra={"report": report, "init": init_match.text() if init_match else None,
                                       "embedding_map": embeddings})


@dataclass
class TrainingPlan:
    """What a run will do, known before it starts: the config with every knob chosen, the
    recipe that says which were automatic, the run it resumes, and why it may not learn."""

    config: TrainConfig
    recipe: auto_recipe.Recipe
    resuming: Resumption | None
    warnings: list[str]
    # How the classes of the weights the run starts from map onto the dataset's; None from scratch.
    init: ClassMatch | None = None

    def lines(self) -> list[str]:
        lines = [self.recipe.line(), precision_line(self.config), memory_budget_line(self.config)]
        if resuming := self.resuming:
            lines.append(f"resuming {resuming.run_dir} after epoch {resuming.epoch} of {self.config.epochs}")
        return lines


def plan(config: TrainConfig) -> TrainingPlan:
    """Choose the unset knobs for the dataset's train split and check the run can start.
    Raises ValueError (naming the flag) or CheckpointError (nothing to resume) in one line.
    A resumed run takes the knobs left unset from the run, and refuses one set otherwise."""
    require_trainable_split(config.dataset_dir)
    train_split = StoreSplit.open(config.dataset_dir, "train")
    resuming = resume_point(config)
    if resuming:
        config = resuming.continued(config, train_split.version_id)
    start = None if resuming else starting_weights(config.init, config.model)
    config, recipe = _chosen(config, train_split, start)
    match = check(_build(asdict(config), len(train_split.classes)), start, list(train_split.classes),
                  config.model) if start else None
    warnings = [text for text in (auto_recipe.few_steps_warning(recipe), validation_warning(config.dataset_dir))
                if text]
    if resuming:
        warnings += resuming.warnings()
        if config.init != "scratch":
            warnings.append(f"--init {config.init} is ignored: the resumed run continues from its own checkpoint")
    return TrainingPlan(config, recipe, resuming, warnings, match)


def _chosen(config: TrainConfig, train_split: StoreSplit,
            start: StartingWeights | None = None) -> tuple[TrainConfig, auto_recipe.Recipe]:
    """`config` with every knob left unset chosen by the recipe: for the size of the train split,
    and the input size for its images and for how fast this device trains at each size; or, for
    a run that starts from trained weights, as those weights were trained."""
    if start and config.norm is None and start.config.get("norm"):
        config = replace(config, norm=start.config["norm"])
    model_knobs = tuple({"model": config.model, "norm": config.norm, "padding": config.padding,
                         "pool": config.pool, "dropout": 0.0}.items())
    device = str(resolve_device(config.device))

    def timed(size: int) -> float:
        return seconds_per_image(model_knobs, max(2, len(train_split.classes)), size, device, config.precision)

    sizes = train_split.image_sizes() if config.image_size is None or config.resize is None else None
    known = len(set(train_split.classes) & set(start.classes)) / max(1, len(train_split.classes)) if start else 1.0
    return auto_recipe.apply(config, train_split.rows, sizes, timed, NATIVE_SIZES.get(config.model, 224),
                             start.config if start else None, known)


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
