"""Generation engine: prompt-cache prefix reuse, chunked prefill, EOS, max_tokens, samplers,
KV cache variants, context limits."""

import mlx.core as mx
import pytest

from qwen_mlx import PromptError
from qwen_mlx.generate import GenerationStats, PromptCache, generate_tokens
from qwen_mlx.generation_config import GenerationConfig, SamplingParams
from qwen_mlx.streaming import StopMatcher

PROMPT = list(range(1000, 1040))


def run(llm, prompt=PROMPT, cache=None, **kw):
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0.0)
    stats = GenerationStats()
    toks = list(generate_tokens(llm.model, prompt, SamplingParams(**kw), cache, stats=stats, **(
        {"prefill_step": kw.pop("prefill_step")} if "prefill_step" in kw else {})))
    return toks, stats


def test_max_tokens_and_length_finish(tiny_llm):
    toks, stats = run(tiny_llm, max_tokens=7)
    assert len(toks) == 7 and stats.finish_reason == "length" and stats.generated_tokens == 7


def test_eos_stops_and_is_not_yielded(tiny_llm):
    greedy, _ = run(tiny_llm, max_tokens=10)
    eos = greedy[4]
    stats = GenerationStats()
    toks = list(generate_tokens(tiny_llm.model, PROMPT, SamplingParams(max_tokens=10, temperature=0.0),
                                eos_ids={eos}, stats=stats))
    assert toks == greedy[:greedy.index(eos)] and stats.finish_reason == "stop"


def test_chunked_prefill_matches_single_pass(tiny_llm):
    prompt = list(range(2000, 2300))
    a, _ = run(tiny_llm, prompt, max_tokens=12)
    b = list(generate_tokens(tiny_llm.model, prompt, SamplingParams(max_tokens=12, temperature=0.0),
                             prefill_step=64))
    assert a == b


def test_prompt_cache_reuses_prefix(tiny_llm):
    pc = PromptCache(tiny_llm.model)
    first, s1 = run(tiny_llm, PROMPT, pc)
    assert s1.prefill_tokens == len(PROMPT)
    turn2 = PROMPT + first + [151645, 198, 151644, 872, 198] + list(range(3000, 3010))
    second, s2 = run(tiny_llm, turn2, pc)
    # only what was not already in the cache is prefilled: the last answer token + the new turn
    assert s2.prefill_tokens == len(turn2) - (len(PROMPT) + len(first) - 1)
    assert s2.prefill_tokens < 20
    fresh, s3 = run(tiny_llm, turn2)
    assert s3.prefill_tokens == len(turn2) and second == fresh


def test_prompt_cache_diverging_prompt_trims(tiny_llm):
    pc = PromptCache(tiny_llm.model)
    run(tiny_llm, PROMPT, pc)
    other = PROMPT[:10] + list(range(5000, 5020))
    toks, s = run(tiny_llm, other, pc)
    assert s.prefill_tokens == 20 and toks == run(tiny_llm, other)[0]


def test_identical_prompt_still_runs_last_token(tiny_llm):
    pc = PromptCache(tiny_llm.model)
    a, _ = run(tiny_llm, PROMPT, pc)
    pc.tokens = pc.tokens[: len(PROMPT)]
    from qwen_mlx.cache import trim_prompt_cache
    trim_prompt_cache(pc.cache, pc.cache[0].offset - len(PROMPT))
    b, s = run(tiny_llm, PROMPT, pc)
    assert s.prefill_tokens == 1 and a == b


def test_seeded_sampling_is_reproducible(tiny_llm):
    kw = dict(temperature=1.0, top_p=0.9, max_tokens=12)
    a, _ = run(tiny_llm, seed=3, **kw)
    b, _ = run(tiny_llm, seed=3, **kw)
    c, _ = run(tiny_llm, seed=4, **kw)
    assert a == b and a != c


def test_top_k_one_is_greedy(tiny_llm):
    assert run(tiny_llm, temperature=0.8, top_k=1, seed=0)[0] == run(tiny_llm)[0]


def test_min_p_one_is_greedy(tiny_llm):
    assert run(tiny_llm, temperature=1.0, min_p=1.0, seed=0)[0] == run(tiny_llm)[0]


@pytest.mark.parametrize("opt", [{"repetition_penalty": 5.0}, {"presence_penalty": 50.0}])
def test_penalties_prevent_repeats(tiny_llm, opt):
    plain, _ = run(tiny_llm, max_tokens=24)
    penal, _ = run(tiny_llm, max_tokens=24, **opt)
    assert len(set(plain)) < len(plain), "fixture should repeat itself greedily"
    assert penal != plain and len(set(penal)) > len(set(plain))


@pytest.mark.parametrize("kind", [{"max_kv_size": 64}, {"kv_bits": 8}])
def test_cache_variants_generate(tiny_llm, kind):
    pc = PromptCache(tiny_llm.model, **kind)
    toks, s = run(tiny_llm, PROMPT, pc, max_tokens=10)
    assert len(toks) == 10
    if "max_kv_size" in kind:  # within the window a rotating cache is exact
        assert toks == run(tiny_llm, max_tokens=10)[0]
        long, _ = run(tiny_llm, list(range(100, 300)), PromptCache(tiny_llm.model, **kind), max_tokens=5)
        assert len(long) == 5


def test_empty_prompt_and_context_limit(tiny_llm):
    with pytest.raises(PromptError, match="empty"):
        run(tiny_llm, [])
    with pytest.raises(PromptError, match="600 tokens; the model's context is 512"):
        run(tiny_llm, list(range(600)))


def test_generation_near_context_is_clipped(tiny_llm):
    toks, s = run(tiny_llm, list(range(100, 100 + 508)), max_tokens=50)
    assert len(toks) <= 4 and s.finish_reason == "length"


def test_generation_config_defaults(tiny_qwen3_dir):
    g = GenerationConfig.from_dir(tiny_qwen3_dir)
    assert g.eos_token_ids == {151645, 151643}
    p = SamplingParams(top_p=0.5).merged(g)
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.5, 20)


@pytest.mark.parametrize("pieces,stops,out", [
    (["Hello wor", "ld<", "|end", "|> more"], ["<|end|>"], "Hello world"),
    (["abc", "def"], ["xyz"], "abcdef"),
    (["a", "b", "c"], ["bc"], "a"),
    (["no stops here"], [], "no stops here"),
])
def test_stop_matcher(pieces, stops, out):
    m = StopMatcher(stops)
    text, hit = "", False
    for p in pieces:
        t, hit = m.feed(p)
        text += t
        if hit:
            break
    text += "" if hit else m.flush()
    assert text == out and hit == (out != "".join(pieces))


@pytest.mark.parametrize("eager", [True, False], ids=["read-first", "overlapped"])
@pytest.mark.parametrize("stop_at", [None, 5])
def test_decode_orders_agree(tiny_llm, monkeypatch, eager, stop_at):
    """Reading each token before building the next step (the CPU sgemv path) and queueing
    the next step first (async overlap) give the same tokens, the same greedy tokens as a
    plain argmax loop, and a prompt cache whose token list matches what the KV cache holds."""
    import numpy as np

    from qwen_mlx import generate as G
    from tests.helpers import mlx_greedy

    ref = mlx_greedy(tiny_llm.model, np.array([PROMPT]), 12)
    monkeypatch.setattr(G, "eager_decode", lambda: eager)
    pc = PromptCache(tiny_llm.model)
    eos = {ref[stop_at]} if stop_at is not None else ()
    stats = GenerationStats()
    toks = list(generate_tokens(tiny_llm.model, PROMPT, SamplingParams(max_tokens=12, temperature=0.0),
                                pc, eos_ids=eos, stats=stats))
    want = ref if stop_at is None else ref[:ref.index(ref[stop_at])]
    assert toks == want
    assert len(pc.tokens) == pc.cache[0].offset and pc.tokens[:len(PROMPT)] == PROMPT
    assert pc.tokens[len(PROMPT):len(PROMPT) + len(toks)] == toks[:len(pc.tokens) - len(PROMPT)]
    follow, _ = run(tiny_llm, PROMPT + toks + [7, 8], pc, max_tokens=4)  # the cache is reusable
    assert follow == run(tiny_llm, PROMPT + toks + [7, 8], max_tokens=4)[0]
