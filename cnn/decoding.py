"""Encoded images to uint8 tensors: `decode_images`, the one place that decodes.

On CUDA, JPEGs go through nvJPEG in one batched call; on the CPU, libjpeg-turbo (simplejpeg)
and Pillow run in a thread pool. Images come out uint8, 0-255, their shorter side resized to
the size asked for and centre-cropped to a square.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

# Decoders release the GIL, so one thread per core this process may use keeps them all busy.
DECODE_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

logger = logging.getLogger(__name__)


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
