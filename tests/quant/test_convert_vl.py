"""`qwen-mlx convert` on VL checkpoints (tiny perturbed Qwen2.5-VL and Qwen3-VL): the vision
tower stays float by default and is 8-bit under the ``vl-4bit`` recipe; the written model is
the source quantized in memory with the same plan (image-prompt logits), it loads with its
processor files, and a float conversion answers exactly as the source."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import qwen_mlx
from qwen_mlx import load_model
from qwen_mlx.cli import app
from qwen_mlx.quant import ConvertOptions, convert
from tests.test_multimodal import tiny_vl

skdata = pytest.importorskip("skimage.data")
Q = "What is in the picture?"


@pytest.fixture(scope="module")
def cat(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "cat.png"
    Image.fromarray(skdata.chelsea()).save(p)
    return p


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def source(request, tmp_path_factory, qwen_tokenizer):
    fam = request.param
    path = tiny_vl(fam, qwen_tokenizer, tmp_path_factory)
    return fam, path, qwen_mlx.load(path, dtype=mx.float32)


def rel_err(a, b) -> float:  # MLX: numpy float64 over full-vocabulary logits is 20x slower
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def image_logits(model, llm, cat):
    """Logits of a chat prompt with the photo (the source LLM's processor and ids)."""
    req = llm.prepare_request(Q, images=[cat])
    cache = model.make_cache()
    mm = model.embed_multimodal(np.array([req.ids]), req.visual, cache)
    return model(None, cache, mm.input_embeds, mm.positions, mm.deepstack).astype(mx.float32)


def reference(src, plan):
    m = load_model(src, dtype=mx.float32, fuse=False)
    nn.quantize(m, class_predicate=lambda p, _: plan.specs[p].config() if plan.specs.get(p) else False)
    return m


def quant_bits(model):
    return {p: m.bits for p, m in model.named_modules() if hasattr(m, "scales")}


@pytest.mark.parametrize("recipe", ["uniform", "vl-4bit"])
def test_vl_conversion_keeps_or_8bits_the_tower(source, cat, tmp_path, recipe):
    fam, src, llm = source
    res = convert(src, tmp_path / "q", ConvertOptions(recipe=recipe, bits=4, group_size=32))
    cfg = json.loads((res.path / "config.json").read_text())
    q = cfg["quantization"]
    assert cfg["model_type"] == fam and "vision_config" in cfg
    for f in ("tokenizer.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        assert (res.path / f).read_bytes() == (src / f).read_bytes()
    ours = load_model(res.path, dequantize=False, fuse=False)
    bits = quant_bits(ours)
    tower = {p: b for p, b in bits.items() if p.startswith("visual.")}
    if recipe == "uniform":  # default rules: the vision tower stays float
        assert not tower and q["visual.blocks.0.attn.qkv"] is False
        assert ours.visual.blocks[0].attn.qkv.weight.dtype == mx.float32
    else:
        assert tower and set(tower.values()) == {8} and q["visual.blocks.0.attn.qkv"]["bits"] == 8
        assert bits["model.embed_tokens"] == 8 and q["vision_tower.blocks.0.attn.qkv"]["bits"] == 8  # mlx-vlm's name
    assert bits["model.layers.0.self_attn.q_proj"] == 4 and bits["model.layers.1.mlp.down_proj"] == 4
    assert len(bits) == sum(s is not None for s in res.plan.specs.values())
    got = image_logits(ours, llm, cat)
    assert rel_err(got, image_logits(reference(src, res.plan), llm, cat)) <= 1e-5
    float_ref = image_logits(llm.model, llm, cat)
    assert 1e-4 < rel_err(got, float_ref) < 0.2  # it did quantize, and stays close to the source
    served = qwen_mlx.load(res.path)  # CPU default: dequantized to float32 at load
    assert served.processor is not None and served.processor.image == llm.processor.image
    assert rel_err(image_logits(served.model, llm, cat), got) <= 1e-4


def test_float_conversion_answers_like_the_source(source, cat, tmp_path):
    fam, src, llm = source
    res = convert(src, tmp_path / "f", ConvertOptions(recipe="float", dtype="float32"))
    conv = qwen_mlx.load(res.path, dtype=mx.float32)
    kw = dict(images=[cat], temperature=0, max_tokens=8, reuse_cache=False)
    assert conv.generate(Q, **kw) == llm.generate(Q, **kw)


def test_cli_convert_vl_recipe(source, tmp_path):
    fam, src, _ = source
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "c"), "--recipe", "vl-4bit", "-g", "32"])
    assert r.exit_code == 0, r.output
    listing = CliRunner().invoke(app, ["convert", "--list-recipes"])
    assert "vl-4bit" in listing.stdout
    q = json.loads((tmp_path / "c" / "config.json").read_text())["quantization"]
    assert q["visual.blocks.1.attn.qkv"]["bits"] == 8 and q["bits"] == 4 and q["group_size"] == 32
