"""Thin Prefect task over `cnn.train.fit`."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from cnn.train import FitResult, TrainConfig, fit
from cnnpipe.progress import TrainingProgress


@task(name="train-model")
def train_model(config: TrainConfig) -> FitResult:
    manifest = json.loads((Path(config.dataset_dir) / "manifest.json").read_text())
    logger = get_run_logger()
    progress = TrainingProgress(config.epochs, sum(manifest["counts"].get("train", {}).values()), logger)
    try:
        result = fit(config, on_step=progress.on_step, on_epoch=progress.on_epoch)
    finally:
        progress.close()
    held = result.held_out
    logger.info("held-out %s split: top-1 %.1f%%, top-5 %.1f%% on %d images; checkpoint %s", result.held_out_split,
                100 * held["top1"], 100 * held["top5"], held["images"], result.checkpoint)
    return result
