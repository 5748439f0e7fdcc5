"""Declarative weight remaps from Hugging Face layouts to ours, applied once at load
or conversion. Checkpoints we convert are stamped (``qwen_mlx_format``) and skip this.

Each rule is an anchored regex, applied in this order: ``RENAME`` rules (a family's
``REMAP.rename`` first) rewrite a name; ``DROP`` rules delete a tensor; a family's
``REMAP.permute`` rules move the axes of a tensor written in another layout, and its
``REMAP.fused`` rules split a fused expert tensor into (E, out, in) projections; ``STACK``
rules gather per-expert tensors into one (E, ...) tensor, the layout of mlx-lm's SwitchGLU
(group 2 of the match is the expert index).
"""

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx

from ..errors import WeightsError

DROP: List[str] = [r"^.*\.rotary_emb\.inv_freq$"]
RENAME: List[Tuple[str, str]] = []
STACK: List[Tuple[str, str]] = [
    (r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$",
     r"\1.switch_mlp.\3.\4"),
]


@dataclass(frozen=True)
class Fused:
    """A fused expert tensor -> ``len(targets)`` equal (E, out, in) parts along ``out``.

    Writers disagree on the orientation: transformers 5.x saves (E, out, in), hub 4.x
    checkpoints (E, in, out). The last axis must be the input size ``cfg[in_key]``; a tensor
    whose middle axis is that size is transposed first. A square tensor is taken as
    (E, out, in), as transformers does."""

    pattern: str
    targets: Tuple[str, ...]
    in_key: str


@dataclass(frozen=True)
class Permute:
    """A tensor some writer stores with other axes (e.g. mlx-vlm's channels-last Conv3d
    weights): ``transpose(perm)`` where ``applies(shape, cfg)`` recognises that layout."""

    pattern: str
    perm: Tuple[int, ...]
    applies: Callable[[tuple, dict], bool]


@dataclass(frozen=True)
class Rules:
    """What a family module adds (its ``REMAP`` attribute) to the global tables."""

    rename: Tuple[Tuple[str, str], ...] = ()
    fused: Tuple[Fused, ...] = ()
    permute: Tuple[Permute, ...] = ()


def _split_fused(name: str, w: mx.array, m: re.Match, rule: Fused, cfg: dict):
    n_in = (cfg or {}).get(rule.in_key)
    if w.ndim != 3 or not n_in:
        raise WeightsError(f"fused expert tensor '{name}' of shape {tuple(w.shape)}: expected "
                           f"(experts, out, in) with in = {rule.in_key} ({n_in})")
    if w.shape[-1] != n_in:
        if w.shape[-2] != n_in:
            raise WeightsError(f"fused expert tensor '{name}' has shape {tuple(w.shape)}; neither "
                               f"of its last two axes is {rule.in_key} = {n_in}")
        w = w.swapaxes(-1, -2)
    k = len(rule.targets)
    if w.shape[1] % k:
        raise WeightsError(f"fused expert tensor '{name}' of shape {tuple(w.shape)} does not split "
                           f"into {k} equal parts")
    parts = mx.split(w, k, axis=1) if k > 1 else [w]
    return [(m.expand(t), p) for t, p in zip(rule.targets, parts)]


def remap_weights(weights: Dict[str, mx.array], n_experts: int = 0, tied: bool = False,
                  rules: Optional[Rules] = None, cfg: Optional[dict] = None) -> Dict[str, mx.array]:
    """HF names -> ours. ``rules``: the family's additions; ``cfg``: the normalised config
    (sizes that fused rules read)."""
    rules = rules or Rules()
    drops = [re.compile(p) for p in DROP] + ([re.compile(r"^lm_head\.weight$")] if tied else [])
    renames = [(re.compile(p), r) for p, r in (*rules.rename, *RENAME)]
    fused = [(re.compile(f.pattern), f) for f in rules.fused]
    permutes = [(re.compile(q.pattern), q) for q in rules.permute]
    stacks = [(re.compile(p), r) for p, r in STACK]
    out, groups = {}, defaultdict(dict)
    for name, w in weights.items():
        for p, r in renames:
            name = p.sub(r, name) if p.match(name) else name
        if any(p.match(name) for p in drops):
            continue
        for p, q in permutes:
            if p.match(name) and q.applies(tuple(w.shape), cfg or {}):
                w = w.transpose(q.perm)
        items = [(name, w)]
        for p, f in fused:
            m = p.match(name)
            if m:
                items = _split_fused(name, w, m, f, cfg)
                break
        for name, w in items:
            for p, r in stacks:
                m = p.match(name)
                if m:
                    groups[p.sub(r, name)][int(m.group(2))] = w
                    break
            else:
                out[name] = w
    for name, parts in groups.items():
        n = max(len(parts), n_experts)
        if sorted(parts) != list(range(n)):
            missing = sorted(set(range(n)) - set(parts))
            raise WeightsError(f"experts missing for '{name}': indices {missing[:8]}")
        out[name] = mx.stack([parts[i] for i in range(n)])
    return out
