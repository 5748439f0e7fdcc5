"""Backend-aware projections: the same weights, the fastest kernel the backend has.

MLX's CPU backend multiplies float32 through BLAS ``sgemm`` only; half precision and
quantized weights run MLX's own one-core kernels. Measured on a 2-core x86 box with
OpenBLAS 0.3.21 (`SPEED` holds the switches and thresholds):

* one row (decode), float32: ``sgemm`` with M = 1 repacks the whole weight on every
  call (~10 GB/s); BLAS's ``sgemv`` streams it (15 GB/s from DRAM, 40-60 from L3).
  `project` hands single rows to the ``cblas_sgemv`` of the BLAS already loaded in the
  process (the one MLX's matmuls bind to) as a `mx.custom_function` with exact
  derivatives; inside `mx.compile` / `mx.vmap` it is the plain matmul.
* one or a few rows, half / quantized: the output rows are split over one CPU stream
  per core (MLX runs each stream on its own thread): ~1.8x on 2 idle cores, ~0.9x when
  other processes keep both cores busy. Half quantization scales are cast to float32 for
  the call (MLX's kernel: ~14x faster).
* many rows (prefill): quantized weights are dequantized to float32 once per call
  (`dequantize`) and multiplied by ``sgemm`` from ``dequant_rows`` rows on. 4-bit,
  group 64, per projection of Qwen3-0.6B: the two paths cost the same at 3 rows,
  dequantizing wins from 4 (4 rows: 24 vs 30 ms for q/k/v 4096x1024), 24-42x at 512
  rows; a 512-token prefill of the 4-layer model: 370 vs 12.9 tok/s (28.7x).
  Half-precision weights are cast from ``upcast_rows`` (bf16: ~20x at 512 rows;
  crossover ~2). A per-layer temporary.

On Metal / CUDA nothing changes unless ``gpu_dequant_rows`` is set (prompts dequantized
to the model dtype: unmeasured here, so off by default).
"""

import ctypes
import os
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np


@dataclass
class SpeedOptions:
    gemv: bool = os.environ.get("QWEN_MLX_GEMV", "1") != "0"  # CPU: single rows through sgemv
    dequant_rows: Optional[int] = 4  # CPU: from this many rows, quantized -> float32 BLAS (None: never)
    upcast_rows: Optional[int] = 2  # CPU: from this many rows, half precision -> float32 BLAS (None: never)
    split_rows: bool = True  # CPU: half/quantized products split by weight rows over one stream per core
    gpu_dequant_rows: Optional[int] = None  # GPU: from this many rows, dequantize to the model dtype
    compile_step: Optional[bool] = None  # decode step under mx.compile (models/step.py); None: not on the CPU
    decode_attn: bool = True  # CPU: one-token attention as plain ops (models/decode_attention.py), not MLX's SDPA


SPEED = SpeedOptions()

_ROW_MAJOR, _NO_TRANS = 101, 111


@lru_cache(maxsize=None)
def _sgemv():
    """``cblas_sgemv`` from the process's global symbols (where a preloaded BLAS, the one
    MLX's ``cblas_sgemm`` then binds to, lives); None if there is none."""
    try:
        lib = ctypes.CDLL(None)
        fn, _ = lib.cblas_sgemv, lib.cblas_sgemm
    except (OSError, AttributeError):
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
    fn.restype = None
    return fn


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _blas_gemv(x: mx.array, w: mx.array) -> mx.array:
    W = np.asarray(w)  # evaluates; a view of MLX's buffer, no copy
    if not W.flags.c_contiguous:
        raise ValueError("not row-major")
    v = np.ascontiguousarray(np.asarray(x), dtype=np.float32).reshape(-1)
    O, I = W.shape
    y = np.empty(O, np.float32)
    _sgemv()(_ROW_MAJOR, _NO_TRANS, O, I, 1.0, W.ctypes.data, I, v.ctypes.data, 1, 0.0, y.ctypes.data, 1)
    return mx.array(y).reshape(*x.shape[:-1], O)


@mx.custom_function
def _gemv(x, w):
    try:
        return _blas_gemv(x, w)
    except ValueError:  # a compile/vmap tracer cannot be read (or an odd layout): MLX's matmul
        return x @ w.T


@_gemv.vjp
def _gemv_vjp(primals, cotangent, output):
    x, w = primals
    c = cotangent.reshape(-1, cotangent.shape[-1])
    return cotangent @ w, c.T @ x.reshape(-1, x.shape[-1])


@_gemv.jvp
def _gemv_jvp(primals, tangents):
    (x, w), (tx, tw) = primals, tangents
    out = tx @ w.T if tx is not None else mx.zeros(x.shape[:-1] + w.shape[:1], x.dtype)
    return out + x @ tw.T if tw is not None else out


def _gemv_ok(x: mx.array, w: mx.array) -> bool:
    return (SPEED.gemv and x.size == x.shape[-1] and w.dtype == mx.float32 == x.dtype
            and w.ndim == 2 and on_cpu() and _sgemv() is not None)


def eager_decode() -> bool:
    """True where a one-token step runs as it is built (the sgemv path reads its inputs)."""
    return SPEED.gemv and on_cpu() and _sgemv() is not None


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1]


def _upcast(x: mx.array, rows: Optional[int]) -> bool:
    return rows is not None and _rows(x) >= rows and on_cpu()


@lru_cache(maxsize=None)
def _streams():
    """One CPU stream per core: MLX runs each stream on its own thread."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return [mx.new_stream(mx.cpu) for _ in range(min(n, 8))] if n > 1 else []


def _by_rows(f, n_out: int) -> mx.array:
    """``f(lo, hi, stream)`` -> the output columns ``lo:hi``, one slice of weight rows per
    CPU stream: MLX's half-precision and quantized CPU kernels use one core each."""
    ss = _streams() if SPEED.split_rows and on_cpu() else []
    if len(ss) < 2 or n_out < 256 * len(ss):
        return f(0, n_out, None)
    cuts = [n_out * i // len(ss) for i in range(len(ss) + 1)]
    return mx.concatenate([f(lo, hi, s) for lo, hi, s in zip(cuts, cuts[1:], ss)], axis=-1)


def project(x: mx.array, w: mx.array, bias: Optional[mx.array] = None) -> mx.array:
    """``x @ w.T (+ bias)`` for a float weight ``w`` [out, in]."""
    half = w.dtype != mx.float32 and mx.issubdtype(w.dtype, mx.floating) and on_cpu()
    if _gemv_ok(x, w):
        y = _gemv(x, w)
    elif half and _upcast(x, SPEED.upcast_rows):
        y = (x.astype(mx.float32) @ w.astype(mx.float32).T).astype(x.dtype)
    elif half:
        y = _by_rows(lambda lo, hi, s: mx.matmul(x, w[lo:hi].T, stream=s), w.shape[0])
    else:
        return mx.addmm(bias, x, w.T) if bias is not None else x @ w.T
    return y + bias if bias is not None else y


@partial(mx.compile, shapeless=True)
def _unpack(w, s, b, shifts, mask):
    return ((w[..., None] >> shifts) & mask).astype(s.dtype) * s + b


def dequantize(w: mx.array, s: mx.array, b: Optional[mx.array], group_size: int, bits: int,
               mode: str = "affine", dtype=mx.float32) -> mx.array:
    """`mx.dequantize`; on the CPU, affine 2/4/8-bit weights are unpacked by shifts and masks
    in one fused kernel instead (MLX's CPU kernel writes ~0.2 GB/s of float32 here, this
    ~2.5x that; the same values: ``code * scale + bias`` in the scales' precision)."""
    packed = w.shape[-1] * 32 == s.shape[-1] * group_size * bits
    if mode != "affine" or b is None or 32 % bits or not packed or not on_cpu():
        return mx.dequantize(w, s, b, group_size, bits, mode=mode, dtype=dtype)
    G, per = s.shape[-1], 32 // bits  # groups per row, codes per uint32 (lowest bits first)
    codes = w.reshape(*w.shape[:-1], G, group_size // per)
    y = _unpack(codes, s[..., None, None], b[..., None, None], mx.arange(0, 32, bits, dtype=mx.uint32),
                mx.array(2**bits - 1, mx.uint32))
    return y.reshape(*w.shape[:-1], G * group_size).astype(dtype)


def _pick(m: nn.Module, index=None):
    """weight, scales, biases of ``m`` (``index``: one entry of the leading axis, taken as
    a range slice: a view, where an integer index would copy)."""
    arrs = [m["weight"], m["scales"], m.get("biases")]
    if index is None:
        return arrs
    return [a[index:index + 1].squeeze(0) if a is not None else None for a in arrs]


def dequantized(m: nn.Module, dtype=mx.float32, index=None) -> mx.array:
    """A quantized module's float weight (``index``: a slice of the leading axis, e.g. an expert)."""
    w, s, b = _pick(m, index)
    if mx.issubdtype(s.dtype, mx.floating):
        s, b = s.astype(mx.float32), (b.astype(mx.float32) if b is not None else None)
    return dequantize(w, s, b, m.group_size, m.bits, mode=m.mode, dtype=dtype)


def quantized_project(x: mx.array, m: nn.Module, index=None) -> mx.array:
    """``x @ W.T`` for a quantized module ``m`` (QuantizedLinear / QuantizedEmbedding;
    ``index``: one expert of a QuantizedSwitchLinear)."""
    if _upcast(x, SPEED.dequant_rows):
        return project(x.astype(mx.float32), dequantized(m, index=index)).astype(x.dtype)
    gpu_rows = SPEED.gpu_dequant_rows
    if gpu_rows is not None and _rows(x) >= gpu_rows and not on_cpu():
        return x @ dequantized(m, x.dtype, index).T
    w, s, b = _pick(m, index)
    if not on_cpu():  # scales kept wider than x (exact GGUF K-quant ones) promote: back to x's dtype
        return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=m.group_size,
                                   bits=m.bits, mode=m.mode).astype(x.dtype)
    half = mx.issubdtype(s.dtype, mx.floating) and s.dtype != mx.float32
    if half:  # MLX's CPU kernel is ~14x faster with float32 scales
        s, b = s.astype(mx.float32), (b.astype(mx.float32) if b is not None else None)
    xx = x.astype(mx.float32) if half else x

    def part(lo, hi, stream):
        return mx.quantized_matmul(xx, w[lo:hi], s[lo:hi], b[lo:hi] if b is not None else None,
                                   transpose=True, group_size=m.group_size, bits=m.bits,
                                   mode=m.mode, stream=stream)

    y = _by_rows(part, w.shape[-2])
    return y.astype(x.dtype)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        y = quantized_project(x, self)
        return y + self["bias"] if "bias" in self else y


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, quantizes the same way) with `project`'s kernels."""

    def __call__(self, x):
        return project(x, self["weight"], self.get("bias"))

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


def head(emb: nn.Module, h: mx.array) -> mx.array:
    """Tied LM head: ``h @ embed_tokens.weight.T``, float or quantized."""
    return quantized_project(h, emb) if "scales" in emb else project(h, emb["weight"])
