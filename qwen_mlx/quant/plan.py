"""Which spec each module gets: a recipe's rules resolved over a model's module paths.

Quantizable modules are those mlx-lm quantizes: anything with ``to_quantized``
(Linear, Embedding, mlx-lm's SwitchLinear experts) whose input size is a multiple of
the group size, and that the model uses only through the module (a matmul or a lookup).
A module whose ``weight`` the model's own code reads (Qwen3-VL's ``visual.pos_embed``,
a position table resampled by hand) would see packed integers once quantized: the plan
finds these in the code of the modules that own them (`direct_weight_reads`) and keeps
them float whatever the rules say. A module the rules send to a group size that does
not divide its input stays float when the group came from the defaults, and is an error
when the command line asked for it.
"""

import ast
import inspect
import re
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, FrozenSet, List, Optional, Tuple

import mlx.nn as nn

from .recipes import BASE_RULES, KEEP, Rule, get_recipe, parse_keep_bits
from .spec import MODES, QuantizationError, QuantSpec, make_spec


@dataclass
class Plan:
    base: Optional[QuantSpec]  # None: no quantization
    specs: Dict[str, Optional[QuantSpec]]  # module path -> spec (None: float)
    reasons: Dict[str, str] = field(default_factory=dict)  # why a module stays float
    recipe: str = "uniform"

    def config(self) -> Optional[dict]:
        """config.json's ``quantization`` block, mlx-lm's layout: the body's spec, then
        per-module entries where they differ (``false`` for modules kept float)."""
        if self.base is None:
            return None
        q = self.base.config()
        for path, spec in sorted(self.specs.items()):
            if spec != self.base:
                q[path] = spec.config() if spec else False
        return q

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for s in self.specs.values():
            out[str(s) if s else "float"] = out.get(str(s) if s else "float", 0) + 1
        return out


def natural_key(name: str):
    """``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def quantizable_modules(model: nn.Module) -> Dict[str, nn.Module]:
    mods = {p: m for p, m in model.named_modules()
            if p and hasattr(m, "to_quantized") and "weight" in m and m.weight.ndim >= 2}
    return {p: mods[p] for p in sorted(mods, key=natural_key)}


@lru_cache(maxsize=None)
def _weight_reads(cls: type) -> FrozenSet[Tuple[str, str]]:
    """(child attribute, method) pairs where a method of ``cls`` (or of a base outside MLX)
    reads ``self.<child>.weight`` / ``self.<child>["weight"]`` itself (``__init__`` aside:
    it runs before any quantization)."""
    found = set()
    for c in cls.__mro__:
        if c.__module__.split(".")[0] in ("mlx", "builtins"):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(c)))
        except (OSError, TypeError, SyntaxError):
            continue
        fns = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for fn in [f for f in fns if f.name != "__init__"]:
            for n in ast.walk(fn):
                owner = None
                if not isinstance(getattr(n, "ctx", None), ast.Load):
                    continue
                if isinstance(n, ast.Attribute) and n.attr == "weight":
                    owner = n.value
                elif isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant) and n.slice.value == "weight":
                    owner = n.value
                if (isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name)
                        and owner.value.id == "self"):
                    found.add((owner.attr, f"{c.__name__}.{fn.name}"))
    return frozenset(found)


def direct_weight_reads(model: nn.Module) -> Dict[str, str]:
    """Module path -> the method that reads its weight directly, not through the module
    (a Qwen3-VL model: ``{"visual.pos_embed": "VisionModel.add_positions"}``)."""
    out = {}
    for path, m in model.named_modules():
        for attr, where in _weight_reads(type(m)):
            child = f"{path}.{attr}" if path else attr
            if isinstance(getattr(m, attr, None), nn.Module):
                out[child] = where
    return out


def _edge_layers(paths) -> str:
    idx = {int(m.group(1)) for p in paths for m in [re.search(r"(?:^|\.)layers\.(\d+)\.", p)] if m}
    if not idx:
        return "(?!)"
    n = max(idx) + 1
    k = max(1, n // 8)
    return "(?:" + "|".join(str(i) for i in sorted(idx) if i < k or i >= n - k) + ")"


def _compile(rules: List[Rule], edge: str, origin: str) -> List[Tuple[re.Pattern, object, str]]:
    out = []
    for pat, val in rules:
        try:
            out.append((re.compile(pat.replace("{edge}", edge)), val, origin))
        except re.error as e:
            raise QuantizationError(f"{origin}: bad pattern '{pat}': {e}") from None
    return out


def _resolve(base: QuantSpec, val: dict, what: str) -> QuantSpec:
    """A rule's partial spec over the body's. Without a mode, bits / group sizes that the
    body's fp mode cannot hold (``router=8`` under mxfp4) mean affine."""
    mode = val.get("mode")
    if mode is None:
        bits, group = val.get("bits", base.bits), val.get("group_size", base.group_size)
        m = MODES[base.mode]
        if base.mode != "affine" and (bits not in m.bits or group not in m.group_sizes):
            return make_spec(val.get("bits"), val.get("group_size"), "affine", what=what)
        return make_spec(bits, group, base.mode, what=what)
    if mode == base.mode:
        return make_spec(val.get("bits", base.bits), val.get("group_size", base.group_size), mode, what=what)
    return make_spec(val.get("bits"), val.get("group_size"), mode, what=what)


def make_plan(model: nn.Module, *, recipe: str = "uniform", bits: Optional[int] = None,
              group_size: Optional[int] = None, mode: Optional[str] = None,
              keep_bits: Optional[str] = None) -> Plan:
    r = get_recipe(recipe)
    modules = quantizable_modules(model)
    direct = {p: w for p, w in direct_weight_reads(model).items() if p in modules}
    if not r.quantize:
        if bits or group_size or mode or keep_bits:
            raise QuantizationError(f"recipe '{recipe}' does not quantize: drop --bits/--group-size/--mode/--keep-bits")
        return Plan(None, {p: None for p in modules}, {p: "recipe float" for p in modules}, recipe)
    b = dict(r.base)
    if mode is not None and mode != b.get("mode", "affine"):
        b = {"mode": mode}
    b.update({k: v for k, v in (("bits", bits), ("group_size", group_size)) if v is not None})
    base = make_spec(b.get("bits"), b.get("group_size"), b.get("mode"), what=f"recipe '{recipe}'")
    edge = _edge_layers(modules)
    user = parse_keep_bits(keep_bits)
    rules = (_compile(BASE_RULES, edge, "default rules") + _compile(list(r.rules), edge, f"recipe '{recipe}'")
             + _compile(user, edge, "--keep-bits"))
    for rx, val, origin in rules[len(rules) - len(user):]:
        hits = [p for p in modules if rx.fullmatch(p)]
        if not hits:
            raise QuantizationError(
                f"--keep-bits: '{rx.pattern}' matches no quantizable module (e.g. {next(iter(sorted(modules)), '-')})")
        if val != KEEP and all(p in direct for p in hits):
            raise QuantizationError(
                f"--keep-bits: '{rx.pattern}' matches only {', '.join(hits)}, whose weight the model reads "
                f"directly ({', '.join(sorted({direct[p] for p in hits}))}): it cannot be quantized")
    specs, reasons = {}, {}
    for path, m in modules.items():
        if path in direct:  # whatever the rules say
            specs[path], reasons[path] = None, f"its weight is read directly by {direct[path]}"
            continue
        spec, origin = base, "default"
        for rx, val, org in rules:
            if rx.fullmatch(path):
                spec = None if val == KEEP else _resolve(base, val, f"{org} rule for '{path}'")
                origin = org
        n = m.weight.shape[-1]
        if spec is not None and n % spec.group_size:
            if origin == "--keep-bits":
                raise QuantizationError(
                    f"--keep-bits: group size {spec.group_size} does not divide the input size {n} of '{path}'")
            reasons[path] = f"input size {n} is not a multiple of group size {spec.group_size}"
            spec = None
        elif spec is None:
            reasons[path] = f"kept float by {origin}"
        specs[path] = spec
    if modules and all(s is None for s in specs.values()) and any("multiple" in v for v in reasons.values()):
        sizes = sorted({m.weight.shape[-1] for m in modules.values()})
        raise QuantizationError(
            f"group size {base.group_size} divides the input size of no quantizable module "
            f"(input sizes: {', '.join(map(str, sizes))})")
    return Plan(base, specs, reasons, recipe)
