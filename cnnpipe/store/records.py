"""What the store reports about a run and a dataset: rejects, staged runs, summaries, damaged parts."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Reject:
    path: str
    reason: str
    detail: str

    def line(self, source_uri: str) -> str:
        return f"{source_uri} :: {self.path}: {self.reason} ({self.detail})"


@dataclass(frozen=True)
class DamagedPart:
    path: Path | str
    version: int
    problem: str


@dataclass
class StagedRun:
    dataset: str
    source_uri: str
    base_version: int
    started_at: float
    rows: int = 0
    adopted_rows: int = 0
    duplicates: int = 0
    rejected: list[Reject] = field(default_factory=list)
    added_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    # Sum of the new rows' digests (image hash, label, split) mod 2^256: an order-free digest of
    # what this version adds, so that the same images under other labels or splits make another version id.
    content_sum: int = 0
    # The share of train/ images carved into val (0: none were), for the report.
    val_from_train: float = 0.0
    # Dot-files and __MACOSX/ members the source passed over by rule, for the report.
    hidden_skipped: int = 0
    # A relabel (`cnnpipe.store.relabel`): it adds no rows, and `added_counts` holds how its
    # changes move the counts (negative for the label an image leaves).
    relabel: bool = False
    # What a relabel changes, one dict per image: sha256, split, old_label, new_label, path.
    label_changes: list[dict] = field(default_factory=list)
    # Part name in the relabel's staging -> the committed part (path in the dataset) it replaces.
    replaces: dict[str, str] = field(default_factory=dict)
    # Entries a relabel leaves alone without refusing them: an image not in the dataset, or
    # already under the label given. Reported, never recorded in rejected.json.
    skipped: list[Reject] = field(default_factory=list)

    def add_content(self, sha256_hex: str, label: str, split: str) -> None:
        self.add_contents([(sha256_hex, label, split)])

    def add_contents(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """`add_content` for many (sha256, label, split) rows: the sum is taken modulo once."""
        total = sum(int.from_bytes(hashlib.sha256(f"{sha}\0{label}\0{split}".encode()).digest(), "big")
                    for sha, label, split in rows)
        self.content_sum = (self.content_sum + total) % 2**256

    def add_count(self, split: str, label: str, count: int = 1) -> None:
        labels = self.added_counts.setdefault(split, {})
        labels[label] = labels.get(label, 0) + count

    def to_json(self) -> dict:
        return {**asdict(self), "content_sum": f"{self.content_sum:064x}"}

    @classmethod
    def from_json(cls, value: dict) -> StagedRun:
        return cls(**{**value, "content_sum": int(value["content_sum"], 16),
                      "rejected": [Reject(**reject) for reject in value["rejected"]],
                      "skipped": [Reject(**skip) for skip in value.get("skipped", [])]})


@dataclass
class IngestSummary:
    dataset: str
    source_uri: str
    version: int
    version_id: str
    added: int
    duplicates: int
    rejected: list[Reject]
    added_counts: dict[str, dict[str, int]]
    counts: dict[str, dict[str, int]]
    total_rows: int
    seconds: float
    val_from_train: float = 0.0
    hidden_skipped: int = 0
    relabelled: list[dict] = field(default_factory=list)
    skipped: list[Reject] = field(default_factory=list)

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        return dict(Counter(reject.reason for reject in self.rejected).most_common())

    def relabel_lines(self) -> list[str]:
        """What a relabel changed and left alone, one line an image, for the report."""
        lines = []
        if self.relabelled:
            lines += ["", f"**{len(self.relabelled):,} relabelled** (split kept):", ""]
            lines += [f"- `{change['path']}` (sha256 {change['sha256'][:12]}…, {change['split']}): "
                      f"{change['old_label']} -> {change['new_label']}" for change in self.relabelled]
        if self.skipped:
            lines += ["", "**Not relabelled**", ""]
            lines += [f"- `{skip.path}`: {skip.reason} ({skip.detail})" for skip in self.skipped]
        return lines
