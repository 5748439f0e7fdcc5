"""GGML block decoders: a GGUF tensor's raw blocks -> MLX arrays, a chunk of blocks at a time.

Plain tensors are read straight into their output buffer. Block types are read in chunks
(~512 KiB of blocks and their outputs) into one reused buffer and decoded into
preallocated outputs with in-place numpy operations on uint64 lanes (8 weights' bytes at a
time, no Python per block), so temporaries stay cache-sized whatever the tensor's size.
Per type (`KINDS`):

- F32, F16, I8, I16, I32, BF16: the values themselves (BF16 as its raw bits, viewed).
- Q4_0, Q4_1, Q8_0: MLX affine triplets, group 32, float16 scales/biases (`mx.load`'s layout).
- Q4_K, Q5_0, Q5_1, Q5_K: exact MLX affine triplets, group 32, float32 scales/biases, 4 or
  5 bits. The integers are the file's; float32 holds the products exactly (Q5_K's
  ``d * sc`` is an 11-bit float16 mantissa times a 6-bit integer: 17 bits), so
  ``scale * q + bias`` in float32 equals llama.cpp's / gguf's dequantization bit for bit.
- MXFP4, NVFP4: MLX ``mxfp4`` / ``nvfp4`` pairs (`weight` uint32, `scales` uint8, no
  biases): the same scale bytes (E8M0 per 32 weights / E4M3 per 16) and the same E2M1
  codes, only the nibble order differs (ggml: byte j holds weights j and j + 16, or j + 8;
  MLX: 8 codes per word in order).
- TQ1_0, TQ2_0 (ternary, ``d * (q - 1)`` with q in 0..2, or 0..3 for TQ2_0): exact 2-bit
  affine triplets, group 128, float32 scale ``d`` and bias ``-d`` (every ``d*q - d`` is
  exact in float32; only the sign of a zero may differ from ``d * 0``).
- Everything else becomes float32: Q6_K by our decoder, the rest by `gguf.quants`.
  Q2_K, Q3_K and Q6_K scale groups of 16 weights, which MLX affine (groups of 32/64/128)
  cannot express; IQ* have no MLX equivalent.

MLX packing (checked against `mx.quantize` / `mx.dequantize`): 2, 4 and 8 bits are 16 / 8 / 4
values per little-endian uint32, the first value in the lowest bits; 5 bits packs 8 values
into 40 bits (five bytes), value i in bits 5i..5i+4, read as little-endian uint32 words.
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..errors import WeightsError
from .gguf_header import GGML_TYPES, TensorInfo

GROUP_SIZE = 32
_CHUNK = 512 << 10  # bytes of blocks + their outputs decoded at a time (about the L2 cache)

# np dtype of each output buffer; bfloat16 is carried as its raw uint16 bits
_NP = {mx.uint32: "<u4", mx.uint8: "u1", mx.float16: "<f2", mx.float32: "<f4", mx.bfloat16: "<u2",
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
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.size


@dataclass(frozen=True)
class Kind:
    parts: Tuple[Tuple[str, int, mx.Dtype], ...]  # (part, values per block, dtype)
    decode: Optional[Callable[..., None]]  # (blocks (r, bytes), *part outputs (r, values)); None: plain
    bits: int = 0  # > 0: kept quantized in MLX
    group: int = GROUP_SIZE
    mode: str = "affine"


@lru_cache(maxsize=None)
def _field(start: int, width: int, size: int) -> np.dtype:
    return np.dtype({"names": ["x"], "formats": [f"V{width}"], "offsets": [start], "itemsize": size})


def _cols(b: np.ndarray, start: int, width: int, dtype="u1") -> np.ndarray:
    """Bytes ``start:start + width`` of every block (n, bytes) as a contiguous (n, k) array of
    ``dtype``, in one copy of ``width``-byte items (a strided slice copies byte by byte)."""
    x = b.reshape(-1).view(_field(start, width, b.shape[1]))["x"]
    return np.ascontiguousarray(x).view(dtype).reshape(len(b), -1)


_U = np.uint64
_SWAP, _LO4, _LO2 = _U(0x00F000F000F000F0), _U(0x0F0F0F0F0F0F0F0F), _U(0x0303030303030303)


def _nibbles(q: np.ndarray, out: np.ndarray) -> None:
    """GGML 4-bit bytes as uint64 words ``q`` (r, m), byte j holding weight j (low nibble)
    and weight j + 8m (high nibble) -> MLX's words ``out`` (r, 2m) uint32: 8 nibbles per
    little-endian word, the first weight in the low nibble. ``q`` is overwritten.

    One delta swap exchanges the middle nibbles of every byte pair (lo_a hi_a lo_b hi_b ->
    lo_a lo_b hi_a hi_b), so each 16-bit lane holds the next two low-nibble weights in its
    low byte and the next two high-nibble weights in its high byte; the low bytes then make
    the first half of ``out`` and the high bytes the second (9 passes in all)."""
    r, m = q.shape
    t = np.right_shift(q, _U(4))
    t ^= q
    t &= _SWAP
    q ^= t
    t <<= _U(4)
    q ^= t
    h, o = q.view(np.uint16), out.view(np.uint8).reshape(r, 2, 4 * m)
    o[:, 0] = h  # the uint8 cast keeps the low byte
    h >>= 8
    o[:, 1] = h


def pack5(q: np.ndarray, out: np.ndarray) -> None:
    """5-bit values (n, 32k) -> MLX's (n, 5k) uint32 words ``out``: each run of 8 values is
    one 40-bit little-endian integer, value i in bits 5i..5i+4."""
    n = q.shape[0]
    r = q.reshape(n, -1, 8)
    v, t = r[..., 0].astype(np.uint64), np.empty(r.shape[:2], np.uint64)
    for i in range(1, 8):
        np.left_shift(r[..., i], _U(5 * i), out=t, casting="unsafe")
        v |= t
    out.view(np.uint8).reshape(n, -1, 5)[:] = v[..., None].view(np.uint8)[..., :5]


def _pack2(q: np.ndarray, out: np.ndarray) -> None:
    """2-bit values (r, 4k) uint8 -> MLX's (r, k / 4) uint32 words: byte j holds values
    4j..4j+3 at bits 0, 2, 4, 6."""
    q = q.reshape(len(q), -1, 4)
    b = out.view(np.uint8).reshape(len(q), -1)
    np.left_shift(q[..., 3], 6, out=b)
    for i in (2, 1, 0):
        b |= q[..., i] << np.uint8(2 * i)


def _f16(b, start):
    return _cols(b, start, 2, "<f2")


@lru_cache(maxsize=None)
def _times(k: int) -> np.ndarray:
    """Every float16 bit pattern -> that of its product with ``k`` in float16 (numpy's float16
    arithmetic: exact for powers of two unless it overflows to inf, as in mx.load), so
    ``_times(k)[x.view(uint16)]`` is ``x * k`` at a table lookup per value."""
    with np.errstate(over="ignore", invalid="ignore"):
        return (np.arange(1 << 16, dtype=np.uint16).view(np.float16) * np.float16(k)).view(np.uint16)


def _scaled(d: np.ndarray, k: int, out: np.ndarray) -> None:
    np.take(_times(k), d.view(np.uint16), out=out.view(np.uint16))


def _q4_0(b, w, s, z):  # d, 16 bytes: w = d*(q - 8); byte j holds weight j (low nibble), j + 16 (high)
    s[:] = _f16(b, 0)
    _scaled(s, -8, z)
    _nibbles(_cols(b, 2, 16, "<u8"), w)


def _q4_1(b, w, s, z):  # d, m, 16 bytes: w = d*q + m
    s[:], z[:] = _f16(b, 0), _f16(b, 2)
    _nibbles(_cols(b, 4, 16, "<u8"), w)


def _q8_0(b, w, s, z):  # d, 32 int8: w = d*q = d*(q + 128) - 128*d; q + 128 as a byte is q ^ 0x80
    s[:] = _f16(b, 0)
    _scaled(s, -128, z)
    np.bitwise_xor(_cols(b, 2, 32, "<u8"), _U(0x8080808080808080), out=w.view("<u8"))


# byte -> uint64 with its bit i at bit 4 of byte i: a fifth bit for each of 8 weights
_BIT4 = ((np.arange(256, dtype=np.uint64)[:, None] >> np.arange(8, dtype=np.uint64)) & _U(1)).astype(np.uint8) << 4
_BIT4 = np.ascontiguousarray(_BIT4).view("<u8")[:, 0]


def _split_nibbles(qs: np.ndarray, q: np.ndarray) -> None:
    """uint64 words ``qs`` (..., m) -> their low nibbles in ``q[..., 0, :]`` and high ones in
    ``q[..., 1, :]`` (..., 2, m), one weight per byte. ``qs`` is overwritten."""
    np.bitwise_and(qs, _LO4, out=q[..., 0, :])
    qs >>= _U(4)
    np.bitwise_and(qs, _LO4, out=q[..., 1, :])


def _q5_x(b, head: int, w):
    """Q5_0 / Q5_1 integers: qh (32 fifth bits, bit j for weight j) after ``head`` bytes, then
    16 bytes of nibbles as in Q4_0 (byte j: weight j low, weight j + 16 high) -> (n, 5) words."""
    q = np.empty((len(b), 2, 2), np.uint64)
    _split_nibbles(_cols(b, head + 4, 16, "<u8"), q)
    q.reshape(len(b), 4)[:] |= _BIT4[_cols(b, head, 4)]
    pack5(q.view(np.uint8).reshape(len(b), 32), w)


def _q5_0(b, w, s, z):  # d, qh, qs: w = d*(q - 16)
    s[:] = _f16(b, 0)
    np.multiply(s, np.float32(-16), out=z)
    _q5_x(b, 2, w)


def _q5_1(b, w, s, z):  # d, m, qh, qs: w = d*q + m
    s[:], z[:] = _f16(b, 0), _f16(b, 2)
    _q5_x(b, 4, w)


def _k_scales(b, s, z):
    """Q4_K/Q5_K super-block head: d, dmin (float16), then eight 6-bit scales and mins in
    12 bytes -> float32 scales d*sc (n, 8) and biases -dmin*m (n, 8), exact products."""
    d, dmin = _f16(b, 0).astype(np.float32), _f16(b, 2).astype(np.float32)
    x = _cols(b, 4, 12)
    lo, hi, ex = x[:, 0:4], x[:, 4:8], x[:, 8:12]
    np.multiply(d, np.concatenate([lo & 63, (ex & 15) | ((lo >> 6) << 4)], axis=1), out=s)
    np.multiply(-dmin, np.concatenate([hi & 63, (ex >> 4) | ((hi >> 6) << 4)], axis=1), out=z)


def _q4_k(b, w, s, z):
    """256 weights = 8 sub-blocks of 32: w = d*sc[j]*q - dmin*m[j]; 4-bit q in 4 chunks of
    32 bytes, chunk k holding sub-block 2k in its low nibbles and 2k + 1 in its high ones."""
    _k_scales(b, s, z)
    _nibbles(_cols(b, 16, 128, "<u8").reshape(-1, 4), w.reshape(-1, 8))


def _q5_k(b, w, s, z):
    """As Q4_K, plus a fifth bit: qh (32 bytes) bit j of byte l belongs to weight l of
    sub-block j; the nibbles follow in 4 chunks of 32 bytes as in Q4_K."""
    _k_scales(b, s, z)
    n = len(b)
    q = np.empty((n, 4, 2, 4), np.uint64)  # (chunk, nibble, word) = (sub-block, word)
    _split_nibbles(_cols(b, 48, 128, "<u8").reshape(n, 4, 4), q)
    qh, t, q = _cols(b, 16, 32, "<u8"), np.empty((n, 4), np.uint64), q.reshape(n, 8, 4)
    for j in range(8):
        np.right_shift(qh, _U(j), out=t)
        t &= _U(0x0101010101010101)
        t <<= _U(4)
        q[:, j] |= t
    pack5(q.view(np.uint8).reshape(n, 256), w)


def _q6_k(b, w):
    """256 weights = 16 sub-blocks of 16, w = d*sc[j]*(q - 32), with 6-bit q split into 4 low
    bits (128 bytes: byte 64h + l holds weight 128h + l low, 128h + 64 + l high) and 2 high
    bits (64 bytes: byte 32h + l holds weight 128h + 32i + l at bits 2i), int8 sc, float16 d.
    The bit work runs on uint64 lanes; ``(q - 32)`` is exact in float32, so one rounding
    of ``d*sc * (q - 32)`` as in ggml."""
    n = len(b)
    ql, qh = _cols(b, 0, 128, "<u8").reshape(n, 2, 8), _cols(b, 128, 64, "<u8").reshape(n, 2, 1, 4)
    q = np.empty((n, 2, 2, 8), np.uint64)  # (half, nibble, word): the bytes in weight order
    _split_nibbles(ql, q)
    hi = (qh >> np.arange(0, 8, 2, dtype=np.uint64)[:, None]) & _LO2  # (n, 2, 4 shifts, 4 words)
    hi <<= _U(4)
    q.reshape(n, 2, 4, 4)[:] |= hi
    np.copyto(w, q.view(np.uint8).reshape(n, 256))
    w -= 32
    w *= np.repeat(_f16(b, 208).astype(np.float32) * _cols(b, 192, 16, "i1"), 16, axis=1)


def _mxfp4(b, w, s):
    """e (E8M0: 2^(e - 127)), 16 bytes of E2M1 codes, byte j: weight j (low), j + 16 (high).
    ggml reads e = 255 as 2^127 where MLX (and OCP MX) reads NaN: refused, not guessed."""
    s[:] = b[:, :1]
    if (s == 255).any():
        raise ValueError("an MXFP4 block has E8M0 scale 255 (NaN in MLX's mxfp4, 2^127 in ggml), "
                         "so it cannot be kept exactly as MLX mxfp4")
    _nibbles(_cols(b, 1, 16, "<u8"), w)


def _nvfp4(b, w, s):
    """4 UE4M3 scales (one per 16 weights), then 4 x 8 bytes of E2M1 codes, byte j of sub-block
    k holding weight 16k + j (low nibble) and 16k + j + 8 (high). UE4M3 is E4M3 without its
    sign for bytes below 0x7F; ggml reads 0x7F as 0 and ignores bit 7 where MLX reads NaN
    and a sign (ggml's quantizer writes neither): refused, not guessed."""
    s[:] = b[:, :4]
    if (s >= 0x7F).any():
        raise ValueError("an NVFP4 block has a UE4M3 scale byte >= 0x7F (NaN or negative in MLX's nvfp4, "
                         "read otherwise by ggml), so it cannot be kept exactly as MLX nvfp4")
    _nibbles(_cols(b, 4, 32, "<u8").reshape(-1, 1), w.reshape(-1, 2))


_POW3 = np.array([1, 3, 9, 27, 81], np.uint8)[:, None]


def _trits(x: np.ndarray, k: int) -> np.ndarray:
    """TQ1_0's base-3 bytes (r, m) -> trits (r, k, m): trit i of byte x is the top of
    ``3 * (x * 3^i mod 256)`` / 256 (llama.cpp's fixed-point digit extraction)."""
    return ((x[:, None] * _POW3[:k]).astype(np.uint16) * 3 >> 8).astype(np.uint8)


def _ternary(q, d, w, s, z):  # 2-bit affine: w = d*q - d
    _pack2(q, w)
    s[:] = d.astype(np.float32)
    np.negative(s, out=z)


def _tq1_0(b, w, s, z):
    """48 bytes of 5 trits each (32 bytes: weights 32i + l, then 16 bytes: 160 + 16i + l),
    4 bytes of 4 trits (240 + 4i + l), float16 d: w = d * (trit - 1)."""
    q = [_trits(_cols(b, 0, 32), 5), _trits(_cols(b, 32, 16), 5), _trits(_cols(b, 48, 4), 4)]
    _ternary(np.concatenate([t.reshape(len(b), -1) for t in q], axis=1), _f16(b, 52), w, s, z)


def _tq2_0(b, w, s, z):
    """64 bytes of 2-bit q (byte 32c + l holds weights 128c + 32i + l at bits 2i), float16 d:
    w = d * (q - 1)."""
    q = (_cols(b, 0, 64).reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    _ternary(q.reshape(len(b), -1), _f16(b, 64), w, s, z)


def _gguf_kind(name: str) -> Callable:
    def decode(b, w):
        from gguf import GGMLQuantizationType, quants
        w[:] = quants.dequantize(b, GGMLQuantizationType[name])
    return decode


def _triplet(words: int, groups: int, fn, bits: int, scale=mx.float32, group=GROUP_SIZE) -> Kind:
    return Kind((("weight", words, mx.uint32), ("scales", groups, scale), ("biases", groups, scale)), fn, bits, group)


KINDS: Dict[str, Kind] = {
    **{t: Kind((("weight", 1, dt),), None)
       for t, dt in {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "I8": mx.int8,
                     "I16": mx.int16, "I32": mx.int32}.items()},
    "Q4_0": _triplet(4, 1, _q4_0, 4, mx.float16),
    "Q4_1": _triplet(4, 1, _q4_1, 4, mx.float16),
    "Q8_0": _triplet(8, 1, _q8_0, 8, mx.float16),
    "Q4_K": _triplet(32, 8, _q4_k, 4),
    "Q5_0": _triplet(5, 1, _q5_0, 5),
    "Q5_1": _triplet(5, 1, _q5_1, 5),
    "Q5_K": _triplet(40, 8, _q5_k, 5),
    "MXFP4": Kind((("weight", 4, mx.uint32), ("scales", 1, mx.uint8)), _mxfp4, 4, 32, "mxfp4"),
    "NVFP4": Kind((("weight", 8, mx.uint32), ("scales", 4, mx.uint8)), _nvfp4, 4, 16, "nvfp4"),
    "TQ1_0": _triplet(16, 2, _tq1_0, 2, group=128),
    "TQ2_0": _triplet(16, 2, _tq2_0, 2, group=128),
    "Q6_K": Kind((("weight", 256, mx.float32),), _q6_k),
    **{t: Kind((("weight", GGML_TYPES[i][1], mx.float32),), _gguf_kind(t))
       for i, (t, _, _) in GGML_TYPES.items()
       if t in {"Q2_K", "Q3_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
                "IQ4_NL", "IQ4_XS"}},
}
QUANTIZED = {t: k for t, k in KINDS.items() if k.bits}  # kept quantized in MLX
DEQUANTIZED = {t for t, k in KINDS.items() if not k.bits and k.parts[0][2] == mx.float32 and t != "F32"}
NEEDS_GGUF = DEQUANTIZED - {"Q6_K"}  # decoded by the gguf package
GROUPS_OF_16 = {"Q2_K", "Q3_K", "Q6_K"}


def layout(t: TensorInfo) -> Dict[str, TensorLayout]:
    """part -> shape and dtype of what `decode` returns for ``t``."""
    _, block, _ = GGML_TYPES[t.ggml_type]
    per_row = t.shape[-1] // block
    return {p: TensorLayout((*t.shape[:-1], per_row * n), dt) for p, n, dt in KINDS[t.type_name].parts}


def _read_into(f, buf: np.ndarray, t: TensorInfo, path) -> None:
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise WeightsError(f"GGUF file {path} is truncated: tensor '{t.name}' needs bytes up to "
                               f"{t.offset + t.nbytes} but the file ends at {f.tell()}")
        done += got


def decode(f, t: TensorInfo, path) -> Dict[str, mx.array]:
    """Read ``t``'s bytes from the open file ``f`` (plain types straight into the output,
    block types chunk by chunk) and decode them."""
    kind = KINDS[t.type_name]
    _, block, size = GGML_TYPES[t.ggml_type]
    n = t.nbytes // size
    outs = [np.empty((n, k), _NP[dt]) for _, k, dt in kind.parts]
    f.seek(t.offset)
    if kind.decode is None:
        _read_into(f, outs[0], t, path)
    else:
        step = max(1, _CHUNK // (size + sum(k * dt.size for _, k, dt in kind.parts)))  # input + outputs
        raw = np.empty((min(step, n), size), np.uint8)
        try:
            with np.errstate(over="ignore"):  # extreme float16 scales overflow to inf, as in ggml
                for i in range(0, n, step):
                    r = raw[: min(step, n - i)]
                    _read_into(f, r, t, path)
                    kind.decode(r, *[o[i : i + len(r)] for o in outs])
        except ImportError:
            raise WeightsError(f"GGUF file {path}: tensor '{t.name}' has GGML type {t.type_name}; dequantizing "
                               f"it needs the 'gguf' package (pip install gguf)") from None
        except (NotImplementedError, KeyError, ValueError) as e:
            raise WeightsError(f"GGUF file {path}: cannot decode tensor '{t.name}' ({t.type_name}): {e}") from None
    res = {}
    for (p, _, dt), out, lay in zip(kind.parts, outs, layout(t).values()):
        a = mx.array(out.reshape(lay.shape))
        res[p] = a.view(mx.bfloat16) if dt == mx.bfloat16 else a
    return res
