"""What a training run is: `TrainConfig`, its knobs' defaults and the choices each takes.

Plain data, checked in one line naming the flag, without torch: the CLI and the flows'
parameters read their defaults and choices from here without paying torch's import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Schedule = Literal["onecycle", "plateau", "step", "cosine"]
Norm = Literal["lrn", "batch", "none"]
Padding = Literal["zeros", "replicate"]
Pool = Literal["max", "avg"]
Precision = Literal["auto", "bf16", "fp32"]
Device = Literal["auto", "cpu", "cuda"]
Resize = Literal["crop", "squash"]

# Dimensions of the embeddings a model version gives its images (`cnn.embeddings`), which the
# predictions database stores as FLOAT[EMBEDDING_DIM].
EMBEDDING_DIM = 64

SCHEDULES: tuple[str, ...] = get_args(Schedule)
NORMS: tuple[str, ...] = get_args(Norm)
PADDINGS: tuple[str, ...] = get_args(Padding)
POOLS: tuple[str, ...] = get_args(Pool)
PRECISIONS: tuple[str, ...] = get_args(Precision)
RESIZES: tuple[str, ...] = get_args(Resize)


@dataclass
class TrainConfig:
    """One training run. A knob left None is chosen for the training split by `cnn.recipe`."""

    dataset_dir: str
    model: str = "alexnet-cifar"
    # Pixels a side the model sees; None: chosen from the images and the device by `cnn.recipe`.
    image_size: int | None = None
    # crop: shorter side to the size, centre crop (the paper's); squash: the whole frame, aspect ignored.
    resize: Resize | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    # The one-cycle schedule overrides it, cycling momentum between 0.95 and 0.85 (torch's default).
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: Schedule = "onecycle"
    label_smoothing: float | None = None
    # AlexNet options; None keeps the model's own default (batch norm for alexnet-cifar, LRN for alexnet).
    norm: Norm | None = None
    padding: Padding = "zeros"
    pool: Pool = "max"
    dropout: float | None = None
    patience: int | None = None
    seed: int = 0
    device: Device = "auto"
    # None: a share of the device's free memory, as `cnn.device.memory_budget` says.
    memory_budget_mb: int | None = None
    compile: bool = False
    # auto: bf16 on CUDA and on CPUs with AMX, fp32 elsewhere (see `cnn.device.uses_bf16`).
    precision: Precision = "auto"
    ten_crop: bool = False
    checkpoint_root: str | None = None
    # Where the weights start: scratch, torchvision, or a checkpoint or weights.pt file (`cnn.warm_start`).
    # Only a new run starts anywhere: a resumed one continues from its own checkpoint.
    init: str = "scratch"
    resume: bool | str = False
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        """Refuse an impossible setting before anything starts, naming its flag."""
        for field_name, choices, optional in [("schedule", SCHEDULES, False), ("norm", NORMS, True),
                                              ("padding", PADDINGS, False), ("pool", POOLS, False),
                                              ("precision", PRECISIONS, False), ("resize", RESIZES, True)]:
            value = getattr(self, field_name)
            if value not in choices and not (optional and value is None):
                raise ValueError(f"{flag(field_name)} must be one of {', '.join(choices)}, not {value!r}")
        checks = [
            ("image_size", lambda v: 16 <= v <= 1024, "between 16 and 1024"),
            ("epochs", lambda v: v >= 1, "at least 1"),
            ("batch_size", lambda v: v >= 1, "at least 1"),
            ("lr", lambda v: 0 < v < math.inf, "a positive number"),
            ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("weight_decay", lambda v: 0 <= v < math.inf, "zero or more"),
            ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("patience", lambda v: v >= 0, "zero or more"),
            ("memory_budget_mb", lambda v: v >= 0, "zero or more"),
        ]
        for field_name, valid, wanted in checks:
            value = getattr(self, field_name)
            if value is not None and not valid(value):
                raise ValueError(f"{flag(field_name)} must be {wanted}, not {value}")

    @property
    def dataset_name(self) -> str:
        return Path(self.dataset_dir).name


def flag(knob: str) -> str:
    """The command-line flag of a knob: `batch_size` is `--batch-size`."""
    return "--" + knob.replace("_", "-")
