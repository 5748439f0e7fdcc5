"""Our stamped layout: GGUF and HF directories convert losslessly, reload without remapping,
and a write that fails leaves no destination."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import qwen_mlx
from qwen_mlx import QwenMLXError, load_model
from qwen_mlx.loading.loader import load_checkpoint
from qwen_mlx.loading.writer import save_checkpoint


def test_gguf_to_stamped_dir_round_trip(smollm2_path, smollm2, tmp_path):
    r = subprocess.run([sys.executable, "convert/to_mlx.py", str(smollm2_path), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["qwen_mlx_format"] == 1 and cfg["model_type"] == "llama"
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
    with pytest.raises(QwenMLXError, match="exists"):
        save_checkpoint(load_checkpoint(src), src, tmp_path / "taken")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(load_checkpoint(src), src, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "taken"]
