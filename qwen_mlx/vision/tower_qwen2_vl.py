"""Qwen2-VL vision tower: LayerNorm ViT with quick-GELU MLP, 2-D rotary, 2x2 patch merger.

HF class `Qwen2VisionTransformerPretrainedModel`; its config calls the ViT width ``embed_dim``
and the merger output (the text hidden size) ``hidden_size``.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..models import fastmath
from .vit import PatchEmbed, ViTConfig, VisionBlock, VisionTower, activation, layer_norm


@dataclass
class VisionConfig(ViTConfig):
    @classmethod
    def from_config(cls, cfg: dict, **overrides) -> "VisionConfig":
        kw = ViTConfig.common(cfg, width_key="embed_dim")
        kw.update(
            out_hidden_size=int(cfg.get("hidden_size") or 3584),
            intermediate_size=int(kw["hidden_size"] * cfg.get("mlp_ratio", 4)),
            hidden_act=cfg.get("hidden_act") or "quick_gelu",
        )
        kw.update(overrides)
        return cls(**kw)


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class PatchMerger(nn.Module):
    """Norm each patch, concatenate each 2x2 block (4 consecutive rows), 2-layer GELU MLP."""

    def __init__(self, cfg: ViTConfig, norm=layer_norm):
        super().__init__()
        self.hidden = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = norm(cfg.hidden_size)
        self.mlp = [nn.Linear(self.hidden, self.hidden), fastmath.GELU(), nn.Linear(self.hidden, cfg.out_hidden_size)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.ln_q(x).reshape(-1, self.hidden)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionModel(VisionTower):
    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.patch_embed = PatchEmbed(cfg, bias=False)
        self.blocks = [VisionBlock(cfg, layer_norm, VisionMlp(cfg)) for _ in range(cfg.depth)]
        self.merger = PatchMerger(cfg)
