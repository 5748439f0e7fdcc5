"""The LLM object: streaming text, thinking/answer channels, tool calls, stop strings,
multi-turn sessions with prefix reuse, request errors."""

import json

import pytest

from qwen_mlx import PromptError, QwenMLXError
from qwen_mlx.generation_config import GenerationConfig
from qwen_mlx.llm import LLM
from tests.helpers import ScriptedModel

CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}


def scripted(tok, text=None, ids=None):
    ids = (ids or tok.encode(text)) + [tok.token_to_id("<|im_end|>")]
    return LLM(ScriptedModel(ids, tok.vocab_size), tok, GenerationConfig(), path=None)


def expect(llm, prompt):
    """Tell the scripted model where the prompt ends."""
    llm.model.prompt_len = len(llm.prepare(prompt)[0])
    return prompt


def test_thinking_answer_and_tool_calls(qwen_tokenizer):
    text = (f"<think>\nThe user wants weather.\n</think>\n\nLet me check.\n"
            f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>")
    llm = scripted(qwen_tokenizer, text)
    chunks = list(llm.stream(expect(llm, "weather in Paris?"), max_tokens=200))
    reasoning = "".join(c.text for c in chunks if c.channel == "reasoning")
    assert reasoning.strip() == "The user wants weather."
    assert chunks[-1].finish_reason == "stop"
    r = llm.chat("weather in Paris?", max_tokens=200)
    assert r.reasoning == "The user wants weather." and r.content == "Let me check."
    assert [(t.name, t.arguments) for t in r.tool_calls] == [(CALL["name"], CALL["arguments"])]
    assert r.message()["tool_calls"][0]["function"]["name"] == "get_weather"


def test_generate_returns_answer_only(qwen_tokenizer):
    llm = scripted(qwen_tokenizer, "<think>hmm</think>Paris.")
    assert llm.generate(expect(llm, "capital?"), max_tokens=50) == "Paris."


def test_stop_string_across_tokens(qwen_tokenizer):
    llm = scripted(qwen_tokenizer, "one two three four five")
    chunks = list(llm.stream(expect(llm, "count"), stop=[" thr"], max_tokens=50))
    assert "".join(c.text for c in chunks) == "one two" and chunks[-1].finish_reason == "stop"


def test_multibyte_stream_never_splits(qwen_tokenizer):
    """One token per UTF-8 byte: every multi-byte character is split across tokens; the
    stream must hold each back until whole and add up to the exact text."""
    from qwen_mlx.tokenizer.bpe import spell_bytes

    text = "héllo 你好 🌍🚀 ok"
    ids = [qwen_tokenizer.token_to_id(spell_bytes(bytes([b]))) for b in text.encode()]
    assert None not in ids
    llm = scripted(qwen_tokenizer, ids=ids)
    pieces = [c.text for c in llm.stream(expect(llm, "x"), max_tokens=100)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 5  # it really streamed


def test_session_turn_two_prefills_only_new_tokens(tiny_llm):
    s = tiny_llm.session(system="Be brief.", temperature=0.0, max_tokens=12)
    r1 = s.send("What is MLX?")
    assert r1.stats.prefill_tokens == r1.stats.prompt_tokens
    r2 = s.send("And Qwen?")
    new_turn = len(tiny_llm.tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd Qwen?<|im_end|>\n<|im_start|>assistant\n"))
    assert r2.stats.prefill_tokens <= new_turn + 2, (r2.stats.prefill_tokens, new_turn)
    assert r2.stats.prompt_tokens > r1.stats.prompt_tokens + 10
    fresh = tiny_llm.chat(s.messages[:-1], system="Be brief.", temperature=0.0, max_tokens=12,
                          reuse_cache=False)
    assert fresh.content == r2.content
    s.reset()
    assert s.messages == [] and s.cache.tokens == []
    r3 = s.send("hi")
    assert r3.stats.prefill_tokens == r3.stats.prompt_tokens


def test_llm_chat_reuses_cache_across_calls(tiny_llm):
    msgs = [{"role": "user", "content": "first question"}]
    r1 = tiny_llm.chat(msgs, temperature=0.0, max_tokens=8)
    msgs += [r1.message(), {"role": "user", "content": "second"}]
    r2 = tiny_llm.chat(msgs, temperature=0.0, max_tokens=8)
    # at least turn 1's whole prompt is reused (a random model's answer may not re-tokenize
    # to the same ids, so reuse can stop inside it)
    assert r2.stats.prefill_tokens <= r2.stats.prompt_tokens - r1.stats.prompt_tokens


def test_recommended_sampling_defaults_apply(tiny_llm):
    _, _, params = tiny_llm.prepare("hi")
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 20)
    _, _, params = tiny_llm.prepare("hi", temp=0.0)
    assert params.temperature == 0.0


def test_request_errors(tiny_llm):
    with pytest.raises(PromptError, match="empty"):
        tiny_llm.generate("   ")
    with pytest.raises(PromptError):
        tiny_llm.generate([])
    with pytest.raises(QwenMLXError, match="unknown generation options: tempreature"):
        tiny_llm.generate("hi", tempreature=0.5)
    with pytest.raises(PromptError, match="context"):
        tiny_llm.generate("word " * 700)
    with pytest.raises(QwenMLXError, match="cannot also be quantized"):
        tiny_llm.generate("hi", max_kv_size=64, kv_bits=4)


def test_raw_prompt_skips_template(tiny_llm):
    ids, text, _ = tiny_llm.prepare("plain text", raw=True)
    assert text == "plain text" and ids == tiny_llm.tokenizer.encode("plain text")
    ids, text, _ = tiny_llm.prepare("plain text", system="S")
    assert text.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nplain text")
