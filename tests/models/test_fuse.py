"""Load-time fusion (models/fuse.py): fused == unfused logits for float and quantized
weights, incompatible groups left alone, no extra resident copy, HF names recoverable."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen_mlx.loading.loader import Checkpoint, build_model, load_model, model_from_checkpoint
from qwen_mlx.models.fuse import fuse_projections, unfused_parameters
from tests.helpers import perturb, rel_err, save_hf, torch_setup

QWEN2 = dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
                 num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                 tie_word_embeddings=True, mlp_only_layers=[1])
IDS = mx.array(np.random.default_rng(0).integers(0, 300, size=(2, 9)))


def random_checkpoint(cfg, bits=0, seed=0):
    """Perturbed random weights under HF names (quantized triplets with ``bits``)."""
    model = build_model(cfg)
    mx.random.seed(seed)
    model.update(tree_map_random(model))
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
        cfg = {**cfg, "quantization": {"group_size": 32, "bits": bits}}
    mx.eval(model.parameters())
    return Checkpoint(cfg, dict(tree_flatten(model.parameters())), "test")


def tree_map_random(model):
    from mlx.utils import tree_map

    return tree_map(lambda p: mx.random.normal(p.shape) * (0.1 if p.ndim > 1 else 0.3) + (p.ndim == 1), model.parameters())


@pytest.mark.parametrize("cfg", [QWEN2, QWEN3_MOE], ids=["qwen2-bias", "qwen3-moe-qknorm"])
@pytest.mark.parametrize("bits", [0, 4])
def test_fused_equals_unfused(cfg, bits):
    ck = random_checkpoint(cfg, bits)
    plain = model_from_checkpoint(ck, dtype=mx.float32, dequantize=False, fuse=False)
    fused = model_from_checkpoint(ck, dtype=mx.float32, dequantize=False)
    attn = fused.layers[0].self_attn
    assert "qkv_proj" in attn and "q_proj" not in attn and "q_proj" in plain.layers[0].self_attn
    if bits:  # q/k/v rows stacked, packed along the input: (H*hd + 2*KV*hd, in * bits / 32)
        hd = cfg.get("head_dim", 16)
        assert "scales" in attn.qkv_proj and attn.qkv_proj.weight.shape == ((4 + 2 * 2) * hd, 64 * 4 // 32)
    mlp = fused.layers[1].mlp
    assert "gate_up_proj" in mlp and "gate_proj" not in mlp
    if cfg is QWEN3_MOE:
        assert fused.layers[0].mlp.switch_mlp.gate_up_proj["weight"].shape[:2] == (4, 2 * 64)
    a, b = plain(IDS), fused(IDS)
    assert rel_err(b, a) < 1e-5
    cache_a, cache_b = plain.make_cache(), fused.make_cache()
    plain(IDS[:1, :5], cache=cache_a), fused(IDS[:1, :5], cache=cache_b)
    for t in range(5, 9):  # single-token decode takes the backend's one-row kernels
        assert rel_err(fused(IDS[:1, t:t + 1], cache=cache_b), plain(IDS[:1, t:t + 1], cache=cache_a)) < 1e-5


def test_mismatched_quantization_is_not_fused():
    ck = random_checkpoint(QWEN2, bits=4)
    w = dict(ck.weights)
    base = "model.layers.0.self_attn.q_proj"
    dense = mx.dequantize(w[f"{base}.weight"], w[f"{base}.scales"], w[f"{base}.biases"], 32, 4)
    w[f"{base}.weight"], w[f"{base}.scales"], w[f"{base}.biases"] = mx.quantize(dense, 32, 8)
    cfg = {**ck.config, "quantization": {"group_size": 32, "bits": 4, base: {"group_size": 32, "bits": 8}}}
    model = model_from_checkpoint(Checkpoint(cfg, dict(w), "test"), dtype=mx.float32, dequantize=False)
    attn0, attn1 = model.layers[0].self_attn, model.layers[1].self_attn
    assert "q_proj" in attn0 and attn0.q_proj.bits == 8 and "qkv_proj" not in attn0  # left alone
    assert "qkv_proj" in attn1 and "gate_up_proj" in model.layers[0].mlp
    ref = model_from_checkpoint(Checkpoint(cfg, dict(w), "test"), dtype=mx.float32, dequantize=False, fuse=False)
    assert rel_err(model(IDS), ref(IDS)) < 1e-5


def test_unfused_parameters_round_trip_and_mlx_lm():
    """Splitting the fused tensors gives back the HF tensors exactly; mlx-lm's own model
    class loads them (strict) and computes the same logits."""
    from mlx_lm.models import qwen2

    ck = random_checkpoint(QWEN2)
    hf = dict(ck.weights)  # loading releases the tensors fusion supersedes from ck.weights
    model = model_from_checkpoint(ck, dtype=mx.float32)
    flat = unfused_parameters(model)
    assert sorted(flat) == sorted(hf)
    for k, v in flat.items():
        assert v.shape == hf[k].shape and mx.array_equal(v, hf[k]), k
    theirs = qwen2.Model(qwen2.ModelArgs.from_dict({**QWEN2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}))
    theirs.load_weights(list(flat.items()), strict=True)
    assert rel_err(model(IDS), theirs(IDS)) < 1e-5


@pytest.mark.parametrize("lazy", [False, True])
def test_fusion_keeps_one_copy(tmp_path, lazy):
    """While the checkpoint is still alive, the loaded (fused) model holds one copy of the
    weights: the unfused arrays were released, not kept next to the fused ones."""
    torch_setup()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qwen_mlx.loading.loader import load_checkpoint

    hf = perturb(Qwen3ForCausalLM(Qwen3Config(vocab_size=300, hidden_size=256, intermediate_size=512,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=64, tie_word_embeddings=True)))
    path = save_hf(hf, tmp_path / "ckpt")
    mx.clear_cache()
    before = mx.get_active_memory()
    ck = load_checkpoint(path)
    model = model_from_checkpoint(ck, dtype=mx.float32, lazy=lazy)
    mx.eval(model.parameters())
    held = mx.get_active_memory() - before
    params = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert "qkv_proj" in model.layers[0].self_attn
    assert "model.layers.0.self_attn.q_proj.weight" not in ck.weights  # released to the fused tensor
    assert params <= held <= params * 1.05, (held, params)
    assert rel_err(model(IDS[:, :4] % 300), np.array(load_model(path, dtype=mx.float32, fuse=False)(IDS[:, :4] % 300))) < 1e-5


def test_fuse_is_idempotent_and_counts():
    model = build_model(QWEN3_MOE)
    assert fuse_projections(model) == 4  # attention x2, experts (layer 0), dense MLP (layer 1)
    assert fuse_projections(model) == 0


@pytest.mark.parametrize("bits", [0, 4])
def test_gpu_code_path_fused_equals_unfused(monkeypatch, bits):
    """The Metal / CUDA code path (gathered experts over the fused gate_up, plain and
    quantized matmuls), exercised on the CPU backend by pretending it is not the CPU."""
    from qwen_mlx.models import decoder, linear

    ck = random_checkpoint(QWEN3_MOE, bits)
    plain = model_from_checkpoint(ck, dtype=mx.float32, dequantize=False, fuse=False)
    fused = model_from_checkpoint(ck, dtype=mx.float32, dequantize=False)
    cpu = np.array(fused(IDS))
    monkeypatch.setattr(linear, "on_cpu", lambda: False)
    monkeypatch.setattr(decoder, "on_cpu", lambda: False)
    gpu_path = np.array(fused(IDS))
    assert rel_err(gpu_path, np.array(plain(IDS))) < 1e-5
    assert rel_err(gpu_path, cpu) < 1e-5


@pytest.mark.parametrize("cfg,bits,dtype", [(QWEN3_MOE, 4, mx.float32), (QWEN2, 0, mx.bfloat16)],
                         ids=["moe-q4", "qwen2-bf16"])
def test_benchmark_served_model_is_what_the_loader_binds(cfg, bits, dtype):
    """benchmarks/run.py builds its "as loaded" model from the fused quantized / half model
    directly (no per-projection temporaries): the same arrays as `model_from_checkpoint`."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).parents[2] / "benchmarks" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ck = random_checkpoint(cfg, bits)
    ours = model_from_checkpoint(ck, dtype=dtype, dequantize=False)
    ref = dict(tree_flatten(model_from_checkpoint(Checkpoint(ck.config, unfused_parameters(ours), "t")).parameters()))
    got = dict(tree_flatten(bench.served(ours, {k: v for k, v in cfg.items()}, bits).parameters()))
    assert sorted(got) == sorted(ref) and "model.layers.0.self_attn.qkv_proj.weight" in got
    for k, v in ref.items():
        assert v.dtype == got[k].dtype == mx.float32 and mx.array_equal(v, got[k]).item(), k
