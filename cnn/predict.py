"""Batched inference with a trained checkpoint: uint8 images in, class probabilities out."""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cnn.augment import ColourStats, centre_crop, normalise
from cnn.device import autocast, reuse_freed_memory
from cnn.model import decode_size, input_size
from cnn.monitoring import brightness, calibrate
from cnn.embeddings import Projection, classifier_inputs
from cnn.runs import load_trained_model, projection_state, resize_mode


class Predictor:
    """A model, its classes and its preprocessing, loaded safely from a checkpoint."""

    def __init__(self, checkpoint: str | Path, device: str | torch.device = "cpu", batch_size: int = 256,
                 name: str | None = None, version: str | None = None, run_id: str | None = None,
                 precision: str | None = None):
        """`name` and `version` default to `<dataset>__<model>` and the checkpoint's content hash;
        a registered model passes its registry name, version and MLflow run id. `precision`
        defaults to the one the model trained with (`auto`: bf16 where the device has the units)."""
        self.device = torch.device(device)
        reuse_freed_memory(self.device)
        self.model, state = load_trained_model(checkpoint, self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.classes: list[str] = list(state["classes"])
        self.stats = ColourStats(**state["colour_stats"])
        self.crop = input_size(self.model)
        # Images are decoded at this size, then centre-cropped to the model's input, as in training.
        self.decode_size = decode_size(self.crop)
        self.resize = resize_mode(state["config"])
        self.batch_size = batch_size
        self.precision = precision or state["config"].get("precision", "auto")
        self.version = version or hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:12]
        self.name = name or f"{Path(state['config']['dataset_dir']).name}__{state['config']['model']}"
        self.run_id = run_id
        # Set from the version's reference profile to calibrate confidences (`cnn.monitoring`); None: not known.
        self.temperature: float | None = None
        # What `top_k` projects the classifier's inputs with (`cnn.embeddings`); None for a model
        # trained before embeddings, or to leave them out.
        self.projection = Projection.from_state(state.get("embedding") or projection_state(checkpoint))

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax outputs for a uint8 batch, on the CPU; halves the batch and retries when memory runs out."""
        chunks = [probabilities for probabilities, *_ in self._softmax_chunks(images)]
        return torch.cat(chunks).cpu() if chunks else torch.empty((0, len(self.classes)))

    @torch.no_grad()
    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax outputs and embeddings (no columns without a projection) of a uint8 batch, on the CPU."""
        chunks = [(probabilities.cpu(), embedding.float().cpu()) for probabilities, _, embedding in
                  self._softmax_chunks(images)]
        if not chunks:
            return torch.empty((0, len(self.classes))), torch.empty((0, 0))
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    @torch.no_grad()
    def top_k(self, images: torch.Tensor, k: int = 5) -> PendingTopK:
        """The `k` most probable classes of a uint8 batch, with each image's calibrated confidence
        (NaN without a temperature), mean brightness and embedding (empty without a projection), on
        their way to the host: the device need not finish before the caller hands it the next batch."""
        probabilities, brightness, embeddings = [], [], []
        for chunk_probabilities, chunk_brightness, chunk_embeddings in self._softmax_chunks(images):
            probabilities.append(chunk_probabilities)
            brightness.append(chunk_brightness)
            embeddings.append(chunk_embeddings)
        if not probabilities:
            empty = torch.empty(0)
            return PendingTopK(torch.empty((0, 0)), torch.empty((0, 0), dtype=torch.long), empty, empty,
                               torch.empty((0, 0)))
        probabilities = torch.cat(probabilities)
        top = probabilities.topk(min(k, len(self.classes)), dim=1)
        calibrated = calibrate(probabilities, self.temperature).max(dim=1).values.float() if self.temperature \
            else torch.full((len(probabilities),), float("nan"), device=probabilities.device)
        return PendingTopK(top.values, top.indices, calibrated, torch.cat(brightness), torch.cat(embeddings))

    def _softmax_chunks(self, images: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        start, batch = 0, self.batch_size
        while start < len(images):
            chunk = images[start:start + batch].to(self.device, non_blocking=True)
            try:
                with autocast(self.device, self.precision), \
                        classifier_inputs(self.model) if self.projection else nullcontext([]) as seen:
                    logits = self.model(normalise(centre_crop(chunk, self.crop), self.stats))
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            embedding = self.projection(seen[-1]) if self.projection else torch.empty((len(chunk), 0))
            yield logits.float().softmax(dim=1), brightness(chunk), embedding
            start += len(chunk)


class PendingTopK:
    """Top-k probabilities and class indices copying into pinned host memory; `result()` waits for them."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, calibrated: torch.Tensor, brightness: torch.Tensor,
                 embeddings: torch.Tensor):
        on_cuda = values.device.type == "cuda"
        self.values, self.indices, self.calibrated, self.brightness, self.embeddings = (
            torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=on_cuda).copy_(tensor, non_blocking=True)
            for tensor in (values, indices, calibrated, brightness, embeddings))
        self.ready = torch.cuda.Event() if on_cuda else None
        if self.ready is not None:
            self.ready.record()

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Top-k probabilities and classes (images x k), calibrated confidences, brightnesses and
        embeddings (images x 0 without a projection), as NumPy arrays on the host."""
        if self.ready is not None:
            self.ready.synchronize()
        return tuple(tensor.numpy() for tensor in (self.values, self.indices, self.calibrated, self.brightness,
                                                   self.embeddings))

    def result(self) -> tuple[list[list[float]], list[list[int]], list[float], list[float], list[list[float] | None]]:
        """`arrays()` as Python lists, a row an image; embeddings None without a projection."""
        values, indices, calibrated, brightness, embeddings = self.arrays()
        return (values.tolist(), indices.tolist(), calibrated.tolist(), brightness.tolist(),
                embeddings.tolist() if embeddings.shape[-1] else [None] * len(values))
