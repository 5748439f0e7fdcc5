"""One-token (decode) attention on MLX's CPU backend as plain ops.

For a query of one token, `mx.fast.scaled_dot_product_attention` on the CPU backend is
~1.6x slower than the same computation written out: the scores of the ``H / Hk`` query
heads that share a kv head are one (rep, D) x (D, S) product against the cache as it is (a
strided view, no copy), then a float32 softmax (`fastmath.softmax`'s vectorized exp where
there are enough scores) and the product with v. Qwen3-0.6B's 16 query / 8 kv heads of 128,
520 cached tokens, float32, 2 cores: 0.80 vs 1.27 ms per layer (2056 tokens: 4.5 vs 6.9);
in the model's decode step 0.8-1.0 ms per layer less (28 layers at 512 tokens: +9% tok/s).
Used for float32 only (`applies`); the function also takes half precision (as MLX: products
in that dtype, softmax in float32; bit for bit MLX's results).
"""

from typing import Optional

import mlx.core as mx

from .fastmath import softmax


def _scores_mask(mask: mx.array, Hk: int, rep: int) -> mx.array:
    """A mask broadcastable to (B, H, 1, S) as (B or 1, Hk or 1, rep or 1, S)."""
    m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape) if mask.ndim < 4 else mask
    m = m.reshape(m.shape[0], m.shape[1], m.shape[-1])  # drop the one query row
    if m.shape[1] == Hk * rep and m.shape[1] > 1:
        return m.reshape(m.shape[0], Hk, rep, m.shape[-1])
    return m[:, :, None]


def decode_sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float,
                mask: Optional[mx.array] = None) -> mx.array:
    """`mx.fast.scaled_dot_product_attention` for ``q`` (B, H, 1, D), ``k`` / ``v``
    (B, Hk, S, D) with ``Hk | H``, ``mask`` None, boolean (True = attend) or additive,
    broadcastable to (B, H, 1, S). Returns (B, H, 1, D)."""
    B, H, L, D = q.shape
    Hk = k.shape[1]
    rep = H // Hk
    s = (q * scale).reshape(B, Hk, rep, D) @ k.swapaxes(-1, -2)  # (B, Hk, rep, S)
    if mask is not None:
        m = _scores_mask(mask, Hk, rep)
        if m.dtype == mx.bool_:  # MLX: masked scores at the dtype's lowest value
            s = mx.where(m, s, mx.array(mx.finfo(s.dtype).min, s.dtype))
        else:
            s = s + m.astype(s.dtype)
    if s.dtype == mx.float32:
        p = softmax(s)
    else:
        p = mx.softmax(s, axis=-1, precise=True)
    return (p @ v).reshape(B, H, L, v.shape[-1])


def applies(q: mx.array, k: mx.array, mask) -> bool:
    """A float32 one-token query, heads that group evenly, no string mask and a mask no wider
    than (B, H, 1, S). Half precision stays with MLX's SDPA: alone the plain ops are faster
    (bf16, 520 tokens: 2.4 vs 3.3 ms), but a 4-layer bf16 model's decode step is not
    (paired per-token A/B at 512 tokens, two runs: 0.5 and 2.4 ms per layer slower)."""
    return (q.shape[2] == 1 and q.shape[1] % k.shape[1] == 0 and q.dtype == k.dtype == mx.float32
            and (mask is None or (isinstance(mask, mx.array) and mask.ndim <= 4
                                  and (mask.ndim < 2 or mask.shape[-2] == 1))))
