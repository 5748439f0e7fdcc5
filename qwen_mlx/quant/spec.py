"""Quantization specs: the modes MLX 0.32 implements, their allowed bits / group sizes,
and the packed layout each produces.

    mode    group sizes    bits (write)        scales         biases
    affine  32, 64*, 128   2,3,4*,5,6,8 (+1)   weight dtype   yes
    mxfp4   32             4                   uint8 (e8m0)   no
    nvfp4   16             4                   uint8 (e4m3)   no
    mxfp8   32             8                   uint8 (e8m0)   no

A packed weight of input size ``n`` is uint32 ``[..., n * bits / 32]`` with scales
``[..., n / group]``, so bits and group size can be read back off the shapes.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import mlx.core as mx

from ..errors import WeightsError


class QuantizationError(WeightsError):
    """A quantization request or a packed tensor that MLX cannot represent."""


@dataclass(frozen=True)
class Mode:
    bits: Tuple[int, ...]
    group_sizes: Tuple[int, ...]
    default_bits: int
    default_group: int
    biases: bool  # affine stores (scale, bias) per group; the fp modes a shared exponent only


MODES: Dict[str, Mode] = {
    "affine": Mode((2, 3, 4, 5, 6, 8), (32, 64, 128), 4, 64, True),
    "mxfp4": Mode((4,), (32,), 4, 32, False),
    "nvfp4": Mode((4,), (16,), 4, 16, False),
    "mxfp8": Mode((8,), (32,), 8, 32, False),
}
_READ_BITS = {"affine": (1, 2, 3, 4, 5, 6, 8)}  # 1-bit affine loads (mlx-lm can write it)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"

    def config(self) -> dict:
        """The per-module entry of a config.json ``quantization`` block (mlx-lm's layout)."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def __str__(self) -> str:
        return f"{self.mode} {self.bits}-bit g{self.group_size}"


def make_spec(bits: Optional[int] = None, group_size: Optional[int] = None,
              mode: Optional[str] = None, *, reading: bool = False, what: str = "") -> QuantSpec:
    """A validated spec; unset fields take the mode's defaults."""
    mode = mode or "affine"
    where = f" for {what}" if what else ""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode '{mode}'{where} (known: {', '.join(MODES)})")
    m = MODES[mode]
    bits, group_size = bits or m.default_bits, group_size or m.default_group
    allowed = _READ_BITS.get(mode, m.bits) if reading else m.bits
    if bits not in allowed:
        raise QuantizationError(f"{mode} quantization{where} supports bits {list(allowed)}, got {bits}")
    if group_size not in m.group_sizes:
        raise QuantizationError(
            f"{mode} quantization{where} supports group sizes {list(m.group_sizes)}, got {group_size}")
    return QuantSpec(bits, group_size, mode)


def quantize(w: mx.array, spec: QuantSpec, name: str = "tensor") -> Dict[str, mx.array]:
    """``{"weight", "scales"[, "biases"]}`` of ``w`` (its last axis is the input axis)."""
    if w.ndim < 2:
        raise QuantizationError(f"cannot quantize '{name}': it has {w.ndim} dimension(s), needs >= 2")
    if w.shape[-1] % spec.group_size:
        raise QuantizationError(
            f"cannot quantize '{name}' with group size {spec.group_size}: its input size "
            f"{w.shape[-1]} is not a multiple of it")
    out = mx.quantize(w, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    return dict(zip(("weight", "scales", "biases"), out))


def dequantize(parts: Dict[str, mx.array], spec: QuantSpec, dtype=mx.float32) -> mx.array:
    s = parts["scales"]
    b = parts.get("biases")
    if spec.mode == "affine":  # compute in float32: the output takes the scales' dtype
        s, b = s.astype(mx.float32), b.astype(mx.float32)
    from ..models.linear import dequantize  # mx.dequantize, with a faster CPU path for affine 2/4/8 bits
    return dequantize(parts["weight"], s, b, group_size=spec.group_size, bits=spec.bits,
                      mode=spec.mode, dtype=mx.float32).astype(dtype)


def packed_spec(name: str, w: mx.array, s: mx.array, b: Optional[mx.array], in_dims: int,
                declared: Optional[dict] = None) -> QuantSpec:
    """The spec of a packed triplet, read off its shapes and scale dtype, checked against
    ``declared`` (a config entry: any of bits / group_size / mode) and the layout rules."""
    declared = declared or {}
    if w.dtype != mx.uint32:
        raise QuantizationError(f"quantized tensor '{name}': packed weight has dtype {w.dtype}, expected uint32")
    if w.shape[:-1] != s.shape[:-1] or (b is not None and b.shape != s.shape):
        raise QuantizationError(
            f"quantized tensor '{name}': inconsistent shapes weight {tuple(w.shape)}, scales "
            f"{tuple(s.shape)}" + (f", biases {tuple(b.shape)}" if b is not None else ""))
    fp = s.dtype == mx.uint8
    mode = declared.get("mode") or ("affine" if not fp else None)
    bits = (w.shape[-1] * 32) // in_dims
    group = in_dims // s.shape[-1] if s.shape[-1] else 0
    if bits * in_dims != w.shape[-1] * 32 or not group or group * s.shape[-1] != in_dims:
        raise QuantizationError(
            f"quantized tensor '{name}': packed shape {tuple(w.shape)} with scales "
            f"{tuple(s.shape)} does not fit input size {in_dims}")
    if mode is None:  # uint8 scales, no mode declared: each fp mode has one (bits, group) pair
        mode = next((k for k, m in MODES.items() if not m.biases and (bits, group) == (m.bits[0], m.group_sizes[0])), None)
        if mode is None:
            raise QuantizationError(
                f"quantized tensor '{name}': uint8 scales with {bits} bits and group size {group} "
                f"match no quantization mode")
    for key, got in (("bits", bits), ("group_size", group)):
        if declared.get(key) not in (None, got):
            raise QuantizationError(
                f"quantized tensor '{name}': config says {key}={declared[key]} but the packed "
                f"shapes give {got}")
    spec = make_spec(bits, group, mode, reading=True, what=f"tensor '{name}'")
    if MODES[mode].biases != (b is not None) or fp == (mode == "affine"):
        raise QuantizationError(
            f"quantized tensor '{name}': {mode} needs {'float scales and biases' if mode == 'affine' else 'uint8 scales and no biases'}, "
            f"got {s.dtype} scales {'with' if b is not None else 'without'} biases")
    return spec
