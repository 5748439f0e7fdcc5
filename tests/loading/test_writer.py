"""Our stamped layout: GGUF and HF directories convert losslessly, reload without remapping,
and a write that fails leaves no destination."""

import errno
import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import qwen_mlx
from qwen_mlx import load_model
from qwen_mlx.config import FORMAT_VERSION
from qwen_mlx.loading.loader import load_checkpoint
from qwen_mlx.loading.writer import (DestinationExistsError, ShardWriter, WriteError, save_checkpoint,
                                      staged_dir)


def test_gguf_to_stamped_dir_round_trip(smollm2_path, smollm2, tmp_path):
    r = subprocess.run([sys.executable, "convert/to_mlx.py", str(smollm2_path), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["qwen_mlx_format"] == FORMAT_VERSION and cfg["model_type"] == "llama"
    llm = qwen_mlx.load(out)
    ids = mx.array([smollm2.tokenizer.encode("The capital of France is")])
    assert np.array_equal(np.array(llm.model(ids)), np.array(smollm2.model(ids)))
    assert llm.tokenizer.encode("Hello, 世界!") == smollm2.tokenizer.encode("Hello, 世界!")
    assert llm.render([{"role": "user", "content": "hi"}]) == smollm2.render([{"role": "user", "content": "hi"}])
    assert "Paris" in llm.generate("What is the capital of France?", temperature=0.0, max_tokens=20)


def test_moe_dir_sharded_and_stamped(tmp_path):
    from tests.models.test_moe import qwen3_moe
    from tests.helpers import perturb, save_hf

    src = save_hf(perturb(qwen3_moe()), tmp_path / "hf")
    ck = load_checkpoint(src)
    assert "model.layers.0.mlp.switch_mlp.gate_proj.weight" in ck.weights
    dst = save_checkpoint(ck, src, tmp_path / "mlx", shard_bytes=200_000)
    assert (dst / "model.safetensors.index.json").exists() and len(list(dst.glob("*.safetensors"))) > 1
    ids = mx.array([[1, 2, 3, 4, 5]])
    a = load_model(src, dtype=mx.float32)(ids)
    b = load_model(dst, dtype=mx.float32)(ids)  # stamped: loads with no remapping
    assert np.array_equal(np.array(a), np.array(b))


def test_refuses_existing_and_cleans_up(tmp_path, monkeypatch):
    from tests.models.test_qwen3 import build
    from tests.helpers import save_hf

    src = save_hf(build(), tmp_path / "hf")
    (tmp_path / "taken").mkdir()
    with pytest.raises(DestinationExistsError, match="exists"):
        save_checkpoint(load_checkpoint(src), src, tmp_path / "taken")

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", boom)
    with pytest.raises(WriteError, match="no space left on the device while writing .*new"):
        save_checkpoint(load_checkpoint(src), src, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "taken"]


def test_shard_writer_layout(tmp_path):
    w = ShardWriter(tmp_path, shard_bytes=1000)
    w.add({"a": mx.zeros((100,)), "b": mx.zeros((100,))})  # 400 + 400 bytes: one shard
    w.add({"big": mx.zeros((1000,))})  # larger than a shard: a shard of its own
    w.add({"c": mx.ones((10,))})
    assert w.close() == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert idx["weight_map"] == {"a": "model-00001-of-00003.safetensors", "b": "model-00001-of-00003.safetensors",
                                 "big": "model-00002-of-00003.safetensors", "c": "model-00003-of-00003.safetensors"}
    assert idx["metadata"]["total_size"] == 400 + 400 + 4000 + 40
    assert mx.load(str(tmp_path / "model-00003-of-00003.safetensors"))["c"].tolist() == [1.0] * 10
    one = ShardWriter(tmp_path / "one")
    (tmp_path / "one").mkdir()
    one.add({"x": mx.zeros((3,))})
    assert one.close() == ["model.safetensors"] and not (tmp_path / "one" / "model.safetensors.index.json").exists()


def test_staged_dir_stale_and_overwrite(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}-abc"
    live = tmp_path / f".out.partial-{os.getpid()}-xyz"  # a running writer's: left alone
    other = tmp_path / f".other.partial-{int(dead.stdout)}-abc"  # another DST's: left alone
    for d in (stale, live, other):
        d.mkdir()
    with staged_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("1")
        assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "out" / "f").read_text() == "1"
    with pytest.raises(DestinationExistsError):
        with staged_dir(tmp_path / "out"):
            pass
    with staged_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "g").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["g"]
    with pytest.raises(RuntimeError, match="boom"):  # any failure: DST untouched, temp dir gone
        with staged_dir(tmp_path / "out", overwrite=True) as tmp:
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "out"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["g"]
