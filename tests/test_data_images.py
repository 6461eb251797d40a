"""Image loading on real files: bad ones are counted (or raise with strict=True),
unusual modes load as the right RGB pixels, LLaVA's pad-to-square."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fastvlm.data.images import BadImageCounter, BadImageError, load_image, open_image
from fastvlm.models.preprocess import ImagePreprocessor, expand_to_square


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height with almost no pixel data: what a
    decompression bomb looks like before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _encoded(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, fmt)
    return buffer.getvalue()


def write_bad_files(root, rng) -> dict[str, str]:
    """Real broken files -> the reason each must be counted under."""
    photo = rng.integers(0, 256, size=(96, 80, 3), dtype=np.uint8)
    jpeg, png = _encoded(photo, "JPEG"), _encoded(photo, "PNG")
    files = {
        "truncated.jpg": (jpeg[:len(jpeg) // 2], "truncated"),
        "truncated.png": (png[:len(png) * 2 // 3], "truncated"),
        "zero.png": (b"", "empty"),
        "text.jpg": (b"this is not an image, just text named .jpg\n", "corrupt"),
        "garbage.png": (b"\x89PNG\r\n\x1a\n" + rng.bytes(200), "corrupt"),
        "one_pixel.png": (_encoded(photo[:1, :1], "PNG"), "too_small"),
        "bomb.png": (_png_header_only(20000, 20000), "too_large"),  # over 2x PIL's limit: PIL raises
        "big.png": (_png_header_only(10000, 9000), "too_large"),  # over PIL's limit: PIL only warns
        "sliver.png": (_encoded(np.zeros((8, 4000, 3), np.uint8), "PNG"), "extreme_aspect"),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()} | {"missing.jpg": "missing"}


PRE = ImagePreprocessor.for_family("clip", 28)


def test_bad_files_are_counted_by_reason(tmp_path, seed):
    expected = write_bad_files(tmp_path, np.random.default_rng(seed))
    counter = BadImageCounter()
    for name in expected:
        assert load_image(tmp_path / name, PRE, counter=counter) is None, name
    want = {}
    for reason in expected.values():
        want[reason] = want.get(reason, 0) + 1
    assert dict(counter.counts) == want
    assert all(str(tmp_path / n) in counter.examples[r] for n, r in expected.items())
    report = counter.report()
    assert "truncated 2" in report and "missing 1" in report
    assert counter.as_dict()["total"] == len(expected)


def test_bad_files_strict_raise_with_the_file_name(tmp_path, seed):
    expected = write_bad_files(tmp_path, np.random.default_rng(seed))
    for name, reason in expected.items():
        with pytest.raises(ValueError, match=f"{name}: {reason} image") as err:
            load_image(tmp_path / name, PRE, strict=True)
        assert isinstance(err.value, BadImageError) and err.value.reason == reason


def test_size_limits_are_configurable(tmp_path, seed):
    array = np.random.default_rng(seed).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    (tmp_path / "small.png").write_bytes(_encoded(array, "PNG"))
    assert open_image(tmp_path / "small.png", min_size=4).size == (6, 4)
    with pytest.raises(BadImageError, match="too_large"):
        open_image(tmp_path / "small.png", min_size=1, max_pixels=20)


def _rgb(tmp_path, name: str, data: bytes) -> np.ndarray:
    (tmp_path / name).write_bytes(data)
    image = open_image(tmp_path / name, min_size=1)
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def test_unusual_modes_load_as_rgb(tmp_path, seed):
    rng = np.random.default_rng(seed)
    h, w = 24, 20
    # 16-bit grayscale: scaled to 8 bits (PIL's own convert would clip it to white)
    gray16 = rng.integers(0, 65536, size=(h, w)).astype(np.uint16)
    got = _rgb(tmp_path, "gray16.png", _encoded(gray16, "PNG"))
    want = (gray16.astype(np.int64) * 255 + 32767) // 65535
    assert np.array_equal(got, np.repeat(want[..., None], 3, -1))
    # palette: each index becomes its palette colour; the transparent index is white
    palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, size=(h, w)).astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    assert np.array_equal(_rgb(tmp_path, "palette.png", buffer.getvalue()), palette[index])
    clear = int(index[0, 0])
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=clear)
    want = np.where((index == clear)[..., None], 255, palette[index])
    assert np.array_equal(_rgb(tmp_path, "palette_t.png", buffer.getvalue()), want)
    # RGBA: composited onto white; one unit of rounding of the 8-bit blend
    rgba = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    alpha = rgba[..., 3:].astype(np.float64) / 255
    want = rgba[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(_rgb(tmp_path, "rgba.png", _encoded(rgba, "PNG")) - want).max() <= 1
    # CMYK, lossless (TIFF): PIL's CMYK -> RGB of the same pixels
    cmyk = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    want = np.asarray(Image.fromarray(cmyk, "CMYK").convert("RGB")).astype(np.int64)
    assert np.array_equal(_rgb(tmp_path, "cmyk.tif", _encoded(cmyk, "TIFF", "CMYK")), want)


def test_cmyk_jpeg(tmp_path, seed):
    """A CMYK JPEG (as print workflows export) of flat colour blocks decodes to RGB:
    at quality 100 JPEG keeps a flat block's colour (its DC term) to within rounding."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(2, 2, 4), dtype=np.uint8)
    cmyk = np.kron(colours, np.ones((16, 16, 1), dtype=np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(cmyk, "CMYK").save(buffer, "JPEG", quality=100)
    got = _rgb(tmp_path, "cmyk.jpg", buffer.getvalue())
    want = np.asarray(Image.fromarray(cmyk, "CMYK").convert("RGB")).astype(np.int64)
    for by in (0, 16):
        for bx in (0, 16):
            block = (slice(by + 4, by + 12), slice(bx + 4, bx + 12))  # away from edges, where JPEG rings
            assert np.abs(got[block] - want[block]).max() <= 1, (by, bx)


def test_load_image_preprocesses(tmp_path, seed):
    array = np.random.default_rng(seed).integers(0, 256, size=(40, 52, 3), dtype=np.uint8)
    (tmp_path / "ok.png").write_bytes(_encoded(array, "PNG"))
    got = load_image(tmp_path / "ok.png", PRE)
    assert got.shape == (3, 28, 28)
    torch.testing.assert_close(got, PRE([Image.fromarray(array)])[0], rtol=0, atol=0)


def test_pad_to_square_is_llavas_expand2square(seed):
    """LLaVA-1.5 `image_aspect_ratio: pad`: centre on a square of the mean colour
    (as 8-bit), then the usual resize: nothing is cropped away."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.choice([[30, 50], [50, 30], [31, 44]]))
    array = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    side = max(h, w)
    fill = np.array([int(m * 255) for m in PRE.mean], dtype=np.uint8)
    canvas = np.broadcast_to(fill, (side, side, 3)).copy()
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = array
    padded = ImagePreprocessor(28, 28, PRE.mean, PRE.std, pad_to_square=True)
    got = padded([Image.fromarray(array)])
    want = PRE([Image.fromarray(canvas)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert np.array_equal(np.asarray(expand_to_square(Image.fromarray(array), tuple(fill.tolist()))), canvas)


def test_counter_take_new_and_merge():
    a = BadImageCounter()
    a.add("corrupt", "x.jpg")
    first = a.take_new()
    a.add("corrupt", "y.jpg")
    a.add("missing", "z.jpg")
    second = a.take_new()
    assert dict(first.counts) == {"corrupt": 1} and dict(second.counts) == {"corrupt": 1, "missing": 1}
    assert second.examples == {"corrupt": ["y.jpg"], "missing": ["z.jpg"]} and a.take_new().total == 0
    total = BadImageCounter()
    total.merge(first)
    total.merge(second)
    assert dict(total.counts) == dict(a.counts) and total.examples["corrupt"] == ["x.jpg", "y.jpg"]
