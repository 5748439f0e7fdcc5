"""GGML block decoders: a GGUF tensor's raw blocks -> MLX arrays, a chunk of blocks at a time.

Every GGML type decodes block by block into fixed-width pieces, so a tensor is read and
decoded in chunks of ~4 MiB of blocks into preallocated outputs (temporaries stay small
whatever the tensor's size). Per type (`KINDS`):

- F32, F16, I8, I16, I32, BF16: the values themselves (BF16 as its raw bits, viewed).
- Q4_0, Q4_1, Q8_0: MLX affine triplets, group 32, float16 scales/biases (`mx.load`'s layout).
- Q4_K, Q5_0, Q5_1, Q5_K: exact MLX affine triplets, group 32, float32 scales/biases, 4 or
  5 bits. The integers are the file's; float32 holds the products exactly (Q5_K's
  ``d * sc`` is an 11-bit float16 mantissa times a 6-bit integer: 17 bits), so
  ``scale * q + bias`` in float32 equals llama.cpp's / gguf's dequantization bit for bit.
- Everything else becomes float32: Q6_K by our decoder, the rest by `gguf.quants`.
  Q2_K, Q3_K and Q6_K scale groups of 16 weights, which MLX affine (groups of 32/64/128)
  cannot express; IQ*/TQ*/MXFP4/NVFP4 have no MLX affine equivalent here.

MLX affine packing (checked against `mx.dequantize`): 4 and 8 bits are 8 / 4 values per
little-endian uint32, the first value in the lowest bits; 5 bits packs 8 values into 40 bits
(five bytes), value i in bits 5i..5i+4, read as little-endian uint32 words.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import mlx.core as mx
import numpy as np

from ..errors import WeightsError
from .gguf_header import GGML_TYPES, TensorInfo

GROUP_SIZE = 32
_CHUNK = 4 << 20  # bytes of blocks decoded at a time

# np dtype of each output buffer; bfloat16 is carried as its raw uint16 bits
_NP = {mx.uint32: "<u4", mx.float16: "<f2", mx.float32: "<f4", mx.bfloat16: "<u2",
       mx.int8: "i1", mx.int16: "<i2", mx.int32: "<i4"}


@dataclass(frozen=True)
class TensorLayout:
    """Shape and dtype of a decoded part, known from the header alone."""
    shape: Tuple[int, ...]
    dtype: mx.Dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.size


@dataclass(frozen=True)
class Kind:
    parts: Tuple[Tuple[str, int, mx.Dtype], ...]  # (part, values per block, dtype)
    decode: Callable[[np.ndarray], Tuple[np.ndarray, ...]]  # (n, block bytes) -> per-part (n, values)
    bits: int = 0  # > 0: an MLX affine triplet


def _cols(b: np.ndarray, start: int, width: int, dtype="u1") -> np.ndarray:
    """Bytes ``start:start + width`` of every block (n, bytes) as a contiguous (n, k) array of
    ``dtype``, in one copy of ``width``-byte items (a strided slice copies byte by byte)."""
    dt = np.dtype({"names": ["x"], "formats": [f"V{width}"], "offsets": [start], "itemsize": b.shape[1]})
    return np.ascontiguousarray(b.reshape(-1).view(dt)["x"]).view(dtype).reshape(len(b), -1)


_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)


def _gather_nibbles(v: np.ndarray) -> np.ndarray:
    """uint64 words holding a nibble in the low half of each byte -> uint32 words holding the
    8 nibbles in order (byte k's nibble at bits 4k..4k+3)."""
    v = (v | (v >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    v = (v | (v >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    return ((v | (v >> np.uint64(16))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _pack_nibbles(v: np.ndarray) -> np.ndarray:
    """GGML 4-bit bytes as uint64 words (..., m), byte j holding weight j (low nibble) and
    weight j + 8m (high nibble) -> MLX's (..., 2m) uint32 words: 8 nibbles per little-endian
    word, the first weight in the low nibble."""
    return np.concatenate([_gather_nibbles(v & _NIBBLES), _gather_nibbles((v >> np.uint64(4)) & _NIBBLES)], axis=-1)


def pack5(q: np.ndarray) -> np.ndarray:
    """5-bit values (n, 32k) -> MLX's (n, 5k) uint32 words: each run of 8 values is one
    40-bit little-endian integer, value i in bits 5i..5i+4."""
    n = q.shape[0]
    r = q.reshape(n, -1, 8)
    v = r[..., 0].astype(np.uint64)
    for i in range(1, 8):
        v |= r[..., i].astype(np.uint64) << np.uint64(5 * i)
    return np.ascontiguousarray(v[..., None].view(np.uint8)[..., :5]).reshape(n, -1).view("<u4")


def _q4_0(b):  # d, 16 bytes: w = d*(q - 8); byte j holds weight j (low nibble), j + 16 (high)
    d = _cols(b, 0, 2, "<f2")
    return _pack_nibbles(_cols(b, 2, 16, "<u8")), d, (d.astype(np.float32) * -8).astype(np.float16)


def _q4_1(b):  # d, m, 16 bytes: w = d*q + m
    return _pack_nibbles(_cols(b, 4, 16, "<u8")), _cols(b, 0, 2, "<f2"), _cols(b, 2, 2, "<f2")


def _q8_0(b):  # d, 32 int8: w = d*q = d*(q + 128) - 128*d; q + 128 as a byte is q ^ 0x80
    d = _cols(b, 0, 2, "<f2")
    q = _cols(b, 2, 32, "<u8") ^ np.uint64(0x8080808080808080)
    return q.view("<u4"), d, (d.astype(np.float32) * -128).astype(np.float16)


def _q5_x(b, head: int):
    """Q5_0 / Q5_1 integers: qh (32 fifth bits, bit j for weight j) after ``head`` bytes, then
    16 bytes of nibbles as in Q4_0 (byte j: weight j low, weight j + 16 high) -> (n, 5) words."""
    qs = _cols(b, head + 4, 16)
    hb = (_cols(b, head, 4, "<u4") >> np.arange(32, dtype=np.uint32)) & 1
    return pack5(np.concatenate([qs & 15, qs >> 4], axis=1) | (hb.astype(np.uint8) << 4))


def _q5_0(b):  # d, qh, qs: w = d*(q - 16)
    d = _cols(b, 0, 2, "<f2").astype(np.float32)
    return _q5_x(b, 2), d, d * -16


def _q5_1(b):  # d, m, qh, qs: w = d*q + m
    return _q5_x(b, 4), _cols(b, 0, 2, "<f2").astype(np.float32), _cols(b, 2, 2, "<f2").astype(np.float32)


def _k_scales(b):
    """Q4_K/Q5_K super-block head: d, dmin (float16), then eight 6-bit scales and mins in
    12 bytes -> float32 scales d*sc (n, 8) and biases -dmin*m (n, 8), exact products."""
    d, dmin = _cols(b, 0, 2, "<f2").astype(np.float32), _cols(b, 2, 2, "<f2").astype(np.float32)
    s = _cols(b, 4, 12)
    lo, hi, ex = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (ex & 15) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([hi & 63, (ex >> 4) | ((hi >> 6) << 4)], axis=1)
    return d * sc, -dmin * mn


def _q4_k(b):
    """256 weights = 8 sub-blocks of 32: w = d*sc[j]*q - dmin*m[j]; 4-bit q in 4 chunks of
    32 bytes, chunk k holding sub-block 2k in its low nibbles and 2k + 1 in its high ones."""
    qs = _cols(b, 16, 128, "<u8").reshape(-1, 4, 4)  # 4 chunks of 4 words
    return (_pack_nibbles(qs).reshape(len(b), -1), *_k_scales(b))


def _q5_k(b):
    """As Q4_K, plus a fifth bit: qh (32 bytes) bit j of byte l belongs to weight l of
    sub-block j; the nibbles follow in 4 chunks of 32 bytes as in Q4_K."""
    qs = _cols(b, 48, 128).reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32)
    q |= ((_cols(b, 16, 32)[:, None] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4
    return (pack5(q.reshape(len(b), -1)), *_k_scales(b))


def _q6_k(b):
    """256 weights = 16 sub-blocks of 16, w = d*sc[j]*(q - 32), with 6-bit q split into 4 low
    bits (128 bytes) and 2 high bits (64 bytes), int8 sc, float16 d."""
    ql, qh = _cols(b, 0, 128).reshape(-1, 2, 64), _cols(b, 128, 64).reshape(-1, 2, 32)
    low = np.concatenate([ql & 15, ql >> 4], axis=-1)
    high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(-1, 16, 16)
    scale = _cols(b, 208, 2, "<f2").astype(np.float32) * _cols(b, 192, 16, "i1").astype(np.float32)
    return ((scale[..., None] * q).reshape(len(b), 256),)


def _gguf_kind(name: str) -> Callable:
    def decode(b):
        from gguf import GGMLQuantizationType, quants
        return (quants.dequantize(b, GGMLQuantizationType[name]).astype(np.float32, copy=False),)
    return decode


def _triplet(words: int, groups: int, fn, bits: int, scale=mx.float32) -> Kind:
    return Kind((("weight", words, mx.uint32), ("scales", groups, scale), ("biases", groups, scale)), fn, bits)


KINDS: Dict[str, Kind] = {
    **{t: Kind((("weight", 1, dt),), lambda b, dt=dt: (b.view(_NP[dt]),))
       for t, dt in {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "I8": mx.int8,
                     "I16": mx.int16, "I32": mx.int32}.items()},
    "Q4_0": _triplet(4, 1, _q4_0, 4, mx.float16),
    "Q4_1": _triplet(4, 1, _q4_1, 4, mx.float16),
    "Q8_0": _triplet(8, 1, _q8_0, 8, mx.float16),
    "Q4_K": _triplet(32, 8, _q4_k, 4),
    "Q5_0": _triplet(5, 1, _q5_0, 5),
    "Q5_1": _triplet(5, 1, _q5_1, 5),
    "Q5_K": _triplet(40, 8, _q5_k, 5),
    "Q6_K": Kind((("weight", 256, mx.float32),), _q6_k),
    **{t: Kind((("weight", GGML_TYPES[i][1], mx.float32),), _gguf_kind(t))
       for i, (t, _, _) in GGML_TYPES.items()
       if t in {"Q2_K", "Q3_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
                "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4"}},
}
QUANT_BITS = {t: k.bits for t, k in KINDS.items() if k.bits}  # kept as MLX triplets
DEQUANTIZED = {t for t, k in KINDS.items() if not k.bits and k.parts[0][2] == mx.float32 and t != "F32"}
NEEDS_GGUF = DEQUANTIZED - {"Q6_K"}  # decoded by the gguf package
GROUPS_OF_16 = {"Q2_K", "Q3_K", "Q6_K"}


def layout(t: TensorInfo) -> Dict[str, TensorLayout]:
    """part -> shape and dtype of what `decode` returns for ``t``."""
    _, block, _ = GGML_TYPES[t.ggml_type]
    per_row = t.shape[-1] // block
    return {p: TensorLayout((*t.shape[:-1], per_row * n), dt) for p, n, dt in KINDS[t.type_name].parts}


def decode(f, t: TensorInfo, path) -> Dict[str, mx.array]:
    """Read ``t``'s blocks from the open file ``f`` chunk by chunk and decode them."""
    kind = KINDS[t.type_name]
    _, block, size = GGML_TYPES[t.ggml_type]
    n = t.nbytes // size
    step = max(1, _CHUNK // size)
    outs = [np.empty((n, k), _NP[dt]) for _, k, dt in kind.parts] if n > step else None
    f.seek(t.offset)
    for i in range(0, n, step):
        raw = np.empty((min(step, n - i), size), np.uint8)
        got = f.readinto(raw)
        if got != raw.nbytes:
            raise WeightsError(f"GGUF file {path} is truncated: tensor '{t.name}' needs bytes up to "
                               f"{t.offset + t.nbytes} but the file ends at {f.tell()}")
        try:
            pieces = kind.decode(raw)
            if outs is None:  # one chunk: no copy
                outs = pieces
            else:
                for out, piece in zip(outs, pieces):
                    out[i : i + len(raw)] = piece.reshape(len(raw), -1)
        except ImportError:
            raise WeightsError(f"GGUF file {path}: tensor '{t.name}' has GGML type {t.type_name}; dequantizing "
                               f"it needs the 'gguf' package (pip install gguf)") from None
        except (NotImplementedError, KeyError, ValueError) as e:
            raise WeightsError(f"GGUF file {path}: cannot decode tensor '{t.name}' ({t.type_name}): {e}") from None
    res = {}
    for (p, _, dt), out, (_, lay) in zip(kind.parts, outs, layout(t).items()):
        a = mx.array(out.astype(_NP[dt], copy=False).reshape(lay.shape))
        res[p] = a.view(mx.bfloat16) if dt == mx.bfloat16 else a
    return res
