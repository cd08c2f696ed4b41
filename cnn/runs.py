"""Run folders and what is read back from them: where a run's checkpoints go, where a resumed
run continues, and a trained model loaded and evaluated as `fit` evaluates it."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from cnn import monitoring
from cnn.augment import ColourStats
from cnn.checkpoint import CheckpointError, Resumption, checkpoints, load_checkpoint, load_latest, restore_rng_state
from cnn.config import TrainConfig
from cnn.device import memory_budget
from cnn.embeddings import PROJECTION_FILE, Projection, features, fit_projection
from cnn.layout import PublishedDataset, default_checkpoint_root
from cnn.loaders import _load_split
from cnn.loop import evaluate
from cnn.model import NATIVE_SIZES, build_model, decode_size, input_size
from cnn.splits import StoreSplit, validation_split


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


def _build(config: dict, num_classes: int) -> nn.Module:
    """The model a run's config describes; a config saved before `image_size` existed means the
    model's native size."""
    name, image_size = config["model"], config.get("image_size")
    if not name.startswith("alexnet"):
        model = build_model(name, num_classes)
        model.input_size = image_size or input_size(model)
        return model
    norm = config["norm"] or default_norm(name)
    return build_model(name, num_classes, padding=config["padding"], pool=config["pool"],
                       dropout=config["dropout"], norm=norm, image_size=image_size or NATIVE_SIZES[name])


def default_norm(model: str) -> str:
    """An AlexNet's normalisation when --norm is left unset: the alexnet-cifar recipe uses batch
    norm; the 224 network keeps the paper's LRN."""
    return "batch" if model == "alexnet-cifar" else "lrn"


def resize_mode(config: dict) -> str:
    """How a run's images are brought to the model's size: a config saved before `resize` existed cropped."""
    return config.get("resize") or "crop"


def load_trained_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A model and its metadata (classes, colour stats, config) from a checkpoint, safely."""
    state = load_checkpoint(Path(checkpoint))
    model = _build(state["config"], len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def inference_state(state: dict, checkpoint: str | os.PathLike) -> dict:
    """What inference needs from a training checkpoint (`state`, loaded from `checkpoint`): weights,
    classes, preprocessing, config, and the embedding projection its run saved (`cnn.embeddings`)."""
    keep = ("model", "config", "classes", "colour_stats", "dataset_version", "git_sha", "epoch")
    kept = {key: state[key] for key in keep}
    if (embedding := projection_state(checkpoint)) is not None:
        kept["embedding"] = embedding
    return kept


def projection_state(checkpoint: str | os.PathLike) -> dict | None:
    """The embedding projection saved beside a checkpoint by its run; None for runs from before it."""
    path = Path(checkpoint).parent / PROJECTION_FILE
    return load_checkpoint(path) if path.exists() else None


def evaluate_checkpoint(checkpoint: str | os.PathLike, dataset_dir: str | os.PathLike,
                        device: str | torch.device = "cpu", batch_size: int = 512) -> dict:
    """A trained model's validation figures on a dataset's current version, as `fit` computes them."""
    device = torch.device(device)
    model, state = _model_for(checkpoint, dataset_dir, device)
    crop = input_size(model)
    images = _load_split(validation_split(dataset_dir, state["classes"]), decode_size(crop), device,
                         memory_budget(device)[0], fit=resize_mode(state["config"]))
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
    fit = resize_mode(state["config"])
    held_out_images = _load_split(held_out_split, decode_size(crop), device, budget, fit=fit)
    held_out = evaluate(model, held_out_images.batches(batch_size), stats, crop, keep_predictions=True,
                        precision=precision)
    profile = _reference_profile(model, _load_split(val_split, decode_size(crop), device, budget, fit=fit),
                                 held_out_split, held_out_images, held_out["probabilities"], held_out["targets"], stats,
                                 crop, batch_size, precision)
    # Weights registered before embeddings carry no projection: no embedding reference, so their
    # embedding drift stays unmeasured (NULL) rather than failing.
    projection = Projection.from_state(state.get("embedding") or projection_state(checkpoint))
    if projection is not None and (embedded := _embedding_reference(model, held_out_images, projection, stats, crop,
                                                                    batch_size, precision)) is not None:
        profile["embedding"] = embedded
    return profile


def projection_for(checkpoint: str | os.PathLike, dataset_dir: str | os.PathLike,
                   device: str | torch.device = "cpu", batch_size: int = 512) -> dict:
    """The embedding projection `fit` now saves, for a model trained before it: fitted on the train
    split of `dataset_dir`, as `fit` fits it."""
    device = torch.device(device)
    model, state = _model_for(checkpoint, dataset_dir, device)
    crop = input_size(model)
    train = _load_split(StoreSplit.open(dataset_dir, "train", state["classes"]), decode_size(crop), device,
                        memory_budget(device)[0], fit=resize_mode(state["config"]))
    return fit_projection(features(model, train.batches(batch_size), ColourStats(**state["colour_stats"]), crop,
                                   state["config"].get("precision", "auto"))).state()


def _model_for(checkpoint: str | os.PathLike, dataset_dir: str | os.PathLike,
               device: torch.device) -> tuple[nn.Module, dict]:
    model, state = load_trained_model(checkpoint, device)
    manifest_classes = PublishedDataset.open(dataset_dir).classes
    if sorted(manifest_classes) != sorted(state["classes"]):
        raise ValueError(f"the model knows classes {state['classes']}, the dataset has {manifest_classes}")
    return model.to(memory_format=torch.channels_last), state


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


def _embedding_reference(model: nn.Module, held_out_images, projection: Projection, stats: ColourStats, crop: int,
                         batch_size: int, precision: str) -> dict | None:
    """The mean and spread of the held-out images' embeddings, what embedding drift is measured
    against (`cnn.monitoring.embedding_reference`); None without held-out images."""
    found = features(model, held_out_images.batches(batch_size), stats, crop, precision)
    return monitoring.embedding_reference(projection(found)) if len(found) else None
