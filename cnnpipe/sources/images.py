"""Validate one encoded image by decoding it, and normalise what training cannot read as-is.

Policy, applied identically to every source:
- only JPEG, PNG, GIF, BMP and WebP are opened (`formats=`), so Pillow's other parsers
  (EPS via Ghostscript, FITS, PSD, ...) are never reached;
- more pixels than `Image.MAX_IMAGE_PIXELS` is a decompression bomb and is rejected,
  where Pillow alone would only warn up to twice that limit;
- truncated files are rejected: `ImageFile.LOAD_TRUNCATED_IMAGES` stays False;
- an RGB or grayscale JPEG/PNG with no EXIF rotation is kept byte for byte; anything else
  (CMYK, 16-bit, palette, alpha, EXIF-rotated, GIF/BMP/WebP, animations) is stored as a
  lossless RGB PNG with the orientation applied and the EXIF dropped, so no reader has
  to repeat this policy;
- alpha is composited on white (`ALPHA_BACKGROUND`); 16-bit values are scaled to 8 bits,
  so distinct input levels stay distinct instead of clipping at 255;
- animations keep frame 0 and record `n_frames`.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from cnn.failpoints import failpoint, failpoint_armed

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
ALPHA_BACKGROUND = (255, 255, 255)
RESIZED_JPEG_QUALITY = 90
_ORIENTATION_TAG = 0x0112
JPEG_MAGIC = b"\xff\xd8\xff"
# A JPEG is checked, and hashed, decoded at the smallest of libjpeg-turbo's DCT scales that keeps
# both sides at least HASH_DECODE_SIDE: every coefficient is still read, so a truncated or broken
# file fails as in a full decode, at about half its cost for a 500x375 photo (125x94), and the
# hash of that is closer to imagehash's phash of the full image (0.6 bits on average, at most 2,
# over 100 such photos) than Pillow's reduction of a full decode was (0.9, at most 4). It is decoded
# to luma alone, the greyscale that the hash takes: the chroma is still read, but neither transformed
# nor converted to RGB. Against the RGB decode's greyscale, that saved a tenth of a photo's check and
# a third of a CIFAR image's, and moved one bit or two of the hash for 3% of CIFAR-10's test images.
HASH_DECODE_SIDE = 64
_REDUCED_DECODE = {"colorspace": "GRAY", "strict": True, "min_width": HASH_DECODE_SIDE,
                   "min_height": HASH_DECODE_SIDE}
_KEPT_AS_IS = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}

# Pillow only warns between one and two times its pixel limit; we reject the whole range.
warnings.simplefilter("error", Image.DecompressionBombWarning)


class RejectedImage(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CheckedImage:
    format: str
    width: int
    height: int
    n_frames: int
    # None means "store the original bytes unchanged".
    encoded: bytes | None
    # The decoded RGB pixels, when asked for and the fast JPEG path produced them.
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)
    # `perceptual_hash` of the stored pixels, when asked for (ingest keeps it; classify does not).
    phash: int | None = None


def check_image(data: bytes, resize: int | None = None, keep_pixels: bool = False,
                with_hash: bool = False) -> CheckedImage:
    """Decode `data` fully and return what to store, or raise RejectedImage.

    `keep_pixels` returns the decoded RGB array too when that costs nothing extra
    (plain JPEGs), so a caller that classifies the image need not decode it again.
    `with_hash` adds the hash of what is stored (`stored_image_hash`), from the pixels decoded here.
    """
    if resize is None and data[:3] == JPEG_MAGIC and (decoded := _decode_plain_jpeg(data, keep_pixels)) is not None:
        width, height, pixels = decoded
        phash = None
        if with_hash:
            phash = luma_hash(simplejpeg.decode_jpeg(data, **_REDUCED_DECODE) if keep_pixels else pixels)
        return CheckedImage("JPEG", width, height, 1, None, pixels if keep_pixels else None, phash)
    return _check_with_pillow(data, resize, with_hash)


def _check_with_pillow(data: bytes, resize: int | None, with_hash: bool) -> CheckedImage:
    """`check_image` of anything but a plain JPEG."""
    if not data:
        raise RejectedImage("empty", "zero-byte file")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedImage("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise RejectedImage("unidentified", "not a JPEG, PNG, GIF, BMP or WebP image") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a property of the file
        raise RejectedImage("corrupt", _describe(exc)) from None
    with image:
        width, height = image.size
        if width * height > Image.MAX_IMAGE_PIXELS:
            raise RejectedImage(
                "decompression_bomb",
                f"{width}x{height} pixels is over the {Image.MAX_IMAGE_PIXELS} pixel limit",
            )
        n_frames = getattr(image, "n_frames", 1)
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
        keep_original = (
            resize is None
            and (image.format, image.mode) in _KEPT_AS_IS
            and n_frames == 1
            and orientation == 1
        )
        if resize and image.format == "JPEG":
            image.draft("RGB", _draft_size(width, height, resize))
        try:
            image.load()
        except Exception as exc:  # noqa: BLE001
            reason = "truncated" if _is_truncation(exc) else "corrupt"
            raise RejectedImage(reason, _describe(exc)) from None
        if keep_original:
            return CheckedImage(image.format, width, height, 1, None,
                                phash=None if not with_hash else stored_image_hash(data) if image.format == "JPEG"
                                else perceptual_hash(image))
        rgb = to_rgb(image)
    if resize:
        rgb = resize_and_centre_crop(rgb, resize)
        fmt, encoded = "JPEG", _encode(rgb, "JPEG")
    else:
        fmt, encoded = "PNG", _encode(rgb, "PNG")
    return CheckedImage(fmt, rgb.width, rgb.height, n_frames, encoded, phash=perceptual_hash(rgb) if with_hash else None)


# The DCT-II rows of the 8 lowest frequencies over 32 samples, unnormalised as scipy's `dct`.
_HASH_SIDE = 32
_DCT_LOW = 2 * np.cos(np.pi * np.outer(np.arange(8), 2 * np.arange(_HASH_SIDE) + 1) / (2 * _HASH_SIDE))


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit DCT hash of an image (imagehash's `phash`: the 8x8 lowest frequencies of the 32x32
    greyscale, a bit set where one lies above their median), as a signed 64-bit integer for Parquet
    and DuckDB: a few bits apart for the same picture re-encoded, resized or recoloured. An image
    over 64 px a side is reduced by a whole factor first (Pillow's `reducing_gap`), at a quarter of
    the cost of imagehash's plain LANCZOS, which then differs in a bit or two; smaller ones match
    it bit for bit. Ingest hashes stored bytes with `stored_image_hash`."""
    return _dct_hash(image.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0))


def luma_hash(luma: np.ndarray) -> int:
    """The hash of a JPEG's luma decoded at reduced scale (`_REDUCED_DECODE`, height x width [x 1]).
    At the hash's 32x32, as CIFAR-size images decode, it is `perceptual_hash` of those pixels, bit for
    bit, computed in NumPy alone (13 against 45 us through a Pillow image). Larger ones are resized
    bilinearly: the DCT scaling has already averaged each block they come from, and the hash stays as
    close to imagehash's phash of the full image as with LANCZOS (0.57 against 0.48 bits on average
    over 400 photos of 500x375, at most 4 either way) at a third of the resize's cost."""
    if luma.ndim == 3:
        luma = luma[:, :, 0]
    if luma.shape != (_HASH_SIDE, _HASH_SIDE):
        luma = Image.fromarray(luma).resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return _dct_hash(luma)


def _dct_hash(grey) -> int:
    return _dct_hashes(np.asarray(grey)[None])[0]


def _dct_hashes(greys: np.ndarray) -> list[int]:
    """The hashes of a stack of 32x32 greyscale images, in a few NumPy calls for the whole stack:
    one at a time, the calls' own overhead was most of a CIFAR image's hash (10 of 11 us). One image
    hashes as a stack of one, so that the two agree bit for bit."""
    low = (_DCT_LOW @ greys.astype(np.float64) @ _DCT_LOW.T).reshape(len(greys), 64)
    medians = np.partition(low, (31, 32), axis=1)[:, 31:33].mean(axis=1)  # np.median's, without its overhead
    return np.packbits(low > medians[:, None], axis=1).view(">i8")[:, 0].tolist()


def stored_image_hash(data: bytes) -> int:
    """The hash that ingest keeps for an image stored as `data`: a JPEG's `luma_hash`, of the luma
    that ingest's check decodes at reduced scale (HASH_DECODE_SIDE), else the decoded image's
    `perceptual_hash`."""
    if data[:3] == JPEG_MAGIC:
        try:
            return luma_hash(simplejpeg.decode_jpeg(data, **_REDUCED_DECODE))
        except ValueError:
            pass
    with Image.open(io.BytesIO(data)) as image:
        return perceptual_hash(image)


def _decode_plain_jpeg(data: bytes, keep_pixels: bool = False) -> tuple[int, int, np.ndarray] | None:
    """Decode the common case, an RGB or grayscale JPEG without EXIF, with libjpeg-turbo: (width,
    height, pixels), the pixels RGB with `keep_pixels`, else its reduced luma (HASH_DECODE_SIDE).

    It is five times faster than Pillow for small images. Anything unusual, and any
    file libjpeg-turbo complains about, returns None and gets Pillow's full treatment,
    so the two paths accept and reject the same files.
    """
    if _may_have_exif(data):
        return None
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
        if colourspace not in ("YCbCr", "RGB", "Gray") or width * height > Image.MAX_IMAGE_PIXELS:
            return None
        pixels = simplejpeg.decode_jpeg(data, **(_REDUCED_DECODE if not keep_pixels else
                                                  {"colorspace": "RGB", "strict": True}))
    except ValueError:
        return None
    return width, height, pixels


# A file this small is scanned whole for EXIF's signature faster than its markers are walked.
_EXIF_SCAN_BYTES = 16384


def _may_have_exif(data: bytes) -> bool:
    """Whether a JPEG's header may hold EXIF, an APP1 segment that starts `Exif\\0\\0`, as Pillow reads it.
    A larger file's markers are walked up to its scan: scanning a 50 KB photo whole for the signature
    cost 40 of its check's 550 us, and the first 64 KB alone missed an EXIF segment placed after a
    large ICC profile. True also when the markers cannot be walked: Pillow then has the file."""
    if len(data) <= _EXIF_SCAN_BYTES:
        return data.find(b"Exif\x00\x00") != -1
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return True
        marker = data[offset + 1]
        if marker == 0xFF:  # a fill byte before the marker
            offset += 1
        elif marker == 0xDA:  # the scan starts: no EXIF can follow
            return False
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            offset += 2
        elif marker == 0xE1 and data[offset + 4:offset + 10] == b"Exif\x00\x00":
            return True
        else:
            offset += 2 + int.from_bytes(data[offset + 2:offset + 4], "big")
    return True


def to_rgb(image: Image.Image) -> Image.Image:
    """The current frame as 8-bit RGB, EXIF orientation applied."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(image), mode), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def resize_and_centre_crop(image: Image.Image, size: int) -> Image.Image:
    """The paper's preprocessing: shorter side to `size`, then the central size x size square."""
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _draft_size(width: int, height: int, size: int) -> tuple[int, int]:
    # JPEG draft decodes at 1/2, 1/4 or 1/8 scale while staying at least this large.
    scale = size / min(width, height)
    return math.ceil(width * scale), math.ceil(height * scale)


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    # Pillow reads 16-bit PNGs as "I;16" or "I": both are scaled from 0..65535.
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif mode != "F" and low >= 0 and high <= 65535:
        scaled = values / 257.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=RESIZED_JPEG_QUALITY)
    else:
        image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _is_truncation(exc: Exception) -> bool:
    return isinstance(exc, EOFError) or "truncated" in str(exc).lower()


def _describe(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@dataclass
class CheckedBatch:
    """`check_batch`'s verdicts on a list of images, a column each and in their order. A decoding process
    sends these back: a `CheckedImage` an image cost 1.4 us an image to pickle and unpickle, a tenth of
    checking a CIFAR-size JPEG, where a few lists of numbers and one repeated string cost almost nothing."""

    formats: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    n_frames: list[int] = field(default_factory=list)
    phashes: list[int | None] = field(default_factory=list)
    # The images stored as re-encoded here rather than as read, by index.
    encoded: dict[int, bytes] = field(default_factory=dict)
    # (reason, detail) of each image refused, by index; its other columns hold placeholders.
    refused: dict[int, tuple[str, str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.formats)

    def add(self, checked: CheckedImage) -> None:
        if checked.encoded is not None:
            self.encoded[len(self)] = checked.encoded
        self._add(checked.format, checked.width, checked.height, checked.n_frames, checked.phash)

    def refuse(self, reason: str, detail: str) -> None:
        self.refused[len(self)] = (reason, detail)
        self._add("", 0, 0, 0, None)

    def extend(self, other: CheckedBatch) -> None:
        offset = len(self)
        self.encoded.update((offset + index, data) for index, data in other.encoded.items())
        self.refused.update((offset + index, why) for index, why in other.refused.items())
        for mine, theirs in ((self.formats, other.formats), (self.widths, other.widths), (self.heights, other.heights),
                             (self.n_frames, other.n_frames), (self.phashes, other.phashes)):
            mine.extend(theirs)

    def _add(self, format_: str, width: int, height: int, n_frames: int, phash: int | None) -> None:
        self.formats.append(format_)
        self.widths.append(width)
        self.heights.append(height)
        self.n_frames.append(n_frames)
        self.phashes.append(phash)


def check_batch(datas: list[bytes], resize: int | None) -> CheckedBatch:
    """Worker entry point: check many images, each refused one with its (reason, detail).

    It lives here, beside `check_image`, so decoding processes import only Pillow and NumPy. The plain
    JPEGs, most images, take `_decode_plain_jpeg` inline and are hashed together at the end.
    """
    batch = CheckedBatch()
    lumas: dict[int, np.ndarray] = {}  # by index: the plain JPEGs
    armed = failpoint_armed("decode.image")  # once a batch: the environment is read per call
    for data in datas:
        if armed:
            failpoint("decode.image", key=lambda: hashlib.sha256(data).hexdigest())
        if resize is None and data[:3] == JPEG_MAGIC and (plain := _decode_plain_jpeg(data)) is not None:
            width, height, luma = plain
            lumas[len(batch)] = luma[:, :, 0] if luma.ndim == 3 else luma
            batch._add("JPEG", width, height, 1, None)
            continue
        try:  # as check_image goes on, without decoding a JPEG that failed above once more
            batch.add(_check_with_pillow(data, resize, with_hash=True))
        except RejectedImage as exc:
            batch.refuse(exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not end the batch
            batch.refuse("corrupt", f"{type(exc).__name__}: {exc}")
    square = [index for index, luma in lumas.items() if luma.shape == (_HASH_SIDE, _HASH_SIDE)]
    if square:
        for index, phash in zip(square, _dct_hashes(np.stack([lumas[index] for index in square]))):
            batch.phashes[index] = phash
    for index, luma in lumas.items():
        if luma.shape != (_HASH_SIDE, _HASH_SIDE):
            batch.phashes[index] = luma_hash(luma)
    return batch
