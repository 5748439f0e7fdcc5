"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False)."""

import copy
from pathlib import Path

import pytest

from qwen_mlx.errors import TokenizerError
from qwen_mlx.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATES = {p.stem: p.read_text(encoding="utf-8") for p in sorted(FIXTURES.glob("*.jinja"))}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city, « aujourd'hui » <b>now</b>",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "城市名"},
            "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "a + b",
                                      "parameters": {"type": "object", "properties": {
                                          "a": {"type": "number"}, "b": {"type": "number"}}}}},
]
ARGS = {"city": "北京", "unit": "c", "note": "a \"quoted\" & <tag>"}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": ARGS}}
CALL_STR = {"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi!"}],
    "system": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    "multi_turn": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in 中文?"},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Beijing, and 1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, CALL_STR]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "21°C, and 3."},
        {"role": "user", "content": "Thanks"},
    ],
    "thinking_history": [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "step by step"},
    ],
    "list_content": [
        {"role": "system", "content": [{"type": "text", "text": "sys "}, {"type": "text", "text": "parts"}]},
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image"}]},
    ],
}


@pytest.fixture(scope="module")
def hf_for(qwen_tok, transformers_quiet):
    cache = {}

    def make(template):
        if template not in cache:
            t = transformers_quiet.PreTrainedTokenizerFast(
                tokenizer_object=qwen_tok.backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
            t.chat_template = template
            cache[template] = t
        return cache[template]

    return make


def ours(qwen_tok, template):
    return Tokenizer(qwen_tok.backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     chat_template=template)


CASES = [(t, c, g, th) for t in TEMPLATES for c in CONVERSATIONS for g in (True, False)
         for th in (None, True, False)
         if not (c == "list_content" and t == "qwen25_like") and (th is None or t == "qwen3_like")]


@pytest.mark.parametrize("template,conv,gen,think", CASES)
def test_matches_transformers(qwen_tok, hf_for, template, conv, gen, think):
    msgs = CONVERSATIONS[conv]
    tools = TOOLS if conv == "tools" else None
    kw = {} if think is None else {"enable_thinking": think}
    before = copy.deepcopy(msgs)
    want = hf_for(TEMPLATES[template]).apply_chat_template(
        msgs, tools=tools, tokenize=False, add_generation_prompt=gen, **kw)
    got = ours(qwen_tok, TEMPLATES[template]).apply_chat_template(
        msgs, tools=tools, add_generation_prompt=gen, enable_thinking=think)
    assert got == want
    assert msgs == before  # callers' messages are not modified
    if tools:
        # tojson keeps non-ASCII and does not HTML-escape
        assert "<tool_call>" in got and '"北京"' in got and "«" in got
        assert "\\u" not in got and "&lt;" not in got


def test_tools_without_tool_messages_and_extra_vars(qwen_tok, hf_for):
    tpl = TEMPLATES["qwen3_like"] + "{% if custom %}[{{ custom }}|{{ eos_token }}]{% endif %}"
    msgs = CONVERSATIONS["system"]
    want = hf_for(tpl).apply_chat_template(msgs, tools=TOOLS, tokenize=False,
                                           add_generation_prompt=True, custom="x")
    assert ours(qwen_tok, tpl).apply_chat_template(msgs, tools=TOOLS, custom="x") == want
    assert want.endswith("[x|<|im_end|>]")


def test_thinking_switch_in_template(qwen_tok):
    tok = ours(qwen_tok, TEMPLATES["qwen3_like"])
    msgs = CONVERSATIONS["single"]
    assert tok.apply_chat_template(msgs, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.apply_chat_template(msgs).endswith("<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs, enable_thinking=True).endswith("<|im_start|>assistant\n")


def test_chatml_fallback(qwen_tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}]
    assert qwen_tok.chat_template is None
    base = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
            "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nxy<|im_end|>\n")
    assert qwen_tok.apply_chat_template(msgs, add_generation_prompt=False) == base
    assert qwen_tok.apply_chat_template(msgs) == base + "<|im_start|>assistant\n"
    assert qwen_tok.apply_chat_template(msgs, enable_thinking=True) == base + "<|im_start|>assistant\n"
    assert qwen_tok.apply_chat_template(msgs, enable_thinking=False) == (
        base + "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = qwen_tok.encode(qwen_tok.apply_chat_template(msgs))
    assert ids[0] == 151644 and ids.count(151645) == 4  # control tokens are single ids


def test_chatml_no_think_block_without_think_tokens(qwen_tok):
    plain = Tokenizer(qwen_tok.backend)  # same vocab: has <think>
    assert plain.has_thinking
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    tiny = Tokenizer(HF(models.BPE({"a": 0}, [])))
    assert not tiny.has_thinking and tiny.think_start_id is None
    out = tiny.apply_chat_template([{"role": "user", "content": "a"}], enable_thinking=False)
    assert out == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("bad", [
    "hello", [], ["hello"], [{"content": "no role"}], [{"role": "user"}],
    [{"role": 3, "content": "x"}], [{"role": "user", "content": 5}], {"role": "user", "content": "x"},
])
def test_bad_messages(qwen_tok, bad):
    with pytest.raises(TokenizerError):
        qwen_tok.apply_chat_template(bad)
    with pytest.raises(TokenizerError):
        ours(qwen_tok, TEMPLATES["qwen3_like"]).apply_chat_template(bad)


def test_template_errors_are_tokenizer_errors(qwen_tok, hf_for):
    import jinja2

    msgs = [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]
    with pytest.raises(jinja2.TemplateError):  # transformers raises too
        hf_for(TEMPLATES["qwen25_like"]).apply_chat_template(msgs, tokenize=False)
    with pytest.raises(TokenizerError, match="Unsupported role: robot"):
        ours(qwen_tok, TEMPLATES["qwen25_like"]).apply_chat_template(msgs)
    with pytest.raises(TokenizerError, match="does not parse"):
        ours(qwen_tok, "{% for %}").apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError):  # the sandbox refuses attribute escapes
        ours(qwen_tok, "{{ messages.__class__.__mro__ }}").apply_chat_template(msgs[:1])
    with pytest.raises(TokenizerError, match="tools"):
        ours(qwen_tok, TEMPLATES["qwen3_like"]).apply_chat_template(msgs[:1], tools=[print])


def test_generation_tag_and_named_templates(qwen_tok, hf_for):
    tpl = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
           "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert ours(qwen_tok, tpl).apply_chat_template(msgs) == hf_for(tpl).apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True) == "ua"
    tok = Tokenizer(qwen_tok.backend, chat_template={"default": "D{{ messages|length }}",
                                                     "tool_use": "T{{ tools|length }}"})
    assert tok.chat_template == "D{{ messages|length }}"
    assert tok.apply_chat_template(msgs) == "D2"
    assert tok.apply_chat_template(msgs, tools=TOOLS) == "T2"
    assert tok.apply_chat_template(msgs, chat_template="tool_use", tools=[]) == "T0"
