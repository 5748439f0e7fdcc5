"""The dequantize path (the CPU default) fuses q/k/v and gate/up before dequantizing:
packed parts with the same spec are concatenated packed and dequantized once. The bound
parameters equal, bit for bit, those of dequantizing each part and fusing after (the path
before); parts packed differently, or float, fall back to that; and no float copy of the
parts is made: peak memory stays at the fused model plus the packed checkpoint."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen_mlx.loading.loader import Checkpoint, build_model, model_from_checkpoint
from qwen_mlx.models.fuse import fuse_projections
from tests.models.test_fuse import QWEN2, QWEN3_MOE, IDS, tree_map_random

MiB = 1 << 20


def checkpoint(cfg, spec=None, per_module=None, seed=0):
    """Random weights under HF names, quantized with ``spec`` (nn.quantize kwargs) and the
    ``per_module`` overrides (path -> kwargs, or None for float)."""
    model = build_model(cfg)
    mx.random.seed(seed)
    model.update(tree_map_random(model))
    q = None
    if spec:
        per_module = per_module or {}

        def pred(path, m):
            if not hasattr(m, "to_quantized") or m.weight.shape[-1] % 32:
                return False
            return per_module.get(path, spec) or False

        nn.quantize(model, class_predicate=pred)
        q = {"group_size": spec.get("group_size", 64), "bits": spec.get("bits", 4), "mode": spec.get("mode", "affine"),
             **{p: ({"mode": "affine", **v} if v else False) for p, v in per_module.items()}}
    mx.eval(model.parameters())
    return Checkpoint({**cfg, "quantization": q} if q else cfg, dict(tree_flatten(model.parameters())), "test")


def before(ck, dtype):
    """The previous order: every part dequantized apiece, bound, then fused."""
    m = model_from_checkpoint(Checkpoint(ck.config, dict(ck.weights), "t"), dtype=dtype, dequantize=True, fuse=False)
    fuse_projections(m)
    mx.eval(m.parameters())
    return dict(tree_flatten(m.parameters()))


CASES = {
    "qwen2-bias-4bit": (QWEN2, dict(group_size=32, bits=4), None),
    "moe-8bit": (QWEN3_MOE, dict(group_size=32, bits=8), None),
    "moe-mxfp4": (QWEN3_MOE, dict(group_size=32, bits=4, mode="mxfp4"), None),
    "mixed": (QWEN2, dict(group_size=32, bits=4), {"model.layers.0.self_attn.k_proj": dict(group_size=32, bits=8),
                                                   "model.layers.0.mlp.up_proj": None,
                                                   "model.layers.1.self_attn.q_proj": dict(group_size=64, bits=4)}),
}


@pytest.mark.parametrize("case", CASES)
def test_same_parameters_bit_for_bit(case, monkeypatch):
    cfg, spec, per = CASES[case]
    ck = checkpoint(cfg, spec, per)
    if case == "qwen2-bias-4bit":  # GGUF Q4_1-style half scales / biases
        ck.weights.update({k: v.astype(mx.float16) for k, v in ck.weights.items()
                           if k.endswith((".scales", ".biases"))})
    ref = before(ck, mx.float32)
    from qwen_mlx.quant import spec as qspec

    parts = {id(v): k for k, v in ck.weights.items() if k.endswith(("q_proj.weight", "gate_proj.weight"))
             and k.rsplit(".", 1)[0] + ".scales" in ck.weights}
    apiece = []
    real = qspec.dequantize
    monkeypatch.setattr(qspec, "dequantize", lambda p, s, d=mx.float32: apiece.append(parts.get(id(p["weight"])))
                        or real(p, s, d))
    model = model_from_checkpoint(ck, dtype=mx.float32)  # CPU: dequantize=True, fuse=True
    got = dict(tree_flatten(model.parameters()))
    assert sorted(got) == sorted(ref) and "model.layers.0.self_attn.qkv_proj.weight" in got
    for k, v in ref.items():
        assert got[k].dtype == v.dtype == mx.float32 and mx.array_equal(got[k], v).item(), k
    apiece = sorted(k for k in apiece if k)
    if per is None:  # no part dequantized alone: each group once, packed-fused
        assert parts and not apiece
    else:  # groups with parts packed differently (or a float part) fall back to parts apiece
        assert apiece == ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                          "model.layers.1.self_attn.q_proj.weight"]
    assert not any(k.endswith(("q_proj.weight", "q_proj.scales", "gate_proj.weight")) for k in ck.weights)  # released
    assert np.isfinite(np.array(model(IDS))).all()


def test_peak_memory_has_no_float_copy_of_the_parts():
    cfg = dict(QWEN2, hidden_size=512, intermediate_size=2048, num_hidden_layers=3, num_attention_heads=8,
               num_key_value_heads=4, vocab_size=256)
    ck = checkpoint(cfg, dict(group_size=64, bits=4))
    packed = sum(v.nbytes for v in ck.weights.values())

    def peak(load):
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        m = load(Checkpoint(ck.config, dict(ck.weights), "t"))
        mx.eval(m.parameters())
        return (mx.get_peak_memory() - base) / MiB, sum(v.nbytes for _, v in tree_flatten(m.parameters())) / MiB

    def old(c, lazy):  # the previous order: dequantized parts bound, fused lazily, evaluated by layer
        m = model_from_checkpoint(c, dtype=mx.float32, fuse=False, lazy=True)
        fuse_projections(m)
        for layer in ([] if lazy else m.layers):
            mx.eval(layer.parameters())
        return m

    gate_up = 2 * 2048 * 512 * 4 / MiB  # one layer's dequantized gate + up (float32)
    for lazy in (False, True):
        new_peak, params = peak(lambda c: model_from_checkpoint(c, dtype=mx.float32, lazy=lazy))
        old_peak, _ = peak(lambda c: old(c, lazy))
        print(f"lazy={lazy}: params {params:.1f} MiB, packed {packed / MiB:.1f} MiB: peak {new_peak:.1f} MiB, "
              f"before {old_peak:.1f} MiB")
        # by layer: the fused model, nothing more; all at once: at most a packed copy more
        assert new_peak <= params + (packed / MiB if lazy else 1)
        assert old_peak >= new_peak + gate_up
