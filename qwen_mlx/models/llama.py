"""Llama topology (the decoder Qwen2 extends): what GGUF llama files such as SmolLM2 hold."""

from .decoder import CausalLM as Model, DecoderArgs

CAPABILITIES = frozenset({"text"})


class ModelArgs(DecoderArgs):
    @classmethod
    def from_config(cls, cfg, **flags):
        bias = bool(cfg.get("attention_bias", False))
        return DecoderArgs.from_config(cfg, qkv_bias=bias, o_bias=bias,
                                       mlp_bias=bool(cfg.get("mlp_bias", False)), **flags)
