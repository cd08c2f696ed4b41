"""Where a new run's weights start: random (`scratch`), a trained model's, or torchvision's.

    start = starting_weights("runs/shapes/epoch-0030.pt", "alexnet-cifar")   # or a weights.pt
    match = transfer(model, start, classes)     # "4 classes kept, 1 new, 0 dropped"

A trained model is read from a checkpoint or a registered version's `weights.pt`, both with
`weights_only=True`. `torchvision` means the model's default ImageNet weights, read from torch's
cache (`$TORCH_HOME/hub/checkpoints`) and never downloaded here: a scheduled run on a machine
without internet must fail in one line, not hang on a download.

Every layer must match the new model's shape for shape, except the classifier's last layer,
whose rows are matched by class name: a class both know keeps its row, a new class gets the
fresh row the model was built with, and a class the dataset lacks is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from cnn.checkpoint import load_checkpoint
from cnn.model import MODELS, head_name

SCRATCH, TORCHVISION = "scratch", "torchvision"


class InitError(ValueError):
    """A starting point that cannot be used, said in one line naming it."""


@dataclass(frozen=True)
class StartingWeights:
    state: dict[str, torch.Tensor]
    classes: list[str]
    # The training config the weights come from: model, image size, resize, norm; only the model for torchvision's.
    config: dict
    origin: str

    @property
    def model(self) -> str | None:
        return self.config.get("model")


@dataclass(frozen=True)
class ClassMatch:
    kept: int
    new: int
    dropped: int

    def text(self) -> str:
        return f"{self.kept} classes kept, {self.new} new, {self.dropped} dropped"


def starting_weights(init: str, model: str) -> StartingWeights | None:
    """The weights `init` names for a run of `model`; None for scratch. Raises InitError."""
    if init == SCRATCH:
        return None
    if init == TORCHVISION:
        return _torchvision_weights(model)
    path = Path(init)
    if not path.is_file():
        raise InitError(f"--init {init}: no such file; use scratch, torchvision, a checkpoint or weights.pt file, "
                        "or a registered version (champion, NAME@ALIAS, NAME/VERSION)")
    state = load_checkpoint(path)
    if not isinstance(state.get("model"), dict) or "classes" not in state:
        raise InitError(f"--init {init}: not a checkpoint or weights.pt of this pipeline (it holds no model "
                        "weights and classes)")
    return StartingWeights(state["model"], list(state["classes"]), dict(state.get("config") or {}), str(path))


def _torchvision_weights(model: str) -> StartingWeights:
    from torchvision.models import get_model_weights

    if model in MODELS:
        raise InitError(f"--init torchvision: {model} is this pipeline's own network, which torchvision has no "
                        "weights for; use it with a torchvision model such as --model resnet18")
    try:
        weights = get_model_weights(model).DEFAULT
    except (KeyError, ValueError):
        raise InitError(f"--init torchvision: torchvision has no weights for {model!r}") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not cached.is_file():
        raise InitError(f"--init torchvision: {weights} is not in torch's cache: put {cached.name} (from "
                        f"{weights.url}) in {cached.parent}, or point TORCH_HOME at a folder whose "
                        "hub/checkpoints holds it")
    try:
        state = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=False,
                                                   weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file, said in one line
        raise InitError(f"--init torchvision: {cached} is unreadable ({str(exc).splitlines()[0]})") from None
    return StartingWeights(state, list(weights.meta["categories"]), {"model": model}, f"{weights} ({cached})")


def transfer(model: nn.Module, start: StartingWeights, classes: list[str], model_name: str) -> ClassMatch:
    """Load `start` into `model` (built for `classes`), rows of the classifier matched by class name."""
    match, state = _matched_state(model, start, classes, model_name)
    model.load_state_dict(state)
    return match


def check(model: nn.Module, start: StartingWeights, classes: list[str], model_name: str) -> ClassMatch:
    """What `transfer` would do, without touching `model`; raises InitError if it cannot."""
    return _matched_state(model, start, classes, model_name)[0]


def _matched_state(model: nn.Module, start: StartingWeights, classes: list[str],
                   model_name: str) -> tuple[ClassMatch, dict[str, torch.Tensor]]:
    if start.model and start.model != model_name:
        raise InitError(f"--init {start.origin}: it is a {start.model}, this run trains a {model_name}; train "
                        f"with --model {start.model}, or start this one from scratch")
    target = model.state_dict()
    try:
        head = head_name(model)
    except ValueError as exc:
        raise InitError(f"--init {start.origin}: {exc}") from None
    head_keys = (f"{head}.weight", f"{head}.bias")
    missing = [key for key in target if key not in start.state]
    if missing:
        raise InitError(f"--init {start.origin}: its {start.model or 'model'} has no {missing[0]} (and "
                        f"{len(missing) - 1} more layers) that this run's {model_name} has")
    for key, tensor in target.items():
        theirs = tuple(start.state[key].shape)
        if key not in head_keys and theirs != tuple(tensor.shape):
            raise InitError(f"--init {start.origin}: its {key} is {_shape(theirs)}, this run's {model_name} has "
                            f"{_shape(tuple(tensor.shape))}{_size_hint(start, model)}")
    if start.state[head_keys[0]].shape[1] != target[head_keys[0]].shape[1]:
        raise InitError(f"--init {start.origin}: its classifier takes {start.state[head_keys[0]].shape[1]} features, "
                        f"this run's {model_name} {target[head_keys[0]].shape[1]}")
    state = {key: start.state[key] for key in target if key not in head_keys}
    known = {name: row for row, name in enumerate(start.classes)}
    weight, bias = target[head_keys[0]].clone(), target[head_keys[1]].clone()
    for row, name in enumerate(classes):
        if name in known:
            weight[row] = start.state[head_keys[0]][known[name]]
            bias[row] = start.state[head_keys[1]][known[name]]
    state.update({head_keys[0]: weight, head_keys[1]: bias})
    kept = sum(name in known for name in classes)
    return ClassMatch(kept, len(classes) - kept, len(set(start.classes) - set(classes))), state


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "a scalar"


def _size_hint(start: StartingWeights, model: nn.Module) -> str:
    theirs, ours = start.config.get("image_size"), getattr(model, "input_size", None)
    if theirs and ours and theirs != ours:
        return f" (it was trained at {theirs} px, this run's input is {ours} px: use --image-size {theirs})"
    return ""
