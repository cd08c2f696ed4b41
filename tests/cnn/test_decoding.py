"""`cnn.decoding` at photo sizes: reduced-scale JPEG decoding, the crop and squash fits, and both
kept out of the way of CIFAR-size images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image, ImageDraw

from cnn import decoding
from cnn.decoding import decode_images
from cnn.loaders import _load_split
from tests.imagefactory import encode, jpeg, png


def photo(width: int = 1024, height: int = 768) -> bytes:
    """Smooth shading, hard-edged shapes and sensor grain, as a camera JPEG has them."""
    rng = np.random.default_rng(3)
    shading = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                      Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(shading)
    for _ in range(12):
        x, y = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 200))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x, y, x + int(rng.integers(40, 200)), y + int(rng.integers(40, 200))), fill=colour)
    grain = rng.normal(0, 4, (height, width, 3))
    pixels = (np.asarray(shading) + grain).clip(0, 255).astype(np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def fully_decoded_and_resized(blob: bytes, size: int, fit: str) -> np.ndarray:
    """The reference: every pixel decoded, then one bilinear resize and the central square."""
    image = Image.open(io.BytesIO(blob)).convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    new = (size, size) if fit == "squash" else (max(size, round(width * scale)), max(size, round(height * scale)))
    resized = image.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


@pytest.mark.parametrize("decoder", ["libjpeg-turbo", "pillow"])
def test_a_large_jpeg_decodes_at_reduced_scale_and_looks_like_the_full_decode(decoder, monkeypatch):
    if decoder == "pillow":  # what a JPEG that simplejpeg refuses goes through
        monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: (_ for _ in ()).throw(ValueError("refused")))
    resized_from = []
    from_array = Image.fromarray
    monkeypatch.setattr(Image, "fromarray", lambda array, *a: resized_from.append(array.shape[:2]) or
                        from_array(array, *a))
    blob = photo(1024, 768)
    # 1/4 scale (256x192) still covers what 128 px needs; 224 px needs 299x224, so 1/2 scale.
    for size, fit, decoded_at in [(128, "crop", (192, 256)), (128, "squash", (192, 256)), (224, "crop", (384, 512)),
                                  (224, "squash", (384, 512))]:
        resized_from.clear()
        image = decode_images([blob], size, fit=fit)[0].permute(1, 2, 0).numpy()
        assert resized_from == [decoded_at]
        assert psnr(image, fully_decoded_and_resized(blob, size, fit)) > 30, (size, fit)


def test_images_already_at_the_size_come_back_exactly_as_decoded():
    blobs = [jpeg(1), png(2), jpeg(3, mode="L")]
    expected = np.stack([simplejpeg.decode_jpeg(blobs[0], colorspace="RGB"),
                         np.asarray(Image.open(io.BytesIO(blobs[1])).convert("RGB")),
                         simplejpeg.decode_jpeg(blobs[2], colorspace="RGB")])
    for fit in ("crop", "squash"):
        assert torch.equal(decode_images(blobs, 32, fit=fit), torch.from_numpy(expected).permute(0, 3, 1, 2))


def red_left_edge(width: int = 640, height: int = 480) -> Image.Image:
    """A 4:3 frame, blue, with its left tenth red: a centre crop cuts the red off."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 10, height))
    return image


def is_red(pixel: torch.Tensor) -> bool:
    return pixel[0] > 200 and pixel[2] < 60


def test_squash_keeps_the_whole_frame_and_crop_cuts_its_sides():
    image = red_left_edge()
    for blob in (encode(image, "JPEG", quality=95), encode(image, "PNG")):
        squashed, cropped = decode_images([blob], 64, fit="squash")[0], decode_images([blob], 64, fit="crop")[0]
        assert is_red(squashed[:, 32, 0]) and not is_red(squashed[:, 32, 10])
        assert not is_red(cropped[:, 32, 0])


def test_the_device_resize_squashes_and_crops_as_the_cpu_path_does():
    image = red_left_edge()
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # decoded, as nvJPEG gives it
    blob = encode(image, "PNG")
    for fit in ("squash", "crop"):
        on_device = decoding._resize_tensor(pixels, 64, fit)
        assert on_device.shape == (3, 64, 64) and on_device.dtype == torch.uint8
        assert is_red(on_device[:, 32, 0]) == (fit == "squash")
        assert (on_device.float() - decode_images([blob], 64, fit=fit)[0].float()).abs().mean() < 2


def test_an_unknown_fit_is_refused_by_name():
    with pytest.raises(ValueError, match="fit must be one of crop, squash, not 'stretch'"):
        decode_images([png()], 32, fit="stretch")


class OneGroupSplit:
    """The little of a `StoreSplit` the loaders read: one row group of encoded images."""

    def __init__(self, blobs: list[bytes]):
        self.blobs, self.rows = blobs, len(blobs)

    def row_groups(self):
        return [("part-0.parquet", 0)]

    def read_group(self, path, group):
        return self.blobs, [0] * len(self.blobs)


@pytest.mark.parametrize("budget_mb", [64, 0], ids=["resident", "streaming"])
def test_the_loaders_pass_the_fit_down_to_decoding(budget_mb):
    split = OneGroupSplit([encode(red_left_edge(), "JPEG", quality=95)] * 2)
    for fit in ("squash", "crop"):
        source = _load_split(split, 64, torch.device("cpu"), budget_mb, fit=fit)
        images, _ = next(iter(source.batches(2)))
        assert [is_red(image[:, 32, 0]) for image in images] == [fit == "squash"] * 2


@pytest.mark.device
def test_nvjpeg_squashes_and_crops_as_the_cpu_decoders_do():
    blob = photo(640, 480)
    for fit in ("crop", "squash"):
        on_gpu = decode_images([blob] * 2, 128, "cuda", fit=fit)
        assert on_gpu.device.type == "cuda"
        on_cpu = decode_images([blob], 128, fit=fit)
        # nvJPEG decodes every pixel where the CPU decodes at 1/2 scale: close, never equal.
        assert psnr(on_gpu[0].cpu().numpy(), on_cpu[0].numpy()) > 30
