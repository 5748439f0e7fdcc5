"""Parity of qwen2_moe and qwen3_moe with transformers: routing, norm_topk_prob, shared
expert with sigmoid gate, decoder_sparse_step / mlp_only_layers; experts as gathered matmuls."""

import pytest

from tests.helpers import check_text_parity, torch_setup

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=80, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48)


def qwen2_moe(**kw):
    torch_setup()
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = {**COMMON, "shared_expert_intermediate_size": 40, **kw}
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**cfg))


def qwen3_moe(**kw):
    torch_setup()
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**COMMON, "head_dim": 24, **kw}))


@pytest.mark.parametrize("norm", [False, True])
def test_qwen2_moe_parity(tmp_path, norm):
    model, _ = check_text_parity(qwen2_moe(norm_topk_prob=norm), tmp_path, 320)
    assert type(model.layers[0].mlp).__name__ == "SparseMoE"
    assert "shared_expert" in model.layers[0].mlp


def test_qwen2_moe_sparse_step_and_dense_layers(tmp_path):
    model, _ = check_text_parity(
        qwen2_moe(decoder_sparse_step=2, mlp_only_layers=[]), tmp_path, 320)
    kinds = [type(l.mlp).__name__ for l in model.layers]
    assert kinds == ["MLP", "SparseMoE", "MLP"]


@pytest.mark.parametrize("norm", [True, False])
def test_qwen3_moe_parity(tmp_path, norm):
    model, _ = check_text_parity(qwen3_moe(norm_topk_prob=norm, mlp_only_layers=[1]), tmp_path, 320)
    kinds = [type(l.mlp).__name__ for l in model.layers]
    assert kinds == ["SparseMoE", "MLP", "SparseMoE"]
    assert "shared_expert" not in model.layers[0].mlp
    # experts live stacked as (E, out, in), gate and up fused at load: one gathered matmul each
    assert model.layers[0].mlp.switch_mlp.gate_up_proj.weight.shape == (6, 2 * 48, 64)
