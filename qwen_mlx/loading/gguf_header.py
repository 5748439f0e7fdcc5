"""A small pure-Python GGUF header walker: validate a file before trusting it.

It reads the key/value metadata and the tensor infos (name, shape, GGML type,
offset) of a GGUF v2/v3 file, computes each tensor's byte extent from its
type's block size and checks that the file holds every byte. No tensor data
is read, so it is cheap even for multi-gigabyte files (the file is mmapped).
"""

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from ..errors import ModelNotFoundError, WeightsError

# ggml type id -> (name, elements per block, bytes per block), per ggml.h.
GGML_TYPES: Dict[int, Tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

# GGUF metadata value types: id -> struct format (8 string, 9 array handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass
class TensorInfo:
    name: str
    shape: Tuple[int, ...]  # numpy/MLX order (GGUF's ne reversed): (rows, ..., cols)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: Dict[str, Any]
    tensors: Dict[str, TensorInfo] = field(default_factory=dict)
    alignment: int = 32
    data_offset: int = 0
    file_size: int = 0


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > len(self.buf):
            raise WeightsError(
                f"GGUF file {self.path} is truncated/corrupt: {what} needs bytes up to "
                f"{self.pos + n} but file has {len(self.buf)}"
            )

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self, what: str) -> str:
        n = self.unpack("Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", "surrogateescape")
        self.pos += n
        return s

    def strings(self, count: int, what: str) -> List[str]:
        """``count`` strings in a row (a tokenizer's vocabulary: ~10^5) in one tight loop;
        on a bad length, `string` raises the same error as for a single string."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            n = unpack(buf, pos)[0] if pos + 8 <= end else end
            if pos + 8 + n > end:
                self.pos = pos
                self.string(what)  # raises
            out.append(str(buf[pos + 8 : pos + 8 + n], "utf-8", "surrogateescape"))
            pos += 8 + n
        self.pos = pos
        return out

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype == 9:
            etype, count = self.unpack("IQ", what)
            if etype in _NP:
                size = np.dtype(_NP[etype]).itemsize
                self.need(count * size, what)
                arr = np.frombuffer(self.buf, _NP[etype], count, self.pos)
                self.pos += count * size
                return arr.tolist()
            if etype == 8:
                self.need(count * 8, what)  # each string is at least its 8-byte length
                return self.strings(count, what)
            if etype == 9:
                return [self.value(9, what) for _ in range(count)]
            raise WeightsError(f"GGUF file {self.path} is corrupt: {what} has unknown array type {etype}")
        raise WeightsError(f"GGUF file {self.path} is corrupt: {what} has unknown value type {vtype}")


def tensor_nbytes(shape: Tuple[int, ...], ggml_type: int) -> int:
    _, block, size = GGML_TYPES[ggml_type]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def read_header(path) -> GGUFHeader:
    """Walk the header of `path`; raise WeightsError on anything truncated or insane."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        size = path.stat().st_size
        if size < 24:
            raise WeightsError(f"GGUF file {path} is truncated/corrupt: {size} bytes is shorter than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            with memoryview(mm) as buf:
                try:
                    return _walk(_Cursor(buf, path), size)
                except (ValueError, OverflowError, struct.error) as e:
                    raise WeightsError(f"GGUF file {path} is corrupt: {e}") from None


def _walk(c: _Cursor, size: int) -> GGUFHeader:
    path = c.path
    magic = bytes(c.buf[:4])
    if magic != b"GGUF":
        raise WeightsError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    c.pos = 4
    version = c.unpack("I", "version")
    if version not in (2, 3):
        if version in (2 << 24, 3 << 24):
            raise WeightsError(f"GGUF file {path} is big-endian, which is not supported")
        raise WeightsError(f"GGUF file {path} has unsupported version {version} (supported: 2, 3)")
    n_tensors, n_kv = c.unpack("QQ", "counts")
    # every KV pair takes >= 12 bytes and every tensor info >= 24: reject absurd counts early
    if n_kv * 12 + n_tensors * 24 > size:
        raise WeightsError(
            f"GGUF file {path} is truncated/corrupt: header claims {n_kv} metadata keys and "
            f"{n_tensors} tensors but file has {size} bytes"
        )
    meta: Dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        vtype = c.unpack("I", f"metadata '{key}'")
        meta[key] = c.value(vtype, f"metadata '{key}'")
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise WeightsError(f"GGUF file {path} is corrupt: general.alignment {align!r} is not a power of two")
    infos: List[Tuple[str, Tuple[int, ...], int, int]] = []
    for i in range(n_tensors):
        name = c.string(f"tensor info #{i}")
        n_dims = c.unpack("I", f"tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise WeightsError(f"GGUF file {path} is corrupt: tensor '{name}' has {n_dims} dimensions")
        ne = c.unpack("Q" * n_dims, f"tensor '{name}'")
        ne = ne if isinstance(ne, tuple) else (ne,)
        gtype, off = c.unpack("IQ", f"tensor '{name}'")
        infos.append((name, tuple(reversed(ne)), gtype, off))
    data_offset = -(-c.pos // align) * align
    tensors: Dict[str, TensorInfo] = {}
    for name, shape, gtype, off in infos:
        if gtype not in GGML_TYPES:
            raise WeightsError(f"GGUF file {path}: tensor '{name}' has unknown GGML type id {gtype}")
        tname, block, _ = GGML_TYPES[gtype]
        if shape[-1] % block:
            raise WeightsError(
                f"GGUF file {path} is corrupt: tensor '{name}' row length {shape[-1]} is not a "
                f"multiple of the {tname} block size {block}"
            )
        if off % align:
            raise WeightsError(f"GGUF file {path} is corrupt: tensor '{name}' offset {off} is not {align}-aligned")
        if name in tensors:
            raise WeightsError(f"GGUF file {path} is corrupt: tensor '{name}' appears twice")
        t = TensorInfo(name, shape, gtype, data_offset + off, tensor_nbytes(shape, gtype))
        if t.offset + t.nbytes > size:
            raise WeightsError(
                f"GGUF file {path} is truncated/corrupt: tensor '{name}' needs bytes up to "
                f"{t.offset + t.nbytes} but file has {size}"
            )
        tensors[name] = t
    spans = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(spans, spans[1:]):
        if a.offset + a.nbytes > b.offset:
            raise WeightsError(f"GGUF file {path} is corrupt: tensors '{a.name}' and '{b.name}' overlap")
    return GGUFHeader(path, version, meta, tensors, align, data_offset, size)
