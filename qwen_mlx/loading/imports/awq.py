"""AWQ checkpoints (AutoAWQ / GPTQModel, ``quant_method: awq``, GEMM layout) -> MLX affine
triplets with the same integers: no re-quantization.

One quantized ``Linear(in, out)``, 4 bits, ``group_size`` g, G = in / g groups:

    qweight  (in, out/8) int32   word c of input row i packs outputs 8c .. 8c+7
    qzeros   (G, out/8)  int32   the same packing, one row per group
    scales   (G, out)            float16

    w[o, i] = scales[i // g, o] * (q[i, o] - zero[i // g, o])   (no offset, unlike GPTQ v1)

Inside a word AWQ interleaves: nibble k (bits 4k..4k+3) holds output 8c + ORDER[k] with
ORDER = (0, 2, 4, 6, 1, 3, 5, 7), so output 8c + m sits in nibble REVERSE[m], REVERSE =
(0, 4, 1, 5, 2, 6, 3, 7). Worked example: word 0x76543210 holds outputs (8c+0, 8c+2,
8c+4, 8c+6, 8c+1, 8c+3, 8c+5, 8c+7) = (0, 1, 2, 3, 4, 5, 6, 7), i.e. q for outputs
8c..8c+7 is (0, 4, 1, 5, 2, 6, 3, 7).

MLX wants (out, in/8) uint32 packed along the input, so the nibbles are unpacked,
reordered, transposed and re-packed with integer ops (lazily, in MLX). Scales and
biases = -scales * zero are float32 (see gptq.py for why that is exact).
"""

from functools import reduce
from typing import Dict

import mlx.core as mx
import numpy as np

from ...errors import ConfigError, WeightsError
from ...quant.spec import QuantizationError
from .common import MLX_GROUPS, Layout, is_integer, to_numpy, unpack_bits

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
REVERSE = tuple(ORDER.index(m) for m in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7)
_SHIFTS = tuple(range(0, 32, 4))


def awq_unpack(packed: mx.array) -> mx.array:
    """(rows, out/8) AWQ words -> (rows, out) uint32 nibbles in output order."""
    u = packed.view(mx.uint32)
    nib = (u[..., None] >> mx.array(_SHIFTS, dtype=mx.uint32)) & 15
    return nib[..., list(REVERSE)].reshape(u.shape[0], -1)


def awq_triplet(name: str, qweight: mx.array, qzeros: mx.array, scales: mx.array, group_size: int):
    for part, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.ndim != 2 or not is_integer(t) or t.dtype.size != 4:
            raise WeightsError(f"AWQ tensor '{name}.{part}' must be a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    n_in, n_out = qweight.shape[0], qweight.shape[1] * 8
    if group_size == -1:
        group_size = n_in
    if group_size <= 0 or n_in % group_size:
        raise QuantizationError(
            f"AWQ tensor '{name}': group_size {group_size} does not divide its {n_in} inputs")
    groups = n_in // group_size
    if tuple(scales.shape) != (groups, n_out) or not mx.issubdtype(scales.dtype, mx.floating):
        raise WeightsError(
            f"AWQ tensor '{name}.scales' has shape {tuple(scales.shape)} ({scales.dtype}), expected float "
            f"({groups}, {n_out}) for {n_in} inputs in groups of {group_size} and qweight {tuple(qweight.shape)}")
    if tuple(qzeros.shape) != (groups, n_out // 8):
        raise WeightsError(f"AWQ tensor '{name}.qzeros' has shape {tuple(qzeros.shape)}, expected ({groups}, {n_out // 8})")
    g = next((g for g in MLX_GROUPS if group_size % g == 0), None)
    if g is None:
        raise QuantizationError(
            f"AWQ tensor '{name}': group_size {group_size} is not a multiple of an MLX group size (32, 64, 128)")
    z = unpack_bits(to_numpy(qzeros, f"{name}.qzeros"), 4, n_out)[:, np.array(REVERSE) + np.arange(0, n_out, 8)[:, None]]
    z = z.reshape(groups, n_out)
    rep = group_size // g
    s = np.repeat(to_numpy(scales, f"{name}.scales").T, rep, axis=1)  # (out, in / g)
    b = -s * np.repeat(z.T, rep, axis=1).astype(np.float32)
    q = awq_unpack(qweight).T.reshape(n_out, n_in // 8, 8)  # (out, in) in runs of 8 inputs
    w = reduce(mx.bitwise_or, [q[..., k] << k * 4 for k in range(8)])
    return w, mx.array(np.ascontiguousarray(s)), mx.array(np.ascontiguousarray(b)), Layout(4, g)


def import_awq(qc: dict, weights: Dict[str, mx.array]):
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size", 128))
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ConfigError(f"AWQ version '{version}' is not supported (only the GEMM layout, 'gemm')")
    if bits != 4:
        raise ConfigError(f"{bits}-bit AWQ is not supported (the GEMM layout is 4-bit)")
    if isinstance(group, bool) or not isinstance(group, int):
        raise ConfigError(f"AWQ group_size is {group!r}, expected an integer")
    out, layouts = dict(weights), {}
    for name in [k for k in weights if k.endswith(".qweight")]:
        base = name[: -len(".qweight")]
        p = {k: out.pop(f"{base}.{k}", None) for k in ("qweight", "qzeros", "scales")}
        for k in ("qzeros", "scales"):
            if p[k] is None:
                raise WeightsError(f"AWQ tensor '{base}' has a qweight but no {k}")
        w, s, b, layouts[base] = awq_triplet(base, p["qweight"], p["qzeros"], p["scales"], group)
        out.update({f"{base}.weight": w, f"{base}.scales": s, f"{base}.biases": b})
    stray = sorted(k for k in out if k.endswith(".qzeros"))
    if stray:
        raise WeightsError(f"AWQ tensors without a qweight: {', '.join(stray[:5])}")
    if not layouts:
        raise WeightsError("quant_method is awq but no tensor ends in '.qweight'")
    return out, layouts
