"""The quantizing converter on every text family: what it writes (shards, config
``quantization`` block, stamp, tokenizer files) and that the written model is exactly the
source quantized in memory with the same plan; modes, recipes, quantized sources."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from qwen_mlx import load_model
from qwen_mlx.config import FORMAT_VERSION
from qwen_mlx.quant import ConvertOptions, convert
from tests.helpers import REL_TOL, rel_err
from tests.quant.builders import FAMILIES, VL_FAMILIES, hf_dir

IDS = mx.array(np.random.default_rng(0).integers(0, 290, size=(2, 9)))  # < every vocab here


def reference(src, plan):
    """The float source quantized in memory with the plan's specs (unfused projections:
    the loader fuses q/k/v and gate/up by default, which the plan's paths predate)."""
    m = load_model(src, dtype=mx.float32, fuse=False)
    nn.quantize(m, class_predicate=lambda p, _: plan.specs[p].config() if plan.specs.get(p) else False)
    return m


def quant_modules(model):
    return {p: (m.bits, m.group_size, m.mode) for p, m in model.named_modules() if hasattr(m, "scales")}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {f: hf_dir(f, root / f) for f in (*FAMILIES, *VL_FAMILIES)}


@pytest.mark.parametrize("family", [*sorted(FAMILIES), *VL_FAMILIES])
def test_every_family_converts_exactly(sources, tmp_path, family):
    src = sources[family]
    res = convert(src, tmp_path / "q4", ConvertOptions(bits=4, group_size=32, shard_bytes=25_000, report=True))
    dst = res.path
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["qwen_mlx_format"] == FORMAT_VERSION and cfg["model_type"] == family and cfg["torch_dtype"] == "float32"
    q = cfg["quantization"]
    assert {k: q[k] for k in ("group_size", "bits", "mode")} == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert cfg["quantization_config"] == q
    if family in VL_FAMILIES:  # the vision tower stays float
        assert q["visual.blocks.0.attn.qkv"] is False and "visual.blocks.0.attn.qkv.scales" not in res.plan.specs
    if "moe" in family:  # router gates stay float, recorded as false (mlx-lm's layout)
        assert q["model.layers.0.mlp.gate"] is False
        assert (q.get("model.layers.0.mlp.shared_expert_gate") is False) == (family == "qwen2_moe")
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(shards) == len(res.shards) > 2 and (dst / "model.safetensors.index.json").exists()
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    assert not list(tmp_path.glob(".q4.*"))  # no temp dir left

    ours = load_model(dst, dequantize=False, fuse=False)
    ref = reference(src, res.plan)
    assert quant_modules(ours) == quant_modules(ref) and len(quant_modules(ours)) == sum(
        s is not None for s in res.plan.specs.values())
    a, b = np.array(ours(IDS)), np.array(ref(IDS))
    assert rel_err(a, b) <= 1e-6
    assert rel_err(np.array(load_model(dst, dequantize=False)(IDS)), a) <= REL_TOL  # fused q/k/v, gate/up
    assert rel_err(np.array(load_model(dst)(IDS)), a) <= REL_TOL  # CPU default: dequantized at load
    assert rel_err(a, np.array(load_model(src, dtype=mx.float32)(IDS))) > 1e-3  # it did quantize
    errs = {e.name: e.rel_err for e in res.errors}
    assert 0.02 < errs["model.layers.0.self_attn.q_proj.weight"] < 0.2  # 4-bit on Gaussian-ish weights
    if "moe" in family:
        assert errs["model.layers.0.mlp.gate.weight"] == 0.0


@pytest.mark.parametrize("bits,group,mode", [(2, 32, "affine"), (3, 64, "affine"), (5, 64, "affine"),
                                             (6, 32, "affine"), (8, 64, "affine"), (4, 32, "mxfp4"),
                                             (4, 16, "nvfp4"), (8, 32, "mxfp8")])
def test_modes_and_bits(sources, tmp_path, bits, group, mode):
    src = sources["qwen3_moe"]
    res = convert(src, tmp_path / "q", ConvertOptions(bits=None if mode != "affine" else bits,
                                                     group_size=group if mode == "affine" else None,
                                                     mode=mode, report=True))
    w = mx.load(str(tmp_path / "q" / "model.safetensors"))
    s = w["model.layers.0.mlp.switch_mlp.up_proj.scales"]
    assert w["model.layers.0.mlp.switch_mlp.up_proj.weight"].shape == (4, 64, 64 * bits // 32)
    assert s.shape == (4, 64, 64 // group)
    assert (s.dtype == mx.uint8) == (mode != "affine")
    assert ("model.layers.0.mlp.switch_mlp.up_proj.biases" in w) == (mode == "affine")
    ours = load_model(tmp_path / "q", dequantize=False, fuse=False)
    assert quant_modules(ours)["model.layers.0.self_attn.q_proj"] == (bits, group, mode)
    assert rel_err(np.array(ours(IDS)), np.array(reference(src, res.plan)(IDS))) <= 1e-6
    assert rel_err(np.array(load_model(tmp_path / "q")(IDS)), np.array(ours(IDS))) <= REL_TOL
    mean = np.mean([e.rel_err for e in res.errors if e.spec != "float32"])
    bound = {2: 0.5, 3: 0.25, 4: 0.15, 5: 0.06, 6: 0.03, 8: 0.01}[bits] if mode == "affine" else \
        {"mxfp4": 0.2, "nvfp4": 0.15, "mxfp8": 0.04}[mode]
    assert 0.3 * bound < mean < bound


def test_mixed_recipe_with_keep_bits(sources, tmp_path):
    src = sources["qwen3_moe"]
    res = convert(src, tmp_path / "m", ConvertOptions(recipe="mixed-4-8", keep_bits="router=8,k_proj=keep,o_proj=5/32"))
    q = json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]
    assert {k: q[k] for k in ("bits", "group_size", "mode")} == {"bits": 4, "group_size": 64, "mode": "affine"}
    assert q["model.embed_tokens"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert q["lm_head"]["bits"] == 8
    assert q["model.layers.1.mlp.switch_mlp.down_proj"]["bits"] == 6  # 2 layers: both are edge layers
    assert q["model.layers.0.mlp.gate"]["bits"] == 8  # --keep-bits overrides the default "router float"
    assert q["model.layers.0.self_attn.k_proj"] is False
    assert q["model.layers.0.self_attn.o_proj"] == {"group_size": 32, "bits": 5, "mode": "affine"}
    assert "model.layers.0.self_attn.q_proj" not in q  # the body's spec
    ours = load_model(tmp_path / "m", dequantize=False, fuse=False)
    mods = quant_modules(ours)
    assert mods["model.layers.0.mlp.switch_mlp.gate_proj"] == (4, 64, "affine")
    assert mods["model.layers.0.mlp.switch_mlp.down_proj"] == (6, 64, "affine")
    assert "model.layers.0.self_attn.k_proj" not in mods
    assert rel_err(np.array(ours(IDS)), np.array(reference(src, res.plan)(IDS))) <= 1e-6


def test_quantized_sources_requantize_copy_and_dequantize(sources, tmp_path):
    src = sources["qwen3"]
    q8 = convert(src, tmp_path / "q8", ConvertOptions(bits=8)).path
    # same spec again: the packed data is copied bit for bit
    convert(q8, tmp_path / "same", ConvertOptions(bits=8))
    a, b = mx.load(str(q8 / "model.safetensors")), mx.load(str(tmp_path / "same" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    # another spec: dequantized, then quantized again
    res = convert(q8, tmp_path / "q4", ConvertOptions(bits=4, group_size=32))
    ref = load_model(q8, dtype=mx.float32, dequantize=True, fuse=False)
    nn.quantize(ref, class_predicate=lambda p, _: res.plan.specs[p].config() if res.plan.specs.get(p) else False)
    assert rel_err(np.array(load_model(tmp_path / "q4", dequantize=False, fuse=False)(IDS)), np.array(ref(IDS))) <= 1e-6
    # recipe float: plain float weights equal to the dequantized source
    f = convert(q8, tmp_path / "f", ConvertOptions(recipe="float"))
    cfg = json.loads((f.path / "config.json").read_text())
    assert "quantization" not in cfg and not any(k.endswith(".scales") for k in mx.load(str(f.path / "model.safetensors")))
    assert np.array_equal(np.array(load_model(f.path)(IDS)), np.array(load_model(q8, dtype=mx.float32)(IDS)))


def test_bfloat16_output_and_overwrite(sources, tmp_path):
    src = sources["qwen2"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    res = convert(src, tmp_path / "out", ConvertOptions(bits=4, dtype="bfloat16", overwrite=True))
    assert not (res.path / "stale.txt").exists()
    w = mx.load(str(res.path / "model.safetensors"))
    assert w["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16
    assert w["model.layers.0.self_attn.q_proj.bias"].dtype == mx.bfloat16  # Qwen2 QKV bias, float
    assert json.loads((res.path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
