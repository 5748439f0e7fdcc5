"""AWQ (GEMM layout) checkpoints built in the test: known integers packed as AutoAWQ does.

Same scheme as test_import_gptq: random 4-bit weights, zero points and float16 scales are
packed along the output with AWQ's interleaved nibble order; the float twin holds the
weights of an independent numpy dequantizer. Our triplets must dequantize to them bit for
bit, and logits / greedy tokens must match transformers on the twin.
"""

import numpy as np
import pytest

import mlx.core as mx

from qwen_mlx.errors import ConfigError, WeightsError
from qwen_mlx.loading.imports import import_quantized
from qwen_mlx.quant.spec import QuantizationError
from tests.loading.test_import_gptq import check_import, quantized_pair, tiny_hf

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack: nibble k of word c holds output 8c + ORDER[k]


def pack_awq(q: np.ndarray) -> np.ndarray:
    """(rows, out) 4-bit integers -> (rows, out/8) int32, AutoAWQ's WQLinear_GEMM.pack order."""
    out = np.zeros((q.shape[0], q.shape[1] // 8), np.uint32)
    for c in range(out.shape[1]):
        for k in range(8):
            out[:, c] |= q[:, 8 * c + ORDER[k]].astype(np.uint32) << np.uint32(4 * k)
    return out.view(np.int32)


def awq_packer(rng, group):
    def pack(name, n_out, n_in):
        groups = n_in // group
        q = rng.integers(0, 16, (n_in, n_out))
        zero = rng.integers(0, 16, (groups, n_out))
        scales = (rng.uniform(0.5, 1.5, (groups, n_out)) * 0.1 / 16).astype(np.float16)
        g = np.arange(n_in) // group
        w = (scales.astype(np.float32)[g] * (q - zero[g]).astype(np.float32)).T.copy()
        return {"qweight": pack_awq(q), "qzeros": pack_awq(zero), "scales": scales}, w

    return pack


@pytest.mark.parametrize("kind, group", [("qwen2", 32), ("qwen3", 64)])
def test_awq_matches_transformers(tmp_path, kind, group):
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True}
    qdir, fdir, expected = quantized_pair(tiny_hf(tmp_path, kind), tmp_path, qc, awq_packer(np.random.default_rng(group), group))
    ck, _ = check_import(qdir, fdir, expected)
    assert ck.config["quantization"] == {"group_size": group, "bits": 4, "mode": "affine"}


def test_awq_group_128_uses_mlx_group_128(tmp_path):
    """AutoAWQ's old key names (w_bit, q_group_size) and a group larger than one MLX group of 32."""
    rng = np.random.default_rng(1)
    packed, ref = awq_packer(rng, 128)("m", 64, 256)
    w = {f"m.{k}": mx.array(v) for k, v in packed.items()}
    cfg = {"model_type": "qwen2", "quantization_config": {"quant_method": "awq", "w_bit": 4, "q_group_size": 128}}
    out, got = import_quantized(cfg, w)
    assert out["quantization"]["group_size"] == 128 and got["m.scales"].shape == (64, 2)
    dense = mx.dequantize(got["m.weight"], got["m.scales"], got["m.biases"], group_size=128, bits=4)
    np.testing.assert_array_equal(np.array(dense), ref)


def test_nibble_order_worked_example():
    """Word 0x76543210 holds q = (0, 4, 1, 5, 2, 6, 3, 7) for outputs 8c .. 8c+7."""
    qweight = np.full((32, 1), 0x76543210, np.uint32).view(np.int32)
    qzeros = np.zeros((1, 1), np.int32)
    scales = np.ones((1, 8), np.float16)
    cfg = {"model_type": "qwen2", "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32}}
    _, w = import_quantized(cfg, {"m.qweight": mx.array(qweight), "m.qzeros": mx.array(qzeros), "m.scales": mx.array(scales)})
    dense = np.array(mx.dequantize(w["m.weight"], w["m.scales"], w["m.biases"], group_size=32, bits=4))
    np.testing.assert_array_equal(dense[:, 0], [0, 4, 1, 5, 2, 6, 3, 7])


# ---------------------------------------------------------------------- bad input


def _awq(n_in=128, n_out=64, group=32):
    packed, _ = awq_packer(np.random.default_rng(0), group)("m", n_out, n_in)
    return {f"m.{k}": mx.array(v) for k, v in packed.items()}


def _run(weights, **qc):
    cfg = {"model_type": "qwen2", "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32,
                                                           "version": "gemm", **qc}}
    return import_quantized(cfg, weights, where="ckpt")


@pytest.mark.parametrize("qc, match", [
    ({"version": "gemv"}, r"AWQ version 'gemv' is not supported"),
    ({"bits": 8}, r"8-bit AWQ is not supported"),
    ({"group_size": "32"}, r"group_size is '32'"),
])
def test_bad_config(qc, match):
    with pytest.raises(ConfigError, match=match):
        _run(_awq(), **qc)


def test_bad_tensors():
    w = _awq()
    with pytest.raises(WeightsError, match=r"'m\.qzeros' has shape \(4, 4\), expected \(4, 8\)"):
        _run({**w, "m.qzeros": w["m.qzeros"][:, :4]})
    with pytest.raises(WeightsError, match=r"'m\.scales' has shape \(4, 32\)"):
        _run({**w, "m.scales": w["m.scales"][:, :32]})
    with pytest.raises(WeightsError, match=r"'m\.qweight' must be a 2-D int32 tensor"):
        _run({**w, "m.qweight": w["m.qweight"].astype(mx.int16)})
    with pytest.raises(WeightsError, match=r"'m' has a qweight but no scales"):
        _run({k: v for k, v in w.items() if k != "m.scales"})
    with pytest.raises(WeightsError, match=r"without a qweight: x\.qzeros"):
        _run({**w, "x.qzeros": w["m.qzeros"]})


def test_group_sizes_mlx_cannot_represent():
    with pytest.raises(QuantizationError, match=r"group_size 48 does not divide its 128 inputs"):
        _run(_awq(), group_size=48)
    with pytest.raises(QuantizationError, match=r"group_size 16 is not a multiple of an MLX group size"):
        _run(_awq(group=16), group_size=16)
