"""The one decoder backbone every Qwen family composes.

A family states only its flags in `DecoderArgs` (QKV bias, QK-norm, MoE layout,
sliding-window layers); parameter names follow Hugging Face so weights copy over.
"""

from dataclasses import dataclass, field
from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.switch_layers import SwitchGLU, _gather_sort, _scatter_unsort

from ..config import require
from .fastmath import sdpa, swiglu
from . import decode_attention
from .linear import SPEED, Linear, head, on_cpu, project, quantized_project
from .mrope import MRoPE, apply_rotary
from .rope import make_rope


@dataclass
class DecoderArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 family: biases on q/k/v only
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    layer_types: List[str] = field(default_factory=list)  # "full_attention" | "sliding_attention"
    sliding_window: Optional[int] = None
    # MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: List[int] = field(default_factory=list)
    # M-RoPE (vision-language families): per-axis frequency sections, see mrope.py
    mrope_section: Optional[List[int]] = None
    mrope_interleaved: bool = False

    @classmethod
    def from_config(cls, cfg: dict, **flags) -> "DecoderArgs":
        """Common HF keys; ``flags`` are the family's fixed choices."""
        require(cfg, "hidden_size", "num_hidden_layers", "intermediate_size",
                "num_attention_heads", "vocab_size")
        n_heads = cfg["num_attention_heads"]
        kw = dict(
            model_type=cfg["model_type"],
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            intermediate_size=cfg["intermediate_size"],
            num_attention_heads=n_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or n_heads,
            vocab_size=cfg["vocab_size"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            num_experts=cfg.get("num_experts") or 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
            norm_topk_prob=cfg.get("norm_topk_prob", False),
            shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size") or 0,
            decoder_sparse_step=cfg.get("decoder_sparse_step") or 1,
            mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
        )
        rs = kw["rope_scaling"] or {}
        if rs.get("mrope_section"):
            kw["mrope_section"] = list(rs["mrope_section"])
            kw["mrope_interleaved"] = bool(rs.get("mrope_interleaved", False))
            if rs.get("rope_type", "default") not in ("default", "mrope"):
                from ..errors import ConfigError
                raise ConfigError(f"M-RoPE with rope_type '{rs.get('rope_type')}' is not supported")
            kw["rope_scaling"] = None
        kw.update(flags)
        args = cls(**kw)
        if args.num_attention_heads % args.num_key_value_heads:
            from ..errors import ConfigError
            raise ConfigError(
                f"num_attention_heads {args.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {args.num_key_value_heads}"
            )
        return args

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "full_attention"

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )


class Attention(nn.Module):
    def __init__(self, args: DecoderArgs, layer_idx: int):
        super().__init__()
        D, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = hd**-0.5
        self.q_proj = Linear(D, self.n_heads * hd, bias=args.qkv_bias)
        self.k_proj = Linear(D, self.n_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = Linear(D, self.n_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = Linear(self.n_heads * hd, D, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.rope = make_rope(hd, args.rope_theta, args.rope_scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None, rope=None) -> mx.array:
        """``rope``: precomputed ``(cos, sin)`` (M-RoPE); otherwise RoPE at the cache offset."""
        B, L, _ = x.shape
        if "qkv_proj" in self:  # fused at load (models/fuse.py): one matmul
            nq, nkv = self.n_heads, self.n_kv_heads
            qkv = self.qkv_proj(x).reshape(B, L, nq + 2 * nkv, -1)
            q, k, v = mx.split(qkv, [nq, nq + nkv], axis=2)
        else:
            q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
            k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
            v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = v.transpose(0, 2, 1, 3)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        else:
            offset = cache.offset if cache is not None else 0
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        plain = not hasattr(cache, "bits")  # a quantized KV cache: mlx-lm's quantized attention
        if L > 1 and plain:  # prefill: fast CPU attention (fastmath)
            out = sdpa(q, k, v, self.scale, mask)
        elif plain and SPEED.decode_attn and on_cpu() and decode_attention.applies(q, k, mask):
            out = decode_attention.decode_sdpa(q, k, v, self.scale, mask)  # one token, CPU
        else:
            out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)

    def __call__(self, x):
        if "gate_up_proj" in self:  # fused at load (models/fuse.py)
            g, u = mx.split(self.gate_up_proj(x), 2, axis=-1)
            return self.down_proj(swiglu(g, u))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Experts(SwitchGLU):
    """mlx-lm's SwitchGLU (parameters, quantization) with ``gate_up_proj`` when fused.

    On the CPU backend MLX's GatherMM runs one M = 1 ``sgemm`` per (token, expert) pair
    (and only in float32), so there the tokens are grouped by expert instead and each used
    expert runs one product over its rows (`linear`: BLAS sgemv for one row, sgemm for
    many; quantized / half experts dequantized or cast per expert), reading expert
    slices as views. Qwen3-30B-A3B layer, 512 tokens: ~5 s gathered; see the README."""

    def __call__(self, x, indices):
        indices = mx.stop_gradient(indices)
        if on_cpu():
            try:
                ids = np.asarray(indices).reshape(-1)
            except ValueError:  # traced (mx.compile / vmap): the gathered matmul below
                ids = None
            if ids is not None:
                return self._by_expert(x, indices, ids)
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= 64  # many tokens: group them by expert (as mlx-lm does)
        idx, inv = indices, None
        if do_sort:
            x, idx, inv = _gather_sort(x, indices)
        if "gate_up_proj" in self:
            g, u = mx.split(self.gate_up_proj(x, idx, sorted_indices=do_sort), 2, axis=-1)
        else:
            g = self.gate_proj(x, idx, sorted_indices=do_sort)
            u = self.up_proj(x, idx, sorted_indices=do_sort)
        y = self.down_proj(swiglu(g, u), idx, sorted_indices=do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv, indices.shape)
        return y.squeeze(-2).astype(x.dtype)  # scales kept wider than x promote the products

    def _by_expert(self, x, indices, ids):
        """``x`` (..., D), ``indices`` (..., k) -> (..., k, D): rows sorted by expert, one
        product per used expert over its contiguous block, then put back in order."""
        k = indices.shape[-1]
        order = np.argsort(ids, kind="stable")
        counts = np.bincount(ids, minlength=1)
        xs = x.reshape(-1, x.shape[-1])
        if ids.size > 1:
            xs = xs[mx.array(order // k)]
        out, start = [], 0
        for e in np.nonzero(counts)[0].tolist():
            rows = xs[start:start + counts[e]]
            start += int(counts[e])
            if "gate_up_proj" in self:
                g, u = mx.split(_expert_mm(rows, self.gate_up_proj, e), 2, axis=-1)
            else:
                g, u = _expert_mm(rows, self.gate_proj, e), _expert_mm(rows, self.up_proj, e)
            out.append(_expert_mm(swiglu(g, u), self.down_proj, e))
        y = mx.concatenate(out, axis=0) if len(out) > 1 else out[0]
        if ids.size > 1:
            y = y[mx.array(np.argsort(order))]
        return y.reshape(*indices.shape, -1)


def _expert_mm(a, proj, e):
    """``a @ W_e.T`` for expert ``e`` of a (Quantized)SwitchLinear."""
    if "scales" in proj:
        return quantized_project(a, proj, e)
    w = proj["weight"][e:e + 1].squeeze(0)  # a view (an integer index copies)
    if w.dtype == mx.float32 == a.dtype:
        return project(a, w)
    return project(a.astype(mx.float32), w.astype(mx.float32)).astype(a.dtype)


class SparseMoE(nn.Module):
    """Softmax router, top-k experts as one gathered matmul per projection
    (mlx-lm's SwitchGLU), optional sigmoid-gated shared expert (Qwen2-MoE)."""

    def __init__(self, args: DecoderArgs):
        super().__init__()
        D = args.hidden_size
        self.top_k, self.norm_topk_prob = args.num_experts_per_tok, args.norm_topk_prob
        self.gate = Linear(D, args.num_experts, bias=False)
        self.switch_mlp = Experts(D, args.moe_intermediate_size, args.num_experts)
        if args.shared_expert_intermediate_size:
            self.shared_expert = MLP(D, args.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(D, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        inds = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        scores = mx.take_along_axis(probs, inds, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        y = self.switch_mlp(x, inds)
        y = (y * scores[..., None].astype(y.dtype)).sum(axis=-2)
        if "shared_expert" in self:
            y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, args: DecoderArgs, i: int):
        super().__init__()
        self.self_attn = Attention(args, i)
        self.mlp = SparseMoE(args) if args.is_moe_layer(i) else MLP(
            args.hidden_size, args.intermediate_size, args.mlp_bias)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, mask=None, cache=None, rope=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, rope)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if args.mrope_section:
            self.mrope = MRoPE(args.head_dim, args.rope_theta, args.mrope_section, args.mrope_interleaved)

    def __call__(self, input_ids=None, cache=None, input_embeds=None, positions=None, deepstack=None):
        """``positions`` (3, B, L): M-RoPE ids (None: text positions from the cache offset).
        ``deepstack``: dense (B, L, D) additions after the first ``len(deepstack)`` layers."""
        h = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        cache = cache or [None] * len(self.layers)
        rope = self.mrope(positions) if positions is not None and self.args.mrope_section else None
        masks = {}
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            window = self.args.sliding_window if self.args.layer_type(i) == "sliding_attention" else None
            if window not in masks:
                masks[window] = create_attention_mask(h, c, window_size=window)
            h = layer(h, masks[window], c, rope)
            if deepstack is not None and i < len(deepstack):
                h = h + deepstack[i]
        return self.norm(h)


class CausalLM(nn.Module):
    """``model(input_ids, cache)`` -> logits ``[B, L, vocab]``."""

    capabilities = frozenset({"text"})

    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, input_ids=None, cache=None, input_embeds=None, positions=None, deepstack=None):
        h = self.model(input_ids, cache, input_embeds, positions, deepstack)
        if self.args.tie_word_embeddings:
            return head(self.model.embed_tokens, h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None,
                   kv_group_size: int = 64):
        from ..cache import make_cache
        return make_cache(self, max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size)

    @property
    def context_length(self) -> int:
        return self.args.max_position_embeddings
