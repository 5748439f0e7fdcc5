"""The one-token decode step under `mx.compile`.

Traced once per KV-cache capacity and replayed for every token: no Python module calls per
token, and chains of elementwise ops (norms, RoPE, SwiGLU, residual adds, the KV write) fuse
into single kernels. The state stays in mlx-lm's `KVCache` objects, so prefill, trimming and
prompt-cache reuse are unchanged: a step writes the new key/value into the cache's
preallocated buffer (capacity a multiple of 256) at the offset, given as an array, and attends
over the whole buffer with a mask that ends at that offset. All steps of one capacity have the
same shapes and replay one trace; a full buffer grows by 256 slots (one more trace).

Where it is used (`SPEED.compile_step`, models/linear.py): on by default on Metal / CUDA, off
on the CPU backend. There single-row float32 products run BLAS ``sgemv`` outside any graph
(~3x MLX's M = 1 ``sgemm``), which a trace cannot hold: 4-layer Qwen3-0.6B, 128 tokens
after a 512-token prompt, the compiled step decodes at 3.2 tok/s against 13.5 eager
(float32), and 2.4 against 2.9 in bfloat16 (`benchmarks/run.py --vs-speed compile_step=1`).
"""

from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import DynamicNTKScalingRoPE

from .linear import SPEED, on_cpu


class _Slot:
    """One layer's cache as the traced step sees it: the full buffers and the offset as an
    array (`Attention` passes it to RoPE; `create_attention_mask` asks for `make_mask`)."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    def update_and_fetch(self, k, v):
        at = self.offset.reshape(1)
        self.keys = mx.slice_update(self.keys, k, at, axes=(2,))
        self.values = mx.slice_update(self.values, v, at, axes=(2,))
        return self.keys, self.values

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        i = mx.arange(self.keys.shape[2])
        m = i <= self.offset  # the slots written so far and the new token's
        if window_size is not None:
            m = m & (i > self.offset - window_size)
        return m


def _trace(model):
    def run(tokens, offset, keys, values):
        slots = [_Slot(k, v, offset) for k, v in zip(keys, values)]
        logits = model(tokens, cache=slots)[:, -1, :]
        return logits, [s.keys for s in slots], [s.values for s in slots]

    return mx.compile(run)


def supported(model, cache) -> bool:
    """The decoder's text path with plain KV caches (not rotating / quantized), RoPE that
    takes an array offset, and no M-RoPE shift pending (VL prompts with media run eagerly)."""
    from .decoder import CausalLM

    if not isinstance(model, CausalLM) or not cache or any(type(c) is not KVCache for c in cache):
        return False
    delta = getattr(cache, "rope_delta", 0)
    if not isinstance(delta, int) or delta != 0:
        return False
    return not any(isinstance(layer.self_attn.rope, DynamicNTKScalingRoPE) for layer in model.layers)


def enabled() -> bool:
    return SPEED.compile_step if SPEED.compile_step is not None else not on_cpu()


class DecodeStep:
    """``step(tokens (B, 1)) -> logits (B, vocab)``, advancing ``cache`` by one token: the
    compiled trace where `enabled` and `supported`, else the model's eager call.

        step = DecodeStep(model, cache)
        logits = step(mx.array([[token]]))
    """

    def __init__(self, model, cache: List, compiled: Optional[bool] = None):
        self.model, self.cache = model, cache
        use = enabled() if compiled is None else compiled
        self.compiled = bool(use) and supported(model, cache)
        if self.compiled and getattr(model, "_decode_trace", None) is None:
            # arrays the model holds are traced as constants: weights are fixed after load
            object.__setattr__(model, "_decode_trace", _trace(model))

    def __call__(self, tokens: mx.array) -> mx.array:
        cs = self.cache
        if not self.compiled or tokens.shape[1] != 1 or cs[0].keys is None:
            return self.model(tokens, cache=cs)[:, -1, :]  # also the first write: allocates the buffers
        off = cs[0].offset
        if off >= cs[0].keys.shape[2]:  # full: grow by one step, as KVCache.update_and_fetch does
            for c in cs:
                c.keys, c.values = (mx.concatenate([a[..., :off, :], mx.zeros((*a.shape[:2], c.step, a.shape[3]), a.dtype)],
                                                   axis=2) for a in (c.keys, c.values))
        logits, ks, vs = self.model._decode_trace(tokens.astype(mx.int32), mx.array(off, mx.int32),  # one dtype: one trace
                                                  [c.keys for c in cs], [c.values for c in cs])
        for c, k, v in zip(cs, ks, vs):
            c.keys, c.values, c.offset = k, v, off + 1
        return logits
