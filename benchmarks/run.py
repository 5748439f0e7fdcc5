"""qwen_mlx vs mlx-lm on the same model shapes and the same (random) weights, same backend,
interleaved runs in one process, median of N. Prints prefill / decode tok/s, peak memory
and the ratio.

    python benchmarks/run.py                 # Qwen3-0.6B and Qwen2.5-0.5B shapes, float32
    python benchmarks/run.py --quick         # 4 layers per model (CPU: a few minutes)
    python benchmarks/run.py --shapes qwen3-moe --bits 4 --dtype bfloat16
"""

import argparse
import importlib
import json
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten

SHAPES = {
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, intermediate_size=12288,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960),
    # Qwen3-30B-A3B's layer shape (128 experts, top 8)
    "qwen3-moe": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, intermediate_size=6144,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                      tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
                      num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
}


def build_pair(cfg, dtype, bits):
    import mlx.nn as nn
    from qwen_mlx.loading.loader import build_model

    ours = build_model(cfg)
    ours.set_dtype(dtype)
    lm = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    theirs = lm.Model(lm.ModelArgs.from_dict(cfg))
    theirs.load_weights(list(tree_flatten(ours.parameters())))  # same names, same weights
    for m in (ours, theirs):
        if bits:
            nn.quantize(m, group_size=64, bits=bits)
        mx.eval(m.parameters())
        m.eval()
    return ours, theirs


def run_ours(model, prompt, n):
    from qwen_mlx.generate import generate_tokens
    from qwen_mlx.generation_config import SamplingParams

    return generate_tokens(model, prompt, SamplingParams(max_tokens=n, temperature=0.0))


def run_mlx_lm(model, prompt, n):
    from mlx_lm.generate import generate_step

    return (int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n))


def measure(fn, model, prompt, n):
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    it = fn(model, prompt, n)
    next(it)
    t1 = time.perf_counter()
    k = sum(1 for _ in it)
    t2 = time.perf_counter()
    return {"prefill": len(prompt) / (t1 - t0), "decode": k / (t2 - t1),
            "peak_gb": mx.get_peak_memory() / 1e9}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3-0.6b,qwen2.5-0.5b")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--bits", type=int, default=0, help="quantize both models (0 = no)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 layers per model")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    dtype = getattr(mx, a.dtype)
    print(f"mlx {mx.__version__} on {mx.default_device()} | {a.dtype} bits={a.bits or '-'} "
          f"prompt {a.prompt} gen {a.gen} median of {a.runs}{' (quick: 4 layers)' if a.quick else ''}")
    results = []
    for name in a.shapes.split(","):
        cfg = dict(SHAPES[name])
        if a.quick:
            cfg["num_hidden_layers"] = 4
        mx.random.seed(0)
        ours, theirs = build_pair(cfg, dtype, a.bits)
        prompt = [int(x) for x in mx.random.randint(0, cfg["vocab_size"], (a.prompt,)).tolist()]
        impls = [("qwen_mlx", run_ours, ours), ("mlx_lm", run_mlx_lm, theirs)]
        for _, fn, m in impls:  # warm-up, not counted
            measure(fn, m, prompt[:64], 8)
        runs = {"qwen_mlx": [], "mlx_lm": []}
        for r in range(a.runs):  # interleaved, order alternating each round
            for key, fn, m in (impls if r % 2 == 0 else impls[::-1]):
                runs[key].append(measure(fn, m, prompt, a.gen))
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("prefill", "decode", "peak_gb")}
               for k, v in runs.items()}
        row = {"shape": name, **{f"{k}_{m}": round(v, 3) for k, d in med.items() for m, v in d.items()},
               "prefill_ratio": round(med["qwen_mlx"]["prefill"] / med["mlx_lm"]["prefill"], 3),
               "decode_ratio": round(med["qwen_mlx"]["decode"] / med["mlx_lm"]["decode"], 3)}
        results.append(row)
        print(f"{name:14s} prefill tok/s ours {med['qwen_mlx']['prefill']:8.1f} mlx-lm {med['mlx_lm']['prefill']:8.1f}"
              f" x{row['prefill_ratio']:.2f} | decode tok/s ours {med['qwen_mlx']['decode']:7.2f}"
              f" mlx-lm {med['mlx_lm']['decode']:7.2f} x{row['decode_ratio']:.2f} | peak GB"
              f" {med['qwen_mlx']['peak_gb']:.2f} / {med['mlx_lm']['peak_gb']:.2f}", flush=True)
        del ours, theirs
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
