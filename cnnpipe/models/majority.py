"""The majority-class test of the champion gate: does a val top-1 clearly beat always answering
the validation split's largest class? An exact binomial tail, without scipy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cnn.layout import PublishedDataset

# A challenger must beat always answering the validation split's largest class, by a one-sided
# exact binomial test at this level, before it can become champion.
MAJORITY_ALPHA = 0.01


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly, without scipy.

    Terms are computed in log space (`math.lgamma`) and summed from the largest one in the
    wanted direction outwards, stopping once they no longer change the sum, so n in the
    millions costs a few thousand terms. Below the mode the upper tail is one minus the
    lower tail, summed the same way.
    """
    if n < 0 or not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"binomial_tail needs n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)

    def log_term(j: int) -> float:
        return log_n - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_p + (n - j) * log_q

    def summed(start: int, stop: int, step: int) -> float:
        # Terms shrink monotonically away from the mode, so the first one is the largest.
        first, total = log_term(start), 0.0
        for j in range(start, stop, step):
            ratio = math.exp(log_term(j) - first)
            total += ratio
            if ratio < 1e-17 * total:
                break
        return math.exp(first) * total if first > -745.0 else 0.0

    mode = math.floor((n + 1) * p)
    if k > mode:
        return min(1.0, summed(k, n + 1, 1))
    return min(1.0, max(0.0, 1.0 - summed(k - 1, -1, -1)))


def majority_baseline(dataset_dir: Path) -> tuple[int, float, str]:
    """(n, majority-class share, split name) of the split the gate's val top-1 was measured on.

    The split is the one `cnn.splits.validation_split` picks (`val`, or `test` without one);
    the counts come from the dataset's manifest.
    """
    from cnn.splits import validation_split

    dataset = PublishedDataset.open(dataset_dir)
    split = validation_split(dataset_dir, dataset.classes).split
    counts = dataset.counts(split)
    n = int(sum(counts.values()))
    return n, (max(counts.values()) / n if n else 0.0), split


@dataclass(frozen=True)
class MajorityTest:
    """Whether a val top-1 clearly beats always answering the split's largest class."""

    top1: float
    n: int
    majority_rate: float
    split: str
    correct: int
    p_value: float
    passed: bool
    clause: str  # "clearly beats the majority-class rate ..." or "does not clearly beat ..."

    def tags(self) -> dict[str, str]:
        return {"gate.val_top1": f"{self.top1:.6f}", "gate.majority_rate": f"{self.majority_rate:.6f}",
                "gate.val_images": str(self.n), "gate.val_split": self.split, "gate.val_correct": str(self.correct),
                "gate.p_value": f"{self.p_value:.6g}", "gate.beats_majority": str(self.passed).lower()}


def majority_test(top1: float, dataset_dir: Path, alpha: float = MAJORITY_ALPHA) -> MajorityTest:
    """One-sided exact binomial test: with k = round(top1 * n) correct out of n, pass only if
    P(X >= k | X ~ Binomial(n, majority rate)) < alpha."""
    try:
        n, rate, split = majority_baseline(dataset_dir)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        return MajorityTest(top1, 0, math.nan, "", 0, math.nan, False,
                            f"cannot be compared with the majority class: the validation split's class counts "
                            f"in {Path(dataset_dir) / 'manifest.json'} are unreadable ({exc})")
    images = f"{n} validation images" + ("" if split == "val" else f" (the {split} split)")
    if n == 0:
        return MajorityTest(top1, 0, rate, split, 0, math.nan, False,
                            f"cannot be compared with the majority class: the {split} split has no images")
    if not math.isfinite(top1):
        return MajorityTest(top1, n, rate, split, 0, math.nan, False,
                            f"is not a number, so does not beat the majority-class rate {rate:.4f} of {images}")
    correct = min(n, max(0, round(top1 * n)))
    p_value = binomial_tail(correct, n, rate)
    passed = p_value < alpha
    verdict = "clearly beats" if passed else "does not clearly beat"
    clause = (f"{verdict} the majority-class rate {rate:.4f} of {images} "
              f"(binomial p={p_value:.2g} {'<' if passed else '>='} {alpha:g})")
    return MajorityTest(top1, n, rate, split, correct, p_value, passed, clause)
