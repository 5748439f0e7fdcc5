"""`qwen-mlx convert` of a GGUF source streams: tensors are read from the file and decoded
one at a time (GGUFWeights), so converting a GGUF far larger than the shard size keeps the
peak RSS growth far below the model. Measured in a child process
(``python -m tests.loading.test_gguf_streaming SRC DST SHARD`` prints RSS as JSON)."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHARD = 2 << 20
HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV, HEAD_DIM = 512, 1536, 60, 2048, 8, 4, 64


def _blocks(rng, qtype, shape):
    """Random blocks of ``qtype`` with small finite float16 scales (offsets 0 and 2: d, dmin)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1]))
    b = rng.integers(0, 256, (rows, shape[-1] // block, size), dtype=np.uint8)
    heads = {T.Q5_K: (0, 2), T.Q5_0: (0,), T.Q8_0: (0,)}[qtype]
    for off in heads:
        b[..., off:off + 2] = np.full(b.shape[:2], 0.002, np.float16)[..., None].view(np.uint8)
    return b.reshape(*shape[:-1], -1)


def add_tokenizer(w) -> None:
    """A byte-level "gpt2" vocabulary (the 256 byte symbols and one merge), so that
    `qwen-mlx convert` can write tokenizer files for the synthetic model."""
    from qwen_mlx.tokenizer.bpe import byte_alphabet

    w.add_tokenizer_model("gpt2")
    w.add_token_list([*byte_alphabet(), "\u0120t"])
    w.add_token_merges(["\u0120 t"])
    w.add_eos_token_id(0)


def make_gguf(path: Path) -> int:
    """A random qwen3 GGUF: Q8_0 embedding, Q5_0 attention, Q5_K MLP, F32 norms, tied head.
    Returns its size in bytes."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen3")
    for k, v in {"block_count": LAYERS, "context_length": 512, "embedding_length": HIDDEN,
                 "feed_forward_length": INTER, "attention.head_count": HEADS, "attention.head_count_kv": KV,
                 "attention.key_length": HEAD_DIM, "rope.dimension_count": HEAD_DIM}.items():
        w.add_uint32(f"qwen3.{k}", v)
    w.add_float32("qwen3.attention.layer_norm_rms_epsilon", 1e-6)
    add_tokenizer(w)
    tensors = [("token_embd.weight", T.Q8_0, (VOCAB, HIDDEN)), ("output_norm.weight", T.F32, (HIDDEN,))]
    for i in range(LAYERS):
        b = f"blk.{i}."
        tensors += [(b + "attn_q.weight", T.Q5_0, (HEADS * HEAD_DIM, HIDDEN)),
                    (b + "attn_k.weight", T.Q5_0, (KV * HEAD_DIM, HIDDEN)),
                    (b + "attn_v.weight", T.Q5_0, (KV * HEAD_DIM, HIDDEN)),
                    (b + "attn_output.weight", T.Q5_0, (HIDDEN, HEADS * HEAD_DIM)),
                    (b + "ffn_gate.weight", T.Q5_K, (INTER, HIDDEN)), (b + "ffn_up.weight", T.Q5_K, (INTER, HIDDEN)),
                    (b + "ffn_down.weight", T.Q5_K, (HIDDEN, INTER))]
        tensors += [(b + n, T.F32, (d,)) for n, d in (("attn_norm.weight", HIDDEN), ("ffn_norm.weight", HIDDEN),
                                                      ("attn_q_norm.weight", HEAD_DIM), ("attn_k_norm.weight", HEAD_DIM))]
    for name, t, shape in tensors:
        if t == T.F32:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        else:
            raw = _blocks(rng, t, shape)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=t)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path.stat().st_size


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_stream")
    src = root / "m.gguf"
    size = make_gguf(src)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "tests.loading.test_gguf_streaming", str(src), str(root / "q4"), str(SHARD)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return dict(root=root, src=src, size=size, rss=json.loads(p.stdout.strip().splitlines()[-1]))


def test_gguf_convert_streams(run):
    from qwen_mlx.loading.gguf import read_gguf

    r, size = run["rss"], run["size"]
    decoded = sum(v.nbytes for v in read_gguf(run["src"]).weights.layout().values())
    grew = (r["peak_kb"] - r["base_kb"]) * 1024
    print(f"\nGGUF {size / 2**20:.1f} MiB (Q5_0/Q5_K/Q8_0; {decoded / 2**20:.0f} MiB decoded, "
          f"{r['params'] * 4 / 2**20:.0f} MiB as float32) -> {r['written'] / 2**20:.1f} MiB 4-bit in {r['shards']} "
          f"shards of <= {SHARD / 2**20:.0f} MiB; RSS before {r['base_kb'] / 1024:.0f} MiB, peak "
          f"{r['peak_kb'] / 1024:.0f} MiB (+{grew / 2**20:.1f} MiB) in {r['seconds']:.1f} s")
    assert size > 40 * SHARD and r["shards"] >= 40
    # reading every tensor first (as before) holds the whole decoded model: measured +209 MiB
    # here, against +51 MiB streamed
    assert grew < decoded / 2, f"conversion grew RSS by {grew / 2**20:.0f} MiB for a {decoded / 2**20:.0f} MiB model"


def test_streamed_output_is_right(run):
    """Spot check: a converted Q5_K tensor is the 4-bit quantization of the source's exact dequantization."""
    import mlx.core as mx

    from qwen_mlx.loading.gguf import read_gguf
    from qwen_mlx.quant.spec import QuantSpec, dequantize, quantize

    ck = read_gguf(run["src"])
    p = "model.layers.3.mlp.down_proj"
    src = dequantize({k: ck.weights[f"{p}.{k}"] for k in ("weight", "scales", "biases")}, QuantSpec(5, 32))
    cfg = json.loads((run["root"] / "q4" / "config.json").read_text())
    q = cfg["quantization"]
    spec = QuantSpec(q["bits"], q["group_size"])
    want = quantize(src.astype(mx.float16), spec)  # a GGUF's default dtype (quant/convert.py target_dtype)
    files = sorted((run["root"] / "q4").glob("*.safetensors"))
    out = {}
    for f in files:
        out.update({k: v for k, v in mx.load(str(f)).items() if k.startswith(p + ".")})
    assert spec == QuantSpec(4, 64) and out[p + ".weight"].shape == (HIDDEN, INTER * 4 // 32)
    for k in ("weight", "scales", "biases"):
        assert mx.array_equal(out[f"{p}.{k}"], want[k]).item(), k


def _peak_kb() -> int:
    """This process's peak RSS. VmHWM belongs to the address space, which exec replaces;
    ru_maxrss would carry over the parent's peak (pytest's, with transformers loaded)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(src: str, dst: str, shard: str) -> None:
    import qwen_mlx.models.qwen3  # noqa: F401  (imports before the RSS baseline)
    from qwen_mlx.quant import ConvertOptions, convert

    base = _peak_kb()
    res = convert(src, dst, ConvertOptions(bits=4, shard_bytes=int(shard)))
    peak = _peak_kb()
    from qwen_mlx.loading.gguf import read_gguf
    params = sum(int(np.prod(t.shape)) for t in read_gguf(src).weights.header.tensors.values())
    print(json.dumps({"base_kb": base, "peak_kb": peak, "shards": len(res.shards), "params": params,
                      "written": res.bytes_written, "seconds": res.seconds}), flush=True)


if __name__ == "__main__":
    _child(*sys.argv[1:4])
