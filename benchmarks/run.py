"""qwen_mlx vs mlx-lm's own model classes: same shapes, same (random) weights, same
backend, interleaved runs in one process (order alternating), median of N. Prints
prefill / decode tok/s, the ratios, peak memory (each model's weights + the peak its run
added; MLX's counters), process RSS, and the decode bound: measured bandwidth / bytes read
per token (weights, k of E experts, KV cache).

    python benchmarks/run.py                      # `make bench`: the CPU-sized set (~10 min)
    python benchmarks/run.py --full               # full-depth shapes, bf16 and 4-bit (GPU)
    python benchmarks/run.py --shapes qwen3-0.6b --dtype float32 --bits 4 --quick

A row compares the same weights in both libraries ("same"). With ``--bits`` a second
row ("as loaded") runs qwen_mlx the way `load_model` serves a quantized checkpoint on
this backend (CPU: dequantized to float32 once at load) against mlx-lm's quantized model.
"""

import argparse
import importlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
                      num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[]),
}

# `make bench` on a CPU: (shapes, dtype, bits, prompt, gen). MLX's CPU backend has BLAS only
# for float32; its bfloat16 / 4-bit kernels (and mlx-lm's MoE prefill there) are 5-40x
# slower, so those rows are shorter. Qwen3-8B is left to --shapes / --full (32 GB in float32).
CPU_SET = [
    ("qwen3-0.6b,qwen2.5-0.5b", "float32", 0, 512, 128),
    ("qwen3-moe", "float32", 0, 512, 64),
    ("qwen3-0.6b", "float32", 4, 64, 16),
    ("qwen3-moe", "float32", 4, 32, 8),
    ("qwen3-0.6b", "bfloat16", 0, 64, 16),
]
GPU_SET = [
    ("qwen3-0.6b,qwen2.5-0.5b,qwen3-8b,qwen3-moe", "bfloat16", 0, 512, 128),
    ("qwen3-0.6b,qwen2.5-0.5b,qwen3-8b,qwen3-moe", "bfloat16", 4, 512, 128),
]


def rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:  # macOS: peak RSS (bytes there)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e9


def bandwidth(gb: float = 1.0):
    """(copy, read) GB/s: a large MLX copy (bytes read + written), and on the CPU backend
    a BLAS sgemv over the same bytes (MLX's CPU allocator does not reuse large buffers,
    so its copy mostly measures page faults there; decode reads weights the sgemv way)."""
    from qwen_mlx.models.linear import _gemv, _gemv_ok

    a = mx.random.uniform(shape=(int(gb * 2**28),))
    mx.eval(a)

    def best(f):
        ts = []
        for _ in range(10):
            t = time.perf_counter()
            mx.eval(f())
            ts.append(time.perf_counter() - t)
        return min(ts)

    copy = 2 * a.nbytes / best(lambda: a + 1) / 1e9
    w, x = a.reshape(-1, 1024), mx.ones((1, 1024))
    read = a.nbytes / best(lambda: _gemv(x, w)) / 1e9 if _gemv_ok(x, w) else 0.0
    del a, w
    mx.clear_cache()
    return copy, read


def bytes_per_token(model, cfg, ctx: int) -> float:
    """Weights a decode step reads (experts: k of E; the embedding table only as a tied
    head) plus the float KV cache at context ``ctx``."""
    from mlx.utils import tree_flatten

    total = 0
    for name, p in tree_flatten(model.parameters()):
        n = p.nbytes
        if "switch_mlp" in name:
            n = n * cfg["num_experts_per_tok"] / cfg["num_experts"]
        if "embed_tokens" in name and not cfg["tie_word_embeddings"]:
            n = 0
        total += n
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    itemsize = 2 if mx.default_device() != mx.cpu else 4
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd * itemsize * ctx
    return total + kv


def _random_quantized(model, bits):
    """Random packed weights and scales for every quantized module (much faster than
    quantizing random float tensors of a large MoE)."""
    def fill(_, m):
        if "scales" in m and isinstance(m.get("weight"), mx.array):
            w, sc = m["weight"], m["scales"]
            m["weight"] = mx.random.randint(0, 2**16, w.shape + (2,)).astype(mx.uint16).view(mx.uint32).reshape(w.shape)
            m["scales"] = mx.random.uniform(0.002, 0.01, sc.shape).astype(sc.dtype)
            m["biases"] = (-(2**bits - 1) / 2 * m["scales"]).astype(sc.dtype)
    for name, m in model.named_modules():
        fill(name, m)


def build_pair(cfg, dtype, bits):
    """Our model (fused, as `load_model` binds it) and mlx-lm's, sharing the same arrays."""
    from qwen_mlx.loading.loader import build_model
    from qwen_mlx.models.fuse import fuse_projections, unfused_parameters

    ours = build_model(cfg)
    ours.set_dtype(dtype)
    if bits:
        nn.quantize(ours, group_size=64, bits=bits)
        _random_quantized(ours, bits)
    fuse_projections(ours)
    mx.eval(ours.parameters())
    lm = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    theirs = lm.Model(lm.ModelArgs.from_dict(cfg))
    if bits:
        nn.quantize(theirs, group_size=64, bits=bits)
    theirs.load_weights(list(unfused_parameters(ours).items()))  # slices of ours: no copy
    for m in (ours, theirs):
        mx.eval(m.parameters())
        m.eval()
    return ours, theirs


def served(model, cfg, bits):
    """A quantized / half-precision checkpoint as `load_model` serves it with its defaults:
    on the CPU backend dequantized / cast to float32 once at load; elsewhere as is."""
    from qwen_mlx.loading.loader import Checkpoint, model_from_checkpoint
    from qwen_mlx.models.fuse import unfused_parameters

    if mx.default_device() != mx.cpu:
        return model
    if bits:
        cfg = {**cfg, "quantization": {"group_size": 64, "bits": bits}}
    return model_from_checkpoint(Checkpoint(cfg, unfused_parameters(model), "benchmark"))


def run_ours(model, prompt, n):
    from qwen_mlx.generate import generate_tokens
    from qwen_mlx.generation_config import SamplingParams

    return generate_tokens(model, prompt, SamplingParams(max_tokens=n, temperature=0.0))


def run_mlx_lm(model, prompt, n):
    from mlx_lm.generate import generate_step

    return (int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n))


def measure(fn, model, prompt, n):
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    it = fn(model, prompt, n)
    next(it)
    t1 = time.perf_counter()
    k = sum(1 for _ in it)
    t2 = time.perf_counter()
    return {"prefill": len(prompt) / (t1 - t0), "decode": k / (t2 - t1) if k else 0.0,
            "run_gb": (mx.get_peak_memory() - base) / 1e9, "rss_gb": rss_gb()}


def weights_gb(model) -> float:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9


def bench_row(name, cfg, dtype, bits, a, bw, ours, theirs, as_loaded=False):
    mx.random.seed(1)
    prompt = [int(x) for x in mx.random.randint(0, cfg["vocab_size"], (a.prompt,)).tolist()]
    impls = [("qwen_mlx", run_ours, ours), ("mlx_lm", run_mlx_lm, theirs)]
    t0 = time.perf_counter()
    for _, fn, m in impls:  # warm-up, not counted
        measure(fn, m, prompt[:16], 4)
    runs = {"qwen_mlx": [], "mlx_lm": []}
    for r in range(a.runs):  # interleaved, order alternating each round
        for key, fn, m in (impls if r % 2 == 0 else impls[::-1]):
            runs[key].append(measure(fn, m, prompt, a.gen))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    for k, _, m in impls:  # this model's weights + what its run added (both models are resident)
        med[k]["peak_gb"] = weights_gb(m) + med[k].pop("run_gb")
    ctx = a.prompt + a.gen // 2
    bound = {k: bw * 1e9 / bytes_per_token(m, cfg, ctx) for k, _, m in impls}
    kind = f"{str(dtype).split('.')[-1]}{f' q{bits}' if bits else ''}"
    kind += f" (ours as loaded: {str(ours.layers[0].input_layernorm.weight.dtype).split('.')[-1]})" if as_loaded else ""
    row = {"shape": name, "layers": cfg["num_hidden_layers"], "weights": kind, "prompt": a.prompt, "gen": a.gen,
           **{f"{k}_{m}": round(v, 3) for k, d in med.items() for m, v in d.items()},
           **{f"{k}_decode_bound": round(v, 2) for k, v in bound.items()},
           "prefill_ratio": round(med["qwen_mlx"]["prefill"] / med["mlx_lm"]["prefill"], 3),
           "decode_ratio": round(med["qwen_mlx"]["decode"] / max(med["mlx_lm"]["decode"], 1e-9), 3)}
    o, t = med["qwen_mlx"], med["mlx_lm"]
    print(f"{name:13s} {kind:36s} prefill {o['prefill']:8.1f} vs {t['prefill']:8.1f} x{row['prefill_ratio']:5.2f} | "
          f"decode {o['decode']:7.2f} vs {t['decode']:7.2f} x{row['decode_ratio']:5.2f} | "
          f"bound {bound['qwen_mlx']:6.1f} / {bound['mlx_lm']:6.1f} tok/s | "
          f"peak GB {o['peak_gb']:.2f} / {t['peak_gb']:.2f} | rss {o['rss_gb']:.2f} | {time.perf_counter() - t0:.0f}s",
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--bits", type=int, default=0, help="quantize both models (0 = no)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, help="cut every shape to this many layers")
    ap.add_argument("--quick", action="store_true", help="4 layers per model (the CPU set uses it)")
    ap.add_argument("--full", action="store_true", help="the GPU set: full depth, bf16 and 4-bit")
    ap.add_argument("--gpu-dequant-rows", type=int, help="qwen_mlx: dequantize quantized weights for "
                    "prompts of at least this many tokens on a GPU (see models/linear.py)")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    if a.gpu_dequant_rows:
        from qwen_mlx.models.linear import SPEED
        SPEED.gpu_dequant_rows = a.gpu_dequant_rows
    if a.shapes:
        plan = [(a.shapes, a.dtype, a.bits, a.prompt, a.gen)]
    else:
        plan = GPU_SET if a.full or mx.default_device() != mx.cpu else CPU_SET
        a.quick = a.quick or not a.full and mx.default_device() == mx.cpu
    layers = a.layers or (4 if a.quick else None)
    copy, read = bandwidth()
    bw = max(copy, read)
    print(f"mlx {mx.__version__} on {mx.default_device()} | bandwidth GB/s: copy {copy:.1f}"
          f"{f', BLAS read {read:.1f}' if read else ''} (bound uses {bw:.1f}) | median of {a.runs}"
          f"{f' | {layers} layers per model' if layers else ''} | tok/s qwen_mlx vs mlx-lm", flush=True)
    results = []
    for shapes, dtype, bits, prompt, gen in plan:
        a.prompt, a.gen = prompt, gen
        for name in shapes.split(","):
            cfg = dict(SHAPES[name])
            if layers:
                cfg["num_hidden_layers"] = layers
            if dtype != "float32" and cfg.get("num_experts") and mx.default_device() == mx.cpu and not bits:
                print(f"{name:13s} {dtype}: skipped (mlx-lm: MLX's CPU GatherMM is float32-only)")
                continue
            mx.random.seed(0)
            ours, theirs = build_pair(cfg, getattr(mx, dtype), bits)
            results.append(bench_row(name, cfg, getattr(mx, dtype), bits, a, bw, ours, theirs))
            if (bits or dtype != "float32") and mx.default_device() == mx.cpu:
                ours = served(ours, cfg, bits)  # the same checkpoint as load_model serves it here
                results.append(bench_row(name, cfg, getattr(mx, dtype), bits, a, bw, ours, theirs, as_loaded=True))
            del ours, theirs
            mx.clear_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": str(mx.default_device()), "copy_gbs": round(copy, 1), "read_gbs": round(read, 1),
                       "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
