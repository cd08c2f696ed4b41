from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cnn import recipe
from cnn.config import SCHEDULES, TrainConfig
from cnn.train import _scheduler


def test_cifar10_sized_training_keeps_the_reference_recipe():
    chosen = recipe.choose(50_000)
    assert {knob: getattr(chosen, knob) for knob in recipe.AUTO_KNOBS} == recipe.REFERENCE
    assert chosen.auto == recipe.AUTO_KNOBS
    assert recipe.choose(1_281_167).batch_size == 512  # ImageNet: the ceiling, not more


def test_a_small_split_gets_a_smaller_batch_a_scaled_rate_and_more_epochs():
    chosen = recipe.choose(3_000)
    assert (chosen.batch_size, chosen.lr) == (64, pytest.approx(0.2 * math.sqrt(64 / 512)))
    assert chosen.steps_per_epoch >= recipe.STEPS_PER_EPOCH
    assert chosen.total_steps >= recipe.MIN_STEPS and chosen.epochs >= recipe.REFERENCE["epochs"]
    assert chosen.dropout < recipe.REFERENCE["dropout"] and chosen.label_smoothing < recipe.REFERENCE["label_smoothing"]


@pytest.mark.parametrize("images", [1, 7, 31, 100, 999, 3_000, 12_345, 49_999, 50_000, 10**7])
def test_every_size_gets_a_runnable_recipe_whose_rate_follows_the_batch(images):
    chosen = recipe.choose(images)
    assert 1 <= chosen.batch_size <= min(images, 512) and chosen.steps_per_epoch >= 1
    assert chosen.lr == pytest.approx(0.2 * math.sqrt(chosen.batch_size / 512))
    assert recipe.REFERENCE["epochs"] <= chosen.epochs <= recipe.MAX_EPOCHS


def test_batch_size_and_regularisation_never_shrink_as_the_split_grows():
    chosen = [recipe.choose(n) for n in range(100, 60_000, 700)]
    for knob in ("batch_size", "dropout", "label_smoothing"):
        values = [getattr(c, knob) for c in chosen]
        assert values == sorted(values), knob


def test_an_explicit_value_always_wins_and_only_the_rest_is_auto():
    chosen = recipe.choose(3_000, batch_size=256, dropout=0.0, epochs=2)
    assert (chosen.batch_size, chosen.dropout, chosen.epochs) == (256, 0.0, 2)
    # Still scaled, from the batch the user chose, and halved: 22 steps are a short run.
    assert chosen.lr == pytest.approx(0.5 * 0.2 * math.sqrt(0.5)) and chosen.short
    assert set(chosen.auto) == {"lr", "weight_decay", "label_smoothing"}
    params = chosen.params()
    assert params["recipe.batch_size.source"] == "set" and params["recipe.lr.source"] == "auto"
    assert params["recipe.lr"] == pytest.approx(chosen.lr) and params["recipe.total_steps"] == 2 * 11


def test_the_recipe_line_says_what_was_chosen_and_for_how_many_images():
    line = recipe.choose(3_000).line()
    assert line.startswith("recipe: batch 64, lr 0.0707") and "(auto for 3,000 train images)" in line
    assert "46 steps an epoch, 1,380 in all" in line and "30 epochs" in line


def test_capped_epochs_get_a_batch_small_enough_for_enough_steps_and_say_so():
    capped = recipe.choose(3_000, epochs=5)
    assert (capped.batch_size, capped.lr) == (32, pytest.approx(0.5 * 0.2 * math.sqrt(32 / 512)))
    assert capped.total_steps >= recipe.CAPPED_STEPS and capped.capped and capped.short
    assert "batch smaller for 400 steps or more in 5 epochs" in capped.line() and "465 in all" in capped.line()
    assert "lr at 0.5x for a run under 600 steps" in capped.line()
    # Epochs enough for MIN_STEPS keep the full rate; so does a run from trained weights, or a given lr.
    long_enough = recipe.choose(3_000, epochs=30)
    assert long_enough.lr == pytest.approx(0.2 * math.sqrt(64 / 512)) and not long_enough.short
    assert "lr at" not in long_enough.line()
    assert not recipe.choose(3_000, epochs=5, start="fine-tune").short
    assert recipe.choose(3_000, epochs=5, lr=0.3).lr == 0.3
    # Never below the floor, however short; untouched where the split's own batch makes enough steps.
    assert recipe.choose(3_000, epochs=1).batch_size == recipe.MIN_BATCH
    assert not recipe.choose(50_000, epochs=5).capped and recipe.choose(50_000, epochs=5).batch_size == 512
    assert recipe.choose(50_000, epochs=2).batch_size == 128
    assert recipe.choose(3_000, epochs=5, batch_size=256).batch_size == 256  # a given batch always wins


def test_a_batch_larger_than_the_train_split_is_refused_naming_the_flag(tmp_path):
    config = TrainConfig(dataset_dir=str(tmp_path), batch_size=512)
    with pytest.raises(ValueError, match=r"^--batch-size 512 is larger than the 300 train images"):
        recipe.apply(config, 300)
    applied, chosen = recipe.apply(TrainConfig(dataset_dir=str(tmp_path)), 300)
    assert applied.batch_size == chosen.batch_size <= 300 and applied.dropout is not None


@pytest.mark.parametrize("flag, value", [("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("lr", -1.0),
                                         ("lr", math.inf), ("dropout", 1.0), ("label_smoothing", -0.1),
                                         ("weight_decay", -1e-4), ("momentum", 1.0), ("patience", -1)])
def test_an_impossible_setting_is_refused_in_one_line_naming_its_flag(flag, value, tmp_path):
    with pytest.raises(ValueError) as refused:
        TrainConfig(dataset_dir=str(tmp_path), **{flag: value})
    message = str(refused.value)
    assert message.startswith(f"--{flag.replace('_', '-')} must be") and "\n" not in message


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("epochs, steps_per_epoch", [(1, 1), (1, 2), (1, 3), (3, 1), (2, 2), (1, 5), (4, 7)])
def test_every_schedule_runs_any_number_of_steps(schedule, epochs, steps_per_epoch, tmp_path):
    config = TrainConfig(dataset_dir=str(tmp_path), schedule=schedule, epochs=epochs, lr=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    scheduler, per_batch = _scheduler(config, optimizer, steps_per_epoch)
    rates = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            optimizer.step()
            rates.append(optimizer.param_groups[0]["lr"])
            if per_batch:
                scheduler.step()
        if not per_batch:
            scheduler.step(0.5) if schedule == "plateau" else scheduler.step()
    assert all(0 < rate <= 0.1 + 1e-12 and math.isfinite(rate) for rate in rates)


def test_too_few_steps_in_all_is_warned_before_training_with_the_flag_to_change():
    warning = recipe.few_steps_warning(recipe.choose(3_000, batch_size=512, lr=0.2, epochs=5))
    assert "only 25 optimizer steps in all" in warning and "--batch-size" in warning
    assert recipe.few_steps_warning(recipe.choose(3_000)) is None


def test_a_loss_at_chance_is_checked_only_once_warm_up_is_over_and_has_had_some_steps():
    # 30 epochs: after the ninth, past the one-cycle warm-up (a quarter of the run); photos at
    # 32 px were still near ln(10) at epoch 2 while learning.
    assert recipe.stall_check_epoch(recipe.choose(50_000)) == 9
    # 235 grayscale images: 7 steps an epoch, 86 epochs; at epoch 2 the loss was still ln(3) in warm-up.
    assert recipe.stall_check_epoch(recipe.choose(235)) == 26
    assert recipe.stall_check_epoch(recipe.choose(3_000, batch_size=512, epochs=5)) == 5
    assert recipe.stall_check_epoch(recipe.choose(3_000, epochs=3)) == 2
    assert recipe.stall_check_epoch(recipe.choose(50_000, epochs=1)) == 1


def test_a_loss_still_at_chance_after_an_epoch_is_warned_naming_the_likely_cause():
    chosen = recipe.choose(3_000, batch_size=512, lr=0.2)
    stalled = recipe.stalled_warning({"epoch": 2, "train_loss": 2.304}, 10, chosen)
    assert "ln(10) = 2.303" in stalled and "--lr 0.2" in stalled and "--batch-size 512" in stalled
    assert recipe.stalled_warning({"epoch": 2, "train_loss": 1.5}, 10, chosen) is None
    assert recipe.stalled_warning({"epoch": 2, "train_loss": 0.7}, 1, chosen) is None


def _never_timed(size: int) -> float:
    raise AssertionError(f"images of about 32 px need no timing, but {size} px was timed")


def _sizes(width: int, height: int, count: int = 5) -> tuple[list[int], list[int]]:
    return [width] * count, [height] * count


@pytest.mark.parametrize("width,height", [(32, 32), (28, 28), (8, 8), (40, 38)])
def test_images_of_about_32_px_keep_32_px_cropped_without_timing_the_device(width, height):
    chosen = recipe.choose_input("alexnet-cifar", 32, 50_000, 30, _sizes(width, height), _never_timed)
    assert (chosen.size, chosen.resize, chosen.auto) == (32, "crop", ("image_size", "resize"))
    assert f"median image {width}x{height}" in chosen.text()


def test_photos_get_the_largest_size_whose_training_fits_the_budget_on_this_device():
    def cost_of_pixels(per_pixel: float):
        return lambda size: per_pixel * size * size

    photos = _sizes(320, 240)
    fast = recipe.choose_input("alexnet-cifar", 32, 3_000, 30, photos, cost_of_pixels(1e-9))
    assert fast.size == 224  # the largest that the 240-px side fills; never upsampled
    slow = recipe.choose_input("alexnet-cifar", 32, 3_000, 30, photos, cost_of_pixels(2e-7))
    budget = recipe.RUN_BUDGET_SECONDS
    assert 2e-7 * slow.size ** 2 * 3_000 * 30 <= budget
    bigger = recipe.SIZES[recipe.SIZES.index(slow.size) + 1]
    assert 2e-7 * bigger ** 2 * 3_000 * 30 > budget and 32 < slow.size < 224
    assert slow.epoch_seconds == pytest.approx(2e-7 * slow.size ** 2 * 3_000)
    assert f"input {slow.size} px, whole image squashed (median image 320x240; " in slow.text()
    assert "an epoch estimated" in slow.text()


@pytest.mark.parametrize("train_images", [3_000, 1_000_000])
def test_where_32_px_nearly_fills_the_budget_a_size_costing_a_little_more_is_still_taken(train_images):
    # On a 2-core CPU without AMX, 30 epochs of 3,000 images take about 10 minutes at 32 px already.
    per_image = 600 / 30 / 3_000

    def cost(size: int) -> float:
        return {32: 1.0, 48: 1.05, 64: 1.1, 96: 1.3, 128: 1.45, 160: 1.7}.get(size, 3.0) * per_image

    chosen = recipe.choose_input("alexnet-cifar", 32, train_images, 30, _sizes(500, 500), cost)
    assert chosen.size == 128


def test_square_photos_are_cropped_and_an_explicit_size_or_resize_wins():
    square = recipe.choose_input("alexnet-cifar", 32, 3_000, 30, _sizes(256, 256), lambda size: 1e-9)
    assert square.resize == "crop" and square.size == 224
    given = recipe.choose_input("alexnet-cifar", 32, 3_000, 30, _sizes(320, 240), _never_timed, image_size=96,
                                resize="crop")
    assert (given.size, given.resize, given.auto) == (96, "crop", ())


def test_models_the_recipe_does_not_size_keep_their_own_input():
    paper = recipe.choose_input("alexnet", 224, 3_000, 30, _sizes(320, 240), _never_timed)
    tv = recipe.choose_input("resnet18", 224, 3_000, 30, _sizes(32, 32), _never_timed)
    assert (paper.size, tv.size) == (224, 224) and "alexnet's own" in paper.reason


def test_a_stall_on_images_much_larger_than_the_input_points_at_the_input_size():
    chosen = recipe.choose(3_000)
    shrunk = replace(chosen, input=recipe.choose_input("alexnet-cifar", 32, 3_000, 30, _sizes(320, 240),
                                                       _never_timed, image_size=32))
    stalled = recipe.stalled_warning({"epoch": 9, "train_loss": 2.30}, 10, shrunk)
    assert "(median 320x240) are shrunk to 32 px" in stalled and "--image-size 120" in stalled
    assert "shrunk" not in recipe.stalled_warning({"epoch": 9, "train_loss": 2.30}, 10, chosen)


def test_fine_tuning_takes_a_shorter_schedule_at_a_lower_rate_and_says_so():
    scratch, tuned = recipe.choose(3_000), recipe.choose(3_000, start="fine-tune")
    transfer = recipe.choose(3_000, start="transfer")
    assert tuned.batch_size == scratch.batch_size and tuned.epochs < scratch.epochs and tuned.lr < scratch.lr
    assert tuned.epochs == transfer.epochs == math.ceil(recipe.FINE_TUNE_EPOCH_SHARE * scratch.epochs)
    assert tuned.lr < transfer.lr < scratch.lr  # a fresh classifier needs its features to move further
    assert ("fine-tuning weights that know the classes: 25% of the epochs and 10% of the peak lr of a run from "
            "scratch") in tuned.line()
    assert "a fresh classifier learns them: 25% of the epochs and 50% of the peak lr" in transfer.line()
    assert "fine-tuning" not in scratch.line() and tuned.params()["recipe.start"] == "fine-tune"
    # What the user sets stays set, and the line speaks only of what it chose.
    assert "fine-tuning" not in recipe.choose(3_000, lr=0.1, epochs=4, start="fine-tune").line()


def test_a_fine_tuned_run_sees_what_its_starting_weights_were_trained_on_without_timing():
    def untimed(size):
        raise AssertionError("a fine-tuned run keeps its weights' input size; nothing to time")

    config, chosen = recipe.apply(TrainConfig(dataset_dir="d"), 3_000, ([640] * 9, [480] * 9), untimed, 32,
                                  start_config={"model": "alexnet-cifar", "image_size": 96, "resize": "squash"})
    assert (config.image_size, config.resize, chosen.start) == (96, "squash", "fine-tune")
    _, new_task = recipe.apply(TrainConfig(dataset_dir="d"), 3_000, None, untimed, 32, {"image_size": 32},
                               known_classes=0.4)
    assert new_task.start == "transfer"
    assert chosen.input.text() == ("input 96 px, whole image squashed (as its starting weights were trained; "
                                   "median image 640x480)")


def test_a_short_run_at_the_paper_stem_keeps_the_full_rate():
    def apply(width: int, height: int):
        return recipe.apply(TrainConfig(dataset_dir="d", epochs=5), 883, _sizes(width, height), lambda size: 1e-9)

    photos_config, photos = apply(320, 240)
    small_config, small = apply(32, 32)
    assert photos.input.size >= recipe.SHORT_RUN_FULL_LR_SIZE and small.input.size == 32
    assert photos.batch_size == small.batch_size == 32 and photos.total_steps < recipe.MIN_STEPS
    assert photos_config.lr == pytest.approx(0.2 * math.sqrt(32 / 512)) and not photos.short
    assert small_config.lr == pytest.approx(recipe.SHORT_RUN_LR_SHARE * photos_config.lr) and small.short
    assert "lr at" not in photos.line() and "lr at 0.5x for a run under 600 steps" in small.line()
