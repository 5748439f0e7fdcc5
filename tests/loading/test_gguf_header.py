"""The pure-Python GGUF header walker against the `gguf` package's reader."""

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGUFValueType as VT  # noqa: E402

from qwen_mlx.defaults import default_model_path  # noqa: E402
from qwen_mlx.errors import ModelNotFoundError, WeightsError  # noqa: E402
from qwen_mlx.loading.gguf_header import read_header, tensor_nbytes  # noqa: E402


@pytest.fixture(scope="module")
def real_path():
    try:
        return default_model_path(fetch=False)  # no network in tests
    except ModelNotFoundError as e:
        pytest.skip(f"default model not cached: {e}")


def test_real_file_matches_gguf_reader(real_path):
    h = read_header(real_path)
    r = gguf.GGUFReader(real_path)
    assert h.version == 3 and h.alignment == 32 and h.data_offset == r.data_offset
    assert list(h.tensors) == [t.name for t in r.tensors]
    for t in r.tensors:
        ours = h.tensors[t.name]
        assert ours.shape == tuple(int(d) for d in reversed(t.shape)), t.name
        assert (ours.ggml_type, ours.offset, ours.nbytes) == (int(t.tensor_type), t.data_offset, t.n_bytes), t.name
    skip = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    assert set(h.metadata) == set(r.fields) - skip
    for k, f in r.fields.items():
        if k not in skip:
            want = f.contents()
            got = h.metadata[k]
            if isinstance(want, float):
                assert got == pytest.approx(want, rel=1e-7), k
            else:
                assert got == want, k
    assert len(h.metadata["tokenizer.ggml.tokens"]) == 49152
    assert h.metadata["tokenizer.ggml.merges"][0] == "Ġ t"


def test_every_value_type(tmp_path):
    path = tmp_path / "kv.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    vals = {
        "t.u8": (7, VT.UINT8), "t.i8": (-7, VT.INT8), "t.u16": (60000, VT.UINT16), "t.i16": (-300, VT.INT16),
        "t.u32": (4_000_000_000, VT.UINT32), "t.i32": (-5, VT.INT32), "t.f32": (0.5, VT.FLOAT32),
        "t.bool": (True, VT.BOOL), "t.str": ("héllo ✓", VT.STRING), "t.u64": (2**40 + 3, VT.UINT64),
        "t.i64": (-(2**40), VT.INT64), "t.f64": (1e300, VT.FLOAT64),
    }
    for k, (v, t) in vals.items():
        w.add_key_value(k, v, t)
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.strs", ["a", "", "ß"])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_custom_alignment(64)
    w.add_tensor("a.weight", np.arange(96, dtype=np.float32).reshape(3, 32))
    w.add_tensor("b.weight", np.ones((5,), np.float16))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    h = read_header(path)
    for k, (v, _) in vals.items():
        assert h.metadata[k] == v, k
    assert h.metadata["t.ints"] == [1, -2, 3] and h.metadata["t.strs"] == ["a", "", "ß"]
    assert h.metadata["t.nested"] == [[1, 2], [3]]
    assert h.alignment == 64 and h.data_offset % 64 == 0
    a, b = h.tensors["a.weight"], h.tensors["b.weight"]
    assert (a.shape, a.type_name, a.nbytes, b.shape, b.type_name, b.nbytes) == ((3, 32), "F32", 384, (5,), "F16", 10)
    raw = path.read_bytes()
    assert np.frombuffer(raw, np.float32, 96, a.offset).tolist() == list(range(96))
    assert b.offset % 64 == 0 and b.offset + b.nbytes <= len(raw)


def test_block_sizes():
    assert tensor_nbytes((576, 1536), 3) == 576 * 1536 // 32 * 20  # Q4_1
    assert tensor_nbytes((4, 256), 12) == 4 * 144  # Q4_K
    assert tensor_nbytes((2, 3, 64), 8) == 6 * 2 * 34  # Q8_0


def _header(version=3, n_tensors=0, n_kv=0):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


@pytest.mark.parametrize(
    "blob, msg",
    [
        (b"", "shorter than a GGUF header"),
        (b"GGML" + bytes(40), "not a GGUF file"),
        (_header(version=1), "unsupported version 1"),
        (_header(n_kv=10**9), "claims 1000000000 metadata keys"),
        (_header(n_kv=1) + struct.pack("<Q", 50) + b"abc", "metadata key #0 needs bytes up to 82 but file has 35"),
        (_header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99) + bytes(8), "unknown value type 99"),
        (_header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**40), "metadata 'k' needs bytes"),
        # string arrays: a length running past the end, then a file ending inside a length
        (_header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2) + struct.pack("<Q", 1) + b"a"
         + struct.pack("<Q", 100) + bytes(12), "metadata 'k' needs bytes up to 166 but file has 78"),
        (_header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2) + struct.pack("<Q", 10)
         + b"abcdefghij" + bytes(4), "metadata 'k' needs bytes up to 75 but file has 71"),
        (_header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 9) + bytes(40), "has 9 dimensions"),
        (_header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 8, 77, 0) + bytes(64), "unknown GGML type id 77"),
        (_header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 31, 2, 0) + bytes(64), "not a multiple of the Q4_0 block size"),
        (_header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 8, 0, 4) + bytes(64), "not 32-aligned"),
        (_header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 64, 0, 0) + bytes(64), "tensor 't' needs bytes up to 320 but file has"),
        (_header(n_tensors=2) + (struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 8, 0, 0)) * 2 + bytes(64), "appears twice"),
        # a Q4_0 tensor of 64 weights (2 blocks, 36 bytes) runs into the next tensor at byte 32
        (_header(n_tensors=2) + struct.pack("<Q", 1) + b"a" + struct.pack("<IQIQ", 1, 64, 2, 0) + struct.pack("<Q", 1)
         + b"b" + struct.pack("<IQIQ", 1, 8, 0, 32) + bytes(128), "tensors 'a' and 'b' overlap"),
    ],
)
def test_bad_headers(tmp_path, blob, msg):
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    with pytest.raises(WeightsError, match=msg) as e:
        read_header(path)
    assert str(path) in str(e.value)


def test_empty_array_and_no_tensors(tmp_path):
    path = tmp_path / "e.gguf"
    path.write_bytes(_header(n_kv=1) + struct.pack("<Q", 1) + b"e" + struct.pack("<IIQ", 9, 5, 0))
    h = read_header(path)
    assert h.metadata == {"e": []} and h.tensors == {}


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        read_header(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError):
        read_header(tmp_path)  # a directory
