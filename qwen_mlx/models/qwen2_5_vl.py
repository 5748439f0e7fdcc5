"""Qwen2.5-VL: Qwen2-VL whose video positions follow absolute time
(``tokens_per_second`` x ``second_per_grid_ts``), and the windowed RMSNorm / SwiGLU tower."""

from ..vision import tower_qwen2_5_vl
from .qwen2 import ModelArgs as TextArgs
from .qwen2_vl import CAPABILITIES
from .vl import REMAP, VLArgs, VLModel  # noqa: F401


class ModelArgs(VLArgs):
    @classmethod
    def from_config(cls, cfg):
        v = cfg.get("vision_config") or {}
        tps = v.get("tokens_per_second", cfg.get("tokens_per_second", 4))  # 4.x hub: in vision_config
        return VLArgs.build(cfg, TextArgs, [16, 24, 24], mrope_interleaved=False, tokens_per_second=float(tps))


class Model(VLModel):
    tower = tower_qwen2_5_vl
    capabilities = CAPABILITIES
