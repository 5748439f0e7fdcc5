"""`LLM`: a loaded model + tokenizer with ``generate``, ``stream``, ``chat`` and
multi-turn sessions. Meant to feel natural in a notebook:

>>> llm = qwen_mlx.load()
>>> llm.generate("Name three colours.", max_tokens=30)
>>> for chunk in llm.stream("Tell me a story."): print(chunk.text, end="")

On a VL checkpoint (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe) messages may hold images and
videos, and a string prompt takes ``images=`` / ``videos=``:

>>> llm.chat([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
...                                        {"type": "text", "text": "What is this?"}]}])
>>> llm.generate("Compare them.", images=["a.jpg", "b.png"], videos=["clip.mp4"])
"""

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

from .errors import PromptError, QwenMLXError
from .generate import GenerationStats, PromptCache, generate_tokens
from .generation_config import GenerationConfig, SamplingParams
from .multimodal import (MediaPromptCache, Request, as_list, check_media_support, is_vl, media_prefill,
                         process_media, split_media, text_only, user_content)
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
    def __init__(self, model, tokenizer, generation_config: GenerationConfig, path: Path, processor=None,
                 model_type: str = ""):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.processor = processor  # VisionProcessor of a VL checkpoint, else None
        self.model_type = model_type
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
        proc = None
        if is_vl(model):
            from .vision.processing import VisionProcessor
            proc = VisionProcessor.from_pretrained(path, ck.config["model_type"])
        return cls(model, tok, gen, path, proc, ck.config["model_type"])

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
    def prepare(self, prompt: Union[str, Messages], **kw):
        """Render and tokenize a request: (token ids, prompt text, sampling params)."""
        r = self.prepare_request(prompt, **kw)
        return r.ids, r.text, r.params

    def prepare_request(self, prompt: Union[str, Messages], *, images=None, videos=None,
                        system: Optional[str] = None, tools=None, enable_thinking: Optional[bool] = None,
                        raw: bool = False, **sampling) -> Request:
        """Render, process media and tokenize a request. Media come as content parts of the
        messages, or as ``images`` / ``videos`` (a string prompt: they precede its text; a raw
        prompt: it holds one ``<|image_pad|>`` / ``<|video_pad|>`` per item)."""
        unknown = set(sampling) - _SAMPLING - {"temp"}
        if unknown:
            raise QwenMLXError(f"unknown generation options: {', '.join(sorted(unknown))}")
        if "temp" in sampling:
            sampling["temperature"] = sampling.pop("temp")
        params = SamplingParams(**sampling).merged(self.generation_config)
        if raw:
            if not isinstance(prompt, str) or not prompt:
                raise PromptError("a raw prompt must be a non-empty string")
            text, images, videos = prompt, as_list(images), as_list(videos)
        else:
            if images or videos:
                if not isinstance(prompt, str):
                    raise PromptError("images= / videos= go with a string prompt; put media in the "
                                      "messages' content parts instead")
                if not prompt.strip():
                    raise PromptError("the prompt is empty")
                prompt = [{"role": "user", "content": user_content(prompt, images, videos)}]
            msgs, images, videos = split_media(self._messages(prompt, system))
            text = self.render(msgs, tools=tools, enable_thinking=enable_thinking)
        check_media_support(self.model, self.model_type, len(images), len(videos))
        if not (images or videos):
            return Request(self.tokenizer.encode(text), text, params)
        text, visual = process_media(self.processor, self.tokenizer, self.model, text, images, videos)
        return Request(self.tokenizer.encode(text), text, params, visual)

    def stream(self, prompt: Union[str, Messages], *, max_kv_size: Optional[int] = None,
               kv_bits: Optional[int] = None, reuse_cache: bool = True, **kw) -> Iterator[Chunk]:
        """Stream text chunks. ``prompt`` is a user message (or a message list) rendered
        with the chat template, or, with ``raw=True``, text fed as it is. Options:
        ``images, videos, system, tools, enable_thinking`` and the `SamplingParams` fields."""
        req = self.prepare_request(prompt, **kw)
        pc = self._prompt_cache(max_kv_size, kv_bits) if reuse_cache else self.new_cache(max_kv_size, kv_bits)
        yield from self._stream_ids(req.ids, req.text, req.params, pc, req.visual)

    def new_cache(self, max_kv_size=None, kv_bits=None) -> PromptCache:
        """A prompt cache for this model (with a vision-feature cache on VL models)."""
        cls = MediaPromptCache if is_vl(self.model) else PromptCache
        return cls(self.model, max_kv_size, kv_bits)

    def _prompt_cache(self, max_kv_size, kv_bits) -> PromptCache:
        settings = (max_kv_size, kv_bits, 64)
        if self._cache is None or self._cache.settings != settings:
            old = getattr(self._cache, "features", None)
            self._cache = self.new_cache(max_kv_size, kv_bits)
            if old is not None:
                self._cache.features = old
        return self._cache

    def _stream_ids(self, ids, prompt_text, params, pc, visual=None) -> Iterator[Chunk]:
        from .tokenizer import ThinkingStream

        prefill = None
        if visual is not None:
            prefill = media_prefill(self.model, ids, visual, pc)
        else:
            text_only(self.model, ids, pc)

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
        for tok in generate_tokens(self.model, ids, params, pc, self.eos_ids, stats=stats, prefill=prefill):
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
    """Multi-turn chat keeping history; each turn reuses the KV prefix of the last (images and
    videos of earlier turns included: a new question about them prefills only its text)."""

    def __init__(self, llm: LLM, system: Optional[str], defaults: dict):
        self.llm, self.system, self.defaults = llm, system, defaults
        self.messages: Messages = []
        self.cache = llm.new_cache(defaults.pop("max_kv_size", None), defaults.pop("kv_bits", None))

    def reset(self):
        self.messages = []
        self.cache.reset()

    def stream(self, text: Union[str, list], *, images=None, videos=None, **kw) -> Iterator[Chunk]:
        """One turn: ``text`` (or a list of content parts), with optional ``images`` / ``videos``."""
        opts = {**self.defaults, **kw}
        if isinstance(text, str) and not text.strip() and not (images or videos):
            raise PromptError("the message is empty")
        msgs = self.messages + [{"role": "user", "content": user_content(text, images, videos)}]
        req = self.llm.prepare_request(msgs, system=self.system, **opts)
        content = []
        for c in self.llm._stream_ids(req.ids, req.text, req.params, self.cache, req.visual):
            if c.channel == "content":
                content.append(c.text)
            yield c
        # the exact generated text (not stripped): re-rendered, it re-tokenizes to the
        # tokens already in the cache, so the next turn prefills only its new part
        self.messages = msgs + [{"role": "assistant", "content": "".join(content)}]

    def send(self, text: Union[str, list], **kw) -> ChatResponse:
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
