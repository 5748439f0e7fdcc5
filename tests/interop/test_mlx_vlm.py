"""qwen_mlx <-> mlx-vlm 0.7.10 on VL checkpoints (tiny perturbed models in the hub layout, the
real tokenizer, a real photo).

- ``mlx_vlm.convert`` output (4-bit, group 32; mlx-vlm keeps the vision tower float) loads in
  qwen_mlx: image-prompt logits equal mlx-vlm's own model on that directory, and our cached
  greedy tokens equal mlx-vlm's (full forward each step), for Qwen2.5-VL and Qwen3-VL.
- Our converted Qwen2.5-VL directories (4-bit with a float tower, and ``vl-4bit``: 8-bit tower)
  load in mlx-vlm with the same logits. Qwen3-VL directories we write do not: mlx-vlm reads
  that family only from a nested ``text_config`` and ``model.language_model.*`` names, while
  our converted layout is flat with ``model.*`` names (see the report).
"""

import shutil

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import qwen_mlx
from qwen_mlx.generate import generate_tokens
from qwen_mlx.generation_config import SamplingParams
from qwen_mlx.multimodal import media_prefill
from qwen_mlx.quant import ConvertOptions, convert
from tests.helpers import REL_TOL
from tests.models.test_vl import write_hub_layout
from tests.test_multimodal import tiny_vl

pytest.importorskip("mlx_vlm")
skdata = pytest.importorskip("skimage.data")
SIDE = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
N = 6


def rel_err(a, b) -> float:  # over full-vocabulary logits: in MLX, it is 20x faster than numpy float64
    a, b = mx.array(a), mx.array(b)
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


@pytest.fixture(scope="module")
def cat(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "cat.png"
    Image.fromarray(skdata.chelsea()).save(p)
    return p


@pytest.fixture(scope="module")
def hub(tmp_path_factory, qwen_tokenizer):
    """family -> a tiny checkpoint in the hub layout (what mlx-vlm converts)."""
    made = {}

    def get(fam):
        if fam not in made:
            root = tmp_path_factory.mktemp(f"hub_{fam}")
            src = tiny_vl(fam, qwen_tokenizer, tmp_path_factory)
            made[fam] = write_hub_layout(src, fam, root / "hub")
            for f in SIDE:
                shutil.copy(src / f, made[fam] / f)
        return made[fam]

    return get


def vlm_logits(vm, ids, visual):
    out = vm(mx.array([ids]), pixel_values=mx.array(visual.pixel_values),
             image_grid_thw=mx.array(visual.image_grid_thw))
    return out.logits.astype(mx.float32)


def ours_logits(model, req):
    cache = model.make_cache()
    mm = model.embed_multimodal(np.array([req.ids]), req.visual, cache)
    return model(None, cache, mm.input_embeds, mm.positions, mm.deepstack)


def vlm_decode(vm, req, n=N):
    """mlx-vlm's own cached greedy loop: (tokens, log-probabilities of each step)."""
    from mlx_vlm.generate.ar import generate_step

    steps = list(generate_step(mx.array([req.ids]), vm, mx.array(req.visual.pixel_values), None, max_tokens=n,
                               temperature=0.0, image_grid_thw=mx.array(req.visual.image_grid_thw)))
    return [t for t, _ in steps], [lp.reshape(-1) for _, lp in steps]


def ours_logprobs(model, req, tokens):
    """Our prefill then cached decode fed ``tokens``: log-probabilities before each."""
    cache = model.make_cache()
    mm = model.embed_multimodal(np.array([req.ids]), req.visual, cache)
    logits = model(None, cache, mm.input_embeds, mm.positions, mm.deepstack)[0, -1]
    out = []
    for t in tokens:
        out.append(logits - mx.logsumexp(logits))
        logits = model(mx.array([[t]]), cache=cache)[0, -1]
    return out


def ours_greedy(llm, req, n=N):
    pc = llm.new_cache()
    return list(generate_tokens(llm.model, req.ids, SamplingParams(temperature=0, max_tokens=n), pc, (),
                                prefill=media_prefill(llm.model, req.ids, req.visual, pc)))


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl"])
def test_mlx_vlm_converted_dir_loads_in_qwen_mlx(hub, cat, tmp_path, fam):
    from mlx_vlm.convert import convert as vlm_convert
    from mlx_vlm.utils import load_model as vlm_load

    dst = tmp_path / "vlm4"
    vlm_convert(str(hub(fam)), str(dst), quantize=True, q_bits=4, q_group_size=32)
    vm = vlm_load(dst)
    assert type(vm.language_model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    llm = qwen_mlx.load(dst, dtype=mx.float32)  # CPU: dequantized to float32 at load
    req = llm.prepare_request("What is in the picture?", images=[cat])
    ref = vlm_logits(vm, req.ids, req.visual)
    assert rel_err(ours_logits(llm.model, req), ref) <= REL_TOL
    packed = qwen_mlx.load_model(dst, dequantize=False)
    assert rel_err(ours_logits(packed, req), ref) <= REL_TOL
    tokens, logprobs = vlm_decode(vm, req)
    assert ours_greedy(llm, req) == tokens
    for a, b in zip(ours_logprobs(llm.model, req, tokens), logprobs):  # decode: offset + rope delta
        assert rel_err(a, b) <= REL_TOL
    source = qwen_mlx.load(hub(fam), dtype=mx.float32)
    assert rel_err(ours_logits(source.model, req), ref) > 1e-4  # the converted model is quantized


@pytest.mark.parametrize("recipe", ["uniform", "vl-4bit"])
def test_our_qwen2_5_vl_dir_loads_in_mlx_vlm(hub, cat, tmp_path, recipe):
    from mlx_vlm.utils import load_model as vlm_load

    res = convert(hub("qwen2_5_vl"), tmp_path / "q", ConvertOptions(recipe=recipe, bits=4, group_size=32))
    vm = vlm_load(res.path)
    qkv = vm.vision_tower.blocks[0].attn.qkv
    if recipe == "uniform":
        assert type(qkv).__name__ == "Linear"
    else:
        assert type(qkv).__name__ == "QuantizedLinear" and qkv.bits == 8
    assert vm.language_model.model.layers[0].self_attn.q_proj.bits == 4
    llm = qwen_mlx.load(res.path, dtype=mx.float32)
    req = llm.prepare_request("What is in the picture?", images=[cat])
    assert rel_err(ours_logits(llm.model, req), vlm_logits(vm, req.ids, req.visual)) <= REL_TOL
    tokens, logprobs = vlm_decode(vm, req)
    assert ours_greedy(llm, req) == tokens
    for a, b in zip(ours_logprobs(llm.model, req, tokens), logprobs):
        assert rel_err(a, b) <= REL_TOL
