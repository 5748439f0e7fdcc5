"""One-token CPU attention (models/decode_attention.py) against MLX's SDPA: grouped-query
shapes, real KV-cache views (strided), lengths 1..600, masks; and the decoder's dispatch
(plain and rotating caches use it, quantized caches do not; same logits as MLX's SDPA)."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from qwen_mlx.models import decode_attention as DA
from qwen_mlx.models import linear as L
from tests.helpers import rel_err
from tests.models.test_step import QWEN2_SLIDING, QWEN3, model_for


def cached(B, Hk, S, D, dtype=mx.float32, seed=0):
    """k, v (B, Hk, S, D) as a KVCache returns them: views into a larger buffer."""
    mx.random.seed(seed)
    c = KVCache()
    if S > 1:
        c.update_and_fetch(*(mx.random.normal((B, Hk, S - 1, D)).astype(dtype) for _ in range(2)))
    return c.update_and_fetch(*(mx.random.normal((B, Hk, 1, D)).astype(dtype) for _ in range(2)))


def stock(q, k, v, scale, mask=None):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


@pytest.mark.parametrize("B,H,Hk,D", [(1, 16, 8, 128), (1, 14, 2, 64), (2, 4, 1, 32), (1, 6, 6, 80)])
def test_matches_mlx_sdpa_float32(B, H, Hk, D):
    for S in (1, 2, 17, 255, 256, 257, 600):
        k, v = cached(B, Hk, S, D, seed=S)
        q = mx.random.normal((B, H, 1, D))
        ours, ref = DA.decode_sdpa(q, k, v, D**-0.5), stock(q, k, v, D**-0.5)
        assert ours.shape == ref.shape == (B, H, 1, D)
        assert rel_err(ours, ref) <= 1e-5, (S, rel_err(ours, ref))


def test_a_wrong_head_grouping_would_fail():
    """The check above can fail: pairing query heads with the wrong kv head is far off."""
    k, v = cached(1, 2, 40, 32)
    q = mx.random.normal((1, 4, 1, 32))
    swapped = DA.decode_sdpa(q, k[:, ::-1], v[:, ::-1], 32**-0.5)
    assert rel_err(swapped, stock(q, k, v, 32**-0.5)) > 0.1


@pytest.mark.parametrize("S", [5, 300, 600])
def test_masks(S):
    B, H, Hk, D = 2, 8, 2, 64
    k, v = cached(B, Hk, S, D, seed=S)
    q = mx.random.normal((B, H, 1, D))
    rng = np.random.default_rng(S)
    keep = rng.random((B, H, 1, S)) > 0.3
    keep[..., -1] = True
    masks = [mx.array(keep[0, 0, 0]), mx.array(keep[:, :1]), mx.array(keep[:1]), mx.array(keep),
             mx.array(np.where(keep, 0.0, -1e9).astype(np.float32)),  # additive
             mx.array(rng.normal(size=(1, H, 1, S)).astype(np.float32))]
    for m in masks:
        assert DA.applies(q, k, m)
        assert rel_err(DA.decode_sdpa(q, k, v, 0.125, m), stock(q, k, v, 0.125, m)) <= 1e-5, m.shape
    full = rel_err(DA.decode_sdpa(q, k, v, 0.125), stock(q, k, v, 0.125, masks[3]))
    assert full > 1e-3  # the masks matter


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_as_mlx(dtype):
    for S in (1, 100, 600):
        k, v = cached(1, 8, S, 128, dtype, seed=S)
        q = mx.random.normal((1, 16, 1, 128)).astype(dtype)
        ours, ref = DA.decode_sdpa(q, k, v, 128**-0.5), stock(q, k, v, 128**-0.5)
        assert ours.dtype == dtype
        assert mx.array_equal(ours, ref).item(), S  # the same operations, in the same order


def test_applies():
    q, k = mx.zeros((1, 4, 1, 8)), mx.zeros((1, 2, 5, 8))
    assert DA.applies(q, k, None)
    assert not DA.applies(mx.zeros((1, 4, 2, 8)), k, None)  # two query rows
    assert not DA.applies(mx.zeros((1, 3, 1, 8)), k, None)  # 3 heads over 2
    assert not DA.applies(q, k, "causal")
    assert not DA.applies(q.astype(mx.bfloat16), k.astype(mx.bfloat16), None)  # MLX's SDPA there
    assert not DA.applies(q, k, mx.zeros((1, 4, 2, 5)))


@pytest.fixture
def speed():
    saved = L.SpeedOptions(**vars(L.SPEED))
    yield L.SPEED
    vars(L.SPEED).update(vars(saved))


def _decode_logits(model, cache, prompt, n=6):
    model(mx.array(prompt[:, :-1]), cache=cache)
    y, out = mx.array(prompt[:, -1:]), []
    for _ in range(n):
        logits = model(y, cache=cache)[:, -1]
        out.append(logits)
        y = mx.argmax(logits, axis=-1)[:, None]
    return mx.stack(out)


@pytest.mark.parametrize("cfg,make", [
    (QWEN3, lambda m: m.make_cache()),
    (QWEN2_SLIDING, lambda m: m.make_cache()),  # a sliding layer (window 7): (1, S) boolean masks
    (QWEN3, lambda m: [RotatingKVCache(max_size=16) for _ in m.layers]),
    (QWEN3, lambda m: [QuantizedKVCache(group_size=32, bits=8) for _ in m.layers]),
])
def test_decoder_dispatch(cfg, make, speed, monkeypatch):
    model = model_for(cfg)
    prompt = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=(1, 30))
    calls = []
    real = DA.decode_sdpa
    monkeypatch.setattr(DA, "decode_sdpa", lambda *a: calls.append(a[0].shape) or real(*a))
    speed.decode_attn = True
    ours = _decode_logits(model, make(model), prompt)
    quantized = isinstance(make(model)[0], QuantizedKVCache)
    assert len(calls) == (0 if quantized else 6 * len(model.layers))
    speed.decode_attn = False
    ref = _decode_logits(model, make(model), prompt)
    assert len(calls) == (0 if quantized else 6 * len(model.layers))
    assert rel_err(ours, ref) <= 1e-5
