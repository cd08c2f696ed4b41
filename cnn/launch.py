"""Run `fit` as DDP over several processes on this machine, through torchrun.

    result = fit_distributed(config, nproc=4, on_epoch=print)

Each process runs `python -m cnn.train CONFIG.json RESULT.json`; rank 0 prints one JSON
line per epoch, which arrives here as `on_epoch(record)` while training goes on. On more
than one machine, run the same module under torchrun on each (see deploy/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from cnn.config import TrainConfig
from cnn.train import FitResult


def fit_distributed(config: TrainConfig, nproc: int, on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    if nproc < 2:
        raise ValueError("fit_distributed needs at least 2 processes; call fit for one")
    with tempfile.TemporaryDirectory(prefix="cnnpipe-ddp-") as scratch:
        config_path, result_path = Path(scratch) / "config.json", Path(scratch) / "result.json"
        config_path.write_text(json.dumps(asdict(config)))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "cnn.train", str(config_path), str(result_path)]
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as launcher:
            for line in launcher.stdout:
                record = _epoch_record(line)
                if record is None:
                    sys.stdout.write(line)
                elif on_epoch is not None:
                    on_epoch(record)
        if launcher.returncode != 0:
            raise RuntimeError(f"torchrun with {nproc} processes failed (exit {launcher.returncode}); "
                               "its output is above")
        result = FitResult(**json.loads(result_path.read_text()))
        mistakes = result_path.with_suffix(".mistakes.pt")
        result.mistakes = torch.load(mistakes, weights_only=True) if mistakes.exists() else []
        return result


def _epoch_record(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if "epoch" in record and "val_top1" in record else None
