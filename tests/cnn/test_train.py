from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cnn import device as device_module
from cnn import failpoints, loop, runs, train
from cnn.checkpoint import (CheckpointError, CheckpointRefused, CheckpointWriter, checkpoints, load_checkpoint,
                            load_latest, newest_readable, restore_rng_state, rng_state, save_checkpoint)
from cnn.augment import LIGHTING_STD, Augment, ColourStats
from cnn.config import TrainConfig
from cnn.loaders import ResidentImages
from cnn.runs import load_trained_model
from cnn.train import fit


def tiny_config(dataset: Path, root: Path, **overrides) -> TrainConfig:
    # Small and quick: with `tiny_shapes_dataset`, two steps of batch 32 an epoch.
    defaults = dict(dataset_dir=str(dataset), epochs=2, batch_size=32, lr=0.01, dropout=0.2, device="cpu",
                    checkpoint_root=str(root))
    return TrainConfig(**{**defaults, **overrides})


@pytest.mark.slow
def test_same_seed_same_first_epoch_loss(tiny_shapes_dataset, tmp_path):
    first = fit(tiny_config(tiny_shapes_dataset, tmp_path / "a", epochs=1))
    second = fit(tiny_config(tiny_shapes_dataset, tmp_path / "b", epochs=1))
    third = fit(tiny_config(tiny_shapes_dataset, tmp_path / "c", epochs=1, seed=1))
    assert first.history[0]["train_loss"] == second.history[0]["train_loss"]
    assert first.history[0]["train_loss"] != third.history[0]["train_loss"]


@pytest.mark.slow
def test_checkpoint_round_trip_and_resume_equivalence(tiny_shapes_dataset, tmp_path, monkeypatch):
    straight = fit(tiny_config(tiny_shapes_dataset, tmp_path / "straight", epochs=2))
    monkeypatch.setenv("FAILPOINT", "train.after_checkpoint")
    monkeypatch.setenv("FAILPOINT_ACTION", "raise")
    with pytest.raises(RuntimeError, match="failpoint"):
        fit(tiny_config(tiny_shapes_dataset, tmp_path / "resumed", epochs=2))
    monkeypatch.delenv("FAILPOINT")
    resumed = fit(tiny_config(tiny_shapes_dataset, tmp_path / "resumed", epochs=2, resume=True))
    assert len(list((tmp_path / "resumed").rglob("done"))) == 1
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    a = torch.load(straight.checkpoint, weights_only=True)["model"]
    b = torch.load(resumed.checkpoint, weights_only=True)["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)

    model, state = load_trained_model(straight.checkpoint)
    again, _ = load_trained_model(straight.checkpoint)
    inputs = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(inputs), again(inputs))
    assert state["classes"] == straight.classes == ["circle", "cross", "square", "triangle"]
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "config", "dataset_version", "git_sha"} <= set(state)


def _brightness_classes(size: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes told apart by brightness under pixel noise: quick to learn, and misread by a
    model whose input is on the wrong scale, as real photographs are."""
    labels = torch.arange(4).repeat_interleave(per_class)
    noise = torch.randn(len(labels), 3, size, size, generator=torch.Generator().manual_seed(seed)) * 20
    return (40 + 60 * labels[:, None, None, None] + noise).clamp(0, 255).to(torch.uint8), labels


@pytest.mark.parametrize("crop, stored", [(32, 32), (224, 256)])
def test_ten_patch_accuracy_is_close_to_the_centre_crop_on_a_trained_model(crop, stored):
    torch.manual_seed(0)
    images, labels = _brightness_classes(stored, 16, seed=1)
    stats = ColourStats.from_images(images)
    augment = Augment(stats, crop, pad=crop // 8 if stored == crop else 0, lighting=0.0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        for batch, targets in ResidentImages(images, labels).batches(16, generator):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(augment(batch, generator)), targets).backward()
            optimizer.step()
    held_out = ResidentImages(*_brightness_classes(stored, 16, seed=2))
    centre = loop.evaluate(model, held_out.batches(32), stats, crop)["top1"]
    ten = loop.evaluate(model, held_out.batches(32), stats, crop, ten_crop=True)["top1"]
    assert centre > 0.9  # the model learned, so patches on the wrong scale would show
    assert abs(ten - centre) <= 0.05


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_is_the_dtype_training_and_evaluation_compute_in(precision, dtype):
    images, labels = _brightness_classes(32, 4, seed=0)
    stats = ColourStats.from_images(images)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 4))
    seen = []
    model[-1].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    batches = list(ResidentImages(images, labels).batches(16, generator))
    loop.train_one_epoch(model, batches, Augment(stats, 32, lighting=0.0), optimizer, None, generator,
                         precision=precision)
    loop.evaluate(model, batches, stats, 32, precision=precision)
    assert seen == [dtype, dtype]


def test_small_images_train_on_padded_crops_without_lighting_and_large_ones_as_in_the_paper():
    stats = ColourStats(mean=[0.5] * 3, std=[0.25] * 3, eigenvalues=[0.2, 0.02, 0.002], eigenvectors=torch.eye(3).tolist())
    small, large = train.augmentation(stats, 32, 32), train.augmentation(stats, 224, 256)
    assert (small.pad, small.lighting) == (4, 0.0)
    assert (large.pad, large.lighting) == (0, LIGHTING_STD)
    images = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    # Without lighting, a flat image stays flat whatever crop and flip it gets.
    assert small(images, torch.Generator().manual_seed(0)).std() < 1e-5


def test_a_training_step_copies_no_host_data_to_the_device(monkeypatch):
    """On CUDA a tensor built from Python data is a blocking copy; the colour statistics once
    cost four per step. Counted on the CPU: an epoch builds as many such tensors for 6 batches as for 2."""
    images, labels = _brightness_classes(32, 12, seed=0)
    built = []

    def counted(make):
        def counting(*args, **kwargs):
            built.append(make)
            return make(*args, **kwargs)
        return counting

    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, counted(getattr(torch, name)))

    def tensors_built_in_an_epoch(batches: int) -> int:
        stats = ColourStats.from_images(images)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(8, 4))
        generator = torch.Generator().manual_seed(0)
        epoch = list(ResidentImages(images, labels).batches(8, generator))[:batches]
        built.clear()
        loop.train_one_epoch(model, epoch, Augment(stats, 32, pad=4), torch.optim.SGD(model.parameters(), lr=0.01),
                             None, generator)
        loop.evaluate(model, epoch, stats, 32)
        return len(built)

    assert tensors_built_in_an_epoch(6) == tensors_built_in_an_epoch(2)


def test_the_precision_a_run_uses_is_said_and_a_bad_one_refused(tmp_path):
    assert device_module.precision_line(TrainConfig(str(tmp_path), device="cpu", precision="fp32")) == \
        "precision: fp32 on cpu (set)"
    automatic = device_module.precision_line(TrainConfig(str(tmp_path), device="cpu"))
    expected = "bf16 autocast on cpu (auto: this CPU has AMX)" if device_module.cpu_has_amx() else \
        "fp32 on cpu (auto: this CPU has no AMX)"
    assert automatic == f"precision: {expected}"
    with pytest.raises(ValueError, match="--precision must be one of auto, bf16, fp32, not 'fp16'"):
        TrainConfig(str(tmp_path), precision="fp16")


def test_the_memory_budget_is_a_share_of_what_the_device_has_free_and_is_said(shapes_dataset, tmp_path,
                                                                              monkeypatch):
    gib = 2**30
    monkeypatch.setattr(device_module.psutil, "virtual_memory", lambda: SimpleNamespace(available=10 * gib))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * gib, 141 * gib))
    assert device_module.memory_budget(torch.device("cpu")) == (4096, "auto: 40% of the 10.0 GB of RAM available")
    assert device_module.memory_budget(torch.device("cuda", 0)) == (40960, "auto: 40% of the 100.0 GB free on cuda:0")
    assert device_module.memory_budget(torch.device("cuda", 0), 2048) == (2048, "set")
    assert device_module.memory_budget_line(TrainConfig(str(tmp_path), device="cpu")) == (
        "memory budget: 4096 MB a split, decoded once into cpu memory within it and streamed from Parquet beyond "
        "it (auto: 40% of the 10.0 GB of RAM available)")

    budgets = []

    def first_split(split, size, device, budget_mb, shard=None, fit="crop"):
        budgets.append(budget_mb)
        raise InterruptedError

    monkeypatch.setattr(train, "_load_split", first_split)
    with pytest.raises(InterruptedError):
        fit(tiny_config(shapes_dataset, tmp_path))
    assert budgets == [4096]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "epoch-0001.pt", "wb") as handle:
        pickle.dump({"model": _Payload(marker)}, handle)
    with pytest.raises(CheckpointRefused, match="refused"):
        load_checkpoint(run_dir / "epoch-0001.pt")
    with pytest.raises(CheckpointRefused, match="refused"):
        load_latest(run_dir)
    assert not marker.exists()


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from cnn.checkpoint import save_checkpoint

    for epoch in (1, 2, 3, 4):
        save_checkpoint({"epoch": epoch, "weights": torch.full((3,), float(epoch))}, tmp_path, epoch, keep=3)
    assert [p.name for p in checkpoints(tmp_path)] == ["epoch-0002.pt", "epoch-0003.pt", "epoch-0004.pt"]
    latest = tmp_path / "epoch-0004.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="epoch-0004.pt"):
        load_checkpoint(latest)
    state, path = load_latest(tmp_path)
    assert state["epoch"] == 3 and path.name == "epoch-0003.pt"
    (_, _, skipped) = newest_readable(tmp_path)
    assert len(skipped) == 1 and skipped[0].startswith(f"{latest}: unreadable checkpoint (")


def test_a_checkpoint_is_written_in_the_background_from_the_state_at_save(tmp_path, monkeypatch):
    disk_free = threading.Event()
    write = torch.save
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (disk_free.wait(60), write(*args, **kwargs)))
    weights, history = torch.zeros(3), [{"epoch": 1}]
    with CheckpointWriter() as writer:
        path = writer.save({"weights": weights, "history": history}, tmp_path, 1)
        assert not path.exists()  # save returned while the disk still holds the write up
        weights += 1  # training goes on in place
        history.append({"epoch": 2})
        disk_free.set()
    state = load_checkpoint(path)
    assert torch.equal(state["weights"], torch.zeros(3)) and state["history"] == [{"epoch": 1}]
    assert checkpoints(tmp_path) == [path] and not list(tmp_path.glob(".*.tmp"))


def test_a_failed_background_write_is_raised_and_never_published(tmp_path, monkeypatch):
    failpoints.reset()
    monkeypatch.setenv("FAILPOINT", "ckpt.before_replace")
    monkeypatch.setenv("FAILPOINT_ACTION", "enospc")
    with pytest.raises(CheckpointError, match=f"^disk full while writing checkpoint {tmp_path / 'epoch-0001.pt'} "):
        with CheckpointWriter() as writer:
            writer.save({"epoch": 1}, tmp_path, 1)
    assert checkpoints(tmp_path) == [] and not list(tmp_path.glob(".*.tmp"))
    # A run that fails for its own reason still waits for the write, and says it failed too.
    failpoints.reset()
    with pytest.raises(KeyError) as raised:
        with CheckpointWriter() as writer:
            writer.save({"epoch": 1}, tmp_path, 1)
            raise KeyError("the run's own error")
    assert raised.value.__notes__[0].startswith("and the last checkpoint did not write: CheckpointError: disk full ")


def test_a_disk_filling_up_inside_torch_save_is_said_as_such_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def fill_the_disk(state, handle):
        handle.write(b"half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:  # as torch 2.14 reports a write that failed part-way, seen on a full tmpfs
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 39056960 vs 39056848")

    monkeypatch.setattr(torch, "save", fill_the_disk)
    with pytest.raises(CheckpointError, match=f"^disk full while writing checkpoint {tmp_path / 'epoch-0001.pt'} "):
        save_checkpoint({"epoch": 1}, tmp_path, 1)
    assert not list(tmp_path.iterdir())


def test_the_git_sha_is_read_once_per_process(monkeypatch):
    train._git_sha.cache_clear()
    calls = []
    run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: (calls.append(args), run(*args, **kwargs))[1])
    assert train._git_sha() == train._git_sha()
    assert len(calls) == 1


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_resume_hands_the_rng_restore_cpu_byte_tensors_wherever_the_model_lives(tmp_path, monkeypatch):
    def parts(device: str):
        model = torch.nn.Linear(4, 2, device=device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1)

    model, optimizer, scheduler = parts("cpu")
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": rng_state(torch.Generator())}, tmp_path, 1)
    handed = []

    def spy(state, generator):
        handed.append(state)
        restore_rng_state(state, generator)

    monkeypatch.setattr(runs, "restore_rng_state", spy)
    # A model on the meta device stands in for one on a GPU: a checkpoint loaded to where the
    # model lives hands the RNG setters tensors they refuse.
    on_meta = parts("meta")
    runs.restore_latest(tmp_path, *on_meta, torch.Generator())
    (state,) = handed
    states = [state["torch"], state["generator"], *state["cuda"]]
    assert all(s.device.type == "cpu" and s.dtype == torch.uint8 for s in states)
    assert state["numpy"][1].device.type == "cpu"
    assert on_meta[1].state_dict()["state"][0]["momentum_buffer"].is_meta  # the optimizer state did move


@pytest.mark.slow
def test_smoke_training_learns_clearly_above_chance(trained_on_shapes):
    result = trained_on_shapes  # the automatic recipe, 15 epochs on the shapes
    assert result.held_out_split == "test"
    assert result.best_val_top1 > 0.5  # four classes: chance is 0.25
    assert result.held_out["top1"] > 0.45 and result.held_out["images"] == 80
    report = result.extra["report"]
    assert report["top1"] == pytest.approx(result.held_out["top1"])
    assert sum(map(sum, report["confusion_matrix"])) == 80 and len(report["per_class"]) == 4
    wrong = round((1 - result.held_out["top1"]) * 80)
    assert len(result.mistakes) == min(wrong, 25) and "mistakes" not in report
    assert all(m["predicted"] != m["target"] and m["image"].dtype == torch.uint8 for m in result.mistakes)
    # The reference profile drift is measured against: the same 80 held-out images, calibrated on val.
    reference = result.reference
    assert reference["images"] == 80 and 0.05 < reference["temperature"] < 20
    assert sum(row["true_share"] for row in reference["classes"]) == pytest.approx(1)
    assert [row["true_share"] for row in reference["classes"]] == pytest.approx(
        [sum(row) / 80 for row in report["confusion_matrix"]])
    assert sum(row["share"] for row in reference["confidence_bins"]) == pytest.approx(1)
    assert reference["width"]["p50"] > 0 and 0 < reference["brightness"]["mean"] < 1


def _fit_script(dataset: Path, root: Path, epochs: int, device: str) -> str:
    """A child process that trains, resuming when given an argument."""
    return (
        "import sys\nfrom cnn.config import TrainConfig\nfrom cnn.train import fit\n"
        f"fit(TrainConfig(dataset_dir={str(dataset)!r}, epochs={epochs}, batch_size=32, lr=0.01, dropout=0.2,"
        f" device={device!r}, checkpoint_root={str(root)!r}, resume=len(sys.argv) > 1))\n"
    )


@pytest.mark.slow
@pytest.mark.crash
def test_sigkill_while_checkpointing_then_resume(tiny_shapes_dataset, tmp_path):
    script = _fit_script(tiny_shapes_dataset, tmp_path, 3, "cpu")
    env = {**os.environ, "FAILPOINT": "ckpt.before_replace", "FAILPOINT_AFTER": "2", "FAILPOINT_ACTION": "kill"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (run_dir,) = (tmp_path / "shapes__alexnet-cifar").iterdir()
    assert [p.name for p in checkpoints(run_dir)] == ["epoch-0001.pt"]
    assert list(run_dir.glob(".*.tmp"))  # the half-published second checkpoint
    resumed = subprocess.run([sys.executable, "-c", script, "resume"], capture_output=True, text=True, timeout=300,
                             env={k: v for k, v in os.environ.items() if not k.startswith("FAILPOINT")})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [p.name for p in checkpoints(run_dir)] == ["epoch-0001.pt", "epoch-0002.pt", "epoch-0003.pt"]
    assert not list(run_dir.glob(".*.tmp")) and (run_dir / "done").exists()
    assert torch.load(run_dir / "epoch-0003.pt", weights_only=True)["epoch"] == 3


@pytest.mark.device
@pytest.mark.crash
def test_a_cuda_run_killed_after_a_checkpoint_resumes_to_the_end(tiny_shapes_dataset, tmp_path):
    script = _fit_script(tiny_shapes_dataset, tmp_path, 2, "cuda")
    # Killed in the writer thread once the first checkpoint is published: the training thread
    # does not wait for the write, so a kill there could land before it.
    env = {**os.environ, "FAILPOINT": "ckpt.after_publish", "FAILPOINT_ACTION": "kill"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (run_dir,) = (tmp_path / "shapes__alexnet-cifar").iterdir()
    assert [p.name for p in checkpoints(run_dir)] == ["epoch-0001.pt"]
    resumed = subprocess.run([sys.executable, "-c", script, "resume"], capture_output=True, text=True, timeout=300,
                             env={k: v for k, v in os.environ.items() if not k.startswith("FAILPOINT")})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [p.name for p in checkpoints(run_dir)] == ["epoch-0001.pt", "epoch-0002.pt"]
    assert (run_dir / "done").exists()


@pytest.mark.slow
def test_early_stopping_on_validation_top1(tiny_shapes_dataset, tmp_path):
    # LRN, which keeps no running statistics: at this lr validation top-1 stays exactly where it was.
    result = fit(tiny_config(tiny_shapes_dataset, tmp_path, epochs=6, lr=1e-12, schedule="step", patience=1,
                             norm="lrn"))
    assert result.stopped_early and result.epochs_run == 3


def test_out_of_memory_fails_fast_with_advice_and_no_checkpoint(shapes_dataset, tmp_path, monkeypatch):
    from cnn.model import AlexNet

    def no_memory(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(AlexNet, "forward", no_memory)
    with pytest.raises(RuntimeError, match="try --batch-size 16"):
        fit(tiny_config(shapes_dataset, tmp_path, epochs=2))
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.slow
def test_a_split_over_the_memory_budget_streams_from_parquet(tiny_shapes_dataset, tmp_path):
    resident = fit(tiny_config(tiny_shapes_dataset, tmp_path / "resident", epochs=1))
    streamed = fit(tiny_config(tiny_shapes_dataset, tmp_path / "streamed", epochs=1, memory_budget_mb=0))
    # Same images and labels, in a different order: both learn, and both see every image.
    assert streamed.held_out["images"] == resident.held_out["images"] == 16
    assert streamed.history[0]["train_loss"] != resident.history[0]["train_loss"]
    assert 0.0 < streamed.history[0]["train_accuracy"] <= 1.0
