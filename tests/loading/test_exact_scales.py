"""Quantization scales / biases a half-precision model cannot hold exactly stay as stored
(GGUF Q4_K's float32 products of an fp16 ``d`` and a 6-bit scale, Q4_0 / Q4_1 / Q8_0's
float16), on the Metal / CUDA code path (weights kept packed), exercised here on the CPU
backend by pretending it is not the CPU. MLX's quantized kernels take float32 scales beside
bfloat16 activations (computing and returning float32); projections, experts and embedding
lookups cast back, so the model still runs in its dtype."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from qwen_mlx.loading.loader import Checkpoint, load_checkpoint, model_from_checkpoint  # noqa: E402
from tests.loading.test_gguf_synthetic import V, write_gguf  # noqa: E402

IDS = mx.array(np.random.default_rng(0).integers(0, V, size=(2, 12)))
MOE_TYPES = {f"blk.{i}.ffn_{p}_exps.weight": (T.Q8_0 if i == 0 else T.Q4_0)
             for i in (0, 1) for p in ("gate", "up", "down")}


@pytest.fixture
def gpu_path(monkeypatch):
    from qwen_mlx.models import decoder, linear

    monkeypatch.setattr(linear, "on_cpu", lambda: False)
    monkeypatch.setattr(decoder, "on_cpu", lambda: False)


def rel(a, ref):
    return (mx.abs(a.astype(mx.float32) - ref).max() / mx.abs(ref).max()).item()


@pytest.mark.parametrize("xdtype", [mx.bfloat16, mx.float16])
def test_mlx_takes_float32_scales_with_half_activations(xdtype):
    """What the design rests on: quantized_matmul / gather_qmm / dequantize accept float32
    scales and biases with half inputs and return float32, computed as with float32 inputs."""
    qw, s, b = mx.quantize(mx.random.normal((64, 128)), group_size=32, bits=4)
    x = mx.random.normal((3, 128)).astype(xdtype)
    y = mx.quantized_matmul(x, qw, s, b, transpose=True, group_size=32, bits=4)
    assert y.dtype == mx.float32
    assert mx.array_equal(y, mx.quantized_matmul(x.astype(mx.float32), qw, s, b, group_size=32, bits=4)).item()
    g = mx.gather_qmm(x[:, None], qw[None], s[None], b[None], rhs_indices=mx.zeros((3,), mx.uint32),
                      transpose=True, group_size=32, bits=4)
    assert g.dtype == mx.float32 and mx.allclose(g.reshape(3, 64), y, rtol=1e-6, atol=1e-6).item()


def test_gguf_k_quant_scales_stay_exact(tmp_path, gpu_path):
    path = tmp_path / "llama.gguf"
    exp = write_gguf(path, "llama")  # Q4_K ffn_down (layer 1), Q8_0 embeddings, Q4_0 / Q4_1, Q6_K, BF16
    ref = model_from_checkpoint(load_checkpoint(path), dtype=mx.float32, dequantize=True, fuse=False)(IDS)
    m = model_from_checkpoint(load_checkpoint(path), dtype=mx.bfloat16, dequantize=False)
    down = m.layers[1].mlp.down_proj  # Q4_K: float32 scales and biases, kept
    assert down.scales.dtype == down.biases.dtype == mx.float32
    w = mx.dequantize(down.weight, down.scales, down.biases, group_size=32, bits=4)
    assert np.array_equal(np.array(w), exp["model.layers.1.mlp.down_proj.weight"])  # the file's exact weights
    assert not mx.array_equal(down.scales.astype(mx.bfloat16).astype(mx.float32), down.scales).item()
    emb = m.model.embed_tokens  # Q8_0: float16 scales, kept (bfloat16 has 3 bits fewer); rows come out bf16
    assert emb.scales.dtype == mx.float16 and emb(IDS).dtype == mx.bfloat16
    assert m.layers[0].self_attn.o_proj.weight.dtype == mx.bfloat16  # float weights: the model dtype
    cache = m.make_cache()
    out = m(IDS, cache=cache)
    assert out.dtype == mx.bfloat16 and cache[0].keys.dtype == mx.bfloat16  # the model runs in bfloat16
    # the scales cast to bfloat16 (what the loader did before) move the logits 4x further
    ck = load_checkpoint(path)
    ck.weights.read_all()
    cast = {k: v.astype(mx.bfloat16) if k.endswith((".scales", ".biases")) else v for k, v in ck.weights.items()}
    before = model_from_checkpoint(Checkpoint(ck.config, cast, "t"), dtype=mx.bfloat16, dequantize=False)(IDS)
    exact, lossy = rel(out, ref), rel(before, ref)
    assert exact < 0.06 and lossy > 2 * exact, (exact, lossy)


def test_moe_experts_with_wider_scales(tmp_path, gpu_path):
    """Gathered quantized experts (mlx-lm's gather_qmm) with float16 scales in a bfloat16
    model: the block's output comes back in bfloat16."""
    path = tmp_path / "moe.gguf"
    write_gguf(path, "qwen3moe", types={"token_embd.weight": T.Q8_0, **MOE_TYPES})
    m = model_from_checkpoint(load_checkpoint(path), dtype=mx.bfloat16, dequantize=False)
    experts = m.layers[1].mlp.switch_mlp
    assert experts.gate_up_proj.scales.dtype == mx.float16 and experts.gate_up_proj.weight.dtype == mx.uint32
    h = mx.random.normal((1, 5, 64)).astype(mx.bfloat16)
    assert m.layers[1].mlp(h).dtype == mx.bfloat16
    ref = model_from_checkpoint(load_checkpoint(path), dtype=mx.float32, dequantize=True)(IDS)
    out = m(IDS)
    assert out.dtype == mx.bfloat16 and rel(out, ref) < 0.06


def test_float32_model_and_cpu_dequantize_unchanged(tmp_path):
    """float16 scales widen into a float32 model as before; the CPU default dequantizes."""
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama")
    m = model_from_checkpoint(load_checkpoint(path), dtype=mx.float32, dequantize=False)
    assert m.model.embed_tokens.scales.dtype == mx.float32
    assert type(m.model.embed_tokens) is nn.QuantizedEmbedding  # MLX's own: no cast needed
    d = model_from_checkpoint(load_checkpoint(path), dtype=mx.float32)
    assert "scales" not in d.model.embed_tokens
    assert rel(m(IDS), d(IDS)) < 1e-5
