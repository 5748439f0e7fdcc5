"""qwen_mlx <-> mlx-vlm 0.7.10 on VL checkpoints (tiny perturbed models, the real tokenizer, a
real photo).

- ``mlx_vlm.convert`` output (4-bit, group 32; mlx-vlm keeps the vision tower float) loads in
  qwen_mlx: image-prompt logits equal mlx-vlm's own model on that directory, and our cached
  greedy tokens equal mlx-vlm's, for Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE (quantized experts).
- Our converted directories of all four families (made from checkpoints transformers 5.x
  saved) load in mlx-vlm, float, 4-bit with a float tower, and ``vl-4bit`` (8-bit tower):
  mlx-vlm quantizes exactly the modules we did with the same bits, and its logits, greedy
  tokens and per-step log-probabilities equal ours. Qwen3-VL(-MoE) are written in
  transformers' names with a nested ``text_config``: a float Qwen3-VL directory loads in
  transformers itself with every parameter equal to the source.
"""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import qwen_mlx
from qwen_mlx.generate import generate_tokens
from qwen_mlx.generation_config import SamplingParams
from qwen_mlx.multimodal import media_prefill
from qwen_mlx.quant import ConvertOptions, convert
from tests.helpers import REL_TOL
from tests.models.test_vl import write_hub_layout
from tests.test_multimodal import tiny_vl

pytest.importorskip("mlx_vlm")
skdata = pytest.importorskip("skimage.data")
SIDE = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
N = 4
Q = "What is in the picture?"


def rel_err(a, b) -> float:  # over full-vocabulary logits: in MLX, it is 20x faster than numpy float64
    a, b = mx.array(a), mx.array(b)
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


@pytest.fixture(scope="module")
def cat(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "cat.png"
    Image.fromarray(skdata.chelsea()).save(p)
    return p


@pytest.fixture(scope="module")
def source(tmp_path_factory, qwen_tokenizer):
    """family -> a tiny checkpoint as transformers 5.23 saves it."""
    return lambda fam: tiny_vl(fam, qwen_tokenizer, tmp_path_factory)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, source):
    """family -> the same checkpoint in the hub layout (what mlx-vlm converts)."""
    made = {}

    def get(fam):
        if fam not in made:
            src = source(fam)
            made[fam] = write_hub_layout(src, fam, tmp_path_factory.mktemp(f"hub_{fam}") / "hub")
            for f in SIDE:
                shutil.copy(src / f, made[fam] / f)
        return made[fam]

    return get


def vlm_logits(vm, req):
    out = vm(mx.array([req.ids]), pixel_values=mx.array(req.visual.pixel_values),
             image_grid_thw=mx.array(req.visual.image_grid_thw))
    return out.logits.astype(mx.float32)


def ours_logits(model, req):
    cache = model.make_cache()
    mm = model.embed_multimodal(np.array([req.ids]), req.visual, cache)
    return model(None, cache, mm.input_embeds, mm.positions, mm.deepstack)


def vlm_decode(vm, req, n=N):
    """mlx-vlm's own cached greedy loop: (tokens, log-probabilities of each step)."""
    from mlx_vlm.generate.ar import generate_step

    steps = list(generate_step(mx.array([req.ids]), vm, mx.array(req.visual.pixel_values), None, max_tokens=n,
                               temperature=0.0, image_grid_thw=mx.array(req.visual.image_grid_thw)))
    return [t for t, _ in steps], [lp.reshape(-1) for _, lp in steps]


def ours_logprobs(model, req, tokens):
    """Our prefill then cached decode fed ``tokens``: log-probabilities before each."""
    cache = model.make_cache()
    mm = model.embed_multimodal(np.array([req.ids]), req.visual, cache)
    logits = model(None, cache, mm.input_embeds, mm.positions, mm.deepstack)[0, -1]
    out = []
    for t in tokens:
        out.append(logits - mx.logsumexp(logits))
        logits = model(mx.array([[t]]), cache=cache)[0, -1]
    return out


def ours_greedy(llm, req, n=N):
    pc = llm.new_cache()
    return list(generate_tokens(llm.model, req.ids, SamplingParams(temperature=0, max_tokens=n), pc, (),
                                prefill=media_prefill(llm.model, req.ids, req.visual, pc)))


def assert_same_answers(llm, vm, req, ref):
    """Image-prompt logits (mlx-vlm's: ``ref``), greedy tokens and each decode step's
    log-probabilities (offset + rope delta) of our model equal mlx-vlm's."""
    assert rel_err(ours_logits(llm.model, req), ref) <= REL_TOL
    tokens, logprobs = vlm_decode(vm, req)
    assert ours_greedy(llm, req) == tokens
    for a, b in zip(ours_logprobs(llm.model, req, tokens), logprobs):
        assert rel_err(a, b) <= REL_TOL


def vlm_bits(vm):
    """mlx-vlm's quantized modules -> bits, under our module paths."""
    rename = (("language_model.model.", "model."), ("language_model.lm_head", "lm_head"), ("vision_tower.", "visual."))
    out = {}
    for p, m in vm.named_modules():
        if hasattr(m, "scales"):
            a, b = next(((a, b) for a, b in rename if p.startswith(a)), ("", ""))
            out[b + p[len(a):]] = m.bits
    return out


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_mlx_vlm_converted_dir_loads_in_qwen_mlx(hub, cat, tmp_path, fam):
    from mlx_vlm.convert import convert as vlm_convert
    from mlx_vlm.utils import load_model as vlm_load

    dst = tmp_path / "vlm4"
    vlm_convert(str(hub(fam)), str(dst), quantize=True, q_bits=4, q_group_size=32)
    vm = vlm_load(dst)
    assert type(vm.language_model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    llm = qwen_mlx.load(dst, dtype=mx.float32)  # CPU: dequantized to float32 at load
    req = llm.prepare_request(Q, images=[cat])
    ref = vlm_logits(vm, req)
    assert_same_answers(llm, vm, req, ref)
    packed = qwen_mlx.load_model(dst, dequantize=False)
    assert rel_err(ours_logits(packed, req), ref) <= REL_TOL
    source = qwen_mlx.load_model(hub(fam), dtype=mx.float32)
    assert rel_err(ours_logits(source, req), ref) > 1e-4  # the converted model is quantized


CASES = [("qwen2_vl", "uniform"), ("qwen2_5_vl", "vl-4bit"), ("qwen3_vl", "float"),
         ("qwen3_vl", "uniform"), ("qwen3_vl", "vl-4bit"), ("qwen3_vl_moe", "float"), ("qwen3_vl_moe", "vl-4bit")]


@pytest.mark.parametrize("fam,recipe", CASES)
def test_our_dirs_load_in_mlx_vlm(source, cat, tmp_path, fam, recipe):
    from mlx_vlm.utils import load_model as vlm_load

    opts = ConvertOptions(recipe="float", dtype="float32") if recipe == "float" else \
        ConvertOptions(recipe=recipe, bits=4, group_size=32)
    res = convert(source(fam), tmp_path / "q", opts)
    cfg = json.loads((res.path / "config.json").read_text())
    with safe_open(str(res.path / "model.safetensors"), "np") as f:
        names = set(f.keys())
    assert cfg["vision_config"]["model_type"] == fam  # mlx-vlm checks the hub's spelling
    if fam.startswith("qwen3"):  # transformers' names and nested config
        assert cfg["text_config"]["model_type"] == f"{fam}_text" and "hidden_size" not in cfg
        assert {n.split(".")[1] for n in names} == {"language_model", "visual"}  # tied: no lm_head
    else:  # mlx-vlm reads these only in the 4.x hub layout: flat, model.* / visual.*
        assert "text_config" not in cfg and {n.split(".")[0] for n in names} == {"model", "visual"}

    vm = vlm_load(res.path)
    llm = qwen_mlx.load(res.path, dtype=mx.float32)
    ours = qwen_mlx.load_model(res.path, dequantize=False, fuse=False)
    bits = {p: m.bits for p, m in ours.named_modules() if hasattr(m, "scales")}
    assert vlm_bits(vm) == bits  # mlx-vlm quantized exactly our modules, with our bits
    tower = {b for p, b in bits.items() if p.startswith("visual.")}
    assert tower == ({8} if recipe == "vl-4bit" else set())
    assert bits.get("model.layers.0.self_attn.q_proj") == (None if recipe == "float" else 4)
    assert (not bits) == (recipe == "float")
    if fam.startswith("qwen3"):
        assert type(vm.vision_tower.pos_embed) is nn.Embedding and type(ours.visual.pos_embed) is nn.Embedding
    if fam == "qwen3_vl_moe" and recipe != "float":
        assert type(vm.language_model.model.layers[0].mlp.switch_mlp.gate_proj).__name__ == "QuantizedSwitchLinear"
    req = llm.prepare_request(Q, images=[cat])
    ref = vlm_logits(vm, req)
    assert_same_answers(llm, vm, req, ref)
    if recipe == "vl-4bit":  # our quantized kernels too (CPU default: dequantized at load)
        assert rel_err(ours_logits(ours, req), ref) <= REL_TOL


def test_qwen3_vl_float_dir_is_the_transformers_layout(source, tmp_path):
    """Conversion stays a copy: transformers loads our float Qwen3-VL directory, every
    parameter equal to the source's (mlx-vlm and qwen_mlx read the same files)."""
    import torch

    from tests.models.vl_configs import hf_classes

    torch.set_num_threads(1)
    res = convert(source("qwen3_vl"), tmp_path / "f", ConvertOptions(recipe="float", dtype="float32"))
    M = hf_classes("qwen3_vl")[1]
    ours, info = M.from_pretrained(res.path, output_loading_info=True)
    assert not any(info.values()), info
    ref = M.from_pretrained(source("qwen3_vl")).state_dict()
    got = ours.state_dict()
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
