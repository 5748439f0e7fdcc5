"""GPTQ checkpoints (AutoGPTQ, optimum, GPTQModel; ``quant_method: gptq``) -> MLX affine
triplets with the same integers: no re-quantization.

One quantized ``Linear(in, out)`` with ``bits`` b, ``group_size`` g (-1: one group), G =
ceil(in / g) groups, stored in integer words of W bits (int32: W = 32):

    qweight  (in*b/W, out)   column o: a little-endian bit stream of q[0..in-1, o]
    qzeros   (G, out*b/W)    row k: a bit stream of the stored zero points of group k
    scales   (G, out)        float16 (or bfloat16)
    g_idx    (in,)           group of each input row: i // g, unless act-order (desc_act)
    bias     (out,)          optional, a plain tensor

    w[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])

The v1 format (``checkpoint_format`` "gptq", the default: AutoGPTQ, optimum and every
official Qwen GPTQ checkpoint) stores ``zero - 1``, so zero = stored + 1, taken per
element after unpacking (as exllama's and vLLM's v1 kernels do); "gptq_v2" stores the
zero itself. The 3-bit layout's words split values across word boundaries, which is
exactly what a bit stream does, so all of 2, 3, 4 and 8 bits read the same way.

Worked example (4 bits, v1, symmetric): a qweight column whose first word is 0x76543210
holds q[0..7] = 0, 1, ..., 7; qzeros word 0x77777777 stores 7 for eight columns, so zero =
8; with scale 0.01, w[o, 0..7] = 0.01 * (-8, -7, ..., -1).

MLX packs a row of its (out, in*b/32) uint32 weight as the same bit stream along the
input, so ``weight = qweight.T`` (a pure integer transpose), and w = scales * q + biases
with ``biases = -scales * zero``. Scales and biases are kept in float32: a float16 scale
has 11 significant bits and a zero up to 9, so -scale*zero needs up to 20 bits, exact in
float32 but not in float16/bfloat16 (and every product scale*(q - zero) is then exact too).

MLX groups are contiguous runs of 32/64/128 input rows. Each source group maps onto MLX
groups exactly when ``g_idx`` is constant on aligned runs of such a size (always true
without act-order for g a multiple of 32; also true for act-order checkpoints written with
``static_groups``). Act-order checkpoints whose g_idx scatters a group's rows cannot be
represented without permuting the layer's input and are refused.
"""

import re
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from ...errors import ConfigError, WeightsError
from ...quant.spec import QuantizationError
from .common import Layout, is_integer, mlx_group, to_numpy, unpack_bits

BITS = (2, 3, 4, 8)
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def _int_field(qc: dict, key: str, default, where: str = "quantization_config"):
    v = qc.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where}.{key} is {v!r}, expected an integer")
    return v


def _module_params(base: str, bits: int, group: int, dynamic: dict) -> Tuple[int, int]:
    """GPTQModel's ``dynamic`` overrides: ``{"+:regex" or "regex": {bits, group_size}}``
    (``-:regex`` marks modules left unquantized, which carry no qweight)."""
    for pattern, over in dynamic.items():
        if pattern.startswith("-:"):
            continue
        if re.match(pattern[2:] if pattern.startswith("+:") else pattern, base) and isinstance(over, dict):
            bits = _int_field(over, "bits", bits, f"quantization_config.dynamic[{pattern!r}]")
            group = _int_field(over, "group_size", group, f"quantization_config.dynamic[{pattern!r}]")
    return bits, group


def gptq_triplet(name: str, qweight: mx.array, qzeros: mx.array, scales: mx.array,
                 g_idx: Optional[mx.array], bits: int, group_size: int,
                 zero_offset: int = 1) -> Tuple[mx.array, mx.array, mx.array, Layout]:
    """One GPTQ module -> (weight uint32, scales float32, biases float32, layout).
    ``zero_offset`` is 1 for the v1 format, 0 for gptq_v2."""
    if bits not in BITS:
        raise ConfigError(f"GPTQ tensor '{name}': {bits}-bit GPTQ is not supported (supported: {BITS})")
    for part, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.ndim != 2 or not is_integer(t):
            raise WeightsError(f"GPTQ tensor '{name}.{part}' must be a 2-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    word = qweight.dtype.size * 8
    rows, n_out = qweight.shape
    if (rows * word) % bits:
        raise WeightsError(f"GPTQ tensor '{name}.qweight' has {rows} rows of {word}-bit words, not a whole number of {bits}-bit values")
    n_in = rows * word // bits
    if group_size == -1:
        group_size = n_in
    if group_size <= 0:
        raise ConfigError(f"GPTQ tensor '{name}': group_size {group_size} (expected a positive size or -1)")
    groups = -(-n_in // group_size)
    if scales.ndim != 2 or tuple(scales.shape) != (groups, n_out) or not mx.issubdtype(scales.dtype, mx.floating):
        raise WeightsError(
            f"GPTQ tensor '{name}.scales' has shape {tuple(scales.shape)} ({scales.dtype}), expected float "
            f"({groups}, {n_out}): ceil({n_in} inputs / group_size {group_size}) groups x {n_out} outputs")
    zword = qzeros.dtype.size * 8
    if (n_out * bits) % zword or tuple(qzeros.shape) != (groups, n_out * bits // zword):
        raise WeightsError(
            f"GPTQ tensor '{name}.qzeros' has shape {tuple(qzeros.shape)}, expected "
            f"({groups}, {n_out} * {bits} / {zword}) for {n_out} outputs packed at {bits} bits")
    if g_idx is None:
        gi = np.arange(n_in) // group_size
    else:
        gi = to_numpy(g_idx, f"{name}.g_idx")
        if gi.shape != (n_in,) or not np.issubdtype(gi.dtype, np.integer):
            raise WeightsError(f"GPTQ tensor '{name}.g_idx' has shape {gi.shape} ({gi.dtype}), expected ({n_in},) integers")
        if gi.size and (gi.min() < 0 or gi.max() >= groups):
            raise WeightsError(f"GPTQ tensor '{name}.g_idx' has group indices outside [0, {groups})")
    g = mlx_group(gi, n_in)
    if g is None:
        if (np.diff(gi) < 0).any():
            raise QuantizationError(
                f"GPTQ tensor '{name}': act-order (desc_act) checkpoint whose g_idx interleaves groups "
                f"along the input; MLX groups are contiguous runs of 32/64/128 inputs, so it cannot be "
                f"imported exactly (re-quantize with desc_act=False or static_groups=True)")
        raise QuantizationError(
            f"GPTQ tensor '{name}': group_size {group_size} over {n_in} inputs does not split into MLX "
            f"groups of 32, 64 or 128 inputs, so it cannot be imported exactly")
    zeros = unpack_bits(to_numpy(qzeros, f"{name}.qzeros"), bits, n_out) + zero_offset
    sel = gi[::g]  # source group of each MLX group
    s = to_numpy(scales, f"{name}.scales")[sel].T  # (out, in / g)
    b = -s * zeros[sel].T.astype(np.float32)
    w = mx.contiguous(qweight.T).view(mx.uint32)  # same bit stream, now along the input
    return w, mx.array(np.ascontiguousarray(s)), mx.array(np.ascontiguousarray(b)), Layout(bits, g)


def import_gptq(qc: dict, weights: Dict[str, mx.array]):
    """Every ``<m>.qweight`` (+ qzeros, scales, g_idx) -> ``<m>.weight/scales/biases``."""
    bits = _int_field(qc, "bits", None)
    group = _int_field(qc, "group_size", 128)
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"GPTQ checkpoint_format '{fmt}' is not supported (supported: gptq, gptq_v2)")
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise ConfigError("quantization_config.dynamic must be an object")
    out, layouts = dict(weights), {}
    for name in [k for k in weights if k.endswith(".qweight")]:
        base = name[: -len(".qweight")]
        p = {k: out.pop(f"{base}.{k}", None) for k in _PARTS}
        for k in ("qzeros", "scales"):
            if p[k] is None:
                raise WeightsError(f"GPTQ tensor '{base}' has a qweight but no {k}")
        b, g = _module_params(base, bits, group, dynamic)
        w, s, bias, layouts[base] = gptq_triplet(base, p["qweight"], p["qzeros"], p["scales"], p["g_idx"], b, g,
                                                 1 if fmt == "gptq" else 0)
        out.update({f"{base}.weight": w, f"{base}.scales": s, f"{base}.biases": bias})
    stray = sorted(k for k in out if k.endswith((".qzeros", ".g_idx")))
    if stray:
        raise WeightsError(f"GPTQ tensors without a qweight: {', '.join(stray[:5])}")
    if not layouts:
        raise WeightsError("quant_method is gptq but no tensor ends in '.qweight'")
    return out, layouts
