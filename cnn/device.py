"""Where and in what a run computes: the device, bf16 autocast or fp32, and the memory budget
within which a split is decoded once into device memory instead of streamed."""

from __future__ import annotations

import ctypes
import platform

import psutil
import torch

from cnn.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    return torch.device(name)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_reusing_freed_memory = False


def reuse_freed_memory(device: torch.device) -> bool:
    """Let a CPU run reuse the pages its tensors free. glibc serves a large allocation (over 128 KB,
    a threshold it raises to 32 MB at most) with fresh pages from the kernel, which zeroes each on
    first touch, and unmaps them again when it is freed: a forward pass of alexnet-cifar at batch
    256 took ~40,000 page faults and ran at 2,000 images/s against 2,900 without them, and AlexNet
    trained at 224 px at 57-69 images/s against 83-87 (this project's 2-core Xeon). Served from the
    heap and kept there instead, the next batch finds the same pages mapped. What a process frees
    then stays with it for reuse, as under jemalloc or tcmalloc, which PyTorch's CPU tuning guide
    recommends for the same reason. Process-wide, once; a no-op on CUDA and off glibc. Returns
    whether it applies."""
    global _reusing_freed_memory
    if device.type != "cpu" or platform.libc_ver()[0] != "glibc":
        return False
    if not _reusing_freed_memory:
        libc = ctypes.CDLL(None)
        _reusing_freed_memory = bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _reusing_freed_memory


def cpu_has_amx() -> bool:
    # A private probe, present since torch 2.1; without it, assume no AMX.
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether a run computes in bf16. `auto`: on CUDA, and on a CPU with AMX tiles, whose
    bf16 matrix units train alexnet-cifar about 3x faster than fp32 (on this project's
    2-core Xeon, 180 to 430-580 images/s); elsewhere bf16 is emulated, slower than fp32."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_amx())


# A split is decoded once into device memory when it fits this share of what the device has
# free; the rest holds the model, its optimizer state and a batch's activations. Each split is
# checked alone: validation and held-out splits are usually a fraction of the training split.
MEMORY_BUDGET_SHARE = 0.4


def memory_budget(device: torch.device, budget_mb: int | None = None) -> tuple[int, str]:
    """The memory budget in MB and where it comes from: `budget_mb` when set, otherwise a share
    of the GPU's free memory on CUDA, or of the RAM available on the CPU."""
    if budget_mb is not None:
        return budget_mb, "set"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"free on {device}"
    else:
        free = psutil.virtual_memory().available
        where = "of RAM available"
    why = f"auto: {MEMORY_BUDGET_SHARE:.0%} of the {free / 2**30:.1f} GB {where}"
    return int(free * MEMORY_BUDGET_SHARE) // 2**20, why


def memory_budget_line(config: TrainConfig) -> str:
    device = resolve_device(config.device)
    budget_mb, why = memory_budget(device, config.memory_budget_mb)
    return (f"memory budget: {budget_mb} MB a split, decoded once into {device.type} memory within it and "
            f"streamed from Parquet beyond it ({why})")


def precision_line(config: TrainConfig) -> str:
    """What the run computes in, and why: `uses_bf16` depends on the machine, so it is said."""
    device = resolve_device(config.device)
    bf16 = uses_bf16(device, config.precision)
    if config.precision != "auto":
        why = "set"
    elif device.type == "cpu":
        why = f"auto: this CPU {'has' if bf16 else 'has no'} AMX"
    else:
        why = f"auto on {device.type}"
    return f"precision: {'bf16 autocast' if bf16 else 'fp32'} on {device.type} ({why})"


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context for the forward pass; losses and softmax stay in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))
