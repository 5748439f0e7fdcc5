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
  (5.x: ``qwen3_vl_vision``) and ``rope_scaling`` has ``type`` beside ``rope_type``.

Qwen3-VL(-MoE) are written as transformers names them (``model.language_model.*``,
``model.visual.*``, ``lm_head.*``) with the hub's nested config (4.57 rope keys), which is
what mlx-vlm 0.7.10 reads for that family; MoE experts stay in mlx-lm's
``switch_mlp.{gate,up,down}_proj`` form, the one that holds quantized experts. mlx-vlm reads
Qwen2(.5)-VL only in the 4.x hub layout (flat, ``model.*`` / ``visual.*``), which is ours.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

Prefixes = Tuple[Tuple[str, str], ...]

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


def _swap(name: str, prefixes: Prefixes) -> str:
    for a, b in prefixes:
        if name.startswith(a):
            return b + name[len(a):]
    return name


_MLX_VLM_TOWER: Prefixes = (("visual.", "vision_tower."),)
_HF_VL: Prefixes = (("model.", "model.language_model."), ("visual.", "model.visual."))

LAYOUTS: Dict[str, Layout] = {
    "qwen2_vl": Layout(quant_aliases=_MLX_VLM_TOWER, hub_spelling=True),
    "qwen2_5_vl": Layout(quant_aliases=_MLX_VLM_TOWER, hub_spelling=True),
    "qwen3_vl": Layout(_HF_VL, "qwen3_vl_text", _MLX_VLM_TOWER, hub_spelling=True),
    "qwen3_vl_moe": Layout(_HF_VL, "qwen3_vl_moe_text", _MLX_VLM_TOWER, hub_spelling=True),
}
OURS = Layout()


def layout_of(cfg: dict) -> Layout:
    return LAYOUTS.get(cfg.get("model_type"), OURS)


def read_names(cfg: dict, weights: dict) -> dict:
    """A stamped checkpoint's tensors under our names."""
    lay = layout_of(cfg)
    return {lay.read_name(k): v for k, v in weights.items()} if lay.prefixes else weights
