"""Writing checkpoints in our layout: remapped names, stamped ``qwen_mlx_format`` (so a
loader never guesses whether names were already mapped), sharded safetensors, and the
tokenizer/generation files.

Names and config follow the family's output layout (`layouts.LAYOUTS`: e.g. Qwen3-VL as
transformers names it, with a nested ``text_config``), which the loader reads back.

Crash safety: everything is written into a temp dir beside DST (``.DST.partial-PID-*``)
that is renamed to DST at the very end, so a write killed at any moment leaves no DST;
the next write to the same DST removes temp dirs whose process is gone. Shards go out
through Python file objects and are fsync'ed, so a full disk surfaces as an error
(``mx.save_safetensors`` given a path ignores failed writes) and the temp dir is removed.
"""

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import mlx.core as mx

from ..config import FORMAT_VERSION
from ..errors import QwenMLXError
from .layouts import OURS, ExpertWriter, Layout, layout_of
from .loader import Checkpoint

SHARD_BYTES = 5 << 30
_COPY = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json",
         "chat_template.jinja", "chat_template.json", "special_tokens_map.json", "added_tokens.json",
         "qwen.tiktoken", "preprocessor_config.json", "processor_config.json",
         "video_preprocessor_config.json")


class DestinationExistsError(QwenMLXError):
    """DST exists and overwriting was not asked for."""


class WriteError(QwenMLXError):
    """Writing the output failed (disk full, permissions); nothing was left behind."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(dst: Path) -> List[Path]:
    """Remove temp dirs of earlier writes to ``dst`` whose process is gone."""
    pat = re.compile(rf"^\.{re.escape(dst.name)}\.(?:partial|old)-(\d+)-")
    gone = []
    for p in dst.parent.glob(f".{dst.name}.*"):
        m = pat.match(p.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


@contextmanager
def staged_dir(dst, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir that becomes ``dst`` when the block ends without error."""
    dst = Path(dst)
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise DestinationExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(dst)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=dst.parent))
    except OSError as e:
        raise WriteError(f"cannot create the output next to {dst}: {e}") from None
    try:
        yield tmp
        if dst.exists() or dst.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-{os.getpid()}-", dir=dst.parent))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise WriteError(f"no space left on the device while writing {dst} "
                             f"(the partial output was removed): {e}") from None
        raise WriteError(f"cannot write {dst} (the partial output was removed): {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_shard(path: Path, arrays: Dict[str, mx.array]) -> None:
    with open(path, "wb") as f:
        mx.save_safetensors(f, arrays, metadata={"format": "mlx"})
        f.flush()
        os.fsync(f.fileno())


class ShardWriter:
    """Append tensors; a shard is written when adding one more would pass ``shard_bytes``
    (a tensor larger than that gets a shard of its own), under the name ``layout`` gives it
    (float MoE experts in the form ``layout.experts`` declares).
    `close` names the files ``model-0000i-of-0000N.safetensors`` (or ``model.safetensors``)
    and writes the index."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES, layout: Layout = OURS):
        self.folder, self.shard_bytes, self.layout = Path(folder), shard_bytes, layout
        self.experts = ExpertWriter(layout)
        self.pending: Dict[str, mx.array] = {}
        self.pending_bytes = self.total_bytes = 0
        self.files: List[str] = []
        self.index: Dict[str, int] = {}

    def add(self, tensors: Dict[str, mx.array]) -> None:
        self._add([x for k, v in tensors.items() for x in self.experts.push(k, v)])

    def _add(self, items) -> None:
        mx.eval([v for _, v in items])
        for k, v in items:
            k = self.layout.write_name(k)
            if self.pending and self.pending_bytes + v.nbytes > self.shard_bytes:
                self.flush()
            self.pending[k] = v
            self.pending_bytes += v.nbytes
            self.total_bytes += v.nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.files) + 1:05d}.safetensors"
        _write_shard(self.folder / name, self.pending)
        self.index.update({k: len(self.files) for k in self.pending})
        self.files.append(name)
        self.pending, self.pending_bytes = {}, 0
        mx.clear_cache()  # MLX keeps freed buffers for reuse: give them back per shard

    def close(self) -> List[str]:
        self._add(self.experts.rest())
        self.flush()
        n = len(self.files)
        final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for a, b in zip(self.files, final):
            os.replace(self.folder / a, self.folder / b)
        if n > 1:
            wmap = {k: final[i] for k, i in sorted(self.index.items())}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": wmap}, indent=1))
        self.files = final
        return final


def write_side_files(ck: Checkpoint, src: Path, out: Path, config: dict) -> None:
    """config.json (stamped, in the family's layout) plus the source's tokenizer / generation files."""
    cfg = layout_of(config).config({**config, "qwen_mlx_format": FORMAT_VERSION})
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    if ck.gguf_metadata is not None:
        _write_gguf_tokenizer(ck.gguf_metadata, out)
        return
    for f in _COPY:
        if (Path(src) / f).exists():
            shutil.copy2(Path(src) / f, out / f)


def save_checkpoint(ck: Checkpoint, src: Path, dst: Path, *, overwrite: bool = False,
                    shard_bytes: int = SHARD_BYTES, config_updates: Optional[dict] = None) -> Path:
    """Lossless: every tensor as read (quantized ones stay packed), one at a time.
    Consumes ``ck.weights`` (emptied as written) so memory stays near one shard."""
    with staged_dir(dst, overwrite=overwrite) as tmp:
        w = ShardWriter(tmp, shard_bytes, layout_of(ck.config))
        for k in sorted(ck.weights):
            w.add({k: ck.weights.pop(k)})
        w.close()
        write_side_files(ck, src, tmp, {**ck.config, **(config_updates or {})})
    return Path(dst)


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
