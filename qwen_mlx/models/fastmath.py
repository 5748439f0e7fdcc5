"""Fast float32 transcendentals and attention for MLX's CPU backend.

On the CPU backend MLX evaluates ``exp`` / ``sigmoid`` / ``erf`` / ``tanh`` one element at a
time through scalar ``fma`` / ``floor`` library calls (~16-35 ns per element on a 2-core
x86 box: ``silu`` over a Qwen2.5-VL MLP activation (1296, 3420) takes ~105 ms, ``mx.softmax``
over (16, 1296, 1296) scores ~540 ms), while ``mx.compile`` turns chains of cheap
elementwise ops into one loop that the C++ compiler vectorizes. Here ``exp`` is rebuilt from
such ops, and sigmoid, SiLU, SwiGLU, the GELUs, softmax and attention from that ``exp``.
On Metal / CUDA, for other dtypes, for small arrays (decode rows) or with
``FAST.enabled = False`` (env ``QWEN_MLX_FASTMATH=0``) every function is the stock MLX op.

``exp(a)`` = ``2**n * p(r)``: ``n = round(a * log2 e)`` and ``r = a - n ln2`` in
[-ln2/2, ln2/2] (Cody-Waite: ln2 split in a 9-bit head and a tail, so ``n * head`` is exact),
``p`` a degree-6 minimax polynomial for e**r (< 1 ulp in float32), ``2**n`` the float whose
exponent bits are ``n + 127``. E.g. a = 10: n = 14, r = 10 - 14 ln2 = 0.2959, p(r) = 1.34443,
2**14 * 1.34443 = 22026.47.

What the CPU compiler makes of MLX's fused kernels (``g++ -O3``, SSE2) shapes the code:
``floor`` / ``round`` become library calls and ``where`` or a float ``maximum`` followed
by some arithmetic stop the loop from vectorizing; MLX fuses at most 11 levels of ops into
one kernel; a ``view`` (int -> float bits) ends a kernel; ``shapeless`` compilation adds a
broadcast per constant (deeper, unvectorized kernels). So each function here is three
vectorized kernels: ``bits`` (argument -> int32 exponent bits: ``n + 127`` by truncating
``a log2e + 127.5``, clamped as integers), ``r`` (argument -> reduced argument), and a last
one (``p(r) * 2**n`` and what follows, e.g. ``x / (1 + e)``). The first two recompute the
argument (``-x``, ``-1.702 x``, the tanh-GELU cubic) from the input, so nothing else goes
through memory: silu over (1296, 3420) ~10x faster than ``nn.silu``.

Special values: arguments below about -87.7 flush to exactly 0 (MLX: below -88; the true
value is < 1e-38 there), the result is inf from about 88.4 on (MLX's ``exp``: from 88.0),
NaN propagates. Softmax rows that are all ``-inf`` give NaN, as ``mx.softmax`` does.

Attention (`sdpa`) is ``softmax(q k^T * scale + mask) v`` with this exp, as
`mx.fast.scaled_dot_product_attention` takes it (grouped-query heads, boolean / additive
masks, ``"causal"`` aligned to the last keys), in query chunks of at most ``FAST.attn_block``
scores (they stay in cache; causal chunks skip the keys they cannot see) that alternate over
two CPU streams (one chunk's single-threaded softmax runs beside the next one's BLAS
products); the row sums come from a column of ones appended to v. Chunks take query rows of
all heads, or of one kv head at a time where one kv head's scores exceed the budget (larger
products: a (1, 16, 1296, 80) ViT attention from a fused qkv output 152 vs 194 ms, 2 cores;
25 windows of 64 keep the all-head chunks: 24 ms). (16, 1296, 80) heads: ~2.5-3.5x faster
than MLX's kernel. The first fast call also has glibc keep freed memory for reuse at any
size (``FAST.keep_freed``: a new prompt length needs new buffer sizes, which glibc would
otherwise map fresh and fault in page by page) or, where that is off or there is no glibc,
raises MLX's CPU buffer cache (``FAST.cpu_cache_bytes``): with its 32 MiB default every
large activation is new memory.
"""

import ctypes
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu as _stock_swiglu


def _ram() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


@dataclass
class FastMathOptions:
    enabled: bool = os.environ.get("QWEN_MLX_FASTMATH", "1") != "0"
    min_size: int = int(os.environ.get("QWEN_MLX_FASTMATH_MIN", "8192"))  # fewer elements (decode rows): stock op
    attn_min: int = int(os.environ.get("QWEN_MLX_FASTMATH_ATTN_MIN", 1 << 15))  # fewer scores (B H L S): MLX kernel
    attn_block: int = 1 << 20  # attention: score elements per query chunk (4 MiB float32)
    streams: bool = True  # attention: chunks alternate over one CPU stream per core (2 at most)
    # MLX keeps at most 32 MiB of freed buffers on the CPU backend, so every new activation of
    # a prefill / vision tower (17 MiB for one (1296, 3420) float32 MLP activation) comes back
    # from the OS page by page (~4 ns per float of page faults: as much as the op itself).
    # The first fast-path call raises the limit to this (never lowers it; 0: leave it alone)
    # unless `keep_freed` applies.
    cpu_cache_bytes: int = min(1 << 30, _ram() // 8)
    # That cache reuses only buffers of (nearly) the same size, so a prompt of a new length
    # still gets fresh memory for every activation (and the cache holds the old sizes): glibc
    # serves large blocks by mmap and unmaps them when freed, and each page then faults back
    # in (~15-20 us per 4 KiB page here: a 341-token 4-layer Qwen2.5-VL-3B prefill after a
    # 339-token one took 2.0 s instead of 1.4 s, 38k faults). So where glibc takes it, the
    # first fast-path call instead makes glibc keep freed memory in the process heap and
    # reuse it for any size (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD) and leaves MLX's
    # cache limit alone: the resident size stays near its peak. Off: the raised cache above.
    keep_freed: bool = os.environ.get("QWEN_MLX_KEEP_FREED", "1") != "0"


FAST = FastMathOptions()
_cache_raised = False


def active(*xs: mx.array) -> bool:
    """The fast path applies: enabled, CPU backend, float32 inputs, enough elements."""
    ok = (FAST.enabled and mx.default_device() == mx.cpu and xs[0].size >= FAST.min_size
          and all(x.dtype == mx.float32 for x in xs))
    if ok and not _cache_raised:
        _raise_cache_limit()
    return ok


@lru_cache(maxsize=None)
def _streams():
    """Two CPU streams where there are two cores or more: MLX runs each on its own thread, so
    one chunk's single-threaded softmax kernels overlap another's BLAS products."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return [mx.new_stream(mx.cpu) for _ in range(2)] if n > 1 else []


def _raise_cache_limit() -> None:
    global _cache_raised
    _cache_raised = True
    if FAST.keep_freed and _keep_freed_memory():  # glibc reuses freed memory of any size
        return
    if FAST.cpu_cache_bytes:
        previous = mx.set_cache_limit(FAST.cpu_cache_bytes)
        if previous > FAST.cpu_cache_bytes:
            mx.set_cache_limit(previous)


def _keep_freed_memory() -> bool:
    """glibc: large blocks from the heap, freed memory kept (True where it took)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim_threshold, mmap_threshold = -1, -3  # glibc's M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    # older glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): then that
    if not (mallopt(mmap_threshold, 1 << 30) or mallopt(mmap_threshold, 32 << 20)):
        return False
    return bool(mallopt(trim_threshold, (1 << 31) - 1))


# ------------------------------------------------------------------------ exp building blocks

_L2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln2 = HI + LO, HI has 9 significant bits
# e**r ~ 1 + r + r^2 (c0 + c1 r + c2 r^2 + c3 r^3 + c4 r^4) on [-ln2/2, ln2/2]: relative
# minimax fit (3e-9 in float64, 9e-8 evaluated in float32 as in `_poly`)
_C = (0.4999999403953552, 0.1666652113199234, 0.04166838899254799, 0.008368710055947304,
      0.001381461275741458)
_GELU_K1 = -2.0 * math.sqrt(2.0 / math.pi)  # tanh-GELU: x * sigmoid(-a), a = x (K1 + K2 x^2)
_GELU_K2 = _GELU_K1 * 0.044715


def _exponent(t):
    """floor(t) for t = a * log2e + 127.5 > 0, i.e. n + 127 with n = round(a * log2e) (an
    int32; ``astype`` truncates, and gives INT_MIN for +-inf, NaN and |t| >= 2**31)."""
    return t.astype(mx.int32)


def _bits(a, t):
    """int32 bits of 2**n: 0 (a flushed result) for n <= -127, inf for n >= 128."""
    e = mx.minimum(mx.maximum(_exponent(t), 0), 255)
    return mx.maximum(e, (a > 100.0).astype(mx.int32) * 255) << 23


def _reduced(a, t):
    """r = a - n ln2 in [-ln2/2, ln2/2] (outside only where the result is 0 or inf)."""
    n = mx.maximum(_exponent(t), 0).astype(mx.float32) - 127.0
    return (mx.maximum(a, -88.0) - n * _LN2_HI) - n * _LN2_LO


def _poly(r):
    """e**r, Estrin's scheme (depth 6)."""
    c0, c1, c2, c3, c4 = _C
    r2 = r * r
    return 1.0 + ((r + (c0 + c1 * r) * r2) + ((c2 + c3 * r) + c4 * r2) * (r2 * r2))


_ARGS = {  # family: (the exponent a(x), a(x) * log2e + 127.5 with the constants folded)
    "exp": (lambda x: x, lambda x: x * _L2E + 127.5),
    "neg": (lambda x: -x, lambda x: x * -_L2E + 127.5),
    "quick": (lambda x: x * -1.702, lambda x: x * (-1.702 * _L2E) + 127.5),
    "tanh": (lambda x: x * (_GELU_K1 + _GELU_K2 * (x * x)),
             lambda x: x * (_GELU_K1 * _L2E + _GELU_K2 * _L2E * (x * x)) + 127.5),
}
_KERNELS = {k: (mx.compile(lambda x, a=a, t=t: _bits(a(x), t(x))),
                mx.compile(lambda x, a=a, t=t: _reduced(a(x), t(x)))) for k, (a, t) in _ARGS.items()}


@mx.compile
def _exp_out(r, s):
    return _poly(r) * s


@mx.compile
def _sigmoid_out(r, s):
    return 1.0 / (1.0 + _poly(r) * s)


@mx.compile
def _xsig_out(x, r, s):  # x * sigmoid(.) = x / (1 + e)
    return x / (1.0 + _poly(r) * s)


@mx.compile
def _swiglu_out(g, u, r, s):
    return g / (1.0 + _poly(r) * s) * u


def _parts(kind: str, x: mx.array):
    bits, reduced = _KERNELS[kind]
    return reduced(x), bits(x).view(mx.float32)


# ---------------------------------------------------------------------------- elementwise ops


def exp(x: mx.array) -> mx.array:
    if not active(x):
        return mx.exp(x)
    return _exp_out(*_parts("exp", x))


def sigmoid(x: mx.array) -> mx.array:
    if not active(x):
        return mx.sigmoid(x)
    return _sigmoid_out(*_parts("neg", x))


def silu(x: mx.array) -> mx.array:
    if not active(x):
        return nn.silu(x)
    return _xsig_out(x, *_parts("neg", x))


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """``silu(gate) * x`` (mlx-lm's ``swiglu``)."""
    if not active(gate, x) or gate.shape != x.shape:
        return _stock_swiglu(gate, x)
    gate, x = mx.contiguous(gate), mx.contiguous(x)  # halves of a fused gate_up output: strided
    return _swiglu_out(gate, x, *_parts("neg", gate))


def quick_gelu(x: mx.array) -> mx.array:
    """``x * sigmoid(1.702 x)`` (``nn.gelu_fast_approx``, HF ``quick_gelu``)."""
    if not active(x):
        return nn.gelu_fast_approx(x)
    return _xsig_out(x, *_parts("quick", x))


def gelu_tanh(x: mx.array) -> mx.array:
    """HF ``gelu_pytorch_tanh`` (``nn.gelu_approx``) as the identity
    ``0.5 x (1 + tanh(u)) = x * sigmoid(2u)``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``."""
    if not active(x):
        return nn.gelu_approx(x)
    return _xsig_out(x, *_parts("tanh", x))


# erf(z) ~ z P(z^2) / Q(z^2) on |z| <= 4 (beyond, erf = +-1 in float32): a (5, 5) rational
# fit, 3.5e-7 absolute error in float32; P is halved for gelu = x (0.5 + 0.5 erf(x / sqrt2)).
_ERF_P = tuple(0.5 * c for c in (1.128378987312317, 0.19623857736587524, 0.053465839475393295,
                                  0.004003106616437435, 0.000288013688987121, 1.974720589714707e-06))
_ERF_Q = (1.0, 0.5072430968284607, 0.11647187918424606, 0.01544338371604681, 0.001216198201291263,
          3.747824302990921e-05)


def _estrin5(c, w):
    w2 = w * w
    return ((c[0] + c[1] * w) + (c[2] + c[3] * w) * w2) + (c[4] + c[5] * w) * (w2 * w2)


@mx.compile
def _erf_arg(x):
    return mx.minimum(mx.maximum(x * (1.0 / math.sqrt(2.0)), -4.0), 4.0)


@mx.compile
def _gelu_out(x, z):
    w = z * z
    return x * (0.5 + z * _estrin5(_ERF_P, w) / _estrin5(_ERF_Q, w))


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, ``nn.gelu``."""
    if not active(x):
        return nn.gelu(x)
    return _gelu_out(x, _erf_arg(x))


class GELU(nn.Module):
    """``nn.GELU()`` (exact) with the fast path; no parameters."""

    def __call__(self, x):
        return gelu(x)


# -------------------------------------------------------------------------- softmax, attention


def _row_max(s: mx.array) -> mx.array:
    """Max over the last axis; with 16 | n as max over 16-wide column blocks, then over the
    16 (MLX's column reduction vectorizes: ~2.5x faster than the row reduction here)."""
    n = s.shape[-1]
    if n % 16 or n == 16:
        return mx.max(s, axis=-1, keepdims=True)
    return mx.max(mx.max(s.reshape(*s.shape[:-1], n // 16, 16), axis=-2), axis=-1, keepdims=True)


def _exp_shifted(s: mx.array) -> mx.array:
    """exp(s - rowmax) over the last axis."""
    return _exp_out(*_parts("exp", s - _row_max(s)))


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    if not active(x):
        return mx.softmax(x, axis=axis)
    if axis not in (-1, x.ndim - 1):
        return mx.moveaxis(softmax(mx.moveaxis(x, axis, -1)), -1, axis)
    e = _exp_shifted(x)
    return e * (1.0 / e.sum(axis=-1, keepdims=True))


_NEG = float(mx.finfo(mx.float32).min)  # a masked score (MLX: boolean masks, fully masked rows average)


def _mask_part(mask: mx.array, Hk: int, rep: int, L: int, S: int, h: slice, a: int, b: int, keys: int):
    """The additive mask of kv heads ``h``, query rows a:b and keys :keys, shaped for scores
    (B, heads, rep, b-a, keys)."""
    m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape) if mask.ndim < 4 else mask
    if m.shape[-2] == L:
        m = m[..., a:b, :]
    if m.shape[-1] == S:
        m = m[..., :keys]
    if m.shape[1] == Hk * rep and m.shape[1] > 1:
        m = m.reshape(m.shape[0], Hk, rep, *m.shape[-2:])[:, h]
    else:
        m = m[:, :, None]
    if m.dtype == mx.bool_:
        return mx.where(m, 0.0, _NEG)
    return m.astype(mx.float32)


def sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float,
         mask: Union[None, str, mx.array] = None) -> mx.array:
    """`mx.fast.scaled_dot_product_attention` (same arguments and results: q (B, H, L, D),
    k / v (B, Hk, S, D) with H a multiple of Hk; mask None, "causal" (query i sees keys
    <= i + S - L), boolean (True = attend) or additive, broadcastable to (B, H, L, S))."""
    B, H, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    causal = isinstance(mask, str)
    if (not active(q, k, v) or L < 2 or B * H * L * S < FAST.attn_min or H % Hk
            or (causal and (mask != "causal" or L > S))
            or (mask is not None and not causal and mask.ndim > 4)):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    rep = H // Hk
    per_head = B * rep * L * S  # scores of one kv head (its query heads) over all rows
    if per_head > FAST.attn_block:  # large heads: query-row slices of one kv head (the largest products)
        rows, groups = max(1, FAST.attn_block // (B * rep * S)), [slice(h, h + 1) for h in range(Hk)]
    else:  # small heads (windows, short prompts): query-row slices of all heads
        rows, groups = max(1, min(L, FAST.attn_block // (B * H * S))), [slice(0, Hk)]
    chunks = [(h, a, min(L, a + rows)) for h in groups for a in range(0, L, rows)]
    q = (q * scale).reshape(B, Hk, rep, L, D)
    kt = mx.contiguous(k.swapaxes(-1, -2))  # BLAS: (L, D) x (D, S) beats the transposed view
    v1 = mx.concatenate([v, mx.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)  # last column: row sums
    streams = _streams() if FAST.streams and len(chunks) > 1 else []
    outs = []
    for i, (h, a, b) in enumerate(chunks):
        with mx.stream(streams[i % len(streams)]) if streams else nullcontext():
            outs.append(_chunk(q, kt, v1, mask, causal, h, a, b, Hk, rep, L, S, D))
    if len(outs) == 1:
        return outs[0].reshape(B, H, L, D)
    n = (L + rows - 1) // rows  # row chunks per head group
    parts = [mx.concatenate(outs[j:j + n], axis=3) if n > 1 else outs[j] for j in range(0, len(outs), n)]
    out = mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return out.reshape(B, H, L, D)


def _chunk(q, kt, v1, mask, causal, h, a, b, Hk, rep, L, S, D):
    """Attention of kv heads ``h`` (their query heads) and query rows a:b: (B, heads, rep, b-a, D)."""
    keys = S - L + b if causal else S
    qc = q[:, h, :, a:b]
    B, nh = qc.shape[:2]
    s = qc.reshape(B, nh, rep * (b - a), D) @ (kt[:, h, :, :keys] if keys < S else kt[:, h])
    bias = None
    if causal and S - L + a + 1 < keys:  # the chunk's last rows see keys the first do not
        i = mx.arange(a, b)[:, None] + (S - L)
        bias = mx.where(mx.arange(keys)[None] > i, _NEG, 0.0)
    elif mask is not None and not causal:
        bias = _mask_part(mask, Hk, rep, L, S, h, a, b, keys)
    if bias is not None:
        s = (s.reshape(B, nh, rep, b - a, keys) + bias).reshape(B, nh, rep * (b - a), keys)
    o = _exp_shifted(s) @ (v1[:, h, :keys] if keys < S else v1[:, h])
    return (o[..., :D] * (1.0 / o[..., D:])).reshape(B, nh, rep, b - a, D)
