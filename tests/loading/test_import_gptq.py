"""GPTQ checkpoints built in the test: known integers packed in AutoGPTQ's documented layout.

Each case saves a tiny perturbed transformers model, replaces every decoder Linear by
random integer weights / zero points / float16 scales packed as GPTQ (qweight, qzeros,
scales, g_idx), and writes a float twin holding the dequantized weights from an
independent numpy dequantizer (the documented formula). Checked: our MLX triplets
dequantize to exactly those weights (bit for bit), and the model loaded from the GPTQ
directory gives transformers' float32 logits on the twin (max|err|/max|ref| <= 1e-4) and
the same greedy tokens, both dequantized at load and kept quantized.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

from qwen_mlx.errors import ConfigError, QwenMLXError, WeightsError
from qwen_mlx.loading.imports import import_quantized
from qwen_mlx.loading.loader import load_checkpoint, load_model
from qwen_mlx.quant.spec import QuantizationError
from tests.helpers import REL_TOL, hf_greedy, hf_logits, mlx_greedy, perturb, rel_err, torch_setup

LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight$")
SIZES = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
             max_position_embeddings=256)


# ------------------------------------------------------------ checkpoint builders


def tiny_hf(tmp: Path, kind: str) -> Path:
    """A perturbed float32 transformers model of ``kind``, saved in the hub layout."""
    torch_setup()
    import transformers as tf

    if kind == "qwen2":
        cfg = tf.Qwen2Config(intermediate_size=192, tie_word_embeddings=False, **SIZES)
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(intermediate_size=192, head_dim=32, tie_word_embeddings=True, **SIZES)
        model = tf.Qwen3ForCausalLM(cfg)
    else:
        cfg = tf.Qwen3MoeConfig(intermediate_size=192, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                head_dim=32, **SIZES)
        model = tf.Qwen3MoeForCausalLM(cfg)
    src = tmp / f"{kind}-float"
    perturb(model.float().eval(), seed=1).save_pretrained(src, safe_serialization=True)
    return src


def quantized_pair(src: Path, tmp: Path, qconfig: dict, pack):
    """Rewrite ``src``: every decoder Linear goes through ``pack(name, out, in) -> (packed
    tensors, dequantized float32 (out, in))``. Returns (quantized dir, float twin dir,
    {module: dequantized weight})."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    qt, ft, expected = {}, {}, {}
    for name, x in sorted(tensors.items()):
        if not LINEAR.match(name):
            qt[name] = ft[name] = x
            continue
        base = name[: -len(".weight")]
        packed, w = pack(base, *x.shape)
        qt.update({f"{base}.{k}": v for k, v in packed.items()})
        ft[name] = expected[base] = w
    qdir, fdir = tmp / "quantized", tmp / "float-twin"
    for d, t, c in ((qdir, qt, {**cfg, "quantization_config": qconfig}), (fdir, ft, cfg)):
        d.mkdir()
        save_file(t, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(c))
    return qdir, fdir, expected


def pack_words(q: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's ``pack``: integer rows of ``q`` (axis 0) -> int32 words (axis 0)."""
    q = q.astype(np.uint64)
    if 32 % bits == 0:
        per = 32 // bits
        return sum(q[j::per] << np.uint64(bits * j) for j in range(per)).astype(np.uint32).view(np.int32)
    assert bits == 3  # 32 values in 3 words; values 10 and 21 straddle word boundaries
    out = np.zeros((q.shape[0] * 3 // 32,) + q.shape[1:], np.uint64)
    i = row = 0
    while row < out.shape[0]:
        for j in range(10):
            out[row] |= q[i + j] << np.uint64(3 * j)
        i += 10
        out[row] |= q[i] << np.uint64(30)
        row += 1
        out[row] |= (q[i] >> np.uint64(2)) & np.uint64(1)
        i += 1
        for j in range(10):
            out[row] |= q[i + j] << np.uint64(3 * j + 1)
        i += 10
        out[row] |= q[i] << np.uint64(31)
        row += 1
        out[row] |= (q[i] >> np.uint64(1)) & np.uint64(3)
        i += 1
        for j in range(10):
            out[row] |= q[i + j] << np.uint64(3 * j + 2)
        i += 10
        row += 1
    return (out & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


def gptq_dequantize(q, zero, scales, g_idx):
    """The documented formula: w[o, i] = scales[g[i], o] * (q[i, o] - zero[g[i], o])."""
    return (scales.astype(np.float32)[g_idx] * (q - zero[g_idx]).astype(np.float32)).T.copy()


def gptq_packer(rng, bits, group, v1=True, sym=False, g_idx=None):
    def pack(name, n_out, n_in):
        gs = n_in if group == -1 else group
        groups = -(-n_in // gs)
        q = rng.integers(0, 2 ** bits, (n_in, n_out))
        if sym:
            zero = np.full((groups, n_out), 2 ** (bits - 1))
        else:  # v1 stores zero - 1: zero 0 cannot be stored
            zero = rng.integers(1 if v1 else 0, 2 ** bits, (groups, n_out))
        scales = (rng.uniform(0.5, 1.5, (groups, n_out)) * 0.1 / 2 ** bits).astype(np.float16)
        gi = (g_idx(n_in, groups) if g_idx else np.arange(n_in) // gs).astype(np.int32)
        packed = {"qweight": pack_words(q, bits), "qzeros": pack_words((zero - v1).T, bits).T.copy(),
                  "scales": scales, "g_idx": gi}
        return packed, gptq_dequantize(q, zero, scales, gi)

    return pack


def block_permuted(rng):
    """Act-order style g_idx that is constant on runs of 32 inputs (representable exactly)."""
    return lambda n_in, groups: np.repeat(rng.permutation(np.repeat(np.arange(groups), n_in // 32 // groups)), 32)


def triplet_dense(ck, base: str) -> np.ndarray:
    w = ck.weights
    q = ck.config["quantization"]
    lay = q.get(base, q)
    assert w[f"{base}.weight"].dtype == mx.uint32 and w[f"{base}.scales"].dtype == mx.float32
    return np.array(mx.dequantize(w[f"{base}.weight"], w[f"{base}.scales"], w[f"{base}.biases"],
                                  group_size=lay["group_size"], bits=lay["bits"]))


def check_import(qdir: Path, fdir: Path, expected: dict, vocab: int = 256):
    """Weights bit-exact vs the numpy dequantizer; logits and greedy tokens vs transformers."""
    import transformers as tf

    ck = load_checkpoint(qdir)
    for base, ref in expected.items():
        m = re.match(r"^(.*\.mlp)\.experts\.(\d+)\.(\w+)$", base)
        got = triplet_dense(ck, f"{m[1]}.switch_mlp.{m[3]}")[int(m[2])] if m else triplet_dense(ck, base)
        np.testing.assert_array_equal(got, ref, err_msg=base)
    hf = tf.AutoModelForCausalLM.from_pretrained(fdir, dtype=torch_setup().float32).eval()
    ids = np.random.default_rng(0).integers(0, vocab, (2, 12))
    ref = hf_logits(hf, ids)
    want = hf_greedy(hf, ids[:1], 24)
    errs = {}
    for dequantize in (True, False):
        model = load_model(qdir, dtype=mx.float32, dequantize=dequantize)
        errs[dequantize] = rel_err(np.array(model(mx.array(ids))), ref)
        assert errs[dequantize] <= REL_TOL, f"dequantize={dequantize}: logits rel err {errs[dequantize]:.2e}"
        assert mlx_greedy(model, ids[:1], 24) == want
    return ck, errs


# ------------------------------------------------------------------------ parity


CASES = {
    "qwen2-4bit-g32-v1": ("qwen2", dict(bits=4, group=32)),
    "qwen3-8bit-g64-sym": ("qwen3", dict(bits=8, group=64, sym=True)),
    "qwen2-3bit-g128-v2": ("qwen2", dict(bits=3, group=128, v1=False)),  # 192 inputs: groups 128 + 64
    "qwen3-2bit-g64-actorder": ("qwen3", dict(bits=2, group=64, g_idx="block")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gptq_matches_transformers(tmp_path, case):
    kind, p = CASES[case]
    rng = np.random.default_rng(len(case))
    g_idx = block_permuted(rng) if p.get("g_idx") == "block" else None
    pack = gptq_packer(rng, p["bits"], p["group"], v1=p.get("v1", True), sym=p.get("sym", False), g_idx=g_idx)
    qc = {"quant_method": "gptq", "bits": p["bits"], "group_size": p["group"], "desc_act": g_idx is not None,
          "sym": p.get("sym", False), "checkpoint_format": "gptq" if p.get("v1", True) else "gptq_v2"}
    qdir, fdir, expected = quantized_pair(tiny_hf(tmp_path, kind), tmp_path, qc, pack)
    ck, _ = check_import(qdir, fdir, expected)
    q = ck.config["quantization"]
    assert "quantization_config" not in ck.config
    assert (q["bits"], q["mode"]) == (p["bits"], "affine")
    # block-permuted g_idx: MLX groups of 32; group 128 over down_proj's 192 inputs: MLX groups of 64
    assert q["group_size"] == (32 if g_idx else p["group"])
    if p["group"] == 128:
        assert q["model.layers.0.mlp.down_proj"] == {"group_size": 64, "bits": 3, "mode": "affine"}


def test_gptq_moe_with_dynamic_bits(tmp_path):
    """Per-expert GPTQ tensors stack into switch_mlp; GPTQModel's ``dynamic`` gives layer 1's
    down projections 8 bits, recorded under the stacked path."""
    rng = np.random.default_rng(7)
    four, eight = gptq_packer(rng, 4, 32), gptq_packer(rng, 8, 32)
    rx = r"+:.*layers\.1\.mlp\.experts\.\d+\.down_proj"
    pack = lambda name, o, i: (eight if re.match(rx[2:], name) else four)(name, o, i)  # noqa: E731
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "dynamic": {rx: {"bits": 8}}}
    qdir, fdir, expected = quantized_pair(tiny_hf(tmp_path, "qwen3_moe"), tmp_path, qc, pack)
    ck, _ = check_import(qdir, fdir, expected)
    q = ck.config["quantization"]
    assert q["model.layers.1.mlp.switch_mlp.down_proj"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert ck.weights["model.layers.1.mlp.switch_mlp.down_proj.weight"].shape == (4, 128, 64 // 4)
    assert ck.weights["model.layers.0.mlp.switch_mlp.down_proj.weight"].shape == (4, 128, 64 // 8)


def test_unpack_worked_example():
    """The docstring's example: word 0x76543210 packs 0..7; stored zero 7 (v1) means 8."""
    qweight = np.full((4, 8), 0x76543210, np.uint32).view(np.int32)  # 32 inputs, 8 outputs
    qzeros = np.full((1, 1), 0x77777777, np.uint32).view(np.int32)
    scales = np.full((1, 8), 0.01, np.float16)
    cfg = {"model_type": "qwen2", "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}}
    out, w = import_quantized(cfg, {"m.qweight": mx.array(qweight), "m.qzeros": mx.array(qzeros), "m.scales": mx.array(scales)})
    dense = np.array(mx.dequantize(w["m.weight"], w["m.scales"], w["m.biases"], group_size=32, bits=4))
    s = np.float32(np.float16(0.01))
    np.testing.assert_array_equal(dense[0, :8], s * (np.arange(8) - 8).astype(np.float32))
    assert out["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}


def test_mlx_lm_quantization_config_passes_through():
    cfg = {"model_type": "qwen2", "quantization": {"group_size": 64, "bits": 4},
           "quantization_config": {"group_size": 64, "bits": 4}}
    w = {"a.weight": mx.zeros((2, 2))}
    assert import_quantized(cfg, w) == (cfg, w)


# ---------------------------------------------------------------------- bad input


def _gptq(n_in=128, n_out=64, bits=4, group=32, **over):
    rng = np.random.default_rng(0)
    packed, _ = gptq_packer(rng, bits, group)("m", n_out, n_in)
    packed.update(over)
    return {f"m.{k}": mx.array(v) for k, v in packed.items() if v is not None}


def _run(weights, **qc):
    cfg = {"model_type": "qwen2", "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32, **qc}}
    return import_quantized(cfg, weights, where="ckpt")


@pytest.mark.parametrize("qc, err, match", [
    ({"quant_method": "bitsandbytes"}, ConfigError, r"quant_method 'bitsandbytes' is not supported"),
    ({"bits": 5}, ConfigError, r"5-bit GPTQ is not supported"),
    ({"bits": "4"}, ConfigError, r"bits is '4'"),
    ({"checkpoint_format": "marlin"}, ConfigError, r"checkpoint_format 'marlin'"),
    ({"group_size": 0}, ConfigError, r"group_size 0"),
])
def test_bad_config(qc, err, match):
    with pytest.raises(err, match=match):
        _run(_gptq(), **qc)


def test_inconsistent_packed_shapes():
    w = _gptq()
    with pytest.raises(WeightsError, match=r"'m\.qzeros' has shape \(4, 4\), expected \(4, 64 \* 4 / 32\)"):
        _run({**w, "m.qzeros": w["m.qzeros"][:, :4]})
    with pytest.raises(WeightsError, match=r"'m\.scales' has shape \(3, 64\).*expected float \(4, 64\)"):
        _run({**w, "m.scales": w["m.scales"][:3]})
    with pytest.raises(WeightsError, match=r"'m\.g_idx' has shape \(96,\)"):
        _run({**w, "m.g_idx": w["m.g_idx"][:96]})
    with pytest.raises(WeightsError, match=r"'m\.g_idx' has group indices outside \[0, 4\)"):
        _run({**w, "m.g_idx": w["m.g_idx"] + 1})
    with pytest.raises(WeightsError, match=r"'m\.qweight' must be a 2-D integer tensor"):
        _run({**w, "m.qweight": w["m.qweight"].astype(mx.float32)})
    with pytest.raises(WeightsError, match=r"'m' has a qweight but no qzeros"):
        _run({k: v for k, v in w.items() if k != "m.qzeros"})
    with pytest.raises(WeightsError, match=r"without a qweight: x\.g_idx"):
        _run({**w, "x.g_idx": w["m.g_idx"]})
    with pytest.raises(WeightsError, match=r"no tensor ends in '\.qweight'"):
        _run({"a.weight": mx.zeros((2, 2))})


def test_group_size_that_does_not_split_into_mlx_groups():
    # 128 inputs in groups of 48 (ceil: 3 groups): runs of 32 straddle groups
    w = _gptq(group=48)
    with pytest.raises(QuantizationError, match=r"group_size 48 over 128 inputs does not split into MLX groups"):
        _run(w, group_size=48)
    # 40 inputs: no MLX group size divides them
    with pytest.raises(QuantizationError, match=r"over 40 inputs"):
        _run(_gptq(n_in=40, group=40), group_size=-1)


def test_act_order_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    scatter = lambda n_in, groups: rng.permutation(np.arange(n_in) // (n_in // groups))  # noqa: E731
    w = _gptq(g_idx=scatter(128, 4).astype(np.int32))
    with pytest.raises(QuantizationError, match=r"'m': act-order \(desc_act\).*static_groups"):
        _run(w, desc_act=True)
    # end to end through load_model: a QwenMLXError naming the module
    pack = gptq_packer(rng, 4, 32, g_idx=scatter)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True}
    qdir, _, _ = quantized_pair(tiny_hf(tmp_path, "qwen2"), tmp_path, qc, pack)
    with pytest.raises(QwenMLXError, match=r"model\.layers\.\d+\.\w+\.\w+_proj': act-order") as e:
        load_model(qdir)
    assert str(e.value).startswith(str(qdir))


def test_experts_with_different_layouts():
    w4, w8 = _gptq(bits=4), _gptq(bits=8)
    e = "model.layers.0.mlp.experts.{}.down_proj."
    weights = {**{e.format(0) + k[2:]: v for k, v in w4.items()}, **{e.format(1) + k[2:]: v for k, v in w8.items()}}
    with pytest.raises(QuantizationError, match=r"experts of 'model\.layers\.0\.mlp\.switch_mlp\.down_proj' are packed"):
        _run(weights, dynamic={r".*experts\.1\..*": {"bits": 8}})
