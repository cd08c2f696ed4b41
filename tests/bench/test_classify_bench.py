"""bench/classify.py's CPU budget: what a run at a share of the model's rate leaves beside the model."""

from __future__ import annotations

import pytest

from bench.classify import cpu_budget


def test_a_model_that_keeps_every_core_busy_leaves_the_cores_time_over_the_slower_run():
    # 2 cores busy at 1,000 images/s: 2 ms of CPU an image. At 0.80 of that rate a run lasts 1.25 ms an
    # image, 2.5 ms of the cores' time, so 0.5 ms is left for the rest.
    assert cpu_budget(1_000, 0.002, 0.80, 2) == pytest.approx(0.0005)


def test_a_model_that_leaves_a_core_idle_leaves_that_core_too():
    assert cpu_budget(1_000, 0.001, 1.0, 2) == pytest.approx(0.001)
    assert cpu_budget(1_000, 0.002, 1.0, 2) == pytest.approx(0.0)
