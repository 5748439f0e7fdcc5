"""The ViT shared by the Qwen vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Each family file states only what differs (norms, MLP, merger, windows, learned positions,
DeepStack); parameter names are Hugging Face's ``visual.`` names and shapes.

Everything that depends only on ``grid_thw`` is planned on the host in numpy before the mx
graph is built (`plan_grid`): 2-D rotary angles, which patches attend to which, window
orders, interpolation taps. The tower itself never reads an array back (no ``.item()`` /
``.tolist()``), so it can run under ``mx.compile`` and stays lazy until the caller evaluates.

Attention over several segments (images, video frames, 2.5-VL windows) is one
``scaled_dot_product_attention`` call per layer, planned as one of (`AttnPlan.kind`):

* ``full``: one segment in order, no mask.
* ``dense``: equal-length segments in order (the frames of one video): a reshape to a batch.
* ``padded``: segments gathered into a padded batch ``(S, Lmax)`` with a key-padding mask and
  scattered back. Work and memory ~ ``S * Lmax**2``; the 2.5-VL window order is folded into
  the gather, so hidden states keep the patch order and no inverse permutation is needed.
* ``mask``: a boolean block-diagonal ``(N, N)`` mask over all patches, ~ ``N**2``.

``auto`` takes ``padded`` unless the mask is cheaper (a few large segments next to many small
ones, where padding to the largest wastes more than the mask).
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError, VisionInputError
from ..models import fastmath
from ..models.mrope import rotate
from .inputs import TowerOutput


ACTIVATIONS: Dict[str, Callable] = {  # nn.* on Metal/CUDA; fast float32 kernels on the CPU (fastmath)
    "quick_gelu": fastmath.quick_gelu,  # x * sigmoid(1.702 x)
    "gelu_pytorch_tanh": fastmath.gelu_tanh,
    "gelu_new": fastmath.gelu_tanh,
    "gelu": fastmath.gelu,
    "silu": fastmath.silu,
}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ConfigError(f"vision hidden_act '{name}' is not supported (known: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _int(cfg: dict, *keys, default=None) -> int:
    for k in keys:
        if cfg.get(k) is not None:
            return int(cfg[k])
    if default is None:
        raise ConfigError(f"vision_config lacks '{keys[0]}'")
    return default


@dataclass
class ViTConfig:
    depth: int
    hidden_size: int  # ViT width
    num_heads: int
    intermediate_size: int
    out_hidden_size: int  # merger output = text hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    attention: str = "auto"  # "auto" | "batched" | "mask" (see AttnPlan)

    @staticmethod
    def common(cfg: dict, width_key: str = "hidden_size") -> dict:
        """Keys every family shares; 4.x hub configs say ``in_chans`` / ``spatial_patch_size``,
        5.x may carry ``rope_parameters.rope_theta``."""
        if not isinstance(cfg, dict):
            raise ConfigError("vision_config must be a JSON object")
        rp = cfg.get("rope_parameters") or {}
        return dict(
            depth=_int(cfg, "depth", "num_hidden_layers"),
            hidden_size=_int(cfg, width_key),
            num_heads=_int(cfg, "num_heads", "num_attention_heads"),
            patch_size=_int(cfg, "patch_size", "spatial_patch_size", default=14),
            temporal_patch_size=_int(cfg, "temporal_patch_size", default=2),
            in_channels=_int(cfg, "in_channels", "in_chans", default=3),
            spatial_merge_size=_int(cfg, "spatial_merge_size", default=2),
            rope_theta=float(rp.get("rope_theta") or cfg.get("rope_theta") or 10000.0),
        )

    def __post_init__(self):
        hd, rem = divmod(self.hidden_size, max(self.num_heads, 1))
        if self.num_heads < 1 or rem or hd % 4:
            raise ConfigError(f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads} must "
                              "give a head_dim divisible by 4 (2-D rotary)")
        if self.attention not in ("auto", "batched", "mask"):
            raise ConfigError(f"vision attention '{self.attention}' is not auto, batched or mask")
        activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


# ----------------------------------------------------------------- host-side planning (numpy)


def check_grid(grid_thw, n_rows: int, row_width: int, cfg: ViTConfig) -> np.ndarray:
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or len(grid) == 0 or not np.issubdtype(grid.dtype, np.integer):
        raise VisionInputError(f"grid_thw must be a non-empty (n, 3) integer array, got shape {grid.shape} "
                               f"dtype {grid.dtype}")
    m = cfg.spatial_merge_size
    if (grid < 1).any() or (grid[:, 1:] % m).any():
        raise VisionInputError(f"grid_thw rows must be positive with h and w multiples of "
                               f"spatial_merge_size {m}: {grid.tolist()}")
    if row_width != cfg.patch_dim:
        raise VisionInputError(f"pixel rows have {row_width} values; this tower expects C*T*P*P = "
                               f"{cfg.in_channels}*{cfg.temporal_patch_size}*{cfg.patch_size}^2 = {cfg.patch_dim}")
    if int(grid.prod(axis=1).sum()) != n_rows:
        raise VisionInputError(f"pixel_values has {n_rows} patch rows but grid_thw {grid.tolist()} "
                               f"describes {int(grid.prod(axis=1).sum())}")
    return grid.astype(np.int64)


def patch_positions(grid: np.ndarray, merge: int) -> np.ndarray:
    """(row, col) of every patch, (N, 2), in the processor's order: frames one after another,
    each frame in ``merge x merge`` blocks, blocks row-major, patches row-major in a block.

    E.g. h = w = 4, merge 2: rows 0 0 1 1 0 0 1 1 2 2 3 3 2 2 3 3, cols 0 1 0 1 2 3 2 3 0 1 ..."""
    out = []
    for t, h, w in grid:
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).ravel()
        out.append(np.tile(np.stack([blocks(r), blocks(c)], axis=-1), (t, 1)))
    return np.concatenate(out)


def rotary_angles(pos: np.ndarray, head_dim: int, theta: float) -> np.ndarray:
    """Axial 2-D RoPE: the first quarter of the frequencies read the row, the second the
    column: (N, head_dim / 2) float32, the angles of both halves (rotate-half layout)."""
    half = head_dim // 2
    inv = (1.0 / (theta ** (np.arange(0, half, 2, dtype=np.float32) / half))).astype(np.float32)
    f = pos.astype(np.float32)[:, :, None] * inv  # (N, 2, head_dim / 4)
    return f.reshape(len(pos), -1)


def frame_segments(grid: np.ndarray) -> np.ndarray:
    """Patches per attention segment when each image / video frame attends to itself."""
    return np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])


@dataclass
class AttnPlan:
    """Which patches attend to which, as one SDPA call (kinds in the module docstring).

    ``auto`` compares the scores each route computes, ``S * Lmax**2`` against ``N**2``; both
    cost about the same per score on MLX's CPU backend (one 1024x1024 image, Qwen2.5-VL window
    layer, 2 cores: padded 0.34 s, mask 13 s; a 48x48 image beside 8 8x8 thumbnails: padded
    11.4 s, mask 1.5 s)."""

    kind: str  # "full" | "dense" | "padded" | "mask"
    segments: int = 1
    length: int = 0  # padded segment length (dense / padded)
    gather: Optional[mx.array] = None  # padded: (S * Lmax,) patch of each slot
    scatter: Optional[mx.array] = None  # padded: (N,) slot of each patch
    mask: Optional[mx.array] = None  # padded: (S, 1, 1, Lmax) valid keys; mask: (N, N)

    @classmethod
    def build(cls, order: np.ndarray, lengths: np.ndarray, mode: str = "auto") -> "AttnPlan":
        """``order`` lists the patches segment after segment, ``lengths`` the segment sizes."""
        N, S, L = len(order), len(lengths), int(lengths.max())
        in_order = bool((order == np.arange(N)).all())
        if S == 1 and in_order:
            return cls("full")
        if mode == "mask" or (mode == "auto" and N * N < S * L * L):
            seg = np.empty(N, np.int32)
            seg[order] = np.repeat(np.arange(S, dtype=np.int32), lengths)
            return cls("mask", mask=mx.array(seg[:, None] == seg[None, :]))
        if in_order and (lengths == L).all():
            return cls("dense", S, L)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        slot = np.repeat(np.arange(S) * L, lengths) + np.arange(N) - starts
        gather = np.zeros(S * L, np.int32)
        gather[slot] = order
        scatter = np.empty(N, np.int32)
        scatter[order] = slot
        valid = np.zeros(S * L, bool)
        valid[slot] = True
        return cls("padded", S, L, mx.array(gather), mx.array(scatter),
                    None if valid.all() else mx.array(valid.reshape(S, 1, 1, L)))


@dataclass
class GridPlan:
    """Host-computed constants for one tower call."""

    cos: mx.array  # (N, 1, 1, head_dim / 2): broadcast over q / k and the heads
    sin: mx.array
    layers: List[AttnPlan]  # one per block (shared objects)
    extra: Dict[str, mx.array] = field(default_factory=dict)  # family constants


def attention(q: mx.array, k: mx.array, v: mx.array, plan: AttnPlan, scale: float) -> mx.array:
    """(N, H, hd) each -> (N, H * hd): one SDPA call for every segment of the plan."""
    N, H, hd = q.shape
    if plan.kind == "padded":
        q, k, v = (a[plan.gather] for a in (q, k, v))
    S = plan.segments if plan.kind in ("dense", "padded") else 1
    q, k, v = (a.reshape(S, -1, H, hd).transpose(0, 2, 1, 3) for a in (q, k, v))
    o = fastmath.sdpa(q, k, v, scale, plan.mask)  # mx.fast.scaled_dot_product_attention off the CPU
    o = o.transpose(0, 2, 1, 3).reshape(-1, H * hd)
    return o[plan.scatter] if plan.kind == "padded" else o


# ------------------------------------------------------------------------------- modules


class PatchProj(nn.Module):
    """HF's Conv3d with kernel == stride over one patch: a matmul with the Conv3d weight
    (out, C, T, P, P) flattened at call time, so checkpoints load unchanged."""

    def __init__(self, cfg: ViTConfig, bias: bool):
        super().__init__()
        P, T = cfg.patch_size, cfg.temporal_patch_size
        self.weight = mx.zeros((cfg.hidden_size, cfg.in_channels, T, P, P))
        if bias:
            self.bias = mx.zeros((cfg.hidden_size,))

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight.reshape(self.weight.shape[0], -1)
        y = x.astype(w.dtype) @ w.T
        return y + self.bias if "bias" in self else y


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig, bias: bool = False):
        super().__init__()
        self.proj = PatchProj(cfg, bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


class VisionAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads, self.scale = cfg.num_heads, cfg.head_dim**-0.5
        self.qkv = nn.Linear(D, 3 * D, bias=True)
        self.proj = nn.Linear(D, D, bias=True)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, plan: AttnPlan) -> mx.array:
        N, D = x.shape
        qkv = self.qkv(x).reshape(N, 3, self.num_heads, -1)
        qk = rotate(qkv[:, :2].astype(mx.float32), cos, sin).astype(qkv.dtype)  # HF rotates in float32
        return self.proj(attention(qk[:, 0], qk[:, 1], qkv[:, 2], plan, self.scale))


class VisionBlock(nn.Module):
    def __init__(self, cfg: ViTConfig, norm: Callable[[int], nn.Module], mlp: nn.Module):
        super().__init__()
        self.norm1 = norm(cfg.hidden_size)
        self.norm2 = norm(cfg.hidden_size)
        self.attn = VisionAttention(cfg)
        self.mlp = mlp

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, plan: AttnPlan) -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, plan)
        return x + self.mlp(self.norm2(x))


def layer_norm(dims: int) -> nn.Module:
    return nn.LayerNorm(dims, eps=1e-6)


def rms_norm(dims: int) -> nn.Module:
    return nn.RMSNorm(dims, eps=1e-6)


class VisionTower(nn.Module):
    """patch_embed -> [positions] -> blocks (DeepStack taps) -> merger.

    A family sets ``patch_embed``, ``blocks``, ``merger`` (Qwen3-VL also ``deepstack_merger_list``
    and ``_deepstack``: ViT layer -> merger index) and may override `plan_layers`, `plan_extra`,
    `add_positions`."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self._deepstack: Dict[int, int] = {}  # "_": not a parameter container

    def plan_layers(self, grid: np.ndarray) -> List[AttnPlan]:
        """Default: every image / video frame attends to itself in every block."""
        lengths = frame_segments(grid)
        p = AttnPlan.build(np.arange(int(lengths.sum())), lengths, self.config.attention)
        return [p] * self.config.depth

    def plan_extra(self, grid: np.ndarray, pos: np.ndarray) -> Dict[str, mx.array]:
        return {}

    def add_positions(self, x: mx.array, plan: GridPlan) -> mx.array:
        return x

    def plan_grid(self, grid: np.ndarray) -> GridPlan:
        cfg = self.config
        pos = patch_positions(grid, cfg.spatial_merge_size)
        ang = mx.array(rotary_angles(pos, cfg.head_dim, cfg.rope_theta))[:, None, None, :]
        return GridPlan(mx.cos(ang), mx.sin(ang), self.plan_layers(grid), self.plan_extra(grid, pos))

    def __call__(self, pixel_values, grid_thw) -> TowerOutput:
        x = pixel_values if isinstance(pixel_values, mx.array) else mx.array(np.asarray(pixel_values))
        if x.ndim != 2:
            raise VisionInputError(f"pixel_values must be (N_patches, C*T*P*P), got shape {tuple(x.shape)}")
        grid = check_grid(grid_thw, x.shape[0], x.shape[1], self.config)
        plan = self.plan_grid(grid)
        x = self.add_positions(self.patch_embed(x), plan)
        deepstack = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, plan.cos, plan.sin, plan.layers[i])
            if i in self._deepstack:
                deepstack.append(self.deepstack_merger_list[self._deepstack[i]](x))
        return TowerOutput(self.merger(x), deepstack)
