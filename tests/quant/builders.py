"""Tiny perturbed HF checkpoints of every text family, with a tiny word-level tokenizer
(so mlx-lm's `load`, which always loads a tokenizer, can read them too)."""

import json
from pathlib import Path

from tests.helpers import perturb, save_hf, torch_setup

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=32)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(MOE, shared_expert_intermediate_size=64)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(MOE, head_dim=32)),
}

VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")  # text vocab 300


def write_tokenizer(path: Path, vocab: int = VOCAB) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "eos_token": "w1"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))


def hf_dir(family: str, path: Path, **kw) -> Path:
    """A perturbed float32 HF checkpoint of ``family`` (a text family, or a VL one from
    tests/models/vl_configs.py) at ``path``, with a tokenizer."""
    torch_setup()
    import transformers

    if family in VL_FAMILIES:
        from tests.models.vl_configs import hf_model

        model = perturb(hf_model(family))
    else:
        cfg_cls, model_cls, extra = FAMILIES[family]
        cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **kw})
        model = perturb(getattr(transformers, model_cls)(cfg).float().eval())
    save_hf(model, path)
    write_tokenizer(path)
    return path
