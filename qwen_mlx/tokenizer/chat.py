"""Rendering chat templates the way transformers' `apply_chat_template(tokenize=False)` does.

A checkpoint's Jinja template runs in jinja2's immutable sandbox with trim_blocks and
lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape, and the
`{% generation %}` tag (rendered as its body). Without a template we write ChatML.
"""

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Dict, List, Optional

from ..errors import TokenizerError

THINK_OFF = "<think>\n\n</think>\n\n"  # what Qwen3 templates write for enable_thinking=False
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _raise(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # training-mask marker: render the body unchanged
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not parse: {e}") from e


def check_messages(messages) -> List[Dict[str, Any]]:
    """Validate and copy: drop None-valued keys (as transformers does) and alias reasoning."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"message {i} is a {type(m).__name__}, not a dict")
        m = {k: v for k, v in m.items() if v is not None}
        if not isinstance(m.get("role"), str):
            raise TokenizerError(f"message {i} has no string 'role'")
        if "content" not in m and "tool_calls" not in m:
            raise TokenizerError(f"message {i} has no 'content'")
        c = m.get("content", "")
        if not isinstance(c, (str, list)):
            raise TokenizerError(f"message {i} content must be a string or a list of parts")
        r = next((m[k] for k in _REASONING_KEYS if m.get(k) is not None), None)
        if r is not None:
            m = {"thinking": r, **m, "reasoning_content": r}
        out.append(m)
    return out


IMAGE_PART = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PART = "<|vision_start|><|video_pad|><|vision_end|>"


def part_kind(p) -> str:
    """"image" | "video" | "text" | "" of a content part, read as the Qwen-VL templates do
    (``type``, else an ``image`` / ``image_url`` / ``video`` key)."""
    if isinstance(p, str):
        return "text"
    if not isinstance(p, dict):
        return ""
    t = p.get("type")
    if t in ("image", "image_url") or (t is None and ("image" in p or "image_url" in p)):
        return "image"
    if t == "video" or (t is None and "video" in p):
        return "video"
    return "text" if t in (None, "text") else ""


def content_text(content) -> str:
    """A message's content as ChatML text: list parts in order, images and videos as the
    Qwen-VL placeholders (``<|vision_start|><|image_pad|><|vision_end|>``)."""
    if isinstance(content, str):
        return content
    parts = []
    for p in content:
        kind = part_kind(p)
        if kind == "image":
            parts.append(IMAGE_PART)
        elif kind == "video":
            parts.append(VIDEO_PART)
        elif kind == "text":
            parts.append(p if isinstance(p, str) else p.get("text", ""))
    return "".join(parts)


def render_template(source: str, messages, *, tools=None, add_generation_prompt=True,
                    special: Optional[Dict[str, str]] = None, **extra) -> str:
    import jinja2

    messages = check_messages(messages)
    if tools is not None:
        tools = list(tools)
        if not all(isinstance(t, dict) for t in tools):
            raise TokenizerError("tools must be JSON-schema dicts")
    variables = {**(special or {}), **extra}
    try:
        return compile_template(source).render(
            messages=messages, tools=tools, documents=variables.pop("documents", None),
            add_generation_prompt=add_generation_prompt, **variables,
        )
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from e


def render_chatml(messages, *, add_generation_prompt=True, think_off=False) -> str:
    messages = check_messages(messages)
    s = "".join(
        f"<|im_start|>{m['role']}\n{content_text(m.get('content', ''))}<|im_end|>\n" for m in messages
    )
    if add_generation_prompt:
        s += "<|im_start|>assistant\n" + (THINK_OFF if think_off else "")
    return s
