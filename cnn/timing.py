"""How long a training step takes on this device: what the recipe weighs input sizes by."""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from cnn.device import autocast

# Timed steps after one untimed step (which pays for allocation, and cuDNN's search on CUDA);
# the fastest counts, as the one least disturbed by whatever else the machine runs.
TIMED_STEPS = 3
# An epoch also evaluates the validation split, augments and, the first time, decodes.
EPOCH_OVERHEAD = 1.2


@functools.cache  # the CLI's plan and the flow's agree, and a second plan costs nothing
def seconds_per_image(config_items: tuple, num_classes: int, size: int, device: str, precision: str) -> float:
    """Seconds a training step of the model `config_items` describes spends per image at `size` px,
    with the epoch's other work added."""
    from cnn.runs import _build

    device_ = torch.device(device)
    model = _build({**dict(config_items), "image_size": size}, num_classes).to(device_, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    batch = 128 if device_.type == "cuda" else 32
    images = torch.randn(batch, 3, size, size, device=device_).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), device=device_)
    model.train()
    fastest = float("inf")
    for step in range(TIMED_STEPS + 1):
        _wait(device_)
        started = time.perf_counter()
        with autocast(device_, precision):
            loss = nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _wait(device_)
        if step:
            fastest = min(fastest, time.perf_counter() - started)
    return fastest / batch * EPOCH_OVERHEAD


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
