"""The BPE rebuilt from qwen.tiktoken encodes exactly like tiktoken itself."""

import json
import unicodedata

import pytest

from qwen_mlx.errors import TokenizerError
from qwen_mlx.tokenizer import tokenizer_from_tiktoken
from qwen_mlx.tokenizer.bpe import read_tiktoken, spell_bytes
from tests.tokenizer.corpus import texts


def test_known_ids_and_specials(qwen_tok):
    assert qwen_tok.encode("Hello world, 你好!") == [9707, 1879, 11, 220, 108386, 0]
    assert qwen_tok.decode([9707, 1879, 11, 220, 108386, 0]) == "Hello world, 你好!"
    expect = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
              "<|object_ref_start|>": 151646, "<|vision_start|>": 151652, "<|video_pad|>": 151656,
              "<tool_call>": 151657, "</tool_call>": 151658, "<|fim_prefix|>": 151659,
              "<|file_sep|>": 151664, "<tool_response>": 151665, "</tool_response>": 151666,
              "<think>": 151667, "</think>": 151668}
    for t, i in expect.items():
        assert qwen_tok.token_to_id(t) == i and qwen_tok.id_to_token(i) == t
        assert qwen_tok.encode(f"a{t}b") == [64, i, 65]
    assert qwen_tok.vocab_size == 151669
    # special ones vanish with skip_special_tokens; <think>/<tool_call> are plain added tokens
    ids = qwen_tok.encode("<|im_start|>x<think>y</think><|im_end|>")
    assert qwen_tok.decode(ids, skip_special_tokens=True) == "x<think>y</think>"
    assert qwen_tok.decode(ids) == "<|im_start|>x<think>y</think><|im_end|>"
    assert qwen_tok.decode([9707, 151900]) == "Hello"  # padded-embedding ids decode to nothing
    assert qwen_tok.id_to_token(-1) is None and qwen_tok.id_to_token(151900) is None
    with pytest.raises(TokenizerError):
        qwen_tok.decode([-1])


def test_merge_count(qwen_tok):
    model = json.loads(qwen_tok.backend.to_str())["model"]
    assert len(model["merges"]) == 151_387
    assert model["type"] == "BPE"


def test_generated_strings_match_tiktoken(qwen_tok, tiktoken_enc):
    corpus = texts(3000, seed=1, special=True) + texts(500, seed=2)
    bad = []
    for s in corpus:
        ids = qwen_tok.encode(s)
        if ids != tiktoken_enc(s):
            bad.append(s)
        assert qwen_tok.decode(ids) == unicodedata.normalize("NFC", s)  # lossless (NFC) round trip
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]!r}"


def test_edge_strings_match_tiktoken(qwen_tok, tiktoken_enc):
    edge = ["", " ", "  ", "\n", "\r\n", "a\r\n\r\nb", "x   ", "   x", "\t\t\n  \n", "1234567",
            "I'm here, you'RE there", "don't\n\n\nstop", "😀" * 5, "a" * 300, " " * 100 + "z",
            "中文" * 50, "<|im_end|><|im_end|>", "<|im_end", "<|endoftext|>text", "\u0000\u0001\u007f",
            "e\u0301", "\U0010ffff\uffff\ufffd"]
    for s in edge:
        assert qwen_tok.encode(s) == tiktoken_enc(s), repr(s)


def test_every_vocab_entry_matches_tiktoken(qwen_tok, tiktoken_enc, qwen_tiktoken_path):
    ranks = read_tiktoken(qwen_tiktoken_path)
    strings = []
    for b in ranks:
        try:
            strings.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    ours = [e.ids for e in qwen_tok.backend.encode_batch(strings, add_special_tokens=False)]
    mismatch = [s for s, o in zip(strings, ours) if o != tiktoken_enc(s)]
    assert len(strings) > 140_000 and not mismatch, mismatch[:5]
    # and each rank is a vocabulary entry at its id, spelled in the byte alphabet
    vocab = qwen_tok.backend.get_vocab()
    assert all(vocab[spell_bytes(b)] == r for b, r in ranks.items())


def test_custom_special_tokens_and_errors(qwen_tiktoken_path, tmp_path):
    tok = tokenizer_from_tiktoken(qwen_tiktoken_path, {"<|endoftext|>": 151643, "<|extra_0|>": 151646})
    assert tok.encode("hi<|extra_0|>") == [6023, 151646]
    assert tok.token_to_id("<|im_start|>") is None
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not base64 !!\n")
    with pytest.raises(TokenizerError, match="bad.tiktoken"):
        tokenizer_from_tiktoken(bad)
    with pytest.raises(TokenizerError, match="missing.tiktoken"):
        tokenizer_from_tiktoken(tmp_path / "missing.tiktoken")
