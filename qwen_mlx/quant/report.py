"""Calibration-free quality report: per-tensor relative weight error (collected while
converting, see `convert`) and the perplexity of the source and the converted model on a
text file.

Perplexity is ``exp(mean NLL)`` of every token but the first, the text cut into windows
of ``window`` scored tokens (each window starts with the previous one's last token as
context), computed in float32 with our loader and model for both sides.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import QwenMLXError


@dataclass
class Perplexity:
    tokens: int  # scored tokens
    source: float
    converted: float


def text_ids(path, text: str) -> List[int]:
    """Token ids of ``text`` with the tokenizer of checkpoint ``path`` (dir or GGUF)."""
    from ..loading.loader import load_checkpoint, resolve_model_path
    from ..tokenizer import load_tokenizer, tokenizer_from_gguf

    p = resolve_model_path(path)
    if p.is_file():
        tok = tokenizer_from_gguf(load_checkpoint(p).gguf_metadata)
    else:
        tok = load_tokenizer(p)
    return tok.encode(text)


def perplexity(model: nn.Module, ids: List[int], window: int = 512) -> float:
    if len(ids) < 2:
        raise QwenMLXError(f"need at least 2 tokens to measure perplexity, got {len(ids)}")
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s: s + window + 1]
        x = mx.array(chunk)[None]
        logits = model(x[:, :-1]).astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, x[:, 1:], reduction="sum")
        nll += loss.item()
        n += len(chunk) - 1
    return float(mx.exp(mx.array(nll / n)).item())


def compare_perplexity(src, dst, text: str, window: int = 512,
                       source_ppl: Optional[float] = None) -> Perplexity:
    """Perplexity of ``src`` (dequantized to float32) and of the converted ``dst`` on ``text``.
    The converted model runs its quantized weights (dequantized once on the CPU backend,
    which is the same arithmetic); pass ``source_ppl`` to skip re-measuring the source."""
    from ..loading.loader import load_model

    ids = text_ids(dst, text)
    if source_ppl is None:
        m = load_model(src, dtype=mx.float32, dequantize=True)
        source_ppl = perplexity(m, ids, window)
        del m
    m = load_model(dst, dtype=mx.float32)
    conv = perplexity(m, ids, window)
    return Perplexity(len(ids) - 1, source_ppl, conv)


def error_summary(errors) -> Dict[str, Dict[str, float]]:
    """Per spec: tensor count, mean and max relative error."""
    out: Dict[str, Dict[str, float]] = {}
    for e in errors:
        d = out.setdefault(e.spec, {"tensors": 0, "mean": 0.0, "max": 0.0})
        d["tensors"] += 1
        d["mean"] += e.rel_err
        d["max"] = max(d["max"], e.rel_err)
    for d in out.values():
        d["mean"] /= d["tensors"]
    return out


def read_text(path) -> str:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QwenMLXError(f"cannot read --eval-text file {p}: {e}") from None
    if not text.strip():
        raise QwenMLXError(f"--eval-text file {p} is empty")
    return text
