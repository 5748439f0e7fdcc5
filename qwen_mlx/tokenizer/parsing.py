"""Reading reasoning and tool calls out of generated text.

Qwen3 thinks inside `<think>...</think>` (a template may open `<think>` in the prompt, so the
output holds only `</think>`); Qwen2.5/3 call tools with Hermes-style blocks:
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

Whitespace rule (shared by `split_thinking` and `ThinkingStream`): reasoning is stripped on both
sides, text right after a tag loses its leading whitespace, and whitespace before `<think>` goes.
"""

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

THINK_START, THINK_END = "<think>", "</think>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: Dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ThinkingStream:
    """Routes streamed text to "reasoning" or "content", with tags split anywhere across pieces.

    `in_thinking=True` when the prompt already opened `<think>`."""

    def __init__(self, in_thinking: bool = False):
        self.in_thinking = in_thinking
        self.saw_tag = in_thinking
        self._buf = ""  # text that may be the start of a tag
        self._ws = ""  # whitespace held back: trailing reasoning, or leading content before a tag
        self._lstrip = in_thinking
        self._lead = not in_thinking  # only whitespace seen so far, outside a block

    def _emit(self, text: str, out: list):
        if self._lstrip:
            text = text.lstrip()
            if not text:
                return
            self._lstrip = False
        if not text:
            return
        if self.in_thinking:
            body = text.rstrip()
            if body:
                out.append(("reasoning", self._ws + body))
                self._ws = text[len(body) :]
            else:
                self._ws += text
        elif self._lead and not text.strip():
            self._ws += text  # dropped if <think> follows
        else:
            out.append(("content", (self._ws if self._lead else "") + text))
            self._ws, self._lead = "", False

    def feed(self, piece: str) -> List[Tuple[str, str]]:
        out: List[Tuple[str, str]] = []
        self._buf += piece
        while True:
            tag = THINK_END if self.in_thinking else THINK_START
            i = self._buf.find(tag)
            if i < 0:
                break
            self._emit(self._buf[:i], out)
            self._buf = self._buf[i + len(tag) :]
            self.in_thinking = not self.in_thinking
            self.saw_tag, self._ws, self._lstrip, self._lead = True, "", True, False
        k = _partial_tag(self._buf, tag)
        self._emit(self._buf[: len(self._buf) - k], out)
        self._buf = self._buf[len(self._buf) - k :]
        return _merge(out)

    def flush(self) -> List[Tuple[str, str]]:
        out: List[Tuple[str, str]] = []
        self._emit(self._buf, out)
        if self._lead and self._ws:
            out.append(("content", self._ws))
        self._buf, self._ws = "", ""
        return out


def _merge(parts):
    out = []
    for ch, t in parts:
        if out and out[-1][0] == ch:
            out[-1] = (ch, out[-1][1] + t)
        else:
            out.append((ch, t))
    return out


def split_thinking(text: str, in_thinking: Optional[bool] = None) -> Tuple[Optional[str], str]:
    """(reasoning, answer). reasoning is None when there is no think tag (and `in_thinking`
    is not True); a lone `</think>` means the prompt opened the block."""
    s, e = text.find(THINK_START), text.find(THINK_END)
    if in_thinking is None:
        if s < 0 and e < 0:
            return None, text
        in_thinking = e >= 0 and (s < 0 or e < s)
    st = ThinkingStream(in_thinking)
    parts = st.feed(text) + st.flush()
    reasoning = "".join(t for ch, t in parts if ch == "reasoning")
    answer = "".join(t for ch, t in parts if ch == "content")
    return (reasoning if st.saw_tag else None), answer


def _parse_call(body: str) -> Optional[ToolCall]:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models emit the arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], args, **({"id": obj["id"]} if isinstance(obj.get("id"), str) else {}))


def parse_tool_calls(text: str) -> Tuple[str, List[ToolCall]]:
    """(content without the parsed calls, calls). Blocks that are not valid calls stay in the
    content untouched; nothing raises."""
    calls: List[ToolCall] = []
    kept, last = [], 0
    for m in _TOOL_CALL.finditer(text):
        call = _parse_call(m.group(1))
        if call is None:
            continue
        calls.append(call)
        kept.append(text[last : m.start()])
        last = m.end()
    if not calls:
        return text, []
    kept.append(text[last:])
    return "".join(kept).strip(), calls
