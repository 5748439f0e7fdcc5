"""Pieces shared by the GPTQ / AWQ / FP8 importers: bit streams, MLX group choice, the
``quantization`` config block.

MLX packs a quantized row as one little-endian bit stream: element j of a row occupies
bits [j*b, (j+1)*b) of the row's bytes, for every b in 2..8 (3, 5 and 6 bits straddle
words). GPTQ packs each column of ``qweight`` the same way, so its integers move to MLX by
a transpose, never through floats.
"""

import re
from collections import Counter
from typing import Dict, NamedTuple, Optional

import mlx.core as mx
import numpy as np

from ...errors import WeightsError
from ...quant.spec import QuantizationError
from ..remap import RENAME, STACK, Rules

MLX_GROUPS = (128, 64, 32)  # affine group sizes MLX implements, largest first


class Layout(NamedTuple):
    bits: int
    group_size: int
    mode: str = "affine"

    def config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def to_numpy(x: mx.array, what: str) -> np.ndarray:
    """A (small) tensor as numpy; floats as float32 (numpy has no bfloat16)."""
    if mx.issubdtype(x.dtype, mx.floating):
        x = x.astype(mx.float32)
    try:
        return np.array(x)
    except (RuntimeError, ValueError) as e:
        raise WeightsError(f"cannot read tensor '{what}': {e}") from None


def is_integer(x: mx.array) -> bool:
    return mx.issubdtype(x.dtype, mx.integer)


def unpack_bits(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first ``n`` ``bits``-wide unsigned integers of the little-endian bit stream made
    by each row (last axis) of integer ``words`` -> int32 ``[..., n]``.

    >>> unpack_bits(np.array([0x76543210], np.int32), 4, 8)
    array([0, 1, 2, 3, 4, 5, 6, 7], dtype=int32)
    """
    b = np.unpackbits(np.ascontiguousarray(words).astype(words.dtype.newbyteorder("<")).view(np.uint8),
                      axis=-1, bitorder="little")[..., : n * bits]
    b = b.reshape(*b.shape[:-1], n, bits).astype(np.int32)
    return (b << np.arange(bits, dtype=np.int32)).sum(-1, dtype=np.int32)


def mlx_group(g_idx: np.ndarray, n_in: int) -> Optional[int]:
    """The largest MLX group size g (128, 64, 32) such that ``g_idx`` (the source group of
    each input row) is constant on every aligned run of g rows; None if there is none.
    Then MLX group j takes the source group ``g_idx[j * g]``, exactly."""
    for g in MLX_GROUPS:
        if n_in % g == 0 and (g_idx.reshape(-1, g) == g_idx[::g, None]).all():
            return g
    return None


def canonical_path(path: str, rules: Optional[Rules] = None) -> str:
    """The module path `remap_weights` gives ``path``'s weight: the family's renames, then
    per-expert paths -> the stacked ``switch_mlp`` one."""
    name = path + ".weight"
    for pattern, repl in (*(rules.rename if rules else ()), *RENAME):
        name = re.sub(pattern, repl, name) if re.match(pattern, name) else name
    for pattern, repl in STACK:
        if re.match(pattern, name):
            name = re.sub(pattern, repl, name)
            break
    return name[: -len(".weight")]


def quantization_block(layouts: Dict[str, Layout], rules: Optional[Rules] = None) -> Optional[dict]:
    """mlx-lm's ``quantization`` block: the most common layout, plus per-module entries
    (under the remapped module paths) where a module differs. Stacked experts must share
    one layout."""
    if not layouts:
        return None
    merged: Dict[str, Layout] = {}
    for path, lay in layouts.items():
        c = canonical_path(path, rules)
        if merged.setdefault(c, lay) != lay:
            raise QuantizationError(
                f"experts of '{c}' are packed with different layouts ({merged[c]} vs {lay}); "
                f"they cannot be stacked into one tensor")
    common = Counter(merged.values()).most_common(1)[0][0]
    q = common.config()
    q.update({p: lay.config() for p, lay in sorted(merged.items()) if lay != common})
    return q
