"""Parity of qwen2 (Qwen1.5/2/2.5) with transformers: bias, GQA, tied/untied, rope scaling, sliding window."""

import pytest

from tests.helpers import check_text_parity, torch_setup

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, rope_theta=10000.0)


def build(**kw):
    torch_setup()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**{**BASE, **kw}))


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_parity(tmp_path, tied):
    check_text_parity(build(tie_word_embeddings=tied), tmp_path, BASE["vocab_size"])


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 2.0},
])
def test_qwen2_rope_scaling(tmp_path, scaling):
    check_text_parity(build(rope_scaling=scaling), tmp_path, BASE["vocab_size"], seq=40)


def test_qwen2_dynamic_ntk_beyond_context(tmp_path):
    """Dynamic NTK only changes anything past max_position_embeddings (full forward)."""
    import mlx.core as mx
    import numpy as np

    from qwen_mlx import load_model
    from tests.helpers import hf_logits, perturb, rel_err, save_hf

    hf = perturb(build(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    model = load_model(save_hf(hf, tmp_path / "c"), dtype=mx.float32)
    ids = np.random.default_rng(1).integers(0, 320, size=(2, 40))
    assert rel_err(np.array(model(mx.array(ids))), hf_logits(hf, ids)) <= 1e-4


def test_qwen2_sliding_window(tmp_path):
    """Layers from max_window_layers on attend to the last `sliding_window` tokens only."""
    hf = build(use_sliding_window=True, sliding_window=6, max_window_layers=1,
               num_hidden_layers=3)
    model, _ = check_text_parity(hf, tmp_path, BASE["vocab_size"], seq=20)
    assert model.args.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]


def test_qwen2_rope_parameters_layout(tmp_path):
    """transformers 5.x writes rope_parameters; hub checkpoints write rope_theta: read both."""
    import json

    import mlx.core as mx

    from qwen_mlx import load_model
    from tests.helpers import perturb, save_hf

    path = save_hf(perturb(build(rope_theta=5000.0)), tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in cfg  # what 5.x writes
    m5 = load_model(path, dtype=mx.float32)
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp["rope_theta"]
    (path / "config.json").write_text(json.dumps(cfg))
    m4 = load_model(path, dtype=mx.float32)
    assert m5.args.rope_theta == m4.args.rope_theta == 5000.0


def test_qwen2_rope_scaling_4x_layout_equals_5x(tmp_path):
    """A hub-style config (rope_theta + rope_scaling {"type": "yarn"}) gives the same model as
    transformers 5.x's rope_parameters (a silent default theta would still look plausible)."""
    import json

    import mlx.core as mx
    import numpy as np

    from qwen_mlx import load_model
    from tests.helpers import hf_logits, perturb, rel_err, save_hf

    hf = perturb(build(rope_theta=20000.0, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}))
    path = save_hf(hf, tmp_path / "c")
    ids = np.random.default_rng(2).integers(0, 320, size=(2, 30))
    ref = hf_logits(hf, ids)
    cfg = json.loads((path / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    cfg["rope_scaling"] = rp
    (path / "config.json").write_text(json.dumps(cfg))
    m = load_model(path, dtype=mx.float32)
    assert m.args.rope_theta == 20000.0 and m.args.rope_scaling["rope_type"] == "yarn"
    assert rel_err(np.array(m(mx.array(ids))), ref) <= 1e-4
