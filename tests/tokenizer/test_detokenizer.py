"""Streaming detokenization with the real Qwen BPE: whole characters only, exact concatenation."""

import random

import pytest

from tests.tokenizer.corpus import texts

STREAM_TEXTS = [
    " Hello world",  # leading space kept (Qwen's decode does not strip it)
    "你好，世界！今天天气很好。",
    "😀👍🏽👨‍👩‍👧‍👦🇫🇷 emoji mix 🚀",
    "Mixed 中文 and English, русский, 日本語, 한국어, عربي, हिन्दी.",
    "<|im_start|>assistant\n<think>\n思考中…\n</think>\n\n答案是 42。<|im_end|>",
    "  leading and trailing spaces  ",
    "\r\n\tcode:\n    return {'ü': 1}\n",
    "nul\x00byte and \x7f",  # byte 0 is a real byte (mlx-lm's BPE detokenizer mangles it)
]


def stream(tok, ids):
    d = tok.detokenizer()
    pieces = []
    for i in ids:
        d.add_token(i)
        pieces.append(d.last_segment)
    d.finalize()
    pieces.append(d.last_segment)
    return d, pieces


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_pieces(qwen_tok, text):
    ids = qwen_tok.encode(text)
    d, pieces = stream(qwen_tok, ids)
    assert "".join(pieces) == d.text == qwen_tok.decode(ids) == text
    assert d.tokens == ids
    assert not any("\ufffd" in p for p in pieces)


def test_text_is_released_as_soon_as_complete(qwen_tok):
    text = "a你好😀b 🇫🇷<|im_end|>x"
    ids = qwen_tok.encode(text)
    assert len(ids) > 8  # the emoji and CJK characters span several byte-level tokens
    d = qwen_tok.detokenizer()
    for k, i in enumerate(ids, 1):
        d.add_token(i)
        full = qwen_tok.decode(ids[:k])
        if not full.endswith("\ufffd"):
            assert d.text == full  # nothing held back once the characters are whole
        else:
            assert full.startswith(d.text) and "\ufffd" not in d.text


def test_generated_corpus(qwen_tok):
    for s in texts(300, seed=7, special=True):
        ids = qwen_tok.encode(s)
        d, pieces = stream(qwen_tok, ids)
        assert "".join(pieces) == qwen_tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces), s


def test_random_ids_concat_exactly(qwen_tok):
    # arbitrary id sequences (broken UTF-8 included): the concatenation is still exact
    rng = random.Random(3)
    for _ in range(300):
        ids = [rng.randrange(qwen_tok.vocab_size) for _ in range(rng.randint(1, 20))]
        _, pieces = stream(qwen_tok, ids)
        assert "".join(pieces) == qwen_tok.decode(ids)


def test_reset_and_reuse(qwen_tok):
    d = qwen_tok.detokenizer()
    for i in qwen_tok.encode("first"):
        d.add_token(i)
    d.reset()
    ids = qwen_tok.encode(" second 😀")
    for i in ids:
        d.add_token(i)
    d.finalize()
    assert d.text == " second 😀" and d.tokens == ids
