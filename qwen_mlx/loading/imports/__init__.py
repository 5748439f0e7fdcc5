"""Lossless imports of GPU-quantized Hugging Face checkpoints (GPTQ, AWQ, FP8).

`import_quantized(config, weights)` reads ``config["quantization_config"]["quant_method"]``
and returns a new (config, weights) pair in the layout `load_checkpoint` and
`model_from_checkpoint` read: packed modules become MLX triplets
(``<path>.weight`` uint32 packed along the input, ``.scales``, ``.biases``;
w = scales * q + biases) holding the checkpoint's own integers, described by an mlx-lm
style ``quantization`` block (the common bits / group size / mode, plus per-module entries
where a module differs); FP8 weights become mxfp8 where that is exact, else exact float32.
A ``quantization_config`` without ``quant_method`` (mlx-lm writes one mirroring its
``quantization`` block) passes through untouched.

>>> cfg, weights = import_quantized(cfg, weights)   # cfg["quantization"] == {"group_size": 128, "bits": 4, ...}
"""

from dataclasses import dataclass
from functools import partial
from typing import Dict, Tuple, Union

import mlx.core as mx

from ...errors import ConfigError, QwenMLXError
from ...quant.spec import QuantSpec
from .awq import import_awq
from .common import quantization_block
from .fp8 import import_fp8
from .gptq import import_gptq

__all__ = ["ImportOptions", "import_quantized", "METHODS"]

METHODS = ("gptq", "awq", "fp8")


@dataclass
class ImportOptions:
    fp8: Union[str, QuantSpec] = "auto"  # "auto" (mxfp8 where exact, else float32), "dense", or a QuantSpec


def import_quantized(cfg: dict, weights: Dict[str, mx.array], options: ImportOptions = None,
                     where: str = "checkpoint") -> Tuple[dict, Dict[str, mx.array]]:
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") is None:
        return cfg, weights
    options = options or ImportOptions()
    method = str(qc["quant_method"]).lower()
    importers = {"gptq": import_gptq, "awq": import_awq, "fp8": partial(import_fp8, mode=options.fp8)}
    if method not in importers:
        raise ConfigError(
            f"{where}: quantization_config.quant_method '{qc['quant_method']}' is not supported "
            f"(supported: {', '.join(METHODS)}; or an MLX / mlx-lm quantized checkpoint)")
    from ...registry import get_family

    rules = getattr(get_family(cfg["model_type"]), "REMAP", None) if "model_type" in cfg else None
    try:
        weights, layouts = importers[method](qc, weights)
        q = quantization_block(layouts, rules)
    except QwenMLXError as e:
        raise type(e)(f"{where}: {e}") from None
    cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "quantization")}
    if q:
        cfg["quantization"] = q
    return cfg, weights
