"""Lossless imports stay lossless through `convert` (issue 3 item 3): a tensor whose packed
layout the plan keeps (GGUF Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K, GPTQ, AWQ) is written with the
source's integers and its scales / biases in a dtype that holds them exactly, so that its
dequantized weight equals the source's bit for bit whatever ``--dtype`` says (float tensors
follow ``--dtype``; a notice says which scales stayed wider). qwen_mlx and mlx-lm load the
output with those exact weights."""

import re

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from qwen_mlx.loading.loader import load_checkpoint, load_model  # noqa: E402
from qwen_mlx.quant import ConvertOptions, convert  # noqa: E402
from qwen_mlx.quant.spec import QuantSpec, dequantize  # noqa: E402
from tests.helpers import mlx_greedy, rel_err  # noqa: E402
from tests.loading.test_gguf_streaming import add_tokenizer  # noqa: E402
from tests.loading.test_gguf_synthetic import V, write_gguf  # noqa: E402

# a tiny llama GGUF with every type the reader keeps packed with half / float32 scales
PACKED = {"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.Q8_0, "blk.0.attn_k.weight": T.Q4_1,
          "blk.1.attn_k.weight": T.Q4_0, "blk.0.attn_v.weight": T.Q4_0, "blk.1.attn_v.weight": T.Q4_1,
          "blk.0.ffn_up.weight": T.Q4_1, "blk.0.ffn_down.weight": T.Q5_K, "blk.1.ffn_down.weight": T.Q4_K,
          "blk.1.ffn_gate.weight": T.F16}
FILES = {"f16": PACKED, "bf16": {**PACKED, "blk.0.ffn_gate.weight": T.BF16}}  # BF16 data: no float16 default
DT = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lossless")
    return {k: (root / f"{k}.gguf", write_gguf(root / f"{k}.gguf", "llama", types=t, hook=add_tokenizer))
            for k, t in FILES.items()}


def source_rules(ck) -> str:
    """--keep-bits rules giving every packed source module its own spec (all are kept)."""
    q = ck.config["quantization"]
    return ",".join(f"^{re.escape(b)}$={q.get(b, q)['bits']}/{q.get(b, q)['group_size']}"
                    for b in sorted(n[:-7] for n in ck.weights if n.endswith(".scales")))


def packed_parts(w, base):
    return {k: w[f"{base}.{k}"] for k in ("weight", "scales", "biases")}


def read_dir(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def kept_dtype(src: mx.Dtype, dtype: mx.Dtype) -> mx.Dtype:
    """The loader's rule (`loader._bound`): the output dtype where it holds the stored one."""
    return dtype if src == dtype or dtype == mx.float32 else src


def check_kept(ck, out, dtype, expected=None):
    """Every packed source tensor: same integers, scales / biases exact, dequantized weight
    equal to the source's (and to ``expected``, an independent dequantizer) bit for bit."""
    q = ck.config["quantization"]
    bases = sorted(n[:-7] for n in ck.weights if n.endswith(".scales"))
    wider = 0
    for b in bases:
        src = packed_parts(ck.weights, b)
        spec = QuantSpec(q.get(b, q)["bits"], q.get(b, q)["group_size"])
        got = packed_parts(out, b)
        assert mx.array_equal(got["weight"], src["weight"]).item(), b
        for k in ("scales", "biases"):
            assert got[k].dtype == kept_dtype(src[k].dtype, dtype), (b, k, got[k].dtype)
            assert mx.array_equal(got[k].astype(src[k].dtype), src[k]).item(), (b, k)
        deq = np.array(dequantize(got, spec))
        assert np.array_equal(deq, np.array(dequantize(src, spec))), b
        if expected is not None:
            assert np.array_equal(deq, expected[b]), b
        wider += got["scales"].dtype != dtype
    return bases, wider


@pytest.mark.parametrize("file,dtype,want", [("f16", None, "float16"), ("bf16", None, "bfloat16"),
                                             ("f16", "bfloat16", "bfloat16"), ("bf16", "float16", "float16"),
                                             ("f16", "float32", "float32")])
def test_gguf_kept_tensors_exact(files, tmp_path, file, dtype, want):
    path, expected = files[file]
    ck = load_checkpoint(path)
    res = convert(path, tmp_path / "o", ConvertOptions(bits=4, group_size=32, dtype=dtype, keep_bits=source_rules(ck),
                                                       report=True))
    assert res.dtype == want
    out = read_dir(res.path)
    ref = {n[:-7]: expected[n] for n in expected}
    bases, wider = check_kept(ck, out, DT[want], ref)
    assert len(bases) == 9 and res.plan.counts() == {"affine 4-bit g32": 12, "affine 8-bit g32": 2, "affine 5-bit g32": 1}
    errs = {e.name: e.rel_err for e in res.errors}
    assert all(errs[f"{b}.weight"] == 0.0 for b in bases)  # --report: kept tensors lose nothing
    assert errs["model.layers.1.mlp.gate_proj.weight"] > 0  # F16 source weight, 4-bit: quantized
    for n in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert out[n].dtype == DT[want]  # float tensors: --dtype (or the default)
    # Q4_K / Q5_K carry float32 scales (an fp16 d times a 6-bit scale): only float32 holds them;
    # Q4_0 / Q4_1 / Q8_0 float16 ones fit float16 and float32, not bfloat16
    assert wider == {"float16": 2, "bfloat16": 9, "float32": 0}[want]
    assert len(res.notices) == (wider > 0)
    if wider:
        assert f"{wider} quantized tensor(s)" in res.notices[0] and want in res.notices[0]


def test_loaded_weights_exact(files, tmp_path):
    """The converted directory, read by qwen_mlx in float32 (CPU: dequantized at load): the
    source's dequantized weights exactly; kept packed in bfloat16: float32 / float16 scales."""
    from mlx.utils import tree_flatten

    path, expected = files["bf16"]
    ck = load_checkpoint(path)
    res = convert(path, tmp_path / "o", ConvertOptions(bits=4, group_size=32, keep_bits=source_rules(ck)))
    bases = sorted(n[:-7] for n in ck.weights if n.endswith(".scales"))
    w = dict(tree_flatten(load_model(res.path, dtype=mx.float32, fuse=False).parameters()))
    for b in bases:
        assert np.array_equal(np.array(w[f"{b}.weight"]), expected[f"{b}.weight"]), b
    m = dict(load_model(res.path, dtype=mx.bfloat16, dequantize=False, fuse=False).named_modules())
    assert m["model.layers.1.mlp.down_proj"].scales.dtype == mx.float32  # Q4_K
    assert m["model.layers.0.self_attn.k_proj"].scales.dtype == mx.float16  # Q4_1
    assert m["model.norm"].weight.dtype == mx.bfloat16


def gptq_awq_source(tmp_path, method):
    from tests.loading.test_import_awq import awq_packer
    from tests.loading.test_import_gptq import gptq_packer, quantized_pair, tiny_hf
    from tests.quant.builders import write_tokenizer

    rng = np.random.default_rng(7)
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False}
        pack = gptq_packer(rng, 4, 32)
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}
        pack = awq_packer(rng, 32)
    qdir, _, expected = quantized_pair(tiny_hf(tmp_path, "qwen2"), tmp_path, qc, pack)
    write_tokenizer(qdir, 256)
    return qdir, expected


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_awq_kept_exact(tmp_path, method):
    """Official-style GPTQ / AWQ: float16 scales and integer zero points become exact float32
    scales / biases (-zero x scale needs up to 19 significant bits); 4-bit g32 keeps them."""
    qdir, expected = gptq_awq_source(tmp_path, method)
    ck = load_checkpoint(qdir)
    res = convert(qdir, tmp_path / "o", ConvertOptions(bits=4, group_size=32, dtype="bfloat16", report=True))
    out = read_dir(res.path)
    bases, wider = check_kept(ck, out, mx.bfloat16, expected)
    assert len(bases) == 14 and wider == 14 and all(out[f"{b}.scales"].dtype == mx.float32 for b in bases)
    assert out["model.embed_tokens.scales"].dtype == mx.bfloat16  # float in the source: quantized in --dtype
    assert all(e.rel_err == 0.0 for e in res.errors if e.name[:-7] in bases)
    assert "14 quantized tensor(s)" in res.notices[0] and "float32" in res.notices[0]


def test_cli_notice_and_report(files, tmp_path):
    """`qwen-mlx convert --dtype bfloat16 --report` on the GGUF: float16 / float32 scales kept and
    said so on stderr; the report's error for kept tensors is 0."""
    from typer.testing import CliRunner

    from qwen_mlx.cli import app

    path, _ = files["f16"]
    r = CliRunner().invoke(app, ["convert", str(path), str(tmp_path / "o"), "--bits", "4", "--group-size", "32",
                                 "--dtype", "bfloat16", "--report"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "kept the scales / biases of 6 quantized tensor(s)" in " ".join(r.stderr.split())
    rows = {line.split("│")[1].strip(): line.split("│")[-2].strip() for line in r.stdout.splitlines()
            if line.count("│") >= 5 and ".weight" in line}
    assert rows["model.layers.1.mlp.down_proj.weight"] == "0.000e+00"  # Q4_K, kept
    assert rows["model.layers.0.self_attn.k_proj.weight"] == "0.000e+00"  # Q4_1, kept
    assert float(rows["model.embed_tokens.weight"]) > 1e-3  # Q8_0 re-quantized to 4 bits


def test_converted_gguf_in_mlx_lm(files, tmp_path):
    """The float16 default output loads in mlx-lm with the exact weights (its modules hold our
    float16 / float32 scales as written) and greedy-decodes as qwen_mlx does."""
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx.utils import tree_flatten
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    path, expected = files["f16"]
    ck = load_checkpoint(path)
    res = convert(path, tmp_path / "o", ConvertOptions(bits=4, group_size=32, keep_bits=source_rules(ck)))
    assert res.dtype == "float16"
    model, tok = mlx_lm.load(str(res.path))
    lm = dict(model.named_modules())
    for b in sorted(n[:-7] for n in ck.weights if n.endswith(".scales")):
        m = lm[b]
        assert m.scales.dtype == (mx.float32 if b.endswith("down_proj") else mx.float16), b
        got = dequantize({"weight": m.weight, "scales": m.scales, "biases": m.biases}, QuantSpec(m.bits, m.group_size))
        assert np.array_equal(np.array(got), expected[f"{b}.weight"]), b
    assert all(v.dtype == mx.float16 for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight"))
    prompt = np.random.default_rng(3).integers(2, V, size=(1, 8))
    lm_tokens = [r.token for r in stream_generate(model, tok, mx.array(prompt[0]), max_tokens=12,
                                                  sampler=make_sampler(0.0))]
    ours = load_model(res.path, dtype=mx.float32)  # the exact weights, float32 arithmetic
    assert mlx_greedy(ours, prompt, 12) == lm_tokens and len(set(lm_tokens)) > 1
    ids = mx.array(prompt)
    ref = np.array(ours(ids))
    assert rel_err(np.array(model(ids).astype(mx.float32)), ref) < 0.03  # mlx-lm as loaded: float16 activations
    model.set_dtype(mx.float32)  # every value it read, widened exactly: the same model as ours
    assert rel_err(np.array(model(ids)), ref) <= 1e-5
