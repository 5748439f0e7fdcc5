"""Qwen2-VL: the Qwen2 decoder (QKV bias) with chunked M-RoPE [16, 24, 24], and the
LayerNorm / quick-GELU ViT tower."""

from ..vision import tower_qwen2_vl
from .qwen2 import ModelArgs as TextArgs
from .vl import REMAP, VLArgs, VLModel  # noqa: F401

CAPABILITIES = frozenset({"text", "vision", "video"})


class ModelArgs(VLArgs):
    @classmethod
    def from_config(cls, cfg):
        return VLArgs.build(cfg, TextArgs, [16, 24, 24], mrope_interleaved=False)


class Model(VLModel):
    tower = tower_qwen2_vl
    capabilities = CAPABILITIES
