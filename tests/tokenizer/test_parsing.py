"""Reasoning split, Hermes tool-call parsing and the streaming thinking router."""

import pytest

from qwen_mlx.tokenizer import ThinkingStream, ToolCall, parse_tool_calls, split_thinking


@pytest.mark.parametrize("text,want", [
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", ("Let me think.", "The answer is 4.")),
    # the prompt opened <think>
    ("Let me think.\n</think>\n\nThe answer is 4.", ("Let me think.", "The answer is 4.")),
    ("<think>\n\n</think>\n\nHi", ("", "Hi")),
    ("No tags here.\n", (None, "No tags here.\n")),
    ("<think>\ncut off mid-thou", ("cut off mid-thou", "")),
    ("</think>", ("", "")),
    ("  <think>a</think>b</think>c", ("a", "b</think>c")),  # a second </think> in content is content
])
def test_split_thinking(text, want):
    assert split_thinking(text) == want


def test_split_thinking_explicit_state():
    assert split_thinking("still thinking", in_thinking=True) == ("still thinking", "")
    assert split_thinking("plain", in_thinking=False) == (None, "plain")


def test_parse_single_and_multiple_tool_calls():
    text = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "I will check."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "北京"}),
                                                      ("add", {"a": 1, "b": 2})]
    assert all(isinstance(c, ToolCall) and c.id.startswith("call_") for c in calls)
    assert calls[0].id != calls[1].id
    assert calls[0].to_openai()["function"] == {"name": "get_weather", "arguments": '{"city": "北京"}'}
    _, (c,) = parse_tool_calls('<tool_call>{"name": "noargs"}</tool_call>')
    assert c.arguments == {}


def test_malformed_tool_calls_stay_in_content():
    bad = '<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>'  # missing brace
    good = '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    assert parse_tool_calls(bad) == (bad, [])
    content, calls = parse_tool_calls(f"a {bad} b {good} c")
    assert [c.name for c in calls] == ["g"] and content == f"a {bad} b  c"
    for junk in ['<tool_call>[1, 2]</tool_call>', '<tool_call>{"arguments": {}}</tool_call>',
                 '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', '<tool_call>{"name": "f"',
                 "no calls at all"]:
        assert parse_tool_calls(junk) == (junk, [])


def _stream(pieces, in_thinking=False):
    st = ThinkingStream(in_thinking)
    out = [p for piece in pieces for p in st.feed(piece)] + st.flush()
    for ch, t in out:
        assert ch in ("reasoning", "content") and t
    return ("".join(t for ch, t in out if ch == "reasoning"), "".join(t for ch, t in out if ch == "content"))


TEXTS = [
    ("<think>\nI should add.\n 2+2=4 </think>\n\nIt is 4.", False),
    ("reasoning here\n</think>\n\nanswer <b>x</b> < y", True),
    ("plain answer with < and <th and </ but no tags", False),
    ("<think></think>done", False),
    ("pre<think>mid</think>post<think>again</think>end", False),
    ("\n \n<think>x</think> y ", False),
    (" \n ", False),
]


@pytest.mark.parametrize("text,in_thinking", TEXTS)
def test_stream_every_split_matches_split_thinking(text, in_thinking):
    reasoning, answer = split_thinking(text, in_thinking=in_thinking)
    want = (reasoning or "", answer)
    assert _stream([text], in_thinking) == want
    for i in range(len(text) + 1):  # one cut anywhere, tags included
        assert _stream([text[:i], text[i:]], in_thinking) == want, i
    for i in range(len(text)):  # and two cuts around every position
        assert _stream([text[:i], text[i:i + 3], text[i + 3:]], in_thinking) == want, i
    assert _stream(list(text), in_thinking) == want  # one character at a time


def test_stream_routes_incrementally():
    st = ThinkingStream()
    assert st.feed("<thi") == []  # may be a tag: held
    assert st.feed("nk>\nabc") == [("reasoning", "abc")]
    assert st.feed(" \n") == []  # trailing reasoning whitespace waits
    assert st.feed("def</th") == [("reasoning", " \ndef")]
    assert st.feed("ink>\n\nHel") == [("content", "Hel")]
    assert st.feed("lo <") == [("content", "lo ")]
    assert st.feed("3") == [("content", "<3")]
    assert st.flush() == []
    assert ThinkingStream(in_thinking=True).feed("x</think>y") == [("reasoning", "x"), ("content", "y")]
