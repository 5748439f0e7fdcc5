"""Lazy, validated safetensors reading.

The header is checked against the file size before anything is mapped, so a
truncated or corrupt shard fails with an error naming it instead of crashing later.
"""

import json
import os
import struct
from pathlib import Path
from typing import Dict, List

import mlx.core as mx

from ..errors import WeightsError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                "F8_E8M0": 1, "F4": 1}


def read_header(path: Path) -> Dict[str, dict]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise WeightsError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, info in header.items():
        try:
            b, e = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= d
            width = _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt entry for tensor '{name}' in header") from None
        need = count * width if info["dtype"] != "F4" else (count + 1) // 2
        if e - b != need or b < 0:
            raise WeightsError(f"{path}: tensor '{name}' has {e - b} bytes for shape {info['shape']}")
        if e > data:
            raise WeightsError(
                f"{path}: truncated: tensor '{name}' needs bytes up to {e} but the data section has {data}"
            )
    return header


def load_file(path: Path) -> Dict[str, mx.array]:
    read_header(path)
    try:
        return mx.load(str(path))  # lazy: memory-mapped, read on first use
    except Exception as e:  # mlx raises RuntimeError/ValueError on unreadable files
        raise WeightsError(f"{path}: cannot read safetensors file: {e}") from None


def shard_files(model_dir: Path) -> List[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: unreadable index file ({e})") from None
        files = sorted(set(wmap.values()))
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise WeightsError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors weights in {model_dir}")
    return files
