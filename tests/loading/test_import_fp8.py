"""FP8 block-quantized checkpoints built with torch's float8_e4m3fn, checked against
transformers (which dequantizes FP8 checkpoints itself on a CPU) and against an
independent dequantization (torch's e4m3 decode times the block scale, in float32)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

from qwen_mlx.errors import ConfigError, WeightsError
from qwen_mlx.loading.imports import ImportOptions, import_quantized
from qwen_mlx.loading.imports.fp8 import fp8_dense
from qwen_mlx.loading.loader import load_checkpoint, load_model, model_from_checkpoint
from qwen_mlx.quant.spec import QuantSpec
from tests.helpers import REL_TOL, hf_greedy, hf_logits, mlx_greedy, rel_err, torch_setup
from tests.loading.test_import_gptq import LINEAR, tiny_hf

torch = pytest.importorskip("torch")


def fp8_quantize(w: np.ndarray, block, scales: str, rng):
    """(fp8 weight, scale_inv, dequantized float32) of ``w`` in blocks of ``block``. ``scales``:
    "float32" (max|block| / 448), "pow2" (powers of two, bfloat16) or "e8m0" (uint8 exponents)."""
    (bo, bi), (O, I) = block, w.shape
    blocks = np.abs(w).reshape(O // bo, bo, I // bi, bi).max(axis=(1, 3)) / 448
    blocks *= rng.uniform(1.0, 1.5, blocks.shape)  # not all blocks saturate
    if scales != "float32":
        blocks = 2.0 ** np.ceil(np.log2(blocks))
    s = torch.tensor(blocks, dtype=torch.float32)
    full = s.repeat_interleave(bo, 0).repeat_interleave(bi, 1)
    q = (torch.tensor(w) / full).to(torch.float8_e4m3fn)
    deq = (q.float() * full).numpy()
    stored = {"float32": s, "pow2": s.to(torch.bfloat16),
              "e8m0": (torch.log2(s) + 127).to(torch.uint8)}[scales]
    return q, stored, deq


def fp8_checkpoint(tmp: Path, kind: str, block, scales: str, extra_qc=None):
    """The float model's decoder Linears as FP8; returns (dir, {module: dequantized weight})."""
    from safetensors.torch import load_file, save_file

    src = tiny_hf(tmp, kind)
    rng = np.random.default_rng(0)
    tensors, expected = load_file(str(src / "model.safetensors")), {}
    for name in sorted(tensors):
        if LINEAR.match(name):
            base = name[: -len(".weight")]
            tensors[name], tensors[f"{base}.weight_scale_inv"], expected[base] = fp8_quantize(
                tensors[name].numpy(), block, scales, rng)
            if extra_qc and extra_qc.get("activation_scheme") == "static":
                tensors[f"{base}.activation_scale"] = torch.tensor(0.5)
    out = tmp / "fp8"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": list(block), **(extra_qc or {})}
    (out / "config.json").write_text(json.dumps(cfg))
    return out, expected


def dense(ck, base: str) -> np.ndarray:
    w = ck.weights
    if f"{base}.scales" not in w:
        return np.array(w[f"{base}.weight"])
    lay = ck.config["quantization"].get(base, ck.config["quantization"])
    return np.array(mx.dequantize(w[f"{base}.weight"], w[f"{base}.scales"], w.get(f"{base}.biases"),
                                  group_size=lay["group_size"], bits=lay["bits"], mode=lay["mode"], dtype=mx.float32))


CASES = {  # kind, block, scale storage, mode the import picks
    "qwen3-f32-dense": ("qwen3", (64, 32), "float32", None),
    "qwen2-pow2-mxfp8": ("qwen2", (32, 64), "pow2", "mxfp8"),
    "moe-e8m0-mxfp8": ("qwen3_moe", (32, 32), "e8m0", "mxfp8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp8_matches_transformers(tmp_path, case):
    import transformers as tf

    kind, block, scales, mode = CASES[case]
    extra = {"activation_scheme": "static"} if kind == "qwen3" else None
    path, expected = fp8_checkpoint(tmp_path, kind, block, scales, extra)
    ck = load_checkpoint(path)
    assert "quantization_config" not in ck.config and not any("activation_scale" in k for k in ck.weights)
    if mode is None:
        assert "quantization" not in ck.config
    else:
        assert ck.config["quantization"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    for base, ref in expected.items():
        m = re.match(r"^(.*\.mlp)\.experts\.(\d+)\.(\w+)$", base)
        got = dense(ck, f"{m[1]}.switch_mlp.{m[3]}")[int(m[2])] if m else dense(ck, base)
        np.testing.assert_array_equal(got, ref, err_msg=base)
        if mode and not m:
            assert ck.weights[f"{base}.scales"].dtype == mx.uint8 and f"{base}.biases" not in ck.weights

    torch_setup()
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # dequantized by transformers
    sd = hf.state_dict()
    for base, ref in expected.items():
        if base + ".weight" in sd:  # dense modules: transformers' dequantization equals ours bit for bit
            np.testing.assert_array_equal(sd[base + ".weight"].numpy(), ref, err_msg=base)
    ids = np.random.default_rng(0).integers(0, 256, (2, 12))
    ref, want = hf_logits(hf, ids), hf_greedy(hf, ids[:1], 24)
    for dequantize in (True, False):
        model = model_from_checkpoint(load_checkpoint(path), dtype=mx.float32, dequantize=dequantize)
        err = rel_err(np.array(model(mx.array(ids))), ref)
        assert err <= REL_TOL, f"dequantize={dequantize}: logits rel err {err:.2e}"
        assert mlx_greedy(model, ids[:1], 24) == want


def test_import_modes(tmp_path):
    path, expected = fp8_checkpoint(tmp_path, "qwen3", (32, 32), "pow2")
    base = "model.layers.0.mlp.down_proj"
    ck = load_checkpoint(path, ImportOptions(fp8="dense"))
    assert "quantization" not in ck.config and ck.weights[base + ".weight"].dtype == mx.float32
    np.testing.assert_array_equal(dense(ck, base), expected[base])

    ck = load_checkpoint(path, ImportOptions(fp8=QuantSpec(8, 64, "affine")))  # re-quantized: close, not exact
    assert ck.config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    err = rel_err(dense(ck, base), expected[base])
    assert 0 < err < 1e-2

    ck = load_checkpoint(path, ImportOptions(fp8=QuantSpec(8, 32, "mxfp8")))  # exact: bytes kept
    np.testing.assert_array_equal(dense(ck, base), expected[base])
    model = load_model(path, dtype=mx.float32)
    assert model is not None


def test_non_power_of_two_scales_requantized_to_mxfp8_on_request(tmp_path):
    path, expected = fp8_checkpoint(tmp_path, "qwen2", (64, 32), "float32")
    ck = load_checkpoint(path, ImportOptions(fp8=QuantSpec(8, 32, "mxfp8")))
    base = "model.layers.1.self_attn.o_proj"
    assert ck.config["quantization"]["mode"] == "mxfp8"
    assert 0 < rel_err(dense(ck, base), expected[base]) < 0.1


def test_partial_edge_blocks():
    """ceil(out/bo) x ceil(in/bi) scales: the last row/column blocks are partial."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((100, 96)).astype(np.float32)
    s = rng.uniform(0.001, 0.01, (2, 2)).astype(np.float32)
    full = np.repeat(np.repeat(s, 64, 0), 64, 1)[:100, :96]
    q = torch.tensor(w / full).to(torch.float8_e4m3fn)
    ref = q.float().numpy() * full
    got = fp8_dense(mx.array(q.view(torch.uint8).numpy()), mx.array(s), (64, 64))
    np.testing.assert_array_equal(np.array(got), ref)
    cfg = {"model_type": "qwen2", "quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}
    _, out = import_quantized(cfg, {"m.weight": mx.array(q.view(torch.uint8).numpy()), "m.weight_scale_inv": mx.array(s)})
    np.testing.assert_array_equal(np.array(out["m.weight"]), ref)


def test_per_tensor_scale():
    q = torch.tensor(np.linspace(-4, 4, 64 * 32, dtype=np.float32).reshape(64, 32)).to(torch.float8_e4m3fn)
    cfg = {"model_type": "qwen2", "quantization_config": {"quant_method": "fp8"}}
    _, out = import_quantized(cfg, {"m.weight": mx.array(q.view(torch.uint8).numpy()), "m.weight_scale_inv": mx.array([0.3])})
    np.testing.assert_array_equal(np.array(out["m.weight"]), q.float().numpy() * np.float32(0.3))
    # stacked (experts, out, in) weights: one scale per expert, or one for all
    q2 = mx.array(np.stack([q.view(torch.uint8).numpy()] * 2))
    for s, want in (([0.5, 2.0], [0.5, 2.0]), (0.25, [0.25, 0.25])):
        _, out = import_quantized(cfg, {"m.weight": q2, "m.weight_scale_inv": mx.array(s)})
        np.testing.assert_array_equal(np.array(out["m.weight"]), q.float().numpy()[None] * np.float32(want)[:, None, None])
    with pytest.raises(WeightsError, match=r"has shape \(3,\), expected \(2,\)"):
        import_quantized(cfg, {"m.weight": q2, "m.weight_scale_inv": mx.ones(3)})


# ---------------------------------------------------------------------- bad input


def _fp8(O=64, I=64, sshape=(2, 2)):
    q = torch.zeros(O, I).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return {"m.weight": mx.array(q), "m.weight_scale_inv": mx.ones(sshape)}


def _run(weights, options=None, **qc):
    cfg = {"model_type": "qwen2", "quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 32], **qc}}
    return import_quantized(cfg, weights, options, where="ckpt")


@pytest.mark.parametrize("qc, match", [
    ({"fmt": "e5m2"}, r"FP8 format 'e5m2' is not supported"),
    ({"weight_block_size": [128]}, r"weight_block_size is \[128\]"),
    ({"weight_block_size": [0, 128]}, r"weight_block_size is \[0, 128\]"),
])
def test_bad_config(qc, match):
    with pytest.raises(ConfigError, match=match):
        _run(_fp8(), **qc)


def test_bad_mode():
    with pytest.raises(ConfigError, match=r"fp8 import mode 'fp16'"):
        _run(_fp8(), ImportOptions(fp8="fp16"))


def test_bad_tensors():
    w = _fp8()
    with pytest.raises(WeightsError, match=r"'m\.weight_scale_inv' has shape \(2, 3\), expected \(2, 2\)"):
        _run({**w, "m.weight_scale_inv": mx.ones((2, 3))})
    with pytest.raises(WeightsError, match=r"scale 'x\.weight_scale_inv' has no weight"):
        _run({**w, "x.weight_scale_inv": mx.ones((2, 2))})
    with pytest.raises(WeightsError, match=r"'m\.weight' has dtype mlx.core.bfloat16"):
        _run({**w, "m.weight": w["m.weight"].astype(mx.bfloat16)})
    with pytest.raises(WeightsError, match=r"without a weight_scale_inv: x\.weight"):
        _run({**w, "x.weight": w["m.weight"]})
    with pytest.raises(WeightsError, match=r"expected float or E8M0"):
        _run({**w, "m.weight_scale_inv": mx.ones((2, 2), mx.int32)}, ImportOptions(fp8="dense"))
