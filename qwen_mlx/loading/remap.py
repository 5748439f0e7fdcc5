"""Declarative weight remaps from Hugging Face layouts to ours, applied once at load
or conversion. Checkpoints we convert are stamped (``qwen_mlx_format``) and skip this.

Each rule is an anchored regex. ``DROP`` rules delete a tensor; ``RENAME`` rules
rewrite a name; ``STACK`` rules gather per-expert tensors into one (E, ...) tensor,
the layout of mlx-lm's SwitchGLU (group 2 of the match is the expert index).
"""

import re
from collections import defaultdict
from typing import Dict, List, Tuple

import mlx.core as mx

from ..errors import WeightsError

DROP: List[str] = [r"^.*\.rotary_emb\.inv_freq$"]
RENAME: List[Tuple[str, str]] = []
STACK: List[Tuple[str, str]] = [
    (r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$",
     r"\1.switch_mlp.\3.\4"),
]


def remap_weights(weights: Dict[str, mx.array], n_experts: int = 0,
                  tied: bool = False) -> Dict[str, mx.array]:
    drops = [re.compile(p) for p in DROP] + ([re.compile(r"^lm_head\.weight$")] if tied else [])
    renames = [(re.compile(p), r) for p, r in RENAME]
    stacks = [(re.compile(p), r) for p, r in STACK]
    out, groups = {}, defaultdict(dict)
    for name, w in weights.items():
        if any(p.match(name) for p in drops):
            continue
        for p, r in renames:
            name = p.sub(r, name) if p.match(name) else name
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
