"""Load-time fusion of parallel projections: q/k/v -> ``qkv_proj``, gate/up -> ``gate_up_proj``.

One matmul (float or quantized) instead of three / two: fewer kernel launches, one
pass over the input, and on the CPU backend one BLAS call. Only the in-memory model
changes; checkpoints keep Hugging Face names (the writer saves the checkpoint's
tensors, not the model), so converted directories still load in mlx-lm.

Weights, quantized scales / biases and biases are concatenated along the output axis
(``-2``; ``-1`` for a bias), so one rule covers `nn.Linear` ``[out, in]``,
`QuantizedLinear` and mlx-lm's (Quantized)SwitchLinear ``[experts, out, in]``. A group
is left alone when its members differ in type, dtype, input size, bias presence or
quantization (bits / group size / mode). The concatenation is lazy: nothing is read
until the fused weight is evaluated, and `model_from_checkpoint` drops the unfused
arrays from the checkpoint first, so no second copy stays resident.
"""

import copy
from itertools import accumulate
from typing import Dict, List, Optional, Set, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .decoder import Attention, Experts, MLP

GROUPS = (
    (Attention, ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    (MLP, ("gate_proj", "up_proj"), "gate_up_proj"),
    (Experts, ("gate_proj", "up_proj"), "gate_up_proj"),
)
_QUANT = ("bits", "group_size", "mode")


def _axis(key: str) -> int:
    return -1 if key == "bias" else -2


def _compatible(parts: List[nn.Module]) -> bool:
    first = parts[0]
    keys = set(first.keys())
    if "weight" not in keys or not all(isinstance(first[k], mx.array) for k in keys):
        return False
    for p in parts[1:]:
        if type(p) is not type(first) or set(p.keys()) != keys:
            return False
        if any(getattr(p, a, None) != getattr(first, a, None) for a in _QUANT):
            return False
        for k in keys:
            a, b, ax = first[k], p[k], _axis(k)
            if a.dtype != b.dtype or a.ndim != b.ndim:
                return False
            if a.shape[:ax] + (a.shape[ax + 1:] if ax != -1 else ()) != \
                    b.shape[:ax] + (b.shape[ax + 1:] if ax != -1 else ()):
                return False
    return True


def fusion_groups(model: nn.Module) -> List[Tuple[str, Tuple[str, ...], str]]:
    """``(module path, part names, fused name)`` of every group present in ``model``."""
    return [(path, names, fused_name) for path, module in model.named_modules()
            for cls, names, fused_name in GROUPS if isinstance(module, cls) and all(k in module for k in names)]


def fuse_projections(model: nn.Module, release: Optional[Dict[str, mx.array]] = None,
                     only: Optional[Set[str]] = None) -> int:
    """Fuse every compatible group in ``model`` in place (those at the module paths in
    ``only``, if given); returns how many were fused. ``release``: a dict of arrays (a
    checkpoint's) from which the superseded unfused arrays are removed (by identity), so
    that evaluating the fused ones does not keep them."""
    superseded = set()
    n = 0
    modules = dict(model.named_modules())
    for path, names, fused_name in fusion_groups(model):
        if only is not None and path not in only:
            continue
        module = modules[path]
        parts = [module[k] for k in names]
        if not _compatible(parts):
            continue
        fused = copy.copy(parts[0])
        for k in parts[0].keys():
            fused[k] = mx.concatenate([p[k] for p in parts], axis=_axis(k))
        superseded.update(id(p[k]) for p in parts for k in p.keys())
        for k in names:
            del module[k]
        module[fused_name] = fused
        n += 1
    if release is not None and superseded:
        for key in [k for k, v in release.items() if id(v) in superseded]:
            del release[key]
    return n


def unfused_parameters(model: nn.Module) -> Dict[str, mx.array]:
    """The flat parameters under Hugging Face names: fused tensors split back into their
    parts (slices, no copy), e.g. to hand the same weights to mlx-lm."""
    modules = dict(model.named_modules())
    out = {}
    for key, v in tree_flatten(model.parameters()):
        for _, names, fused_name in GROUPS:
            tag = f".{fused_name}."
            if tag not in key:
                continue
            path, leaf = key.split(tag)
            parent = modules[path]
            units = ((parent.n_heads, parent.n_kv_heads, parent.n_kv_heads)
                     if fused_name == "qkv_proj" else (1, 1))
            ax = _axis(leaf)
            step = v.shape[ax] // sum(units)
            cuts = [u * step for u in accumulate(units[:-1])]
            for name, piece in zip(names, mx.split(v, cuts, axis=ax)):
                out[f"{path}.{name}.{leaf}"] = piece
            break
        else:
            out[key] = v
    return out
