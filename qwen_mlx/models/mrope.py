"""Multimodal RoPE (M-RoPE): each rotary frequency reads one of three position axes.

Positions come as ``(3, B, L)``: temporal, height and width ids. A text token has all
three equal, so M-RoPE reduces to ordinary RoPE on text. Which axis frequency ``j``
(of ``head_dim // 2``) reads is fixed by ``mrope_section``:

* chunked (Qwen2-VL, Qwen2.5-VL), section [16, 24, 24] on head_dim 128:
  j in 0..15 -> T, 16..39 -> H, 40..63 -> W.
* interleaved (Qwen3-VL), section [24, 20, 20]: j % 3 == 1 and j < 3*20 -> H,
  j % 3 == 2 and j < 3*20 -> W, every other j -> T, i.e. T H W T H W ... T T T T.

The rotation is the "rotate half" layout (cos/sin duplicated over both halves).
"""

from typing import List, Tuple

import mlx.core as mx
import numpy as np

from ..errors import ConfigError


def axis_of_frequency(half: int, section: List[int], interleaved: bool) -> np.ndarray:
    if sum(section) != half or len(section) != 3:
        raise ConfigError(f"mrope_section {section} must have 3 parts summing to head_dim/2 = {half}")
    axis = np.zeros(half, dtype=np.int32)
    if interleaved:
        for a, off in ((1, 1), (2, 2)):
            axis[off:section[a] * 3:3] = a
    else:
        axis[section[0]:section[0] + section[1]] = 1
        axis[section[0] + section[1]:] = 2
    return axis


class MRoPE:
    def __init__(self, head_dim: int, theta: float, section: List[int], interleaved: bool):
        half = head_dim // 2
        self.inv_freq = mx.array(1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)))
        axis = axis_of_frequency(half, list(section), interleaved)
        self.onehot = mx.array((axis[None, :] == np.arange(3)[:, None]).astype(np.float32))[:, None, None, :]

    def __call__(self, positions: mx.array) -> Tuple[mx.array, mx.array]:
        """``positions`` (3, B, L) -> ``(cos, sin)``, each (B, 1, L, head_dim), float32."""
        freqs = positions.astype(mx.float32)[..., None] * self.inv_freq  # (3, B, L, half)
        freqs = (freqs * self.onehot).sum(axis=0)
        emb = mx.concatenate([freqs, freqs], axis=-1)[:, None]
        return mx.cos(emb), mx.sin(emb)


@mx.compile
def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half RoPE, ``x * [cos, cos] + [-x2, x1] * [sin, sin]`` for x = [x1, x2] (..., D)
    and half-width ``cos`` / ``sin`` (..., D / 2): one fused kernel per half, no rotated copy."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """`rotate` with full-width ``cos`` / ``sin`` (both halves repeated, as M-RoPE builds them)."""
    h = x.shape[-1] // 2
    rot = mx.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos.astype(x.dtype) + rot * sin.astype(x.dtype)


def text_positions(B: int, L: int, start) -> mx.array:
    """Positions of plain text continuing at ``start`` (int or (B,) array): (3, B, L)."""
    p = mx.arange(L)[None, :] + (mx.array(start).reshape(-1, 1) if not isinstance(start, int) else start)
    return mx.broadcast_to(p, (3, B, L))
