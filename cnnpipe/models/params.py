"""The training knobs a user sets, written once: `TrainingParams`, the `params` of both training flows.

The same table gives the `cnnpipe train`, `retrain` and `serve` options (`cnnpipe.cli.knobs`),
the form of the Prefect UI (built from this model's JSON schema) and `params:` in
deploy/prefect.yaml. Defaults and choices are `cnn.config.TrainConfig`'s, read from it, so
this module only adds what a user reads: one description per knob. Values are checked where
they always were, by `TrainConfig`, in one line naming the flag.

    train("cifar10", TrainingParams(epochs=30, batch_size=256))
    TrainingParams(epochs=30).config(dataset_dir, checkpoint_root)   # the TrainConfig of a run
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cnn.config import Device, Norm, Padding, Pool, Precision, Resize, Schedule, TrainConfig, flag
from cnn.recipe import RULES
from cnnpipe.settings import REGISTERED_MODEL

# Fields of TrainConfig that say where a run reads, writes and starts, not how it trains: set by the
# flows (`init` from the `init` below, once a registered version is fetched to a file).
PLACEMENT = ("dataset_dir", "checkpoint_root", "keep_checkpoints", "init")
KNOBS = tuple(f.name for f in fields(TrainConfig) if f.name not in PLACEMENT)
_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def _knob(name: str, description: str) -> Any:
    """A field for a TrainConfig knob, with TrainConfig's default."""
    return Field(_DEFAULTS[name], description=description)


def _auto(name: str, description: str) -> Any:
    """A knob that `cnn.recipe` chooses when left unset, saying what it chooses."""
    return _knob(name, f"{description} [default: auto: {RULES[name]}]")


class TrainingParams(BaseModel):
    """How to train: the model, the recipe's knobs, the run's resources, and where the model is registered."""

    model_config = ConfigDict(frozen=True, extra="forbid", field_title_generator=lambda name, _: name)

    model: str = _knob("model", "alexnet (the paper's, 224 px), alexnet-cifar (32 px, or larger for larger "
                                "images), or a torchvision model name such as resnet18.")
    image_size: int | None = _auto("image_size", "Pixels a side the model sees, 16 to 1024")
    resize: Resize | None = _auto("resize", "How images reach that size: crop (shorter side, centre crop) or "
                                            "squash (the whole frame, aspect ignored)")
    epochs: int | None = _auto("epochs", "Passes over the train split")
    batch_size: int | None = _auto("batch_size", "Images per optimizer step")
    lr: float | None = _auto("lr", "Peak learning rate (one-cycle) or starting rate")
    momentum: float = _knob("momentum", "SGD (Nesterov) momentum; the onecycle schedule cycles it from 0.95 "
                                        "down to 0.85 and back instead.")
    weight_decay: float | None = _auto("weight_decay", "SGD weight decay")
    schedule: Schedule = _knob("schedule", "plateau is the paper's: divide by 10 when validation stops improving. "
                                           "onecycle also cycles SGD momentum from 0.95 down to 0.85 and back, in "
                                           f"place of {flag('momentum')}.")
    label_smoothing: float | None = _auto("label_smoothing", "Label smoothing of the loss")
    norm: Norm | None = _knob("norm", "Normalisation layers [default: batch for alexnet-cifar, lrn for alexnet].")
    padding: Padding = _knob("padding", "How AlexNet's convolutions pad their input: with zeros, or by repeating "
                                        "the edge pixels.")
    pool: Pool = _knob("pool", "AlexNet's overlapping 3x3 pooling, every 2 pixels: max (the paper's) or average.")
    dropout: float | None = _auto("dropout", "Dropout before each of AlexNet's hidden fully connected layers")
    patience: int | None = _knob("patience", "Stop after this many epochs without a better val top-1.")
    seed: int = _knob("seed", "Seeds initialisation, shuffling and augmentation.")
    device: Device = _knob("device", "auto: cuda when a GPU is available, else cpu.")
    memory_budget_mb: int | None = _knob(
        "memory_budget_mb", "Decode a split once into device memory when it fits; stream row groups otherwise "
                            "[default: auto: a share of the GPU's free memory, or of the RAM available on a CPU, "
                            "said in the run's log].")
    compile: bool = _knob("compile", "torch.compile the model.")
    precision: Precision = _knob("precision", "auto: bf16 autocast on CUDA and on CPUs with AMX (about 3x faster "
                                              "there), fp32 elsewhere.")
    ten_crop: bool = _knob("ten_crop", "Also report the paper's ten-patch test-time averaging.")
    resume: bool | str = _knob("resume", "true: continue the latest unfinished run of this dataset and model; "
                                         "a path: continue the run there.")
    registered_model: str = Field(REGISTERED_MODEL, description="Name in the MLflow model registry.")
    min_improvement: float = Field(0.0, description="Promote to champion only if validation top-1 beats the "
                                                    "champion's by at least this.")
    nproc: int = Field(1, description="Train as DDP over N processes on this machine (torchrun): one per GPU, or "
                                      "gloo on CPUs.")
    init: str | None = Field(None, description=(
        "Where the weights start: scratch; champion, NAME@ALIAS or NAME/VERSION (a registered version, fine-tuned "
        "with a shorter schedule and lower lr, classes matched by name); a checkpoint or weights.pt file; or "
        "torchvision (a torchvision model's ImageNet weights, from torch's cache, $TORCH_HOME) [default: scratch "
        "for train; retrain fine-tunes the champion when it has the same model and input size and was trained on "
        "this dataset, see --scratch-every]."))
    scratch_every: int = Field(7, ge=0, description=(
        "retrain: every Nth version of the registered model trains from scratch, so that fine-tuning does not "
        "drift; a warm start that does not beat the champion is also trained again from scratch. 1: always from "
        "scratch; 0: only then."))

    def config(self, dataset_dir: str, checkpoint_root: str | None = None, init: str = "scratch") -> TrainConfig:
        """The run's TrainConfig, starting from `init` (`init` above, resolved to weights on this
        machine); raises ValueError naming the flag of an impossible setting."""
        return TrainConfig(dataset_dir=dataset_dir, checkpoint_root=checkpoint_root, init=init,
                           **{name: getattr(self, name) for name in KNOBS})
