"""Bad input: unknown quantization types, inconsistent packed tensors, a DST that exists,
a full disk. Each fails with a QwenMLXError naming the problem and leaves nothing behind."""

import errno
import json
import shutil

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from qwen_mlx import QwenMLXError, load_model
from qwen_mlx.loading import writer
from qwen_mlx.loading.loader import build_model
from qwen_mlx.quant import ConvertOptions, QuantizationError, convert

CFG = dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=256,
           tie_word_embeddings=False, torch_dtype="float32")
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "float"
    path.mkdir()
    w = dict(tree_flatten(build_model(CFG).parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), w)
    (path / "config.json").write_text(json.dumps(CFG))
    return path


@pytest.fixture(scope="module")
def q4_dir(float_dir):
    return convert(float_dir, float_dir.parent / "q4", ConvertOptions(bits=4)).path


def tamper(src, dst, edit_weights=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_weights:
        w = mx.load(str(dst / "model.safetensors"))
        edit_weights(w)
        mx.save_safetensors(str(dst / "model.safetensors"), w)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def fails_both(path, tmp_path, match):
    """Loading and converting both refuse it, and the conversion writes nothing."""
    with pytest.raises(QwenMLXError, match=match):
        load_model(path, dequantize=False)
    with pytest.raises(QwenMLXError, match=match):
        load_model(path, dequantize=True)
    with pytest.raises(QwenMLXError, match=match):
        convert(path, tmp_path / "out", ConvertOptions(bits=8))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_unknown_quantization_type(q4_dir, tmp_path):
    bad = tamper(q4_dir, tmp_path / "m", edit_config=lambda c: c["quantization"].update(mode="int3"))
    fails_both(bad, tmp_path, "unknown quantization mode 'int3' for tensor 'model\\.[a-z_.0-9]+' "
                              "\\(known: affine, mxfp4, nvfp4, mxfp8\\)")
    bad = tamper(q4_dir, tmp_path / "b", edit_config=lambda c: c["quantization"].update({Q: {"bits": 7}}))
    fails_both(bad, tmp_path, f"tensor '{Q}': config says bits=7 but the packed shapes give 4")


def test_mode_and_scale_dtype_disagree(q4_dir, tmp_path):
    def to_uint8(w):
        w[f"{Q}.scales"] = w[f"{Q}.scales"].astype(mx.uint8)
    bad = tamper(q4_dir, tmp_path / "u8", edit_weights=to_uint8)
    fails_both(bad, tmp_path, f"'{Q}': affine needs float scales and biases, got .*uint8 scales")
    bad = tamper(q4_dir, tmp_path / "u8b", edit_weights=lambda w: (to_uint8(w), w.pop(f"{Q}.biases")),
                 edit_config=lambda c: c["quantization"].pop("mode"))
    fails_both(bad, tmp_path, f"'{Q}': uint8 scales with 4 bits and group size 64 match no quantization mode")


@pytest.mark.parametrize("edit,match", [
    (lambda w: [w.__setitem__(f"{Q}.{k}", mx.concatenate([w[f"{Q}.{k}"]] * 3, axis=-1)) for k in ("scales", "biases")],
     f"'{Q}': packed shape \\(128, 8\\) with scales \\(128, 3\\) does not fit input size 64"),
    (lambda w: w.__setitem__(f"{Q}.weight", w[f"{Q}.weight"][:, :5]),
     f"'{Q}': packed shape \\(128, 5\\) with scales \\(128, 1\\) does not fit input size 64"),
    (lambda w: w.__setitem__(f"{Q}.biases", w[f"{Q}.biases"][:64]),
     f"'{Q}': inconsistent shapes weight \\(128, 8\\), scales \\(128, 1\\), biases \\(64, 1\\)"),
    (lambda w: [w.__setitem__(f"{Q}.{k}", w[f"{Q}.{k}"][:96]) for k in ("weight", "scales", "biases")],
     f"'{Q}.*has .*\\(96"),
    (lambda w: w.__setitem__(f"{Q}.weight", w[f"{Q}.weight"].astype(mx.int32)),
     f"'{Q}': packed weight has dtype mlx.core.int32, expected uint32"),
])
def test_inconsistent_packed_shapes(q4_dir, tmp_path, edit, match):
    fails_both(tamper(q4_dir, tmp_path / "m", edit_weights=edit), tmp_path, match)


def test_packed_but_declared_float(q4_dir, tmp_path):
    bad = tamper(q4_dir, tmp_path / "m", edit_config=lambda c: c["quantization"].update({Q: False}))
    fails_both(bad, tmp_path, f"quantized tensor '{Q}' is declared unquantized \\(false\\) in config.json")


def test_destination_checks(float_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(writer.DestinationExistsError, match="taken exists .*--overwrite"):
        convert(float_dir, tmp_path / "taken", ConvertOptions(bits=4))
    with pytest.raises(QwenMLXError, match="is \\(inside\\) the source"):
        convert(float_dir, float_dir / "sub", ConvertOptions(bits=4))
    with pytest.raises(QuantizationError, match="unknown dtype 'float8'"):
        convert(float_dir, tmp_path / "x", ConvertOptions(dtype="float8"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_full_disk_simulated(float_dir, tmp_path, monkeypatch):
    calls = []

    def full(path, arrays):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, arrays)

    real = writer._write_shard
    monkeypatch.setattr(writer, "_write_shard", full)
    with pytest.raises(writer.WriteError, match="no space left on the device while writing .*out.* partial output was removed"):
        convert(float_dir, tmp_path / "out", ConvertOptions(bits=8, shard_bytes=20_000))
    assert len(calls) == 2 and calls[0].exists() is False  # the first shard went with the temp dir
    assert list(tmp_path.iterdir()) == []


def test_full_disk_real_enospc(float_dir, tmp_path, monkeypatch):
    """/dev/full returns a real ENOSPC from write(2): it must surface (mx.save_safetensors
    given a path would swallow it and leave a truncated shard)."""
    monkeypatch.setattr(writer, "open", lambda p, mode: open("/dev/full", mode), raising=False)
    with pytest.raises(writer.WriteError, match="No space left on device"):
        convert(float_dir, tmp_path / "out", ConvertOptions(bits=4))
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors(float_dir, tmp_path, monkeypatch):
    def denied(path, arrays):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(writer, "_write_shard", denied)
    with pytest.raises(writer.WriteError, match="cannot write .*out .*Permission denied"):
        convert(float_dir, tmp_path / "out", ConvertOptions(bits=4))
    assert list(tmp_path.iterdir()) == []
