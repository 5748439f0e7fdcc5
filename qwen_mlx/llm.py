"""`LLM`: a loaded model + tokenizer with ``generate``, ``stream``, ``chat`` and
multi-turn sessions. Meant to feel natural in a notebook:

>>> llm = qwen_mlx.load()
>>> llm.generate("Name three colours.", max_tokens=30)
>>> for chunk in llm.stream("Tell me a story."): print(chunk.text, end="")
"""

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

from .errors import PromptError, QwenMLXError
from .generate import GenerationStats, PromptCache, generate_tokens
from .generation_config import GenerationConfig, SamplingParams
from .streaming import StopMatcher

Messages = List[Dict]
_SAMPLING = {f.name for f in fields(SamplingParams)}


@dataclass
class Chunk:
    text: str
    channel: str = "content"  # "content" | "reasoning"
    finish_reason: Optional[str] = None
    stats: Optional[GenerationStats] = None


@dataclass
class ChatResponse:
    content: str
    reasoning: Optional[str] = None
    tool_calls: list = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)

    def message(self) -> dict:
        """The assistant message to append to the history."""
        m = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = [{"type": "function", "id": t.id, "function": {
                "name": t.name, "arguments": t.arguments}} for t in self.tool_calls]
        return m

    def __str__(self):
        return self.content


class LLM:
    def __init__(self, model, tokenizer, generation_config: GenerationConfig, path: Path):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.generation_config = generation_config
        self.eos_ids = set(tokenizer.eos_token_ids) | generation_config.eos_token_ids
        self._cache: Optional[PromptCache] = None

    @classmethod
    def load(cls, path_or_id=None, *, dtype=None, dequantize=None, progress=None) -> "LLM":
        from .defaults import default_model_path
        from .loading.loader import load_checkpoint, model_from_checkpoint, resolve_model_path
        from .tokenizer import load_tokenizer, tokenizer_from_gguf

        path = default_model_path() if path_or_id is None else resolve_model_path(path_or_id)
        ck = load_checkpoint(path)
        model = model_from_checkpoint(ck, dtype=dtype, dequantize=dequantize, progress=progress)
        if ck.gguf_metadata is not None:
            tok, gen = tokenizer_from_gguf(ck.gguf_metadata), GenerationConfig()
        else:
            tok, gen = load_tokenizer(path), GenerationConfig.from_dir(path)
        return cls(model, tok, gen, path)

    # -- prompts -------------------------------------------------------------
    def render(self, messages: Messages, *, tools=None, enable_thinking=None,
               add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking)

    def _messages(self, prompt, system) -> Messages:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("the prompt is empty")
            msgs = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt:
            msgs = list(prompt)
        else:
            raise PromptError("the prompt must be a non-empty string or list of messages")
        if system and not (msgs and msgs[0].get("role") == "system"):
            msgs = [{"role": "system", "content": system}] + msgs
        return msgs

    # -- generation ----------------------------------------------------------
    def prepare(self, prompt: Union[str, Messages], *, system: Optional[str] = None, tools=None,
                enable_thinking: Optional[bool] = None, raw: bool = False, **sampling):
        """Render and tokenize a request: (token ids, prompt text, sampling params)."""
        unknown = set(sampling) - _SAMPLING - {"temp"}
        if unknown:
            raise QwenMLXError(f"unknown generation options: {', '.join(sorted(unknown))}")
        if "temp" in sampling:
            sampling["temperature"] = sampling.pop("temp")
        params = SamplingParams(**sampling).merged(self.generation_config)
        if raw:
            if not isinstance(prompt, str) or not prompt:
                raise PromptError("a raw prompt must be a non-empty string")
            text = prompt
        else:
            text = self.render(self._messages(prompt, system), tools=tools, enable_thinking=enable_thinking)
        return self.tokenizer.encode(text), text, params

    def stream(self, prompt: Union[str, Messages], *, max_kv_size: Optional[int] = None,
               kv_bits: Optional[int] = None, reuse_cache: bool = True, **kw) -> Iterator[Chunk]:
        """Stream text chunks. ``prompt`` is a user message (or a message list) rendered
        with the chat template, or, with ``raw=True``, text fed as it is. Options:
        ``system, tools, enable_thinking`` and the `SamplingParams` fields."""
        ids, text, params = self.prepare(prompt, **kw)
        pc = self._prompt_cache(max_kv_size, kv_bits) if reuse_cache else PromptCache(
            self.model, max_kv_size, kv_bits)
        yield from self._stream_ids(ids, text, params, pc)

    def _prompt_cache(self, max_kv_size, kv_bits) -> PromptCache:
        settings = (max_kv_size, kv_bits, 64)
        if self._cache is None or self._cache.settings != settings:
            self._cache = PromptCache(self.model, max_kv_size, kv_bits)
        return self._cache

    def _stream_ids(self, ids, prompt_text, params, pc) -> Iterator[Chunk]:
        from .tokenizer import ThinkingStream

        stats = GenerationStats()
        detok = self.tokenizer.detokenizer()
        stop = StopMatcher(params.stop)
        think = None
        if getattr(self.tokenizer, "has_thinking", False):
            think = ThinkingStream(in_thinking=prompt_text.rstrip().endswith("<think>"))

        def route(text):
            if think is None:
                return [("content", text)] if text else []
            return [(c, t) for c, t in think.feed(text) if t]

        stopped = False
        for tok in generate_tokens(self.model, ids, params, pc, self.eos_ids, stats=stats):
            detok.add_token(tok)
            out, stopped = stop.feed(detok.last_segment)
            for ch, t in route(out):
                yield Chunk(t, ch)
            if stopped:
                stats.finish_reason = "stop"
                break
        if not stopped:
            detok.finalize()
            out, _ = stop.feed(detok.last_segment)
            tail = [(c, t) for c, t in route(out + stop.flush())]
            if think is not None:
                tail += [(c, t) for c, t in think.flush() if t]
            for ch, t in tail:
                yield Chunk(t, ch)
        yield Chunk("", "content", stats.finish_reason, stats)

    def chat(self, messages: Union[str, Messages], **kw) -> ChatResponse:
        """One assistant turn: content, reasoning (Qwen3 ``<think>``) and parsed tool calls."""
        return collect(self.stream(messages, **kw))

    def generate(self, prompt: Union[str, Messages], **kw) -> str:
        """The answer text only (reasoning excluded)."""
        return "".join(c.text for c in self.stream(prompt, **kw) if c.channel == "content")

    def session(self, system: Optional[str] = None, **defaults) -> "ChatSession":
        return ChatSession(self, system, defaults)

    def info(self) -> dict:
        from .inspect import model_info
        return model_info(self.model, self.path)


class ChatSession:
    """Multi-turn chat keeping history; each turn reuses the KV prefix of the last."""

    def __init__(self, llm: LLM, system: Optional[str], defaults: dict):
        self.llm, self.system, self.defaults = llm, system, defaults
        self.messages: Messages = []
        self.cache = PromptCache(llm.model, defaults.pop("max_kv_size", None),
                                 defaults.pop("kv_bits", None))

    def reset(self):
        self.messages = []
        self.cache.reset()

    def stream(self, text: str, **kw) -> Iterator[Chunk]:
        opts = {**self.defaults, **kw}
        msgs = self.messages + [{"role": "user", "content": text}]
        ids, prompt, params = self.llm.prepare(msgs, system=self.system, **opts)
        content = []
        for c in self.llm._stream_ids(ids, prompt, params, self.cache):
            if c.channel == "content":
                content.append(c.text)
            yield c
        # the exact generated text (not stripped): re-rendered, it re-tokenizes to the
        # tokens already in the cache, so the next turn prefills only its new part
        self.messages = msgs + [{"role": "assistant", "content": "".join(content)}]

    def send(self, text: str, **kw) -> ChatResponse:
        return collect(self.stream(text, **kw))


def collect(chunks: Iterator[Chunk]) -> ChatResponse:
    from .tokenizer import parse_tool_calls

    parts = {"content": [], "reasoning": []}
    stats = GenerationStats()
    for c in chunks:
        parts[c.channel].append(c.text)
        stats = c.stats or stats
    content, calls = parse_tool_calls("".join(parts["content"]))
    return ChatResponse(content.strip(), "".join(parts["reasoning"]).strip() or None, calls, stats)
