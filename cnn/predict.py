"""Batched inference with a trained checkpoint: uint8 images in, class probabilities out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from cnn.data import ColourStats, centre_crop, normalise
from cnn.model import decode_size, input_size
from cnn.train import autocast, load_trained_model


class Predictor:
    """A model, its classes and its preprocessing, loaded safely from a checkpoint."""

    def __init__(self, checkpoint: str | Path, device: str | torch.device = "cpu", batch_size: int = 256,
                 name: str | None = None, version: str | None = None, run_id: str | None = None,
                 precision: str | None = None):
        """`name` and `version` default to `<dataset>__<model>` and the checkpoint's content hash;
        a registered model passes its registry name, version and MLflow run id. `precision`
        defaults to the one the model trained with (`auto`: bf16 where the device has the units)."""
        self.device = torch.device(device)
        self.model, state = load_trained_model(checkpoint, self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.classes: list[str] = list(state["classes"])
        self.stats = ColourStats(**state["colour_stats"])
        self.crop = input_size(self.model)
        # Images are decoded at this size, then centre-cropped to the model's input, as in training.
        self.decode_size = decode_size(self.crop)
        self.batch_size = batch_size
        self.precision = precision or state["config"].get("precision", "auto")
        self.version = version or hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:12]
        self.name = name or f"{Path(state['config']['dataset_dir']).name}__{state['config']['model']}"
        self.run_id = run_id

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax outputs for a uint8 batch; halves the batch and retries when memory runs out."""
        outputs, start, batch = [], 0, self.batch_size
        while start < len(images):
            chunk = images[start:start + batch].to(self.device, non_blocking=True)
            try:
                with autocast(self.device, self.precision):
                    logits = self.model(normalise(centre_crop(chunk, self.crop), self.stats))
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            outputs.append(logits.float().softmax(dim=1).cpu())
            start += len(chunk)
        return torch.cat(outputs) if outputs else torch.empty((0, len(self.classes)))
