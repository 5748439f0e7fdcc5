"""FP8 block-quantized checkpoints (``quant_method: fp8``, DeepSeek-V3 / Qwen3-FP8 layout).

A quantized ``Linear(in, out)`` stores ``weight`` as float8_e4m3fn (read by MLX as uint8
bytes) and ``weight_scale_inv`` with one scale per block of ``weight_block_size`` =
(bo, bi) elements, ceil(out/bo) x ceil(in/bi) of them (edge blocks may be partial), or one
per tensor when there is no block size. Scales are float32/bfloat16, or E8M0 bytes
(``scale_fmt: ue8m0``: 2**(byte - 127)). The weight is

    w[o, i] = e4m3(weight[o, i]) * scale_inv[o // bo, i // bi]

computed in float32 like transformers' dequantization (every e4m3 value is exact in
float32; the one product rounds the same way on both sides).

What the import produces (`ImportOptions.fp8`):

- "auto" (default): a tensor whose block scales are all powers of two, with blocks that
  cover whole 32-input groups, is exactly MLX ``mxfp8`` (e4m3 elements, a power-of-two
  E8M0 scale per 32 inputs): the fp8 bytes are kept and each block's exponent repeated per
  group. Any other tensor becomes its exact float32 dequantization (lazy; `load_model`
  casts it to the run dtype, the converter quantizes it per its recipe).
- "dense": always the exact float32 dequantization.
- a `QuantSpec` (e.g. affine 8-bit g64): the exact dequantization quantized with it
  (lossy, as any re-quantization); an mxfp8 spec keeps exact tensors as they are.

``activation_scale`` / ``input_scale`` tensors (static activation quantization) are dropped:
activations stay in the model dtype, as in transformers' dequantized model.
"""

from typing import Dict, Optional, Union

import mlx.core as mx
import numpy as np

from ...errors import ConfigError, WeightsError
from ...quant.spec import QuantSpec, quantize
from .common import Layout, to_numpy

MXFP8 = Layout(8, 32, "mxfp8")


def _block_size(qc: dict):
    bs = qc.get("weight_block_size")
    if bs is None:
        return None
    if (not isinstance(bs, (list, tuple)) or len(bs) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in bs)):
        raise ConfigError(f"quantization_config.weight_block_size is {bs!r}, expected two positive integers")
    return tuple(bs)


def _scales_f32(s: mx.array, name: str) -> mx.array:
    if s.dtype == mx.uint8:  # E8M0 exponents
        return mx.power(mx.array(2.0, mx.float32), s.astype(mx.float32) - 127.0)
    if not mx.issubdtype(s.dtype, mx.floating):
        raise WeightsError(f"FP8 tensor '{name}_scale_inv' has dtype {s.dtype}, expected float or E8M0 bytes")
    return s.astype(mx.float32)


def fp8_dense(w: mx.array, s: mx.array, block, name: str = "weight") -> mx.array:
    """Exact float32 dequantization of e4m3 bytes ``w`` (..., out, in) with scales ``s`` of
    shape (..., ceil(out/bo), ceil(in/bi)) for ``block`` (bo, bi), or broadcastable to ``w``
    when ``block`` is None (one scale per tensor)."""
    x = mx.from_fp8(w, dtype=mx.float32)
    s = _scales_f32(s, name)
    if block is None:
        return x * s
    (bo, bi), (O, I) = block, w.shape[-2:]
    po, pi = -O % bo, -I % bi
    if po or pi:
        x = mx.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, po), (0, pi)])
    lead = x.shape[:-2]
    x = x.reshape(*lead, (O + po) // bo, bo, (I + pi) // bi, bi) * s[..., :, None, :, None]
    x = x.reshape(*lead, O + po, I + pi)
    return x[..., :O, :I] if po or pi else x


def _mxfp8_exponents(s: mx.array, block, shape, name: str) -> Optional[mx.array]:
    """E8M0 bytes per (row, 32-input group) when the tensor is exactly mxfp8, else None."""
    if block is None or block[1] % 32 or shape[-1] % 32:
        return None
    if s.dtype == mx.uint8:
        e = to_numpy(s, name).astype(np.int32) - 127
    else:
        mant, e = np.frexp(to_numpy(s, name))
        if not (mant == 0.5).all():
            return None
        e = e - 1  # s = 0.5 * 2**e = 2**(e - 1)
    if e.min() < -127 or e.max() > 127:
        return None
    bo, bi = block
    e = np.repeat(np.repeat(e + 127, bo, axis=-2)[..., : shape[-2], :], bi // 32, axis=-1)[..., : shape[-1] // 32]
    return mx.array(np.ascontiguousarray(e.astype(np.uint8)))


def import_fp8(qc: dict, weights: Dict[str, mx.array],
               mode: Union[str, QuantSpec] = "auto"):
    fmt = str(qc.get("fmt", "e4m3")).lower()
    if fmt not in ("e4m3", "float8_e4m3fn"):
        raise ConfigError(f"FP8 format '{fmt}' is not supported (supported: e4m3)")
    if not (mode in ("auto", "dense") or isinstance(mode, QuantSpec)):
        raise ConfigError(f"fp8 import mode {mode!r}: expected 'auto', 'dense' or a QuantSpec")
    block = _block_size(qc)
    out, layouts = dict(weights), {}
    for name in [k for k in weights if k.endswith(".weight_scale_inv")]:
        base = name[: -len(".weight_scale_inv")]
        w, s = out.pop(f"{base}.weight", None), out.pop(name)
        if w is None:
            raise WeightsError(f"FP8 scale '{name}' has no weight '{base}.weight'")
        if w.dtype != mx.uint8 or w.ndim < 2:
            raise WeightsError(f"FP8 tensor '{base}.weight' has dtype {w.dtype} and shape "
                               f"{tuple(w.shape)}, expected float8_e4m3fn with >= 2 dimensions")
        lead, (O, I) = w.shape[:-2], w.shape[-2:]
        want = lead + ((-(-O // block[0]), -(-I // block[1])) if block else ())
        if block is None and s.size == 1:
            s = s.reshape(())
        elif tuple(s.shape) != want:
            raise WeightsError(
                f"FP8 tensor '{name}' has shape {tuple(s.shape)}, expected {want} for weight "
                f"{tuple(w.shape)} in blocks of {block or 'one per tensor'}")
        elif block is None:
            s = s.reshape(lead + (1, 1))
        e = None if mode == "dense" or (isinstance(mode, QuantSpec) and mode != QuantSpec(*MXFP8)) \
            else _mxfp8_exponents(s, block, w.shape, name)
        if e is not None:  # exact mxfp8: the e4m3 bytes as they are, 4 per uint32
            out[f"{base}.weight"], out[f"{base}.scales"], layouts[base] = w.view(mx.uint32), e, MXFP8
        elif isinstance(mode, QuantSpec):
            q = quantize(fp8_dense(w, s, block, name), mode, f"{base}.weight")
            out.update({f"{base}.{k}": v for k, v in q.items()})
            layouts[base] = Layout(mode.bits, mode.group_size, mode.mode)
        else:
            out[f"{base}.weight"] = fp8_dense(w, s, block, name)
    for k in [k for k in out if k.endswith((".activation_scale", ".input_scale"))]:
        del out[k]
    stray = sorted(k for k, v in out.items() if v.dtype == mx.uint8 and k.endswith(".weight"))
    if stray:
        raise WeightsError(f"FP8 weights without a weight_scale_inv: {', '.join(stray[:5])}")
    return out, layouts
