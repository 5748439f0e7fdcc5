"""The small cache interface models use: mlx-lm's KV caches, chosen per request.

Models touch a cache only through ``offset``, ``update_and_fetch`` and ``make_mask``.
"""

from typing import List, Optional

from mlx_lm.models.cache import (
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    trim_prompt_cache,
)

from .errors import QwenMLXError

__all__ = ["RequestCache", "make_cache", "can_trim_prompt_cache", "trim_prompt_cache", "cache_offset"]


class RequestCache(list):
    """The per-layer KV caches of one request plus its per-request state: ``rope_delta``
    (M-RoPE shift of positions after media: int or (B,) array; position = offset + delta)
    and ``media`` (content keys of the images/videos inside the cached prefix)."""

    def __init__(self, layers=()):
        super().__init__(layers)
        self.rope_delta = 0
        self.media: List[str] = []


def make_cache(model, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None,
               kv_group_size: int = 64) -> List:
    n = len(model.layers)
    if max_kv_size is not None and kv_bits is not None:
        raise QwenMLXError("a rotating KV cache (max_kv_size) cannot also be quantized (kv_bits)")
    if kv_bits is not None and kv_bits not in (2, 3, 4, 5, 6, 8):
        raise QwenMLXError(f"kv_bits must be one of 2, 3, 4, 5, 6, 8, not {kv_bits}")
    if max_kv_size is not None:
        if max_kv_size < 8:
            raise QwenMLXError(f"max_kv_size {max_kv_size} is too small (at least 8)")
        return RequestCache(RotatingKVCache(max_size=max_kv_size, keep=4) for _ in range(n))
    if kv_bits is not None:
        hd = model.args.head_dim
        kv_group_size = next((g for g in (kv_group_size, 64, 32) if hd % g == 0), None)
        if kv_group_size is None:
            raise QwenMLXError(f"cannot quantize the KV cache: head_dim {hd} is not a multiple of 32")
        return RequestCache(QuantizedKVCache(group_size=kv_group_size, bits=kv_bits) for _ in range(n))
    return RequestCache(KVCache() for _ in range(n))


def cache_offset(cache: List) -> int:
    return cache[0].offset if cache else 0
