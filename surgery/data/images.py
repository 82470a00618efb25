"""Image files to 8-bit RGB, right for every mode Pillow opens, or one clear error.

Pillow's ``convert("RGB")`` clips 16- and 32-bit grey images (``I;16``, ``I``) and float images
(``F``) at 255 instead of scaling them: a 16-bit PNG reaches the model as nearly pure white. Here
those are scaled to 0..255 first (16-bit by 257, i.e. the high byte rounded; 32-bit integers by
their type's range if they exceed 16 bits; floats as [0, 1] when they lie there, else as 0..255);
the other modes (palette, grey, alpha, CMYK, YCbCr) go through Pillow's conversion, alpha dropped.
A file above Pillow's decompression-bomb limit is a :class:`~surgery.errors.DataError` line, and so
is one whose header declares more than :data:`MAX_PIXELS` (checked before decoding: Pillow's own
limit, 179 MP, lets a 140 KB 12000x12000 PNG through, 1.7 GB once it is a float image). Every
reader opens files through :func:`opened_image` (or :func:`image_header` for the size alone).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

# the image files surgery reads from a folder (predict, label-free recovery)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

MAX_PIXELS = 8192 * 8192  # 64 MP (a 48 MP phone photo fits): 0.8 GB as a float32 RGB tensor


def _scaled_grey(im: Image.Image) -> np.ndarray:
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        top = 1.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else 255.0
        return np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    if im.mode.startswith("I;16") or (a.size and a.min() >= 0 and a.max() <= 65535 and a.max() > 255):
        return np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)  # 16-bit: 65535 -> 255
    if a.size and (a.min() < 0 or a.max() > 65535):  # 32-bit signed
        return np.clip(np.rint((a + 2**31) / (2**32 - 1) * 255.0), 0, 255).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)  # an "I" image holding 8-bit values


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """``im`` as an ``H x W x 3`` uint8 array (see the module docstring)."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        grey = _scaled_grey(im)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode in ("P", "PA") and "transparency" in im.info:
        im = im.convert("RGBA")  # palette transparency: convert via RGBA (Pillow warns otherwise)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def check_pixels(im: Image.Image, what: str) -> None:
    """One :class:`DataError` line if the opened (not yet decoded) image's header declares more than
    :data:`MAX_PIXELS`."""
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise DataError(f"{what} is {w}x{h} pixels, more than {MAX_PIXELS // 10**6} MP; refused before decoding "
                        "(resize it first)")


@contextlib.contextmanager
def image_header(path: str | Path) -> Iterator[Image.Image]:
    """``path`` opened by Pillow: its header read, nothing decoded. Pillow's
    ``DecompressionBombWarning`` (over 89 MP) is not printed: every image it warns about is over
    :data:`MAX_PIXELS`, refused by :func:`check_pixels` in one line before it is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)
    with im:
        yield im


@contextlib.contextmanager
def opened_image(path: str | Path, what: str) -> Iterator[Image.Image]:
    """``path`` opened (header only) with its size checked by :func:`check_pixels`, ready to decode."""
    with image_header(path) as im:
        check_pixels(im, what)
        yield im


def read_rgb(path: str | Path, what: str = "image") -> np.ndarray:
    """The image file at ``path`` as ``H x W x 3`` uint8, or one :class:`DataError` line."""
    try:
        with opened_image(path, f"{what} {path}") as im:  # the header, before decoding
            return to_rgb_array(im)
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{what} {path} is too large to decode safely ({e}); refused") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read {what} {path}: {' '.join(str(e).split()) or type(e).__name__}") from e
    except ImportError:
        # once `ultralytics` is imported, PIL.Image.open is its wrapper, which on a file Pillow cannot
        # identify tries to load (or install) the pi-heif plugin: without it, a non-image is this error
        raise DataError(f"cannot read {what} {path}: not an image Pillow can identify") from None
