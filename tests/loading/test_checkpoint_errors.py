"""Directory checkpoints: sharded loading, and every bad input gives a clear qwen_mlx error."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from qwen_mlx import ConfigError, ModelNotFoundError, WeightsError, load_model
from tests.helpers import hf_logits, perturb, rel_err, torch_setup


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch_setup()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf = perturb(Qwen2ForCausalLM(Qwen2Config(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)))
    path = tmp_path_factory.mktemp("ck") / "sharded"
    hf.save_pretrained(path, max_shard_size="100KB")
    return hf, path


def copy(ckpt, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(ckpt[1], dst)
    return dst


def test_sharded_checkpoint_loads(ckpt):
    hf, path = ckpt
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 1
    ids = np.arange(10)[None] % 200
    assert rel_err(np.array(load_model(path, dtype=mx.float32)(mx.array(ids))), hf_logits(hf, ids)) < 1e-4


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="no such model"):
        load_model("/nonexistent/dir")


def test_hub_id_offline_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="could not be downloaded"):
        load_model("Qwen/Qwen3-0.6B")


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("model_type"), "has no 'model_type'"),
    (lambda c: c.update(model_type="gpt9"), "unknown model_type 'gpt9'"),
    (lambda c: c.pop("hidden_size"), "lacks required keys: hidden_size"),
    (lambda c: c.update(num_key_value_heads=3), "not a multiple"),
    (lambda c: c.update(rope_parameters={"rope_type": "weird", "rope_theta": 1.0}), "unsupported rope_scaling"),
])
def test_bad_config(ckpt, tmp_path, edit, match):
    p = copy(ckpt, tmp_path)
    cfg = json.loads((p / "config.json").read_text())
    edit(cfg)
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        load_model(p)


def test_unreadable_config(ckpt, tmp_path):
    p = copy(ckpt, tmp_path)
    (p / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_model(p)


def test_missing_shard(ckpt, tmp_path):
    p = copy(ckpt, tmp_path)
    victim = sorted(p.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(WeightsError, match=victim.name):
        load_model(p)


def test_truncated_shard(ckpt, tmp_path):
    p = copy(ckpt, tmp_path)
    victim = sorted(p.glob("*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(WeightsError, match=f"{victim.name}.*truncated"):
        load_model(p)


@pytest.mark.parametrize("payload", [b"", b"\x05\x00", b"\xff" * 16, b"\x10\x00\x00\x00\x00\x00\x00\x00{broken json}!!"])
def test_corrupt_shard(ckpt, tmp_path, payload):
    p = copy(ckpt, tmp_path)
    victim = sorted(p.glob("*.safetensors"))[0]
    victim.write_bytes(payload)
    with pytest.raises(WeightsError, match=victim.name):
        load_model(p)


def _rewrite(p, fn):
    """Apply fn to the merged tensors and save them as one shard."""
    from safetensors.numpy import load_file

    tensors = {}
    for f in p.glob("*.safetensors"):
        tensors.update(load_file(f))
        f.unlink()
    (p / "model.safetensors.index.json").unlink()
    fn(tensors)
    save_file(tensors, p / "model.safetensors")


def test_missing_tensor(ckpt, tmp_path):
    p = copy(ckpt, tmp_path)
    _rewrite(p, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match="missing tensors model.layers.1.mlp.up_proj.weight"):
        load_model(p)


def test_shape_mismatch(ckpt, tmp_path):
    p = copy(ckpt, tmp_path)
    _rewrite(p, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": np.zeros((64, 32), np.float32)}))
    with pytest.raises(WeightsError, match=r"q_proj.weight' has shape \(64, 32\), expected \(64, 64\)"):
        load_model(p)


def test_unexpected_tensor(ckpt, tmp_path):
    p = copy(ckpt, tmp_path)
    _rewrite(p, lambda t: t.update({"model.layers.0.extra.weight": np.zeros((2,), np.float32)}))
    with pytest.raises(WeightsError, match="unexpected tensors model.layers.0.extra.weight"):
        load_model(p)
