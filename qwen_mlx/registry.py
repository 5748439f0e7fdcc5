"""Explicit registry: ``model_type -> family module``.

A family module defines ``Model`` (an ``nn.Module``), ``ModelArgs`` with
``from_config(dict)``, and ``CAPABILITIES`` (a set of strings such as "text", "moe").
"""

import importlib
from types import ModuleType
from typing import Dict

from .errors import ConfigError

REGISTRY: Dict[str, str] = {
    "llama": "qwen_mlx.models.llama",
    "qwen2": "qwen_mlx.models.qwen2",
    "qwen2_moe": "qwen_mlx.models.qwen2_moe",
    "qwen3": "qwen_mlx.models.qwen3",
    "qwen3_moe": "qwen_mlx.models.qwen3_moe",
    "qwen2_vl": "qwen_mlx.models.qwen2_vl",
    "qwen2_5_vl": "qwen_mlx.models.qwen2_5_vl",
    "qwen3_vl": "qwen_mlx.models.qwen3_vl",
    "qwen3_vl_moe": "qwen_mlx.models.qwen3_vl_moe",
}


def get_family(model_type: str) -> ModuleType:
    if model_type not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"unknown model_type '{model_type}' (supported: {known})")
    return importlib.import_module(REGISTRY[model_type])


def model_types():
    return sorted(REGISTRY)
