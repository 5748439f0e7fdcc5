"""Writing checkpoints in our layout: remapped names, stamped ``qwen_mlx_format`` (so a
loader never guesses whether names were already mapped), sharded safetensors, and the
tokenizer/generation files. Written into a temp dir beside DST, renamed at the end: an
interrupted write leaves no DST."""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx

from ..config import FORMAT_VERSION
from ..errors import QwenMLXError
from .loader import Checkpoint

SHARD_BYTES = 5 << 30
_COPY = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json",
         "chat_template.jinja", "chat_template.json", "special_tokens_map.json", "qwen.tiktoken")


def _shards(weights: Dict[str, mx.array], limit: int):
    shard, size = {}, 0
    for k in sorted(weights):
        if shard and size + weights[k].nbytes > limit:
            yield shard
            shard, size = {}, 0
        shard[k] = weights[k]
        size += weights[k].nbytes
    if shard:
        yield shard


def save_checkpoint(ck: Checkpoint, src: Path, dst: Path, *, overwrite: bool = False,
                    shard_bytes: int = SHARD_BYTES, config_updates: Optional[dict] = None) -> Path:
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise QwenMLXError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        names = list(_shards(ck.weights, shard_bytes))
        index = {}
        for i, shard in enumerate(names):
            fname = "model.safetensors" if len(names) == 1 else f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
            mx.save_safetensors(str(tmp / fname), shard, metadata={"format": "mlx"})
            index.update({k: fname for k in shard})
        if len(names) > 1:
            total = sum(w.nbytes for w in ck.weights.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": index}, indent=1))
        cfg = {**ck.config, **(config_updates or {}), "qwen_mlx_format": FORMAT_VERSION}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        if ck.gguf_metadata is not None:
            _write_gguf_tokenizer(ck.gguf_metadata, tmp)
        else:
            for f in _COPY:
                if (Path(src) / f).exists():
                    shutil.copy2(Path(src) / f, tmp / f)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_gguf_tokenizer(meta: dict, out: Path) -> None:
    from ..tokenizer import tokenizer_from_gguf

    tok = tokenizer_from_gguf(meta)
    tok.backend.save(str(out / "tokenizer.json"))
    cfg = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token") if getattr(tok, k, None)}
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    if tok.eos_token_ids:
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(tok.eos_token_ids)}))
