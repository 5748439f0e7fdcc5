"""Parity of qwen3 (dense) with transformers: QK-norm, no bias, head_dim != hidden/heads."""

import pytest

from tests.helpers import check_text_parity, torch_setup

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            max_position_embeddings=256, rms_norm_eps=1e-6)


def build(**kw):
    torch_setup()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**{**BASE, **kw}))


@pytest.mark.parametrize("tied", [False, True])
def test_qwen3_parity(tmp_path, tied):
    model, _ = check_text_parity(build(tie_word_embeddings=tied), tmp_path, BASE["vocab_size"])
    assert model.args.head_dim == 24 and model.args.qk_norm


def test_qwen3_attention_bias(tmp_path):
    check_text_parity(build(attention_bias=True), tmp_path, BASE["vocab_size"])
