"""Encoded images to uint8 tensors: `decode_images`, the one place that decodes.

On CUDA, JPEGs go through nvJPEG in one batched call; on the CPU, libjpeg-turbo (simplejpeg)
and Pillow run in a thread pool. Images come out uint8, 0-255, as size x size squares, made
one of two ways (`fit`):
- crop: the shorter side resized to the size, then the central square (the paper's way);
- squash: the whole frame resized to the square, aspect ratio ignored, so that an object
  near the edge of a 4:3 photo is still there.
On the CPU, a JPEG much larger than the size asked for is decoded at 1/2, 1/4 or 1/8 scale
by libjpeg-turbo itself, never below what the resize needs, and resized the rest of the way.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from cnn.cores import usable_cores

# Decoders release the GIL, so one thread per core this process may use keeps them all busy.
DECODE_THREADS = usable_cores()

FITS = ("crop", "squash")
JPEG_MAGIC = b"\xff\xd8\xff"

logger = logging.getLogger(__name__)


def resized_dims(width: int, height: int, size: int, fit: str) -> tuple[int, int]:
    """(width, height) an image is resized to before its central size x size square is kept.

    The CPU and GPU paths both resize through this, so they agree on the geometry."""
    if fit == "squash":
        return size, size
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def _reduced_dims(width: int, height: int, needed: tuple[int, int]) -> tuple[int, int]:
    """The smallest 1/8, 1/4 or 1/2 scale of a JPEG that is still at least `needed`, else full size.

    libjpeg-turbo's other scales (3/8, 5/8, 7/8...) decode slower than full size."""
    for divisor in (8, 4, 2):
        reduced = (-(-width // divisor), -(-height // divisor))  # libjpeg-turbo rounds scaled sizes up
        if reduced[0] >= needed[0] and reduced[1] >= needed[1]:
            return reduced
    return width, height


def _decode_with_pillow(blob: bytes, size: int, fit: str) -> tuple[np.ndarray, tuple[int, int]]:
    with Image.open(io.BytesIO(blob)) as image:
        full = image.size
        image.draft("RGB", resized_dims(*full, size, fit))  # a JPEG at 1/2, 1/4 or 1/8 scale; others ignore it
        return np.asarray(image.convert("RGB")), full


def _decode_one(blob: bytes, size: int, fit: str = "crop") -> np.ndarray:
    if blob[:3] == JPEG_MAGIC:
        try:
            height, width = simplejpeg.decode_jpeg_header(blob)[:2]
            reduced_width, reduced_height = _reduced_dims(width, height, resized_dims(width, height, size, fit))
            pixels = simplejpeg.decode_jpeg(blob, colorspace="RGB", min_height=reduced_height,
                                            min_width=reduced_width)
            full = (width, height)
        except ValueError:  # unusual JPEGs that libjpeg-turbo's fast path refuses
            pixels, full = _decode_with_pillow(blob, size, fit)
    else:
        pixels, full = _decode_with_pillow(blob, size, fit)
    if pixels.shape[:2] != (size, size):
        # The target comes from the full size, so a reduced decode keeps the full decode's geometry.
        new_width, new_height = resized_dims(*full, size, fit)
        # Pillow's bilinear widens its kernel when shrinking, so this is antialiased.
        resized = Image.fromarray(pixels).resize((new_width, new_height), Image.Resampling.BILINEAR)
        left, top = (new_width - size) // 2, (new_height - size) // 2
        pixels = np.asarray(resized.crop((left, top, left + size, top + size)))
    return pixels


_pool: ThreadPoolExecutor | None = None


def decode_images(blobs: Sequence[bytes], size: int, device: torch.device | str = "cpu",
                  fit: str = "crop") -> torch.Tensor:
    """Encoded images to a uint8 (N, 3, size, size) tensor: with `fit="crop"` shorter side to
    `size` and centre crop, with `fit="squash"` the whole image resized to size x size.

    The one place that decodes. On CUDA, JPEGs of the target size go through nvJPEG in
    one batched call; `torchvision.io.decode_jpeg` warns that it is deprecated since
    torchvision 0.29, but torchcodec's image decoders need FFmpeg and are not batched on
    the GPU, so we keep it here and nowhere else. On the CPU, libjpeg-turbo (simplejpeg)
    and Pillow run in a thread pool; both release the GIL while decoding.
    """
    global _pool
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, not {fit!r}")
    device = torch.device(device)
    if not blobs:
        return torch.empty((0, 3, size, size), dtype=torch.uint8, device=device)
    if device.type == "cuda":
        decoded = _decode_on_gpu(blobs, size, device, fit)
        if decoded is not None:
            return decoded
    if _pool is None:
        _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="cnn-decode")
    arrays = list(_pool.map(_decode_one, blobs, [size] * len(blobs), [fit] * len(blobs), chunksize=64)) \
        if len(blobs) > 64 else [_decode_one(blob, size, fit) for blob in blobs]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if device.type == "cuda":  # through pinned memory, so the copy does not hold this thread
        return batch.contiguous().pin_memory().to(device, non_blocking=True)
    return batch.to(device) if device.type != "cpu" else batch.contiguous()


def decode_labelled(blobs: Sequence[bytes], labels: Sequence[int], size: int,
                    device: torch.device | str = "cpu", fit: str = "crop") -> tuple[torch.Tensor, torch.Tensor, int]:
    """`decode_images` for training: an image that fails to decode is skipped and counted.

    Ingestion validates every image, so this only guards against a store written by
    something else; a batch with no decodable image comes back empty, not as an error.
    """
    try:
        return decode_images(blobs, size, device, fit), torch.tensor(labels, dtype=torch.long), 0
    except Exception:  # noqa: BLE001 - find the bad ones one by one
        pass
    good = []
    for blob, label in zip(blobs, labels):
        try:
            good.append((decode_images([blob], size, "cpu", fit), label))
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


def _decode_on_gpu(blobs: Sequence[bytes], size: int, device: torch.device,
                   fit: str = "crop") -> torch.Tensor | None:
    """nvJPEG for a batch of JPEGs; None, for the CPU decoders, when it is not one or nvJPEG fails."""
    global _gpu_fallback_logged
    if not all(blob[:3] == JPEG_MAGIC for blob in blobs):
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
        images = [_resize_tensor(image, size, fit) for image in images]
    return torch.stack(images)


def _resize_tensor(image: torch.Tensor, size: int, fit: str = "crop") -> torch.Tensor:
    """One uint8 (3, H, W) image, on any device, to (3, size, size) as `_decode_one` does on the CPU."""
    height, width = image.shape[1:]
    new_width, new_height = resized_dims(width, height, size, fit)
    resized = F.interpolate(image[None].float(), size=(new_height, new_width), mode="bilinear", antialias=True,
                            align_corners=False)[0]
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return resized[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)
