"""`qwen-mlx info`: architecture, parameter counts, bits and a memory estimate,
read from shapes alone (a GGUF file's header, a checkpoint's lazy arrays: no weight data
is read)."""

from collections import Counter
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .loading.loader import build_model, load_checkpoint, quant_layout, resolve_model_path
from .registry import get_family


def _bytes_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def checkpoint_info(path_or_id) -> dict:
    path = resolve_model_path(path_or_id)
    ck = load_checkpoint(path)
    cfg = ck.config
    layout = getattr(ck.weights, "layout", None)  # a GGUF file: shapes and dtypes from its header
    w = layout() if layout else ck.weights
    model = build_model(cfg)  # parameters stay unevaluated
    a = model.args
    logical = dict(tree_flatten(model.parameters()))
    total = sum(v.size for v in logical.values())
    expert = sum(v.size for k, v in logical.items() if ".switch_mlp." in k)
    active = total - expert + (expert * a.num_experts_per_tok // a.num_experts if a.num_experts else 0)
    kinds = Counter()
    stored = 0
    for k, v in w.items():
        stored += v.nbytes
        base, leaf = k.rsplit(".", 1)
        packed = base + ".weight" in w and w[base + ".weight"].dtype == mx.uint32 and base + ".scales" in w
        if leaf in ("scales", "biases") and packed:
            continue
        if leaf == "weight" and packed and k in logical:
            q = quant_layout(cfg, base, v, w[base + ".scales"], logical[k].shape[-1], w.get(base + ".biases"))
            kinds[f"{q['bits']}-bit" if q["mode"] == "affine" else q["mode"]] += logical[k].size
        else:
            kinds[str(v.dtype).replace("mlx.core.", "")] += v.size
    kv_per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim
    return {
        "path": str(path),
        "model_type": cfg["model_type"],
        "capabilities": sorted(get_family(cfg["model_type"]).CAPABILITIES),
        "layers": a.num_hidden_layers,
        "hidden_size": a.hidden_size,
        "heads": f"{a.num_attention_heads} q / {a.num_key_value_heads} kv x {a.head_dim}",
        "vocab_size": a.vocab_size,
        "context_length": a.max_position_embeddings,
        "experts": f"{a.num_experts} (top {a.num_experts_per_tok})" if a.num_experts else None,
        "parameters": total,
        "active_parameters": active,
        "weights": {k: round(v / total, 4) for k, v in kinds.most_common()},
        "bits_per_weight": round(8 * stored / total, 2),
        "disk_bytes": _bytes_on_disk(path),
        "memory": {
            "weights_as_stored_gb": round(stored / 1e9, 3),
            "weights_float32_gb": round(4 * total / 1e9, 3),
            "kv_cache_gb_per_1k_tokens_fp16": round(2 * kv_per_token * 1024 / 1e9, 4),
        },
    }


def model_info(model, path) -> dict:
    return checkpoint_info(path)
