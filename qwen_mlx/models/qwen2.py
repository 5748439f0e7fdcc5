"""Qwen1.5 / Qwen2 / Qwen2.5 (+ Coder, Math, QwQ): biases on q/k/v, optional sliding-window layers."""

from .decoder import CausalLM as Model, DecoderArgs

CAPABILITIES = frozenset({"text"})


def qwen2_layer_types(cfg: dict) -> list:
    """HF rule: with ``use_sliding_window`` layers from ``max_window_layers`` on slide."""
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    n = cfg["num_hidden_layers"]
    if not (cfg.get("use_sliding_window") and cfg.get("sliding_window")):
        return ["full_attention"] * n
    start = cfg.get("max_window_layers", n)
    return ["sliding_attention" if i >= start else "full_attention" for i in range(n)]


class ModelArgs(DecoderArgs):
    @classmethod
    def from_config(cls, cfg, **flags):
        types = qwen2_layer_types(cfg)
        window = cfg.get("sliding_window") if "sliding_attention" in types else None
        return DecoderArgs.from_config(
            cfg, qkv_bias=True, layer_types=types, sliding_window=window, **flags)


__all__ = ["Model", "ModelArgs", "CAPABILITIES"]
