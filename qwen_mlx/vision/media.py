"""Safe image loading for the VL processors (Pillow).

Sources: a path, raw bytes, a ``data:`` URI, an http(s) URL (only with
``MediaLimits(allow_urls=True)``), a ``PIL.Image`` or a numpy array (H, W[, C]).
``open_image`` reads only the header: the size (EXIF orientation applied) is known and checked
against ``MediaLimits.max_decode_pixels`` before any pixel is decoded, so a decompression bomb
costs nothing; ``OpenedImage.decode()`` then returns an upright RGB ``PIL.Image``.

RGB conversion follows transformers' ``convert_to_rgb`` (what its image processors apply):
images with an alpha band or a palette transparency are composited onto white, everything else
goes through ``PIL.Image.convert("RGB")``. Two deliberate differences, both about inputs
transformers mangles: 16-bit greyscale (``I;16``/``I``) is scaled to 8 bits (x / 257, rounded)
where ``convert("RGB")`` clips every value above 255 to white, and float arrays are read as
[0, 1] and rounded to uint8.
"""

import base64
import binascii
import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MediaError

ImageInput = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
DEFAULT_MAX_DECODE_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS default (~ 89.5 MP)


@dataclass(frozen=True)
class MediaLimits:
    """Safety limits for reading media. ``max_decode_pixels`` bounds the pixels of any decoded
    image or video frame (JPEGs over it are decoded at 1/2, 1/4 or 1/8 scale instead, with a
    warning); ``max_file_bytes`` bounds image files and every download (videos on disk are
    streamed, never read whole)."""

    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS
    max_file_bytes: int = 512 * 2**20
    allow_urls: bool = False
    url_timeout: float = 20.0


def describe(source) -> str:
    """Short name of a media source for error messages."""
    if isinstance(source, (str, os.PathLike)):
        s = str(source)
        return s if len(s) <= 120 else s[:117] + "..."
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    return f"<{type(source).__name__}>"


def resolve_source(source, limits: MediaLimits, kind: str = "image"):
    """Path-like, URL, data URI or bytes -> (a path string or BytesIO, name). Raises MediaError."""
    name = describe(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise MediaError(f"{name}: empty {kind} data")
        return io.BytesIO(bytes(source)), name
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise MediaError(f"{name}: unsupported {kind} input type {type(source).__name__}")
    if source.startswith(("http://", "https://")):
        return io.BytesIO(_fetch_url(source, limits, kind)), name
    if source.startswith("data:"):
        try:
            header, payload = source.split(",", 1)
            if not header.endswith(";base64"):
                raise ValueError("only base64 data URIs are supported")
            data = base64.b64decode(payload, validate=True)
        except (ValueError, binascii.Error) as e:
            raise MediaError(f"{name}: malformed data URI ({e})") from None
        if not data:
            raise MediaError(f"{name}: empty {kind} data")
        return io.BytesIO(data), "<data URI>"
    path = Path(source).expanduser()
    if not path.is_file():
        raise MediaError(f"{name}: no such {kind} file")
    size = path.stat().st_size
    if size == 0:
        raise MediaError(f"{name}: the file is empty")
    if kind == "image" and size > limits.max_file_bytes:  # videos are streamed from disk
        raise MediaError(f"{name}: {size} bytes is over MediaLimits.max_file_bytes={limits.max_file_bytes}")
    return str(path), name


def _fetch_url(url: str, limits: MediaLimits, kind: str) -> bytes:
    if not limits.allow_urls:
        raise MediaError(f"{describe(url)}: {kind} URLs are not fetched unless allowed "
                         "(MediaLimits(allow_urls=True)); pass a local file or bytes")
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=limits.url_timeout) as r:
            data = r.read(limits.max_file_bytes + 1)
    except (OSError, ValueError) as e:
        raise MediaError(f"{describe(url)}: download failed ({e})") from None
    if len(data) > limits.max_file_bytes:
        raise MediaError(f"{describe(url)}: download is over MediaLimits.max_file_bytes={limits.max_file_bytes}")
    if not data:
        raise MediaError(f"{describe(url)}: empty download")
    return data


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass
class OpenedImage:
    """An image whose header is read and checked; ``height``/``width`` are the upright size
    (except for a PNG whose EXIF chunk follows the pixel data: then the decoded image may come
    out transposed, which the processor handles)."""

    name: str
    height: int
    width: int
    pil: Optional[Image.Image] = None  # lazily decoded file or a caller's image
    array: Optional[np.ndarray] = None  # numpy input, already RGB uint8 (H, W, 3)

    def decode(self) -> Image.Image:
        """Decode to an upright RGB image (raises MediaError for truncated/corrupt data)."""
        if self.array is not None:
            return Image.fromarray(self.array)
        im = self.pil
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
        except (MemoryError, MediaError):
            raise
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
            raise MediaError(f"{self.name}: truncated or corrupt image ({type(e).__name__}: {e})") from None


def open_image(source: ImageInput, limits: Optional[MediaLimits] = None) -> OpenedImage:
    """Read and check an image's header without decoding its pixels."""
    limits = limits or MediaLimits()
    if isinstance(source, np.ndarray):
        a = array_to_rgb(source)
        return OpenedImage(describe(source), a.shape[0], a.shape[1], array=a)
    if isinstance(source, Image.Image):
        im, name = source, describe(source)
    else:
        fp, name = resolve_source(source, limits, "image")
        im = _open_pil(fp, name)
    w, h = im.size
    if w <= 0 or h <= 0:
        raise MediaError(f"{name}: empty image ({w}x{h})")
    if w * h > limits.max_decode_pixels:
        im = _reduce_or_refuse(im, name, limits.max_decode_pixels)
        w, h = im.size
    orientation = None
    if not (im.format == "PNG" and "exif" not in im.info):  # PNG's getexif() would decode the pixels
        try:
            orientation = im.getexif().get(0x0112)
        except Exception:  # unreadable EXIF: exif_transpose fails loudly at decode
            pass
    if orientation in _TRANSPOSED:
        w, h = h, w
    return OpenedImage(name, h, w, pil=im)


def _open_pil(fp, name: str) -> Image.Image:
    Image.init()  # register every plugin (MPO, WebP, ...) before naming formats
    formats = [f for f in IMAGE_FORMATS if f in Image.OPEN]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
        try:
            return Image.open(fp, formats=formats)
        except Image.DecompressionBombError as e:
            raise MediaError(f"{name}: refused as a possible decompression bomb ({e})") from None
        except UnidentifiedImageError:
            pass
        except MemoryError:
            raise
        except Exception as e:
            raise MediaError(f"{name}: corrupt image header ({type(e).__name__}: {e})") from None
        if hasattr(fp, "seek"):
            fp.seek(0)
        try:  # header only, to name a format we recognise but do not accept
            with Image.open(fp) as other:
                fmt = other.format
        except Exception:
            fmt = None
    if fmt:
        raise MediaError(f"{name}: unsupported image format {fmt} (supported: {', '.join(IMAGE_FORMATS)})")
    raise MediaError(f"{name}: not an image file (or a format Pillow cannot read)")


def _reduce_or_refuse(im: Image.Image, name: str, limit: int) -> Image.Image:
    w, h = im.size
    if im.format in ("JPEG", "MPO"):
        for s in (2, 4, 8):
            if math.ceil(w / s) * math.ceil(h / s) <= limit:
                im.draft(im.mode, (w // s, h // s))
                if im.size[0] * im.size[1] <= limit:
                    warnings.warn(f"{name}: {w}x{h} is over MediaLimits.max_decode_pixels={limit}; "
                                  f"decoding it at 1/{s} scale ({im.size[0]}x{im.size[1]})", stacklevel=3)
                    return im
                break
    raise MediaError(f"{name}: {w}x{h} = {w * h} pixels is over MediaLimits.max_decode_pixels={limit} "
                     "(possible decompression bomb); raise the limit to accept it")


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB the way transformers' convert_to_rgb does (alpha composited onto white); 16-bit
    greyscale scaled to 8 bits."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def array_to_rgb(a: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) with C in 1/3/4 -> RGB uint8 (H, W, 3). Alpha is composited
    onto white with transformers' numpy formula."""
    a = np.asarray(a)
    name = describe(a)
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise MediaError(f"{name}: an image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.round(a / 257.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise MediaError(f"{name}: float image arrays must hold values in [0, 1]")
        a = np.round(a * 255.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:
        if a.min() < 0 or a.max() > 255:
            raise MediaError(f"{name}: integer image arrays must hold values in [0, 255]")
        a = a.astype(np.uint8)
    elif a.dtype != np.uint8:
        raise MediaError(f"{name}: unsupported image array dtype {a.dtype}")
    c = a.shape[-1]
    if c == 1:
        a = np.repeat(a, 3, axis=-1)
    elif c == 4:
        alpha = a[..., 3:4] / 255
        a = np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def load_image(source: ImageInput, limits: Optional[MediaLimits] = None) -> Image.Image:
    """Open, check and decode an image: an upright RGB ``PIL.Image``."""
    return open_image(source, limits).decode()


def pixel_hash(a: np.ndarray, h=None) -> "hashlib._Hash":
    """sha256 over the shape and bytes of decoded pixels (the content part of a feature-cache key)."""
    h = h or hashlib.sha256()
    h.update(repr(tuple(a.shape)).encode())
    h.update(np.ascontiguousarray(a).data)
    return h


def image_size(source: ImageInput, limits: Optional[MediaLimits] = None) -> Tuple[int, int]:
    """(height, width) of an image, upright, from its header only."""
    o = open_image(source, limits)
    return o.height, o.width
