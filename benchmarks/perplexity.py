"""Perplexity of the real SmolLM2-135M GGUF re-quantized several ways (the README table).

    python benchmarks/perplexity.py [--text tests/quant/eval_text.txt]

Each row converts the GGUF (dequantized to float32) with `qwen_mlx.quant.convert` into a
temp dir and scores the text with `compare_perplexity` (float32 arithmetic on both sides).
"""

import argparse
import tempfile
from pathlib import Path

from qwen_mlx.defaults import default_model_path
from qwen_mlx.quant.convert import ConvertOptions, convert
from qwen_mlx.quant.report import compare_perplexity, error_summary, read_text

ROWS = [
    ("8-bit g64", dict(bits=8, group_size=64)),
    ("mxfp8", dict(mode="mxfp8")),
    ("6-bit g64", dict(bits=6, group_size=64)),
    ("4-bit g32 + embed=8/32", dict(bits=4, group_size=32, keep_bits="embed=8/32")),
    ("4-bit g32", dict(bits=4, group_size=32)),
    ("mixed-4-6", dict(recipe="mixed-4-6")),
    ("4-bit g64", dict(bits=4, group_size=64)),
    ("mixed-3-6", dict(recipe="mixed-3-6")),
    ("mxfp4", dict(mode="mxfp4")),
    ("3-bit g64", dict(bits=3, group_size=64)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=str(Path(__file__).parents[1] / "tests/quant/eval_text.txt"))
    a = ap.parse_args()
    src, text = default_model_path(), read_text(a.text)
    src_ppl = None
    print("| converted | mean rel. weight error | perplexity | vs source |\n|---|---|---|---|")
    for name, kw in ROWS:
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / "out"
            res = convert(src, dst, ConvertOptions(dtype="float32", report=True, **kw))
            p = compare_perplexity(src, dst, text, source_ppl=src_ppl)
            if src_ppl is None:
                src_ppl = p.source
                print(f"| source (float32, {p.tokens} tokens) | - | {p.source:.3f} | |")
            errs = [e.rel_err for e in res.errors if e.spec != "keep"]
            mean = sum(errs) / len(errs) if errs else 0.0
            print(f"| {name} | {mean:.4f} | {p.converted:.3f} | {100 * (p.converted / src_ppl - 1):+.2f}% |",
                  flush=True)


if __name__ == "__main__":
    main()
