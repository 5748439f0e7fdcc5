"""GGML types MLX has no kernel for: dequantized exactly (gguf.quants.dequantize) with a
notice, while Q4_0/Q4_1/Q8_0 (and Q4_K, Q5_*: test_gguf_q5; MXFP4, NVFP4, TQ*: test_gguf_mxfp4)
stay MLX quantized."""

import sys

import numpy as np
import pytest

import mlx.core as mx

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from qwen_mlx.errors import WeightsError  # noqa: E402
from qwen_mlx.loading.gguf import GGUFDequantizedWarning, read_gguf  # noqa: E402
from tests.helpers import REL_TOL, gguf_dense, rel_err, torch_setup  # noqa: E402
from tests.loading.test_gguf_synthetic import TYPES, V, write_gguf  # noqa: E402

# type -> the llama tensor it goes on: 256-wide rows for super-block types, else 64-wide
WIDE, NARROW = "blk.1.ffn_down.weight", "blk.1.attn_v.weight"
# (MXFP4, NVFP4, TQ1_0 and TQ2_0 stay quantized: test_gguf_mxfp4)
DEQUANTIZED = {T.IQ4_NL: NARROW,
               T.Q2_K: WIDE, T.Q3_K: WIDE, T.IQ4_XS: WIDE, T.IQ2_XXS: WIDE, T.IQ3_S: WIDE}
HF = {WIDE: "model.layers.1.mlp.down_proj.weight", NARROW: "model.layers.1.self_attn.v_proj.weight"}


@pytest.mark.parametrize("qtype", sorted(DEQUANTIZED, key=lambda t: t.name), ids=lambda t: t.name)
def test_type_is_dequantized_with_notice(tmp_path, qtype):
    path = tmp_path / "m.gguf"
    gname = DEQUANTIZED[qtype]
    types = {**{k: v for k, v in TYPES["llama"].items() if k != WIDE}, gname: qtype}
    expected = write_gguf(path, "llama", types=types)
    with pytest.warns(GGUFDequantizedWarning, match=rf"{qtype.name} x1\b") as rec:
        ck = read_gguf(path)
    assert str(path) in str(rec[0].message)
    w = ck.weights[HF[gname]]
    assert w.dtype == mx.float32 and HF[gname][:-7] + ".scales" not in ck.weights
    np.testing.assert_array_equal(np.array(w), expected[HF[gname]])
    # the other types of the file keep their treatment on this (non-mx.load) path
    for name, ref in expected.items():
        np.testing.assert_array_equal(gguf_dense(ck, name), ref, err_msg=name)
    assert ck.weights["model.embed_tokens.weight"].dtype == mx.uint32  # Q8_0
    assert ck.weights["model.layers.1.self_attn.k_proj.weight"].dtype == mx.uint32  # Q4_0
    assert ck.weights["model.layers.0.mlp.up_proj.weight"].dtype == mx.uint32  # Q4_1
    assert ck.weights["model.layers.0.mlp.gate_proj.weight"].dtype == mx.bfloat16


def test_notice_counts_every_type(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", types={**TYPES["llama"], "blk.0.attn_v.weight": T.IQ4_NL, "blk.1.attn_v.weight": T.IQ4_NL,
                                     "blk.1.ffn_down.weight": T.Q3_K, "blk.0.attn_k.weight": T.Q5_0})
    with pytest.warns(GGUFDequantizedWarning) as rec:
        read_gguf(path)
    msg = str(rec[0].message)
    assert len(rec) == 1 and "4 tensor(s) dequantized to float32 (IQ4_NL x2, Q3_K x1, Q6_K x1)" in msg, msg
    assert "Q3_K/Q6_K scale groups of 16 weights, which MLX affine quantization (groups of 32, 64 or 128) " \
           "cannot express" in msg and "no kernel for IQ4_NL" in msg and "Q5_0" not in msg


def test_notice_names_only_what_applies(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", types={**TYPES["llama"], "blk.1.ffn_down.weight": T.Q2_K})
    with pytest.warns(GGUFDequantizedWarning) as rec:
        read_gguf(path)
    msg = str(rec[0].message)
    assert "(Q2_K x1, Q6_K x1): Q2_K/Q6_K scale groups of 16" in msg and "no kernel" not in msg, msg


def test_no_notice_for_kept_types(tmp_path, recwarn):
    path = tmp_path / "m.gguf"
    write_gguf(path, "qwen2")  # Q8_0, Q4_0, BF16, F32
    read_gguf(path)
    assert not [w for w in recwarn if issubclass(w.category, GGUFDequantizedWarning)]


def _assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert mx.array_equal(a[k], b[k], equal_nan=True).item(), k


def test_block_decoders_equal_mx_load(tmp_path, smollm2_path):
    """Our per-tensor decoders give mx.load's arrays bit for bit for the types mx.load reads
    (mx.load is not used: it reads the whole file at once). Left out: BF16 (mx.load makes it
    float16, overflowing past 65504) and llama Q/K (mx.load keeps llama.cpp's row order)."""
    from qwen_mlx.loading.gguf import map_tensor_name

    path = tmp_path / "m.gguf"
    write_gguf(path, "qwen2", types={**TYPES["qwen2"], "blk.1.attn_q.weight": T.Q4_1, "blk.1.attn_v.weight": T.F16,
                                     "blk.0.ffn_down.weight": T.Q4_0})
    for p in (path, smollm2_path):  # synthetic mix, then the real Q4_1 / Q8_0 file
        ck, raw = read_gguf(p), mx.load(str(p))
        tensors, qk = ck.weights.header.tensors, ck.weights.qk_heads
        src = {k: k if k in tensors else k.rsplit(".", 1)[0] + ".weight" for k in raw}
        via_mx = {map_tensor_name(k): v for k, v in raw.items()
                  if tensors[src[k]].type_name != "BF16" and src[k] not in qk}
        assert len(via_mx) > 10 and any(k.endswith(".scales") for k in via_mx)
        _assert_same({k: ck.weights[k] for k in via_mx}, via_mx)


def test_mixed_file_matches_transformers(tmp_path):
    """Q5_0/Q5_1/Q5_K/Q3_K/IQ4_NL beside Q8_0/Q4_0/Q4_1: logits of transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM

    from qwen_mlx.loading.loader import load_model

    torch = torch_setup()
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", types={**TYPES["llama"], "blk.0.attn_v.weight": T.Q5_0, "blk.1.attn_v.weight": T.Q5_1,
                                     "blk.0.ffn_down.weight": T.Q5_K, "blk.1.ffn_down.weight": T.Q3_K,
                                     "blk.0.attn_output.weight": T.IQ4_NL})
    ids = np.random.default_rng(0).integers(0, V, (2, 12))
    tf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = tf(torch.tensor(ids)).logits.numpy()
    for dequantize in (True, False):
        with pytest.warns(GGUFDequantizedWarning):
            model = load_model(path, dtype=mx.float32, dequantize=dequantize)
        err = rel_err(np.array(model(mx.array(ids))), ref)
        assert err <= REL_TOL, f"dequantize={dequantize}: rel err {err:.2e}"


def test_missing_gguf_package(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", types={**TYPES["llama"], "blk.1.ffn_down.weight": T.Q3_K})
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(WeightsError, match=r"'blk\.1\.ffn_down\.weight' has GGML type Q3_K; .*needs the 'gguf' package"):
        read_gguf(path)  # refused up front, before any tensor is decoded
