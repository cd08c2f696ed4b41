"""The automatic recipe: a choice for every training knob the user leaves unset.

The reference is alexnet-cifar on CIFAR-10's 50,000 training images: batch 512, peak
learning rate 0.2, 30 epochs, dropout 0.5, weight decay 5e-4 and label smoothing 0.1,
about 2,900 SGD steps. At that size and above the recipe is exactly the reference.
A smaller training split gets:
- a smaller batch (a power of two, at least MIN_BATCH), so that an epoch still has about
  STEPS_PER_EPOCH optimizer steps: 3,000 images at batch 512 make 5 steps an epoch, too
  few to learn anything in a few epochs;
- the learning rate scaled with the batch. The linear rule (Goyal et al., 2017) gives
  0.0125 at batch 32, which on small sets learnt markedly slower than 0.05; the
  square-root rule (Krizhevsky, 2014, "One weird trick") gives 0.05 there and equals the
  linear one at the reference. The warm-up is the first quarter of the one-cycle schedule;
- without `--epochs`, enough epochs for a budget of MIN_STEPS steps, never fewer than the
  reference's 30 and at most MAX_EPOCHS; with `--epochs` and no `--batch-size`, a batch small
  enough for CAPPED_STEPS steps in those epochs, where the split allows (never below MIN_BATCH),
  and, for a run still under MIN_STEPS steps at an input under SHORT_RUN_FULL_LR_SIZE, SHORT_RUN_LR_SHARE
  of the learning rate;
- less regularisation: dropout and label smoothing slow the few hundred steps of a small
  set more than they help it generalise (the demo's shapes: 72% with, 82% without).

The input size (`choose_input`): images of about 32 px, or smaller, are seen at 32 px, as
CIFAR-10 is. Larger ones get the largest of SIZES that the median image fills and whose
training, timed on the device, fits RUN_BUDGET_SECONDS at the recipe's epochs, or costs at
most SIZE_COST_SHARE times what 32 px would: on a 2-core CPU that is about 128 px for a few
thousand photos, on a GPU 224. Photos that are not square are
squashed whole to the square input rather than centre-cropped, so that an object near an
edge is not cut away.

A run that starts from trained weights (`--init`) takes FINE_TUNE_EPOCH_SHARE of the epochs a
run from scratch would get, and the input size and resize mode the weights were trained at. Its
peak learning rate depends on what the weights know. Weights that know most of the dataset's
classes (the nightly run: the champion, a few percent more images) are fine-tuned at
FINE_TUNE_LR_SHARE of it. Weights that know fewer than half start a fresh classifier (transfer
to a new task), whose features must move further: TRANSFER_LR_SHARE of it. On 456 digits with
alexnet-cifar weights pretrained on CIFAR-10 (the set of bench/warm_start.py, 200 test images),
11 epochs at 0.3, 0.5 and 1.0 of the rate reached 90.5, 92.5 and 84.5% top-1; 43 epochs from
scratch, 92.5%.

An explicit value always wins; `Recipe.auto` names the knobs that were chosen here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from cnn.config import TrainConfig

REFERENCE = {"batch_size": 512, "lr": 0.2, "epochs": 30, "dropout": 0.5, "weight_decay": 5e-4,
             "label_smoothing": 0.1}
MIN_BATCH = 32
STEPS_PER_EPOCH = 40
MIN_STEPS = 600
# With --epochs set and --batch-size not, the batch shrinks (not below MIN_BATCH) to make at least
# this many steps in all: 3,000 digits at 5 epochs and batch 64 made 230 steps and 89.8% top-1.
CAPPED_STEPS = 400
# A run whose --epochs leave it under MIN_STEPS steps peaks at this share of the lr: the one-cycle
# schedule has no time to anneal from the full rate. bench/recipe.py --capped at 3 and 5 epochs on
# three small sets: the best lr of the grid was always 0.4-0.7 of the full one (0.05 at batch 32).
SHORT_RUN_LR_SHARE = 0.5
# ... at inputs below this size. From it on alexnet-cifar has the paper's stride-4 stem, and the same grid
# on 883 photos squashed to 224 px peaked at the full rate (0.05 at batch 32) at 5 epochs with seeds 0 to 2,
# 3.6 to 13.4 points above the halved rate, and at 3 epochs with seeds 1 and 2 (seed 0: the halved rate
# 2.3 points above the grid's best).
SHORT_RUN_FULL_LR_SIZE = 128
MAX_EPOCHS = 100
# From these sizes on, dropout and label smoothing are the reference's, or half of them.
FULL_REGULARISATION = 20_000
HALF_REGULARISATION = 5_000
# Below this many optimizer steps in all, a run is warned that it cannot learn much.
FEW_STEPS = 100
# A training loss within this share of ln(classes) after an epoch means nothing was learnt,
# checked once at least STALL_CHECK_STEPS steps have run: earlier, a small set is still in warm-up.
CHANCE_LOSS_SHARE = 0.97
STALL_CHECK_STEPS = 50
AUTO_KNOBS = tuple(REFERENCE)
# Input sizes the recipe chooses among, and the models it chooses one for; others keep their own.
SIZES = (32, 48, 64, 96, 128, 160, 192, 224)
SIZED_MODELS = ("alexnet-cifar",)
RUN_BUDGET_SECONDS = 600
SIZE_COST_SHARE = 1.5
# A median aspect ratio further than this from 1 means photos, squashed whole rather than cropped.
SQUARE_TOLERANCE = 0.1
# The stall check waits for the end of this share of the run, after the one-cycle warm-up.
STALL_CHECK_SHARE = 0.3
# A run from trained weights: this share of the epochs and of the peak learning rate from scratch.
FINE_TUNE_EPOCH_SHARE = 0.25
FINE_TUNE_LR_SHARE = 0.1
TRANSFER_LR_SHARE = 0.5
# Weights that know fewer than this share of the dataset's classes are a transfer, not a fine-tuning.
TRANSFER_BELOW = 0.5
STARTS = ("scratch", "fine-tune", "transfer")


def _regularisation_rule(reference: float) -> str:
    return (f"{reference:g} from {FULL_REGULARISATION:,} train images, half from {HALF_REGULARISATION:,}, "
            "none below")


# Each automatic rule in a few words, for `--help`.
RULES = {
    "batch_size": f"about {STEPS_PER_EPOCH} steps an epoch, {MIN_BATCH} to {REFERENCE['batch_size']}; with --epochs "
                  f"set, smaller for {CAPPED_STEPS} steps in all",
    "lr": f"{REFERENCE['lr']:g} x sqrt(batch / {REFERENCE['batch_size']}); with --epochs set, "
          f"{SHORT_RUN_LR_SHARE:g}x that for a run under {MIN_STEPS} steps at inputs under {SHORT_RUN_FULL_LR_SIZE} px",
    "epochs": f"{REFERENCE['epochs']}, or more to make {MIN_STEPS} steps, at most {MAX_EPOCHS}",
    "dropout": _regularisation_rule(REFERENCE["dropout"]),
    "weight_decay": f"{REFERENCE['weight_decay']:g}",
    "label_smoothing": _regularisation_rule(REFERENCE["label_smoothing"]),
    "image_size": f"alexnet-cifar: 32 for images of about 32 px; for larger ones the largest of {SIZES[1]} to "
                  f"{SIZES[-1]} that the median image fills and whose training fits {RUN_BUDGET_SECONDS // 60} "
                  "minutes on the device; other models: their own",
    "resize": f"squash when the median image is further than {SQUARE_TOLERANCE:.0%} from square, else crop",
}


@dataclass(frozen=True)
class InputChoice:
    """The size a model sees, how images are brought to it, and why."""

    size: int
    resize: str
    reason: str
    auto: tuple[str, ...] = ()
    epoch_seconds: float | None = None
    # The train images' median width and height; None where not known.
    median: tuple[int, int] | None = None

    def text(self) -> str:
        how = "whole image squashed" if self.resize == "squash" else "centre crop"
        return f"input {self.size} px, {how} ({self.reason})"


@dataclass(frozen=True)
class Recipe:
    batch_size: int
    lr: float
    epochs: int
    dropout: float
    weight_decay: float
    label_smoothing: float
    train_images: int
    auto: tuple[str, ...]
    input: InputChoice | None = field(default=None)
    # scratch, fine-tune (trained weights that know the classes) or transfer (a fresh classifier).
    start: str = "scratch"
    # Whether the batch is smaller than the split's own, for CAPPED_STEPS steps in the epochs given.
    capped: bool = False
    # Whether the lr is SHORT_RUN_LR_SHARE of the usual, for a run of under MIN_STEPS steps.
    short: bool = False

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.train_images // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def line(self) -> str:
        """One line that says what the run uses and which of it was chosen automatically."""
        epochs = f"{self.epochs} epoch" + ("s" if self.epochs != 1 else "")
        shown = [f"batch {self.batch_size}", f"lr {self.lr:.3g}", epochs, f"dropout {self.dropout:g}",
                 f"weight decay {self.weight_decay:g}", f"label smoothing {self.label_smoothing:g}"]
        chosen = [text for knob, text in zip(AUTO_KNOBS, shown) if knob in self.auto]
        given = [text for knob, text in zip(AUTO_KNOBS, shown) if knob not in self.auto]
        parts = []
        if chosen:
            why = f"auto for {self.train_images:,} train images"
            if self.capped:
                why += f", batch smaller for {CAPPED_STEPS} steps or more in {epochs}"
            if self.short:
                why += f", lr at {SHORT_RUN_LR_SHARE:g}x for a run under {MIN_STEPS} steps"
            parts.append(f"{', '.join(chosen)} ({why})")
        if given:
            parts.append(f"{', '.join(given)} (set)")
        if self.start != "scratch" and {"epochs", "lr"} & set(self.auto):
            lr_share = FINE_TUNE_LR_SHARE if self.start == "fine-tune" else TRANSFER_LR_SHARE
            shares = [share for knob, share in (("epochs", f"{FINE_TUNE_EPOCH_SHARE:.0%} of the epochs"),
                                                ("lr", f"{lr_share:.0%} of the peak lr")) if knob in self.auto]
            how = ("fine-tuning weights that know the classes" if self.start == "fine-tune"
                   else "transfer: the weights know under half of the classes, a fresh classifier learns them")
            parts.append(f"{how}: {' and '.join(shares)} of a run from scratch")
        if self.input is not None:
            parts.insert(0, self.input.text())
        return (f"recipe: {'; '.join(parts)}; {self.steps_per_epoch:,} steps an epoch, "
                f"{self.total_steps:,} in all")

    def params(self) -> dict[str, object]:
        """The choices as MLflow params, the automatic ones marked."""
        values = {knob: getattr(self, knob) for knob in AUTO_KNOBS}
        return {**{f"recipe.{knob}": value for knob, value in values.items()},
                **{f"recipe.{knob}.source": "auto" if knob in self.auto else "set" for knob in AUTO_KNOBS},
                "recipe.train_images": self.train_images, "recipe.steps_per_epoch": self.steps_per_epoch,
                "recipe.total_steps": self.total_steps, "recipe.start": self.start,
                **({"recipe.image_size": self.input.size, "recipe.resize": self.input.resize,
                    "recipe.image_size.source": "auto" if "image_size" in self.input.auto else "set",
                    "recipe.input": self.input.reason} if self.input else {})}


def regularisation_share(train_images: int) -> float:
    """How much of the reference's dropout and label smoothing a split of this size gets."""
    if train_images >= FULL_REGULARISATION:
        return 1.0
    return 0.5 if train_images >= HALF_REGULARISATION else 0.0


def _power_of_two_at_most(value: float) -> int:
    return 2 ** max(0, int(math.floor(math.log2(max(1.0, value)))))


def choose(train_images: int, batch_size: int | None = None, lr: float | None = None, epochs: int | None = None,
           dropout: float | None = None, weight_decay: float | None = None,
           label_smoothing: float | None = None, start: str = "scratch") -> Recipe:
    """The recipe for a training split of `train_images`, keeping every value given, for a run
    that starts as `start` says (one of STARTS)."""
    if train_images < 1:
        raise ValueError("the train split is empty")
    given = {"batch_size": batch_size, "lr": lr, "epochs": epochs, "dropout": dropout,
             "weight_decay": weight_decay, "label_smoothing": label_smoothing}
    auto = tuple(knob for knob, value in given.items() if value is None)
    capped = False
    if batch_size is None:
        batch_size = min(REFERENCE["batch_size"], max(MIN_BATCH, _power_of_two_at_most(train_images / STEPS_PER_EPOCH)))
        if epochs is not None:
            # A user who caps the epochs still gets CAPPED_STEPS steps in all, where the split allows.
            budgeted = max(MIN_BATCH, _power_of_two_at_most(train_images * epochs / CAPPED_STEPS))
            capped = budgeted < batch_size
            batch_size = min(batch_size, budgeted)
        # A split smaller than the floor trains in one batch of all of it.
        batch_size = min(batch_size, train_images)
    short = False
    if lr is None:
        lr = REFERENCE["lr"] * math.sqrt(batch_size / REFERENCE["batch_size"])
        lr *= {"scratch": 1.0, "fine-tune": FINE_TUNE_LR_SHARE, "transfer": TRANSFER_LR_SHARE}[start]
        short = start == "scratch" and epochs is not None and epochs * max(1, train_images // batch_size) < MIN_STEPS
        lr *= SHORT_RUN_LR_SHARE if short else 1.0
    if epochs is None:
        steps_per_epoch = max(1, train_images // batch_size)
        epochs = min(MAX_EPOCHS, max(REFERENCE["epochs"], math.ceil(MIN_STEPS / steps_per_epoch)))
        epochs = epochs if start == "scratch" else math.ceil(FINE_TUNE_EPOCH_SHARE * epochs)
    share = regularisation_share(train_images)
    if dropout is None:
        dropout = REFERENCE["dropout"] * share
    if weight_decay is None:
        weight_decay = REFERENCE["weight_decay"]
    if label_smoothing is None:
        label_smoothing = REFERENCE["label_smoothing"] * share
    return Recipe(batch_size, lr, epochs, dropout, weight_decay, label_smoothing, train_images, auto, start=start,
                  capped=capped, short=short)


def choose_input(model: str, native_size: int, train_images: int, epochs: int,
                 sizes: tuple[Sequence[int], Sequence[int]] | None,
                 seconds_per_image: Callable[[int], float] | None,
                 image_size: int | None = None, resize: str | None = None) -> InputChoice:
    """The input size and resize mode for `model`, keeping any given. `sizes` holds the train
    images' widths and heights (None: not known); `seconds_per_image(size)` times a training
    step on the device, and is called only when the images are larger than 32 px."""
    auto = tuple(name for name, value in (("image_size", image_size), ("resize", resize)) if value is None)
    median = None
    if sizes and len(sizes[0]):
        median = (round(statistics.median(sizes[0])), round(statistics.median(sizes[1])))
    seen = f"median image {median[0]}x{median[1]}" if median else "image sizes not known"
    if resize is None:
        resize = "crop"
        if median and abs(math.log(median[0] / median[1])) > math.log1p(SQUARE_TOLERANCE):
            resize = "squash"
    if image_size is not None:
        return InputChoice(image_size, resize, f"set; {seen}", auto, median=median)
    if model not in SIZED_MODELS or median is None:
        return InputChoice(native_size, resize, f"{model}'s own; {seen}", auto, median=median)
    fits = [size for size in SIZES if size <= min(median)] or [SIZES[0]]
    if len(fits) == 1:
        return InputChoice(fits[0], resize, seen, auto, median=median)
    # Where 32 px alone nearly fills the budget (a CPU without AMX, a large split), a size costing
    # a little more than 32 px is still worth it.
    budget = max(RUN_BUDGET_SECONDS, SIZE_COST_SHARE * seconds_per_image(SIZES[0]) * train_images * epochs)
    for size in reversed(fits):
        epoch_seconds = seconds_per_image(size) * train_images
        if size == SIZES[0] or epoch_seconds * epochs <= budget:
            return InputChoice(size, resize, f"{seen}; {_duration(epoch_seconds)} an epoch estimated, "
                                             f"{_duration(epoch_seconds * epochs)} for {epochs}", auto, epoch_seconds,
                               median)
    raise AssertionError("unreachable: the smallest size is always taken")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def apply(config: TrainConfig, train_images: int, sizes: tuple[Sequence[int], Sequence[int]] | None = None,
          seconds_per_image: Callable[[int], float] | None = None, native_size: int = 32,
          start_config: dict | None = None, known_classes: float = 1.0) -> tuple[TrainConfig, Recipe]:
    """`config` with every unset knob chosen for `train_images` (and input size for images of
    `sizes`), and the recipe that says so. `start_config` is the training config of the weights
    the run starts from, if any, and `known_classes` the share of the dataset's classes they
    know: the run then fine-tunes or transfers them, at the size they were trained at.

    A batch larger than the train split is refused here, naming the flag: it would make
    epochs of no steps at all."""
    start = "scratch" if start_config is None else "transfer" if known_classes < TRANSFER_BELOW else "fine-tune"
    recipe = choose(train_images, **{knob: getattr(config, knob) for knob in AUTO_KNOBS}, start=start)
    if "batch_size" not in recipe.auto and config.batch_size > train_images:
        raise ValueError(f"--batch-size {config.batch_size} is larger than the {train_images:,} train images: "
                         f"use at most {train_images:,}, or leave it unset to choose automatically")
    if start_config and start_config.get("image_size") and config.image_size is None:
        chosen = _starting_input(config, start_config, sizes)
    else:
        chosen = choose_input(config.model, native_size, train_images, recipe.epochs, sizes, seconds_per_image,
                              config.image_size, config.resize)
    recipe = replace(recipe, input=chosen)
    if recipe.short and chosen.size >= SHORT_RUN_FULL_LR_SIZE:
        recipe = replace(recipe, lr=recipe.lr / SHORT_RUN_LR_SHARE, short=False)
    return replace(config, **{knob: getattr(recipe, knob) for knob in AUTO_KNOBS}, image_size=chosen.size,
                   resize=chosen.resize), recipe


def _starting_input(config: TrainConfig, start_config: dict,
                    sizes: tuple[Sequence[int], Sequence[int]] | None) -> InputChoice:
    """The input of the weights a run starts from: what their layers were trained to see."""
    seen = choose_input(config.model, start_config["image_size"], 0, 0, sizes, None, start_config["image_size"],
                        config.resize or start_config.get("resize") or "crop")
    auto = ("image_size",) + (("resize",) if config.resize is None else ())
    return replace(seen, reason=f"as its starting weights were trained; {seen.reason.removeprefix('set; ')}",
                   auto=auto)


def few_steps_warning(recipe: Recipe) -> str | None:
    """Before training: too few optimizer steps in all to learn."""
    if recipe.total_steps >= FEW_STEPS:
        return None
    advice = []
    if "batch_size" not in recipe.auto:
        advice.append("lower --batch-size (or leave it unset)")
    advice.append("raise --epochs" if "epochs" not in recipe.auto else "add images")
    return (f"only {recipe.total_steps} optimizer steps in all ({recipe.epochs} epochs of {recipe.steps_per_epoch} "
            f"at batch {recipe.batch_size} over {recipe.train_images:,} images): too few to learn; "
            f"{' or '.join(advice)}")


def stall_check_epoch(recipe: Recipe) -> int:
    """The epoch after which a loss at chance is worth a warning: past STALL_CHECK_SHARE of the run
    (a slow start in the one-cycle warm-up is no stall), the second at the earliest, with at least
    STALL_CHECK_STEPS steps behind it (300 grayscale images make 7 steps an epoch), or the last."""
    return min(recipe.epochs, max(2, math.ceil(STALL_CHECK_SHARE * recipe.epochs),
                                  math.ceil(STALL_CHECK_STEPS / recipe.steps_per_epoch)))


def stalled_warning(record: dict, num_classes: int, recipe: Recipe) -> str | None:
    """After an epoch: a training loss still at about ln(classes) means the model predicts at chance."""
    chance = math.log(num_classes) if num_classes > 1 else 0.0
    if chance == 0.0 or record["train_loss"] < CHANCE_LOSS_SHARE * chance:
        return None
    causes = []
    shrunk = _shrunk_images(recipe)
    if shrunk:
        causes.append(shrunk)
    if "lr" not in recipe.auto:
        causes.append(f"--lr {recipe.lr:g} may be too high or too low for batch {recipe.batch_size}")
    if "batch_size" not in recipe.auto and recipe.steps_per_epoch < STEPS_PER_EPOCH:
        causes.append(f"--batch-size {recipe.batch_size} leaves only {recipe.steps_per_epoch} steps an epoch")
    if not causes:
        causes.append("the learning rate may not suit this data: try --lr at a tenth or ten times "
                      f"{recipe.lr:g}")
    return (f"training loss {record['train_loss']:.3f} after epoch {record['epoch']} is still about "
            f"ln({num_classes}) = {chance:.3f}, the loss of a model at chance: {'; '.join(causes)}")


def _shrunk_images(recipe: Recipe) -> str | None:
    """Why a model may see too little: images at least three times its input size."""
    chosen = recipe.input
    if chosen is None or chosen.median is None:
        return None
    width, height = chosen.median
    if min(width, height) < 3 * chosen.size:
        return None
    larger = min(SIZES[-1], min(width, height) // 2)
    return (f"the images (median {width}x{height}) are shrunk to {chosen.size} px, which may blur what tells "
            f"the classes apart: try --image-size {larger}")
