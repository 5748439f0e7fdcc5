"""GGUF MXFP4 / NVFP4 load as MLX ``mxfp4`` / ``nvfp4`` weights (uint8 E8M0 scales per 32
weights / E4M3 per 16: the file's bits, nibbles reordered) and TQ1_0 / TQ2_0 (ternary) as
exact 2-bit affine triplets (group 128, scale d, bias -d): `mx.dequantize` of them equals
`gguf.quants.dequantize`; a tiny llama GGUF with such linears generates its dequantized
model's greedy tokens, and `qwen-mlx convert --mode mxfp4` copies the MXFP4 tensors as they are."""

import io

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T, quants  # noqa: E402

from qwen_mlx.errors import WeightsError  # noqa: E402
from qwen_mlx.loading.gguf import GGUFDequantizedWarning, read_gguf  # noqa: E402
from qwen_mlx.loading.gguf_blocks import decode  # noqa: E402
from qwen_mlx.loading.gguf_header import TensorInfo  # noqa: E402
from tests.helpers import mlx_greedy  # noqa: E402
from tests.loading.test_gguf_synthetic import V, write_gguf  # noqa: E402

FP4 = dict(group_size=32, bits=4, mode="mxfp4")
NV = dict(group_size=16, bits=4, mode="nvfp4")
TERNARY = dict(group_size=128, bits=2)


def _decode(qtype, raw: np.ndarray, shape, name="x"):
    return decode(io.BytesIO(raw.tobytes()), TensorInfo(name, tuple(shape), int(qtype), 0, raw.nbytes), "mem")


def _codes(words, bits: int) -> np.ndarray:
    """MLX words (n, k) -> the (n, 32k / bits) values, value i at bits ``bits * i`` (little-endian)."""
    w = np.array(words).astype(np.uint64)
    sh = np.arange(32 // bits, dtype=np.uint64) * np.uint64(bits)
    return ((w[..., None] >> sh) & np.uint64(2 ** bits - 1)).reshape(len(w), -1).astype(np.uint8)


def _mxfp4_blocks(codes: np.ndarray, e: np.ndarray) -> np.ndarray:
    """ggml's block_mxfp4 from E2M1 codes (n, 32) and E8M0 scales (n,): e, then byte j =
    code j | code j + 16 << 4."""
    return np.concatenate([e[:, None].astype(np.uint8), codes[:, :16] | (codes[:, 16:] << 4)], axis=1)


def _dq(p, **spec):
    return np.array(mx.dequantize(p["weight"], p["scales"], p.get("biases"), dtype=mx.float32, **spec))


def test_mxfp4_is_mlx_mxfp4_up_to_nibble_order():
    """mx.quantize's mxfp4 words/scales, rewritten as ggml blocks, decode back to the same
    words and scales; gguf's and MLX's dequantizations agree."""
    x = mx.random.normal((6, 96), key=mx.random.key(0)) * mx.array([1e-3, 0.1, 1, 10, 300, 1e5])[:, None]
    q, s = mx.quantize(x, **FP4)
    raw = _mxfp4_blocks(_codes(q, 4).reshape(-1, 32), np.array(s).reshape(-1)).reshape(6, -1)
    p = _decode(T.MXFP4, raw, (6, 96))
    assert set(p) == {"weight", "scales"} and p["scales"].dtype == mx.uint8
    assert mx.array_equal(p["weight"], q).item() and mx.array_equal(p["scales"], s).item()
    np.testing.assert_array_equal(_dq(p, **FP4), quants.dequantize(raw, T.MXFP4))


def test_mxfp4_every_code_and_scale_exact():
    """All 16 codes under every E8M0 scale but 255 (subnormal 2^-127 .. overflow to inf),
    plus gguf's own quantizer on real-valued rows: mx.dequantize(mode="mxfp4") equals
    gguf.quants.dequantize (values equal; gguf writes code 8, -0, as +0)."""
    e = np.arange(255, dtype=np.uint8)
    codes = np.tile(np.arange(32, dtype=np.uint8) % 16, (255, 1))
    raw = _mxfp4_blocks(codes, e).reshape(15, -1)  # 15 rows of 17 blocks
    p = _decode(T.MXFP4, raw, (15, 17 * 32))
    with np.errstate(over="ignore"):
        ref = quants.dequantize(raw, T.MXFP4)
    assert np.isinf(ref).any() and (ref[ref != 0] != 0).any() and np.abs(ref[ref != 0]).min() < 1e-38
    np.testing.assert_array_equal(_dq(p, **FP4), ref)
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32) * np.logspace(-4, 3, 8)[:, None]
    raw = quants.quantize(x.astype(np.float32), T.MXFP4)
    np.testing.assert_array_equal(_dq(_decode(T.MXFP4, raw, x.shape), **FP4), quants.dequantize(raw, T.MXFP4))


def test_mxfp4_scale_255_refused():
    """E8M0 255 is NaN for MLX (and OCP MX) but 2^127 for ggml: no exact MLX form, so refused."""
    raw = _mxfp4_blocks(np.ones((4, 32), np.uint8), np.array([127, 3, 255, 9])).reshape(2, -1)
    with pytest.raises(WeightsError, match=r"tensor 'blk\.0\.ffn_up\.weight' \(MXFP4\): .*E8M0 scale 255"):
        _decode(T.MXFP4, raw, (2, 64), "blk.0.ffn_up.weight")


def _nvfp4_blocks(codes: np.ndarray, sc: np.ndarray) -> np.ndarray:
    """ggml's block_nvfp4 from E2M1 codes (n, 64) and UE4M3 scales (n, 4): the 4 scales, then
    per 16 weights 8 bytes, byte j = code j | code j + 8 << 4."""
    c = codes.reshape(len(codes), 4, 16)
    return np.concatenate([sc.astype(np.uint8), (c[..., :8] | (c[..., 8:] << 4)).reshape(len(c), 32)], axis=1)


def test_nvfp4_is_mlx_nvfp4_up_to_nibble_order():
    """Every scale byte below 0x7F (subnormals included) and every code, then mx.quantize's
    nvfp4 words/scales rewritten as ggml blocks: same words and scales back, and gguf's
    dequantization equals mx.dequantize(mode="nvfp4"); 0x7F and bit 7 are refused."""
    sc = np.arange(128, dtype=np.uint8)[:127]
    sc = np.concatenate([sc, sc[:1]]).reshape(32, 4)
    codes = np.tile(np.arange(64, dtype=np.uint8) % 16, (32, 1))
    raw = _nvfp4_blocks(codes, sc).reshape(8, -1)
    p = _decode(T.NVFP4, raw, (8, 256))
    np.testing.assert_array_equal(_dq(p, **NV), quants.dequantize(raw, T.NVFP4))
    x = mx.random.normal((6, 128), key=mx.random.key(3)) * mx.array([1e-3, 0.1, 1, 10, 100, 400])[:, None]
    q, s = mx.quantize(x, **NV)
    raw = _nvfp4_blocks(_codes(q, 4).reshape(-1, 64), np.array(s).reshape(-1, 4)).reshape(6, -1)
    p = _decode(T.NVFP4, raw, (6, 128))
    assert mx.array_equal(p["weight"], q).item() and mx.array_equal(p["scales"], s).item()
    np.testing.assert_array_equal(_dq(p, **NV), quants.dequantize(raw, T.NVFP4))
    for bad in (0x7F, 0x85):
        raw = _nvfp4_blocks(np.ones((2, 64), np.uint8), np.array([[40, 40, 40, 40], [40, bad, 40, 40]]))
        with pytest.raises(WeightsError, match=r"'blk\.1\.attn_v\.weight' \(NVFP4\): .*scale byte >= 0x7F"):
            _decode(T.NVFP4, raw.reshape(1, -1), (1, 128), "blk.1.attn_v.weight")


def _ternary_raw(qtype, rng, rows, cols):
    """gguf's quantizer on real rows, then random blocks (TQ2_0's q = 3 included) with random
    finite float16 d of both signs, up to 6e4 (2d would overflow float16, not float32)."""
    x = rng.standard_normal((rows, cols)).astype(np.float32) * np.logspace(-3, 2, rows, dtype=np.float32)[:, None]
    a = quants.quantize(x, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = (rng.standard_normal(b.shape[:2]) * 0.1).astype(np.float16)
    d[0, 0], d[1, 0] = 6e4, -6e4
    b[..., size - 2:] = d[..., None].view(np.uint8)
    return np.concatenate([a, b.reshape(rows, -1)])


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0], ids=lambda t: t.name)
def test_ternary_is_exact_2bit_affine(qtype):
    raw = _ternary_raw(qtype, np.random.default_rng(int(qtype)), 6, 512)
    p = _decode(qtype, raw, (12, 512))
    assert p["weight"].shape == (12, 512 * 2 // 32) and p["scales"].shape == p["biases"].shape == (12, 4)
    assert p["scales"].dtype == p["biases"].dtype == mx.float32
    d = raw.reshape(12, 2, -1)[..., -2:].copy().view(np.float16)[..., 0].astype(np.float32)
    np.testing.assert_array_equal(np.array(p["scales"]), d.repeat(2, axis=1))
    np.testing.assert_array_equal(np.array(p["biases"]), -d.repeat(2, axis=1))
    ref = quants.dequantize(raw, qtype)
    q = _codes(p["weight"], 2)
    assert q.max() == (3 if qtype == T.TQ2_0 else 2)
    np.testing.assert_array_equal(d.repeat(256, axis=1) * (q.astype(np.float32) - 1), ref)  # the file's digits
    np.testing.assert_array_equal(_dq(p, **TERNARY), ref)
    assert np.abs(ref).max() == np.float32(np.float16(6e4)) * (2 if qtype == T.TQ2_0 else 1)  # 2d: past float16


def test_2bit_packing_matches_mx_quantize():
    """Our reading of MLX's 2-bit layout: unpacked mx.quantize words re-scaled give mx.dequantize."""
    w = mx.random.normal((4, 256), key=mx.random.key(2))
    qw, s, b = mx.quantize(w, **TERNARY)
    q = _codes(qw, 2).reshape(4, 2, 128).astype(np.float32)
    ref = np.array(mx.dequantize(qw, s, b, **TERNARY)).reshape(4, 2, 128)
    np.testing.assert_array_equal(np.array(s)[..., None] * q + np.array(b)[..., None], ref)


# the (tied) embedding and every linear weight MXFP4 but one NVFP4 output projection and the
# two down projections, ternary
_LIN = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")
MX_TYPES = {"token_embd.weight": T.MXFP4, **{f"blk.{i}.{k}.weight": T.MXFP4 for i in range(2) for k in _LIN},
            "blk.1.attn_output.weight": T.NVFP4, "blk.0.ffn_down.weight": T.TQ1_0, "blk.1.ffn_down.weight": T.TQ2_0}
_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
       "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj"}
NVFP4 = "model.layers.1.self_attn.o_proj"
FP4_MODULES = {"model.embed_tokens", *(f"model.layers.{i}.{v}" for i in range(2) for v in _HF.values())} - {NVFP4}
DOWN = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")


@pytest.fixture(scope="module")
def fp4_file(tmp_path_factory):
    from tests.loading.test_gguf_streaming import add_tokenizer

    path = tmp_path_factory.mktemp("mxfp4") / "llama.gguf"
    return path, write_gguf(path, "llama", types=MX_TYPES, hook=add_tokenizer)


def test_mxfp4_model_file(fp4_file, recwarn):
    """Config, dtypes and every weight (llama Q/K un-permuted) equal gguf's dequantization;
    nothing is dequantized, so no notice."""
    path, expected = fp4_file
    ck = read_gguf(path)
    assert not [w for w in recwarn if issubclass(w.category, GGUFDequantizedWarning)]
    assert ck.config["quantization"] == {"group_size": 32, "bits": 4, "mode": "mxfp4",
                                         NVFP4: {"group_size": 16, "bits": 4, "mode": "nvfp4"},
                                         **{m: {"group_size": 128, "bits": 2} for m in DOWN}}
    w = ck.weights
    for m in FP4_MODULES:
        assert w[m + ".scales"].dtype == mx.uint8 and m + ".biases" not in w, m
        np.testing.assert_array_equal(_dq({k: w[f"{m}.{k}"] for k in ("weight", "scales")}, **FP4),
                                      expected[m + ".weight"], err_msg=m)
    for m in DOWN:
        np.testing.assert_array_equal(_dq({k: w[f"{m}.{k}"] for k in ("weight", "scales", "biases")}, **TERNARY),
                                      expected[m + ".weight"], err_msg=m)
    np.testing.assert_array_equal(_dq({k: w[f"{NVFP4}.{k}"] for k in ("weight", "scales")}, **NV),
                                  expected[NVFP4 + ".weight"])
    lay = w.layout()
    assert {k: (tuple(v.shape), v.dtype) for k, v in w.items()} == {k: (v.shape, v.dtype) for k, v in lay.items()}


def test_mxfp4_model_generates_like_dequantized(fp4_file):
    from qwen_mlx.loading.loader import load_model

    path, _ = fp4_file
    ids = np.random.default_rng(0).integers(0, V, (1, 10))
    quant = load_model(path, dtype=mx.float32, dequantize=False)
    dense = load_model(path, dtype=mx.float32, dequantize=True)
    mods = dict(quant.named_modules())
    lin = {k: v.mode for k, v in mods.items() if isinstance(v, nn.QuantizedLinear) and k not in DOWN}
    assert lin.pop(NVFP4) == "nvfp4" and mods[NVFP4].group_size == 16
    assert len(lin) >= 5 and set(lin.values()) == {"mxfp4"}, lin  # o_proj and the fused q/k/v, gate/up
    assert isinstance(mods["model.embed_tokens"], nn.QuantizedEmbedding) and mods["model.embed_tokens"].mode == "mxfp4"
    for m in DOWN:
        assert (mods[m].mode, mods[m].bits, mods[m].group_size) == ("affine", 2, 128)
    a, b = np.array(quant(mx.array(ids))), np.array(dense(mx.array(ids)))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    toks = mlx_greedy(dense, ids, 16)
    assert mlx_greedy(quant, ids, 16) == toks and len(set(toks)) > 1


def test_convert_keeps_mxfp4(fp4_file, tmp_path):
    """`convert --mode mxfp4`: the MXFP4 tensors are copied bit for bit (the ternary ones,
    2-bit affine in the source, are re-quantized to mxfp4 from their exact values)."""
    from qwen_mlx.quant import ConvertOptions, convert

    path, expected = fp4_file
    res = convert(path, tmp_path / "fp4", ConvertOptions(mode="mxfp4", dtype="float32"))
    out = {}
    for f in sorted(res.path.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    src = read_gguf(path).weights
    for m in FP4_MODULES:
        for k in ("weight", "scales"):
            a, b = out[f"{m}.{k}"], src[f"{m}.{k}"]
            assert a.dtype == b.dtype and mx.array_equal(a, b).item(), (m, k)
    want = mx.quantize(mx.array(expected[DOWN[1] + ".weight"]), **FP4)
    assert all(mx.array_equal(out[f"{DOWN[1]}.{k}"], v).item() for k, v in zip(("weight", "scales"), want))


def test_moe_experts_mxfp4_nvfp4(tmp_path):
    """Stacked qwen3moe experts (E, out, in) in MXFP4 / NVFP4 stay so (SwitchGLU's quantized
    form) and give the dequantized model's logits."""
    from qwen_mlx.loading.loader import load_model
    from tests.loading.test_gguf_synthetic import TYPES

    path = tmp_path / "moe.gguf"
    gate, up = "model.layers.0.mlp.switch_mlp.gate_proj", "model.layers.1.mlp.switch_mlp.up_proj"
    write_gguf(path, "qwen3moe", types={**TYPES["qwen3moe"], "blk.0.ffn_gate_exps.weight": T.MXFP4,
                                        "blk.1.ffn_up_exps.weight": T.NVFP4})
    ids = mx.array(np.random.default_rng(2).integers(0, V, (1, 9)))
    quant = load_model(path, dtype=mx.float32, dequantize=False)
    mods = dict(quant.named_modules())
    assert (mods[gate].mode, mods[up].mode, mods[up].group_size) == ("mxfp4", "nvfp4", 16)
    a, b = np.array(quant(ids)), np.array(load_model(path, dtype=mx.float32, dequantize=True)(ids))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
