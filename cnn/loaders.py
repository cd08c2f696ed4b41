"""Images from the Parquet store to uint8 batches on the training device.

Two ways in, chosen by a memory budget (`_load_split`):
- resident: the split fits the budget (CIFAR-10 at 32x32 uint8 is 150 MB), so it is
  decoded once and kept as one uint8 tensor on the device; every epoch is then a
  permutation and batched indexing, as the fastest CIFAR trainers do;
- streaming: row groups are read in a shuffled order, decoded by a thread pool in the
  background, mixed through a shuffle buffer and copied from pinned memory, so a data
  set larger than RAM trains. Under DDP the row groups are dealt out among the ranks.

Decoding lives in `cnn.decoding`, augmentation in `cnn.augment`.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from cnn.decoding import decode_labelled
from cnn.splits import StoreSplit


class ResidentImages:
    """A whole split decoded once into device memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    @classmethod
    def load(cls, split: StoreSplit, size: int, device: torch.device, fit: str = "crop") -> ResidentImages:
        images, labels = [], []
        for path, group in split.row_groups():
            decoded, targets, _ = decode_labelled(*split.read_group(path, group), size, device, fit)
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
                 prefetch_groups: int = 2, shard: tuple[int, int] | None = None, fit: str = "crop"):
        self.split, self.size, self.device, self.fit = split, size, device, fit
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
                                                            self.device, self.fit)
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


def _load_split(split: StoreSplit, size: int, device: torch.device, budget_mb: int,
                shard: tuple[int, int] | None = None, fit: str = "crop"):
    if split.rows * 3 * size * size <= budget_mb * 2**20:
        return ResidentImages.load(split, size, device, fit)
    return StreamingImages(split, size, device, shard=shard, fit=fit)
