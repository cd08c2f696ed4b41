"""Images from the Parquet store to normalised batches on the training device.

Two ways in, chosen by a memory budget:
- resident: the split fits the budget (CIFAR-10 at 32x32 uint8 is 150 MB), so it is
  decoded once and kept as one uint8 tensor on the device; every epoch is then a
  permutation and batched indexing, as the fastest CIFAR trainers do;
- streaming: row groups are read in a shuffled order, decoded by a thread pool in the
  background, mixed through a shuffle buffer and copied from pinned memory, so a data
  set larger than RAM trains.

Augmentation runs on the device, batched: the paper's random crop and horizontal flip
(padding-crop at 32x32) and its PCA colour noise. Decoding lives in `decode_images`.

Batches stay uint8, 0-255, through decoding, cropping and padding; only `Augment` and
`normalise` turn them into floats, in [0, 1].
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import queue
import random
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from cnn.layout import PublishedDataset

# The paper's colour noise: standard deviation of the per-image eigenvalue multipliers.
LIGHTING_STD = 0.1
# Decoders release the GIL, so one thread per core this process may use keeps them all busy.
DECODE_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

logger = logging.getLogger(__name__)


class UnreadablePart(Exception):
    """A Parquet part of the dataset that does not read: truncated, overwritten or missing."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class StoreSplit:
    """One split of a dataset in the Parquet store, located without the store's code."""

    files: tuple[Path, ...]
    split: str
    classes: tuple[str, ...]
    version_id: str
    rows: int
    stats_dir: Path | None = None  # where statistics derived from this version are kept

    @classmethod
    def open(cls, dataset_dir: str | Path, split: str, classes: Sequence[str] | None = None) -> StoreSplit:
        dataset = PublishedDataset.open(dataset_dir)
        return cls(dataset.files, split, tuple(classes or dataset.classes), dataset.version_id, dataset.rows(split),
                   dataset.stats_dir)

    def row_groups(self) -> list[tuple[Path, int]]:
        return [(path, group) for path in self.files for group in range(_opened(path).num_row_groups)]

    def group_rows(self) -> list[tuple[Path, int, int]]:
        """Every row group with its number of rows in this split, from the split column alone."""
        return [(path, group, len(self._rows(path, group, ["split"])["split"])) for path, group in self.row_groups()]

    def image_sizes(self) -> tuple[list[int], list[int]]:
        """The stored width and height of every image of this split."""
        widths, heights = [], []
        for path, group in self.row_groups():
            rows = self._rows(path, group, ["width", "height"])
            widths += rows["width"]
            heights += rows["height"]
        return widths, heights

    def read_group(self, path: Path, group: int) -> tuple[list[bytes], list[int]]:
        index = {label: i for i, label in enumerate(self.classes)}
        rows = self._rows(path, group, ["image", "label"])
        return rows["image"], [index[label] for label in rows["label"]]

    def _rows(self, path: Path, group: int, columns: list[str]) -> dict[str, list]:
        """`columns` of this split's rows in one row group, naming the part if it does not read."""
        try:
            table = _opened(path).read_row_group(group, columns=list(dict.fromkeys([*columns, "split"])))
        except (pa.ArrowException, OSError) as exc:
            raise UnreadablePart(path, f"row group {group} does not read: {_first_line(exc)}") from None
        keep = [i for i, split in enumerate(table.column("split").to_pylist()) if split == self.split]
        return {name: [values[i] for i in keep] for name in columns for values in [table.column(name).to_pylist()]}


def _opened(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UnreadablePart(path, f"does not read: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


def _decode_one(blob: bytes, size: int) -> np.ndarray:
    if blob[:3] == b"\xff\xd8\xff":
        try:
            pixels = simplejpeg.decode_jpeg(blob, colorspace="RGB")
        except ValueError:  # unusual JPEGs that libjpeg-turbo's fast path refuses
            pixels = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    else:
        pixels = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    height, width = pixels.shape[:2]
    if (height, width) != (size, size):
        image = Image.fromarray(pixels)
        scale = size / min(height, width)
        resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                               Image.Resampling.BILINEAR)
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        pixels = np.asarray(resized.crop((left, top, left + size, top + size)))
    return pixels


_pool: ThreadPoolExecutor | None = None


def decode_images(blobs: Sequence[bytes], size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Encoded images to a uint8 (N, 3, size, size) tensor: shorter side to `size`, centre crop.

    The one place that decodes. On CUDA, JPEGs of the target size go through nvJPEG in
    one batched call; `torchvision.io.decode_jpeg` warns that it is deprecated since
    torchvision 0.29, but torchcodec's image decoders need FFmpeg and are not batched on
    the GPU, so we keep it here and nowhere else. On the CPU, libjpeg-turbo (simplejpeg)
    and Pillow run in a thread pool; both release the GIL while decoding.
    """
    global _pool
    device = torch.device(device)
    if not blobs:
        return torch.empty((0, 3, size, size), dtype=torch.uint8, device=device)
    if device.type == "cuda":
        decoded = _decode_on_gpu(blobs, size, device)
        if decoded is not None:
            return decoded
    if _pool is None:
        _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="cnn-decode")
    arrays = list(_pool.map(_decode_one, blobs, [size] * len(blobs), chunksize=64)) if len(blobs) > 64 \
        else [_decode_one(blob, size) for blob in blobs]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if device.type == "cuda":  # through pinned memory, so the copy does not hold this thread
        return batch.contiguous().pin_memory().to(device, non_blocking=True)
    return batch.to(device) if device.type != "cpu" else batch.contiguous()


def decode_labelled(blobs: Sequence[bytes], labels: Sequence[int], size: int,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, int]:
    """`decode_images` for training: an image that fails to decode is skipped and counted.

    Ingestion validates every image, so this only guards against a store written by
    something else; a batch with no decodable image comes back empty, not as an error.
    """
    try:
        return decode_images(blobs, size, device), torch.tensor(labels, dtype=torch.long), 0
    except Exception:  # noqa: BLE001 - find the bad ones one by one
        pass
    good = []
    for blob, label in zip(blobs, labels):
        try:
            good.append((decode_images([blob], size, "cpu"), label))
        except Exception:  # noqa: BLE001
            continue
    skipped = len(blobs) - len(good)
    if skipped:
        warnings.warn(f"skipped {skipped} image(s) that could not be decoded", RuntimeWarning, stacklevel=2)
    if not good:
        return (torch.empty((0, 3, size, size), dtype=torch.uint8, device=device),
                torch.empty(0, dtype=torch.long), skipped)
    return (torch.cat([image for image, _ in good]).to(device),
            torch.tensor([label for _, label in good], dtype=torch.long), skipped)


_gpu_fallback_logged = False


def _decode_on_gpu(blobs: Sequence[bytes], size: int, device: torch.device) -> torch.Tensor | None:
    """nvJPEG for a batch of JPEGs; None, for the CPU decoders, when it is not one or nvJPEG fails."""
    global _gpu_fallback_logged
    if not all(blob[:3] == b"\xff\xd8\xff" for blob in blobs):
        return None
    from torchvision.io import ImageReadMode, decode_jpeg

    # nvJPEG does not wait for the work queued on our stream, and can write into memory that
    # work still reads once the allocator has freed it (pytorch/vision#9606).
    torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        tensors = [torch.frombuffer(blob, dtype=torch.uint8) for blob in blobs]
        try:
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except Exception as exc:  # noqa: BLE001 - whatever nvJPEG refuses, the CPU decoders may read
            if not _gpu_fallback_logged:
                _gpu_fallback_logged = True
                logger.warning("nvJPEG failed (%s: %s); decoding on the CPU instead", type(exc).__name__,
                               str(exc).partition("\n")[0])
            return None
    if any(image.shape[1:] != (size, size) for image in images):
        images = [_resize_centre_crop(image, size) for image in images]
    return torch.stack(images)


def _resize_centre_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    height, width = image.shape[1:]
    scale = size / min(height, width)
    new = (max(size, round(height * scale)), max(size, round(width * scale)))
    resized = F.interpolate(image[None].float(), size=new, mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return resized[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


# ---- statistics computed once from the training split --------------------------------

@dataclass(frozen=True)
class ColourTensors:
    mean: torch.Tensor  # (1, 3, 1, 1), to broadcast over a batch
    std: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor


@dataclass
class ColourStats:
    mean: list[float]
    std: list[float]
    eigenvalues: list[float]
    eigenvectors: list[list[float]]

    def __post_init__(self) -> None:
        # Outside the dataclass fields, so `asdict` (checkpoints, the JSON cache) never sees it.
        self._on_device: dict[tuple[torch.device, torch.dtype], ColourTensors] = {}

    def on(self, device: torch.device, dtype: torch.dtype) -> ColourTensors:
        """The statistics as tensors on `device`, built once: a tensor made from Python lists
        is a blocking host-to-device copy, which would otherwise stall every training step."""
        key = (device, dtype)
        if key not in self._on_device:
            tensor = functools.partial(torch.tensor, dtype=dtype, device=device)
            self._on_device[key] = ColourTensors(tensor(self.mean)[None, :, None, None],
                                                 tensor(self.std)[None, :, None, None],
                                                 tensor(self.eigenvalues), tensor(self.eigenvectors))
        return self._on_device[key]

    @classmethod
    def from_images(cls, images: torch.Tensor, max_pixels: int = 4_000_000, seed: int = 0) -> ColourStats:
        """Per-channel mean and std, and the RGB covariance's eigen-decomposition (pixels in [0, 1])."""
        count, _, height, width = images.shape
        if count * height * width > max_pixels:
            generator = torch.Generator(device=images.device).manual_seed(seed)
            flat = torch.randint(0, count * height * width, (max_pixels,), generator=generator, device=images.device)
            # Gathered in place: a split kept resident may fill most of the memory budget, and
            # flattening it into a pixel list first would copy all of it.
            pixels = images[flat // (height * width), :, flat // width % height, flat % width]
        else:
            pixels = images.permute(0, 2, 3, 1).reshape(-1, 3)
        pixels = pixels.double() / 255.0
        covariance = torch.cov(pixels.T)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        return cls(pixels.mean(0).tolist(), pixels.std(0).tolist(),
                   eigenvalues.clamp_min(0).tolist(), eigenvectors.tolist())


def colour_stats_for(split: StoreSplit, images: torch.Tensor, seed: int = 0) -> ColourStats:
    """The training split's colour statistics, computed once per dataset version and kept beside it."""
    cache = split.stats_dir / f"colour-{split.version_id}.json" if split.stats_dir else None
    if cache is not None and cache.exists():
        return ColourStats(**json.loads(cache.read_text()))
    stats = ColourStats.from_images(images, seed=seed)
    if cache is not None:
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(stats)))
        os.replace(tmp, cache)
    return stats


# ---- augmentation, batched on the device ---------------------------------------------

class Augment:
    """Random crop + flip + PCA lighting, then normalisation, for a uint8 batch on the device."""

    def __init__(self, stats: ColourStats, crop: int, pad: int = 0, lighting: float = LIGHTING_STD,
                 flip: bool = True):
        self.crop, self.pad, self.lighting, self.flip = crop, pad, lighting, flip
        self.stats = stats

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 shard: tuple[int, int] | None = None) -> torch.Tensor:
        """With `shard=(rank, world)`, `images` is this rank's slice of a global batch: the
        draws are made for all of it, so every rank's generator stays in step with the
        others' and no two ranks give their images the same crops."""
        batch = images.shape[0]
        rank, world = shard or (0, 1)
        mine = slice(rank * batch, (rank + 1) * batch)
        device = images.device
        if self.pad:
            images = F.pad(images, (self.pad,) * 4, mode="reflect")
        height, width = images.shape[2:]
        top = torch.randint(0, height - self.crop + 1, (batch * world,), generator=generator, device=device)[mine]
        left = torch.randint(0, width - self.crop + 1, (batch * world,), generator=generator, device=device)[mine]
        base = torch.arange(self.crop, device=device)
        rows, cols = (top[:, None] + base), (left[:, None] + base)
        if self.flip:
            flipped = torch.rand(batch * world, generator=generator, device=device)[mine] < 0.5
            cols = torch.where(flipped[:, None], cols.flip(1), cols)
        images = images[torch.arange(batch, device=device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        images = images.permute(0, 3, 1, 2).float().div_(255.0)
        if self.lighting:
            alphas = torch.randn(batch * world, 3, generator=generator, device=device)[mine] * self.lighting
            colour = self.stats.on(device, images.dtype)
            shift = (alphas * colour.eigenvalues) @ colour.eigenvectors.T
            images = images + shift[:, :, None, None]
        return normalise(images, self.stats)


def normalise(images: torch.Tensor, stats: ColourStats) -> torch.Tensor:
    """Float images in [0, 1] (or uint8) to zero mean and unit variance per channel."""
    if not images.dtype.is_floating_point:
        images = images.float().div_(255.0)
    colour = stats.on(images.device, images.dtype)
    return ((images - colour.mean) / colour.std).contiguous(memory_format=torch.channels_last)


def centre_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    height, width = images.shape[2:]
    top, left = (height - crop) // 2, (width - crop) // 2
    return images[:, :, top:top + crop, left:left + crop]


def ten_crops(images: torch.Tensor, crop: int) -> list[torch.Tensor]:
    """The paper's test-time patches: four corners and the centre, each also flipped."""
    height, width = images.shape[2:]
    if (height, width) == (crop, crop):  # small images: patch from a reflect-padded copy
        images = F.pad(images, (max(1, crop // 8),) * 4, mode="reflect")
        height, width = images.shape[2:]
    corners = [(0, 0), (0, width - crop), (height - crop, 0), (height - crop, width - crop),
               ((height - crop) // 2, (width - crop) // 2)]
    patches = [images[:, :, top:top + crop, left:left + crop] for top, left in corners]
    return patches + [patch.flip(3) for patch in patches]


# ---- batch sources -------------------------------------------------------------------

class ResidentImages:
    """A whole split decoded once into device memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    @classmethod
    def load(cls, split: StoreSplit, size: int, device: torch.device) -> ResidentImages:
        images, labels = [], []
        for path, group in split.row_groups():
            decoded, targets, _ = decode_labelled(*split.read_group(path, group), size, device)
            images.append(decoded)
            labels.append(targets)
        if not images:
            return cls(torch.empty((0, 3, size, size), dtype=torch.uint8, device=device),
                       torch.empty(0, dtype=torch.long, device=device))
        return cls(torch.cat(images), torch.cat(labels).to(device))

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count = len(self)
        order = torch.randperm(count, generator=generator, device=generator.device) if generator is not None \
            else torch.arange(count, device=self.images.device)
        order = order.to(self.images.device)
        stop = count - count % batch_size if drop_last and count >= batch_size else count
        for start in range(0, stop, batch_size):
            index = order[start:start + batch_size]
            yield self.images[index], self.labels[index]


class StreamingImages:
    """Row groups in a shuffled order, decoded ahead in a background thread, through a shuffle buffer.

    The producer decodes each row group straight onto the device (nvJPEG for JPEGs on CUDA,
    CPU threads otherwise), on a side CUDA stream whose event the training stream waits on,
    so no step waits for the host. The buffer lives on the device and is shuffled by index there.

    With `shard=(rank, world)` (DDP), the shuffled row groups are dealt out among the ranks,
    each rank decodes only its own and yields its `batch_size // world` slice of every
    global batch, and all ranks yield the same number of batches, as DDP needs.
    """

    def __init__(self, split: StoreSplit, size: int, device: torch.device, shuffle_buffer: int = 8192,
                 prefetch_groups: int = 2, shard: tuple[int, int] | None = None):
        self.split, self.size, self.device = split, size, device
        self.shuffle_buffer, self.prefetch_groups, self.shard = shuffle_buffer, prefetch_groups, shard
        self.groups = split.group_rows() if shard else [(path, group, 0) for path, group in split.row_groups()]

    def __len__(self) -> int:
        return self.split.rows

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shuffle = generator is not None
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item()) if shuffle else 0
        rng = random.Random(seed)
        groups = list(self.groups)
        if shuffle:
            rng.shuffle(groups)
        steps = None  # every batch there is
        if self.shard:
            groups, steps = _deal(groups, *self.shard, batch_size)
            batch_size //= self.shard[1]
        decoded: queue.Queue = queue.Queue(maxsize=self.prefetch_groups)
        stop = threading.Event()

        def produce() -> None:
            side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            try:
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    for path, group, _ in groups:
                        if stop.is_set():
                            return
                        images, labels, _ = decode_labelled(*self.split.read_group(path, group), self.size,
                                                            self.device)
                        labels = labels.to(self.device, non_blocking=True)
                        ready = None
                        if side is not None:
                            ready = torch.cuda.Event()
                            ready.record(side)
                        decoded.put((images, labels, ready))
                decoded.put(None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                decoded.put(exc)

        worker = threading.Thread(target=produce, name="cnn-stream", daemon=True)
        worker.start()
        buffer_images: list[torch.Tensor] = []
        buffer_labels: list[torch.Tensor] = []
        buffered = yielded = 0
        try:
            while steps is None or yielded < steps:
                item = decoded.get()
                if isinstance(item, BaseException):
                    raise item
                if item is not None:
                    images, labels, ready = item
                    if ready is not None:  # decoded on the side stream: order it before our use, and
                        stream = torch.cuda.current_stream(self.device)  # keep its memory until then
                        stream.wait_event(ready)
                        images.record_stream(stream)
                        labels.record_stream(stream)
                    buffer_images.append(images)
                    buffer_labels.append(labels)
                    buffered += len(labels)
                    if buffered < self.shuffle_buffer:
                        continue
                if not buffer_images:
                    return
                images, labels = torch.cat(buffer_images), torch.cat(buffer_labels)
                if shuffle:
                    order = torch.tensor(rng.sample(range(len(labels)), len(labels)), dtype=torch.long)
                    order = order.to(self.device, non_blocking=True)
                    images, labels = images[order], labels[order]
                final = item is None
                usable = len(labels) if final else len(labels) - len(labels) % batch_size
                for start in range(0, usable, batch_size):
                    chunk = slice(start, min(start + batch_size, usable))
                    if drop_last and chunk.stop - chunk.start < batch_size or yielded == steps:
                        break
                    yield images[chunk], labels[chunk]
                    yielded += 1
                buffer_images, buffer_labels = [images[usable:]], [labels[usable:]]
                buffered = len(labels) - usable
                if final:
                    return
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    decoded.get_nowait()
                except queue.Empty:
                    worker.join(0.05)


def _deal(groups: list[tuple[Path, int, int]], rank: int, world: int,
          batch_size: int) -> tuple[list[tuple[Path, int, int]], int]:
    """This rank's row groups, each given in turn to the rank with the fewest rows so far,
    and the number of `batch_size // world` batches that every rank can fill."""
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} must divide evenly over {world} processes")
    dealt: list[list[tuple[Path, int, int]]] = [[] for _ in range(world)]
    rows = [0] * world
    for counted in groups:
        if counted[2]:
            poorest = rows.index(min(rows))
            dealt[poorest].append(counted)
            rows[poorest] += counted[2]
    return dealt[rank], min(rows) // (batch_size // world)
