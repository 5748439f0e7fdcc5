"""Quality report on the real SmolLM2 GGUF: its (Q4_1) weights dequantized to float32,
re-quantized to 8, 6 and 4 bits; per-tensor weight error and perplexity on real English."""

import mlx.core as mx
import pytest

from qwen_mlx import load_model
from qwen_mlx.quant import ConvertOptions, convert
from qwen_mlx.quant.report import compare_perplexity, error_summary, perplexity, text_ids

TEXT = (
    "The village sat at the edge of a wide valley, where the river slowed and spread into a "
    "shallow lake. Every morning the fishermen pushed their boats into the water before the sun "
    "rose, and every evening they came back with baskets of silver fish. The children ran along "
    "the shore to meet them, and the old women sat on wooden benches, mending nets and talking "
    "about the weather. In the spring, the hills turned green and the orchards filled with white "
    "blossoms. In the autumn, the farmers brought apples and pears to the market in the square."
)


@pytest.fixture(scope="module")
def source_ppl(smollm2_path):
    ids = text_ids(smollm2_path, TEXT)
    return perplexity(load_model(smollm2_path, dtype=mx.float32, dequantize=True), ids), len(ids)


def test_requantized_smollm2_perplexity(smollm2_path, source_ppl, tmp_path):
    src_ppl, n = source_ppl
    assert 100 < n < 160 and 5 < src_ppl < 40  # a trained model on plain English
    rows = {}
    for bits in (8, 6, 4):
        res = convert(smollm2_path, tmp_path / f"q{bits}", ConvertOptions(bits=bits, dtype="float32", report=True))
        summ = error_summary(res.errors)
        assert list(summ) == [f"affine {bits}-bit g64"] and summ[f"affine {bits}-bit g64"]["tensors"] == 211
        p = compare_perplexity(smollm2_path, res.path, TEXT, source_ppl=src_ppl)
        assert p.tokens == n - 1 and p.source == src_ppl
        rows[bits] = (summ[f"affine {bits}-bit g64"]["mean"], p.converted)
    print("\nbits  mean rel. weight error  perplexity (source %.3f)" % src_ppl)
    for b, (e, ppl) in rows.items():
        print(f"{b:>4}  {e:.4f}                 {ppl:.3f} ({100 * (ppl / src_ppl - 1):+.2f}%)")
    assert rows[8][0] < 0.01 < rows[6][0] < 0.04 < rows[4][0] < 0.15
    assert abs(rows[8][1] / src_ppl - 1) < 0.02
    assert abs(rows[6][1] / src_ppl - 1) < 0.06
    assert 1.03 < rows[4][1] / src_ppl < 1.4  # Q4_1 (group 32) requantized as 4-bit group 64 loses
    assert rows[4][1] > max(rows[8][1], rows[6][1])
