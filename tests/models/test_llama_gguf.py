"""The real SmolLM2-135M-Instruct Q4_1 GGUF (the embedded default): logits match
transformers' GGUF loader, greedy tokens are identical, and it knows Paris."""

import mlx.core as mx
import numpy as np

from tests.helpers import REL_TOL, hf_greedy, hf_logits, mlx_greedy, rel_err


def test_logits_and_greedy_match_transformers(smollm2, hf_smollm2):
    tok = smollm2.tokenizer
    a = tok.encode(smollm2.render([{"role": "user", "content": "What is the capital of France?"}]))
    b = tok.encode("Once upon a time, in a small village by the sea, there lived")
    n = min(len(a), len(b))
    ids = np.array([a[:n], b[:n]])
    err = rel_err(np.array(smollm2.model(mx.array(ids))), hf_logits(hf_smollm2, ids))
    assert err <= REL_TOL, f"logits rel err {err:.2e}"
    assert mlx_greedy(smollm2.model, np.array([a]), 24) == hf_greedy(hf_smollm2, np.array([a]), 24)


def test_default_model_answers_paris(smollm2):
    answer = smollm2.generate("What is the capital of France?", temperature=0.0, max_tokens=24)
    assert "Paris" in answer


def test_quantized_path_close_to_dequantized(smollm2_path, smollm2):
    """Keeping Q4_1 blocks quantized (the Metal/CUDA default) gives the same model up to
    float16 scale rounding."""
    from qwen_mlx import load_model

    q = load_model(smollm2_path, dequantize=False, dtype=mx.float32)
    assert "scales" in q.layers[0].self_attn.qkv_proj  # q/k/v fused at load (models/fuse.py)
    ids = mx.array([smollm2.tokenizer.encode("The capital of France is")])
    err = rel_err(np.array(q(ids)), np.array(smollm2.model(ids)))
    assert err < 1e-3, err
