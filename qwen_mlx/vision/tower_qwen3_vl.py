"""Qwen3-VL (and Qwen3-VL-MoE) vision tower: learned positions + DeepStack.

A learned ``side x side`` position table (``pos_embed``, side = sqrt(num_position_embeddings))
is resampled bilinearly (align_corners) to each frame's patch grid and added after the patch
embedding; the 2-D rotary runs as in Qwen2-VL. The outputs of the ViT blocks in
``deepstack_visual_indexes`` each go through their own merger (norm after the 2x2 shuffle);
the VL model adds them to the hidden states of its first decoder layers at visual positions.
"""

from dataclasses import dataclass, field
from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError
from ..models import fastmath
from .vit import GridPlan, PatchEmbed, ViTConfig, VisionBlock, VisionTower, activation, layer_norm


@dataclass
class VisionConfig(ViTConfig):
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: List[int] = field(default_factory=lambda: [8, 16, 24])

    @classmethod
    def from_config(cls, cfg: dict, **overrides) -> "VisionConfig":
        kw = ViTConfig.common(cfg)
        kw.update(
            intermediate_size=int(cfg.get("intermediate_size") or 4304),
            out_hidden_size=int(cfg.get("out_hidden_size") or 3584),
            hidden_act=cfg.get("hidden_act") or "gelu_pytorch_tanh",
            num_position_embeddings=int(cfg.get("num_position_embeddings") or 2304),
            deepstack_visual_indexes=[int(i) for i in cfg.get("deepstack_visual_indexes", [8, 16, 24])],
        )
        kw.update(overrides)
        return cls(**kw)

    def __post_init__(self):
        super().__post_init__()
        side = int(round(self.num_position_embeddings**0.5))
        if side * side != self.num_position_embeddings:
            raise ConfigError(f"num_position_embeddings {self.num_position_embeddings} is not a square")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"deepstack_visual_indexes {bad} outside the {self.depth} ViT layers")


def interpolation_taps(grid: np.ndarray, pos: np.ndarray, side: int):
    """Bilinear (align_corners) taps of each patch into the flattened side x side table.

    Patch (r, c) of an h x w frame samples the table at r * (side-1) / (h-1), c * (side-1) / (w-1);
    the four neighbours get weights (1-dr)(1-dc), (1-dr)dc, dr(1-dc), dr dc.
    Returns indices (N, 4) int32 and weights (N, 4) float32."""
    counts = grid.prod(axis=1)
    hw = np.repeat(grid[:, 1:], counts, axis=0)

    def axis(i, size):
        src = i.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
        lo = np.floor(src)
        taps = np.minimum(lo.astype(np.int64)[:, None] + np.arange(2), side - 1)
        return taps, np.maximum(1 - np.abs(src[:, None] - lo[:, None] - np.arange(2)), 0).astype(np.float32)

    rt, rw = axis(pos[:, 0], hw[:, 0])
    ct, cw = axis(pos[:, 1], hw[:, 1])
    idx = (rt[:, :, None] * side + ct[:, None, :]).reshape(-1, 4).astype(np.int32)
    return idx, (rw[:, :, None] * cw[:, None, :]).reshape(-1, 4)


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class PatchMerger(nn.Module):
    """2x2 merger; ``postshuffle``: LayerNorm over the concatenated block (DeepStack mergers)
    instead of over each patch (the final merger)."""

    def __init__(self, cfg: VisionConfig, postshuffle: bool = False):
        super().__init__()
        self.hidden = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = layer_norm(self.hidden if postshuffle else cfg.hidden_size)
        self.linear_fc1 = nn.Linear(self.hidden, self.hidden)
        self.linear_fc2 = nn.Linear(self.hidden, cfg.out_hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.norm(x.reshape(-1, self.hidden)) if self.postshuffle else self.norm(x).reshape(-1, self.hidden)
        return self.linear_fc2(fastmath.gelu(self.linear_fc1(x)))


class VisionModel(VisionTower):
    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.patch_embed = PatchEmbed(cfg, bias=True)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.side = int(round(cfg.num_position_embeddings**0.5))
        self.blocks = [VisionBlock(cfg, layer_norm, VisionMlp(cfg)) for _ in range(cfg.depth)]
        self.merger = PatchMerger(cfg)
        self.deepstack_merger_list = [PatchMerger(cfg, postshuffle=True) for _ in cfg.deepstack_visual_indexes]
        self._deepstack = {layer: j for j, layer in enumerate(cfg.deepstack_visual_indexes)}

    def plan_extra(self, grid: np.ndarray, pos: np.ndarray) -> Dict[str, mx.array]:
        idx, w = interpolation_taps(grid, pos, self.side)
        return {"interp_idx": mx.array(idx), "interp_w": mx.array(w)}

    def add_positions(self, x: mx.array, plan: GridPlan) -> mx.array:
        table = self.pos_embed.weight[plan.extra["interp_idx"]]  # (N, 4, D)
        pe = (table * plan.extra["interp_w"][..., None].astype(table.dtype)).sum(axis=1)
        return x + pe.astype(x.dtype)
