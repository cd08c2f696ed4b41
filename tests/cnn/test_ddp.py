"""DDP on the CPU: two gloo processes under torchrun follow the same loss curve as one process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, dataset: Path, root: Path, **overrides) -> Path:
    # LRN rather than batch norm (SyncBatchNorm needs a GPU) and no dropout (its masks are
    # drawn per process), and fp32, whose noise is far smaller than bf16's on half batches, so
    # one process and two must agree up to floating-point noise.
    path.write_text(json.dumps({"dataset_dir": str(dataset), "epochs": 2, "batch_size": 32, "lr": 0.01,
                                "norm": "lrn", "dropout": 0.0, "device": "cpu", "precision": "fp32",
                                "checkpoint_root": str(root), **overrides}))
    return path


def test_two_gloo_processes_match_one(tiny_shapes_dataset, tmp_path):
    single_config = write_config(tmp_path / "single.json", tiny_shapes_dataset, tmp_path / "single")
    ddp_config = write_config(tmp_path / "ddp.json", tiny_shapes_dataset, tmp_path / "ddp")
    single = subprocess.run([sys.executable, "-m", "cnn.train", str(single_config), str(tmp_path / "one.json")],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          "-m", "cnn.train", str(ddp_config), str(tmp_path / "two.json")],
                         capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert len(one["history"]) == len(two["history"]) == 2
    for a, b in zip(one["history"], two["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-2)
    assert one["history"][0]["train_loss"] != one["history"][1]["train_loss"]
    assert len(list((tmp_path / "ddp").rglob("epoch-*.pt"))) == 2  # the leader alone checkpoints


def test_two_gloo_processes_streaming_a_split_each_decode_their_share_and_finish(shapes_dataset, tmp_path):
    """A 1 MB budget streams the shapes; each rank then trains on its own row groups, in step."""
    config = write_config(tmp_path / "ddp.json", shapes_dataset, tmp_path / "ddp", memory_budget_mb=1)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          "-m", "cnn.train", str(config), str(tmp_path / "two.json")],
                         capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    history = json.loads((tmp_path / "two.json").read_text())["history"]
    assert len(history) == 2 and all(epoch["train_loss"] > 0 for epoch in history)
