"""Qwen3-VL: the Qwen3 decoder (QK-norm) with interleaved M-RoPE [24, 20, 20], videos as
one run per frame (timestamps are text), DeepStack features added after the first layers."""

from ..vision import tower_qwen3_vl
from .qwen3 import ModelArgs as TextArgs
from .vl import REMAP, VLArgs, VLModel  # noqa: F401

CAPABILITIES = frozenset({"text", "vision", "video", "thinking"})


class ModelArgs(VLArgs):
    @classmethod
    def from_config(cls, cfg, text_args=TextArgs, **text_flags):
        return VLArgs.build(cfg, text_args, [24, 20, 20], mrope_interleaved=True, text_flags=text_flags,
                            video_frames_split=True)


class Model(VLModel):
    tower = tower_qwen3_vl
    capabilities = CAPABILITIES
