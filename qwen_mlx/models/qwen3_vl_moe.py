"""Qwen3-VL-MoE (30B-A3B, 235B-A22B): Qwen3-VL on the Qwen3-MoE decoder. The router always
renormalises its top-k; experts come fused (``experts.gate_up_proj``, ``experts.down_proj``),
split here into mlx-lm's SwitchGLU projections."""

from dataclasses import replace

from ..loading.remap import Fused
from . import qwen3_vl, vl
from .qwen3_moe import ModelArgs as TextArgs

CAPABILITIES = frozenset({"text", "vision", "video", "thinking", "moe"})
REMAP = replace(vl.REMAP, fused=(
    Fused(r"^(model\.layers\.\d+\.mlp)\.experts\.gate_up_proj$",
          (r"\1.switch_mlp.gate_proj.weight", r"\1.switch_mlp.up_proj.weight"), in_key="hidden_size"),
    Fused(r"^(model\.layers\.\d+\.mlp)\.experts\.down_proj$",
          (r"\1.switch_mlp.down_proj.weight",), in_key="moe_intermediate_size"),
))


class ModelArgs(qwen3_vl.ModelArgs):
    @classmethod
    def from_config(cls, cfg):
        return qwen3_vl.ModelArgs.from_config(cfg, TextArgs, norm_topk_prob=True)


class Model(qwen3_vl.Model):
    capabilities = CAPABILITIES
