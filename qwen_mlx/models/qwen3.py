"""Qwen3 dense: QK-norm, no biases by default, head_dim independent of hidden size."""

from .decoder import CausalLM as Model, DecoderArgs
from .qwen2 import qwen2_layer_types

CAPABILITIES = frozenset({"text", "thinking"})


class ModelArgs(DecoderArgs):
    @classmethod
    def from_config(cls, cfg, **flags):
        bias = bool(cfg.get("attention_bias", False))
        types = qwen2_layer_types(cfg)
        window = cfg.get("sliding_window") if "sliding_attention" in types else None
        return DecoderArgs.from_config(cfg, qkv_bias=bias, o_bias=bias, qk_norm=True,
                                       layer_types=types, sliding_window=window, **flags)
