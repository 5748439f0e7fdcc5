"""Read a GGUF checkpoint into an HF-style config dict and HF-named MLX weights.

`read_gguf(path)` validates the header with a pure-Python walker first (see
`gguf_header`) and checks every tensor's type and name; the weights come back as a
`GGUFWeights` mapping that reads and decodes a tensor the first time one of its parts is
looked up (plain file reads, a chunk of blocks at a time: `gguf_blocks`). Per GGML type:

- F32, F16, I8, I16, I32, BF16: arrays of that dtype (BF16 from its raw bits).
- Q4_0, Q4_1, Q8_0: MLX affine triplets (`weight` uint32, `scales`, `biases` float16,
  group size 32), bit for bit what `mx.load` gives.
- Q4_K, Q5_0, Q5_1, Q5_K: exact 4/5-bit MLX affine triplets, group 32, float32 scales and
  biases, holding the file's integers (`mx.load` mis-decodes Q4_K and cannot read Q5_*).
- MXFP4, NVFP4: MLX `mxfp4` / `nvfp4` weights (uint8 scales, group 32 / 16), the file's
  bits reordered.
- TQ1_0, TQ2_0: exact 2-bit MLX affine triplets, group 128, float32 scales and biases.
- Q6_K, Q2_K, Q3_K (scale groups of 16 weights, which MLX affine cannot express) and IQ*:
  dequantized exactly to float32, with a `GGUFDequantizedWarning` naming the types and
  counts (Q6_K by our decoder, the rest by `gguf.quants`).
- Types nothing decodes (Q8_1, Q8_K, I64, F64, Q1_0) are refused up front.

Kept packed (Metal / CUDA), these scales and biases stay as read when the model dtype
cannot hold them exactly (float32 or float16 ones in a bfloat16 model: `loader._bound`).

A consumer that pops every key in turn (the converter, `save_checkpoint`) holds one
tensor at a time; `GGUFWeights.layout()` gives every shape and dtype without reading data;
`GGUFWeights.read_all()` (what `load_model` wants) reads everything at once, through one
`mx.load` (MLX's C++ reader) when every type is one it returns exactly as we decode it.

llama.cpp permutes the Q/K rows of `llama` checkpoints into the interleaved RoPE
layout; we undo it so every family uses HF's rotate-half layout.
"""

import os
import re
import warnings
from collections import Counter
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..errors import ConfigError, WeightsError
from .gguf_blocks import DEQUANTIZED, GROUPS_OF_16, KINDS, NEEDS_GGUF, QUANTIZED, TensorLayout, decode, layout
from .gguf_header import GGUFHeader, TensorInfo, read_header

__all__ = ["GGUFCheckpoint", "GGUFDequantizedWarning", "GGUFWeights", "read_gguf", "GGUF_ARCHITECTURES",
           "map_tensor_name"]

# GGUF architecture -> (HF model_type, HF architectures entry)
GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
_MOE = {"qwen2moe", "qwen3moe"}
_PERMUTED_QK = {"llama"}  # archs whose converter interleaves Q/K rows
# GGML types `mx.load` returns bit for bit as our decoders do (it makes BF16 float16)
MX_LOAD_TYPES = frozenset({"F32", "F16", "I8", "I16", "I32", "Q4_0", "Q4_1", "Q8_0"})

# GGUF tensor stem -> HF module path; "{n}" is the block index. Stacked experts
# keep their (E, out, in) layout under mlp.switch_mlp (mlx-lm's SwitchGLU names).
_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{n}.attn_norm": "model.layers.{n}.input_layernorm",
    "blk.{n}.attn_q": "model.layers.{n}.self_attn.q_proj",
    "blk.{n}.attn_k": "model.layers.{n}.self_attn.k_proj",
    "blk.{n}.attn_v": "model.layers.{n}.self_attn.v_proj",
    "blk.{n}.attn_output": "model.layers.{n}.self_attn.o_proj",
    "blk.{n}.attn_q_norm": "model.layers.{n}.self_attn.q_norm",
    "blk.{n}.attn_k_norm": "model.layers.{n}.self_attn.k_norm",
    "blk.{n}.ffn_norm": "model.layers.{n}.post_attention_layernorm",
    "blk.{n}.ffn_gate": "model.layers.{n}.mlp.gate_proj",
    "blk.{n}.ffn_up": "model.layers.{n}.mlp.up_proj",
    "blk.{n}.ffn_down": "model.layers.{n}.mlp.down_proj",
    "blk.{n}.ffn_gate_inp": "model.layers.{n}.mlp.gate",
    "blk.{n}.ffn_gate_exps": "model.layers.{n}.mlp.switch_mlp.gate_proj",
    "blk.{n}.ffn_up_exps": "model.layers.{n}.mlp.switch_mlp.up_proj",
    "blk.{n}.ffn_down_exps": "model.layers.{n}.mlp.switch_mlp.down_proj",
    "blk.{n}.ffn_gate_inp_shexp": "model.layers.{n}.mlp.shared_expert_gate",
    "blk.{n}.ffn_gate_shexp": "model.layers.{n}.mlp.shared_expert.gate_proj",
    "blk.{n}.ffn_up_shexp": "model.layers.{n}.mlp.shared_expert.up_proj",
    "blk.{n}.ffn_down_shexp": "model.layers.{n}.mlp.shared_expert.down_proj",
}
_RULES = [
    (
        re.compile("^" + re.escape(k).replace(r"\{n\}", r"(?P<n>\d+)") + r"\.(?P<s>weight|bias|scales|biases)$"),
        v,
    )
    for k, v in _NAMES.items()
]


class GGUFDequantizedWarning(UserWarning):
    """Tensors of GGML types MLX has no kernel for were dequantized to float32."""


@dataclass
class GGUFCheckpoint:
    config: Dict[str, Any]  # HF config.json-style dict
    weights: "GGUFWeights"  # HF names; quantized tensors as (weight, scales, biases)
    metadata: Dict[str, Any]  # raw GGUF metadata as Python values (str, int, float, bool, list)
    path: Path


def map_tensor_name(name: str) -> Optional[str]:
    """HF name of a GGUF tensor (or of an MLX `.scales`/`.biases` part); None if unmapped."""
    for rx, tmpl in _RULES:
        m = rx.match(name)
        if m:
            return tmpl.replace("{n}", m.groupdict().get("n") or "") + "." + m["s"]
    return None


def read_gguf(path) -> GGUFCheckpoint:
    """Header, config and a lazy `GGUFWeights`; every check that needs no tensor data
    (types, names, Q/K head counts, the gguf package where needed) happens here."""
    path = Path(path)
    header = read_header(path)
    config = gguf_config(header)
    _check_types(header)
    weights = GGUFWeights(header, _qk_heads(header, config))
    quant = _quantization(header)
    if quant:
        config["quantization"] = quant
    _warn_dequantized(header)
    return GGUFCheckpoint(config, weights, header.metadata, path)


# ----------------------------------------------------------------- config


def gguf_config(header: GGUFHeader) -> Dict[str, Any]:
    """HF config.json-style dict from GGUF metadata (keys as transformers' GGUF loader)."""
    meta, path = header.metadata, header.path
    arch = meta.get("general.architecture")
    if arch is None:
        raise ConfigError(f"GGUF file {path} lacks required metadata key 'general.architecture'")
    if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
        known = ", ".join(sorted(GGUF_ARCHITECTURES))
        raise ConfigError(f"GGUF file {path}: unsupported architecture '{arch}' (supported: {known})")
    model_type, hf_arch = GGUF_ARCHITECTURES[arch]
    req = object()

    def get(key, default=req, kind=int):
        full = f"{arch}.{key}"
        if full not in meta:
            if default is req:
                raise ConfigError(f"GGUF file {path} lacks required metadata key '{full}'")
            return default
        v = meta[full]
        if not isinstance(v, (int, float)) or (kind is int and isinstance(v, float)):
            raise ConfigError(f"GGUF file {path}: metadata key '{full}' is {v!r}, expected one {kind.__name__}")
        return kind(v)

    if "token_embd.weight" not in header.tensors:
        raise WeightsError(f"GGUF file {path} has no tensor 'token_embd.weight'")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    if heads <= 0:
        raise ConfigError(f"GGUF file {path}: '{arch}.attention.head_count' is {heads}")
    head_dim = get("attention.key_length", get("rope.dimension_count", hidden // heads))
    cfg: Dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_arch],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", kind=float),
        "rope_theta": get("rope.freq_base", 10000.0, float),
        "max_position_embeddings": get("context_length"),
        "vocab_size": header.tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "hidden_act": "silu",
        "rope_scaling": _rope_scaling(meta, arch, path, get),
    }
    has_qbias = "blk.0.attn_q.bias" in header.tensors
    if arch == "llama":
        cfg.update(attention_bias=has_qbias, mlp_bias=False)
    elif arch in ("qwen3", "qwen3moe"):
        cfg["attention_bias"] = has_qbias
    if arch in _MOE:
        moe_ff = get("expert_feed_forward_length")
        cfg.update(
            num_experts=get("expert_count"),
            num_experts_per_tok=get("expert_used_count"),
            moe_intermediate_size=moe_ff,
            intermediate_size=get("feed_forward_length", moe_ff),
            # llama.cpp renormalises the top-k weights for qwen3moe, not for qwen2moe
            norm_topk_prob=arch == "qwen3moe",
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        if arch == "qwen2moe":
            cfg["shared_expert_intermediate_size"] = get("expert_shared_feed_forward_length")
    else:
        cfg["intermediate_size"] = get("feed_forward_length")
    for tok in ("bos", "eos"):
        if isinstance(meta.get(f"tokenizer.ggml.{tok}_token_id"), int):
            cfg[f"{tok}_token_id"] = meta[f"tokenizer.ggml.{tok}_token_id"]
    return cfg


def _rope_scaling(meta, arch, path, get) -> Optional[Dict[str, Any]]:
    """`{arch}.rope.scaling.*` -> HF rope_scaling (linear, yarn); None when unscaled."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    linear = get("rope.scale_linear", 1.0, float)  # older files
    if kind is None and linear != 1.0:
        return {"rope_type": "linear", "type": "linear", "factor": linear}
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise ConfigError(f"GGUF file {path}: unsupported RoPE scaling type {kind!r} ('{arch}.rope.scaling.type')")
    rs = {"rope_type": kind, "type": kind, "factor": get("rope.scaling.factor", kind=float)}
    orig = get("rope.scaling.original_context_length", None)
    if orig is not None:
        rs["original_max_position_embeddings"] = orig
    for k in ("beta_fast", "beta_slow"):
        v = get("rope.scaling.yarn_" + k, None, float)
        if v is not None:
            rs[k] = v
    return rs


def _quantization(header: GGUFHeader) -> Optional[Dict[str, Any]]:
    """mlx-lm style quantization config: the most common (bits, group size, mode), plus
    per-module overrides (with a mode where it is not affine)."""
    specs = {}
    for t in header.tensors.values():
        k = QUANTIZED.get(t.type_name)
        if k:
            specs[map_tensor_name(t.name).rsplit(".", 1)[0]] = (k.bits, k.group, k.mode)
    if not specs:
        return None
    common = Counter(specs.values()).most_common(1)[0][0]
    q: Dict[str, Any] = {"group_size": common[1], "bits": common[0], "mode": common[2]}
    for m, (bits, group, mode) in sorted(specs.items()):
        if (bits, group, mode) != common:
            q[m] = {"group_size": group, "bits": bits, **({"mode": mode} if mode != "affine" else {})}
    return q


# ---------------------------------------------------------------- tensors


def _check_types(header: GGUFHeader) -> None:
    for t in header.tensors.values():
        if t.type_name not in KINDS:
            raise WeightsError(
                f"GGUF file {header.path}: tensor '{t.name}' has GGML type {t.type_name}, which qwen_mlx "
                f"cannot read (readable: {', '.join(sorted(KINDS))})"
            )
        if map_tensor_name(t.name) is None:
            raise WeightsError(f"GGUF file {header.path}: tensor '{t.name}' has no known Hugging Face name")
    t = next((t for t in header.tensors.values() if t.type_name in NEEDS_GGUF), None)
    if t is not None:
        try:
            from gguf import quants  # noqa: F401
        except ImportError:
            raise WeightsError(f"GGUF file {header.path}: tensor '{t.name}' has GGML type {t.type_name}; "
                               f"dequantizing it needs the 'gguf' package (pip install gguf)") from None


def _warn_dequantized(header: GGUFHeader) -> None:
    dense = Counter(t.type_name for t in header.tensors.values() if t.type_name in DEQUANTIZED)
    if not dense:
        return
    kinds = ", ".join(f"{k} x{n}" for k, n in sorted(dense.items()))
    why = []
    g16 = sorted(GROUPS_OF_16 & set(dense))
    if g16:
        why.append(f"{'/'.join(g16)} scale groups of 16 weights, which MLX affine quantization (groups of "
                   f"32, 64 or 128) cannot express")
    other = sorted(set(dense) - GROUPS_OF_16)
    if other:
        why.append(f"MLX has no kernel for {'/'.join(other)}")
    warnings.warn(
        f"GGUF file {header.path}: {sum(dense.values())} tensor(s) dequantized to float32 ({kinds}): "
        f"{'; '.join(why)}; they take 4 bytes per weight in memory",
        GGUFDequantizedWarning, stacklevel=3)


def _qk_heads(header: GGUFHeader, config: Dict[str, Any]) -> Dict[str, int]:
    """GGUF Q/K tensor -> its head count, for archs whose rows llama.cpp interleaved."""
    if header.metadata["general.architecture"] not in _PERMUTED_QK:
        return {}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for t in header.tensors.values():
        m = re.match(r"^blk\.\d+\.(attn_[qk])\.", t.name)
        if not m:
            continue
        n_head, rows = heads[m[1]], t.shape[0]
        if rows % (2 * n_head):
            raise WeightsError(f"GGUF file {header.path}: tensor '{t.name}' has shape {t.shape}; its rows are not "
                               f"a multiple of 2 x {n_head} heads")
        out[t.name] = n_head
    return out


def _unpermute_index(rows: int, n_head: int) -> np.ndarray:
    """Rows that undo llama.cpp's Q/K interleave: per head, rows (d, 2) -> HF's (2, d)."""
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(0, 2, 1).reshape(-1)


class GGUFWeights(MutableMapping):
    """HF-named weights of a GGUF file, read and decoded tensor by tensor.

    The keys are known from the header. Looking up any part of a tensor (``weight``,
    ``scales``, ``biases``) reads and decodes that tensor and caches its parts; `pop` and
    ``del`` forget them. So a plain dict-like use (the loader) decodes each tensor once,
    and popping every key in turn (the converter) holds one tensor at a time.
    `layout()`: every key's shape and dtype, from the header alone.
    """

    def __init__(self, header: GGUFHeader, qk_heads: Optional[Dict[str, int]] = None):
        self.header, self.path, self.qk_heads = header, header.path, qk_heads or {}
        self._src: Dict[str, Tuple[Optional[TensorInfo], str]] = {}  # key -> (tensor, part)
        self._keys: Dict[str, list] = {}  # tensor name -> its keys
        for t in header.tensors.values():
            stem = t.name[: -len(".weight")] if t.name.endswith(".weight") else t.name
            for part, _, _ in KINDS[t.type_name].parts:
                k = map_tensor_name(t.name if part == "weight" else f"{stem}.{part}")
                if k in self._src:
                    raise WeightsError(f"GGUF file {self.path}: tensors '{self._src[k][0].name}' and '{t.name}' "
                                       f"both map to '{k}'")
                self._src[k] = (t, part)
                self._keys.setdefault(t.name, []).append(k)
        self._cache: Dict[str, mx.array] = {}

    @staticmethod
    def _shape(t: TensorInfo, lay: TensorLayout) -> TensorLayout:
        if t.name.endswith("ffn_gate_inp_shexp.weight") and len(t.shape) == 1:
            return TensorLayout((1, *lay.shape), lay.dtype)  # HF: Linear(hidden, 1)
        return lay

    def layout(self) -> Dict[str, TensorLayout]:
        out, lays = {}, {}
        for k, (t, part) in self._src.items():
            if t is None:
                v = self._cache[k]
                out[k] = TensorLayout(tuple(v.shape), v.dtype)
                continue
            if t.name not in lays:
                lays[t.name] = layout(t)
            out[k] = self._shape(t, lays[t.name][part])
        return out

    def _read(self, t: TensorInfo) -> Dict[str, mx.array]:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if t.offset + t.nbytes > size:
                    raise self._truncated(t, size)
                parts = decode(f, t, self.path)
        except OSError as e:
            raise WeightsError(f"cannot read tensor '{t.name}' from GGUF file {self.path}: {e}") from None
        return self._finish(t, parts)

    def _truncated(self, t: TensorInfo, size: int) -> WeightsError:
        return WeightsError(f"GGUF file {self.path} is truncated (changed since it was opened?): tensor "
                            f"'{t.name}' needs bytes up to {t.offset + t.nbytes} but file has {size}")

    def _finish(self, t: TensorInfo, parts: Dict[str, mx.array]) -> Dict[str, mx.array]:
        n_head = self.qk_heads.get(t.name)
        if n_head:
            idx = mx.array(_unpermute_index(t.shape[0], n_head))
            parts = {p: mx.take(v, idx, axis=0) for p, v in parts.items()}
        if t.name.endswith("ffn_gate_inp_shexp.weight") and len(t.shape) == 1:
            parts = {p: v[None] for p, v in parts.items()}  # HF: Linear(hidden, 1)
        return parts

    def _store(self, t: TensorInfo, parts: Dict[str, mx.array]) -> None:
        for k in self._keys[t.name]:
            if self._src.get(k, (None,))[0] is t:  # not popped or replaced
                self._cache[k] = parts[self._src[k][1]]

    def __getitem__(self, key: str) -> mx.array:
        if key in self._cache:
            return self._cache[key]
        t, _ = self._src[key]  # KeyError for unknown keys
        self._store(t, self._read(t))
        return self._cache[key]

    def read_all(self) -> "GGUFWeights":
        """Read every tensor not read yet, for a consumer that wants them all (`load_model`).
        When all of them have types `mx.load` returns exactly as our decoders do
        (`MX_LOAD_TYPES`) and they are most of the file, one `mx.load` (MLX's C++ reader)
        reads them; otherwise, if it fails, and for any tensor it returns otherwise than
        `layout()` says, they are decoded tensor by tensor."""
        todo = {t.name: t for k, (t, _) in self._src.items() if t is not None and k not in self._cache}
        tensors = self.header.tensors.values()
        raw = {}
        if todo and all(t.type_name in MX_LOAD_TYPES for t in todo.values()) and \
                2 * sum(t.nbytes for t in todo.values()) >= sum(t.nbytes for t in tensors):
            size, last = os.stat(self.path).st_size, max(tensors, key=lambda t: t.offset + t.nbytes)
            if last.offset + last.nbytes > size:
                raise self._truncated(last, size)
            try:
                raw = mx.load(str(self.path))
            except (RuntimeError, ValueError, OSError):
                pass  # the per-tensor reads below say what is wrong, naming the tensor
        for t in todo.values():
            lay, stem = layout(t), t.name[: -len(".weight")] if t.name.endswith(".weight") else t.name
            parts = {p: raw.pop(t.name if p == "weight" else f"{stem}.{p}", None) for p in lay}
            if all(v is not None and (tuple(v.shape), v.dtype) == (want.shape, want.dtype)
                   for v, want in zip(parts.values(), lay.values())):
                self._store(t, self._finish(t, parts))
            else:
                self._store(t, self._read(t))
        return self

    def __setitem__(self, key: str, value: mx.array) -> None:
        self._src[key] = (None, "weight")
        self._cache[key] = value

    def __delitem__(self, key: str) -> None:
        del self._src[key]
        self._cache.pop(key, None)

    def __contains__(self, key) -> bool:
        return key in self._src

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._src))

    def __len__(self) -> int:
        return len(self._src)

    def __repr__(self) -> str:
        return f"GGUFWeights({self.path}, {len(self)} tensors, {len(self._cache)} decoded)"
