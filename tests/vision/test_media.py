"""Safe image loading: sources, EXIF, colour modes (against transformers' conversions), and the
errors for bombs, truncated/corrupt/unsupported files. No network: URLs go through a fake urlopen."""

import base64
import io
import struct
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

from qwen_mlx.errors import MediaError, QwenMLXError
from qwen_mlx.vision.media import MediaLimits, array_to_rgb, image_size, load_image, open_image
from qwen_mlx.vision.processing import VisionProcessor

skdata = pytest.importorskip("skimage.data")


def encode(a, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h but carries one row of data: what a bomb looks like to a header reader."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * w)))
            + chunk(b"IEND", b""))


def test_every_source_kind_decodes_to_the_same_pixels(tmp_path):
    a = skdata.chelsea()[:53, :71]
    data = encode(a)
    path = tmp_path / "cat.png"
    path.write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    for src in (path, str(path), data, bytearray(data), uri, Image.fromarray(a), a, np.moveaxis(a, -1, 0)):
        im = load_image(src)
        assert im.mode == "RGB" and im.size == (71, 53)
        np.testing.assert_array_equal(np.asarray(im), a)
    assert image_size(path) == (53, 71)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_transformers_load_image(tmp_path, orientation):
    from transformers.image_utils import load_image as hf_load_image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(skdata.chelsea()[:61, :97]).save(path, exif=exif, quality=95)
    ref = hf_load_image(str(path))
    opened = open_image(path)  # header only: the upright size is known before decoding
    assert (opened.width, opened.height) == ref.size == ((61, 97) if orientation >= 5 else (97, 61))
    np.testing.assert_array_equal(np.asarray(opened.decode()), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(load_image(Image.open(path))), np.asarray(ref))
    vi = VisionProcessor("qwen2_vl")(images=[path])
    np.testing.assert_array_equal(vi.pixel_values, Qwen2VLImageProcessorPil()(images=[ref], return_tensors="np")["pixel_values"])


def test_colour_modes_follow_transformers_convert_to_rgb():
    from transformers.image_transforms import convert_to_rgb

    a = skdata.astronaut()[:40, :50]
    alpha = np.linspace(0, 255, 50).astype(np.uint8)[None].repeat(40, 0)
    rgba = Image.fromarray(np.dstack([a, alpha]))
    pal = Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    modes = [rgba, rgba.convert("LA"), pal, pal_t, Image.fromarray(a).convert("CMYK"),
             Image.fromarray(skdata.camera()[:40, :50]), Image.fromarray(a).convert("1"), Image.fromarray(a).convert("YCbCr")]
    for im in modes:
        np.testing.assert_array_equal(np.asarray(load_image(im)), convert_to_rgb(im, return_numpy=True), err_msg=im.mode)
    # alpha is composited onto white, not dropped
    assert np.asarray(load_image(rgba))[:, 0].min() == 255
    # numpy RGBA: transformers' numpy formula
    arr = np.dstack([a, alpha])
    np.testing.assert_array_equal(array_to_rgb(arr), convert_to_rgb(arr, return_numpy=True))


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    from transformers.image_transforms import convert_to_rgb

    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(ramp).save(path)
    ours = np.asarray(load_image(path))
    expected = np.round(ramp / 257.0).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(ours[..., c], expected)
    np.testing.assert_array_equal(array_to_rgb(ramp)[..., 0], expected)
    # transformers clips to 255, turning almost the whole ramp white: a deliberate difference
    theirs = convert_to_rgb(Image.open(path), return_numpy=True)
    assert (theirs == 255).mean() > 0.99 and (ours == 255).mean() < 0.01


def test_array_inputs_are_validated():
    a = np.zeros((4, 5, 3), np.float32)
    np.testing.assert_array_equal(array_to_rgb(a + 1.0), np.full((4, 5, 3), 255, np.uint8))
    assert array_to_rgb(np.ones((4, 5), bool)).max() == 255
    for bad, match in [(a + 2, r"\[0, 1\]"), (a * np.nan, r"\[0, 1\]"), (np.zeros((6, 5, 2)), "C in 1, 3, 4"),
                       (np.zeros((2, 3, 4, 5)), "C in 1, 3, 4"), (np.zeros((0, 5, 3), np.uint8), "C in 1, 3, 4"),
                       (np.full((4, 5), 300, np.int32), r"\[0, 255\]"), (np.zeros((4, 5), complex), "dtype")]:
        with pytest.raises(MediaError, match=match):
            array_to_rgb(bad)


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    huge = tmp_path / "bomb.png"
    huge.write_bytes(png_header(30000, 30000))  # 900 Mpx: Pillow's own bomb check
    with pytest.raises(MediaError, match="decompression bomb"):
        open_image(huge)
    big = tmp_path / "big.png"
    big.write_bytes(png_header(10000, 10000))  # 100 Mpx: over our default limit, under Pillow's error
    with pytest.raises(MediaError, match="max_decode_pixels=89478485"):
        open_image(big)
    with pytest.raises(MediaError, match="max_decode_pixels"):
        VisionProcessor("qwen2_vl")(images=[big])
    # the limit is configurable
    png = encode(skdata.astronaut())
    with pytest.raises(MediaError, match="max_decode_pixels=100000"):
        open_image(png, MediaLimits(max_decode_pixels=100_000))
    # a JPEG over the limit is decoded at a reduced scale instead, never at full size
    jpg = encode(skdata.astronaut(), "JPEG")
    with pytest.warns(UserWarning, match="1/2 scale"):
        im = load_image(jpg, MediaLimits(max_decode_pixels=100_000))
    assert im.size == (256, 256)
    with pytest.raises(MediaError, match="max_decode_pixels=1000"):
        open_image(jpg, MediaLimits(max_decode_pixels=1000))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_raise(tmp_path, fmt):
    data = encode(skdata.coffee(), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(MediaError, match="truncated or corrupt"):
        load_image(path)
    with pytest.raises(MediaError, match="truncated or corrupt"):
        VisionProcessor("qwen2_vl")(images=[data[: len(data) // 2]])


def test_corrupt_unsupported_and_missing_files_raise(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n" * 20)
    pcx = tmp_path / "old.pcx"
    Image.fromarray(skdata.astronaut()[:20, :20]).save(pcx)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    header_only = png_header(64, 64)[:40]
    cases = [(text, "not an image"), (pcx, "unsupported image format PCX"), (empty, "empty"),
             (tmp_path / "missing.png", "no such image file"), (tmp_path, "no such image file"),
             (b"", "empty image data"), (header_only, "corrupt|truncated|not an image"),
             ("data:image/png;base64,@@@", "malformed data URI"), (3.5, "unsupported image input type float")]
    for src, match in cases:
        with pytest.raises(MediaError, match=match):
            load_image(src)
    assert issubclass(MediaError, QwenMLXError)


def test_urls_need_permission_and_are_size_limited(monkeypatch):
    data = encode(skdata.rocket()[:30, :40])
    calls = []

    def fake_urlopen(url, timeout):
        calls.append((url, timeout))
        return io.BytesIO(data)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    url = "https://example.com/rocket.png"
    with pytest.raises(MediaError, match="allow_urls=True"):
        load_image(url)
    assert calls == []  # nothing was fetched
    im = load_image(url, MediaLimits(allow_urls=True, url_timeout=3))
    assert im.size == (40, 30) and calls == [(url, 3)]
    with pytest.raises(MediaError, match="max_file_bytes"):
        load_image(url, MediaLimits(allow_urls=True, max_file_bytes=100))

    def failing(url, timeout):
        raise OSError("connection refused")

    monkeypatch.setattr(urllib.request, "urlopen", failing)
    with pytest.raises(MediaError, match="download failed"):
        load_image(url, MediaLimits(allow_urls=True))


def png_chunks(data: bytes):
    pos, out = 8, []
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        out.append(data[pos:pos + 12 + n])
        pos += 12 + n
    return out


@pytest.mark.parametrize("late", [False, True])
def test_png_exif_rotation_before_or_after_the_pixels(tmp_path, late):
    """Pillow reads a PNG's eXIf chunk only when it follows IDAT by decoding: the header size is
    then the stored one, and the processor swaps the target once the decoded image comes out
    rotated (smart_resize is symmetric)."""
    from transformers.image_utils import load_image as hf_load_image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(skdata.rocket()[:70, :150]).save(buf, format="PNG", exif=exif)
    chunks = png_chunks(buf.getvalue())
    kinds = [c[4:8] for c in chunks]
    assert kinds.index(b"eXIf") < kinds.index(b"IDAT")
    if late:
        ex = chunks.pop(kinds.index(b"eXIf"))
        chunks.insert(len(chunks) - 1, ex)
    path = tmp_path / "rot.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(chunks))
    ref = hf_load_image(str(path))
    assert ref.size == (70, 150)
    assert image_size(path) == ((150, 70) if not late else (70, 150))
    vi = VisionProcessor("qwen2_vl")(images=[path])
    r = Qwen2VLImageProcessorPil()(images=[ref], return_tensors="np")
    np.testing.assert_array_equal(vi.image_grid_thw, r["image_grid_thw"])
    np.testing.assert_array_equal(vi.pixel_values, r["pixel_values"])
