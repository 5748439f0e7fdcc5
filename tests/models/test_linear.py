"""Backend-aware projections (models/linear.py): every fast path equals the plain MLX product."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from qwen_mlx.models import linear as L
from qwen_mlx.models.decoder import Experts
from tests.helpers import rel_err

needs_cpu = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU-backend kernels")


@pytest.fixture
def speed():
    saved = L.SpeedOptions(**vars(L.SPEED))
    yield L.SPEED
    for k, v in vars(saved).items():
        setattr(L.SPEED, k, v)


def _w(out, inp, seed=0):
    return mx.random.normal((out, inp), key=mx.random.key(seed)) * 0.05


@needs_cpu
def test_gemv_matches_matmul_and_is_used(monkeypatch):
    if L._sgemv() is None:
        pytest.skip("no cblas_sgemv in the process (run with the OpenBLAS preload, as `make test` does)")
    w, x = _w(300, 96), mx.random.normal((1, 1, 96), key=mx.random.key(1))
    calls = []
    real = L._blas_gemv
    monkeypatch.setattr(L, "_blas_gemv", lambda *a: calls.append(1) or real(*a))
    y = L.project(x, w, mx.ones((300,)))
    assert calls and y.shape == (1, 1, 300)
    assert rel_err(y, x @ w.T + 1) < 1e-6
    w_t = mx.array(w.T).T  # a transposed view is not row-major: falls back to the matmul
    assert rel_err(L.project(x, w_t), x @ w.T) < 1e-6


@needs_cpu
def test_gemv_derivatives_and_transforms():
    w, x = _w(40, 24), mx.random.normal((1, 1, 24), key=mx.random.key(2))
    ref = lambda x, w: ((x @ w.T) ** 2).sum()
    ours = lambda x, w: (L.project(x, w) ** 2).sum()
    for a, b in zip(mx.grad(ours, argnums=(0, 1))(x, w), mx.grad(ref, argnums=(0, 1))(x, w)):
        assert rel_err(a, b) < 1e-5
    _, jv = mx.jvp(lambda x: L.project(x, w), [x], [mx.ones_like(x)])
    assert rel_err(jv[0], mx.ones_like(x) @ w.T) < 1e-6
    assert rel_err(mx.compile(L.project)(x, w), x @ w.T) < 1e-6  # traced: plain matmul
    xs = mx.random.normal((3, 1, 24), key=mx.random.key(3))
    assert rel_err(mx.vmap(lambda v: L.project(v, w))(xs), xs @ w.T) < 1e-6


@needs_cpu
@pytest.mark.parametrize("rows", [1, 2, 9])
@pytest.mark.parametrize("scale_dtype", [mx.float32, mx.bfloat16])
def test_quantized_paths(speed, rows, scale_dtype):
    """Single rows (f32 scales, split over streams), few rows, and many rows (dequantized
    to float32 once) all equal MLX's quantized_matmul on the same packed weights."""
    speed.dequant_rows = 8
    q = L.Linear(128, 512, bias=True).to_quantized(group_size=64, bits=4)
    q.scales, q.biases = q.scales.astype(scale_dtype), q.biases.astype(scale_dtype)
    assert isinstance(q, L.QuantizedLinear)
    x = mx.random.normal((1, rows, 128), key=mx.random.key(4))
    ref = mx.quantized_matmul(x, q.weight, q.scales.astype(mx.float32), q.biases.astype(mx.float32),
                              group_size=64, bits=4) + q.bias
    assert rel_err(q(x), ref) < 1e-5


@needs_cpu
def test_half_precision_paths(speed):
    speed.upcast_rows = 4
    lin = L.Linear(64, 600, bias=False)
    lin.set_dtype(mx.bfloat16)
    for rows in (1, 6):
        x = mx.random.normal((1, rows, 64), key=mx.random.key(5)).astype(mx.bfloat16)
        ref = x.astype(mx.float32) @ lin.weight.astype(mx.float32).T
        y = lin(x)
        assert y.dtype == mx.bfloat16 and rel_err(y.astype(mx.float32), ref) < 1e-2


@needs_cpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "q4"])
def test_experts_by_expert_matches_gathered(speed, kind, fused):
    """The CPU path (tokens grouped by expert, one product per used expert: sgemv rows,
    dequantized / cast blocks, quantized rows) against mlx-lm's gathered matmul on the
    same weights in float32."""
    from mlx_lm.models.switch_layers import SwitchGLU

    from qwen_mlx.models.fuse import fuse_projections

    speed.dequant_rows = 3  # some experts get >= 3 rows (dequantized), others fewer (quantized_matmul)
    holder = nn.Module()
    holder.ex = Experts(64, 96, 6)
    if kind == "bfloat16":
        holder.set_dtype(mx.bfloat16)
    if kind == "q4":
        nn.quantize(holder, group_size=32, bits=4)
    ref = SwitchGLU(64, 96, 6)
    for name in ("gate_proj", "up_proj", "down_proj"):
        m = holder.ex[name]
        dense = L.dequantized(m) if kind == "q4" else m.weight.astype(mx.float32)
        ref[name].weight = dense
    if fused:
        fuse_projections(holder)
        assert "gate_up_proj" in holder.ex
    dt = mx.bfloat16 if kind == "bfloat16" else mx.float32
    tol = 1e-2 if kind == "bfloat16" else 1e-5
    rng = np.random.default_rng(0)
    for n in (1, 7):
        x = mx.random.normal((1, n, 64), key=mx.random.key(6)).astype(dt)
        idx = mx.array(rng.integers(0, 6, size=(1, n, 2)), dtype=mx.uint32)
        y = holder.ex(x, idx)
        assert y.shape == (1, n, 2, 64)
        assert rel_err(y.astype(mx.float32), ref(x.astype(mx.float32), idx)) < tol, n


def test_linear_is_a_drop_in_nn_linear():
    lin = L.Linear(8, 4)
    assert isinstance(lin, nn.Linear) and sorted(lin.parameters()) == ["bias", "weight"]
    x = mx.random.normal((2, 3, 8))
    np.testing.assert_allclose(np.array(lin(x)), np.array(x @ lin.weight.T + lin.bias), atol=1e-6)


@pytest.mark.parametrize("bits,group", [(2, 32), (4, 64), (8, 128), (3, 64), (6, 32)])
@pytest.mark.parametrize("scale_dtype", [mx.float32, mx.bfloat16])
def test_dequantize_equals_mlx(bits, group, scale_dtype):
    """The CPU unpacking (2/4/8 bits; others fall back) gives MLX's values exactly, for a
    matrix and for stacked experts."""
    for shape in ((96, 256), (3, 40, 128)):
        w = mx.random.normal(shape, key=mx.random.key(bits))
        q, s, b = mx.quantize(w, group_size=group, bits=bits)
        s, b = s.astype(scale_dtype), b.astype(scale_dtype)
        for dt in (mx.float32, mx.bfloat16):
            ref = mx.dequantize(q, s, b, group_size=group, bits=bits, dtype=dt)
            got = L.dequantize(q, s, b, group, bits, dtype=dt)
            assert got.dtype == dt and got.shape == shape
            assert mx.array_equal(got, ref).item(), (shape, dt)
    q, s = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")  # no biases: MLX's kernel
    assert mx.array_equal(L.dequantize(q, s, None, 32, 4, mode="mxfp4"),
                          mx.dequantize(q, s, None, 32, 4, mode="mxfp4")).item()
