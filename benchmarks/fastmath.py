"""Stock MLX ops vs qwen_mlx.models.fastmath on the shapes of the image -> first token path
(CPU backend, float32): interleaved, best and median of N runs, max relative difference.

    python benchmarks/fastmath.py            # MLP activations (1296, 3420), scores, attention
    python benchmarks/fastmath.py --runs 9
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_lm.models.activations import swiglu  # noqa: E402

from qwen_mlx.models import fastmath as fm  # noqa: E402


def timed(f, *args, runs):
    mx.eval(f(*args))
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        mx.eval(f(*args))
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    mx.set_default_device(mx.cpu)
    x = mx.random.normal((1296, 3420), key=mx.random.key(0)) * 3  # a Qwen2.5-VL tower MLP activation
    u = mx.random.normal((1296, 3420), key=mx.random.key(1))
    s = mx.random.normal((16, 81, 1296), key=mx.random.key(2)) * 3  # one attention chunk's scores
    q = mx.random.normal((1, 16, 1296, 80), key=mx.random.key(3))  # Qwen2.5-VL full-attention layer
    q3 = mx.random.normal((1, 16, 1024, 64), key=mx.random.key(4))  # Qwen3-VL layer (512 px image)
    qd, kd = mx.random.normal((1, 16, 339, 128)), mx.random.normal((1, 2, 339, 128))  # 3B prefill, GQA 8
    mx.eval(x, u, s, q, q3, qd, kd)
    cases = [
        ("exp (1296, 3420)", mx.exp, fm.exp, (x,)),
        ("sigmoid", mx.sigmoid, fm.sigmoid, (x,)),
        ("silu", nn.silu, fm.silu, (x,)),
        ("swiglu", swiglu, fm.swiglu, (x, u)),
        ("quick_gelu", nn.gelu_fast_approx, fm.quick_gelu, (x,)),
        ("gelu_pytorch_tanh", nn.gelu_approx, fm.gelu_tanh, (x,)),
        ("gelu (erf)", nn.gelu, fm.gelu, (x,)),
        ("softmax (16, 81, 1296)", lambda t: mx.softmax(t, axis=-1), fm.softmax, (s,)),
        ("sdpa (1, 16, 1296, 80)", lambda t: mx.fast.scaled_dot_product_attention(t, t, t, scale=0.11),
         lambda t: fm.sdpa(t, t, t, 0.11), (q,)),
        ("sdpa (1, 16, 1024, 64)", lambda t: mx.fast.scaled_dot_product_attention(t, t, t, scale=0.125),
         lambda t: fm.sdpa(t, t, t, 0.125), (q3,)),
        ("sdpa causal 339, GQA 16/2", lambda t: mx.fast.scaled_dot_product_attention(t, kd, kd, scale=0.09,
                                                                                     mask="causal"),
         lambda t: fm.sdpa(t, kd, kd, 0.09, "causal"), (qd,)),
    ]
    print(f"mlx {mx.__version__} on {mx.default_device()} | ms, best / median of {a.runs} | stock vs fastmath")
    for name, stock, fast, args in cases:
        ts, tf = [], []
        for _ in range(a.runs):  # interleaved
            ts += timed(stock, *args, runs=1)
            tf += timed(fast, *args, runs=1)
        ref, got = np.array(stock(*args)), np.array(fast(*args))
        err = np.abs(got - ref).max() / np.abs(ref).max()
        print(f"{name:28s} {min(ts):8.1f} / {statistics.median(ts):8.1f}  vs {min(tf):7.1f} / "
              f"{statistics.median(tf):7.1f}   x{statistics.median(ts) / statistics.median(tf):5.1f}   "
              f"max|diff|/max|stock| {err:.1e}")


if __name__ == "__main__":
    main()
