"""Convert a checkpoint (HF directory, GGUF file, MLX / mlx-lm directory or hub id) into
qwen_mlx's stamped layout. Without quantization options the conversion is lossless (names
remapped once, experts stacked, quantized GGUF blocks kept); with them it is
`qwen-mlx convert` (streaming, recipes, mlx-lm-compatible output).

    python convert/to_mlx.py SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2-mlx
    python convert/to_mlx.py Qwen3-0.6B ./q3-4bit --recipe mixed-4-6
"""

import argparse
import sys

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.loading.loader import load_checkpoint, resolve_model_path
from qwen_mlx.loading.writer import save_checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--overwrite", action="store_true")
    q = ap.add_argument_group("quantization (see `qwen-mlx convert --help`)")
    q.add_argument("--bits", type=int)
    q.add_argument("--group-size", type=int)
    q.add_argument("--mode")
    q.add_argument("--dtype")
    q.add_argument("--recipe")
    q.add_argument("--keep-bits")
    q.add_argument("--shard-size", default="5GB")
    a = ap.parse_args(argv)
    try:
        from qwen_mlx.cli_convert import parse_size

        if any(v is not None for v in (a.bits, a.group_size, a.mode, a.dtype, a.recipe, a.keep_bits)):
            from qwen_mlx.quant import ConvertOptions, convert

            out = convert(a.src, a.dst, ConvertOptions(
                bits=a.bits, group_size=a.group_size, mode=a.mode, dtype=a.dtype, recipe=a.recipe or "uniform",
                keep_bits=a.keep_bits, shard_bytes=parse_size(a.shard_size), overwrite=a.overwrite)).path
        else:
            src = resolve_model_path(a.src)
            out = save_checkpoint(load_checkpoint(src), src if src.is_dir() else src.parent, a.dst,
                                  overwrite=a.overwrite, shard_bytes=parse_size(a.shard_size))
    except QwenMLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
