"""`qwen_mlx.load` on VL checkpoints: chat / stream / sessions with images and videos, against
transformers 5.23 (tiny perturbed Qwen2.5-VL and Qwen3-VL with the real Qwen tokenizer, real
photos from skimage.data); multi-turn reuse of the KV prefix with media (content keys, not
token ids), the vision-feature cache, text-only prompts on the same object, bad input."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import qwen_mlx
from qwen_mlx.errors import MediaError, PromptError
from qwen_mlx.generate import GenerationStats, generate_tokens
from qwen_mlx.generation_config import SamplingParams
from qwen_mlx.multimodal import FeatureCache, media_prefill, split_media
from qwen_mlx.tokenizer.chat import render_template
from qwen_mlx.vision.inputs import TowerOutput
from tests.chat_templates import QWEN_VL_TEMPLATE
from tests.helpers import perturb, torch_setup
from tests.models.vl_configs import hf_classes, text_config, vision_config

skdata = pytest.importorskip("skimage.data")
VOCAB = 151680  # the real Qwen vocabulary (151,669 ids), rounded up
GREEDY = dict(temperature=0, max_tokens=8)
Q = "What is in the picture?"


def vl_dir(path: Path, family: str, tokenizer, max_tokens: int = 64) -> Path:
    """A tiny perturbed HF VL checkpoint with the real tokenizer (default Qwen media token ids)
    and processor configs that keep images at <= ``max_tokens`` placeholders."""
    torch_setup()
    C, M = hf_classes(family)
    cfg = C(text_config=dict(text_config(family), vocab_size=VOCAB), vision_config=vision_config(family),
            tie_word_embeddings=True)
    perturb(M(cfg).float().eval()).save_pretrained(path)
    tokenizer.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    p = 16 if family.startswith("qwen3") else 14
    size = {"shortest_edge": 16 * (2 * p) ** 2, "longest_edge": max_tokens * (2 * p) ** 2}
    (path / "preprocessor_config.json").write_text(json.dumps({"patch_size": p, "size": size}))
    (path / "video_preprocessor_config.json").write_text(json.dumps(
        {"patch_size": p, "size": {"shortest_edge": 8 * (2 * p) ** 2, "longest_edge": 4 * 16 * (2 * p) ** 2}}))
    return path


_BUILT = {}


def tiny_vl(family: str, tokenizer, tmp_path_factory) -> Path:
    """``vl_dir`` of ``family``, built once per test session (callers must not modify it)."""
    if family not in _BUILT:
        _BUILT[family] = vl_dir(tmp_path_factory.mktemp(f"tiny_{family}") / "ckpt", family, tokenizer)
    return _BUILT[family]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    out = {}
    for name in ("chelsea", "astronaut", "coffee"):
        out[name] = d / f"{name}.png"
        Image.fromarray(getattr(skdata, name)()).save(out[name])
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    pytest.importorskip("av")
    from tests.vision.test_video import write_video

    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4")


@pytest.fixture(scope="module")
def llms(tmp_path_factory, qwen_tokenizer):
    """family -> (dir, LLM), loaded once per module."""
    made = {}

    def get(fam):
        if fam not in made:
            path = tiny_vl(fam, qwen_tokenizer, tmp_path_factory)
            made[fam] = path, qwen_mlx.load(path, dtype=mx.float32)
        return made[fam]

    return get


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl"])
def vl(request, llms):
    return (request.param, *llms(request.param))


@pytest.fixture
def q25(llms):
    return llms("qwen2_5_vl")


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def image(src):
    return {"type": "image", "image": src}


def text(t):
    return {"type": "text", "text": t}


def hf_generate(path, family, req, n=8):
    """transformers' greedy tokens on our ids and pixels, decoded."""
    torch = torch_setup()
    hf = hf_classes(family)[1].from_pretrained(path, dtype=torch.float32).eval()
    ids = np.array([req.ids])
    v = req.visual
    t = lambda a: None if a is None else torch.tensor(a)  # noqa: E731
    kw = dict(input_ids=t(ids), mm_token_type_ids=t(np.where(ids == 151655, 1, np.where(ids == 151656, 2, 0))),
              pixel_values=t(v.pixel_values), image_grid_thw=t(v.image_grid_thw),
              pixel_values_videos=t(v.pixel_values_videos), video_grid_thw=t(v.video_grid_thw),
              second_per_grid_ts=t(v.second_per_grid_ts))
    with torch.no_grad():
        out = hf.generate(**{k: x for k, x in kw.items() if x is not None}, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_image_and_video_chat_matches_transformers(vl, photos, clip):
    """Image + video + text: our answer equals transformers' greedy tokens on the same ids and
    pixels; the prompt holds the expanded placeholders (Qwen3-VL: per-frame timestamps)."""
    fam, path, llm = vl
    msgs = user(image(str(photos["chelsea"])), {"type": "video", "video": str(clip)}, text("Compare them."))
    req = llm.prepare_request(msgs, **GREEDY)
    v = req.visual
    assert v.n_images == 1 and v.n_videos == 1
    assert req.ids.count(151655) == int(v.image_grid_thw[0].prod()) // 4
    assert req.ids.count(151656) == int(v.video_grid_thw[0].prod()) // 4
    assert ("seconds>" in req.text) == (fam == "qwen3_vl")
    ref = hf_generate(path, fam, req)
    assert llm.chat(msgs, reuse_cache=False, **GREEDY).content == llm.tokenizer.decode(ref).strip()
    assert llm.generate(msgs, reuse_cache=False, **GREEDY) == llm.tokenizer.decode(ref)


def test_pipeline_matches_transformers_processor(q25, photos, qwen_tokenizer):
    """Expansion and tokenization equal transformers' Qwen2.5-VL processor on our rendered text."""
    from transformers import PreTrainedTokenizerFast

    from tests.vision.test_processing import hf_processor

    path, llm = q25
    req = llm.prepare_request(user(image(str(photos["astronaut"])), text(Q)))
    cfg = json.loads((path / "preprocessor_config.json").read_text())
    tok = PreTrainedTokenizerFast(tokenizer_object=qwen_tokenizer.backend, eos_token="<|im_end|>")
    bare = req.text.replace("<|image_pad|>" * req.ids.count(151655), "<|image_pad|>")
    ref = hf_processor("qwen2_5_vl", tok, dict(cfg, min_pixels=cfg["size"]["shortest_edge"],
                                               max_pixels=cfg["size"]["longest_edge"]))(
        text=[bare], images=[Image.open(photos["astronaut"])], return_tensors="np")
    assert ref["input_ids"][0].tolist() == req.ids
    np.testing.assert_array_equal(ref["pixel_values"], req.visual.pixel_values)


def test_image_inputs_and_keyword_forms_agree(q25, photos):
    _, llm = q25
    p = photos["chelsea"]
    a = np.asarray(Image.open(p).convert("RGB"))
    keys = {tuple(llm.prepare_request(user(image(src), text(Q))).visual.image_keys)
            for src in (str(p), p, p.read_bytes(), Image.open(p), a)}
    assert len(keys) == 1
    assert llm.prepare_request(Q, images=[p]).ids == llm.prepare_request(user(image(p), text(Q))).ids
    assert llm.prepare_request(Q, images=str(p)).ids == llm.prepare_request(Q, images=[p]).ids
    other = llm.prepare_request(Q, images=[photos["coffee"]]).visual.image_keys
    assert other != list(keys.pop())


def test_second_question_prefills_only_new_text(vl, photos):
    """A session: turn 2 about the same image reuses the cached prefix with the image tokens
    and does not run the tower; its answer equals a fresh run of the whole conversation."""
    fam, _, llm = vl
    s = llm.session()
    r1 = s.send(Q, images=[photos["chelsea"]], **GREEDY)
    n1 = r1.stats.prompt_tokens
    assert r1.stats.prefill_tokens == n1 > 64 and s.cache.features.misses == 1
    r2 = s.send("And what colour is it?", **GREEDY)
    ids2 = llm.prepare_request(s.messages[:-1]).ids
    assert r2.stats.prompt_tokens == len(ids2)
    assert r2.stats.prefill_tokens <= len(ids2) - n1 and r2.stats.prefill_tokens < 40
    assert s.cache.features.misses == 1  # no tower run in turn 2
    fresh = llm.chat(s.messages[:-1], reuse_cache=False, **GREEDY)
    assert r2.content == fresh.content
    # an explicit history: exactly the new text (assistant answer + question) is prefilled
    msgs = user(image(str(photos["chelsea"])), text(Q))
    first = llm.chat(msgs, **GREEDY)
    follow = msgs + [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Sure?"}]
    ids1, ids = llm.prepare(msgs)[0], llm.prepare(follow)[0]
    chunks = list(llm.stream(follow, **GREEDY))
    assert chunks[-1].stats.prefill_tokens == len(ids) - len(ids1)
    assert "".join(c.text for c in chunks) == llm.generate(follow, reuse_cache=False, **GREEDY)


def test_different_image_at_same_place_is_not_reused(vl, photos):
    fam, _, llm = vl
    a = user(image(str(photos["chelsea"])), text(Q))
    b = user(image(str(photos["astronaut"])), text(Q))
    llm.generate(a, **GREEDY)
    ids = llm.prepare(b)[0]
    chunks = list(llm.stream(b, **GREEDY))
    first_pad = ids.index(151655)
    assert chunks[-1].stats.prefill_tokens == len(ids) - first_pad  # the match ends at the image
    assert "".join(c.text for c in chunks) == llm.generate(b, reuse_cache=False, **GREEDY)
    again = list(llm.stream(b, **GREEDY))  # the same request again: everything but 1 token reused
    assert again[-1].stats.prefill_tokens == 1
    assert "".join(c.text for c in again) == "".join(c.text for c in chunks)


def test_feature_cache_skips_tower_when_prefix_differs(q25, photos):
    """A new system prompt breaks the KV prefix before the image; its features come from the cache."""
    _, llm = q25
    msgs = user(image(str(photos["coffee"])), text(Q))
    llm.generate(msgs, **GREEDY)
    feats = llm._cache.features
    misses, hits = feats.misses, feats.hits
    out = llm.generate(msgs, system="Answer in French.", **GREEDY)
    assert feats.misses == misses and feats.hits == hits + 1
    assert out == llm.generate(msgs, system="Answer in French.", reuse_cache=False, **GREEDY)


def test_text_only_prompt_after_an_image(vl, photos):
    """The same object serves text: after an image request (rope delta != 0 in the cache), a
    text-only prompt gives the answer of a fresh text-only run."""
    _, _, llm = vl
    llm.generate(Q, images=[photos["chelsea"]], **GREEDY)
    assert llm._cache.cache.rope_delta != 0
    out = llm.generate("Tell me about cats.", **GREEDY)
    assert llm._cache.cache.rope_delta == 0
    assert out == llm.generate("Tell me about cats.", reuse_cache=False, **GREEDY)


def test_chunked_prefill_slices_embeddings(vl, photos):
    """generate_tokens with an embedded prefill in chunks of 7 equals one chunk (deepstack sliced)."""
    _, _, llm = vl
    req = llm.prepare_request(user(image(str(photos["astronaut"])), text(Q)), **GREEDY)
    outs = []
    for step in (7, 4096):
        pc, stats = llm.new_cache(), GenerationStats()
        outs.append(list(generate_tokens(llm.model, req.ids, SamplingParams(temperature=0, max_tokens=6), pc,
                                         (), prefill_step=step, stats=stats,
                                         prefill=media_prefill(llm.model, req.ids, req.visual, pc))))
        assert stats.prefill_tokens == len(req.ids) and len(pc.tokens) == len(req.ids) + 5
    assert outs[0] == outs[1]


def test_bad_media_input(q25, photos, tiny_llm, tmp_path):
    _, llm = q25
    with pytest.raises(PromptError, match="text-only.*images"):
        tiny_llm.generate(Q, images=[photos["chelsea"]])
    with pytest.raises(PromptError, match="text-only.*videos"):
        tiny_llm.chat(user({"type": "video", "video": "clip.mp4"}, text(Q)))
    with pytest.raises(PromptError, match="no 'image' source"):
        llm.generate(user({"type": "image"}, text(Q)))
    with pytest.raises(MediaError, match="no such image file"):
        llm.generate(Q, images=[tmp_path / "missing.jpg"])
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(MediaError):
        llm.generate(Q, images=[tmp_path / "bad.jpg"])
    with pytest.raises(PromptError, match="placeholders"):
        llm.generate("no placeholder here", raw=True, images=[photos["chelsea"]])
    with pytest.raises(PromptError, match=r"<\|image_pad\|> but no image"):
        llm.generate("look: <|image_pad|>")
    with pytest.raises(PromptError, match="string prompt"):
        llm.generate(user(text(Q)), images=[photos["chelsea"]])
    with pytest.raises(PromptError, match="ends inside an image"):
        llm.generate("<|vision_start|><|image_pad|>", raw=True, images=[photos["chelsea"]])


def test_raw_prompt_with_placeholders(q25, photos):
    _, llm = q25
    raw = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + Q + "<|im_end|>\n<|im_start|>assistant\n"
    assert llm.prepare_request(raw, raw=True, images=[photos["chelsea"]]).ids == \
        llm.prepare_request(Q, images=[photos["chelsea"]]).ids


def test_chatml_fallback_renders_media_like_qwen_vl_templates(qwen_tokenizer):
    msgs = [{"role": "system", "content": "S"},
            {"role": "user", "content": [image("a.jpg"), {"type": "image_url", "image_url": {"url": "b.png"}},
                                         {"type": "video", "video": "v.mp4"}, text("Compare.")]},
            {"role": "assistant", "content": "Two cats."},
            {"role": "user", "content": [text("And "), image("c.jpg"), text("?")]}]
    ours = qwen_tokenizer.apply_chat_template(msgs)
    assert ours == render_template(QWEN_VL_TEMPLATE, msgs)
    assert ours.count("<|vision_start|><|image_pad|><|vision_end|>") == 3 and ours.count("<|video_pad|>") == 1
    bare, images, videos = split_media(msgs)
    assert images == ["a.jpg", "b.png", "c.jpg"] and videos == ["v.mp4"]
    assert qwen_tokenizer.apply_chat_template(bare) == ours and msgs[1]["content"][0]["image"] == "a.jpg"


def test_feature_cache_is_a_bounded_lru():
    row = lambda n: TowerOutput(mx.zeros((n, 16)), [mx.zeros((n, 16))])  # noqa: E731  n * 128 bytes
    c = FeatureCache(max_bytes=1000, max_items=3)
    c.put("a", row(2))
    c.put("b", row(2))
    c.put("c", row(2))
    assert c.lookup(["a"]).keys() == {"a"}  # a is now the most recent
    c.put("d", row(2))  # over 3 items: b (least recent) goes
    assert "b" not in c and {"a", "c", "d"} <= set(c._items) and c.nbytes == 768
    c.put("e", row(4))  # 512 more bytes: c and d go
    assert set(c._items) == {"d", "e"} and c.nbytes == 768
    c.put("huge", row(100))  # larger than the whole cache: not kept
    assert "huge" not in c and len(c) == 2
