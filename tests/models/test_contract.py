"""The shared contract every registered architecture meets (a new family gets it for free):
logits shape and dtype, batch rows independent, cached decode == full forward,
float16/bfloat16 forward finite, quantized and rotating KV caches usable."""

import mlx.core as mx
import numpy as np
import pytest

from qwen_mlx.loading.loader import build_model
from qwen_mlx.registry import model_types

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
# VL families: the 4.x flat layout (text keys at the top level) plus a tiny vision tower
VISION2 = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
VISION25 = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                window_size=56, fullatt_block_indexes=[0])
VISION3 = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
               num_position_embeddings=16, deepstack_visual_indexes=[0])
VL2 = dict(rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
VL3 = dict(head_dim=32, rope_scaling={"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True})
# what each family needs beyond BASE; a registered type missing here fails the test below
EXTRA = {"llama": {}, "qwen2": {}, "qwen3": {"head_dim": 32},
         "qwen2_moe": {**MOE, "shared_expert_intermediate_size": 40}, "qwen3_moe": {**MOE, "head_dim": 32},
         "qwen2_vl": {**VL2, "vision_config": VISION2},
         "qwen2_5_vl": {**VL2, "vision_config": VISION25},
         "qwen3_vl": {**VL3, "vision_config": VISION3},
         "qwen3_vl_moe": {**VL3, **MOE, "vision_config": VISION3}}


def tiny(model_type):
    mx.random.seed(0)
    model = build_model({"model_type": model_type, **BASE, **EXTRA[model_type]})
    model.set_dtype(mx.float32)
    return model


def test_every_registered_type_has_a_contract_config():
    assert sorted(EXTRA) == model_types()


@pytest.mark.parametrize("model_type", model_types())
def test_forward_shapes_batch_and_cache(model_type):
    model = tiny(model_type)
    ids = mx.array(np.random.default_rng(0).integers(0, 128, size=(2, 9)))
    full = model(ids)
    assert full.shape == (2, 9, 128) and full.dtype == mx.float32
    single = model(ids[1:])
    assert np.allclose(np.array(full[1]), np.array(single[0]), atol=1e-5), "batch rows interact"
    for kind in ({}, {"kv_bits": 8}, {"max_kv_size": 64}):
        cache = model.make_cache(**kind)
        parts = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 9)]
        step = np.array(mx.concatenate(parts, axis=1))
        tol = 5e-2 if kind.get("kv_bits") else 1e-4
        err = np.abs(step - np.array(full)).max() / np.abs(np.array(full)).max()
        assert err < tol, f"{kind or 'plain'} cache decode differs: {err:.2e}"
        assert cache[0].offset == 9


@pytest.mark.parametrize("model_type", model_types())
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_forward_finite(model_type, dtype):
    model = tiny(model_type)
    model.set_dtype(dtype)
    y = model(mx.array([[1, 2, 3, 4]]))
    assert y.dtype == dtype and bool(mx.isfinite(y).all())


@pytest.mark.parametrize("model_type", model_types())
def test_capabilities_declared(model_type):
    from qwen_mlx.registry import get_family

    caps = get_family(model_type).CAPABILITIES
    assert "text" in caps and ("moe" in caps) == ("num_experts" in EXTRA[model_type])
