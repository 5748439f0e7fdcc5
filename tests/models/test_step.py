"""The compiled decode step (models/step.py): same logits and tokens as the eager step across
cache growth, one trace per cache capacity, eager fallbacks where it cannot trace."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache

from qwen_mlx.generate import PromptCache, generate_tokens
from qwen_mlx.generation_config import SamplingParams
from qwen_mlx.loading.loader import build_model
from qwen_mlx.models import linear as L
from qwen_mlx.models import step as S
from qwen_mlx.models.decoder import TextModel
from qwen_mlx.models.fuse import fuse_projections
from tests.helpers import rel_err

QWEN3 = dict(model_type="qwen3", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
             tie_word_embeddings=True)
QWEN2_SLIDING = dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                     use_sliding_window=True, sliding_window=7, max_window_layers=1, tie_word_embeddings=False)
QWEN3_MOE = dict(QWEN3, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 norm_topk_prob=True, tie_word_embeddings=False)
PROMPT = np.random.default_rng(0).integers(0, 300, size=(1, 250))


@pytest.fixture
def speed():
    saved = L.SpeedOptions(**vars(L.SPEED))
    yield L.SPEED
    vars(L.SPEED).update(vars(saved))


def model_for(cfg, seed=0):
    from mlx.utils import tree_map

    model = build_model(cfg)
    mx.random.seed(seed)  # every parameter perturbed, 1-D norms included
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * (0.1 if p.ndim > 1 else 0.3) + (p.ndim == 1),
                          model.parameters()))
    fuse_projections(model)
    mx.eval(model.parameters())
    return model


def decode(model, compiled, n=12):
    """Prefill 249 tokens, then n greedy steps: they cross the 256-slot boundary (the cache
    grows, a second trace)."""
    cache = model.make_cache()
    model(mx.array(PROMPT[:, :-1]), cache=cache)
    step = S.DecodeStep(model, cache, compiled=compiled)
    assert step.compiled == compiled
    y, out = mx.array(PROMPT[:, -1:]), []
    for _ in range(n):
        logits = step(y)
        out.append(logits)
        y = mx.argmax(logits, axis=-1)[:, None]
    return mx.stack(out), cache


@pytest.mark.parametrize("cfg", [QWEN3, QWEN2_SLIDING, QWEN3_MOE], ids=["qwen3", "qwen2-sliding-bias", "qwen3-moe"])
def test_compiled_equals_eager(cfg):
    model = model_for(cfg)
    eager, ce = decode(model, False)
    compiled, cc = decode(model, True)
    assert rel_err(compiled, eager) < 1e-5
    assert ce[0].offset == cc[0].offset == 261 and cc[0].keys.shape[2] == 512
    for a, b in zip(ce, cc):  # the caches hold the same keys / values (trimming, reuse work as before)
        assert rel_err(b.state[0], a.state[0]) < 1e-5 and rel_err(b.state[1], a.state[1]) < 1e-5


def test_gpu_code_path_quantized(monkeypatch):
    """What Metal / CUDA run by default: the compiled step over quantized matmuls and gathered
    experts (the CPU backend pretending not to be one)."""
    import mlx.nn as nn

    from qwen_mlx.models import decoder

    for mod in (L, decoder, S):
        monkeypatch.setattr(mod, "on_cpu", lambda: False)
    model = build_model(QWEN3_MOE)
    nn.quantize(model, group_size=32, bits=4)
    fuse_projections(model)
    mx.eval(model.parameters())
    assert S.DecodeStep(model, model.make_cache()).compiled  # the default off the CPU
    eager, _ = decode(model, False, n=8)
    compiled, _ = decode(model, True, n=8)
    assert rel_err(compiled, eager) < 1e-5


def test_one_trace_per_capacity(monkeypatch):
    model = model_for(QWEN3)
    calls = []
    real = TextModel.__call__
    monkeypatch.setattr(TextModel, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    decode(model, True, n=12)  # 6 steps at capacity 256, 6 at 512
    assert len(calls) == 1 + 2  # the prefill, then one trace per capacity
    calls.clear()
    decode(model, True, n=12)  # the traces are kept on the model
    assert len(calls) == 1


def test_kv_write_is_in_place():
    """The traced step updates the caches' buffers in place (MLX donates them): a step adds
    no copy of the KV cache to the peak."""
    model = model_for({**QWEN3, "num_attention_heads": 8, "num_key_value_heads": 8})
    _, cache = decode(model, True, n=8)
    step = S.DecodeStep(model, cache, compiled=True)
    y = mx.array([[3]])
    mx.eval(step(y))
    kv = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for _ in range(4):
        y = mx.argmax(step(y), axis=-1)[:, None]
        mx.eval(y)
    assert kv >= 2**21 and mx.get_peak_memory() - base < kv / 8


def test_generate_tokens_same_with_and_without(speed):
    model = model_for(QWEN3)
    prompt = PROMPT[0, :40].tolist()
    outs = {}
    for flag in (False, True):
        speed.compile_step = flag
        pc = PromptCache(model)
        greedy = list(generate_tokens(model, prompt, SamplingParams(max_tokens=20, temperature=0.0), pc))
        sampled = list(generate_tokens(model, prompt, SamplingParams(max_tokens=20, temperature=0.9, seed=3)))
        turn2 = list(generate_tokens(model, prompt + greedy + [7, 8], SamplingParams(max_tokens=8, temperature=0.0), pc))
        outs[flag] = (greedy, sampled, turn2)
    assert outs[True] == outs[False]
    assert len(outs[True][0]) == 20


def test_defaults_and_fallbacks(speed, monkeypatch):
    model = model_for(QWEN3)
    assert not S.enabled()  # the CPU backend: eager (BLAS sgemv decode)
    monkeypatch.setattr(S, "on_cpu", lambda: False)
    assert S.enabled()  # Metal / CUDA: compiled
    speed.compile_step = False
    assert not S.enabled()
    assert S.supported(model, model.make_cache())
    assert not S.supported(model, model.make_cache(max_kv_size=64))
    assert not S.supported(model, model.make_cache(kv_bits=4))
    for cache in (model.make_cache(max_kv_size=64), model.make_cache(kv_bits=4)):
        assert isinstance(cache[0], (RotatingKVCache, QuantizedKVCache))
        assert not S.DecodeStep(model, cache, compiled=True).compiled
    shifted = model.make_cache()
    shifted.rope_delta = -3  # a VL prompt with media: positions shift, eager path
    assert not S.supported(model, shifted)
    dyn = model_for({**QWEN3, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    assert not S.supported(dyn, dyn.make_cache())
