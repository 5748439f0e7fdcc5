"""Float MoE experts are written in the hub layout (loading/layouts.py ``experts``):
Qwen3-VL-MoE fused (``experts.gate_up_proj`` (E, H, 2I), ``experts.down_proj`` (E, I, H)),
Qwen2/3-MoE one tensor per expert. transformers 5.23 loads our float output with no missing
or unexpected tensor, every parameter equal to the source's, and the same logits as ours;
mlx-vlm / mlx-lm load it too; our loader reads it back unchanged. Quantized experts stay in
mlx-lm's ``switch_mlp`` form, and a pair with one part packed is written unfused."""

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from qwen_mlx import load_model
from qwen_mlx.config import FORMAT_VERSION
from qwen_mlx.loading.layouts import LAYOUTS, read_names
from qwen_mlx.loading.loader import load_checkpoint
from qwen_mlx.loading.writer import ShardWriter
from qwen_mlx.quant import ConvertOptions, convert
from tests.helpers import REL_TOL, rel_err, torch_setup
from tests.models.test_vl import IMAGES, hf_forward, media, ours_forward
from tests.quant.builders import hf_dir

IDS = np.random.default_rng(0).integers(0, 290, size=(2, 9))
FLOAT = ConvertOptions(recipe="float", dtype="float32")


def shapes(path):
    with safe_open(str(path / "model.safetensors"), "np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def same_weights(a, b):
    wa, wb = load_checkpoint(a).weights, load_checkpoint(b).weights
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert mx.array_equal(wa[k], wb[k]).item(), k


def hf_loads_exactly(cls, out, src):
    """transformers reads ``out`` with nothing missing or left over, every parameter equal to
    what it reads from the source checkpoint ``src``; returns the model read from ``out``."""
    torch = torch_setup()
    got, info = cls.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    ref = cls.from_pretrained(src).state_dict()
    sd = got.state_dict()
    assert sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    return got.eval()


@pytest.fixture(scope="module")
def vl_moe(tmp_path_factory):
    return hf_dir("qwen3_vl_moe", tmp_path_factory.mktemp("vlmoe") / "hf")  # H = 64, I = 40


def test_float_qwen3_vl_moe_in_the_hub_layout(vl_moe, tmp_path):
    from transformers import Qwen3VLMoeForConditionalGeneration as M
    from mlx_vlm.utils import load_model as vlm_load

    res = convert(vl_moe, tmp_path / "f", FLOAT)
    cfg = json.loads((res.path / "config.json").read_text())
    assert cfg["qwen_mlx_format"] == FORMAT_VERSION == 3
    got = shapes(res.path)
    assert got["model.language_model.layers.0.mlp.experts.gate_up_proj"] == (4, 64, 80)  # (E, H, 2I)
    assert got["model.language_model.layers.1.mlp.experts.down_proj"] == (4, 40, 64)  # (E, I, H)
    assert not any("switch_mlp" in k for k in got)
    hf = hf_loads_exactly(M, res.path, vl_moe)  # it transposes the hub's (E, H, 2I) to (E, 2I, H)
    ids, vis = media("qwen3_vl_moe", IMAGES)
    ours = load_model(res.path, dtype=mx.float32)
    a = ours_forward(ours, ids, vis)[0]
    assert rel_err(a, hf_forward(hf, ids, vis)) <= REL_TOL
    vm = vlm_load(res.path)  # mlx-vlm's sanitize reads the hub layout
    b = vm(mx.array(ids), pixel_values=mx.array(vis.pixel_values), image_grid_thw=mx.array(vis.image_grid_thw))
    assert rel_err(a, np.array(b.logits)) <= REL_TOL
    same_weights(res.path, vl_moe)  # our loader reads it back to the source's tensors
    again = convert(res.path, tmp_path / "f2", FLOAT)
    assert (again.path / "model.safetensors").read_bytes() == (res.path / "model.safetensors").read_bytes()


def test_quantized_qwen3_vl_moe_keeps_switch_mlp(vl_moe, tmp_path):
    """Packed experts stay in mlx-vlm's switch_mlp form; float experts beside quantized
    ones are written fused and read back."""
    q = convert(vl_moe, tmp_path / "q", ConvertOptions(bits=4, group_size=32))
    got = shapes(q.path)
    assert got["model.language_model.layers.0.mlp.switch_mlp.gate_proj.weight"] == (4, 40, 64 * 4 // 32)
    # down_proj's input I = 40 is no multiple of 32: it stays float, written as the hub's
    assert {k: v for k, v in got.items() if ".experts." in k} == {
        f"model.language_model.layers.{i}.mlp.experts.down_proj": (4, 40, 64) for i in (0, 1)}
    k = convert(vl_moe, tmp_path / "k", ConvertOptions(bits=4, group_size=32, keep_bits="experts=keep"))
    got = shapes(k.path)
    assert got["model.language_model.layers.0.mlp.experts.gate_up_proj"] == (4, 64, 80)
    assert "model.language_model.layers.0.self_attn.q_proj.scales" in got
    ids, vis = media("qwen3_vl_moe", IMAGES)
    a = ours_forward(load_model(k.path, dequantize=False, fuse=False), ids, vis)[0]
    assert rel_err(ours_forward(load_model(k.path), ids, vis)[0], a) <= REL_TOL


def test_one_packed_part_writes_the_pair_unfused(tmp_path):
    lay = LAYOUTS["qwen3_vl_moe"]
    g = mx.random.normal((4, 40, 64))
    qw, s, b = mx.quantize(mx.random.normal((4, 40, 64)), group_size=32, bits=4)
    d = mx.random.normal((4, 64, 40))
    p = "model.layers.0.mlp.switch_mlp."
    w = ShardWriter(tmp_path, layout=lay)
    w.add({p + "gate_proj.weight": g})
    w.add({p + "up_proj.weight": qw, p + "up_proj.scales": s, p + "up_proj.biases": b})
    w.add({p + "down_proj.weight": d})
    w.close()
    raw = mx.load(str(tmp_path / "model.safetensors"))
    assert sorted(raw) == sorted(["model.language_model.layers.0.mlp.experts.down_proj",
                                  *(f"model.language_model.layers.0.mlp.switch_mlp.{n}" for n in
                                    ("gate_proj.weight", "up_proj.weight", "up_proj.scales", "up_proj.biases"))])
    back = read_names({"model_type": "qwen3_vl_moe"}, raw)
    assert mx.array_equal(back[p + "gate_proj.weight"], g).item()
    assert mx.array_equal(back[p + "down_proj.weight"], d).item()
    assert mx.array_equal(back[p + "up_proj.weight"], qw).item()


@pytest.mark.parametrize("family,cls", [("qwen3_moe", "Qwen3MoeForCausalLM"), ("qwen2_moe", "Qwen2MoeForCausalLM")])
def test_float_text_moe_per_expert(tmp_path, family, cls):
    import transformers
    from mlx_lm.utils import load_model as lm_load

    src = hf_dir(family, tmp_path / "hf", moe_intermediate_size=48)  # I = 48 != H = 64
    res = convert(src, tmp_path / "f", FLOAT)
    got = shapes(res.path)
    assert got["model.layers.1.mlp.experts.3.gate_proj.weight"] == (48, 64)
    assert got["model.layers.0.mlp.experts.0.down_proj.weight"] == (64, 48)
    assert not any("switch_mlp" in k for k in got)
    hf = hf_loads_exactly(getattr(transformers, cls), res.path, src)
    torch = torch_setup()
    with torch.no_grad():
        ref = hf(torch.tensor(IDS)).logits.numpy()
    a = np.array(load_model(res.path, dtype=mx.float32)(mx.array(IDS)))
    assert rel_err(a, ref) <= REL_TOL
    lm = lm_load(res.path)[0]
    assert rel_err(np.array(lm(mx.array(IDS))), a) <= REL_TOL
    same_weights(res.path, src)
    q = convert(src, tmp_path / "q", ConvertOptions(bits=4, group_size=32))
    assert "model.layers.0.mlp.switch_mlp.gate_proj.scales" in shapes(q.path)
