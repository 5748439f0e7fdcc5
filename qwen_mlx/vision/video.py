"""Video input: decoding with PyAV (the optional ``video`` extra), the frame-sampling rules of
each family and their timing metadata.

Sampling follows transformers 5.23: Qwen2-VL / Qwen2.5-VL use ``Qwen2VLVideoProcessor.sample_frames``
(frame count from fps, clamped to [min_frames, max_frames], floored to a multiple of the temporal
patch, indices ``arange(0, total, total / n)`` truncated), Qwen3-VL uses
``Qwen3VLVideoProcessor.sample_frames`` (``int(total / video_fps * fps)`` clamped, indices
``linspace(0, total - 1, n)`` rounded). Frames are decoded in stream order like transformers'
``read_video_pyav`` and each kept frame is resized at once, so memory stays at the output size.

Where transformers fails we stay usable: a stream that does not report its frame count is
counted by demuxing, a clip shorter than the temporal patch is padded with its last frame, and
frames with an unknown frame rate are taken at 24 fps (Qwen3-VL, as transformers does) or all
used (Qwen2 families, whose transformers processor does not sample by default).
"""

import math
import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..errors import MediaError
from .media import MediaLimits, array_to_rgb, describe, open_image, pixel_hash, resolve_source

DEFAULT_FPS = 24.0  # what transformers assumes when a video's frame rate is unknown


def _import_av():
    try:
        import av
    except ImportError:
        raise MediaError("video input needs PyAV: pip install 'qwen-mlx[video]' (or pip install av)") from None
    return av


@dataclass
class VideoSource:
    """A video whose header is read: frame count, frame rate (None when unknown) and size.
    ``frames`` holds caller-given frames (T, H, W, 3) uint8; otherwise ``fp`` is re-read."""

    name: str
    total_num_frames: int
    fps: Optional[float]
    height: int
    width: int
    fp: object = None
    frames: Optional[np.ndarray] = None

    def read(self, indices: Sequence[int], size: Optional[Tuple[int, int]] = None, hasher=None) -> np.ndarray:
        """The frames at ``indices`` (any order, repeats allowed) as (n, h, w, 3) uint8, each resized
        to ``size`` = (h, w) with Pillow's bicubic filter; ``hasher`` sees every decoded frame."""
        idx = [int(i) for i in indices]
        if not idx or min(idx) < 0 or max(idx) >= self.total_num_frames:
            raise MediaError(f"{self.name}: frame indices out of range for {self.total_num_frames} frames")
        h, w = size or (self.height, self.width)
        out = np.empty((len(idx), h, w, 3), np.uint8)
        where = {}
        for j, i in enumerate(idx):
            where.setdefault(i, []).append(j)

        def put(i, rgb):
            if hasher is not None:
                pixel_hash(rgb, hasher)
            if rgb.shape[:2] != (h, w):
                rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BICUBIC))
            out[where[i]] = rgb

        if self.frames is not None:
            for i in sorted(where):
                put(i, self.frames[i])
            return out
        self._decode(sorted(where), put)
        return out

    def _decode(self, wanted: List[int], put) -> None:
        av = _import_av()
        if hasattr(self.fp, "seek"):
            self.fp.seek(0)
        todo, last = set(wanted), wanted[-1]
        try:
            with av.open(self.fp) as c:
                stream = c.streams.video[0]
                stream.thread_type = "AUTO"
                for i, frame in enumerate(c.decode(stream)):
                    if i > last:
                        break
                    if i in todo:
                        put(i, frame.to_ndarray(format="rgb24"))
                        todo.discard(i)
        except MemoryError:
            raise
        except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
            raise MediaError(f"{self.name}: corrupt video ({type(e).__name__}: {e})") from None
        if todo:
            raise MediaError(f"{self.name}: video ended before frame {min(todo)} "
                             f"(its header says {self.total_num_frames} frames): truncated or corrupt")


VideoInput = Union[str, os.PathLike, bytes, np.ndarray, Sequence, VideoSource]


def open_video(source: VideoInput, fps: Optional[float] = None,
               limits: Optional[MediaLimits] = None) -> VideoSource:
    """Read a video's header (file, bytes, URL/data URI as for images), or wrap given frames: an
    array (T, H, W[, C]) or a list of images, with ``fps`` their frame rate if known."""
    limits = limits or MediaLimits()
    if isinstance(source, VideoSource):
        return source
    if isinstance(source, np.ndarray) or isinstance(source, (list, tuple)):
        return _from_frames(source, fps, limits)
    fp, name = resolve_source(source, limits, "video")
    return _probe(fp, name, limits)


def _from_frames(frames, fps, limits) -> VideoSource:
    name = describe(frames)
    if isinstance(frames, np.ndarray):
        if frames.ndim not in (3, 4):
            raise MediaError(f"{name}: a video array must be (T, H, W) or (T, H, W, C)")
        rgb = [array_to_rgb(f) for f in frames]
    else:
        rgb = [np.asarray(open_image(f, limits).decode()) for f in frames]
    if not rgb:
        raise MediaError(f"{name}: a video needs at least one frame")
    if len({f.shape for f in rgb}) != 1:
        raise MediaError(f"{name}: video frames differ in size: {sorted({f.shape[:2] for f in rgb})}")
    a = np.stack(rgb)
    return VideoSource(name, len(a), float(fps) if fps else None, a.shape[1], a.shape[2], frames=a)


def _probe(fp, name: str, limits: MediaLimits) -> VideoSource:
    av = _import_av()
    try:
        with av.open(fp) as c:
            if not c.streams.video:
                raise MediaError(f"{name}: no video stream")
            st = c.streams.video[0]
            total = int(st.frames or 0)
            w, h = st.codec_context.width, st.codec_context.height
            rate = st.average_rate
            if total == 0:  # e.g. Matroska/WebM do not store it: count packets (no decoding)
                total = sum(1 for p in c.demux(st) if p.size)
    except (MediaError, MemoryError):
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        raise MediaError(f"{name}: not a readable video ({type(e).__name__}: {e})") from None
    if total == 0:
        raise MediaError(f"{name}: the video has zero frames")
    if not w or not h:
        raise MediaError(f"{name}: the video stream has no frame size")
    if w * h > limits.max_decode_pixels:
        raise MediaError(f"{name}: {w}x{h} frames are over MediaLimits.max_decode_pixels={limits.max_decode_pixels}")
    return VideoSource(name, total, float(rate) if rate else None, h, w, fp=fp)


def qwen2_frame_indices(total: int, video_fps: Optional[float], fps: Optional[float] = None,
                        num_frames: Optional[int] = None, min_frames: int = 4, max_frames: int = 768,
                        temporal_patch_size: int = 2) -> np.ndarray:
    """Qwen2-VL / Qwen2.5-VL sampling (transformers ``Qwen2VLVideoProcessor.sample_frames``).

    Example: 17 frames at 10 fps sampled at 2 fps -> 3.4 frames, clamped up to min_frames 4,
    floored to a multiple of 2 -> 4 frames; step 17 / 4 = 4.25 -> indices [0, 4, 8, 12]."""
    tps = temporal_patch_size
    if num_frames is not None:
        num_frames = round(num_frames / tps) * tps
    elif fps is not None:
        if video_fps is None:
            raise MediaError("sampling by fps needs the video's frame rate")
        max_frames = math.floor(min(max_frames, total) / tps) * tps
        n = min(max(total / video_fps * fps, min_frames), max_frames, total)
        num_frames = math.floor(n / tps) * tps
    if num_frames is None or num_frames == 0:  # no sampling, or a clip shorter than one temporal patch
        return np.arange(total)
    if num_frames > total:
        raise MediaError(f"cannot sample {num_frames} frames from a video of {total} frames")
    step = total / num_frames
    # torch.arange(0, total, step).int(): ceil(total / step) values i * step, rounded to float32, truncated
    return (np.arange(math.ceil(total / step), dtype=np.float64) * step).astype(np.float32).astype(np.int64)


def qwen3_frame_indices(total: int, video_fps: Optional[float], fps: Optional[float] = 2.0,
                        num_frames: Optional[int] = None, min_frames: int = 4,
                        max_frames: int = 768) -> np.ndarray:
    """Qwen3-VL sampling (transformers ``Qwen3VLVideoProcessor.sample_frames``).

    Example: 17 frames at 10 fps sampled at 2 fps -> int(3.4) = 3, clamped to [4, 768] and to
    17 -> 4 frames at linspace(0, 16, 4).round() = [0, 5, 11, 16]."""
    if num_frames is None and fps is not None:
        n = int(total / (video_fps or DEFAULT_FPS) * fps)
        num_frames = min(max(n, min_frames), max_frames, total)
    if num_frames is None:
        num_frames = min(max(total, min_frames), max_frames)
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


def qwen3_timestamps(indices: Sequence[int], video_fps: float, temporal_patch_size: int = 2) -> List[float]:
    """Seconds of each temporal grid step (transformers ``Qwen3VLProcessor._calculate_timestamps``):
    indices padded with the last one to a multiple of the temporal patch, then the mean of the
    first and last frame time of each group. Example: [0, 5, 11, 16] at 10 fps -> [0.25, 1.35]."""
    idx = [int(i) for i in indices]
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    t = [i / video_fps for i in idx]
    return [(t[i] + t[i + temporal_patch_size - 1]) / 2 for i in range(0, len(t), temporal_patch_size)]


def sampled_fps(n_sampled: int, total: int, video_fps: Optional[float]) -> float:
    """transformers ``VideoMetadata.sampled_fps``: the frame rate of the sampled frames."""
    if video_fps is None:
        return DEFAULT_FPS
    return n_sampled / total * video_fps


def frame_indices(family: str, src: VideoSource, cfg) -> Tuple[np.ndarray, Optional[float]]:
    """Sampled frame indices for a family and a ``VideoProcessorConfig``, and the frame rate the
    timing metadata uses (None = unknown)."""
    fps = src.fps
    if not cfg.do_sample_frames:
        return np.arange(src.total_num_frames), fps
    if family == "qwen3_vl":
        if fps is None and cfg.num_frames is None and cfg.fps is not None:
            warnings.warn(f"{src.name}: frame rate unknown; assuming {DEFAULT_FPS:g} fps to sample frames "
                          "(pass fps= with frame lists)", stacklevel=3)
            fps = DEFAULT_FPS
        idx = qwen3_frame_indices(src.total_num_frames, fps, None if cfg.num_frames else cfg.fps,
                                  cfg.num_frames, cfg.min_frames, cfg.max_frames)
        return idx, fps
    if fps is None and cfg.num_frames is None:  # transformers' Qwen2 processor: no sampling without fps
        return np.arange(src.total_num_frames), None
    idx = qwen2_frame_indices(src.total_num_frames, fps, None if cfg.num_frames else cfg.fps,
                              cfg.num_frames, cfg.min_frames, cfg.max_frames, cfg.temporal_patch_size)
    return idx, fps


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = 128 * 32 * 32, max_pixels: int = 32 * 32 * 768) -> Tuple[int, int]:
    """Qwen3-VL's video smart_resize: the pixel bounds apply to frames x h x w, and frames smaller
    than ``factor`` are first scaled up. Clips shorter than ``temporal_factor`` count as one
    temporal patch (transformers raises there)."""
    num_frames = max(num_frames, temporal_factor)
    if min(height, width) <= 0:
        raise MediaError(f"empty video frames {width}x{height}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"{width}x{height}: aspect ratio {max(height, width) / min(height, width):.1f} "
                         "is over 200, which the Qwen VL processors do not accept")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
