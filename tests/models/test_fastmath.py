"""CPU fast math (models/fastmath.py): elementwise kernels against float64 references and the
stock MLX ops over the whole float32 range (specials included), softmax and attention against
MLX's (masks, GQA, causal with a cache offset, query chunks, mx.compile), the stock fallbacks,
and transformers parity of a decoder and the vision towers with the fast path forced on."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu as stock_swiglu

from qwen_mlx.models import fastmath as fm
from tests.helpers import REL_TOL, rel_err

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the fast path is CPU-only")

SPECIAL = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0, 1e-45, -1e-30, 88.0, 88.3, 88.72, 89.0, 100.0,
                    1e9, 3e9, 1e30, 3.4e38, -87.3, -87.7, -88.0, -88.5, -100.0, -1e9, -3e9, -1e30,
                    -3.4e38], np.float32)
GRID = np.concatenate([np.linspace(-120, 120, 240_001, dtype=np.float32), SPECIAL])


@pytest.fixture
def forced():
    """The fast path for any size (restored afterwards)."""
    saved = (fm.FAST.enabled, fm.FAST.min_size, fm.FAST.attn_min, fm.FAST.attn_block)
    fm.FAST.enabled, fm.FAST.min_size, fm.FAST.attn_min = True, 0, 0
    yield fm.FAST
    fm.FAST.enabled, fm.FAST.min_size, fm.FAST.attn_min, fm.FAST.attn_block = saved


def _sig64(z):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def _gelu64(x):
    return np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) if np.isfinite(v) else np.nan for v in x])


REF = {  # float64 references (the tanh GELU through its exact sigmoid form: no cancellation)
    "exp": lambda x: np.exp(np.minimum(x, 700)),
    "sigmoid": _sig64,
    "silu": lambda x: x * _sig64(x),
    "quick_gelu": lambda x: x * _sig64(1.702 * x),
    "gelu_tanh": lambda x: x * _sig64(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)),
    "gelu": _gelu64,
}
STOCK = {"exp": mx.exp, "sigmoid": mx.sigmoid, "silu": nn.silu, "quick_gelu": nn.gelu_fast_approx,
         "gelu_tanh": nn.gelu_approx, "gelu": nn.gelu}
# max |err| / max(|ref|, 1e-7 max(|x|, 1)): < 1 ulp where the argument is exact (exp, sigmoid,
# silu); the scaled arguments of quick / tanh GELU carry their float32 rounding (stock: the same
# or worse); the erf GELU has a 3.5e-7 absolute erf error (stock: cancellation in 1 + erf)
TOL = {"exp": 2e-7, "sigmoid": 3e-7, "silu": 3e-7, "quick_gelu": 3e-6, "gelu_tanh": 3e-6, "gelu": 3.5}


@pytest.mark.parametrize("name", list(REF))
def test_elementwise_against_float64(forced, name):
    x64 = GRID.astype(np.float64)
    ours = np.array(getattr(fm, name)(mx.array(GRID))).astype(np.float64)
    with np.errstate(all="ignore"):
        ref = REF[name](x64)
    ok = np.isfinite(ref) & (np.abs(ref) > 1.2e-38) & np.isfinite(x64) & ((x64 < 88.37) | (name != "exp"))
    err = np.abs(ours[ok] - ref[ok]) / np.maximum(np.abs(ref[ok]), 1e-7 * np.maximum(np.abs(x64[ok]), 1))
    assert err.max() <= TOL[name], f"{name}: {err.max():.3g} at x = {GRID[ok][err.argmax()]}"
    if name == "gelu":  # absolute error of the erf fit, scaled by |x|
        assert np.max(np.abs(ours[ok] - ref[ok]) / np.maximum(np.abs(x64[ok]), 1)) <= 2.5e-7
    assert np.isnan(ours[np.isnan(GRID)]).all()


def test_exp_specials(forced):
    y = np.array(fm.exp(mx.array(GRID)))
    assert (y[GRID <= -87.7] == 0).all()  # flushed to exactly 0 (-inf included): masked scores
    assert np.isinf(y[GRID >= 88.4]).all() and (y[GRID >= 88.4] > 0).all()
    assert np.isfinite(y[(GRID > -87.7) & (GRID < 88.37)]).all()
    assert y[GRID == 0][0] == 1.0
    s = np.array(fm.sigmoid(mx.array(SPECIAL)))
    assert s[0] == 0 and s[1] == 1 and np.isnan(s[2]) and s[SPECIAL == -1e30][0] == 0 and s[SPECIAL == 1e30][0] == 1
    si = np.array(fm.silu(mx.array(SPECIAL)))
    assert si[1] == np.inf and si[SPECIAL == -1e30][0] == 0 and si[SPECIAL == 1e30][0] == 1e30
    assert np.isnan(si[0]) == np.isnan(np.array(nn.silu(mx.array(SPECIAL)))[0])  # -inf: NaN as stock


@pytest.mark.parametrize("name", list(REF))
def test_elementwise_against_stock(forced, name):
    """The brief's check: the stock op over activations of realistic scale, within 1e-6."""
    x = mx.random.normal((300, 257), key=mx.random.key(1)) * 4
    ours, stock = getattr(fm, name)(x), STOCK[name](x)
    assert ours.dtype == mx.float32 and ours.shape == x.shape
    assert rel_err(ours, stock) <= 1e-6


def test_swiglu(forced):
    g = mx.random.normal((64, 300), key=mx.random.key(2)) * 5
    u = mx.random.normal((64, 300), key=mx.random.key(3))
    assert rel_err(fm.swiglu(g, u), stock_swiglu(g, u)) <= 1e-6
    assert rel_err(fm.swiglu(g, u), np.array(g) * _sig64(np.array(g, np.float64)) * np.array(u)) <= 3e-7


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_other_dtypes_use_the_stock_ops(forced, dtype):
    x = (mx.random.normal((40, 50), key=mx.random.key(4)) * 3).astype(dtype)
    for name, stock in STOCK.items():
        assert mx.array_equal(getattr(fm, name)(x), stock(x)), name
    assert mx.array_equal(fm.softmax(x), mx.softmax(x, axis=-1))
    assert mx.array_equal(fm.swiglu(x, x), stock_swiglu(x, x))


def test_small_or_disabled_use_the_stock_ops():
    small = mx.random.normal((1, 2048), key=mx.random.key(5))  # a decode row: below min_size
    assert small.size < fm.FAST.min_size
    for name, stock in STOCK.items():
        assert mx.array_equal(getattr(fm, name)(small), stock(small)), name
    big = mx.random.normal((64, 512), key=mx.random.key(6))
    saved = fm.FAST.enabled
    fm.FAST.enabled = False
    try:
        assert mx.array_equal(fm.silu(big), nn.silu(big))
        q = big.reshape(1, 2, 64, 256)
        ref = mx.fast.scaled_dot_product_attention(q, q, q, scale=0.1, mask="causal")
        assert mx.array_equal(fm.sdpa(q, q, q, 0.1, "causal"), ref)
    finally:
        fm.FAST.enabled = saved


def test_softmax(forced):
    x = np.array(mx.random.normal((9, 301), key=mx.random.key(7))) * 20
    x[0, ::3] = -np.inf  # masked entries: exactly 0
    x[1, :] = -np.inf  # a fully masked row: NaN, as mx.softmax
    x[2, 5] = 3e38  # one huge logit
    x[3] -= 1e4  # far below zero: still normalised
    ours, ref = np.array(fm.softmax(mx.array(x))), np.array(mx.softmax(mx.array(x), axis=-1, precise=True))
    assert (ours[0, ::3] == 0).all()
    assert np.isnan(ours[1]).all() and np.isnan(ref[1]).all()
    keep = np.arange(9) != 1
    assert np.abs(ours[keep] - ref[keep]).max() <= 1e-6
    assert np.abs(ours[keep].sum(-1) - 1).max() <= 1e-6
    x3 = mx.random.normal((4, 70, 5), key=mx.random.key(8))
    assert rel_err(fm.softmax(x3, axis=1), mx.softmax(x3, axis=1)) <= 1e-6
    x4 = np.array(mx.random.normal((6, 64), key=mx.random.key(9))) * 30  # 16 | n: blocked row max
    x4[0, 17] = 500.0
    x4[1, :60] = -np.inf
    assert rel_err(fm.softmax(mx.array(x4)), mx.softmax(mx.array(x4), axis=-1, precise=True)) <= 1e-6


def test_cpu_buffer_cache_raised_once_never_lowered(forced):
    big = mx.random.normal((64, 256), key=mx.random.key(10))
    saved, keep = mx.set_cache_limit(32 << 20), fm.FAST.keep_freed
    fm.FAST.keep_freed = False  # without glibc's reuse (or off): a raised buffer cache
    try:
        fm._cache_raised = False
        mx.eval(fm.silu(big))
        assert mx.set_cache_limit(8 << 30) == fm.FAST.cpu_cache_bytes > 32 << 20
        fm._cache_raised = False
        mx.eval(fm.silu(big))
        assert mx.set_cache_limit(32 << 20) == 8 << 30  # a larger limit stays
    finally:
        mx.set_cache_limit(saved)
        fm.FAST.keep_freed = keep


def test_freed_memory_reused_for_a_new_size(forced):
    """With glibc keeping freed memory, a buffer of a new size reuses a freed larger one
    instead of faulting fresh pages in (MLX's own cache: only the same size)."""
    resource = pytest.importorskip("resource")
    if not fm._keep_freed_memory():
        pytest.skip("not glibc")
    saved = mx.set_cache_limit(0)  # every freed buffer goes back to malloc
    try:
        fm._cache_raised = False
        mx.eval(fm.silu(mx.random.normal((64, 256), key=mx.random.key(11))))
        assert mx.set_cache_limit(0) == 0  # MLX's cache limit left alone
        a = mx.full((12 << 20,), 1.0)  # 48 MiB, faulted in
        mx.eval(a)
        del a
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        b = mx.full((11 << 20,), 2.0)  # 44 MiB: a new size, no new pages
        mx.eval(b)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        assert faults < 1000, faults  # ~11k fresh 4 KiB pages without the reuse
        assert b[-1].item() == 2.0
    finally:
        mx.set_cache_limit(saved)


def _qkv(B, H, Hk, L, S, D=16, seed=0):
    k = [mx.random.key(seed + i) for i in range(3)]
    return (mx.random.normal((B, H, L, D), key=k[0]) * 2, mx.random.normal((B, Hk, S, D), key=k[1]) * 2,
            mx.random.normal((B, Hk, S, D), key=k[2]))


def _masks(B, H, L, S):
    rng = np.random.default_rng(0)
    rand = rng.random((L, S)) < 0.6
    rand[:, 0] = True
    pad = np.ones((B, 1, 1, S), bool)
    pad[0, ..., S - 5:] = False  # key padding, as the vision tower's padded windows
    add = rng.standard_normal((B, H, L, S)).astype(np.float32) * 3
    add_inf = add.copy()
    add_inf[..., 1::4] = -np.inf
    return {"none": None, "causal": "causal", "bool": mx.array(rand), "key padding": mx.array(pad),
            "per-head bool": mx.array(rng.random((B, H, L, S)) < 0.5), "additive": mx.array(add),
            "additive -inf": mx.array(add_inf)}


@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])  # plain and grouped-query
@pytest.mark.parametrize("chunks", ["one", "kv heads", "rows"])
@pytest.mark.parametrize("sizes", [(23, 23), (20, 48)])  # 48 keys: the blocked row max
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "key padding", "per-head bool", "additive",
                                  "additive -inf"])
def test_sdpa_matches_mlx(forced, heads, chunks, sizes, mask):
    H, Hk = heads
    B, (L, S) = 2, sizes
    if chunks == "kv heads":  # a few query rows of one kv head (and its query heads) per chunk
        forced.attn_block = 3 * B * (H // Hk) * S
    elif chunks == "rows":
        forced.attn_block = B * (H // Hk) * L * S  # one kv head's scores fit: a few rows of all heads
    q, k, v = _qkv(B, H, Hk, L, S)
    m = _masks(B, H, L, S)[mask]
    ours = fm.sdpa(q, k, v, 0.3, m)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=m)
    assert ours.shape == ref.shape == (B, H, L, 16)
    assert rel_err(ours, ref) <= 5e-6  # MLX's own kernel is 1e-6 off float64 here
    assert rel_err(ours, _sdpa64(q, k, v, 0.3, m)) <= 1.5e-6


def _sdpa64(q, k, v, scale, mask):
    """float64 attention with MLX's mask semantics (boolean: masked scores -> a huge negative)."""
    q, k, v = (np.array(a).astype(np.float64) for a in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = q @ k.swapaxes(-1, -2) * scale
    L, S = s.shape[-2:]
    if isinstance(mask, str):
        mask = mx.array(np.arange(S)[None] <= np.arange(L)[:, None] + S - L)
    if mask is not None:
        m = np.array(mask)
        s = np.where(m, s, -1e300) if m.dtype == bool else s + m
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)) @ v


def test_sdpa_causal_with_cache_offset_and_compile(forced):
    """Prefill after a cached prefix: 9 new queries against 40 keys (bottom-right causal)."""
    forced.attn_block = 2 * 2 * 6 * 40
    q, k, v = _qkv(2, 6, 3, 9, 40, seed=5)
    ref = _sdpa64(q, k, v, 0.25, "causal")
    assert rel_err(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal"), ref) <= 1.5e-6
    assert rel_err(fm.sdpa(q, k, v, 0.25, "causal"), ref) <= 1.5e-6
    compiled = mx.compile(lambda q, k, v: fm.sdpa(q, k, v, 0.25, "causal"))
    assert rel_err(compiled(q, k, v), ref) <= 1.5e-6
    one = q[:, :, :1]  # a decode step: MLX's kernel itself
    assert mx.array_equal(fm.sdpa(one, k, v, 0.25, None),
                          mx.fast.scaled_dot_product_attention(one, k, v, scale=0.25))


def test_sdpa_fully_masked_rows_as_mlx(forced):
    q, k, v = _qkv(1, 2, 2, 6, 7, seed=9)
    rows = np.ones((6, 7), bool)
    rows[2] = False  # boolean: MLX averages the values
    ours = np.array(fm.sdpa(q, k, v, 0.5, mx.array(rows)))
    ref = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, mask=mx.array(rows)))
    assert np.abs(ours - ref).max() <= 2e-6 * np.abs(ref).max()
    add = np.zeros((6, 7), np.float32)
    add[4] = -np.inf  # additive -inf everywhere: NaN in both
    ours = np.array(fm.sdpa(q, k, v, 0.5, mx.array(add)))
    ref = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, mask=mx.array(add)))
    assert np.isnan(ours[:, :, 4]).all() and np.isnan(ref[:, :, 4]).all()
    assert np.abs(np.delete(ours, 4, 2) - np.delete(ref, 4, 2)).max() <= 2e-6


# ---------------------------------------------- transformers parity with the fast path forced on


def test_decoder_parity_fast_path(forced, tmp_path):
    """Qwen2 (GQA, QKV bias) with sliding-window layers (boolean masks) and 3-row attention
    chunks: logits, cached decode and 24 greedy tokens against transformers."""
    from tests.helpers import check_text_parity
    from tests.models.test_qwen2 import BASE, build

    forced.attn_block = 3 * 2 * 4 * 20
    hf = build(use_sliding_window=True, sliding_window=6, max_window_layers=1, num_hidden_layers=3)
    check_text_parity(hf, tmp_path, BASE["vocab_size"], seq=20)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_tower_parity_fast_path(forced, family):
    """quick-GELU + erf-GELU merger (Qwen2-VL), SwiGLU + padded windows (Qwen2.5-VL), tanh-GELU
    + DeepStack erf-GELU mergers (Qwen3-VL): against transformers, eager and compiled."""
    from tests.vision.test_towers import GRID as G, _hf_config, _hf_model, _ours
    from tests.helpers import torch_setup

    torch = torch_setup()
    cfg = _hf_config(family)
    hf = _hf_model(family, cfg)
    pixels = np.random.default_rng(0).standard_normal((int(G.prod(axis=1).sum()), 3 * 2 * cfg.patch_size**2))
    pixels = pixels.astype(np.float32)
    with torch.no_grad():
        out = hf(torch.tensor(pixels), grid_thw=torch.tensor(G))
    ref = out.pooler_output.numpy()
    model = _ours(family, cfg, {k: v.detach().numpy() for k, v in hf.state_dict().items()})
    forced.attn_block = 4096
    ours = model(mx.array(pixels), G)
    assert rel_err(ours.embeds, ref) <= REL_TOL
    for a, b in zip(ours.deepstack, getattr(out, "deepstack_features", None) or []):
        assert rel_err(a, b.numpy()) <= REL_TOL
    compiled = mx.compile(lambda pv: model(pv, G).embeds)
    assert rel_err(compiled(mx.array(pixels)), ref) <= REL_TOL
