"""Images in every mode Pillow opens reach the model as the right 8-bit RGB (against references
computed here with numpy), and a decompression bomb, or a header declaring more pixels than
surgery decodes, is one clear line."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from surgery.data.images import read_rgb
from surgery.errors import DataError
from tests.extras import require

RNG = np.random.default_rng(0)


def _grey16() -> tuple[np.ndarray, np.ndarray]:
    a = RNG.integers(0, 65536, size=(12, 17), dtype=np.uint16)
    a[0, 0], a[0, 1] = 0, 65535
    return a, np.rint(a / 257.0).astype(np.uint8)


def test_16_bit_png_is_scaled_not_clipped(tmp_path) -> None:
    a, ref = _grey16()
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = read_rgb(tmp_path / "g16.png")
    assert got.shape == (12, 17, 3) and got.dtype == np.uint8
    assert np.array_equal(got, np.repeat(ref[:, :, None], 3, axis=2))
    assert got.mean() < 200  # Pillow's convert("RGB") makes nearly all of it 255


def test_predict_reads_the_same_pixels(tmp_path) -> None:
    from surgery.deployment.predict import _read

    a, ref = _grey16()
    Image.fromarray(a).save(tmp_path / "g16.png")
    x = _read(tmp_path / "g16.png")
    assert x.shape == (3, 12, 17)
    assert np.allclose(x[0].numpy(), ref / 255.0, atol=1e-6)


def _cases():
    rgb = RNG.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    grey = RNG.integers(0, 256, size=(9, 11), dtype=np.uint8)
    f = RNG.random((9, 11)).astype(np.float32)
    i8 = grey.astype(np.int32)
    i16 = RNG.integers(256, 65536, size=(9, 11)).astype(np.int32)
    rgba = np.concatenate([rgb, RNG.integers(0, 256, size=(9, 11, 1), dtype=np.uint8)], axis=2)
    three = lambda g: np.repeat(g[:, :, None], 3, axis=2)  # noqa: E731
    return {
        "RGB": (Image.fromarray(rgb), rgb, "png"),
        "L": (Image.fromarray(grey), three(grey), "png"),
        "RGBA": (Image.fromarray(rgba), rgb, "png"),
        "LA": (Image.fromarray(grey).convert("LA"), three(grey), "png"),
        "F": (Image.fromarray(f), three(np.rint(f * 255).astype(np.uint8)), "tiff"),
        "I (8-bit values)": (Image.fromarray(i8), three(grey), "tiff"),
        "I (16-bit values)": (Image.fromarray(i16), three(np.rint(i16 / 257.0).astype(np.uint8)), "tiff"),
        "CMYK": (Image.fromarray(rgb).convert("CMYK"), np.asarray(Image.fromarray(rgb).convert("CMYK").convert("RGB")), "tiff"),
    }


@pytest.mark.parametrize("mode", list(_cases()))
def test_modes_against_references(tmp_path, mode) -> None:
    im, ref, fmt = _cases()[mode]
    path = tmp_path / f"x.{fmt}"
    im.save(path)
    assert np.array_equal(read_rgb(path), ref), mode


def test_decompression_bomb_is_one_line(tmp_path, monkeypatch) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels > 2x the limit: Pillow raises
    with pytest.raises(DataError, match="too large to decode safely") as e:
        read_rgb(tmp_path / "bomb.png")
    assert "\n" not in str(e.value)


def test_not_an_image_is_one_line(tmp_path) -> None:
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        read_rgb(tmp_path / "x.png")


def test_not_an_image_is_one_line_after_ultralytics_patched_pil(tmp_path) -> None:
    require("ultralytics")
    import ultralytics.utils.patches  # noqa: F401 - replaces PIL.Image.open with a wrapper that wants pi-heif

    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        read_rgb(tmp_path / "x.png")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` 8-bit grey pixels and holds none (under 100 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_huge_header_is_one_line_before_decoding_in_predict_and_datasets(tmp_path) -> None:
    """12000x12000 (a 140 KB black PNG: 1.7 GB as a float image): refused by its header with one
    error and no Pillow warning, in predict and in a dataset (without the check, Pillow would
    start decoding and fail on the missing pixels instead)."""
    from surgery.data.loader import build_dataset
    from surgery.data.synth import synthesize
    from surgery.deployment.predict import Predictor, predict_files

    big = tmp_path / "big.png"
    big.write_bytes(_png_header(12000, 12000))
    refused = "12000x12000 pixels, more than 67 MP; refused before decoding"
    synthesize(tmp_path / "d", images=2, size=64, val_images=1)
    ds = build_dataset(str(tmp_path / "d"), "val", train=False)
    ds.records[0].path.write_bytes(big.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would be a second line
        with pytest.raises(DataError, match=refused):
            read_rgb(big)
        with pytest.raises(DataError, match=f"image {big} is {refused}"):
            predict_files(Predictor(None, None, "never run"), [big])  # type: ignore[arg-type]
        with pytest.raises(DataError, match=f"dataset .*{refused}"):
            ds.load_image(0)
