"""Image/video processors of the Qwen VL families, matching transformers 5.23.

Images follow ``Qwen2VLImageProcessorPil`` exactly (``pixel_values`` bit-identical): ``smart_resize``
to multiples of patch x merge within [min_pixels, max_pixels], Pillow bicubic resize, rescale in
float64 then float32, ``(x - mean) / std`` in float32, and the patch layout
(t, h/m, w/m, m, m | C, T, p, p) with a single image repeated to ``temporal_patch_size``.
Videos use the same per-frame arithmetic, stacked as temporal patches (the last frame repeated
to fill the final patch). transformers resizes videos with torchvision (not installable here),
so video pixels match its PIL image path, not its torchvision resize; frame sampling, sizes,
grids, timing and prompt text match its video processors.

A request-level cap (``max_pixels_per_request``, default 16 Mi pixels over all images and
sampled frames after resizing) shrinks every item in proportion, with a warning, before any
pixel is decoded; headers are checked first (see ``media.py``).
"""

import hashlib
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..errors import ConfigError, MediaError, PromptError
from .inputs import VisualInputs
from .media import ImageInput, MediaLimits, OpenedImage, open_image, pixel_hash
from .video import (
    VideoInput,
    VideoSource,
    frame_indices,
    open_video,
    qwen3_timestamps,
    sampled_fps,
    smart_resize_video,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
DEFAULT_MAX_PIXELS_PER_REQUEST = 16 * 1024 * 1024
FAMILIES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl"}
IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


class PixelCapWarning(UserWarning):
    """Images/videos of a request were resized down to fit ``max_pixels_per_request``."""


def family_of(model_type: str) -> str:
    """Processor family of a model_type: qwen2_vl, qwen2_5_vl or qwen3_vl."""
    if model_type not in FAMILIES:
        raise ConfigError(f"no VL processor for model_type {model_type!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> Tuple[int, int]:
    """(h, w) multiples of ``factor`` near the input aspect ratio with min_pixels <= h * w <= max_pixels
    (transformers ``smart_resize``). Example: 300x451 at factor 28 -> 308x448 (rounded; in range)."""
    if min(height, width) <= 0:
        raise MediaError(f"empty image {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"{width}x{height}: aspect ratio {max(height, width) / min(height, width):.1f} "
                         "is over 200, which the Qwen VL processors do not accept")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of ``preprocessor_config.json`` the Qwen VL processors use.
    ``min_pixels``/``max_pixels`` are ``size.shortest_edge``/``size.longest_edge``."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: Tuple[float, ...] = CLIP_MEAN
    image_std: Tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = 3  # PIL bicubic

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, base: "ImageProcessorConfig" = None):
        """Overlay a (video_)preprocessor_config.json dict on ``base`` (the family defaults)."""
        base = base or cls()
        if not isinstance(d, dict):
            raise ConfigError(f"processor config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        kw = {k: d[k] for k in names & d.keys() if d[k] is not None and k not in ("min_pixels", "max_pixels")}
        size = d.get("size") or {}
        if not isinstance(size, dict):
            raise ConfigError(f"processor config 'size' must be an object, got {size!r}")
        for key, ours in (("shortest_edge", "min_pixels"), ("min_pixels", "min_pixels"),
                          ("longest_edge", "max_pixels"), ("max_pixels", "max_pixels")):
            if size.get(key) is not None:
                kw[ours] = size[key]
        for ours in ("min_pixels", "max_pixels"):  # top-level legacy keys win, as in transformers
            if d.get(ours) is not None:
                kw[ours] = d[ours]
        for k in ("image_mean", "image_std"):
            if k in kw:
                v = kw[k]
                kw[k] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
        cfg = replace(base, **kw)
        cfg.validate()
        return cfg

    def validate(self):
        for k in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"processor config: {k} must be a positive integer, got {v!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0.0 in self.image_std:
            raise ConfigError(f"processor config: image_mean/image_std need 3 values (std non-zero), "
                              f"got {self.image_mean} / {self.image_std}")
        if self.resample not in (0, 1, 2, 3, 4, 5):
            raise ConfigError(f"processor config: unknown resample filter {self.resample!r}")


@dataclass(frozen=True)
class VideoProcessorConfig(ImageProcessorConfig):
    """``video_preprocessor_config.json``: the image fields plus frame sampling. ``fps`` is the
    sampling rate (2, as in the Qwen model cards); ``num_frames``, when set, replaces it."""

    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 28 * 28 * 768
    fps: Optional[float] = 2.0
    num_frames: Optional[int] = None
    min_frames: int = 4
    max_frames: int = 768
    do_sample_frames: bool = True
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000

    def validate(self):
        super().validate()
        for k in ("min_frames", "max_frames", "max_video_tokens", "num_frames"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ConfigError(f"video processor config: {k} must be a positive integer, got {v!r}")
        if self.fps is not None and (not isinstance(self.fps, (int, float)) or self.fps <= 0):
            raise ConfigError(f"video processor config: fps must be positive, got {self.fps!r}")


# transformers' class defaults; Qwen3-VL has no image processor class of its own, so its image
# defaults are the Qwen3-VL checkpoints' preprocessor_config.json (patch 16, mean/std 0.5).
IMAGE_DEFAULTS = {
    "qwen2_vl": ImageProcessorConfig(),
    "qwen2_5_vl": ImageProcessorConfig(),
    "qwen3_vl": ImageProcessorConfig(patch_size=16, min_pixels=65536, max_pixels=16777216,
                                     image_mean=HALF, image_std=HALF),
}
VIDEO_DEFAULTS = {
    "qwen2_vl": VideoProcessorConfig(),
    "qwen2_5_vl": VideoProcessorConfig(),
    "qwen3_vl": VideoProcessorConfig(patch_size=16, min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768,
                                     image_mean=HALF, image_std=HALF, max_video_tokens=768),
}


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable JSON ({e})") from None


def load_processor_configs(model_dir, model_type: Optional[str] = None):
    """(family, ImageProcessorConfig, VideoProcessorConfig) of a checkpoint directory, read with
    transformers' priority: processor_config.json's nested entry, then
    (video_)preprocessor_config.json, then (for video) preprocessor_config.json, then defaults."""
    d = Path(model_dir)
    if model_type is None:
        model_type = (_read_json(d / "config.json") or {}).get("model_type")
    family = family_of(model_type)
    proc = _read_json(d / "processor_config.json") or {}
    pre = _read_json(d / "preprocessor_config.json")
    img = proc.get("image_processor") or pre or {}
    vid = proc.get("video_processor") or _read_json(d / "video_preprocessor_config.json") or pre or {}
    return (family, ImageProcessorConfig.from_dict(img, IMAGE_DEFAULTS[family]),
            VideoProcessorConfig.from_dict(vid, VIDEO_DEFAULTS[family]))


def num_placeholder_tokens(grid_thw, merge_size: int = 2) -> int:
    """Placeholder tokens of one image/video: t * h * w // merge_size**2."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // merge_size**2


def _lut(cfg: ImageProcessorConfig) -> np.ndarray:
    """(3, 256) float32: every uint8 value through rescale (float64 -> float32) and normalise
    (float32), i.e. exactly the arithmetic of transformers' PIL path, as a table lookup."""
    x = np.arange(256, dtype=np.float64)
    x = (x * cfg.rescale_factor).astype(np.float32) if cfg.do_rescale else x.astype(np.float32)
    x = np.broadcast_to(x, (3, 256))
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, np.float32)[:, None]
        std = np.asarray(cfg.image_std, np.float32)[:, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


def patchify(frames: np.ndarray, cfg: ImageProcessorConfig, out: Optional[np.ndarray] = None):
    """(n, H, W, 3) uint8 frames -> (rows, 3 * T * p * p) float32 patches and (t, h, w) grid.
    One frame (an image) is repeated to T = temporal_patch_size; otherwise the last frame pads n
    up to a multiple of T. Rows are ordered (t, h/m, w/m, m, m), columns (C, T, p, p)."""
    p, m, T = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    n, H, W, C = frames.shape
    if H % (p * m) or W % (p * m):
        raise MediaError(f"{W}x{H} frames are not multiples of patch_size x merge_size = {p * m}")
    if n == 1:
        frames = np.broadcast_to(frames, (T, H, W, C))
    elif n % T:
        frames = np.concatenate([frames, np.repeat(frames[-1:], T - n % T, axis=0)])
    gt, gh, gw = frames.shape[0] // T, H // p, W // p
    x = frames.reshape(gt, T, gh // m, m, p, gw // m, m, p, C).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    u = x.reshape(gt * gh * gw, C, T * p * p)
    if out is None:
        out = np.empty((u.shape[0], C * T * p * p), np.float32)
    lut, o = _lut(cfg), out.reshape(u.shape)
    ops = _vector_ops(cfg, lut)
    if ops is not None:
        o[...] = u
        ops(o)
    else:
        for c in range(C):
            o[:, c] = lut[c][u[:, c]]
    return out, (gt, gh, gw)


def _vector_ops(cfg: ImageProcessorConfig, lut: np.ndarray):
    """In-place float32 rescale + normalise that reproduces ``lut`` bit for bit (checked on all
    256 values; x / 255 does for the usual 1/255, x * float32(1/255) does not), or None."""
    mean = np.asarray(cfg.image_mean, np.float32)[:, None]
    std = np.asarray(cfg.image_std, np.float32)[:, None]
    inv = round(1 / cfg.rescale_factor) if cfg.do_rescale else 0
    for r in ([-np.float32(inv)] if inv > 0 else []) + ([np.float32(cfg.rescale_factor)] if cfg.do_rescale else [None]):
        def ops(x, r=r):  # x: (..., 3, K) float32; r < 0 divides by -r
            if r is not None and r < 0:
                x /= -r
            elif r is not None:
                x *= r
            if cfg.do_normalize:
                x -= mean
                x /= std

        probe = np.repeat(np.arange(256, dtype=np.float32)[None], 3, axis=0)
        ops(probe)
        if np.array_equal(probe, lut):
            return ops
    return None


@dataclass
class _Item:
    kind: str  # "image" | "video"
    src: Union[OpenedImage, VideoSource]
    n: int  # frames (1 for an image)
    h: int = 0
    w: int = 0
    indices: Optional[np.ndarray] = None
    fps: Optional[float] = None

    @property
    def pixels(self) -> int:
        return self.n * self.h * self.w


@dataclass
class VisionProcessor:
    """Processor of one VL family: images and videos -> ``VisualInputs``, and prompt expansion.

    >>> proc = VisionProcessor.from_pretrained("path/to/Qwen2.5-VL-3B-Instruct")
    >>> vi = proc(images=["cat.jpg"], videos=["clip.mp4"])
    >>> prompt = proc.expand_prompt(chat_text, vi)   # each <|image_pad|> -> N copies
    """

    family: str = "qwen2_vl"
    image: ImageProcessorConfig = None
    video: VideoProcessorConfig = None
    max_pixels_per_request: int = DEFAULT_MAX_PIXELS_PER_REQUEST
    limits: MediaLimits = field(default_factory=MediaLimits)

    def __post_init__(self):
        self.family = family_of(self.family)
        self.image = self.image or IMAGE_DEFAULTS[self.family]
        self.video = self.video or VIDEO_DEFAULTS[self.family]

    @classmethod
    def from_pretrained(cls, model_dir, model_type: Optional[str] = None, **kw) -> "VisionProcessor":
        family, image, video = load_processor_configs(model_dir, model_type)
        return cls(family, image, video, **kw)

    # ---- sizes -------------------------------------------------------------------------------
    def image_size(self, height: int, width: int, budget: Optional[int] = None) -> Tuple[int, int]:
        """Resized (h, w) of an image; ``budget`` lowers max_pixels (the request cap)."""
        cfg = self.image
        if not cfg.do_resize:
            return height, width
        max_pixels = cfg.max_pixels if budget is None else min(cfg.max_pixels, budget)
        return smart_resize(height, width, cfg.factor, cfg.min_pixels, max_pixels)

    def video_size(self, n: int, height: int, width: int, budget: Optional[int] = None) -> Tuple[int, int]:
        """Resized (h, w) of the frames of an n-frame clip; ``budget`` bounds n * h * w."""
        cfg = self.video
        if not cfg.do_resize:
            return height, width
        f, T, max_pixels = cfg.factor, cfg.temporal_patch_size, cfg.max_pixels
        if self.family == "qwen3_vl":
            if cfg.cap_pixels_per_frame:
                per_frame = max(min(cfg.max_video_tokens * f * f, max_pixels // n), int(cfg.min_pixels * 1.05))
                max_pixels = per_frame * n
            if budget is not None:
                max_pixels = min(max_pixels, budget)
            return smart_resize_video(n, height, width, T, f, cfg.min_pixels, max_pixels)
        if cfg.cap_pixels_per_frame:
            total = int(cfg.max_video_tokens * f * f * 0.9)
            max_pixels = max(min(max_pixels, total * T // n), int(cfg.min_pixels * 1.05))
        if budget is not None:
            max_pixels = min(max_pixels, budget // n)
        return smart_resize(height, width, f, cfg.min_pixels, max_pixels)

    def num_image_tokens(self, height: int, width: int) -> int:
        h, w = self.image_size(height, width)
        return (h // self.image.patch_size) * (w // self.image.patch_size) // self.image.merge_size**2

    def _fit(self, items: List[_Item]):
        for it in items:
            if it.kind == "image":
                it.h, it.w = self.image_size(it.src.height, it.src.width)
            else:
                it.h, it.w = self.video_size(it.n, it.src.height, it.src.width)
        cap = self.max_pixels_per_request
        total = first = sum(it.pixels for it in items)
        if total <= cap:
            return
        natural = [it.pixels for it in items]
        scale = cap / total
        for _ in range(8):
            for it, px in zip(items, natural):
                budget = max(1, int(px * scale))
                if it.kind == "image":
                    it.h, it.w = self.image_size(it.src.height, it.src.width, budget)
                else:
                    it.h, it.w = self.video_size(it.n, it.src.height, it.src.width, budget)
            total = sum(it.pixels for it in items)
            if total <= cap:
                warnings.warn(f"request needs {first} pixels after resizing, over max_pixels_per_request={cap}: "
                              f"{len(items)} image(s)/video(s) resized down to {total} pixels", PixelCapWarning,
                              stacklevel=3)
                return
            scale *= 0.9 * cap / total
        raise MediaError(f"request needs at least {total} pixels even at the smallest sizes, over "
                         f"max_pixels_per_request={cap}: send fewer images/frames or raise the cap")

    # ---- processing --------------------------------------------------------------------------
    def __call__(self, images: Sequence[ImageInput] = (), videos: Sequence[VideoInput] = (),
                 video_fps: Optional[float] = None) -> VisualInputs:
        """Process a request's images and videos (each list in prompt order). ``video_fps`` is
        the frame rate of videos given as frame lists/arrays."""
        images = [images] if _single(images) else list(images or [])
        single = isinstance(videos, VideoSource) or (_single(videos) and not isinstance(videos, Image.Image))
        videos = [videos] if single else list(videos or [])
        items = [_Item("image", open_image(x, self.limits), 1) for x in images]
        for v in videos:
            src = open_video(v, video_fps, self.limits)
            idx, fps = frame_indices(self.family, src, self.video)
            items.append(_Item("video", src, len(idx), indices=idx, fps=fps))
        self._fit(items)
        out = VisualInputs()
        imgs = [it for it in items if it.kind == "image"]
        vids = [it for it in items if it.kind == "video"]
        if imgs:
            out.pixel_values, out.image_grid_thw, out.image_keys = self._images(imgs)
        if vids:
            out.pixel_values_videos, out.video_grid_thw, out.video_keys = self._videos(vids)
            T = self.video.temporal_patch_size
            if self.family == "qwen2_5_vl":
                out.second_per_grid_ts = np.array(
                    [T / sampled_fps(it.n, it.src.total_num_frames, it.fps) for it in vids], np.float32)
            if self.family == "qwen3_vl":
                out.video_timestamps = [qwen3_timestamps(it.indices, it.fps or 24.0, T) for it in vids]
        return out

    def process_images(self, images: Sequence[ImageInput]) -> VisualInputs:
        return self(images=images)

    def process_video(self, video: VideoInput, fps: Optional[float] = None) -> VisualInputs:
        return self(videos=[video], video_fps=fps)

    def _alloc(self, items, cfg):
        p, T = cfg.patch_size, cfg.temporal_patch_size
        rows = [(-(-it.n // T) if it.kind == "video" else 1) * (it.h // p) * (it.w // p) for it in items]
        return np.empty((sum(rows), 3 * T * p * p), np.float32), np.cumsum([0] + rows)

    def _images(self, items: List[_Item]):
        cfg = self.image
        pv, starts = self._alloc(items, cfg)
        grids, keys = [], []
        for it, a, b in zip(items, starts[:-1], starts[1:]):
            rgb = it.src.decode()
            if rgb.size == (it.src.height, it.src.width) != (it.src.width, it.src.height):
                it.h, it.w = it.w, it.h  # a late PNG EXIF rotation: smart_resize is symmetric
            h = pixel_hash(np.asarray(rgb))
            if rgb.size != (it.w, it.h):
                rgb = rgb.resize((it.w, it.h), cfg.resample)
            _, grid = patchify(np.asarray(rgb)[None], cfg, out=pv[a:b])
            grids.append(grid)
            keys.append(_key(h, grid, cfg))
        return pv, np.array(grids, np.int64), keys

    def _videos(self, items: List[_Item]):
        cfg = self.video
        pv, starts = self._alloc(items, cfg)
        grids, keys = [], []
        for it, a, b in zip(items, starts[:-1], starts[1:]):
            h = hashlib.sha256(repr(it.indices.tolist()).encode())
            frames = it.src.read(it.indices, (it.h, it.w), hasher=h)
            _, grid = patchify(frames, cfg, out=pv[a:b])
            grids.append(grid)
            keys.append(_key(h, grid, cfg))
        return pv, np.array(grids, np.int64), keys

    def expand_prompt(self, text: str, visual_inputs: VisualInputs) -> str:
        return expand_prompt(text, visual_inputs, self.family, self.image.merge_size, self.video.merge_size)


def _single(x) -> bool:
    return isinstance(x, (str, bytes, bytearray, np.ndarray, Image.Image)) or hasattr(x, "__fspath__")


def _key(h, grid, cfg) -> str:
    """Feature-cache key: decoded content + resized grid + processor settings."""
    h = h.copy()
    h.update(repr(grid).encode())
    h.update(cfg.fingerprint().encode())
    return h.hexdigest()


_PAD = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")


def expand_prompt(text: str, visual_inputs: VisualInputs, family: str, merge_size: int = 2,
                  video_merge_size: Optional[int] = None) -> str:
    """Expand each ``<|image_pad|>`` / ``<|video_pad|>`` (in order) to its placeholder tokens, as
    the transformers processors do. Qwen3-VL videos become, per temporal grid step,
    ``<{t:.1f} seconds><|vision_start|>`` + h*w/m^2 video pads + ``<|vision_end|>``."""
    family = family_of(family)
    vm = video_merge_size or merge_size
    n_img = text.count(IMAGE_TOKEN)
    n_vid = text.count(VIDEO_TOKEN)
    if n_img != visual_inputs.n_images or n_vid != visual_inputs.n_videos:
        raise PromptError(f"the prompt has {n_img} {IMAGE_TOKEN} and {n_vid} {VIDEO_TOKEN} placeholders "
                          f"for {visual_inputs.n_images} image(s) and {visual_inputs.n_videos} video(s)")
    if family == "qwen3_vl" and n_vid and visual_inputs.video_timestamps is None:
        raise PromptError("Qwen3-VL video prompts need the video timestamps (VisualInputs.video_timestamps)")
    counter = {IMAGE_TOKEN: 0, VIDEO_TOKEN: 0}

    def sub(m):
        tok = m.group(0)
        i = counter[tok]
        counter[tok] += 1
        if tok == IMAGE_TOKEN:
            return IMAGE_TOKEN * num_placeholder_tokens(visual_inputs.image_grid_thw[i], merge_size)
        grid = visual_inputs.video_grid_thw[i]
        if family != "qwen3_vl":
            return VIDEO_TOKEN * num_placeholder_tokens(grid, vm)
        per_step = int(grid[1]) * int(grid[2]) // vm**2
        stamps = visual_inputs.video_timestamps[i]
        if len(stamps) != int(grid[0]):
            raise PromptError(f"video {i}: {len(stamps)} timestamps for {int(grid[0])} temporal grid steps")
        return "".join(f"<{t:.1f} seconds>{VISION_START}{VIDEO_TOKEN * per_step}{VISION_END}" for t in stamps)

    return _PAD.sub(sub, text)
