"""Whole-model GGUF reads and `qwen-mlx info`: `GGUFWeights.read_all()` (what `load_model`
calls) reads a file whose types `mx.load` returns exactly with one `mx.load`, giving the
per-tensor decoders' arrays bit for bit; any other file is read tensor by tensor.
`checkpoint_info` reads the header only and says what decoding every tensor would say."""

import numpy as np
import pytest

import mlx.core as mx

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

import qwen_mlx.loading.gguf as gguf_mod  # noqa: E402
from qwen_mlx.errors import WeightsError  # noqa: E402
from qwen_mlx.loading.gguf import GGUFWeights, read_gguf  # noqa: E402
from tests.loading.test_gguf_synthetic import TYPES, V, write_gguf  # noqa: E402

# llama (Q/K rows un-permuted after mx.load too), every type one mx.load reads exactly
NATIVE = {"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.Q4_0, "blk.1.attn_k.weight": T.Q4_1,
          "blk.0.ffn_up.weight": T.Q8_0, "blk.1.ffn_gate.weight": T.F16, "blk.0.ffn_down.weight": T.Q4_1}


@pytest.fixture
def calls(monkeypatch):
    """Records the per-tensor decodes and the mx.load calls of the GGUF reader."""
    seen = {"decode": [], "mx.load": 0}
    real_decode, real_load = gguf_mod.decode, mx.load

    def load(*a, **k):
        seen["mx.load"] += 1
        return real_load(*a, **k)

    monkeypatch.setattr(gguf_mod, "decode", lambda f, t, p: seen["decode"].append(t.name) or real_decode(f, t, p))
    monkeypatch.setattr(mx, "load", load)
    return seen


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert (a[k].dtype, tuple(a[k].shape)) == (b[k].dtype, tuple(b[k].shape)), k
        assert mx.array_equal(a[k], b[k], equal_nan=True).item(), k


def test_read_all_is_one_mx_load(tmp_path, smollm2_path, calls):
    """The real Q4_1/Q8_0/F32 file and a synthetic llama mix: one mx.load, no decode, and
    the arrays (llama Q/K rows un-permuted) of the per-tensor path, bit for bit."""
    path = tmp_path / "native.gguf"
    write_gguf(path, "llama", types=NATIVE)
    for p in (smollm2_path, path):
        w = read_gguf(p).weights
        assert w.read_all() is w and len(w._cache) == len(w)
        assert calls == {"decode": [], "mx.load": 1}
        ref = read_gguf(p).weights
        _same({k: w[k] for k in w}, {k: ref[k] for k in ref})
        assert len(calls["decode"]) == len(ref.header.tensors)
        calls.update({"decode": [], "mx.load": 0})


def test_read_all_other_types_tensor_by_tensor(tmp_path, calls):
    """BF16, Q4_K, Q6_K (mx.load gets them wrong or lossy): per-tensor decodes, no mx.load."""
    path = tmp_path / "mix.gguf"
    write_gguf(path, "llama")  # TYPES["llama"]: BF16, Q4_K, Q6_K among them
    with pytest.warns(gguf_mod.GGUFDequantizedWarning):
        w = read_gguf(path).weights
    w.read_all()
    assert calls["mx.load"] == 0 and sorted(calls["decode"]) == sorted(w.header.tensors)
    assert w.read_all() is w and calls["mx.load"] == 0 and len(calls["decode"]) == len(w.header.tensors)


def test_read_all_keeps_pops_and_sets(tmp_path, calls):
    path = tmp_path / "native.gguf"
    write_gguf(path, "llama", types=NATIVE)
    w = read_gguf(path).weights
    emb, norm = "model.embed_tokens", "model.norm.weight"
    w.pop(emb + ".scales")
    w[norm] = mx.zeros((3,))
    w.read_all()
    assert emb + ".scales" not in w and w[emb + ".weight"].dtype == mx.uint32 and w[norm].shape == (3,)
    assert len(w._cache) == len(w) and calls["mx.load"] == 1
    w2 = read_gguf(path).weights
    for k in [k for k in w2 if not k.endswith("norm.weight")]:  # most of the file popped: the norms one by one
        w2.pop(k)
    calls.update({"decode": [], "mx.load": 0})
    w2.read_all()
    assert calls["mx.load"] == 0 and len(calls["decode"]) == len(w2) == 5 and len(w2._cache) == 5


def test_read_all_truncated_file(tmp_path):
    path = tmp_path / "native.gguf"
    write_gguf(path, "llama", types=NATIVE)
    ck = read_gguf(path)
    last = max(ck.weights.header.tensors.values(), key=lambda t: t.offset)
    with open(path, "r+b") as f:
        f.truncate(last.offset + 10)
    with pytest.raises(WeightsError, match=rf"truncated.*'{last.name}' needs bytes up to {last.offset + last.nbytes} "
                                           rf"but file has {last.offset + 10}") as e:
        ck.weights.read_all()
    assert str(path) in str(e.value)


def test_load_model_reads_all_at_once(tmp_path, calls, monkeypatch):
    """load_model goes through read_all (one mx.load); without it, per-tensor decodes give
    the same logits bit for bit."""
    from qwen_mlx.loading.loader import load_model

    path = tmp_path / "native.gguf"
    write_gguf(path, "llama", types=NATIVE)
    ids = mx.array(np.random.default_rng(0).integers(0, V, (1, 8)))
    out = {}
    for dequantize in (False, True):
        out[dequantize] = np.array(load_model(path, dtype=mx.float32, dequantize=dequantize)(ids))
    assert calls["decode"] == [] and calls["mx.load"] == 2
    monkeypatch.delattr(GGUFWeights, "read_all")
    for dequantize in (False, True):
        np.testing.assert_array_equal(np.array(load_model(path, dtype=mx.float32, dequantize=dequantize)(ids)),
                                      out[dequantize])
    assert calls["decode"] and calls["mx.load"] == 2


def test_info_reads_no_tensor_data(tmp_path, smollm2_path, calls, monkeypatch):
    """`checkpoint_info` of GGUF files decodes nothing and reads no data (mx.load untouched),
    and says exactly what it says when it decodes every tensor (GGUFWeights without layout)."""
    from qwen_mlx.inspect import checkpoint_info

    path = tmp_path / "mix.gguf"
    write_gguf(path, "llama", types={**TYPES["llama"], "blk.0.attn_v.weight": T.MXFP4, "blk.1.attn_v.weight": T.Q5_0,
                                     "blk.1.ffn_down.weight": T.TQ2_0})
    infos = {}
    with pytest.warns(gguf_mod.GGUFDequantizedWarning):
        for p in (smollm2_path, path):
            infos[p] = checkpoint_info(p)
    assert calls == {"decode": [], "mx.load": 0}
    real = infos[smollm2_path]
    assert real["parameters"] == 134_515_008 and set(real["weights"]) == {"4-bit", "8-bit", "float32"}
    assert set(infos[path]["weights"]) == {"8-bit", "4-bit", "5-bit", "2-bit", "mxfp4", "float32", "float16",
                                           "bfloat16"}
    monkeypatch.delattr(GGUFWeights, "layout")
    with pytest.warns(gguf_mod.GGUFDequantizedWarning):
        for p in (smollm2_path, path):
            assert checkpoint_info(p) == infos[p]
    assert len(calls["decode"]) > 272
