"""Checkpoints that load with `torch.load(weights_only=True)` and survive kill -9.

A checkpoint holds only tensors and primitives: model, optimizer and scheduler state,
epoch, every RNG state (Python's and NumPy's as plain tuples and tensors), the config,
the dataset version and the git SHA. It is written beside its final name, fsynced and
renamed; the last `keep` epochs stay, so a corrupt latest file falls back to an older one.
`CheckpointWriter` does that in a background thread, so training does not wait for the disk.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cnn.config import TrainConfig, flag
from cnn.failpoints import failpoint
from cnn.model import NATIVE_SIZES


class CheckpointError(Exception):
    pass


class CheckpointRefused(CheckpointError):
    """A file that is not a plain checkpoint: never loaded, and never skipped for an older one."""


def rng_state(generator: torch.Generator | None = None) -> dict:
    numpy_kind, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (numpy_kind, torch.from_numpy(numpy_keys.astype(np.int64)), numpy_pos, numpy_has_gauss, numpy_gauss),
        "python": (python_version, list(python_state), python_gauss),
        "generator": generator.get_state() if generator is not None else None,
    }


def restore_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Restore every RNG; a state that does not fit is an error, never silently skipped."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, python_state, python_gauss = state["python"]
    random.setstate((version, tuple(python_state), python_gauss))
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])


def save_checkpoint(state: dict, run_dir: Path, epoch: int, keep: int = 3) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, epoch)
    tmp = run_dir / f".{final.name}.tmp"
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        failpoint("ckpt.after_tmp_write")
        failpoint("ckpt.before_replace")
        os.replace(tmp, final)
    except BaseException as exc:
        # A partial checkpoint is never resumed from, and on a full disk its tens of MB are
        # the space MLflow needs to record that the run failed.
        tmp.unlink(missing_ok=True)
        if full := _disk_full(exc):
            raise CheckpointError(f"disk full while writing checkpoint {final} ({full.strerror}): the partial file "
                                  "is removed and the checkpoints of finished epochs are intact; free space on that "
                                  "disk and resume the run") from exc
        raise
    directory = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    for old in checkpoints(run_dir)[:-keep]:
        old.unlink()
    failpoint("ckpt.after_publish")
    return final


def _disk_full(error: BaseException | None) -> OSError | None:
    # torch.save may raise its own RuntimeError ("unexpected pos ...") over the write's OSError.
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


class CheckpointWriter:
    """`save` copies the state to CPU memory and returns; a background thread writes it.

    One write at a time: `save` and `wait` first join the previous one and raise its error.
    Used as a context manager it joins on the way out, also when the body fails, so a run that
    stops still leaves its last checkpoint published; that write's own error then becomes a
    note on the body's exception instead of hiding it.
    """

    def __init__(self) -> None:
        self._writing: threading.Thread | None = None
        self._failure: BaseException | None = None

    def save(self, state: dict, run_dir: Path, epoch: int, keep: int = 3) -> Path:
        """Where the checkpoint will be published, once `wait` returns."""
        self.wait()
        # Taken now: the parameters, optimizer buffers and history change in place as training goes on.
        snapshot = _cpu_copy(state)

        def write() -> None:
            try:
                save_checkpoint(snapshot, run_dir, epoch, keep)
            except BaseException as exc:  # noqa: BLE001 - raised in the training thread by `wait`
                self._failure = exc

        self._writing = threading.Thread(target=write, name=f"cnn-checkpoint-{epoch}")
        self._writing.start()
        return checkpoint_path(run_dir, epoch)

    def wait(self) -> None:
        if self._writing is not None:
            self._writing.join()
            self._writing = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            self.wait()
        except BaseException as failure:
            if error is None:
                raise
            error.add_note(f"and the last checkpoint did not write: {type(failure).__name__}: {failure}")


def _cpu_copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_cpu_copy(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_cpu_copy(item) for item in value)
    return value


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / f"epoch-{epoch:04d}.pt"


def checkpoints(run_dir: Path) -> list[Path]:
    """Published checkpoints of a run, oldest first."""
    return sorted(p for p in run_dir.glob("epoch-*.pt") if re.fullmatch(r"epoch-\d{4}\.pt", p.name))


def load_checkpoint(path: Path) -> dict:
    """Load safely: tensors and primitives only. A pickle with code in it is refused.

    Always onto the CPU, whatever device trains: the RNG setters accept only CPU byte
    tensors, and `load_state_dict` moves weights and optimizer state to their parameters."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointRefused(f"{path}: refused, it is not a plain checkpoint "
                                f"(a weights-only load failed: {_unpickler_reason(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = "it ends early" if isinstance(exc, EOFError) else _first_line(exc)
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason})") from None
    except (IndexError, KeyError, TypeError):  # how torch's reader fails on an empty file or a text file
        raise CheckpointError(f"{path}: unreadable checkpoint (not a file that torch.save wrote)") from None


def _first_line(exc: Exception) -> str:
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _unpickler_reason(exc: Exception) -> str:
    """The unpickler's own reason, without torch's advice to load the file with weights_only off:
    that runs any code the file holds."""
    _, found, reason = str(exc).partition("WeightsUnpickler error:")
    return _first_line(Exception(reason)) if found else _first_line(exc)


def newest_readable(run_dir: Path) -> tuple[dict, Path, list[str]] | None:
    """The newest checkpoint that loads, falling back past corrupt ones, and why each newer one
    was skipped; None if there is none."""
    errors = []
    for path in reversed(checkpoints(run_dir)):
        try:
            return load_checkpoint(path), path, errors
        except CheckpointRefused:
            raise
        except CheckpointError as exc:
            errors.append(str(exc))
    if errors:
        raise CheckpointError("no readable checkpoint: " + "; ".join(errors))
    return None


def load_latest(run_dir: Path) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads, falling back past corrupt ones; None if there is none."""
    for stale in run_dir.glob(".*.tmp"):
        stale.unlink()
    found = newest_readable(run_dir)
    return found[:2] if found else None


# What a resumed run keeps from its start. Its weights, optimizer, scheduler and RNG states are
# restored from the checkpoint, so another value of one of these would fail to load, crash the
# schedule once its steps run out ("Tried to step 31 times"), or be silently ignored.
RUN_DEFINING = ("model", "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "label_smoothing",
                "norm", "padding", "pool", "dropout", "seed", "image_size", "resize")


@dataclass
class Resumption:
    """Where a resumed run really continues: its newest checkpoint that loads, and the newer ones skipped."""

    run_dir: Path
    checkpoint: Path
    epoch: int
    started_with: dict
    dataset_version: str | None
    skipped: list[str]

    @classmethod
    def of(cls, run_dir: Path) -> Resumption:
        found = newest_readable(run_dir)
        if found is None:
            raise CheckpointError(f"nothing to resume: {run_dir} holds no checkpoint")
        state, path, skipped = found
        return cls(run_dir, path, state["epoch"], state.get("config", {}), state.get("dataset_version"), skipped)

    def continued(self, config: TrainConfig, dataset_version: str) -> TrainConfig:
        """`config` with the knobs it leaves unset taken from the run; raises ValueError, in one
        line saying what the run was started with, for a knob set otherwise or a changed dataset."""
        given = asdict(config)
        knobs = [knob for knob in RUN_DEFINING if knob in self.started_with]
        differing = [knob for knob in knobs if given[knob] is not None and given[knob] != self.started_with[knob]]
        if differing:
            def flags(values: dict) -> str:
                return " ".join(f"{flag(knob)} {values[knob]}" for knob in differing)

            raise ValueError(f"{self.run_dir} was started with {flags(self.started_with)}, not {flags(given)}: a "
                             f"resumed run keeps the schedule and model it started with; resume with "
                             f"{flags(self.started_with)}, or train without --resume to start a new run")
        if self.dataset_version and self.dataset_version != dataset_version:
            raise ValueError(f"{self.run_dir} was started on version {self.dataset_version} of "
                             f"{config.dataset_name}, which is at {dataset_version} now: a resumed run keeps the "
                             "images it started with; train without --resume to start a new run on them")
        continued = replace(config, **{knob: self.started_with[knob] for knob in knobs if given[knob] is None})
        if "image_size" not in self.started_with:  # a run from before input sizes: the model's own, cropped
            continued = replace(continued, image_size=continued.image_size or NATIVE_SIZES.get(continued.model, 224),
                                resize=continued.resize or "crop")
        return continued

    def warnings(self) -> list[str]:
        if not self.skipped:
            return []
        return [f"skipped {'; '.join(self.skipped)}: the run continues after epoch {self.epoch}, from "
                f"{self.checkpoint.name}"]
