"""Qwen3-MoE (30B-A3B, 235B-A22B, Coder-480B): Qwen3 attention, top-k experts, no shared expert."""

from .decoder import CausalLM as Model
from .qwen3 import ModelArgs as Qwen3Args
from ..config import require

CAPABILITIES = frozenset({"text", "thinking", "moe"})


class ModelArgs(Qwen3Args):
    @classmethod
    def from_config(cls, cfg, **flags):
        require(cfg, "num_experts", "num_experts_per_tok", "moe_intermediate_size")
        return Qwen3Args.from_config(cfg, shared_expert_intermediate_size=0, **flags)
