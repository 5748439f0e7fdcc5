"""Rotary embeddings for the text decoder.

Standard, linear, dynamic-NTK, yarn and llama3 scaling come from mlx-lm's
`initialize_rope` (same formulas as transformers' ROPE_INIT_FUNCTIONS); we only
translate the normalised HF ``rope_scaling`` dict.
"""

from typing import Optional

from mlx_lm.models.rope_utils import initialize_rope

from ..errors import ConfigError

SUPPORTED = {"default", "linear", "dynamic", "yarn", "llama3"}


def make_rope(head_dim: int, theta: float, scaling: Optional[dict], max_position_embeddings: int):
    rtype = (scaling or {}).get("rope_type", "default")
    if rtype not in SUPPORTED:
        raise ConfigError(f"unsupported rope_scaling type '{rtype}' (supported: {sorted(SUPPORTED)})")
    if rtype == "default":
        scaling = None
    else:
        scaling = dict(scaling)
        scaling["type"] = rtype
        if rtype == "yarn":
            scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    return initialize_rope(head_dim, theta, False, scaling, max_position_embeddings)
