"""Quantization recipes, declared as data.

A recipe is a description, optional defaults for the body (``base``: bits / group_size /
mode, which ``--bits`` / ``--group-size`` / ``--mode`` override) and an ordered list of
rules ``(pattern, value)``. A pattern is an anchored regex over module paths
(``model.layers.3.mlp.down_proj``); ``{edge}`` stands for the indices of the first and
last eighth of the layers (at least the first and the last layer). A value is ``KEEP``
(stay float) or a partial spec (any of bits / group_size / mode) applied over the body's.

Rules apply in order and the last match wins: `BASE_RULES` first, then the recipe's,
then those given on the command line (``--keep-bits embed=8,lm_head=8``), whose keys
are `ALIASES` or regexes.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from .spec import MODES, QuantizationError

KEEP = "keep"
Value = Union[str, Dict[str, object]]
Rule = Tuple[str, Value]

ALIASES: Dict[str, str] = {
    "embed": r"^(?:.*\.)?embed_tokens$",
    "lm_head": r"^(?:.*\.)?lm_head$",
    "router": r"^.*\.mlp\.(?:gate|shared_expert_gate)$",
    "experts": r"^.*\.switch_mlp\.(?:gate|up|down)_proj$",
    "shared_expert": r"^.*\.shared_expert\.(?:gate|up|down)_proj$",
    "attn": r"^.*\.self_attn\.[qkvo]_proj$",
    "mlp": r"^.*\.mlp\.(?:.*\.)?(?:gate|up|down)_proj$",
    "q_proj": r"^.*\.q_proj$",
    "k_proj": r"^.*\.k_proj$",
    "v_proj": r"^.*\.v_proj$",
    "o_proj": r"^.*\.o_proj$",
    "gate_proj": r"^.*\.gate_proj$",
    "up_proj": r"^.*\.up_proj$",
    "down_proj": r"^.*\.down_proj$",
    "edge_down": r"^(?:.*\.)?layers\.{edge}\.mlp\.(?:.*\.)?down_proj$",
    "edge_v": r"^(?:.*\.)?layers\.{edge}\.self_attn\.v_proj$",
    "vision": r"^visual\..*$",
}
A = ALIASES

# Always first, overridable by later rules: MoE router gates (Qwen2/3-MoE `mlp.gate`,
# Qwen2-MoE `shared_expert_gate`) are tiny and decide the routing; the vision tower of the
# VL families is small next to the decoder and sensitive (mlx-vlm keeps it float too).
BASE_RULES: List[Rule] = [(A["router"], KEEP), (A["vision"], KEEP)]


@dataclass(frozen=True)
class Recipe:
    description: str
    base: Dict[str, object] = field(default_factory=dict)
    rules: Tuple[Rule, ...] = ()
    quantize: bool = True


RECIPES: Dict[str, Recipe] = {
    "uniform": Recipe(
        "every Linear / Embedding / expert weight at --bits/--group-size/--mode "
        "(default affine 4-bit, group 64); router gates float"),
    "mixed-4-6": Recipe(
        "4-bit body; 6-bit embeddings, LM head and the first/last layers' down projections",
        {"bits": 4}, ((A["embed"], {"bits": 6}), (A["lm_head"], {"bits": 6}), (A["edge_down"], {"bits": 6}))),
    "mixed-4-8": Recipe(
        "4-bit body; 8-bit embeddings and LM head; 6-bit first/last layers' down projections",
        {"bits": 4}, ((A["embed"], {"bits": 8}), (A["lm_head"], {"bits": 8}), (A["edge_down"], {"bits": 6}))),
    "mixed-3-6": Recipe(
        "3-bit body; 6-bit embeddings, LM head, and v/down projections of the first/last layers",
        {"bits": 3}, ((A["embed"], {"bits": 6}), (A["lm_head"], {"bits": 6}), (A["edge_down"], {"bits": 6}),
                      (A["edge_v"], {"bits": 6}))),
    "mixed-2-6": Recipe(
        "2-bit body; 6-bit embeddings, LM head, and v/down projections of the first/last layers",
        {"bits": 2}, ((A["embed"], {"bits": 6}), (A["lm_head"], {"bits": 6}), (A["edge_down"], {"bits": 6}),
                      (A["edge_v"], {"bits": 6}))),
    "moe-experts-4": Recipe(
        "MoE: 4-bit routed experts; 8-bit attention, embeddings, LM head, dense and shared MLPs",
        {"bits": 8}, ((A["experts"], {"bits": 4}),)),
    "mxfp4": Recipe(
        "mxfp4 body (4-bit floats, group 32); 8-bit affine embeddings and LM head",
        {"mode": "mxfp4"},
        ((A["embed"], {"mode": "affine", "bits": 8, "group_size": 64}),
         (A["lm_head"], {"mode": "affine", "bits": 8, "group_size": 64}))),
    "vl-4bit": Recipe(
        "VL models: 4-bit language model (8-bit embeddings and LM head), 8-bit vision tower "
        "(other recipes keep the tower float)",
        {"bits": 4}, ((A["embed"], {"bits": 8}), (A["lm_head"], {"bits": 8}), (A["vision"], {"bits": 8}))),
    "float": Recipe("no quantization: every tensor cast to --dtype (quantized sources are dequantized)",
                    quantize=False),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise QuantizationError(f"unknown recipe '{name}' (known: {', '.join(RECIPES)})")
    return RECIPES[name]


def parse_value(text: str, what: str) -> Value:
    """``keep`` | ``BITS`` | ``BITS/GROUP`` | ``MODE`` | ``MODE:BITS[/GROUP]`` (``affine:8/64``)."""
    t = text.strip().lower()
    if t in ("keep", "float", "none", "16", "32"):
        return KEEP
    mode, colon, t = t.rpartition(":") if ":" in t else ("", "", t)
    if t in MODES and not colon:
        return {"mode": t}
    out: Dict[str, object] = {"mode": mode} if colon else {}
    bits, _, group = t.partition("/")
    try:
        out["bits"] = int(bits)
        if group:
            out["group_size"] = int(group)
    except ValueError:
        raise QuantizationError(
            f"{what}: cannot read '{text}' (use keep, BITS, BITS/GROUP, MODE or MODE:BITS/GROUP; "
            f"modes: {', '.join(MODES)})") from None
    return out


def parse_keep_bits(text: Optional[str]) -> List[Rule]:
    """``"embed=8,lm_head=affine:8/64,router=keep,.*\\.v_proj$=6/32"`` -> rules (keys:
    `ALIASES` or regexes; no commas inside a regex)."""
    rules = []
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        key, eq, val = item.rpartition("=")
        if not eq or not key:
            raise QuantizationError(f"--keep-bits: '{item}' is not KEY=VALUE (e.g. embed=8,lm_head=8)")
        rules.append((ALIASES.get(key, key), parse_value(val, f"--keep-bits {key}")))
    return rules
