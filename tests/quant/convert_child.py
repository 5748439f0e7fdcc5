"""Child process for the streaming tests: ``python -m tests.quant.convert_child JOBS``.

Jobs: ``["rss", SRC, DST, SHARD_BYTES]`` converts and prints peak RSS before/after as
JSON; ``["kill", SRC, DST, STAGE, MARKER]`` converts with a hook that writes its pid to
MARKER and sleeps at STAGE (``start`` | ``mid-shard`` | ``before-rename``), so the parent
can SIGKILL it exactly there."""

import json
import os
import resource
import sys
import time
from pathlib import Path


def make_source(path: Path, hidden=512, inter=1536, layers=6, vocab=8192) -> int:
    """A random float32 qwen3 checkpoint written with MLX alone (no torch); returns its bytes."""
    import mlx.core as mx

    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(model_type="qwen3", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=vocab,
               tie_word_embeddings=False, torch_dtype="float32", max_position_embeddings=512)
    (path / "config.json").write_text(json.dumps(cfg))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (512, hidden), p + "self_attn.k_proj.weight": (256, hidden),
                       p + "self_attn.v_proj.weight": (256, hidden), p + "self_attn.o_proj.weight": (hidden, 512),
                       p + "self_attn.q_norm.weight": (64,), p + "self_attn.k_norm.weight": (64,),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    arrays = {k: mx.random.normal(s, key=mx.random.key(i)) * 0.02 for i, (k, s) in enumerate(shapes.items())}
    mx.save_safetensors(str(path / "model.safetensors"), arrays)
    return sum(a.nbytes for a in arrays.values())


def _hold(marker: Path):
    marker.write_text(str(os.getpid()))
    time.sleep(120)


def _job(job):
    import qwen_mlx.models.qwen3  # noqa: F401  (imports before the RSS baseline)
    from qwen_mlx.loading import writer
    from qwen_mlx.quant import ConvertOptions, convert

    kind, src, dst = job[0], Path(job[1]), Path(job[2])
    if kind == "rss":
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = convert(src, dst, ConvertOptions(bits=4, shard_bytes=int(job[3])))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"base_kb": base, "peak_kb": peak, "shards": len(res.shards),
                          "written": res.bytes_written, "seconds": res.seconds}), flush=True)
        return
    stage, marker = job[3], Path(job[4])
    if stage == "start":
        writer.ShardWriter.add = lambda self, t: _hold(marker)
    elif stage == "mid-shard":
        real, n = writer._write_shard, []

        def partial(path, arrays):
            n.append(path)
            if len(n) < 2:
                return real(path, arrays)
            with open(path, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                _hold(marker)
        writer._write_shard = partial
    elif stage == "before-rename":
        real_replace = os.replace

        def replace(a, b):
            if Path(b) == dst:
                _hold(marker)
            return real_replace(a, b)
        os.replace = replace
    convert(src, dst, ConvertOptions(bits=4, shard_bytes=1 << 20))


def main(argv):
    """``argv[0]``: a JSON list of jobs, run one after another, each in a fork of this
    process. The fork happens before mlx / OpenBLAS start their threads (forking a process
    whose threads may hold locks can deadlock the child), so each job pays its own imports."""
    for job in json.loads(argv[0]):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _job(job)
            except BaseException as e:  # report, then leave without running the parent's cleanup
                print(f"job {job} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"job": job[0], "stage": job[3] if job[0] == "kill" else None,
                          "status": status}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
