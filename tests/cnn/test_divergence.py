"""`train_one_epoch` stops a run whose loss or weights become nan or infinite, naming the step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cnn.loop import STEPS_PER_REPORT, TrainingDiverged, train_one_epoch


def batches(count: int, poisoned: int | None = None):
    """`count` batches of 4 two-feature points; the `poisoned`-th (from 1) holds a nan."""
    generator = torch.Generator().manual_seed(0)
    for step in range(1, count + 1):
        images = torch.randn(4, 2, generator=generator)
        if step == poisoned:
            images[0, 0] = math.nan
        yield images, torch.tensor([0, 1, 0, 1])


def epoch(count: int, poisoned: int | None = None, lr: float = 0.1, on_step=None) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    return train_one_epoch(model, batches(count, poisoned), lambda images, generator: images, optimizer, scheduler,
                           torch.Generator(), on_step=on_step)


def test_a_finite_epoch_trains_as_before():
    assert math.isfinite(epoch(12)["train_loss"])


@pytest.mark.parametrize("reported", [False, True])
def test_a_nan_loss_stops_the_epoch_naming_the_first_step_it_appeared_in(reported):
    seen = []
    with pytest.raises(TrainingDiverged) as diverged:
        epoch(3 * STEPS_PER_REPORT, poisoned=3, on_step=seen.append if reported else None)
    assert str(diverged.value) == "the loss became nan at step 3 of the epoch"
    # With progress reports it stops at the first report instead of at the epoch's end.
    assert seen == []


def test_weights_broken_by_the_epochs_last_update_stop_it_though_every_loss_was_finite():
    with pytest.raises(TrainingDiverged, match="^the weights became nan or infinite at step 1 of the epoch$"):
        epoch(1, lr=math.inf)
