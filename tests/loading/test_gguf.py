"""read_gguf on the real SmolLM2-135M-Instruct Q4_1 GGUF vs transformers' GGUF loader, and bad files.

Tolerance: quantized tensors are dequantized with float32 scales/biases and must equal
transformers' float32 dequantization to rtol = atol = 1e-6 (measured: bit-exact).
"""

import shutil
import struct

import numpy as np
import pytest

import mlx.core as mx

from qwen_mlx.errors import ConfigError, ModelNotFoundError, WeightsError
from qwen_mlx.loading.gguf import GGUFCheckpoint, map_tensor_name, read_gguf
from tests.helpers import gguf_dense

TOL = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def real_path(smollm2_path):
    return smollm2_path


@pytest.fixture(scope="module")
def ckpt(real_path):
    return read_gguf(real_path)


@pytest.fixture(scope="module")
def hf_model(hf_smollm2):
    return hf_smollm2


def test_real_weights_match_transformers(ckpt, hf_model):
    sd = hf_model.state_dict()
    assert ckpt.config["tie_word_embeddings"] is True and "lm_head.weight" not in ckpt.weights
    ours = {k.rsplit(".", 1)[0] + ".weight" if k.endswith((".scales", ".biases")) else k for k in ckpt.weights}
    assert ours | {"lm_head.weight"} == set(sd)
    for k, ref in sd.items():
        src = "model.embed_tokens.weight" if k == "lm_head.weight" else k
        np.testing.assert_allclose(gguf_dense(ckpt, src), ref.numpy(), **TOL, err_msg=k)


def test_real_layout_and_quantization(ckpt):
    w = ckpt.weights
    # Q4_1 and the Q8_0 embedding stay quantized, with MLX's packing
    assert w["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576 // 8)
    assert w["model.layers.0.self_attn.k_proj.scales"].shape == (192, 576 // 32)
    assert w["model.embed_tokens.weight"].shape == (49152, 576 // 4)
    assert w["model.layers.0.input_layernorm.weight"].dtype == mx.float32
    q = ckpt.config["quantization"]
    assert (q["group_size"], q["bits"], q["model.embed_tokens"]["bits"]) == (32, 4, 8)
    assert len(q) == 4  # group_size, bits, mode + the one 8-bit module
    md = ckpt.metadata
    assert md["general.architecture"] == "llama" and md["tokenizer.ggml.model"] == "gpt2"
    assert len(md["tokenizer.ggml.tokens"]) == 49152 and md["tokenizer.ggml.eos_token_id"] == 2
    assert "<|im_start|>" in md["tokenizer.chat_template"]


def test_real_config_matches_transformers(ckpt, hf_model):
    c, tc = ckpt.config, hf_model.config
    assert c["model_type"] == tc.model_type == "llama"
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
                "max_position_embeddings", "vocab_size", "tie_word_embeddings", "head_dim", "attention_bias", "mlp_bias",
                "bos_token_id", "eos_token_id"):
        assert c[key] == getattr(tc, key), key
    assert (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["num_hidden_layers"]) == (576, 9, 3, 30)
    assert c["rms_norm_eps"] == tc.rms_norm_eps
    assert c["rope_theta"] == tc.rope_parameters["rope_theta"] == 100000.0
    assert c["rope_scaling"] is None


def test_name_table():
    assert map_tensor_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert map_tensor_name("blk.3.ffn_down_exps.scales") == "model.layers.3.mlp.switch_mlp.down_proj.scales"
    assert map_tensor_name("output.biases") == "lm_head.biases"
    for bad in ("blk.x.attn_q.weight", "output.weight.extra", "xblk.0.attn_q.weight", "blk.0.attn_q", "rope_freqs.weight"):
        assert map_tensor_name(bad) is None, bad


# ------------------------------------------------------------------ bad files


def _raises_naming(path, exc=WeightsError, *words):
    with pytest.raises(exc) as e:
        read_gguf(path)
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_truncated_real_file(real_path, tmp_path):
    size = real_path.stat().st_size
    cut = tmp_path / "cut.gguf"
    with open(real_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(int(size * 0.6)))
    msg = _raises_naming(cut, WeightsError, "truncated", f"file has {int(size * 0.6)}")
    assert "tensor 'blk." in msg  # names the first tensor that does not fit
    head = tmp_path / "head.gguf"
    with open(real_path, "rb") as src, open(head, "wb") as dst:
        dst.write(src.read(100_000))  # cut inside the tokenizer metadata
    _raises_naming(head, WeightsError, "truncated", "metadata 'tokenizer.ggml.tokens'")


def test_corrupt_magic_and_garbage(real_path, tmp_path):
    bad = tmp_path / "magic.gguf"
    shutil.copyfile(real_path, bad)
    with open(bad, "r+b") as f:
        f.write(b"GGUX")
    _raises_naming(bad, WeightsError, "not a GGUF file")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())
    _raises_naming(junk, WeightsError, "not a GGUF file")
    fake = tmp_path / "fake.gguf"  # right magic, then garbage
    fake.write_bytes(b"GGUF" + np.random.default_rng(1).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())
    _raises_naming(fake, WeightsError)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _raises_naming(empty, WeightsError, "shorter than a GGUF header")


def test_missing_path(tmp_path):
    _raises_naming(tmp_path / "absent.gguf", ModelNotFoundError)


def test_missing_architecture_key(tmp_path):
    bare = tmp_path / "bare.gguf"
    bare.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))  # valid, but no metadata at all
    _raises_naming(bare, ConfigError, "'general.architecture'")
