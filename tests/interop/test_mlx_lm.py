"""Interop with mlx-lm 0.32: what qwen_mlx converts, `mlx_lm.load` reads and greedy-decodes
to the same tokens; what `mlx_lm.convert` quantizes, qwen_mlx loads with the same logits."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from qwen_mlx import load_model
from qwen_mlx.config import normalize_config
from qwen_mlx.quant import ConvertOptions, convert
from tests.helpers import REL_TOL, mlx_greedy, rel_err
from tests.quant.builders import VOCAB, hf_dir

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm.generate import stream_generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402
from mlx_lm.utils import dequantize_model  # noqa: E402
from mlx_lm.utils import load_model as lm_load_model  # noqa: E402

PROMPT = np.random.default_rng(1).integers(2, VOCAB, size=(1, 7))
IDS = mx.array(np.random.default_rng(2).integers(0, VOCAB, size=(2, 9)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    return {f: hf_dir(f, root / f) for f in ("qwen3", "qwen3_moe")}


def lm_greedy(path, prompt, n):
    model, tok = mlx_lm.load(str(path))
    out = [r.token for r in stream_generate(model, tok, mx.array(prompt[0]), max_tokens=n,
                                            sampler=make_sampler(0.0))]
    return model, out


@pytest.mark.parametrize("family,opts", [
    ("qwen3", dict(bits=4)),
    ("qwen3", dict(recipe="mixed-4-8", keep_bits="k_proj=keep,o_proj=3/32")),
    ("qwen3_moe", dict(bits=4)),
    ("qwen3_moe", dict(recipe="mxfp4", keep_bits="router=8")),
])
def test_qwen_mlx_dir_loads_in_mlx_lm(sources, tmp_path, family, opts):
    dst = convert(sources[family], tmp_path / "q", ConvertOptions(**opts)).path
    lm_model, lm_tokens = lm_greedy(dst, PROMPT, 16)
    ours = load_model(dst, dequantize=False)  # q/k/v and gate/up fused at load
    assert mlx_greedy(ours, PROMPT, 16) == lm_tokens and len(lm_tokens) == 16
    assert rel_err(np.array(ours(IDS)), np.array(lm_model(IDS))) <= 1e-5
    # mlx-lm built the same quantized modules from our config block, and the same model
    unfused = load_model(dst, dequantize=False, fuse=False)
    assert rel_err(np.array(unfused(IDS)), np.array(lm_model(IDS))) <= 1e-6
    lm_q = {p: (m.bits, m.group_size, m.mode) for p, m in lm_model.named_modules() if hasattr(m, "scales")}
    our_q = {p: (m.bits, m.group_size, m.mode) for p, m in unfused.named_modules() if hasattr(m, "scales")}
    assert lm_q == our_q and len(lm_q) > 10


def test_converted_gguf_loads_in_mlx_lm(smollm2_path, tmp_path):
    """The real SmolLM2 (llama, GGUF) through our converter: mlx-lm reads its config,
    tokenizer files and 4-bit modules, and answers as we do. (Both sides then dequantize:
    MLX's quantized CPU kernels would take ~30 s for these few tokens.)"""
    dst = convert(smollm2_path, tmp_path / "smol", ConvertOptions(bits=4, group_size=32, dtype="float32")).path
    model, tok = mlx_lm.load(str(dst))
    assert {(m.bits, m.group_size, m.mode) for _, m in model.named_modules() if hasattr(m, "scales")} == {(4, 32, "affine")}
    assert sum(hasattr(m, "scales") for _, m in model.named_modules()) == 211
    model = dequantize_model(model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    lm_tokens = [r.token for r in stream_generate(model, tok, prompt, max_tokens=8, sampler=make_sampler(0.0))]
    ours = load_model(dst)  # CPU default: dequantized to float32 at load
    assert mlx_greedy(ours, np.array([prompt]), 8) == lm_tokens
    assert "Paris" in tok.decode(lm_tokens)
    ids = mx.array([prompt])
    assert rel_err(np.array(ours(ids)), np.array(model(ids))) <= 1e-5


@pytest.mark.parametrize("family,kw", [
    ("qwen3", dict(q_bits=4, q_group_size=64)),
    ("qwen3_moe", dict(q_bits=4, q_group_size=64)),  # mlx-lm keeps the router at 8 bits
    ("qwen3", dict(q_bits=4, q_group_size=64, quant_predicate="mixed_3_6")),
    ("qwen3_moe", dict(q_mode="mxfp4")),
])
def test_mlx_lm_dir_loads_in_qwen_mlx(sources, tmp_path, family, kw):
    # mlx-lm 0.32 reads only the 4.x config keys of hub checkpoints (num_experts, rope_theta),
    # not the rope_parameters / num_local_experts that transformers 5 writes
    src = shutil.copytree(sources[family], tmp_path / "hub")
    cfg = normalize_config(json.loads((src / "config.json").read_text()))
    (src / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "lm"
    mlx_lm.convert(str(src), str(dst), quantize=True, **kw)
    q = json.loads((dst / "config.json").read_text())["quantization"]
    if family == "qwen3_moe" and "q_bits" in kw:
        assert q["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
    lm_model, _ = lm_load_model(dst)
    ref = np.array(lm_model(IDS))
    ours = load_model(dst, dequantize=False, fuse=False)
    assert rel_err(np.array(ours(IDS)), ref) <= 1e-6
    assert rel_err(np.array(load_model(dst, dequantize=False)(IDS)), ref) <= REL_TOL
    assert rel_err(np.array(load_model(dst)(IDS)), ref) <= REL_TOL  # CPU default: dequantized to float32
    # and our converter reads it as a quantized source
    res = convert(dst, tmp_path / "again", ConvertOptions(bits=8))
    assert rel_err(np.array(load_model(res.path)(IDS)), ref) < 0.2
