from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

from cnnpipe.sources.images import ALPHA_BACKGROUND, RejectedImage, check_image
from tests.imagefactory import decode_rgb, encode, jpeg, noise_image, png


def reason_for(data: bytes) -> str:
    with pytest.raises(RejectedImage) as caught:
        check_image(data)
    return caught.value.reason


def stored_pixels(data: bytes, **kwargs) -> np.ndarray:
    checked = check_image(data, **kwargs)
    return decode_rgb(checked.encoded if checked.encoded is not None else data)


def test_plain_rgb_jpeg_and_png_are_kept_byte_for_byte():
    for data, fmt in ((jpeg(1), "JPEG"), (png(2), "PNG"), (jpeg(3, mode="L"), "JPEG")):
        checked = check_image(data)
        assert (checked.format, checked.width, checked.height, checked.encoded) == (fmt, 32, 32, None)


def test_truncated_jpeg_is_rejected_and_pillow_stays_strict():
    data = jpeg(4, size=(64, 64))
    assert reason_for(data[: len(data) // 2]) == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"<html><body>not a picture</body></html>", "unidentified"),
    (b"just some notes\n", "unidentified"),
])
def test_non_images_are_rejected(data, reason):
    assert reason_for(data) == reason


def test_three_byte_file_is_rejected():
    assert reason_for(jpeg(5)[:3]) in {"unidentified", "truncated", "corrupt"}


@pytest.mark.parametrize("fmt", ["TIFF", "PPM"])
def test_formats_outside_the_allowlist_are_refused(fmt):
    assert reason_for(encode(noise_image(6), fmt)) == "unidentified"


def test_eps_parser_is_never_reached(monkeypatch):
    from PIL import EpsImagePlugin

    def spy(self):
        raise AssertionError("the EPS parser ran")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    assert reason_for(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n") == "unidentified"


def test_decompression_bombs_are_rejected_without_decoding():
    # 1-bit PNGs that are tiny on disk: one over twice Pillow's limit, one between 1x and 2x.
    for side in (20_000, 10_000):
        data = encode(Image.new("1", (side, side)), "PNG")
        assert len(data) < 200_000
        assert reason_for(data) == "decompression_bomb"


def test_decompression_bomb_stays_within_a_memory_limit():
    # A regression would decode 400 M pixels; under a 600 MB address-space cap it would die.
    script = (
        "import resource, io;"
        "from PIL import Image;"
        "from cnnpipe.sources.images import check_image, RejectedImage;"
        "b = io.BytesIO(); Image.new('1', (20000, 20000)).save(b, 'PNG');"
        "resource.setrlimit(resource.RLIMIT_AS, (600 << 20, 600 << 20));"
        "\ntry:\n    check_image(b.getvalue())\nexcept RejectedImage as e:\n    print(e.reason)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "decompression_bomb", result.stderr


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    pixels = stored_pixels(encode(cmyk, "JPEG", quality=95))
    assert pixels.shape == (8, 16, 3) and pixels.dtype == np.uint8
    assert pixels[..., 0].mean() > 200 and pixels[..., 1:].mean() < 60


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 1000, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    pixels = stored_pixels(data)
    assert pixels.shape == (1, 3, 3)
    assert list(pixels[0, :, 0]) == [0, 4, 255]
    assert len(set(pixels[0, :, 0])) == 3


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_on_the_documented_background(mode):
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    image.putpixel((0, 0), (200, 0, 0, 0))
    if mode == "LA":
        image = image.convert("LA")
    if mode == "P":
        image = image.convert("P")
        image.info["transparency"] = image.getpixel((0, 0))
    pixels = stored_pixels(encode(image, "PNG", **({"transparency": image.info["transparency"]} if mode == "P" else {})))
    assert pixels.shape == (4, 4, 3)
    assert tuple(pixels[0, 0]) == ALPHA_BACKGROUND
    assert tuple(pixels[3, 3]) != ALPHA_BACKGROUND


def test_exif_orientation_is_applied_and_cleared():
    image = noise_image(7, size=(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    checked = check_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert (checked.width, checked.height) == (20, 40)
    with Image.open(io.BytesIO(checked.encoded)) as stored:
        assert stored.size == (20, 40)
        assert stored.getexif().get(0x0112) in (None, 1)
    again = check_image(checked.encoded)
    assert (again.width, again.height) == (20, 40)


def test_exif_orientation_behind_64_kb_of_other_segments_is_applied_too():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(noise_image(8, size=(40, 20)), "JPEG", exif=exif.tobytes())
    comment = b"\xff\xfe" + (2 + 40_000).to_bytes(2, "big") + bytes(40_000)
    padded = data[:2] + comment + comment + data[2:]
    assert padded.find(b"Exif\x00\x00") > 65_536
    checked = check_image(padded)
    assert (checked.width, checked.height) == (20, 40) and checked.encoded is not None
    # The same file without its EXIF is kept byte for byte, as any plain JPEG is.
    plain = encode(noise_image(8, size=(40, 20)), "JPEG")
    assert check_image(plain[:2] + comment + comment + plain[2:]).encoded is None


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_keep_frame_zero_and_record_the_frame_count(fmt):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {}))
    checked = check_image(data)
    assert checked.n_frames == 3
    pixels = decode_rgb(checked.encoded)
    assert pixels[..., 0].mean() > 200 and pixels[..., 1:].mean() < 40


def test_resize_gives_the_papers_centre_crop_as_jpeg(monkeypatch):
    from PIL import JpegImagePlugin

    drafts = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        drafts.append(original_draft(self, mode, size))
        return drafts[-1]

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    wide = Image.new("RGB", (1200, 600), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 300, 600))  # left quarter red: cropped away by a centre crop
    checked = check_image(encode(wide, "JPEG", quality=95), resize=256)
    assert (checked.format, checked.width, checked.height) == ("JPEG", 256, 256)
    pixels = decode_rgb(checked.encoded)
    assert pixels.shape == (256, 256, 3)
    assert pixels[:, :, 2].mean() > 200
    # draft() returns the reduced decoding box when it shrinks: here half size.
    assert drafts and drafts[0] is not None and drafts[0][1][2:] == (600, 300)


def test_resize_upscales_small_images():
    checked = check_image(png(8, size=(32, 16)), resize=64)
    assert (checked.width, checked.height) == (64, 64)
