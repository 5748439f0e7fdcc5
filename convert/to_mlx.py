"""Lossless conversion of a checkpoint (HF directory, GGUF file or hub id) into qwen_mlx's
stamped layout: names remapped once, experts stacked, quantized GGUF blocks kept.

    python convert/to_mlx.py SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2-mlx
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
    a = ap.parse_args(argv)
    try:
        src = resolve_model_path(a.src)
        out = save_checkpoint(load_checkpoint(src), src if src.is_dir() else src.parent, a.dst,
                              overwrite=a.overwrite)
    except QwenMLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
