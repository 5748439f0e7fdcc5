"""The tokenizer in the real SmolLM2 GGUF matches transformers' GGUF loader."""

import pytest

from qwen_mlx.errors import ModelNotFoundError, TokenizerError
from qwen_mlx.tokenizer import load_tokenizer, tokenizer_from_gguf
from qwen_mlx.tokenizer.bpe import byte_alphabet
from tests.tokenizer.corpus import texts

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>", "<empty_output>"]


@pytest.fixture(scope="module")
def gguf_path():
    from qwen_mlx.defaults import default_model_path

    try:
        return default_model_path(fetch=False)
    except ModelNotFoundError as e:
        pytest.skip(f"default GGUF not cached (tests never download): {e}")


@pytest.fixture(scope="module")
def meta(gguf_path):
    import mlx.core as mx

    return mx.load(str(gguf_path), return_metadata=True)[1]


@pytest.fixture(scope="module")
def ours(meta):
    return tokenizer_from_gguf(meta)


@pytest.fixture(scope="module")
def hf(gguf_path, transformers_quiet):
    pytest.importorskip("gguf")
    return transformers_quiet.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_ids_match_transformers(ours, hf):
    corpus = texts(400, seed=11) + [f"a{t}b {t}\n" for t in SPECIAL] + [
        "Hello world", " 12345 678", "don't STOP", "  \n\n  x", "你好", "<|im_start|>user\nHi<|im_end|>\n"]
    bad = [s for s in corpus if ours.encode(s) != hf.encode(s, add_special_tokens=False)]
    assert not bad, f"{len(bad)} mismatches, first {bad[0]!r}"
    # SmolLM2's vocabulary lacks 21 byte values (e.g. 0xF2): text using them cannot round-trip
    known = {b for b, c in enumerate(byte_alphabet()) if ours.token_to_id(c) is not None}
    assert len(known) == 235
    lossless = 0
    for s in corpus[:150]:
        ids = ours.encode(s)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
        if set(s.encode()) <= known:
            assert ours.decode(ids) == s
            lossless += 1
    assert lossless > 100
    assert ours.encode("x", add_special_tokens=True) == hf.encode("x")  # add_bos_token is false here


def test_vocab_and_special_tokens(ours, hf, meta):
    assert ours.vocab_size == len(meta["tokenizer.ggml.tokens"]) == len(hf) == 49152
    assert ours.token_to_id("<|im_end|>") == 2 and ours.id_to_token(1) == "<|im_start|>"
    assert ours.encode("<|im_start|>") == [1]
    assert {2, 0} <= ours.eos_token_ids and ours.eos_token == hf.eos_token == "<|im_end|>"
    assert ours.bos_token_id == 1 and ours.pad_token_id == 2
    assert not ours.has_thinking


def test_chat_template_matches_transformers(ours, hf):
    assert ours.chat_template and ours.chat_template == hf.chat_template
    for msgs in ([{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "你好"}]):
        for gen in (True, False):
            want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == want
    prompt = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|im_start|>assistant\n") and ours.encode(prompt)[0] == 1


def test_stream_decode(ours):
    text = "<|im_start|>assistant\nThe capital of France is Paris. 🇫🇷 café<|im_end|>"
    d = ours.detokenizer()
    for i in ours.encode(text):
        d.add_token(i)
        assert "\ufffd" not in d.text
    d.finalize()
    assert d.text == text


def test_load_tokenizer_from_gguf_file(gguf_path, ours):
    tok = load_tokenizer(gguf_path)
    assert tok.encode("Hello 世界") == ours.encode("Hello 世界") and tok.eos_token_ids == ours.eos_token_ids


def test_pre_tokenizer_choice_and_errors(meta):
    base = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    # Same vocabulary with pre="qwen2": Qwen's regex (digits split one by one, NFC)
    q = tokenizer_from_gguf({**base, "tokenizer.ggml.pre": "qwen2"})
    assert len(q.encode("word 2024")) > 1 and q.encode("e\u0301") == q.encode("\u00e9")
    b = tokenizer_from_gguf({**base, "tokenizer.ggml.add_bos_token": True})
    assert b.encode("hi", add_special_tokens=True) == [1] + b.encode("hi")
    with pytest.raises(TokenizerError, match="llama"):
        tokenizer_from_gguf({**base, "tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError, match="tokens"):
        tokenizer_from_gguf({k: v for k, v in base.items() if k != "tokenizer.ggml.tokens"})
    with pytest.raises(TokenizerError, match="merges"):
        tokenizer_from_gguf({k: v for k, v in base.items() if k != "tokenizer.ggml.merges"})
