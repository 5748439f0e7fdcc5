"""Q5_0 / Q5_1 / Q5_K load as exact 5-bit MLX affine weights (group 32, float32 scales and
biases) holding the file's integers: `mx.dequantize` of them equals `gguf.quants.dequantize`
bit for bit; a tiny llama GGUF with Q5 tensors generates the dequantized model's greedy
tokens; `qwen-mlx convert` keeps them (or re-quantizes per --bits). Plus the lazy reader's
layout and its bad-input errors."""

import io
import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T, quants  # noqa: E402

from qwen_mlx.errors import WeightsError  # noqa: E402
from qwen_mlx.loading.gguf import read_gguf  # noqa: E402
from qwen_mlx.loading.gguf_blocks import KINDS, decode, layout  # noqa: E402
from qwen_mlx.loading.gguf_header import GGML_TYPES, TensorInfo  # noqa: E402
from tests.helpers import gguf_dense, mlx_greedy  # noqa: E402
from tests.loading.test_gguf_synthetic import V, write_gguf  # noqa: E402

ID = {t: int(i) for i, (t, _, _) in GGML_TYPES.items()}


def _decode(qtype, raw: np.ndarray, shape):
    t = TensorInfo("x", tuple(shape), int(qtype), 0, raw.nbytes)
    return decode(io.BytesIO(raw.tobytes()), t, "mem")


def _unpack5(words: mx.array) -> np.ndarray:
    """MLX 5-bit words (n, 5k) -> the (n, 32k) integers, read independently of our packer."""
    b = np.array(words).view(np.uint8).reshape(words.shape[0], -1, 5).astype(np.uint64)
    v = sum(b[..., i] << np.uint64(8 * i) for i in range(5))
    return ((v[..., None] >> (np.arange(8, dtype=np.uint64) * 5)) & 31).reshape(words.shape[0], -1).astype(np.uint8)


def _f16(x) -> np.ndarray:
    return np.asarray(x, np.float16).view(np.uint8).reshape(*np.shape(x), 2)


def _pack_q5_0_1(q, d, m=None):
    """llama.cpp's block_q5_0 / block_q5_1 from integers q (n, 32): d [, m], qh (bit j = q[j] >> 4),
    qs[j] = (q[j] & 15) | (q[j + 16] & 15) << 4."""
    qh = ((q >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(1, dtype=np.uint32)
    qs = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    head = [_f16(d)] + ([_f16(m)] if m is not None else [])
    return np.concatenate(head + [qh[:, None].view(np.uint8), qs], axis=1)


def _pack_q5_k(q, sc, mn, d, dmin):
    """llama.cpp's block_q5_K from integers q (n, 8, 32), 6-bit sc/mn (n, 8): get_scale_min_k4's
    12-byte packing, qh[l] bit j = q[j][l] >> 4, qs[32k + l] = q[2k][l] & 15 | (q[2k+1][l] & 15) << 4."""
    s = np.zeros((len(q), 12), np.uint8)
    s[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    s[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8)
    qs = ((q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)).reshape(len(q), 128)
    return np.concatenate([_f16(d), _f16(dmin), s, qh, qs], axis=1)


def test_packing_matches_mx_quantize():
    """Our reading of MLX's 5-bit layout: unpacking mx.quantize's words and re-applying its
    scales/biases gives mx.dequantize."""
    w = mx.random.normal((6, 64), key=mx.random.key(0))
    qw, s, b = mx.quantize(w, group_size=32, bits=5)
    q = _unpack5(qw).reshape(6, 2, 32).astype(np.float32)
    ref = np.array(mx.dequantize(qw, s, b, group_size=32, bits=5)).reshape(6, 2, 32)
    np.testing.assert_array_equal(np.array(s)[..., None] * q + np.array(b)[..., None], ref)


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1, T.Q5_K], ids=lambda t: t.name)
def test_known_integers(qtype):
    """Blocks packed from chosen integers per llama.cpp's layout -> our triplet holds exactly
    those integers, scales d (x sc) and biases -16d / m / -dmin x m, all float32."""
    rng = np.random.default_rng(int(qtype))
    n = 40
    d = rng.standard_normal(n).astype(np.float16) * np.float16(0.01)
    d[0] = np.float16(6e4)  # large float16 scales: -16 d would overflow float16, not float32
    if qtype == T.Q5_K:
        q = rng.integers(0, 32, (n, 8, 32), dtype=np.uint8)
        q[1] = 31
        sc, mn = rng.integers(0, 64, (n, 8), dtype=np.uint8), rng.integers(0, 64, (n, 8), dtype=np.uint8)
        sc[2], mn[2] = 63, 63
        dmin = rng.standard_normal(n).astype(np.float16) * np.float16(0.02)
        raw = _pack_q5_k(q, sc, mn, d, dmin)
        want_s = d.astype(np.float32)[:, None] * sc
        want_b = -dmin.astype(np.float32)[:, None] * mn
        q = q.reshape(n, 256)
    else:
        q = rng.integers(0, 32, (n, 32), dtype=np.uint8)
        q[1] = 31
        m = rng.standard_normal(n).astype(np.float16) if qtype == T.Q5_1 else None
        raw = _pack_q5_0_1(q, d, m)
        want_s = d.astype(np.float32)[:, None]
        want_b = m.astype(np.float32)[:, None] if qtype == T.Q5_1 else -16 * want_s
    parts = _decode(qtype, raw, (n, q.shape[1]))
    assert parts["weight"].dtype == mx.uint32 and parts["scales"].dtype == parts["biases"].dtype == mx.float32
    np.testing.assert_array_equal(_unpack5(parts["weight"]), q)
    np.testing.assert_array_equal(np.array(parts["scales"]), want_s)
    np.testing.assert_array_equal(np.array(parts["biases"]), want_b)
    deq = mx.dequantize(parts["weight"], parts["scales"], parts["biases"], group_size=32, bits=5)
    np.testing.assert_array_equal(np.array(deq), quants.dequantize(raw, qtype))
    if qtype == T.Q5_0:
        assert np.isfinite(np.array(deq)).all() and abs(np.array(deq)).max() > 65504


def _random_raw(qtype, rng, rows, cols):
    """gguf's own quantizer where it has one (Q5_0/Q5_1), else random blocks with random
    finite float16 d / dmin (Q5_K)."""
    if qtype in (T.Q5_0, T.Q5_1):
        x = rng.standard_normal((rows, cols)).astype(np.float32) * np.logspace(-3, 2, rows, dtype=np.float32)[:, None]
        x[0] = 0  # an all-zero row
        return quants.quantize(x, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = (rng.standard_normal(b.shape[:2] + (2,)) * 0.1).astype(np.float16)  # d, dmin
    b[..., 0:4] = d.view(np.uint8).reshape(*b.shape[:2], 4)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1, T.Q5_K], ids=lambda t: t.name)
def test_bit_exact_vs_gguf_and_matmul(qtype):
    rng = np.random.default_rng(7)
    raw = _random_raw(qtype, rng, 96, 512)
    p = _decode(qtype, raw, (96, 512))
    deq = mx.dequantize(p["weight"], p["scales"], p["biases"], group_size=32, bits=5)
    ref = quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(np.array(deq), ref)  # no cast: float32 scales are exact as stored
    x = mx.random.normal((3, 512), key=mx.random.key(1))
    y = mx.quantized_matmul(x, p["weight"], p["scales"], p["biases"], transpose=True, group_size=32, bits=5)
    want = np.array(x) @ ref.T
    assert np.abs(np.array(y) - want).max() <= 1e-5 * np.abs(want).max()
    # chunked decoding (chunks of whole blocks) gives the same arrays
    import qwen_mlx.loading.gguf_blocks as gb
    old, gb._CHUNK = gb._CHUNK, 3 * GGML_TYPES[ID[qtype.name]][2]
    try:
        q = _decode(qtype, raw, (96, 512))
    finally:
        gb._CHUNK = old
    assert all(mx.array_equal(q[k], p[k]).item() for k in p)


def test_layout_matches_decode_for_every_type():
    """`layout` (from the header alone) is what `decode` returns, for every readable type,
    with leading (expert) dimensions."""
    rng = np.random.default_rng(3)
    for name in sorted(KINDS):
        block, size = GGML_TYPES[ID[name]][1:]
        shape = (2, 3, 256)
        raw = rng.integers(0, 256, (6, 256 // block * size), dtype=np.uint8)
        if name in ("MXFP4", "NVFP4"):  # scale bytes MLX reads as ggml does (E8M0 < 255, UE4M3 < 0x7F)
            raw.reshape(6, -1, size)[:, :, : 1 if name == "MXFP4" else 4] &= 0x7E
        t = TensorInfo("x", shape, ID[name], 0, raw.nbytes)
        with np.errstate(all="ignore"):
            got = decode(io.BytesIO(raw.tobytes()), t, "mem")
        want = layout(t)
        assert set(got) == set(want), name
        for k, v in got.items():
            assert (tuple(v.shape), v.dtype) == (want[k].shape, want[k].dtype), (name, k)
            assert v.nbytes == want[k].nbytes


# every linear weight of the tiny llama in one of the three types (norms stay F32)
_LIN = {"attn_q": T.Q5_0, "attn_k": T.Q5_1, "attn_v": T.Q5_0, "attn_output": T.Q5_1, "ffn_gate": T.Q5_1,
        "ffn_up": T.Q5_0, "ffn_down": T.Q5_K}
Q5_TYPES = {"token_embd.weight": T.Q5_1, **{f"blk.{i}.{k}.weight": t for i in range(2) for k, t in _LIN.items()}}
_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
       "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
Q5_MODULES = {"model.embed_tokens", *(f"model.layers.{i}.{v}" for i in range(2) for v in _HF.values())}


@pytest.fixture(scope="module")
def q5_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("q5") / "llama.gguf"
    from tests.loading.test_gguf_streaming import add_tokenizer

    expected = write_gguf(path, "llama", types=Q5_TYPES, hook=add_tokenizer)
    return path, expected


def test_q5_model_file(q5_file):
    """Every weight equals gguf's dequantization (llama Q/K un-permuted), Q5 modules are 5-bit in
    the config, and the reader's layout is what it decodes."""
    path, expected = q5_file
    ck = read_gguf(path)
    assert ck.config["quantization"] == {"group_size": 32, "bits": 5, "mode": "affine"}
    for m in Q5_MODULES:
        assert ck.weights[m + ".weight"].dtype == mx.uint32 and ck.weights[m + ".scales"].dtype == mx.float32, m
    for name, x in expected.items():
        np.testing.assert_array_equal(gguf_dense(ck, name), x, err_msg=name)
    lay = ck.weights.layout()
    assert {k: (tuple(v.shape), v.dtype) for k, v in ck.weights.items()} == {k: (v.shape, v.dtype) for k, v in lay.items()}


def test_q5_model_generates_like_dequantized(q5_file):
    from qwen_mlx.loading.loader import load_model

    path, _ = q5_file
    ids = np.random.default_rng(0).integers(0, V, (1, 10))
    quant = load_model(path, dtype=mx.float32, dequantize=False)
    dense = load_model(path, dtype=mx.float32, dequantize=True)
    layers = dict(quant.named_modules())
    assert isinstance(layers["model.layers.0.mlp.down_proj"], nn.QuantizedLinear)
    assert layers["model.layers.0.mlp.down_proj"].bits == 5 and layers["model.layers.0.mlp.down_proj"].group_size == 32
    assert isinstance(layers["model.embed_tokens"], nn.QuantizedEmbedding) and layers["model.embed_tokens"].bits == 5
    a, b = np.array(quant(mx.array(ids))), np.array(dense(mx.array(ids)))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    toks = mlx_greedy(dense, ids, 16)
    assert mlx_greedy(quant, ids, 16) == toks and len(set(toks)) > 1


def test_weights_mapping_decodes_once_and_forgets(q5_file, monkeypatch):
    """Looking up any part decodes its tensor once; popping every key in turn holds at most
    one tensor's parts; values set from outside are kept as they are."""
    import qwen_mlx.loading.gguf as gguf_mod

    path, _ = q5_file
    w = read_gguf(path).weights
    calls, real = [], gguf_mod.decode
    monkeypatch.setattr(gguf_mod, "decode", lambda f, t, p: calls.append(t.name) or real(f, t, p))
    m = "model.layers.0.mlp.down_proj"
    s, q, b = w[m + ".scales"], w[m + ".weight"], w[m + ".biases"]
    assert calls == ["blk.0.ffn_down.weight"] and w[m + ".weight"] is q
    assert w.pop(m + ".weight") is q and m + ".weight" not in w and m + ".scales" in w
    w[m + ".weight"] = mx.zeros((2, 3))  # replaced: not overwritten by a later decode
    assert w.layout()[m + ".weight"].shape == (2, 3)
    assert w.pop(m + ".weight").shape == (2, 3) and w.pop(m + ".scales") is s and w.pop(m + ".biases") is b
    assert not w._cache
    most = 0
    for k in list(w):
        w.pop(k)
        most = max(most, len(w._cache))
    assert len(w) == 0 and most <= 2 and len(calls) == len(w.header.tensors)


def test_layout_of_moe_file(tmp_path):
    """qwen2moe: stacked experts and the (1, hidden) shared-expert gate, as decoded."""
    path = tmp_path / "moe.gguf"
    write_gguf(path, "qwen2moe", types={"blk.0.ffn_up_exps.weight": T.Q8_0, "blk.1.ffn_down_exps.weight": T.Q5_0})
    w = read_gguf(path).weights
    lay = w.layout()
    assert lay["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
    assert lay["model.layers.1.mlp.switch_mlp.down_proj.weight"].shape == (4, 64, 96 * 5 // 32)
    assert {k: (tuple(v.shape), v.dtype) for k, v in w.items()} == {k: (v.shape, v.dtype) for k, v in lay.items()}


def _read_dir(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out, json.loads((d / "config.json").read_text())


def test_convert_keeps_q5(q5_file, tmp_path):
    """`qwen-mlx convert --bits 5 --group-size 32 --dtype float32`: Q5 tensors are copied as they
    are (same words, same float32 scales), so the converted model gives the source's logits."""
    from typer.testing import CliRunner

    from qwen_mlx.cli import app
    from qwen_mlx.loading.loader import load_model

    path, _ = q5_file
    dst = tmp_path / "q5"
    r = CliRunner().invoke(app, ["convert", str(path), str(dst), "--bits", "5", "--group-size", "32", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    w, cfg = _read_dir(dst)
    src = read_gguf(path).weights
    for m in Q5_MODULES:
        for k in ("weight", "scales", "biases"):
            a, b = w[f"{m}.{k}"], src[f"{m}.{k}"]
            assert a.dtype == b.dtype and mx.array_equal(a, b).item(), (m, k)
    assert cfg["quantization"]["bits"] == 5 and cfg["quantization"]["group_size"] == 32
    ids = mx.array(np.random.default_rng(1).integers(0, V, (1, 10)))
    ref = np.array(load_model(path, dtype=mx.float32)(ids))
    ours = np.array(load_model(dst, dtype=mx.float32)(ids))
    np.testing.assert_array_equal(ours, ref)


def test_convert_requantizes_per_bits(q5_file, tmp_path):
    from qwen_mlx.quant import ConvertOptions, convert

    path, expected = q5_file
    res = convert(path, tmp_path / "q4", ConvertOptions(bits=4, group_size=64, dtype="float32"))
    w, cfg = _read_dir(res.path)
    m = "model.layers.0.mlp.down_proj"
    assert w[m + ".weight"].shape == (64, 256 * 4 // 32) and w[m + ".scales"].shape == (64, 256 // 64)
    assert (cfg["quantization"]["bits"], cfg["quantization"]["group_size"]) == (4, 64)
    src = mx.array(expected[m + ".weight"])  # exact dequantization, re-quantized
    want = mx.quantize(src, group_size=64, bits=4)
    assert all(mx.array_equal(w[f"{m}.{k}"], v).item() for k, v in zip(("weight", "scales", "biases"), want))
    res = convert(path, tmp_path / "bf16", ConvertOptions(bits=5, group_size=32, dtype="bfloat16"))
    w, _ = _read_dir(res.path)
    assert mx.array_equal(w[m + ".weight"], read_gguf(path).weights[m + ".weight"]).item()  # same integers
    assert w[m + ".scales"].dtype == mx.float32  # kept exact: bfloat16 would round them (tests/quant/test_lossless.py)


# ------------------------------------------------------------------ bad input


def test_file_truncated_after_opening(tmp_path):
    """The reader is lazy: a file cut after read_gguf fails on access, naming the tensor;
    the tensors before the cut still read."""
    from qwen_mlx.loading.gguf import map_tensor_name

    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", types=Q5_TYPES)
    ck = read_gguf(path)
    by_offset = sorted(ck.weights.header.tensors.values(), key=lambda t: t.offset)
    first, last = by_offset[0], by_offset[-1]
    with open(path, "r+b") as f:
        f.truncate(last.offset + 10)
    with pytest.raises(WeightsError, match=rf"truncated.*'{last.name}' needs bytes up to {last.offset + last.nbytes} "
                                           rf"but file has {last.offset + 10}") as e:
        ck.weights[map_tensor_name(last.name)]
    assert str(path) in str(e.value)
    assert ck.weights[map_tensor_name(first.name)].shape[0] == first.shape[0]


def test_short_read_is_an_error():
    raw = _random_raw(T.Q5_K, np.random.default_rng(0), 4, 256)
    t = TensorInfo("blk.0.ffn_down.weight", (4, 256), int(T.Q5_K), 0, raw.nbytes)
    with pytest.raises(WeightsError, match=r"truncated: tensor 'blk\.0\.ffn_down\.weight' needs bytes up to 704"):
        decode(io.BytesIO(raw.tobytes()[:500]), t, "mem.gguf")


def test_q5k_row_not_a_superblock_multiple(tmp_path):
    """A Q5_K tensor whose rows are not whole 256-weight super-blocks is refused by the header check."""
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    raw = np.zeros((4, 176), np.uint8)
    w.add_tensor("blk.0.ffn_down.weight", raw, raw_shape=(4, 176), raw_dtype=T.Q5_K)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    data = bytearray(path.read_bytes())
    i = data.index(b"blk.0.ffn_down.weight") + len("blk.0.ffn_down.weight") + 4
    assert int.from_bytes(data[i:i + 8], "little") == 256
    data[i:i + 8] = (128).to_bytes(8, "little")  # ne0 = 128: half a super-block per row
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"'blk\.0\.ffn_down\.weight' row length 128 is not a multiple of the "
                                           r"Q5_K block size 256"):
        read_gguf(path)


def test_llama_qk_rows_checked_up_front(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", extra={"attention.head_count_kv": 3})  # k rows 32 = 2 x 16: not 2 x 3 heads
    with pytest.raises(WeightsError, match=r"'blk\.0\.attn_k\.weight' has shape \(32, 64\); its rows are not a "
                                           r"multiple of 2 x 3 heads"):
        read_gguf(path)
