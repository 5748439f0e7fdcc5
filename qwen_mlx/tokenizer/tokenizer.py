"""The runtime tokenizer: a `tokenizers.Tokenizer` plus what a checkpoint says around it
(special tokens, EOS ids from generation_config.json, chat templates)."""

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Union

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from ..errors import TokenizerError
from . import bpe
from .chat import render_chatml, render_template
from .detokenizer import StreamingDetokenizer
from .parsing import THINK_END, THINK_START


def _token_str(t) -> Optional[str]:
    """tokenizer_config writes special tokens as "str" or {"content": "str", ...}."""
    if isinstance(t, dict):
        t = t.get("content")
    return t if isinstance(t, str) else None


class Tokenizer:
    """Encode/decode, chat templates and streaming detokenization over a `tokenizers.Tokenizer`.

    `eos_token_ids` joins the config's eos token, the given ids (generation_config.json) and,
    for ChatML vocabularies, `<|im_end|>` and `<|endoftext|>`."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token: Optional[str] = None,
        eos_token: Optional[str] = None,
        pad_token: Optional[str] = None,
        unk_token: Optional[str] = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: Union[str, Dict[str, str], None] = None,
    ):
        self._tok = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        if isinstance(chat_template, str):
            chat_template = {"default": chat_template}
        self.chat_templates: Dict[str, str] = dict(chat_template or {})
        eos = {int(i) for i in eos_token_ids}
        if eos_token is not None and self.token_to_id(eos_token) is not None:
            eos.add(self.token_to_id(eos_token))
        if self.token_to_id("<|im_start|>") is not None and self.token_to_id("<|im_end|>") is not None:
            eos |= {i for i in (self.token_to_id("<|im_end|>"), self.token_to_id("<|endoftext|>"))
                    if i is not None}
        self.eos_token_ids: Set[int] = eos
        self.think_start_id = self.token_to_id(THINK_START)
        self.think_end_id = self.token_to_id(THINK_END)

    # -- vocabulary ---------------------------------------------------------------------------
    @property
    def backend(self) -> HFTokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(int(i)) if int(i) >= 0 else None

    def _id(self, token):
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._id(self.bos_token)

    @property
    def pad_token_id(self) -> Optional[int]:
        return self._id(self.pad_token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._id(self.eos_token) if self.eos_token else min(self.eos_token_ids, default=None)

    @property
    def has_thinking(self) -> bool:
        return self.think_start_id is not None and self.think_end_id is not None

    # -- text -----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        try:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        except OverflowError as e:
            raise TokenizerError(f"token ids must be non-negative 32-bit ints: {e}") from e

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self.decode)

    # -- chat -----------------------------------------------------------------------------------
    @property
    def chat_template(self) -> Optional[str]:
        return self.chat_templates.get("default")

    def _template(self, name_or_source, tools) -> Optional[str]:
        t = self.chat_templates
        if name_or_source is not None:
            return t.get(name_or_source, name_or_source)
        if tools is not None and "tool_use" in t:
            return t["tool_use"]
        if t and "default" not in t:
            raise TokenizerError(f"several chat templates and no default: {sorted(t)}")
        return t.get("default")

    def apply_chat_template(self, messages, *, tools=None, add_generation_prompt: bool = True,
                            enable_thinking: Optional[bool] = None, chat_template: Optional[str] = None,
                            **extra) -> str:
        source = self._template(chat_template, tools)
        if source is None:
            return render_chatml(messages, add_generation_prompt=add_generation_prompt,
                                 think_off=enable_thinking is False and self.has_thinking)
        if enable_thinking is not None:
            extra["enable_thinking"] = enable_thinking
        special = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                     ("unk_token", self.unk_token), ("pad_token", self.pad_token))
                   if v is not None}
        return render_template(source, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                               special=special, **extra)

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos={sorted(self.eos_token_ids)}, "
                f"chat_template={'yes' if self.chat_templates else 'ChatML'})")


# -- constructors -------------------------------------------------------------------------------
def tokenizer_from_tiktoken(path, special_tokens: Optional[Dict[str, int]] = None, *,
                            pattern: Optional[str] = None, **kwargs) -> Tokenizer:
    """From a `.tiktoken` ranks file. Default special tokens: Qwen2.5/Qwen3's, placed after the
    ranks; default regex: Qwen2's (Qwen3.5's for its 248,044-rank file)."""
    tok = bpe.tiktoken_to_hf(path, special_tokens, pattern)
    kwargs.setdefault("pad_token", "<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else None)
    return Tokenizer(tok, **kwargs)


def tokenizer_from_gguf(metadata: dict) -> Tokenizer:
    """From GGUF metadata, e.g. `mlx.core.load(path, return_metadata=True)[1]`."""
    tok = bpe.gguf_to_hf(metadata)
    tokens = metadata["tokenizer.ggml.tokens"]

    def name(key):
        i = metadata.get(f"tokenizer.ggml.{key}")
        i = i.tolist() if hasattr(i, "tolist") else i
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    template = metadata.get("tokenizer.chat_template")
    eos_ids = [tok.token_to_id(t) for t in (name("eot_token_id"), name("eom_token_id")) if t]
    return Tokenizer(tok, bos_token=name("bos_token_id"), eos_token=name("eos_token_id"),
                     pad_token=name("padding_token_id"), unk_token=name("unknown_token_id"),
                     eos_token_ids=[i for i in eos_ids if i is not None],
                     chat_template=template if isinstance(template, str) else None)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path.name} ({path}): {e}") from e


def _read_chat_templates(d: Path, config: dict) -> Dict[str, str]:
    """chat_template.jinja (+ additional_chat_templates/*.jinja) > chat_template.json >
    tokenizer_config.json's "chat_template" (a string or a list of {name, template})."""
    out: Dict[str, str] = {}
    if (d / "chat_template.jinja").is_file():
        for f in [d / "chat_template.jinja", *sorted((d / "additional_chat_templates").glob("*.jinja"))]:
            try:
                out["default" if f.parent == d else f.stem] = f.read_text(encoding="utf-8")
            except (OSError, ValueError) as e:
                raise TokenizerError(f"cannot read {f.name} ({f}): {e}") from e
        return out
    ct = config.get("chat_template")
    if (d / "chat_template.json").is_file():
        ct = _read_json(d / "chat_template.json")
        ct = ct.get("chat_template") if isinstance(ct, dict) else None
        if ct is None:
            raise TokenizerError(f"chat_template.json ({d}) has no 'chat_template'")
    if isinstance(ct, str):
        out["default"] = ct
    elif isinstance(ct, list):
        for t in ct:
            if not (isinstance(t, dict) and all(isinstance(t.get(k), str) for k in ("name", "template"))):
                raise TokenizerError(f"tokenizer_config.json ({d}): bad chat_template entry {str(t)[:80]}")
            out[t["name"]] = t["template"]
    elif ct is not None:
        raise TokenizerError(f"tokenizer_config.json ({d}): chat_template must be a string or a list")
    return out


def _added_tokens(config: dict) -> List[tuple]:
    dec = config.get("added_tokens_decoder") or {}
    if not isinstance(dec, dict):
        raise TokenizerError("tokenizer_config.json: added_tokens_decoder must be an object")
    out = []
    for i, t in dec.items():
        content = _token_str(t)
        if content is None or not str(i).isdigit():
            raise TokenizerError(f"tokenizer_config.json: bad added token {i!r}: {str(t)[:80]}")
        out.append((content, int(i), bool(t.get("special", True)) if isinstance(t, dict) else True))
    return sorted(out, key=lambda x: x[1])


def load_tokenizer(model_dir) -> Tokenizer:
    """From a checkpoint directory (tokenizer.json, or vocab.json + merges.txt, or a Qwen 1.0
    `qwen.tiktoken`), or directly from a `.gguf` or `.tiktoken` file."""
    d = Path(model_dir)
    if d.is_file() and d.suffix == ".gguf":
        import mlx.core as mx

        try:
            meta = mx.load(str(d), return_metadata=True)[1]
        except Exception as e:
            raise TokenizerError(f"cannot read GGUF metadata from {d.name}: {e}") from e
        return tokenizer_from_gguf(meta)
    if d.is_file() and d.suffix == ".tiktoken":
        return tokenizer_from_tiktoken(d)
    if not d.is_dir():
        raise TokenizerError(f"tokenizer directory {d} does not exist")

    config = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").exists() else {}
    if not isinstance(config, dict):
        raise TokenizerError(f"tokenizer_config.json ({d}) is not a JSON object")
    gen = _read_json(d / "generation_config.json") if (d / "generation_config.json").exists() else {}
    if not isinstance(gen, dict):
        raise TokenizerError(f"generation_config.json ({d}) is not a JSON object")
    added = _added_tokens(config)
    cls = str(config.get("tokenizer_class") or "")
    tiktokens = sorted(d.glob("*.tiktoken"))

    if (d / "tokenizer.json").exists():
        try:
            tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:
            raise TokenizerError(f"tokenizer.json ({d}) is malformed: {str(e)[:200]}") from e
        for content, i, special in added:  # entries only the config lists, appended in order
            if tok.token_to_id(content) is None and i == tok.get_vocab_size(with_added_tokens=True):
                t = AddedToken(content, special=special, normalized=False)
                (tok.add_special_tokens if special else tok.add_tokens)([t])
    elif (d / "vocab.json").exists():
        if not (d / "merges.txt").exists():
            raise TokenizerError(f"vocab.json found in {d} but merges.txt is missing")
        gpt2 = "GPT2" in cls and "Qwen" not in cls
        pattern = None if gpt2 else bpe.QWEN35_PATTERN if "Qwen3_5" in cls else bpe.QWEN2_PATTERN
        tok = bpe.vocab_merges_to_hf(d / "vocab.json", d / "merges.txt", added, pattern=pattern, nfc=not gpt2)
    elif tiktokens:  # Qwen 1.0
        tok = bpe.tiktoken_to_hf(tiktokens[0], names=bpe.QWEN1_SPECIAL_NAMES)
    else:
        raise TokenizerError(f"no tokenizer.json (nor vocab.json + merges.txt) in {d}")

    eos_ids = gen.get("eos_token_id", [])
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else eos_ids
    if not (isinstance(eos_ids, list) and all(isinstance(i, int) for i in eos_ids)):
        raise TokenizerError(f"generation_config.json ({d}): eos_token_id must be an int or a list of ints")
    return Tokenizer(
        tok,
        bos_token=_token_str(config.get("bos_token")),
        eos_token=_token_str(config.get("eos_token")),
        pad_token=_token_str(config.get("pad_token")),
        unk_token=_token_str(config.get("unk_token")),
        eos_token_ids=eos_ids,
        chat_template=_read_chat_templates(d, config),
    )
