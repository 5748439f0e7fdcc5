"""load_tokenizer on checkpoint directories: tokenizer.json, vocab.json + merges.txt, errors."""

import json
from pathlib import Path

import pytest

from qwen_mlx.errors import QwenMLXError, TokenizerError
from qwen_mlx.tokenizer import load_tokenizer
from qwen_mlx.tokenizer.bpe import QWEN_SPECIAL_TOKENS
from tests.tokenizer.corpus import texts

TEMPLATE = (Path(__file__).parent / "fixtures" / "qwen3_like.jinja").read_text(encoding="utf-8")
ADDED = {str(151643 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": s}
         for i, (t, s) in enumerate(QWEN_SPECIAL_TOKENS)}
CONFIG = {"added_tokens_decoder": ADDED, "bos_token": None, "eos_token": "<|im_end|>",
          "pad_token": "<|endoftext|>", "unk_token": None, "tokenizer_class": "Qwen2Tokenizer",
          "chat_template": TEMPLATE}


def write(d: Path, name, obj):
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")


@pytest.fixture(scope="module")
def qwen_dir(qwen_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3")
    qwen_tok.backend.save(str(d / "tokenizer.json"))
    write(d, "tokenizer_config.json", CONFIG)
    write(d, "generation_config.json", {"eos_token_id": [151645, 151643], "bos_token_id": 151643})
    return d


@pytest.fixture(scope="module")
def vocab_dir(qwen_tok, tmp_path_factory):
    """The official layout of vocab.json: BPE ranks only, added tokens in the config."""
    d = tmp_path_factory.mktemp("qwen_vocab")
    model = json.loads(qwen_tok.backend.to_str())["model"]
    write(d, "vocab.json", {t: i for t, i in model["vocab"].items() if i < 151643})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    write(d, "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    write(d, "tokenizer_config.json", {**CONFIG, "chat_template": None})
    write(d, "generation_config.json", {"eos_token_id": 151643})
    return d


def test_tokenizer_json_dir(qwen_dir, qwen_tok):
    tok = load_tokenizer(qwen_dir)
    for s in texts(200, seed=5, special=True):
        assert tok.encode(s) == qwen_tok.encode(s)
    assert tok.eos_token_ids == {151643, 151645}
    assert tok.eos_token == "<|im_end|>" and tok.bos_token_id is None and tok.pad_token_id == 151643
    assert tok.chat_template == TEMPLATE and tok.has_thinking
    assert (tok.think_start_id, tok.think_end_id) == (151667, 151668)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(tok.encode("<|im_start|>a<think>"), skip_special_tokens=True) == "a<think>"


def test_matches_transformers_autotokenizer(qwen_dir, transformers_quiet):
    hf = transformers_quiet.AutoTokenizer.from_pretrained(str(qwen_dir))
    tok = load_tokenizer(qwen_dir)
    for s in texts(100, seed=6, special=True):
        assert tok.encode(s) == hf.encode(s, add_special_tokens=False)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    for think in (None, False):
        kw = {} if think is None else {"enable_thinking": think}
        want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
        assert tok.apply_chat_template(msgs, enable_thinking=think) == want


def test_vocab_merges_dir(vocab_dir, qwen_tok):
    tok = load_tokenizer(vocab_dir)
    assert tok.vocab_size == qwen_tok.vocab_size
    for s in texts(300, seed=8, special=True):
        assert tok.encode(s) == qwen_tok.encode(s), s
    assert tok.encode("Hello world, 你好!") == [9707, 1879, 11, 220, 108386, 0]
    assert tok.eos_token_ids == {151643, 151645}  # generation config + ChatML's <|im_end|>
    assert tok.chat_template is None and tok.apply_chat_template([{"role": "user", "content": "x"}]) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_sources(qwen_dir, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((qwen_dir / "tokenizer.json").read_bytes())
    named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    write(d, "tokenizer_config.json", {**CONFIG, "chat_template": named})
    tok = load_tokenizer(d)
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs) == "D" and tok.apply_chat_template(msgs, tools=[]) == "T"
    write(d, "chat_template.json", {"chat_template": "J"})
    assert load_tokenizer(d).apply_chat_template(msgs) == "J"
    write(d, "chat_template.jinja", "F{{ messages[0].content }}")
    assert load_tokenizer(d).apply_chat_template(msgs) == "Fx"  # the .jinja file wins


def test_eos_from_generation_config_int(tmp_path, qwen_dir):
    d = tmp_path / "m"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((qwen_dir / "tokenizer.json").read_bytes())
    write(d, "generation_config.json", {"eos_token_id": 151666})
    tok = load_tokenizer(d)  # no tokenizer_config.json at all
    assert tok.eos_token_ids == {151666, 151645, 151643} and tok.chat_template is None


@pytest.mark.parametrize("case,needle", [
    ("empty", "tokenizer.json"),
    ("corrupt_tokenizer_json", "tokenizer.json"),
    ("corrupt_config", "tokenizer_config.json"),
    ("config_not_object", "tokenizer_config.json"),
    ("bad_chat_template", "tokenizer_config.json"),
    ("corrupt_generation_config", "generation_config.json"),
    ("bad_eos_ids", "generation_config.json"),
    ("bad_chat_template_json", "chat_template.json"),
    ("vocab_without_merges", "merges.txt"),
    ("bad_merges", "merges.txt"),
    ("corrupt_vocab", "vocab.json"),
    ("missing_dir", "does not exist"),
])
def test_errors_name_the_file(tmp_path, qwen_dir, case, needle):
    d = tmp_path / "ckpt"
    d.mkdir()
    tj = (qwen_dir / "tokenizer.json").read_bytes()
    if case != "empty" and "vocab" not in case and "merges" not in case and case != "missing_dir":
        (d / "tokenizer.json").write_bytes(tj)
    if case == "corrupt_tokenizer_json":
        (d / "tokenizer.json").write_bytes(tj[: len(tj) // 2])
    elif case == "corrupt_config":
        write(d, "tokenizer_config.json", "{not json")
    elif case == "config_not_object":
        write(d, "tokenizer_config.json", [1, 2])
    elif case == "bad_chat_template":
        write(d, "tokenizer_config.json", {"chat_template": 42})
    elif case == "corrupt_generation_config":
        write(d, "generation_config.json", "")
    elif case == "bad_eos_ids":
        write(d, "generation_config.json", {"eos_token_id": "<|im_end|>"})
    elif case == "bad_chat_template_json":
        write(d, "chat_template.json", {"template": "x"})
    elif case == "vocab_without_merges":
        write(d, "vocab.json", {"a": 0})
    elif case == "bad_merges":
        write(d, "vocab.json", {"a": 0, "b": 1, "ab": 2})
        write(d, "merges.txt", "#version: 0.2\na b\na c\n")
    elif case == "corrupt_vocab":
        write(d, "vocab.json", "[")
        write(d, "merges.txt", "")
    elif case == "missing_dir":
        d = tmp_path / "nowhere"
    with pytest.raises(TokenizerError, match=needle.replace(".", r"\.")) as e:
        load_tokenizer(d)
    assert isinstance(e.value, QwenMLXError)


def test_qwen1_tiktoken_dir(tmp_path, qwen_tiktoken_path):
    """Qwen 1.0 checkpoints ship qwen.tiktoken (its remote code is never run)."""
    (tmp_path / "qwen.tiktoken").symlink_to(qwen_tiktoken_path)
    write(tmp_path, "tokenizer_config.json", {"tokenizer_class": "QWenTokenizer", "auto_map": {}})
    write(tmp_path, "generation_config.json", {"eos_token_id": 151643})
    tok = load_tokenizer(tmp_path)
    assert tok.encode("Hello world, 你好!<|extra_0|>") == [9707, 1879, 11, 220, 108386, 0, 151646]
    assert tok.token_to_id("<|extra_204|>") == 151850 and tok.token_to_id("<think>") is None
    assert tok.eos_token_ids == {151643, 151645} and not tok.has_thinking
