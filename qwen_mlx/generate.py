"""Token generation: chunked prefill, on-device sampling, async-overlapped decode,
streaming text with stop strings, and a prompt cache reused across turns.

mlx-lm provides the KV caches, samplers and logits processors; this module
only drives them.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .cache import can_trim_prompt_cache, trim_prompt_cache
from .errors import PromptError
from .generation_config import SamplingParams
from .models.linear import eager_decode
from .models.step import DecodeStep


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # tokens actually run through the model (prefix reuse skips the rest)
    generated_tokens: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: Optional[str] = None  # "stop" | "length"


class PromptCache:
    """A model's KV cache plus the tokens it holds, so the next request prefills
    only what differs from the common prefix (chat turns, repeated system prompts)."""

    def __init__(self, model, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None,
                 kv_group_size: int = 64):
        self.model, self.settings = model, (max_kv_size, kv_bits, kv_group_size)
        self.reset()

    def reset(self):
        max_kv, bits, group = self.settings
        self.cache = self.model.make_cache(max_kv_size=max_kv, kv_bits=bits, kv_group_size=group)
        self.tokens: List[int] = []

    def reuse(self, prompt: Sequence[int]) -> int:
        """Trim the cache to the longest common prefix with ``prompt`` (keeping at least
        one prompt token to run); return how many prompt tokens are already cached."""
        n = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1)
        drop = len(self.tokens) - n
        if drop and not (can_trim_prompt_cache(self.cache) and trim_prompt_cache(self.cache, drop) == drop):
            self.reset()
            return 0
        self.tokens = self.tokens[:n]
        return n


def make_sampling(p: SamplingParams):
    temp = p.temperature or 0.0
    sampler = make_sampler(temp=temp, top_p=p.top_p or 0.0, min_p=p.min_p or 0.0,
                           top_k=p.top_k or 0)
    procs = make_logits_processors(
        repetition_penalty=p.repetition_penalty if p.repetition_penalty not in (None, 1.0) else None,
        repetition_context_size=p.repetition_context_size,
        presence_penalty=p.presence_penalty or None,
        presence_context_size=p.repetition_context_size,
    )
    return sampler, procs


def generate_tokens(model, prompt: Sequence[int], params: SamplingParams,
                    prompt_cache: Optional[PromptCache] = None, eos_ids=(),
                    prefill_step: int = 2048, stats: Optional[GenerationStats] = None,
                    prefill: Optional["EmbeddedPrefill"] = None) -> Iterator[int]:
    """Yield sampled token ids until EOS (not yielded) or ``params.max_tokens``.
    ``prefill``: the prompt as embeddings (images/videos), see `EmbeddedPrefill`."""
    prompt = list(prompt)
    if not prompt:
        raise PromptError("the prompt is empty")
    limit = getattr(model, "context_length", None)
    pc = prompt_cache or PromptCache(model)
    if limit and len(prompt) >= limit and pc.settings[0] is None:
        raise PromptError(f"the prompt has {len(prompt)} tokens; the model's context is {limit}")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    max_tokens = params.max_tokens
    if limit and pc.settings[0] is None:
        max_tokens = min(max_tokens, limit - len(prompt))
    if params.seed is not None:
        mx.random.seed(params.seed)
    sampler, procs = make_sampling(params)
    eos_ids = set(eos_ids)

    cached = pc.reuse(prompt if prefill is None else prefill.keys)
    todo = prompt[cached:]
    stats.prefill_tokens = len(todo)
    history = mx.array(prompt)
    cache = pc.cache

    greedy = not params.temperature  # argmax needs no normalised log-probabilities

    def step(x: mx.array):
        logits = decode(x[None])
        if procs:
            for p in procs:
                logits = p(history, logits)
        if not greedy:
            logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logits).squeeze(0)

    def advance(y: mx.array):  # feed token y, queue the next one
        nonlocal history
        if procs:
            history = mx.concatenate([history, y[None]])
        nxt = step(y[None])
        mx.async_eval(nxt)
        return nxt

    t0 = time.perf_counter()
    if prefill is not None:
        todo = prefill_embedded(model, prefill, prompt, cached, pc, prefill_step)
    while len(todo) > 1:  # all but the last token: evaluate only the cache, so the lazy
        n = min(prefill_step, len(todo) - 1)  # graph never computes their LM-head logits
        model(mx.array(todo[:n])[None], cache=cache)
        mx.eval([c.state for c in cache])
        pc.tokens += todo[:n]
        todo = todo[n:]
    decode = DecodeStep(model, cache)  # compiled where enabled (models/step.py); after prefill: M-RoPE delta known
    y = step(mx.array(todo))
    pc.tokens += todo
    mx.async_eval(y)
    # Overlap: queue step n+1 before reading token n. Where building a step already runs it
    # (the CPU backend's BLAS sgemv decode, models/linear.py) read token n first instead.
    eager = eager_decode() and not decode.compiled
    n, t1 = 0, None
    while n < max_tokens:
        nxt = advance(y) if not eager and n + 1 < max_tokens else None
        tok = y.item()
        if t1 is None:
            t1 = time.perf_counter()
            stats.prefill_tps = len(prompt[cached:]) / max(t1 - t0, 1e-9)
        if tok in eos_ids:
            stats.finish_reason = "stop"
            if nxt is not None:
                pc.tokens.append(tok)  # it was fed to the cache by the queued step
            break
        n += 1
        stats.generated_tokens = n
        if nxt is not None:
            pc.tokens.append(tok)
        yield tok
        if n >= max_tokens:
            break
        if nxt is None:
            nxt = advance(y)
            pc.tokens.append(tok)
        y = nxt
    if stats.finish_reason is None:
        stats.finish_reason = "length"
    if t1 is not None and n > 1:
        stats.decode_tps = (n - 1) / max(time.perf_counter() - t1, 1e-9)
    stats.peak_memory_gb = mx.get_peak_memory() / 1e9


# -- multimodal prompts ---------------------------------------------------------------------------
@dataclass
class EmbeddedPrefill:
    """A prompt whose inputs are embeddings (images/videos placed at their placeholders).

    ``keys`` stand for the prompt tokens when the prompt cache looks for the common prefix:
    a token id for text, ``(media key, row)`` for a placeholder, so that two different
    images (same placeholder ids) never match. ``embed(offset)`` returns the inputs of
    ``prompt[offset:]`` (``input_embeds`` (1, L, D), ``positions`` (3, 1, L), ``deepstack``:
    a list of (1, L, D) or None; `VLModel.embed_multimodal`) and sets the cache's rope delta."""

    keys: Sequence
    embed: Callable[[int], object]


def prefill_embedded(model, prefill: EmbeddedPrefill, prompt: List[int], cached: int,
                     pc: PromptCache, step: int) -> List[int]:
    """Run all but the last prompt token as embeddings, in chunks of ``step``; return the last
    token, which follows every media item, so the text path (ids, position offset + rope
    delta) gives it the same embedding and position."""
    if len(prefill.keys) != len(prompt):
        raise PromptError(f"{len(prefill.keys)} prefill keys for a {len(prompt)}-token prompt")
    if not isinstance(prefill.keys[-1], int):
        raise PromptError("the prompt ends inside an image/video placeholder: add text after it")
    mm = prefill.embed(cached)
    n = len(prompt) - 1 - cached
    for a in range(0, n, step):
        b = min(a + step, n)
        ds = [d[:, a:b] for d in mm.deepstack] if mm.deepstack else None
        model(None, pc.cache, mm.input_embeds[:, a:b], mm.positions[:, :, a:b], ds)
        mx.eval([c.state for c in pc.cache])
    pc.tokens += list(prefill.keys[cached:len(prompt) - 1])
    return prompt[-1:]
