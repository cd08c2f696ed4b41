"""The one reader of a published dataset folder's layout: its manifest, parts and side files.

`cnnpipe.store` writes this layout; everything that reads a dataset (training, evaluation,
the champion gate) opens it here, so the format version is checked in one place:

    HOME/datasets/NAME/manifest.json        format, name, version id, classes, counts, files
    HOME/datasets/NAME/vNNNNNN/part-*.parquet
    HOME/datasets/NAME/stats/               derived statistics, e.g. colour PCA per version
    HOME/checkpoints/                       where training keeps checkpoints by default
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

FORMAT = "cnnpipe-dataset/1"
MANIFEST = "manifest.json"


class LayoutError(ValueError):
    """A dataset folder that cannot be read as this version of the layout; its message is one line."""


@dataclass(frozen=True)
class PublishedDataset:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | os.PathLike) -> PublishedDataset:
        root = Path(root)
        path = root / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise LayoutError(f"{root}: no {MANIFEST}, so it is not a dataset folder of the store") from None
        except (OSError, ValueError) as exc:
            raise LayoutError(f"{path}: unreadable ({exc}); `cnnpipe datasets show {root.name}` rebuilds it "
                              "from the versions") from None
        found = manifest.get("format") if isinstance(manifest, dict) else None
        if found != FORMAT:
            raise LayoutError(f"{path}: format {found!r} is not {FORMAT!r}, the one this cnn-pipeline reads; "
                              "use the release that wrote it, or ingest the images again")
        return cls(root, manifest)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def version_id(self) -> str:
        return self.manifest["version_id"]

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(self.root / entry["path"] for entry in self.manifest["files"])

    @property
    def stats_dir(self) -> Path:
        return self.root / "stats"

    def counts(self, split: str) -> dict[str, int]:
        """Images per class in `split`."""
        return dict(self.manifest["counts"].get(split, {}))

    def rows(self, split: str) -> int:
        return sum(self.counts(split).values())


def default_checkpoint_root(dataset_root: str | os.PathLike) -> Path:
    """HOME/checkpoints for a dataset at HOME/datasets/NAME, when the caller names no other place."""
    return Path(dataset_root).resolve().parent.parent / "checkpoints"
