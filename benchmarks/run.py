"""qwen_mlx vs mlx-lm's own model classes: same shapes, same (random) weights, same
backend, interleaved runs in one process (order alternating), median of N. Prints
prefill / decode tok/s, the ratios, peak memory (each model's weights + the peak its run
added; MLX's counters), process RSS, and the decode bound: measured read bandwidth / bytes
read per token (weights, k of E experts, KV cache), with our decode as a share of it.

    python benchmarks/run.py                      # `make bench`: the CPU-sized set (~8 min on 2 cores)
    python benchmarks/run.py --full               # full-depth shapes, bf16 and 4-bit (GPU)
    python benchmarks/run.py --shapes qwen3-0.6b --dtype float32 --bits 4 --quick
    python benchmarks/run.py --shapes qwen3-0.6b --quick --vs-speed compile_step=1   # A/B of our options

A row compares the same weights in both libraries ("same"). With ``--bits`` / half precision
on the CPU a second row ("as loaded") runs qwen_mlx the way `load_model` serves that checkpoint
there (dequantized / cast to float32 once at load) against mlx-lm's quantized model.
``--speed KEY=VALUE`` sets `qwen_mlx.models.linear.SPEED` options for our runs;
``--vs-speed KEY=VALUE`` replaces mlx-lm by qwen_mlx with those options (same model, same
weights, interleaved), to measure one option against the defaults.
"""

import argparse
import importlib
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

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

# `make bench` on a CPU, 4 layers per shape: shape -> rows (dtype, bits, prompt, gen), ~8 min
# on 2 cores. MLX's CPU backend has BLAS only for float32; its bfloat16 / 4-bit kernels and
# mlx-lm's MoE there (one M = 1 sgemm per token and expert) are 5-40x slower, and mlx-lm's
# float32 decode (M = 1 sgemm) ~2.5x, so the rows other than the two dense headline ones are
# shorter. Where a shape has a float32 and a 4-bit row, the float32 weights are the 4-bit
# ones dequantized (speed does not depend on the values), which is also the "as loaded"
# model of the 4-bit and bfloat16 rows: one build, not three (Qwen3-MoE: 12.5 GB). Qwen3-8B:
# 4 layers + its untied 622 M-parameter embedding and head, 8 GB in float32 shared by both
# libraries. Wall time: see the Makefile's bench comment (the measuring is over 80% of it: three
# interleaved runs of every implementation, mlx-lm's slow float32 decode the largest part).
CPU_SET = [
    ("qwen3-0.6b", [("float32", 0, 512, 128), ("float32", 4, 64, 16), ("bfloat16", 0, 64, 16)]),
    ("qwen2.5-0.5b", [("float32", 0, 512, 128)]),
    ("qwen3-moe", [("float32", 0, 256, 32), ("float32", 4, 32, 8)]),
    ("qwen3-8b", [("float32", 0, 128, 8)]),
]
GPU_SET = [(name, [("bfloat16", 0, 512, 128), ("bfloat16", 4, 512, 128)])
           for name in ("qwen3-0.6b", "qwen2.5-0.5b", "qwen3-8b", "qwen3-moe")]
POOL = (1 << 22) + 7  # values per random pool (see RandomFill)
GROUP = 64  # quantization group size of every quantized row


def rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:  # macOS: peak RSS (bytes there)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e9


def l3_bytes() -> int:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip().rstrip("K")) * 1024
    except (OSError, ValueError):
        return 0


def best_time(f, n: int = 5) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        mx.eval(f())
        ts.append(time.perf_counter() - t)
    return min(ts)


def bandwidth(gb: float = 0.5):
    """(copy, read) GB/s over ``gb`` GB (16x this box's 32 MB L3). On the CPU backend the copy
    is numpy's into a buffer already written (MLX's allocator hands each result fresh pages,
    so an MLX copy there measures page faults) and the read a BLAS ``sgemv``, the way decode
    reads weights; elsewhere an MLX copy and a sum."""
    from qwen_mlx.models.linear import _gemv, _gemv_ok

    a = mx.ones((int(gb * 2**28) // 1024, 1024))
    mx.eval(a)
    if mx.default_device() == mx.cpu:
        A = np.asarray(a)
        B = np.empty_like(A)
        np.copyto(B, A)
        copy = 2 * a.nbytes / best_time(lambda: np.copyto(B, A)) / 1e9
        x = mx.ones((1, 1024))
        read = a.nbytes / best_time(lambda: _gemv(x, a)) / 1e9 if _gemv_ok(x, a) else 0.0
        del A, B
    else:
        copy = 2 * a.nbytes / best_time(lambda: a + 1, 10) / 1e9
        read = a.nbytes / best_time(lambda: a.sum(), 10) / 1e9
    del a
    mx.clear_cache()
    return copy, read


def bytes_per_token(model, cfg, ctx: int) -> float:
    """Weights a decode step reads (experts: k of E; the embedding table only as a tied
    head) plus the KV cache (in the activations' dtype) at context ``ctx``."""
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
    itemsize = model.layers[0].input_layernorm.weight.dtype.size
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd * itemsize * ctx
    return total + kv


class RandomFill:
    """New random parameters at memory speed. MLX's generator makes ~0.2 GB/s on this CPU
    (a 4-layer Qwen3-MoE in float32 is 12.5 GB: a minute); here each tensor is a pool of
    4 Mi random values rotated by a random offset and repeated (~1 GB/s, most of it the page
    faults of fresh memory). Speed does not depend on the values (finite, no denormals);
    MoE routing still sees distinct rows, and the pool length is odd, so repeats never line
    up with rows."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.floats = mx.random.uniform(-1, 1, (POOL,), key=mx.random.key(seed))
        # numpy's: MLX's randint draws through float32, so a 2^32 range leaves the low bits 0
        # (4-bit codes averaging ~6, not 7.5: every weight matrix then has a mean)
        self.words = mx.array(self.rng.integers(0, 2**32, POOL, dtype=np.uint32))

    def like(self, shape, pool: mx.array) -> mx.array:
        o = int(self.rng.integers(POOL))
        src = mx.concatenate([pool[o:], pool[:o]])
        q, r = divmod(math.prod(shape), POOL)
        return mx.concatenate([src] * q + [src[:r]]).reshape(shape)

    def model(self, model: nn.Module, bits: int = 0) -> None:
        """Every weight (float: uniform with scale 1 / sqrt(fan-in); quantized: random codes
        centred by the biases, scaled to the same range) replaced; norms and biases kept.
        The embedding is ~sqrt(hidden) larger (entries ~1), so that each token's own
        embedding, not the part all tokens share after attention, dominates the residual
        stream, as in a trained model: MoE routers then spread a prompt over most experts
        (a 256-token prompt: 100-128 of 128 experts per layer) instead of sending every token
        to the same 8, which would flatter grouped-by-expert prefill. The initial values were
        never evaluated, so they cost nothing."""
        from mlx.utils import tree_flatten, tree_unflatten

        new, hidden = [], model.args.hidden_size
        for k, v in tree_flatten(model.parameters()):
            big = 1.0 if "embed_tokens" not in k else hidden ** 0.5
            if v.dtype == mx.uint32:
                new.append((k, self.like(v.shape, self.words)))
            elif k.endswith(".scales"):  # codes - 7.5 times scale: within ~1 / sqrt(fan-in), as floats
                top = big * (v.shape[-1] * GROUP) ** -0.5 / ((2**bits - 1) / 2)
                s = self.like(v.shape, ((self.floats + 3) / 3 * top).astype(v.dtype))
                new += [(k, s), (k[:-len("scales")] + "biases", -(2**bits - 1) / 2 * s)]
            elif v.ndim >= 2 and not k.endswith(".biases"):
                new.append((k, self.like(v.shape, (self.floats * big * v.shape[-1] ** -0.5).astype(v.dtype))))
        model.update(tree_unflatten(new))


def build_ours(cfg, dtype, bits, seed: int = 0):
    """Our model (fused, as `load_model` binds it) with random weights. Structure first
    (cast, quantize, fuse: all lazy), then the values, so no initial value is computed,
    quantized or concatenated."""
    from qwen_mlx.loading.loader import build_model
    from qwen_mlx.models.fuse import fuse_projections

    ours = build_model(cfg)
    ours.set_dtype(dtype)
    if bits:
        nn.quantize(ours, group_size=GROUP, bits=bits)
    fuse_projections(ours)
    RandomFill(seed).model(ours, bits)
    mx.eval(ours.parameters())
    return ours.eval()


def mlx_lm_twin(ours, cfg, bits):
    """mlx-lm's own model class holding our arrays (unfused: slices, no copy)."""
    from qwen_mlx.models.fuse import unfused_parameters

    lm = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    theirs = lm.Model(lm.ModelArgs.from_dict(cfg))
    if bits:
        nn.quantize(theirs, group_size=GROUP, bits=bits)
    theirs.load_weights(list(unfused_parameters(ours).items()))
    mx.eval(theirs.parameters())
    return theirs.eval()


def served(model, cfg, bits):
    """A quantized / half-precision checkpoint as `load_model` serves it with its defaults:
    on the CPU backend every weight dequantized / cast to float32 once at load (fused as
    there); elsewhere as is. Built from our fused model directly: the same arrays as
    `model_from_checkpoint` binds (a quantization group never spans two fused projections,
    so dequantizing the fused tensor equals fusing the dequantized parts; tested in
    tests/models/test_fuse.py), without the loader's per-projection float temporaries
    (this VM faults fresh pages in at 1-5 s/GB: a 4-layer Qwen3-MoE took 77 s that way)."""
    from mlx.utils import tree_flatten

    from qwen_mlx.loading.loader import build_model
    from qwen_mlx.models.fuse import fuse_projections
    from qwen_mlx.models.linear import dequantized

    if mx.default_device() != mx.cpu:
        return model
    modules = dict(model.named_modules())
    weights = []
    for k, v in tree_flatten(model.parameters()):
        path, leaf = k.rsplit(".", 1)
        if "scales" in modules[path]:
            if leaf != "weight":
                continue
            v = dequantized(modules[path])
        weights.append((k, v.astype(mx.float32)))
    out = build_model(cfg)
    fuse_projections(out)
    out.load_weights(weights)  # strict: names and shapes
    mx.eval(out.parameters())
    return out.eval()


def run_ours(model, prompt, n):
    from qwen_mlx.generate import generate_tokens
    from qwen_mlx.generation_config import SamplingParams

    return generate_tokens(model, prompt, SamplingParams(max_tokens=n, temperature=0.0))


def run_mlx_lm(model, prompt, n):
    from mlx_lm.generate import generate_step

    return (int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n))


def with_speed(opts: dict):
    """`run_ours` with `SPEED` options set while it runs (restored after)."""
    from qwen_mlx.models.linear import SPEED

    def fn(model, prompt, n):
        saved = {k: getattr(SPEED, k) for k in opts}
        vars(SPEED).update(opts)
        try:
            yield from run_ours(model, prompt, n)
        finally:
            vars(SPEED).update(saved)
    return fn


def parse_speed(items) -> dict:
    from qwen_mlx.models.linear import SPEED

    out = {}
    for item in items or []:
        for kv in item.split(","):
            k, _, v = kv.partition("=")
            if not hasattr(SPEED, k):
                raise SystemExit(f"unknown SPEED option '{k}' (known: {', '.join(vars(SPEED))})")
            low = v.strip().lower()
            out[k] = None if low in ("none", "") else True if low in ("true", "on") else \
                False if low in ("false", "off") else int(v)
    return out


def measure(fn, model, prompt, n):
    """One run: time to the first token (prefill) and the rate of the rest (decode). MLX's
    buffer cache is kept between runs (cleared between rows), so fresh-page faults (slow in
    this VM) are not timed; the warm-up run has filled it."""
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


def bench_rows(name, cfg, a, bw, variants, ref):
    """Our ``variants`` [(label, model)] and the reference ``ref`` (label, run function, model)
    timed interleaved, the order rotating each round (every implementation runs in every
    position); one row per variant against the same reference medians. A reference that is
    slow on this backend (mlx-lm's bf16 / 4-bit CPU kernels) is timed once for all variants."""
    mx.random.seed(1)
    prompt = [int(x) for x in mx.random.randint(0, cfg["vocab_size"], (a.prompt,)).tolist()]
    impls = [(label, run_ours, m) for label, m in variants] + [ref]
    t0 = time.perf_counter()
    for _, fn, m in impls:  # warm-up, not counted: prefill past `dequant_rows`, one decode step
        measure(fn, m, prompt[:8], 2)
    runs = {k: [] for k, _, _ in impls}
    for r in range(a.runs):
        for key, fn, m in impls[r % len(impls):] + impls[:r % len(impls)]:
            runs[key].append(measure(fn, m, prompt, a.gen))
    seconds = time.perf_counter() - t0
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    ctx = a.prompt + a.gen // 2
    for k, _, m in impls:  # this model's weights + what its run added (all models are resident)
        med[k]["peak_gb"] = weights_gb(m) + med[k].pop("run_gb")
        med[k]["bytes_per_token"] = bytes_per_token(m, cfg, ctx)
        med[k]["bound"] = bw * 1e9 / med[k]["bytes_per_token"]
    rk, rows = ref[0], []
    t = med[rk]
    for label, m in variants:
        o = med[label]
        dt = str(m.layers[0].input_layernorm.weight.dtype).split(".")[-1]
        kind = f"{label} ({dt})" if label != "same" else label
        row = {"shape": name, "layers": cfg["num_hidden_layers"], "weights": f"{a.kind} {kind}", "prompt": a.prompt,
               "gen": a.gen, "vs": rk, **{f"qwen_mlx_{m}": round(v, 3) for m, v in o.items()},
               **{f"ref_{m}": round(v, 3) for m, v in t.items()},
               "prefill_ratio": round(o["prefill"] / t["prefill"], 3),
               "decode_ratio": round(o["decode"] / max(t["decode"], 1e-9), 3),
               "of_bound": round(o["decode"] / o["bound"], 3), "seconds": round(seconds / len(variants), 1)}
        print(f"{name:13s} {row['weights']:26s} prefill {o['prefill']:8.1f} vs {t['prefill']:8.1f} "
              f"x{row['prefill_ratio']:5.2f} | decode {o['decode']:7.2f} vs {t['decode']:7.2f} x{row['decode_ratio']:5.2f} | "
              f"bound {o['bound']:6.1f} / {t['bound']:6.1f} tok/s, ours {row['of_bound']:4.0%} | "
              f"peak GB {o['peak_gb']:.2f} / {t['peak_gb']:.2f} | rss {o['rss_gb']:.2f} | {seconds:.0f}s", flush=True)
        rows.append(row)
    return rows


def bound_notes(rows, bw) -> list:
    """Decode against the bound at the best bandwidth measured (start, end), and why a figure
    may sit above it."""
    notes, l3 = [], l3_bytes()
    for r in rows:
        b = r["qwen_mlx_bytes_per_token"]
        share = r["qwen_mlx_decode"] * b / (bw * 1e9)
        what = f"{r['shape']} {r['weights']}: {share:.0%} of the bound ({b / 1e6:.0f} MB per token)"
        if l3 and b < 4 * l3:
            notes.append(f"{what}: near the {l3 / 2**20:.0f} MiB L3, part of it is read from cache: no bound")
        elif share > 1.05:
            notes.append(f"{what}, more than 4x the L3: the bandwidth was measured while the machine was busier")
    return notes


def main():
    t_start = time.perf_counter()
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
    ap.add_argument("--no-as-loaded", action="store_true", help="only the same-weights rows")
    ap.add_argument("--speed", action="append", metavar="KEY=VALUE",
                    help="qwen_mlx SPEED options (models/linear.py), e.g. dequant_rows=none,compile_step=1")
    ap.add_argument("--vs-speed", action="append", metavar="KEY=VALUE",
                    help="compare against qwen_mlx with these SPEED options instead of mlx-lm")
    ap.add_argument("--gpu-dequant-rows", type=int, help="= --speed gpu_dequant_rows=N")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    from qwen_mlx.models.linear import SPEED

    opts = parse_speed(a.speed)
    if a.gpu_dequant_rows:
        opts["gpu_dequant_rows"] = a.gpu_dequant_rows
    vars(SPEED).update(opts)
    vs = parse_speed(a.vs_speed) if a.vs_speed else None
    cpu = mx.default_device() == mx.cpu
    if a.shapes:
        plan = [(name, [(a.dtype, a.bits, a.prompt, a.gen)]) for name in a.shapes.split(",")]
    else:
        plan = GPU_SET if a.full or not cpu else CPU_SET
        a.quick = a.quick or not a.full and cpu
    layers = a.layers or (4 if a.quick else None)
    copy, read = bandwidth()  # here and at the end: ~2 s a probe (0.5 GB of fresh pages)
    bw = read or copy
    print(f"mlx {mx.__version__} on {mx.default_device()} | bandwidth GB/s: copy {copy:.1f}, read {read:.1f} "
          f"(bounds use this; the notes the best of it and the end's) | median of {a.runs}"
          f"{f' | {layers} layers per model' if layers else ''} | tok/s qwen_mlx{f' {opts}' if opts else ''} vs "
          f"{f'qwen_mlx {vs}' if vs is not None else 'mlx-lm'}", flush=True)
    results, t_build = [], 0.0
    for name, rows in plan:
        cfg = dict(SHAPES[name])
        if layers:
            cfg["num_hidden_layers"] = layers
        t = time.perf_counter()
        # a float32 row next to a float32 4-bit row (CPU): both run on the one quantized build
        qbits = next((b for d, b, _, _ in rows if b and d == "float32"), 0) if cpu and vs is None else 0
        quant = deq = None
        if qbits:
            quant = build_ours(cfg, mx.float32, qbits)
            deq = served(quant, cfg, qbits)  # float32, as load_model serves it here
        t_build += time.perf_counter() - t
        for dtype, bits, prompt, gen in rows:
            a.prompt, a.gen, a.kind = prompt, gen, f"{dtype}{f' q{bits}' if bits else ''}"
            if dtype != "float32" and cfg.get("num_experts") and cpu and not bits:
                print(f"{name:13s} {dtype}: skipped (mlx-lm: MLX's CPU GatherMM is float32-only)")
                continue
            t = time.perf_counter()
            if qbits and dtype == "float32" and bits in (0, qbits):
                ours = quant if bits else deq
                variants = [("same", ours)] + ([("as loaded", deq)] if bits and not a.no_as_loaded else [])
            else:
                ours = build_ours(cfg, getattr(mx, dtype), bits)
                variants = [("same", ours)]
                if (bits or dtype != "float32") and cpu and not a.no_as_loaded and vs is None:
                    # as load_model serves it here: float32, the shape's one (speed does not depend on the values)
                    variants.append(("as loaded", deq if deq is not None else served(ours, cfg, bits)))
            ref = ("B", with_speed(vs), ours) if vs is not None else ("mlx_lm", run_mlx_lm, mlx_lm_twin(ours, cfg, bits))
            t_build += time.perf_counter() - t
            results += bench_rows(name, cfg, a, bw, variants, ref)
            del ours, variants, ref
            mx.clear_cache()
        quant = deq = None
        mx.clear_cache()
    bw = max(bw, bandwidth()[1 if read else 0])  # again at the end: the start may have been busier
    print(f"best bandwidth seen: {bw:.1f} GB/s")
    for note in bound_notes(results, bw):
        print(f"note: {note}")
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s: building models {t_build:.0f} s, measuring {sum(r['seconds'] for r in results):.0f} s "
          f"| max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e6 if sys.platform != 'darwin' else 1e9):.1f} GB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": str(mx.default_device()), "copy_gbs": round(copy, 1), "read_gbs": round(read, 1),
                       "best_read_gbs": round(bw, 1), "speed": opts, "vs_speed": vs, "total_s": round(total),
                       "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
