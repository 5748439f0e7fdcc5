"""Recipes are data resolved over module paths: edge layers, rule order, aliases,
--keep-bits parsing, mode/bits/group validation. Models are built lazily (no weights)."""

import pytest

from qwen_mlx.loading.loader import build_model
from qwen_mlx.quant import RECIPES, QuantizationError, QuantSpec, make_plan, make_spec
from qwen_mlx.quant.recipes import KEEP, parse_keep_bits

CFG = dict(model_type="qwen3_moe", hidden_size=128, intermediate_size=256, num_hidden_layers=16,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, mlp_only_layers=[3])


@pytest.fixture(scope="module")
def moe16():
    return build_model(CFG)


def bits(plan, path):
    s = plan.specs[path]
    return s.bits if s else None


def test_mixed_4_6_edges_and_router(moe16):
    p = make_plan(moe16, recipe="mixed-4-6")
    assert p.base == QuantSpec(4, 64, "affine")
    assert bits(p, "model.embed_tokens") == 6 and bits(p, "lm_head") == 6
    # 16 layers: the first and last eighth are layers 0, 1, 14, 15
    edge = {i for i in range(16) if bits(p, f"model.layers.{i}.mlp.switch_mlp.down_proj" if i != 3
                                         else f"model.layers.{i}.mlp.down_proj") == 6}
    assert edge == {0, 1, 14, 15}
    assert bits(p, "model.layers.0.mlp.switch_mlp.up_proj") == 4
    assert bits(p, "model.layers.3.mlp.up_proj") == 4
    assert p.specs["model.layers.5.mlp.gate"] is None  # router float by default
    assert p.config()["model.layers.5.mlp.gate"] is False
    assert p.config()["model.layers.0.mlp.switch_mlp.down_proj"] == {"group_size": 64, "bits": 6, "mode": "affine"}


def test_cli_options_override_recipe_base_and_rules_apply_in_order(moe16):
    p = make_plan(moe16, recipe="mixed-3-6", bits=5, group_size=32,
                  keep_bits="embed=keep,down_proj=8,model\\.layers\\.0\\.mlp\\.switch_mlp\\.down_proj=2")
    assert p.base == QuantSpec(5, 32, "affine")
    assert p.specs["model.embed_tokens"] is None
    assert bits(p, "model.layers.7.mlp.switch_mlp.down_proj") == 8  # alias covers expert down_proj
    assert bits(p, "model.layers.0.mlp.switch_mlp.down_proj") == 2  # the last matching rule wins
    assert bits(p, "model.layers.0.self_attn.v_proj") == 6 and bits(p, "model.layers.7.self_attn.v_proj") == 5
    assert p.specs["model.layers.0.self_attn.v_proj"].group_size == 32


def test_mxfp4_recipe_and_moe_experts(moe16):
    p = make_plan(moe16, recipe="mxfp4")
    assert p.base == QuantSpec(4, 32, "mxfp4")
    assert p.specs["lm_head"] == QuantSpec(8, 64, "affine")
    p = make_plan(moe16, recipe="moe-experts-4")
    assert bits(p, "model.layers.0.mlp.switch_mlp.gate_proj") == 4 and bits(p, "model.layers.0.self_attn.q_proj") == 8
    assert bits(p, "model.layers.3.mlp.gate_proj") == 8  # a dense layer
    # bits an fp body cannot hold mean affine; naming the fp mode with them is an error
    p = make_plan(moe16, recipe="mxfp4", keep_bits="router=8,k_proj=4,v_proj=6/32")
    assert p.specs["model.layers.0.mlp.gate"] == QuantSpec(8, 64, "affine")
    assert p.specs["model.layers.0.self_attn.k_proj"] == QuantSpec(4, 32, "mxfp4")
    assert p.specs["model.layers.0.self_attn.v_proj"] == QuantSpec(6, 32, "affine")
    p = make_plan(moe16, recipe="mixed-4-6", mode="mxfp4")
    assert p.base == QuantSpec(4, 32, "mxfp4") and p.specs["lm_head"] == QuantSpec(6, 64, "affine")
    with pytest.raises(QuantizationError, match="mxfp8 quantization for --keep-bits rule for 'model.layers.0.self_attn.q_proj' supports bits \\[8\\], got 4"):
        make_plan(moe16, recipe="mxfp4", keep_bits="q_proj=mxfp8:4")


def test_float_recipe_and_unknown(moe16):
    p = make_plan(moe16, recipe="float")
    assert p.base is None and p.config() is None and set(p.specs.values()) == {None}
    with pytest.raises(QuantizationError, match="does not quantize"):
        make_plan(moe16, recipe="float", bits=4)
    with pytest.raises(QuantizationError, match="unknown recipe 'q4km'.*mixed-4-6"):
        make_plan(moe16, recipe="q4km")
    assert {"uniform", "mixed-4-6", "mixed-4-8", "mixed-3-6", "mixed-2-6", "moe-experts-4", "mxfp4", "float"} <= set(RECIPES)


def test_keep_bits_parsing():
    assert parse_keep_bits("embed=8, lm_head=keep,router=mxfp8,.*v_proj$=6/32") == [
        (r"^(?:.*\.)?embed_tokens$", {"bits": 8}), (r"^(?:.*\.)?lm_head$", KEEP),
        (r"^.*\.mlp\.(?:gate|shared_expert_gate)$", {"mode": "mxfp8"}), (".*v_proj$", {"bits": 6, "group_size": 32})]
    assert parse_keep_bits("lm_head=affine:8/64,q_proj=mxfp8:8") == [
        (r"^(?:.*\.)?lm_head$", {"mode": "affine", "bits": 8, "group_size": 64}),
        (r"^.*\.q_proj$", {"mode": "mxfp8", "bits": 8})]
    assert parse_keep_bits(None) == [] and parse_keep_bits("") == []
    for bad, msg in [("embed", "not KEY=VALUE"), ("=8", "not KEY=VALUE"), ("embed=eight", "cannot read 'eight'")]:
        with pytest.raises(QuantizationError, match=msg):
            parse_keep_bits(bad)


@pytest.mark.parametrize("kw,msg", [
    (dict(bits=7), "affine quantization .*supports bits \\[2, 3, 4, 5, 6, 8\\], got 7"),
    (dict(group_size=16), "supports group sizes \\[32, 64, 128\\], got 16"),
    (dict(mode="int4"), "unknown quantization mode 'int4'"),
    (dict(mode="mxfp4", bits=8), "mxfp4 .*supports bits \\[4\\], got 8"),
    (dict(mode="nvfp4", group_size=32), "nvfp4 .*supports group sizes \\[16\\], got 32"),
    (dict(mode="mxfp8", bits=4), "mxfp8 .*supports bits \\[8\\], got 4"),
    (dict(keep_bits="nothing_here=8"), "'nothing_here' matches no quantizable module"),
    (dict(keep_bits="(=8"), "bad pattern"),
])
def test_invalid_requests(moe16, kw, msg):
    with pytest.raises(QuantizationError, match=msg):
        make_plan(moe16, **kw)


def test_group_size_that_does_not_divide():
    model = build_model({**CFG, "hidden_size": 96, "intermediate_size": 160, "moe_intermediate_size": 96,
                         "num_hidden_layers": 2, "mlp_only_layers": []})
    # default rules: modules whose input size is not a multiple stay float, and say why
    p = make_plan(model, group_size=64)
    assert p.specs["model.layers.0.self_attn.q_proj"] is None
    assert "input size 96 is not a multiple of group size 64" in p.reasons["model.layers.0.self_attn.q_proj"]
    assert bits(p, "model.layers.0.self_attn.o_proj") == 4  # input 4 x 32 = 128
    # asked for explicitly: an error naming the module
    with pytest.raises(QuantizationError, match="group size 64 does not divide the input size 96 of 'model.layers.0.self_attn.q_proj'"):
        make_plan(model, keep_bits="q_proj=4/64")
    # a group size that divides no module at all
    odd = build_model({**CFG, "hidden_size": 96, "head_dim": 24, "moe_intermediate_size": 96,
                       "num_hidden_layers": 2, "mlp_only_layers": []})
    with pytest.raises(QuantizationError, match="group size 128 divides the input size of no quantizable module"):
        make_plan(odd, group_size=128)


def test_make_spec_defaults():
    assert make_spec() == QuantSpec(4, 64, "affine")
    assert make_spec(mode="mxfp4") == QuantSpec(4, 32, "mxfp4")
    assert make_spec(mode="nvfp4") == QuantSpec(4, 16, "nvfp4")
    assert make_spec(mode="mxfp8") == QuantSpec(8, 32, "mxfp8")
    assert make_spec(1, reading=True) == QuantSpec(1, 64, "affine")
