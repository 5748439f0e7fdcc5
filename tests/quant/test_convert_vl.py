"""`qwen-mlx convert` on VL checkpoints (tiny perturbed Qwen2.5-VL and Qwen3-VL): the vision
tower stays float by default and is 8-bit under the ``vl-4bit`` recipe; the written model is
the source quantized in memory with the same plan (image-prompt logits), it loads with its
processor files, and a float conversion answers exactly as the source and converts again
to the same files. Weights the model reads directly rather than through their module
(Qwen3-VL's ``visual.pos_embed``) are found in the code and never quantized, and a checkpoint
that has one quantized anyway loads and runs."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import qwen_mlx
from qwen_mlx import load_model
from qwen_mlx.cli import app
from qwen_mlx.loading.loader import build_model, load_checkpoint
from qwen_mlx.quant import ConvertOptions, QuantizationError, convert, make_plan
from qwen_mlx.quant.plan import direct_weight_reads
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
    if fam == "qwen3_vl":  # vl-4bit's tower rule matches the position table: the plan keeps it float
        assert q["visual.pos_embed"] is False and q["vision_tower.pos_embed"] is False
        assert "read directly by VisionModel.add_positions" in res.plan.reasons["visual.pos_embed"]
        assert type(ours.visual.pos_embed) is nn.Embedding
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
    again = convert(res.path, tmp_path / "f2", ConvertOptions(recipe="float"))  # our layout in, same out
    assert (again.path / "config.json").read_text() == (res.path / "config.json").read_text()
    a, b = mx.load(str(res.path / "model.safetensors")), mx.load(str(again.path / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.table, self.lookup, self.proj = nn.Embedding(8, 32), nn.Embedding(8, 32), nn.Linear(32, 32)
        self.dims = self.proj.weight.shape[0]  # at build time, before any quantization: not a use

    def __call__(self, i):
        return self.proj(self.table.weight[i] + self.lookup(i))


def test_weights_read_directly_are_never_quantized(source):
    """Derived from the model's code, not from names: a module whose weight its owner reads
    itself stays float under any rule; asking for it alone is an error."""
    fam, src, _ = source
    assert direct_weight_reads(Toy()) == {"table": "Toy.__call__"}
    toy = make_plan(Toy(), group_size=32)
    assert toy.specs["table"] is None and toy.specs["lookup"] is not None and toy.specs["proj"] is not None
    model = build_model(load_checkpoint(src).config)
    want = {"visual.pos_embed": "VisionModel.add_positions"} if fam == "qwen3_vl" else {}
    assert direct_weight_reads(model) == want
    p = make_plan(model, bits=4, group_size=32, keep_bits=r"visual\.(?:pos_embed|blocks\.\d+\.attn\.qkv)=8")
    assert p.specs["visual.blocks.0.attn.qkv"].bits == 8 and p.specs.get("visual.pos_embed") is None
    if fam == "qwen3_vl":
        with pytest.raises(QuantizationError, match="matches only visual.pos_embed, whose weight the model reads"):
            make_plan(model, bits=4, group_size=32, keep_bits=r"visual\.pos_embed=8")


@pytest.mark.parametrize("source", ["qwen3_vl"], indirect=True)
def test_checkpoint_with_a_quantized_position_table_loads(source, cat, tmp_path):
    """A Qwen3-VL directory whose ``visual.pos_embed`` was quantized (by another tool, or by
    hand) loads with its weights kept quantized (the GPU default) and runs: that table is
    dequantized at load; converting it again writes it float."""
    fam, src, llm = source
    res = convert(src, tmp_path / "q", ConvertOptions(recipe="vl-4bit", bits=4, group_size=32))
    d = tmp_path / "posq"
    shutil.copytree(res.path, d)
    w = mx.load(str(d / "model.safetensors"))
    k = "model.visual.pos_embed"
    w[f"{k}.weight"], w[f"{k}.scales"], w[f"{k}.biases"] = mx.quantize(w[f"{k}.weight"], group_size=32, bits=8)
    mx.save_safetensors(str(d / "model.safetensors"), w)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization"]["visual.pos_embed"] = {"group_size": 32, "bits": 8, "mode": "affine"}
    (d / "config.json").write_text(json.dumps(cfg))
    packed = load_model(d, dequantize=False)
    assert type(packed.visual.pos_embed) is nn.Embedding and "scales" in packed.visual.blocks[0].attn.qkv
    got, ref = image_logits(packed, llm, cat), image_logits(load_model(d, dtype=mx.float32), llm, cat)
    assert rel_err(got, ref) <= 1e-5
    assert 0 < rel_err(got, image_logits(load_model(res.path, dequantize=False), llm, cat)) < 1e-2
    again = convert(d, tmp_path / "again", ConvertOptions(recipe="vl-4bit", bits=4, group_size=32))
    assert "model.visual.pos_embed.scales" not in mx.load(str(again.path / "model.safetensors"))


def test_cli_convert_vl_recipe(source, cat, tmp_path):
    fam, src, llm = source
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "c"), "--recipe", "vl-4bit", "--bits", "4",
                                 "-g", "32"])
    assert r.exit_code == 0, r.output
    listing = CliRunner().invoke(app, ["convert", "--list-recipes"])
    assert "vl-4bit" in listing.stdout
    q = json.loads((tmp_path / "c" / "config.json").read_text())["quantization"]
    assert q["visual.blocks.1.attn.qkv"]["bits"] == 8 and q["bits"] == 4 and q["group_size"] == 32
    assert q.get("visual.pos_embed", False) is False
    image_logits(load_model(tmp_path / "c", dequantize=False), llm, cat)  # the packed tower runs
