import io

import numpy as np
import pytest
from PIL import Image

from raypdm.data.decode import ImageDecodeError, decode_image, encode_png


def _bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_png_round_trip(astronaut):
    assert np.array_equal(decode_image(encode_png(astronaut)), astronaut)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1"])
def test_modes_become_rgb_uint8(astronaut, mode):
    img = Image.fromarray(astronaut).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(_bytes(img, fmt))
    assert out.dtype == np.uint8 and out.shape == (512, 512, 3)


def test_grayscale_is_replicated(astronaut):
    gray = Image.fromarray(astronaut).convert("L")
    out = decode_image(_bytes(gray))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], np.asarray(gray))


def test_sixteen_bit_is_scaled_to_eight():
    arr16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    img = Image.fromarray(arr16)  # mode I;16
    out = decode_image(_bytes(img))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    assert out[..., 0].max() == round(63000 / 65535 * 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = decode_image(_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.shape == (20, 10, 3)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"this is not an image at all", "supported format"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "supported format"),
    ],
)
def test_bad_bytes_raise_with_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_truncated_file_is_an_error(astronaut):
    data = _bytes(Image.fromarray(astronaut), "PNG")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])
    jpg = _bytes(Image.fromarray(astronaut), "JPEG")
    with pytest.raises(ImageDecodeError):
        decode_image(jpg[: len(jpg) // 3])


def test_decompression_bomb_is_refused():
    big = _bytes(Image.new("L", (4000, 3000)))  # compresses to a few KB, 12 MP when decoded
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(big, max_pixels=1_000_000)
    assert decode_image(big).shape == (3000, 4000, 3)


def test_encode_png_rejects_wrong_arrays():
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 3), np.float32))
