"""Shared helpers for parity tests against transformers (float32, tiny random configs)."""

from pathlib import Path

import mlx.core as mx
import numpy as np

REL_TOL = 1e-4  # max |mlx - ref| / max |ref| on float32 logits


def torch_setup():
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return torch


def perturb(model, seed: int = 0, scale: float = 0.02):
    """Random init leaves norms at exactly 1 and biases at 0: perturb every parameter
    so that a port that forgets a norm or a bias fails."""
    torch = torch_setup()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (1 if p.ndim > 1 else 5))
    return model


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    torch = torch_setup()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def hf_greedy(model, ids: np.ndarray, n: int) -> list:
    torch = torch_setup()
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def mlx_greedy(model, ids: np.ndarray, n: int) -> list:
    cache = model.make_cache()
    logits = model(mx.array(ids), cache=cache)
    out = []
    for _ in range(n):
        tok = mx.argmax(logits[:, -1], axis=-1)
        out.append(tok.item())
        logits = model(tok[:, None], cache=cache)
    return out


def stepwise_logits(model, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Prefill ``prefill`` tokens, then feed the rest one at a time through the cache."""
    cache = model.make_cache()
    parts = [model(mx.array(ids[:, :prefill]), cache=cache)]
    for t in range(prefill, ids.shape[1]):
        parts.append(model(mx.array(ids[:, t:t + 1]), cache=cache))
    return np.array(mx.concatenate(parts, axis=1))


def check_text_parity(hf_model, tmp_path: Path, vocab: int, seq: int = 12, n_gen: int = 24,
                      load_kwargs=None):
    """The three checks of the brief: batch-2 logits, 24 greedy tokens, cached decode."""
    from qwen_mlx import load_model

    hf_model = perturb(hf_model.float().eval())
    path = save_hf(hf_model, tmp_path / "ckpt")
    model = load_model(path, dtype=mx.float32, **(load_kwargs or {}))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(2, seq))
    ref = hf_logits(hf_model, ids)
    ours = np.array(model(mx.array(ids)))
    assert ours.shape == ref.shape
    err = rel_err(ours, ref)
    assert err <= REL_TOL, f"logits rel err {err:.2e}"
    step = stepwise_logits(model, ids, prefill=5)
    assert rel_err(step, ours) <= REL_TOL, "cached step-by-step decode differs from full forward"
    assert hf_greedy(hf_model, ids[:1], n_gen) == mlx_greedy(model, ids[:1], n_gen)
    return model, err


class ScriptedModel:
    """A stand-in model that emits a fixed token script (one-hot logits), advancing a real
    KV cache so prompt-cache bookkeeping is exercised. Set ``prompt_len`` (tokens) first."""

    def __init__(self, script, vocab: int, context_length: int = 4096):
        import mlx.nn as nn

        self.script, self.vocab, self.context_length = list(script), vocab, context_length
        self.layers = [nn.Module()]
        self.prompt_len = 0

    def make_cache(self, **kw):
        from mlx_lm.models.cache import KVCache

        return [KVCache()]

    def __call__(self, x, cache=None):
        B, L = x.shape
        c = cache[0]
        c.update_and_fetch(mx.zeros((B, 1, L, 8)), mx.zeros((B, 1, L, 8)))
        i = min(max(c.offset - self.prompt_len, 0), len(self.script) - 1)
        logits = mx.full((B, L, self.vocab), -1e9)
        return logits.at[:, :, self.script[i]].add(2e9)


def gguf_dense(ck, name: str) -> np.ndarray:
    """float32 numpy of a GGUF-read weight, dequantizing an MLX triplet with float32 scales."""
    w, p = ck.weights, name.rsplit(".", 1)[0]
    if not name.endswith(".weight") or p + ".scales" not in w:
        return np.array(w[name].astype(mx.float32))
    q = ck.config["quantization"]
    bits = q.get(p, q)["bits"]
    s, b = w[p + ".scales"].astype(mx.float32), w[p + ".biases"].astype(mx.float32)
    return np.array(mx.dequantize(w[name], s, b, group_size=32, bits=bits))
