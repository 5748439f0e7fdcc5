"""Reading HF config.json files into one normalised form.

transformers 4.x writes ``rope_theta`` / ``rope_scaling``; 5.x writes
``rope_parameters: {rope_theta, rope_type, ...}`` and may say ``num_local_experts``.
`normalize_config` folds both layouts into the 4.x keys so models read one form.

Vision-language configs nest the language model in ``text_config`` (5.x, and Qwen3-VL on the
hub) or keep its keys at the top level (4.x hub Qwen2-VL / Qwen2.5-VL); `fold_text_config`
lifts a nested ``text_config`` to the top level, so every layout reads as the flat one.
"""

import json
from pathlib import Path
from typing import Any, Dict

from .errors import ConfigError

FORMAT_VERSION = 3  # "qwen_mlx_format" stamp (2: Qwen3-VL written in transformers names; 3: float MoE experts
# in the hub layout: fused for Qwen3-VL-MoE, per expert for Qwen2/3-MoE; loading/layouts.py)

_ALIASES = {"num_local_experts": "num_experts"}
VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# transformers 5.23: a tied text_config ties a Qwen2(.5)-VL model; Qwen3-VL reads only the top level
_TIE_FROM_TEXT = ("qwen2_vl", "qwen2_5_vl")


def fold_text_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """A VL config with ``text_config`` -> the flat layout: text keys at the top level (they
    win over top-level duplicates, except ``model_type``), ``vision_config`` kept nested,
    ``tie_word_embeddings`` resolved as transformers does. Other configs pass unchanged."""
    text = cfg.get("text_config")
    if cfg.get("model_type") not in VL_TYPES or not isinstance(text, dict):
        return cfg
    top = {k: v for k, v in cfg.items() if k != "text_config"}
    out = {**top, **{k: v for k, v in text.items() if k not in ("model_type", "architectures")}}
    tie = bool(top.get("tie_word_embeddings", False))
    if cfg["model_type"] in _TIE_FROM_TEXT:
        tie = tie or bool(text.get("tie_word_embeddings", False))
    out["tie_word_embeddings"] = tie
    return out


def normalize_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    cfg = fold_text_config(dict(cfg))
    for old, new in _ALIASES.items():
        if old in cfg and new not in cfg:
            cfg[new] = cfg[old]
    rp = cfg.pop("rope_parameters", None)
    if isinstance(rp, dict):
        if "full_attention" in rp and isinstance(rp["full_attention"], dict):
            rp = rp["full_attention"]  # per-layer-type layout; text families use one
        rp = dict(rp)
        if "rope_theta" in rp:
            cfg.setdefault("rope_theta", rp.pop("rope_theta"))
        rtype = rp.get("rope_type", rp.get("type", "default"))
        if rtype != "default" or len(rp) > 1:
            if rtype != "default" and cfg.get("rope_scaling") is None:
                cfg["rope_scaling"] = rp
            elif "mrope_section" in rp and cfg.get("rope_scaling") is None:
                cfg["rope_scaling"] = rp
        if "partial_rotary_factor" in rp:
            cfg.setdefault("partial_rotary_factor", rp["partial_rotary_factor"])
    rs = cfg.get("rope_scaling")
    if isinstance(rs, dict):
        rs = dict(rs)
        if "type" in rs and "rope_type" not in rs:
            rs["rope_type"] = rs["type"]
        cfg["rope_scaling"] = rs
    return cfg


def read_json(path: Path, what: str = "file") -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} is not a JSON object")
    return data


def load_config(model_dir: Path) -> Dict[str, Any]:
    cfg = read_json(Path(model_dir) / "config.json", "config.json")
    if not cfg.get("model_type"):
        raise ConfigError(f"{Path(model_dir) / 'config.json'} has no 'model_type'")
    return normalize_config(cfg)


def require(cfg: Dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise ConfigError(
            f"config for model_type '{cfg.get('model_type')}' lacks required keys: {', '.join(missing)}"
        )
