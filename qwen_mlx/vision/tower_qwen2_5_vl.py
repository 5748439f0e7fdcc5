"""Qwen2.5-VL vision tower: RMSNorm + SwiGLU ViT with window attention.

Blocks listed in ``fullatt_block_indexes`` attend within each image / frame; the others
within windows of ``window_size`` pixels (``window_size // merge // patch`` merged tokens a
side; edge windows are partial). HF permutes the hidden states into window order
(`get_vision_window_index`), runs every block in that order and un-permutes the merged
output with ``argsort``. Here the window order is folded into the attention plan's gather /
scatter, so hidden states stay in patch order and the merger output needs no inverse.
"""

from dataclasses import dataclass, field
from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError
from ..models import fastmath
from .tower_qwen2_vl import PatchMerger
from .vit import AttnPlan, PatchEmbed, ViTConfig, VisionBlock, VisionTower, activation, frame_segments, rms_norm


@dataclass
class VisionConfig(ViTConfig):
    window_size: int = 112
    fullatt_block_indexes: List[int] = field(default_factory=lambda: [7, 15, 23, 31])

    @classmethod
    def from_config(cls, cfg: dict, **overrides) -> "VisionConfig":
        kw = ViTConfig.common(cfg)
        kw.update(
            intermediate_size=int(cfg.get("intermediate_size") or 3420),
            out_hidden_size=int(cfg.get("out_hidden_size") or 3584),
            hidden_act=cfg.get("hidden_act") or "silu",
            window_size=int(cfg.get("window_size") or 112),
            fullatt_block_indexes=[int(i) for i in cfg.get("fullatt_block_indexes", [7, 15, 23, 31])],
        )
        kw.update(overrides)
        return cls(**kw)

    def __post_init__(self):
        super().__post_init__()
        if self.window_size // self.spatial_merge_size // self.patch_size < 1:
            raise ConfigError(f"vision window_size {self.window_size} is smaller than one merged token "
                              f"({self.spatial_merge_size} x {self.patch_size} pixels)")


def window_index(grid: np.ndarray, merge: int, window: int) -> Tuple[np.ndarray, np.ndarray]:
    """Merged tokens in window order and the merged-token count of each window.

    ``window`` is in merged tokens a side. Windows tile each frame row-major from the top-left;
    inside a window tokens stay row-major. E.g. one 3x3 merged grid, window 2: windows hold
    [0 1 3 4] [2 5] [6 7] [8] -> index 0 1 3 4 2 5 6 7 8, sizes 4 2 2 1.
    Returns (index into the merged tokens of all of grid, window sizes)."""
    index, sizes, base = [], [], 0
    for t, h, w in grid:
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // window), -(-gw // window)
        ids = np.full((t, nh * window, nw * window), -1, np.int64)
        ids[:, :gh, :gw] = base + np.arange(t * gh * gw).reshape(t, gh, gw)
        ids = ids.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(-1, window * window)
        n = (ids >= 0).sum(axis=1)
        index.append(ids[ids >= 0])
        sizes.append(n[n > 0])
        base += t * gh * gw
    return np.concatenate(index), np.concatenate(sizes)


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(D, I, bias=True)
        self.up_proj = nn.Linear(D, I, bias=True)
        self.down_proj = nn.Linear(I, D, bias=True)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(fastmath.swiglu(g, u) if self.act is fastmath.silu else self.act(g) * u)


class VisionModel(VisionTower):
    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.patch_embed = PatchEmbed(cfg, bias=False)
        self.blocks = [VisionBlock(cfg, rms_norm, VisionMlp(cfg)) for _ in range(cfg.depth)]
        self.merger = PatchMerger(cfg, norm=rms_norm)

    def plan_layers(self, grid: np.ndarray) -> List[AttnPlan]:
        cfg, mode = self.config, self.config.attention
        unit = cfg.spatial_merge_size**2
        frames = frame_segments(grid)
        full = AttnPlan.build(np.arange(int(frames.sum())), frames, mode)
        index, sizes = window_index(grid, cfg.spatial_merge_size,
                                    cfg.window_size // cfg.spatial_merge_size // cfg.patch_size)
        order = (index[:, None] * unit + np.arange(unit)).ravel()
        windowed = AttnPlan.build(order, sizes * unit, mode)
        return [full if i in cfg.fullatt_block_indexes else windowed for i in range(cfg.depth)]
