"""Waiting on the shards of a job: no future is dropped, no failed shard is hidden."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

from flows.sharding import SHARD_ATTEMPTS, run_shards

pytest.importorskip("prefect_ray", reason="the ray extra is not installed")

FLOWS = Path(__file__).resolve().parents[2] / "flows"


class Settled:
    """A future that has already finished, with a value or an error."""

    def __init__(self, value=None, error: Exception | None = None):
        self.value, self.error = value, error

    def result(self):
        if self.error:
            raise self.error
        return self.value


def test_results_keep_shard_order_and_a_shard_that_failed_once_runs_again():
    attempts: Counter[int] = Counter()

    def submit(index: int) -> Settled:
        attempts[index] += 1
        died = index == 1 and attempts[index] == 1
        return Settled(error=RuntimeError("worker died")) if died else Settled(index * 10)

    assert run_shards(submit, 3) == [0, 10, 20]
    assert attempts == {0: 1, 1: 2, 2: 1}


def test_a_shard_that_keeps_failing_fails_the_run_and_is_named():
    attempts: Counter[int] = Counter()

    def submit(index: int) -> Settled:
        attempts[index] += 1
        return Settled(error=RuntimeError("bad shard")) if index == 2 else Settled(index)

    with pytest.raises(RuntimeError, match=rf"shards \[2\] of 3 failed {SHARD_ATTEMPTS} times"):
        run_shards(submit, 3)
    assert attempts == {0: 1, 1: 1, 2: SHARD_ATTEMPTS}


def test_every_future_in_the_flows_is_waited_on_by_run_shards():
    """A future nobody waits on lets a flow end Completed while its task failed (Prefect #16373)."""
    trees = {path.name: ast.parse(path.read_text()) for path in sorted(FLOWS.glob("*.py"))}
    submits, waited = [], []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Attribute) and node.func.attr in ("submit", "map"):
                submits.append((name, node))
            if isinstance(node.func, ast.Name) and node.func.id == "run_shards":
                waited += [inner for argument in node.args for inner in ast.walk(argument)]
    assert submits, "the flows submit shards; this check should find them"
    assert [(name, node.lineno) for name, node in submits if not any(node is w for w in waited)] == []
