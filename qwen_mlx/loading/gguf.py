"""Read a GGUF checkpoint into an HF-style config dict and HF-named MLX weights.

`read_gguf(path)` validates the header with a pure-Python walker first (see
`gguf_header`), then reads the tensors. Per GGML type:

- F32, F16, I8, I16, I32: plain arrays of that dtype; BF16 re-read from its raw bits
  (`mx.load` converts it to float16, which overflows past 65504).
- Q4_0, Q4_1, Q8_0: kept as MLX affine triplets (`weight` uint32, `scales`, `biases`
  float16, group size 32, 4/4/8 bits), exactly as `mx.load` returns them.
- Q4_K: rebuilt from the raw blocks as an exact 4-bit triplet with float32 scales/biases
  (`mx.load` decodes it wrongly: the odd 32-element sub-blocks reuse the even ones' scale).
- Everything else MLX has no kernel for is dequantized exactly to float32, with a
  `GGUFDequantizedWarning` naming the types and tensor counts: Q6_K by our own decoder,
  Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, IQ*, TQ*, MXFP4 and NVFP4 by the `gguf` package's
  `gguf.quants.dequantize` (llama.cpp's reference decoders in numpy).
- Types nothing decodes (Q8_1, Q8_K, I64, F64, Q1_0) are refused up front.

`mx.load` reads a whole file or fails on the first type it does not know, so it is used
only when every tensor has a type it reads; otherwise Q4_0/Q4_1/Q8_0 blocks and plain
tensors are decoded here (bit for bit what `mx.load` gives, tested).

llama.cpp permutes the Q/K rows of `llama` checkpoints into the interleaved RoPE
layout; we undo it so every family uses HF's rotate-half layout.
"""

import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import mlx.core as mx
import numpy as np

from ..errors import ConfigError, WeightsError
from .gguf_header import GGUFHeader, TensorInfo, read_header

__all__ = ["GGUFCheckpoint", "GGUFDequantizedWarning", "read_gguf", "GGUF_ARCHITECTURES", "map_tensor_name"]

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

# GGML types mx.load reads (or that we repair); a file with any other type makes it fail.
_MX_READABLE = {"F32", "F16", "BF16", "I8", "I16", "I32", "Q4_0", "Q4_1", "Q8_0", "Q2_K", "Q4_K", "Q6_K"}
_PLAIN = {"F32": "<f4", "F16": "<f2", "I8": "i1", "I16": "<i2", "I32": "<i4"}
_QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8, "Q4_K": 4}  # kept as MLX triplets
# dequantized to float32 by gguf.quants.dequantize (Q6_K by our own exact decoder)
_DEQUANTIZED = {"Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
                "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4"}
_READABLE = set(_PLAIN) | {"BF16", "Q6_K"} | set(_QUANT_BITS) | _DEQUANTIZED
GROUP_SIZE = 32


class GGUFDequantizedWarning(UserWarning):
    """Tensors of GGML types MLX has no kernel for were dequantized to float32."""


@dataclass
class GGUFCheckpoint:
    config: Dict[str, Any]  # HF config.json-style dict
    weights: Dict[str, mx.array]  # HF names; quantized tensors as (weight, scales, biases)
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
    path = Path(path)
    header = read_header(path)
    config = gguf_config(header)
    _check_types(header)
    weights = _load(header)
    if header.metadata["general.architecture"] in _PERMUTED_QK:
        _unpermute_qk(weights, config, path)
    quant = _quantization(header)
    if quant:
        config["quantization"] = quant
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
    """mlx-lm style quantization config: the common bits, plus per-module overrides."""
    bits = {}
    for t in header.tensors.values():
        if t.type_name in _QUANT_BITS:
            bits[map_tensor_name(t.name).rsplit(".", 1)[0]] = _QUANT_BITS[t.type_name]
    if not bits:
        return None
    common = Counter(bits.values()).most_common(1)[0][0]
    q: Dict[str, Any] = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
    q.update({m: {"group_size": GROUP_SIZE, "bits": b} for m, b in sorted(bits.items()) if b != common})
    return q


# ---------------------------------------------------------------- tensors


def _check_types(header: GGUFHeader) -> None:
    for t in header.tensors.values():
        if t.type_name not in _READABLE:
            raise WeightsError(
                f"GGUF file {header.path}: tensor '{t.name}' has GGML type {t.type_name}, which qwen_mlx "
                f"cannot read (readable: {', '.join(sorted(_READABLE))})"
            )
        if map_tensor_name(t.name) is None:
            raise WeightsError(f"GGUF file {header.path}: tensor '{t.name}' has no known Hugging Face name")


def _load(header: GGUFHeader) -> Dict[str, mx.array]:
    path = header.path
    raw = None
    if all(t.type_name in _MX_READABLE for t in header.tensors.values()):
        try:
            raw = mx.load(str(path))
        except (RuntimeError, ValueError, OSError) as e:
            raise WeightsError(f"cannot read GGUF file {path}: {e}") from None
    data = np.memmap(path, np.uint8, mode="r")
    out: Dict[str, mx.array] = {}
    dense = Counter()
    for t in header.tensors.values():
        stem = t.name[: -len(".weight")] if t.name.endswith(".weight") else t.name
        names = (t.name, f"{stem}.scales", f"{stem}.biases")
        blocks = data[t.offset : t.offset + t.nbytes]
        if t.type_name == "Q4_K":
            parts = dict(zip(names, _q4k_triplet(blocks, t)))
        elif t.type_name == "BF16":
            parts = {t.name: mx.array(blocks.view("<u2").reshape(t.shape)).view(mx.bfloat16)}
        elif raw is not None and t.type_name in {*_PLAIN, *_QUANT_BITS}:
            parts = _from_mx_load(raw, t, names, path)
        elif t.type_name in _PLAIN:
            parts = {t.name: mx.array(blocks.view(_PLAIN[t.type_name]).reshape(t.shape))}
        elif t.type_name in _QUANT_BITS:
            parts = dict(zip(names, _q80_triplet(blocks, t) if t.type_name == "Q8_0" else _q4x_triplet(blocks, t)))
        else:
            dense[t.type_name] += 1
            x = _q6k_dense(blocks, t) if t.type_name == "Q6_K" else _gguf_dequantize(blocks, t, path)
            parts = {t.name: x}
        for k, v in parts.items():
            out[map_tensor_name(k)] = v
        if stem.endswith("ffn_gate_inp_shexp") and parts[t.name].ndim == 1:
            out[map_tensor_name(t.name)] = parts[t.name][None]  # HF: Linear(hidden, 1)
    if dense:
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(dense.items()))
        warnings.warn(
            f"GGUF file {path}: {sum(dense.values())} tensor(s) dequantized to float32 because MLX has no "
            f"kernel for their GGML types ({kinds}); they take 4 bytes per weight in memory",
            GGUFDequantizedWarning, stacklevel=3)
    return out


def _from_mx_load(raw: Dict[str, mx.array], t: TensorInfo, names, path: Path) -> Dict[str, mx.array]:
    keys = names if t.type_name in _QUANT_BITS else names[:1]
    for k in keys:
        if k not in raw:
            raise WeightsError(f"GGUF file {path}: MLX returned no {k.rsplit('.', 1)[1]} for tensor '{t.name}' ({t.type_name})")
    return {k: raw.pop(k) for k in keys}


def _pack_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Weights (..., 16) ``lo`` then (..., 16) ``hi`` (4-bit) -> MLX's (..., 4) uint32 words:
    8 nibbles per little-endian word, the first weight in the low nibble."""
    return np.ascontiguousarray(np.concatenate(
        [lo[..., 0::2] | (lo[..., 1::2] << 4), hi[..., 0::2] | (hi[..., 1::2] << 4)], axis=-1)).view("<u4")


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2")[..., 0]


def _q4x_triplet(blocks: np.ndarray, t: TensorInfo):
    """Q4_0 (d, 16 bytes: w = d*(q - 8)) or Q4_1 (d, m, 16 bytes: w = d*q + m) blocks of 32
    -> MLX 4-bit triplet with float16 scales/biases; byte j holds weight j (low nibble) and
    weight j + 16 (high nibble)."""
    lead = t.shape[:-1]
    head = 2 if t.type_name == "Q4_0" else 4
    b = blocks.reshape(-1, head + 16)
    d = _f16(b[:, 0:2])
    m = (d.astype(np.float32) * -8).astype(np.float16) if t.type_name == "Q4_0" else _f16(b[:, 2:4])
    qs = b[:, head:]
    w = _pack_nibbles(qs & 15, qs >> 4).reshape(*lead, -1)
    return mx.array(w), mx.array(d.reshape(*lead, -1)), mx.array(m.reshape(*lead, -1))


def _q80_triplet(blocks: np.ndarray, t: TensorInfo):
    """Q8_0 blocks (d, 32 int8: w = d*q) -> MLX 8-bit triplet: q + 128 with bias -128*d."""
    lead = t.shape[:-1]
    b = blocks.reshape(-1, 34)
    d = _f16(b[:, 0:2])
    q = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    w = np.ascontiguousarray(q).view("<u4").reshape(*lead, -1)
    bias = (d.astype(np.float32) * -128).astype(np.float16)
    return mx.array(w), mx.array(d.reshape(*lead, -1)), mx.array(bias.reshape(*lead, -1))


def _gguf_dequantize(blocks: np.ndarray, t: TensorInfo, path: Path) -> mx.array:
    try:
        from gguf import GGMLQuantizationType, quants
    except ImportError:
        raise WeightsError(f"GGUF file {path}: tensor '{t.name}' has GGML type {t.type_name}; dequantizing it "
                           f"needs the 'gguf' package (pip install gguf)") from None
    try:
        x = quants.dequantize(np.asarray(blocks).reshape(*t.shape[:-1], -1), GGMLQuantizationType[t.type_name])
    except (NotImplementedError, KeyError, ValueError) as e:
        raise WeightsError(f"GGUF file {path}: cannot dequantize tensor '{t.name}' ({t.type_name}) with the "
                           f"installed gguf package: {e}") from None
    return mx.array(np.ascontiguousarray(x, dtype=np.float32).reshape(t.shape))


def _q4k_triplet(blocks: np.ndarray, t: TensorInfo):
    """Q4_K blocks -> exact MLX 4-bit affine triplet (group 32, float32 scales/biases).

    A Q4_K super-block holds 256 weights as 8 sub-blocks of 32: w = d*sc[j]*q - dmin*m[j],
    with 6-bit sc/m packed in 12 bytes and 4-bit q (low nibbles of 32 bytes, then high).
    """
    b = blocks.reshape(-1, 144)
    d = _f16(b[:, 0:2])[:, None].astype(np.float32)
    dmin = _f16(b[:, 2:4])[:, None].astype(np.float32)
    lo, hi, ex = b[:, 4:8], b[:, 8:12], b[:, 12:16]
    sc = np.concatenate([lo & 63, (ex & 15) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([hi & 63, (ex >> 4) | ((hi >> 6) << 4)], axis=1)
    qs = b[:, 16:].reshape(-1, 4, 32)
    packed = _pack_nibbles(qs & 15, qs >> 4)  # chunk k: weights 64k..64k+31 (low), 64k+32.. (high)
    lead = t.shape[:-1]
    return (
        mx.array(packed.reshape(*lead, t.shape[-1] // 8)),
        mx.array((d * sc).reshape(*lead, -1)),
        mx.array((-dmin * mn).reshape(*lead, -1)),
    )


def _q6k_dense(blocks: np.ndarray, t: TensorInfo) -> mx.array:
    """Q6_K blocks -> float32: 256 weights = 16 sub-blocks of 16, w = d*sc[j]*(q - 32), with
    6-bit q split into 4 low bits (128 bytes) and 2 high bits (64 bytes), int8 sc, float16 d."""
    b = blocks.reshape(-1, 210)
    ql, qh = b[:, :128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
    low = np.concatenate([ql & 15, ql >> 4], axis=-1)
    high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(-1, 16, 16)
    d = _f16(b[:, 208:210])[:, None].astype(np.float32)
    scale = d * b[:, 192:208].view(np.int8).astype(np.float32)
    return mx.array((scale[..., None] * q).reshape(t.shape))


def _unpermute_qk(weights: Dict[str, mx.array], config: Dict[str, Any], path: Path) -> None:
    """Undo llama.cpp's Q/K row interleave: per head, rows (d, 2) -> HF's (2, d)."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    perms: Dict[tuple, mx.array] = {}
    for name, w in list(weights.items()):
        m = re.match(r"^model\.layers\.\d+\.self_attn\.([qk]_proj)\.", name)
        if not m:
            continue
        n_head, rows = heads[m[1]], w.shape[0]
        if rows % (2 * n_head):
            raise WeightsError(f"GGUF file {path}: tensor '{name}' has {rows} rows, not a multiple of 2 x {n_head} heads")
        if (rows, n_head) not in perms:
            idx = np.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(0, 2, 1).reshape(-1)
            perms[(rows, n_head)] = mx.array(idx)
        weights[name] = mx.take(w, perms[(rows, n_head)], axis=0)
