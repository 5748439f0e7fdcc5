"""How converted checkpoints name their tensors and shape their config, per family.

At run time every family uses our layout: a flat config (``text_config`` folded into the top
level), tensors named ``model.*`` / ``lm_head.*`` (and ``visual.*`` for the VL families).
Where other loaders of a family expect something else, `LAYOUTS` declares what our writer
emits instead, and the loader reads it back by the same table (checkpoints we write are
stamped, so the loader never has to guess which layout it holds):

- ``prefixes``: ``(ours, written)`` tensor-name prefixes, e.g. ``("model.", "model.language_model.")``;
- ``text_config``: nest the text keys under ``text_config`` (that ``model_type``), keeping
  `_VL_TOP` at the top level and writing ``tie_word_embeddings`` in both places;
- ``quant_aliases``: ``(ours, theirs)`` module-path prefixes under which the ``quantization``
  block repeats its per-module entries (mlx-vlm looks the tower's up as ``vision_tower.*``;
  it finds the decoder's under our ``model.*`` / ``lm_head`` keys);
- ``hub_spelling``: the config keys as the hub's checkpoints spell them where transformers 5.x
  differs (mlx-vlm checks them): ``vision_config.model_type`` is the family's own
  (5.x: ``qwen3_vl_vision``) and ``rope_scaling`` has ``type`` beside ``rope_type``;
- ``experts``: how float MoE expert projections (ours: mlx-lm's stacked
  ``mlp.switch_mlp.{gate,up,down}_proj.weight``, (E, out, in)) are written: `Fused` or
  `PerExpert` (see there). Quantized experts always stay in the ``switch_mlp`` form, the one
  mlx-lm / mlx-vlm read packed experts in.

Qwen3-VL(-MoE) are written as transformers names them (``model.language_model.*``,
``model.visual.*``, ``lm_head.*``) with the hub's nested config (4.57 rope keys), which is
what mlx-vlm 0.7.10 reads for that family. Float Qwen3-VL-MoE experts are written as the hub
stores them, ``experts.gate_up_proj`` (E, H, 2I) and ``experts.down_proj`` (E, I, H): mlx-vlm
reads only that (transformers 5.x's own ``save_pretrained`` layout, (E, 2I, H), it would
misread), and transformers transposes a tensor whose shape differs from its (E, 2I, H)
parameter (a square one, 2I = H, it would keep as is: no released model has that shape).
Float Qwen2/3-MoE experts are written one tensor per expert, the hub layout transformers and
mlx-lm read. mlx-vlm reads Qwen2(.5)-VL only in the 4.x hub layout (flat, ``model.*`` /
``visual.*``), which is ours.
"""

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import mlx.core as mx

from ..errors import WeightsError

Prefixes = Tuple[Tuple[str, str], ...]
_MLP = r"^(model\.layers\.\d+\.mlp)\."  # an MoE block, in our names


@dataclass(frozen=True)
class Fused:
    """Float ``<mlp>.<ours[i]>`` (E, out_i, in) written as one ``<mlp>.<theirs>``: concatenated
    along ``out``, then with the last two axes swapped (E, in, sum out), as the hub stores
    Qwen3-VL-MoE: gate (E, I, H) + up (E, I, H) -> ``experts.gate_up_proj`` (E, H, 2I).
    Read back by the same table: swap, then split into equal parts."""

    ours: Tuple[str, ...]
    theirs: str


@dataclass(frozen=True)
class PerExpert:
    """Float ``<mlp>.<ours>`` (E, out, in) written as E tensors ``<mlp>.<theirs>`` (``{e}``
    the expert index), e.g. ``experts.3.gate_proj.weight`` (out, in); stacked on reading."""

    ours: str
    theirs: str


ExpertForm = Union[Fused, PerExpert]

_VL_TOP = ("model_type", "architectures", "vision_config", "image_token_id", "video_token_id",
           "vision_start_token_id", "vision_end_token_id", "vision_token_id", "tie_word_embeddings",
           "torch_dtype", "dtype", "quantization", "quantization_config", "qwen_mlx_format",
           "transformers_version")
_BOTH = ("tie_word_embeddings",)


@dataclass(frozen=True)
class Layout:
    prefixes: Prefixes = ()
    text_config: Optional[str] = None  # the nested text config's model_type; None: flat
    quant_aliases: Prefixes = ()
    hub_spelling: bool = False
    experts: Tuple[ExpertForm, ...] = ()

    def write_name(self, name: str) -> str:
        return _swap(name, self.prefixes)

    def read_name(self, name: str) -> str:
        return _swap(name, tuple((b, a) for a, b in self.prefixes))

    def config(self, cfg: dict) -> dict:
        """Our flat config -> the written one."""
        cfg = dict(cfg)
        q = cfg.get("quantization")
        if isinstance(q, dict) and self.quant_aliases:
            extra = {_swap(k, self.quant_aliases): v for k, v in q.items() if isinstance(v, (dict, bool))}
            q = {**q, **{k: v for k, v in extra.items() if k not in q}}
            cfg["quantization"] = q
            if "quantization_config" in cfg:
                cfg["quantization_config"] = q
        if self.hub_spelling:
            if isinstance(cfg.get("vision_config"), dict):
                cfg["vision_config"] = {**cfg["vision_config"], "model_type": cfg["model_type"]}
            rs = cfg.get("rope_scaling")
            if isinstance(rs, dict) and "rope_type" in rs:
                cfg["rope_scaling"] = {"type": rs["rope_type"], **rs}
        if self.text_config is None:
            return cfg
        text = {k: v for k, v in cfg.items() if k not in _VL_TOP or k in _BOTH}
        out = {k: v for k, v in cfg.items() if k in _VL_TOP}
        out["text_config"] = {**text, "model_type": self.text_config}
        return out


class ExpertWriter:
    """Our names -> the tensors ``layout.experts`` writes: `push` a tensor, get back what is
    ready to write (a `Fused` part waits for its partners; a quantized part, or a float one
    whose partner came quantized, is written as it is); `rest` returns what still waits."""

    def __init__(self, layout: "Layout"):
        self.forms = [(re.compile(_MLP + re.escape(p) + "$"), f, i) for f in layout.experts
                      for i, p in enumerate(f.ours if isinstance(f, Fused) else (f.ours,))]
        self.waiting: Dict[Tuple[str, str], Dict[int, Tuple[str, mx.array]]] = {}

    def push(self, name: str, v: mx.array) -> List[Tuple[str, mx.array]]:
        for pat, form, i in self.forms:
            m = pat.match(name)
            if m:
                break
        else:
            return [(name, v)]
        mlp, dense = m.group(1), mx.issubdtype(v.dtype, mx.floating)
        if isinstance(form, PerExpert):
            return [(f"{mlp}.{form.theirs.format(e=e)}", v[e]) for e in range(v.shape[0])] if dense else [(name, v)]
        parts = self.waiting.setdefault((mlp, form.theirs), {})
        if not dense or any(p is None for p in parts.values()):  # one part packed: none fused
            out = [x for x in parts.values() if x is not None] + [(name, v)]
            parts.update({j: None for j in range(len(form.ours))})
            return out
        parts[i] = (name, v)
        if len(parts) < len(form.ours):
            return []
        del self.waiting[(mlp, form.theirs)]
        w = mx.concatenate([parts[j][1] for j in range(len(form.ours))], axis=1)
        return [(f"{mlp}.{form.theirs}", w.swapaxes(1, 2))]

    def rest(self) -> List[Tuple[str, mx.array]]:
        out = [x for parts in self.waiting.values() for x in parts.values() if x is not None]
        self.waiting = {}
        return out


def read_experts(layout: "Layout", weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Undo ``layout.experts`` on our-prefixed names (lazy: slices and stacks)."""
    out = dict(weights)
    for form in layout.experts:
        if isinstance(form, Fused):
            pat = re.compile(_MLP + re.escape(form.theirs) + "$")
            for name in [n for n in out if pat.match(n)]:
                w, mlp, k = out.pop(name), pat.match(name).group(1), len(form.ours)
                if w.ndim != 3 or w.shape[2] % k:
                    raise WeightsError(f"'{name}' has shape {tuple(w.shape)}: expected (experts, in, {k} x out)")
                for p, part in zip(form.ours, mx.split(w.swapaxes(1, 2), k, axis=1)):
                    out[f"{mlp}.{p}"] = part
            continue
        pat = re.compile(_MLP + re.escape(form.theirs).replace(r"\{e\}", r"(\d+)") + "$")
        groups: Dict[str, Dict[int, mx.array]] = {}
        for name in [n for n in out if pat.match(n)]:
            m = pat.match(name)
            groups.setdefault(m.group(1), {})[int(m.group(2))] = out.pop(name)
        for mlp, parts in groups.items():
            if sorted(parts) != list(range(len(parts))):
                missing = sorted(set(range(max(parts) + 1)) - set(parts))
                raise WeightsError(f"experts missing for '{mlp}.{form.ours}': indices {missing[:8]}")
            out[f"{mlp}.{form.ours}"] = mx.stack([parts[e] for e in range(len(parts))])
    return out


def _swap(name: str, prefixes: Prefixes) -> str:
    for a, b in prefixes:
        if name.startswith(a):
            return b + name[len(a):]
    return name


_MLX_VLM_TOWER: Prefixes = (("visual.", "vision_tower."),)
_HF_VL: Prefixes = (("model.", "model.language_model."), ("visual.", "model.visual."))

_HUB_FUSED = (Fused(("switch_mlp.gate_proj.weight", "switch_mlp.up_proj.weight"), "experts.gate_up_proj"),
              Fused(("switch_mlp.down_proj.weight",), "experts.down_proj"))
_PER_EXPERT = tuple(PerExpert(f"switch_mlp.{p}.weight", f"experts.{{e}}.{p}.weight")
                    for p in ("gate_proj", "up_proj", "down_proj"))

LAYOUTS: Dict[str, Layout] = {
    "qwen2_moe": Layout(experts=_PER_EXPERT),
    "qwen3_moe": Layout(experts=_PER_EXPERT),
    "qwen2_vl": Layout(quant_aliases=_MLX_VLM_TOWER, hub_spelling=True),
    "qwen2_5_vl": Layout(quant_aliases=_MLX_VLM_TOWER, hub_spelling=True),
    "qwen3_vl": Layout(_HF_VL, "qwen3_vl_text", _MLX_VLM_TOWER, hub_spelling=True),
    "qwen3_vl_moe": Layout(_HF_VL, "qwen3_vl_moe_text", _MLX_VLM_TOWER, hub_spelling=True, experts=_HUB_FUSED),
}
OURS = Layout()


def layout_of(cfg: dict) -> Layout:
    return LAYOUTS.get(cfg.get("model_type"), OURS)


def read_names(cfg: dict, weights: dict) -> dict:
    """A stamped checkpoint's tensors under our names."""
    lay = layout_of(cfg)
    weights = {lay.read_name(k): v for k, v in weights.items()} if lay.prefixes else weights
    return read_experts(lay, weights) if lay.experts else weights
