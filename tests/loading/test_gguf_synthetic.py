"""Tiny synthetic GGUFs per architecture: our config/weights vs transformers' GGUF loader.

Each file is written with the `gguf` package's GGUFWriter from random HF-layout weights
(non-square shapes, perturbed norms) and a mix of GGML types, so names, expert stacking,
llama's Q/K un-permutation, dtype repairs and config keys are checked on every family.
"""

import numpy as np
import pytest

import mlx.core as mx

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
from gguf import GGMLQuantizationType as T, quants  # noqa: E402

from qwen_mlx.errors import ConfigError, QwenMLXError, WeightsError  # noqa: E402
from qwen_mlx.loading.gguf import read_gguf  # noqa: E402
from tests.helpers import gguf_dense

H, L, V, HEADS, KV = 64, 2, 160, 4, 2
ARCHS = {
    "llama": dict(head_dim=16, ff=256, tie=True),
    "qwen2": dict(head_dim=16, ff=96, tie=False, qkv_bias=True),
    "qwen3": dict(head_dim=32, ff=96, tie=True, qk_norm=True),
    "qwen3moe": dict(head_dim=32, ff=128, tie=False, qk_norm=True, experts=4, moe_ff=96),
    "qwen2moe": dict(head_dim=16, ff=128, tie=True, qkv_bias=True, experts=4, moe_ff=96, shared_ff=80),
}
# (gguf tensor name, ggml type) overrides; everything else is F32.
TYPES = {
    "llama": {"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.Q8_0, "blk.1.attn_k.weight": T.Q4_0,
              "blk.0.attn_k.weight": T.Q4_1, "blk.0.ffn_up.weight": T.Q4_1, "blk.1.ffn_gate.weight": T.F16,
              "blk.0.ffn_gate.weight": T.BF16, "blk.0.ffn_down.weight": T.Q6_K, "blk.1.ffn_down.weight": T.Q4_K},
    "qwen2": {"blk.0.attn_q.weight": T.Q8_0, "output.weight": T.Q4_0, "blk.1.ffn_up.weight": T.BF16},
    "qwen3": {"blk.1.attn_v.weight": T.Q4_1, "blk.0.ffn_down.weight": T.Q8_0},
    "qwen3moe": {"token_embd.weight": T.Q8_0, "blk.0.ffn_gate_exps.weight": T.Q8_0,
                 "blk.1.ffn_down_exps.weight": T.Q4_0, "blk.1.ffn_up_exps.weight": T.F16},
    "qwen2moe": {"blk.0.ffn_up_exps.weight": T.Q8_0, "blk.1.ffn_up_shexp.weight": T.Q4_0},
}
# keys transformers' GGUF mapping ignores for these families: passed to it explicitly
TF_OVERRIDES = {
    "qwen3": {"head_dim": 32},
    "qwen3moe": {"moe_intermediate_size": 96},
    "qwen2moe": {"moe_intermediate_size": 96, "shared_expert_intermediate_size": 80},
}


def tensor_specs(arch):
    """[(gguf_name, hf_name, hf_layout_shape)] for a tiny model of `arch`."""
    a = ARCHS[arch]
    hd, ff = a["head_dim"], a["ff"]
    specs = [("token_embd.weight", "model.embed_tokens.weight", (V, H)), ("output_norm.weight", "model.norm.weight", (H,))]
    if not a["tie"]:
        specs.append(("output.weight", "lm_head.weight", (V, H)))
    for i in range(L):
        b, m = f"blk.{i}.", f"model.layers.{i}."
        specs += [
            (b + "attn_norm.weight", m + "input_layernorm.weight", (H,)),
            (b + "ffn_norm.weight", m + "post_attention_layernorm.weight", (H,)),
            (b + "attn_q.weight", m + "self_attn.q_proj.weight", (HEADS * hd, H)),
            (b + "attn_k.weight", m + "self_attn.k_proj.weight", (KV * hd, H)),
            (b + "attn_v.weight", m + "self_attn.v_proj.weight", (KV * hd, H)),
            (b + "attn_output.weight", m + "self_attn.o_proj.weight", (H, HEADS * hd)),
        ]
        if a.get("qkv_bias"):
            specs += [(b + f"attn_{x}.bias", m + f"self_attn.{x}_proj.bias", (n * hd,)) for x, n in (("q", HEADS), ("k", KV), ("v", KV))]
        if a.get("qk_norm"):
            specs += [(b + "attn_q_norm.weight", m + "self_attn.q_norm.weight", (hd,)),
                      (b + "attn_k_norm.weight", m + "self_attn.k_norm.weight", (hd,))]
        if "experts" in a:
            e, mf = a["experts"], a["moe_ff"]
            specs += [
                (b + "ffn_gate_inp.weight", m + "mlp.gate.weight", (e, H)),
                (b + "ffn_gate_exps.weight", m + "mlp.switch_mlp.gate_proj.weight", (e, mf, H)),
                (b + "ffn_up_exps.weight", m + "mlp.switch_mlp.up_proj.weight", (e, mf, H)),
                (b + "ffn_down_exps.weight", m + "mlp.switch_mlp.down_proj.weight", (e, H, mf)),
            ]
            if "shared_ff" in a:
                sf = a["shared_ff"]
                specs += [
                    (b + "ffn_gate_inp_shexp.weight", m + "mlp.shared_expert_gate.weight", (H,)),
                    (b + "ffn_gate_shexp.weight", m + "mlp.shared_expert.gate_proj.weight", (sf, H)),
                    (b + "ffn_up_shexp.weight", m + "mlp.shared_expert.up_proj.weight", (sf, H)),
                    (b + "ffn_down_shexp.weight", m + "mlp.shared_expert.down_proj.weight", (H, sf)),
                ]
        else:
            specs += [(b + "ffn_gate.weight", m + "mlp.gate_proj.weight", (ff, H)),
                      (b + "ffn_up.weight", m + "mlp.up_proj.weight", (ff, H)),
                      (b + "ffn_down.weight", m + "mlp.down_proj.weight", (H, ff))]
    return specs


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf Q/K permutation (HF rotate-half -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# float16 fields (byte offset in a block -> value) of the types gguf cannot quantize: small,
# finite scales so random blocks decode to sane weights
F16_FIELDS = {T.Q4_K: {0: 0.01, 2: 0.02}, T.Q6_K: {208: 0.003}, T.Q2_K: {80: 0.01, 82: 0.02}, T.Q3_K: {108: 0.01},
              T.Q5_K: {0: 0.01, 2: 0.02}, T.IQ4_NL: {0: 0.01}, T.IQ4_XS: {0: 0.01}, T.IQ2_XXS: {0: 0.01},
              T.IQ3_S: {0: 0.01}, T.NVFP4: {}, T.Q8_K: {}}


def k_blocks(rng, qtype, rows, cols):
    """Random blocks of a type gguf cannot quantize, with small finite float16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for off, v in F16_FIELDS[qtype].items():
        b[..., off:off + 2] = np.full(b.shape[:2], v, np.float16)[..., None].view(np.uint8)
    if qtype == T.NVFP4:  # UE4M3 scales 2^-4 .. 0.94 (ggml's quantizer never writes 0x7F or bit 7)
        b[..., :4] = rng.integers(0x18, 0x38, (*b.shape[:2], 4))
    return b.reshape(rows, -1)


def write_gguf(path, arch, meta_drop=(), extra=None, types=None, alignment=None, gguf_arch=None, hook=None):
    """Write a tiny `arch` GGUF; return {hf_name: expected float32 HF-layout array}.
    ``hook(writer)`` may add metadata (e.g. a tokenizer)."""
    a, rng = ARCHS[arch], np.random.default_rng(sum(map(ord, arch)))
    types = TYPES[arch] if types is None else types
    w = gguf.GGUFWriter(str(path), gguf_arch or arch)
    if alignment:
        w.add_custom_alignment(alignment)
    meta = {"block_count": L, "context_length": 512, "embedding_length": H, "feed_forward_length": a["ff"],
            "attention.head_count": HEADS, "attention.head_count_kv": KV, "vocab_size": V,
            "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 1e6, "rope.dimension_count": a["head_dim"]}
    if arch != "llama" and arch != "qwen2":
        meta["attention.key_length"] = a["head_dim"]
    if "experts" in a:
        meta.update({"expert_count": a["experts"], "expert_used_count": 2, "expert_feed_forward_length": a["moe_ff"]})
        if "shared_ff" in a:
            meta["expert_shared_feed_forward_length"] = a["shared_ff"]
    for k, v in {**meta, **(extra or {})}.items():
        if k not in meta_drop:
            add = w.add_string if isinstance(v, str) else w.add_float32 if isinstance(v, float) else w.add_uint32
            add(f"{gguf_arch or arch}.{k}", v)
    if hook:
        hook(w)
    expected = {}
    for gname, hname, shape in tensor_specs(arch):
        x = rng.standard_normal(shape).astype(np.float32) * 0.5
        if len(shape) == 1 and "bias" not in gname:
            x = 1.0 + 0.1 * x
        t = types.get(gname, T.F32)
        if t == T.BF16:
            x[0, :4] = [1e5, -3e5, 7e4, 1e-6]  # outside float16's range: must survive
        n_head = {"attn_q": HEADS, "attn_k": KV}.get(gname.split(".")[-2]) if arch == "llama" else None
        stored = llama_cpp_permute(x, n_head) if n_head else x
        if t == T.F32:
            w.add_tensor(gname, stored)
            expected[hname] = x[None] if "inp_shexp" in gname else x  # HF: Linear(hidden, 1)
            continue
        if t == T.F16:
            w.add_tensor(gname, stored.astype(np.float16))
            expected[hname] = x.astype(np.float16).astype(np.float32)
            continue
        if t in F16_FIELDS:
            assert not n_head
            raw = k_blocks(rng, t, int(np.prod(shape[:-1])), shape[-1]).reshape(*shape[:-1], -1)
        else:
            raw, hf_raw = quants.quantize(stored, t), quants.quantize(x, t)
        w.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=t)
        if t != T.Q8_K:  # gguf cannot decode Q8_K (a type only used for intermediate products)
            expected[hname] = quants.dequantize(hf_raw if n_head else raw, t).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


TOL = dict(rtol=1e-6, atol=1e-6)  # float32 rounding (measured: bit-exact)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_synthetic_matches_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    path = tmp_path / f"{arch}.gguf"
    expected = write_gguf(path, arch)
    ck = read_gguf(path)
    a = ARCHS[arch]

    # 1. every weight equals the HF-layout array we started from
    names = {k.rsplit(".", 1)[0] + ".weight" if k.endswith((".scales", ".biases")) else k for k in ck.weights}
    assert names == set(expected)
    for name, x in expected.items():
        np.testing.assert_allclose(gguf_dense(ck, name), x, **TOL, err_msg=name)
    quantized = {k.rsplit(".", 1)[0] for k in ck.weights if k.endswith(".scales")}
    assert len(quantized) == sum(t in (T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K) for t in TYPES[arch].values())
    if arch == "llama":  # BF16 kept exactly (mx.load alone would give float16 infs)
        assert ck.weights["model.layers.0.mlp.gate_proj.weight"].dtype == mx.bfloat16
        assert ck.weights["model.layers.0.mlp.down_proj.weight"].dtype == mx.float32  # Q6_K, exact
        assert ck.config["quantization"]["model.layers.0.self_attn.q_proj"]["bits"] == 8

    # 2. the same weights as transformers' GGUF loader, name for name
    model = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, **TF_OVERRIDES.get(arch, {})
    )
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    seen = set()
    for k, ref in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k.replace("experts.gate_up_proj", "switch_mlp.")
            ours, used = np.concatenate([gguf_dense(ck, p + "gate_proj.weight"), gguf_dense(ck, p + "up_proj.weight")], 1), [p + "gate_proj.weight", p + "up_proj.weight"]
        elif k.endswith("mlp.experts.down_proj"):
            used = [k.replace("experts.down_proj", "switch_mlp.down_proj.weight")]
            ours = gguf_dense(ck, used[0])
        elif k == "lm_head.weight" and ck.config["tie_word_embeddings"]:
            ours, used = gguf_dense(ck, "model.embed_tokens.weight"), []
        else:
            ours, used = gguf_dense(ck, k), [k]
        seen.update(used)
        np.testing.assert_allclose(ours, ref, **TOL, err_msg=f"{arch}: {k}")
    assert seen == set(expected)

    # 3. config fields equal transformers' config (or the metadata where it ignores the key)
    c, tc = ck.config, model.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert c[key] == getattr(tc, key), key
    assert c["head_dim"] == getattr(tc, "head_dim", tc.hidden_size // tc.num_attention_heads) == a["head_dim"]
    assert c["rms_norm_eps"] == pytest.approx(tc.rms_norm_eps, rel=1e-7)
    assert c["rope_theta"] == tc.rope_parameters["rope_theta"] == 1e6
    assert c["model_type"] == tc.model_type
    assert c["tie_word_embeddings"] is a["tie"] and c["vocab_size"] == V
    if "experts" in a:
        assert (c["num_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"]) == (
            tc.num_experts, tc.num_experts_per_tok, a["moe_ff"])
        assert c["norm_topk_prob"] is (arch == "qwen3moe")
        if arch == "qwen3moe":
            assert tc.norm_topk_prob is True
        else:
            assert c["shared_expert_intermediate_size"] == a["shared_ff"]
    if arch == "llama":
        assert c["attention_bias"] is False and c["mlp_bias"] is False


def test_q4k_is_exact_4bit_triplet(tmp_path):
    """mx.load mis-decodes Q4_K; we rebuild it as an exact 4-bit triplet."""
    path = tmp_path / "llama.gguf"
    exp = write_gguf(path, "llama")
    ck = read_gguf(path)
    p = "model.layers.1.mlp.down_proj"
    assert ck.weights[p + ".weight"].dtype == mx.uint32 and ck.weights[p + ".weight"].shape == (H, 256 // 8)
    assert ck.weights[p + ".scales"].shape == (H, 256 // 32)
    np.testing.assert_array_equal(gguf_dense(ck, p + ".weight"), exp[p + ".weight"])


def test_alignment_and_config_defaults(tmp_path):
    from qwen_mlx.loading.gguf_header import read_header

    path = tmp_path / "q.gguf"
    exp = write_gguf(path, "qwen2", alignment=64)  # non-default alignment still loads
    assert read_header(path).alignment == 64
    ck = read_gguf(path)
    assert ck.config["rope_scaling"] is None
    np.testing.assert_array_equal(gguf_dense(ck, "model.norm.weight"), exp["model.norm.weight"])
    write_gguf(path, "qwen2", meta_drop=("attention.head_count_kv", "rope.freq_base", "rope.dimension_count"))
    c = read_gguf(path).config  # GGUF defaults: kv heads = heads, theta 10000, head_dim = hidden / heads
    assert (c["num_key_value_heads"], c["rope_theta"], c["head_dim"]) == (HEADS, 10000.0, H // HEADS)


@pytest.mark.parametrize("extra, want", [
    ({"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 32768},
     {"rope_type": "yarn", "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    ({"rope.scaling.type": "linear", "rope.scaling.factor": 2.0}, {"rope_type": "linear", "type": "linear", "factor": 2.0}),
    ({"rope.scale_linear": 3.0}, {"rope_type": "linear", "type": "linear", "factor": 3.0}),
    ({"rope.scaling.type": "none"}, None),
])
def test_rope_scaling(tmp_path, extra, want):
    path = tmp_path / "r.gguf"
    write_gguf(path, "qwen3", extra=extra)
    assert read_gguf(path).config["rope_scaling"] == want


@pytest.mark.parametrize("extra, match", [
    ({"rope.scaling.type": "longrope", "rope.scaling.factor": 2.0}, "'longrope'"),
    ({"rope.scaling.type": "yarn"}, "'qwen3.rope.scaling.factor'"),
    ({"block_count": "two"}, "'qwen3.block_count' is 'two'"),
])
def test_bad_config_values(tmp_path, extra, match):
    path = tmp_path / "r.gguf"
    write_gguf(path, "qwen3", extra=extra)
    with pytest.raises(ConfigError, match=match) as e:
        read_gguf(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------ bad input


def test_unknown_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, "llama", gguf_arch="gpt2")
    with pytest.raises(ConfigError, match=r"gpt2") as e:
        read_gguf(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("key", ["block_count", "embedding_length", "attention.layer_norm_rms_epsilon", "context_length"])
def test_missing_metadata_key(tmp_path, key):
    path = tmp_path / "m.gguf"
    write_gguf(path, "qwen3", meta_drop=(key,))
    with pytest.raises(ConfigError, match=f"'qwen3.{key}'") as e:
        read_gguf(path)
    assert str(path) in str(e.value)


def test_missing_moe_key(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "qwen3moe", meta_drop=("expert_feed_forward_length",))
    with pytest.raises(ConfigError, match="qwen3moe.expert_feed_forward_length"):
        read_gguf(path)


def test_undecodable_ggml_type(tmp_path):
    """Q5_0 and friends are dequantized now (test_gguf_types); types nothing decodes are refused."""
    path = tmp_path / "q8k.gguf"
    write_gguf(path, "llama", types={"blk.1.ffn_down.weight": T.Q8_K})
    with pytest.raises(WeightsError, match=r"blk\.1\.ffn_down\.weight.*GGML type Q8_K") as e:
        read_gguf(path)
    assert str(path) in str(e.value)


def test_unmapped_tensor(tmp_path):
    path = tmp_path / "u.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for k in ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count"):
        w.add_uint32(f"llama.{k}", 4)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))
    w.add_tensor("rope_freqs.weight", np.ones((2,), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(WeightsError, match=r"rope_freqs\.weight") as e:
        read_gguf(path)
    assert str(path) in str(e.value)


def test_fuzzed_headers_never_crash(tmp_path):
    """Truncations and byte flips anywhere in the header: a QwenMLXError or a clean load."""
    src = tmp_path / "src.gguf"
    write_gguf(src, "qwen3")
    data = src.read_bytes()
    from qwen_mlx.loading.gguf_header import read_header

    hdr_end = read_header(src).data_offset
    rng = np.random.default_rng(0)
    bad = tmp_path / "bad.gguf"
    cuts = list(rng.integers(0, len(data), 40)) + [hdr_end - 1, hdr_end + 1, len(data) - 1]
    variants = [data[:n] for n in cuts]
    for _ in range(120):
        b = bytearray(data)
        for i in rng.integers(0, hdr_end, rng.integers(1, 4)):
            b[i] = int(rng.integers(0, 256))
        variants.append(bytes(b))
    errors = 0
    for v in variants:
        bad.write_bytes(v)
        try:
            read_gguf(bad)
        except QwenMLXError as e:
            assert str(bad) in str(e)
            errors += 1
    assert errors >= len(cuts)  # every truncation is refused


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_synthetic_logits_match_transformers(tmp_path, arch):
    """End to end: the package's models, fed by read_gguf, give transformers' logits."""
    from transformers import AutoModelForCausalLM

    from qwen_mlx.loading.loader import load_model

    torch.set_num_threads(1)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch)
    ids = np.random.default_rng(0).integers(0, V, (1, 12))
    tf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, **TF_OVERRIDES.get(arch, {})
    ).eval()
    with torch.no_grad():
        ref = tf(torch.tensor(ids)).logits.numpy()
    for dequantize in (True, False):
        ours = np.array(load_model(path, dtype=mx.float32, dequantize=dequantize)(mx.array(ids)))
        # |logits| ~ 15; measured max difference <= 1e-4 (float32 summation order)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-4, err_msg=f"{arch} dequantize={dequantize}")
