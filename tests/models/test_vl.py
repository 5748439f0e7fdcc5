"""VL families against transformers 5.23: tiny random models (text hidden 64, 2 layers, vision
depth 2) with every parameter perturbed, saved with save_pretrained and loaded with
`load_model`. Full-model logits with two images of different sizes, with video and with
image + video, greedy tokens through the cache (rope delta), text-only prompts, the hub 4.x
checkpoint layout, a feature cache and a prefill that starts after a cached prefix."""

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qwen_mlx import load_model
from qwen_mlx.errors import PromptError, WeightsError
from qwen_mlx.vision.inputs import VisualInputs
from tests.helpers import REL_TOL, perturb, rel_err, torch_setup
from tests.models.vl_configs import FAMILIES, PATCH, build_batch, hf_model, token_types

IMAGES = [[("t", 3), ("i", (1, 4, 6)), ("t", 2), ("i", (1, 8, 4)), ("t", 4)]]
VIDEO = [[("t", 2), ("v", (3, 4, 4)), ("t", 3)]]
IMAGE_VIDEO = [[("t", 2), ("i", (1, 6, 4)), ("t", 1), ("v", (2, 4, 4)), ("t", 2)]]
MIXED = [[("t", 2), ("i", (1, 4, 4)), ("t", 3)], [("t", 11)]]  # row 2 has no image
SECONDS = {"qwen2_5_vl": [0.5]}  # Qwen2.5-VL: 4 tokens/s x 0.5 s per grid step


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(family, perturbed HF model, our model loaded from its save_pretrained dir, the dir)."""
    fam = request.param
    hf = perturb(hf_model(fam))
    path = tmp_path_factory.mktemp(fam) / "hf"
    hf.save_pretrained(path)
    return fam, hf, load_model(path, dtype=mx.float32), path


def media(fam, rows, seed=0, video_seconds=None):
    ids, _, images, videos = build_batch(rows, fam)
    rng = np.random.default_rng(seed + 1)
    width = 3 * 2 * PATCH[fam] ** 2
    pix = lambda g: None if g is None else rng.standard_normal((int(g.prod(1).sum()), width)).astype(np.float32)  # noqa: E731
    vis = VisualInputs(pixel_values=pix(images), image_grid_thw=images, pixel_values_videos=pix(videos),
                       video_grid_thw=videos)
    if videos is not None and fam in SECONDS:
        vis.second_per_grid_ts = np.array(video_seconds or SECONDS[fam] * len(videos), np.float32)
    return ids, vis


def hf_kwargs(ids, vis):
    torch = torch_setup()
    t = lambda a: None if a is None else torch.tensor(a)  # noqa: E731
    kw = dict(input_ids=t(ids), mm_token_type_ids=t(token_types(ids)), pixel_values=t(vis.pixel_values),
              image_grid_thw=t(vis.image_grid_thw), pixel_values_videos=t(vis.pixel_values_videos),
              video_grid_thw=t(vis.video_grid_thw))
    if vis.second_per_grid_ts is not None:
        kw["second_per_grid_ts"] = t(vis.second_per_grid_ts)
    return {k: v for k, v in kw.items() if v is not None}


def hf_forward(hf, ids, vis):
    torch = torch_setup()
    with torch.no_grad():
        return hf(**hf_kwargs(ids, vis)).logits.numpy()


def ours_forward(model, ids, vis, cache=None, features=None):
    cache = cache if cache is not None else model.make_cache()
    mm = model.embed_multimodal(ids, vis, cache, features)
    return np.array(model(None, cache, mm.input_embeds, mm.positions, mm.deepstack)), cache, mm


@pytest.mark.parametrize("rows", [IMAGES, VIDEO, IMAGE_VIDEO, MIXED], ids=["images", "video", "image_video", "mixed"])
def test_logits_parity(pair, rows):
    fam, hf, model, _ = pair
    ids, vis = media(fam, rows)
    ref = hf_forward(hf, ids, vis)
    ours, cache, mm = ours_forward(model, ids, vis)
    assert ours.shape == ref.shape
    err = rel_err(ours, ref)
    assert err <= REL_TOL, f"{fam} logits rel err {err:.2e}"
    assert (mm.rope_delta != 0).any() and cache.rope_delta is not None
    if fam.startswith("qwen3"):
        assert mm.deepstack is not None and len(mm.deepstack) == 2
    if rows is MIXED:
        assert mm.rope_delta[1] == 0 and mm.rope_delta[0] != 0


@pytest.mark.parametrize("rows", [IMAGES, MIXED, VIDEO], ids=["images", "mixed_batch", "video"])
def test_greedy_tokens_match(pair, rows):
    """transformers' generate vs our prefill + cached decode at offset + rope_delta."""
    torch = torch_setup()
    fam, hf, model, _ = pair
    ids, vis = media(fam, rows)
    n = 8
    with torch.no_grad():
        ref = hf.generate(**hf_kwargs(ids, vis), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:].numpy()
    logits, cache, _ = ours_forward(model, ids, vis)
    logits, out, steps = mx.array(logits), [], []
    for _ in range(n):
        tok = mx.argmax(logits[:, -1], axis=-1)
        out.append(np.array(tok))
        logits = model(tok[:, None], cache=cache)
        steps.append(np.array(logits))
    np.testing.assert_array_equal(np.stack(out, axis=1), ref)
    # the decode logits themselves (greedy tokens of a tiny model barely feel a position
    # shift): transformers' one-pass forward over prompt + answer places the answer likewise
    full = hf_forward(hf, np.concatenate([ids, ref], axis=1), vis)
    L = ids.shape[1]
    assert rel_err(np.concatenate(steps[:-1], axis=1), full[:, L:L + n - 1]) <= REL_TOL


def test_text_only_prompt(pair):
    """The same loaded object serves text: logits equal transformers' text-only forward,
    plain RoPE (no rope delta), and cached decode equals the full forward."""
    torch = torch_setup()
    fam, hf, model, _ = pair
    ids = np.random.default_rng(3).integers(1, 280, size=(2, 10))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    full = np.array(model(mx.array(ids)))
    assert rel_err(full, ref) <= REL_TOL
    cache = model.make_cache()
    parts = [model(mx.array(ids[:, :6]), cache=cache)] + [model(mx.array(ids[:, t:t + 1]), cache=cache)
                                                         for t in range(6, 10)]
    assert rel_err(np.array(mx.concatenate(parts, axis=1)), ref) <= REL_TOL
    assert cache.rope_delta == 0


def test_feature_cache_skips_the_tower(pair):
    fam, _, model, _ = pair
    ids, vis = media(fam, IMAGE_VIDEO)
    vis.image_keys, vis.video_keys = ["img-a"], ["vid-a"]
    first, _, mm = ours_forward(model, ids, vis)
    assert sorted(mm.features) == ["img-a", "vid-a"]
    vis.pixel_values = vis.pixel_values_videos = None  # the tower cannot run now
    again, cache, mm2 = ours_forward(model, ids, vis, features=mm.features)
    np.testing.assert_array_equal(again, first)
    assert mm2.features == {} and cache.media == ["img-a", "vid-a"]


def test_prefill_after_cached_prefix(pair):
    """Turn 2 of a chat: the cache holds turn 1 (text + image 1); the new part holds more text
    and image 2. Logits of the new part equal transformers' over the whole prompt."""
    fam, hf, model, _ = pair
    ids, vis = media(fam, IMAGES)
    k = int(np.flatnonzero(ids[0] == 292)[1])  # the second vision_start: image 1 lies before
    n1 = int(vis.image_grid_thw[0].prod())
    first = VisualInputs(pixel_values=vis.pixel_values[:n1], image_grid_thw=vis.image_grid_thw[:1])
    cache = model.make_cache()
    ours_forward(model, ids[:, :k], first, cache)
    assert cache[0].offset == k
    vis.image_keys = ["one", "two"]
    tail, _, mm = ours_forward(model, ids, vis, cache)
    assert list(mm.features) == ["two"]  # image 1 lies in the cached prefix: no tower run
    assert tail.shape[1] == ids.shape[1] - k
    assert rel_err(tail, hf_forward(hf, ids, vis)[:, k:]) <= REL_TOL


def write_hub_layout(path, fam, out):
    """The checkpoint as the hub holds it: Qwen2(.5)-VL as written by 4.x (text keys at the
    top level, ``model.layers`` / ``visual``); Qwen3-VL(-MoE) with 4.57 ``rope_scaling`` keys
    and, for MoE, experts stored (E, H, 2I) / (E, I, H)."""
    cfg = json.loads((path / "config.json").read_text())
    w = load_file(str(path / "model.safetensors"))
    text = cfg.pop("text_config")
    rp = text.pop("rope_parameters")
    theta = rp.pop("rope_theta")
    cfg["vision_config"]["model_type"] = fam
    if fam in ("qwen2_vl", "qwen2_5_vl"):
        rp.pop("rope_type")
        cfg.update({k: v for k, v in text.items() if k != "model_type"},
                   rope_theta=theta, rope_scaling=dict(rp, type="mrope"))
        w = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
             for k, v in w.items()}
    else:
        text["num_experts"] = text.pop("num_local_experts", None)
        text["tie_word_embeddings"] = cfg["tie_word_embeddings"]  # hub configs agree on it
        cfg["text_config"] = dict(text, rope_theta=theta, rope_scaling=rp)
        w = {k: v.transpose(0, 2, 1).copy() if ".experts." in k else v for k, v in w.items()}
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(out / "model.safetensors"))
    return out


def assert_same_parameters(a, b):
    from mlx.utils import tree_flatten

    a, b = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k


def test_hub_layout_loads_the_same_weights(pair, tmp_path):
    fam, _, model, path = pair
    hub = load_model(write_hub_layout(path, fam, tmp_path / "hub"), dtype=mx.float32)
    assert_same_parameters(model, hub)
    assert hub.args.mrope_section == model.args.mrope_section and hub.args.rope_theta == model.args.rope_theta


def test_converted_dir_round_trip(pair, tmp_path):
    """Our lossless conversion (stamped; Qwen3-VL in transformers' layout) loads back to the same model."""
    from qwen_mlx.loading.loader import load_checkpoint
    from qwen_mlx.loading.writer import save_checkpoint

    fam, _, model, path = pair
    out = save_checkpoint(load_checkpoint(path), path, tmp_path / "converted")
    cfg = json.loads((out / "config.json").read_text())
    assert "qwen_mlx_format" in cfg and ("text_config" in cfg) == fam.startswith("qwen3")
    assert_same_parameters(model, load_model(out, dtype=mx.float32))


def test_mlx_vlm_converted_dir_loads(pair, tmp_path):
    """A directory in mlx-vlm's layout (``language_model.model``, ``vision_tower``,
    channels-last patch Conv3d, split experts), made by mlx-vlm's own loader."""
    pytest.importorskip("mlx_vlm")
    from mlx.utils import tree_flatten
    from mlx_vlm.utils import load_model as vlm_load

    fam, _, model, path = pair
    hub = write_hub_layout(path, fam, tmp_path / "hub")
    weights = dict(tree_flatten(vlm_load(hub).parameters()))
    assert weights["vision_tower.patch_embed.proj.weight"].shape[-1] == 3  # channels-last
    out = tmp_path / "mlx_vlm"
    out.mkdir()
    (out / "config.json").write_text((hub / "config.json").read_text())
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    assert_same_parameters(model, load_model(out, dtype=mx.float32))


def test_bad_inputs_raise(pair):
    fam, _, model, _ = pair
    ids, vis = media(fam, IMAGES)
    with pytest.raises(PromptError, match="more image placeholder runs than images given"):
        model.embed_multimodal(ids, VisualInputs())
    short = VisualInputs(pixel_values=vis.pixel_values[:-1], image_grid_thw=vis.image_grid_thw)
    with pytest.raises(PromptError, match="pixel rows"):
        model.embed_multimodal(ids, short)
    with pytest.raises(PromptError, match="tokens but the prompt holds 6 placeholders"):
        model.embed_multimodal(ids, VisualInputs(vis.pixel_values, vis.image_grid_thw[::-1] * [1, 2, 1]))


def test_tied_embeddings(tmp_path):
    torch_setup()
    hf = perturb(hf_model("qwen2_vl", tie=True))
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=mx.float32)
    assert model.args.tie_word_embeddings and "lm_head" not in model
    ids, vis = media("qwen2_vl", IMAGES)
    assert rel_err(ours_forward(model, ids, vis)[0], hf_forward(hf, ids, vis)) <= REL_TOL


def test_fused_expert_shapes_checked():
    from qwen_mlx.loading.remap import remap_weights
    from qwen_mlx.models.qwen3_vl_moe import REMAP

    cfg = {"hidden_size": 64, "moe_intermediate_size": 40}
    good = remap_weights({"model.language_model.layers.0.mlp.experts.gate_up_proj": mx.zeros((4, 64, 80))},
                         rules=REMAP, cfg=cfg)
    assert good["model.layers.0.mlp.switch_mlp.up_proj.weight"].shape == (4, 40, 64)
    with pytest.raises(WeightsError, match="gate_up_proj.*neither"):
        remap_weights({"model.layers.0.mlp.experts.gate_up_proj": mx.zeros((4, 80, 63))}, rules=REMAP, cfg=cfg)


def test_llm_load_serves_text_prompts(tmp_path, qwen_tokenizer):
    """`qwen_mlx.load` on a VL checkpoint with the real Qwen tokenizer (vocabulary widened to
    151,680 rows): chat generation runs on the VL object, greedy tokens equal a plain cached
    decode of the same model; `info` reports the capabilities."""
    import qwen_mlx

    hf_model("qwen2_vl", tie=True).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = 151680
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    w = load_file(str(tmp_path / "model.safetensors"))
    w["model.language_model.embed_tokens.weight"] = np.random.default_rng(0).standard_normal(
        (151680, 64)).astype(np.float32)
    save_file(w, str(tmp_path / "model.safetensors"))
    qwen_tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                "pad_token": "<|endoftext|>"}))
    llm = qwen_mlx.load(tmp_path, dtype=mx.float32)
    assert {"vision", "video"} <= set(llm.info()["capabilities"])
    ids, _, _ = llm.prepare("Describe the sea.", raw=True)
    cache, ref = llm.model.make_cache(), []
    logits = llm.model(mx.array([ids]), cache=cache)
    for _ in range(6):
        ref.append(int(mx.argmax(logits[0, -1])))
        logits = llm.model(mx.array([ref[-1:]]), cache=cache)
    eos = [i for i, t in enumerate(ref) if t in llm.eos_ids]
    ref = ref[:eos[0]] if eos else ref
    assert llm.generate("Describe the sea.", raw=True, temperature=0, max_tokens=6) == llm.tokenizer.decode(ref)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("top,text", [(None, True), (False, True), (True, False)])
def test_tie_rule_follows_transformers(fam, top, text):
    """transformers 5.23 ties Qwen2(.5)-VL when either level says so, Qwen3-VL by the top level."""
    from qwen_mlx.config import fold_text_config
    from tests.models.vl_configs import hf_classes, text_config, vision_config

    raw = {"text_config": dict(text_config(fam), tie_word_embeddings=text), "vision_config": vision_config(fam)}
    if top is not None:
        raw["tie_word_embeddings"] = top
    expected = hf_classes(fam)[0](**raw).tie_word_embeddings
    assert fold_text_config({"model_type": fam, **raw})["tie_word_embeddings"] == expected
