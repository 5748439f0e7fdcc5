"""Qwen1.5-MoE / Qwen2-MoE: Qwen2 attention, sparse MoE with a sigmoid-gated shared expert."""

from .decoder import CausalLM as Model
from .qwen2 import ModelArgs as Qwen2Args
from ..config import require

CAPABILITIES = frozenset({"text", "moe"})


class ModelArgs(Qwen2Args):
    @classmethod
    def from_config(cls, cfg, **flags):
        require(cfg, "num_experts", "num_experts_per_tok", "moe_intermediate_size")
        return Qwen2Args.from_config(cfg, **flags)
