"""Image processors and prompt expansion against transformers 5.23.

The reference is ``Qwen2VLImageProcessorPil`` (what ``Qwen2VLImageProcessor`` falls back to
without torchvision) and the real ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` /
``Qwen3VLProcessor`` with the real Qwen tokenizer. Their constructors type-check the video
processor against a class registry that is a stub without torchvision, so the tests subclass
them with that check disabled; everything else is transformers' own code.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen_mlx.errors import ConfigError, MediaError, PromptError
from qwen_mlx.vision.inputs import VisualInputs
from qwen_mlx.vision.processing import (
    CLIP_MEAN,
    CLIP_STD,
    ImageProcessorConfig,
    PixelCapWarning,
    VisionProcessor,
    expand_prompt,
    load_processor_configs,
    num_placeholder_tokens,
    smart_resize,
)
from qwen_mlx.vision.video import smart_resize_video

skdata = pytest.importorskip("skimage.data")
PHOTOS = ["astronaut", "coffee", "camera", "chelsea", "rocket"]
# preprocessor_config.json of the Hub checkpoints
QWEN2_HUB = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
             "merge_size": 2, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
QWEN3_HUB = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
             "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
QWEN3_VIDEO_HUB = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16,
                   "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def photo(name):
    return getattr(skdata, name)()


def crops(a):
    """Full photo plus odd sizes and aspect ratios (1x1 is upscaled by transformers too)."""
    return [a, a[:37, :211], a[5:216, 9:46], a[:1, :1], a[3:60, 100:101 + 190], a[:29, :29]]


def hf_image_processor(cfg: dict):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**cfg)


def hf_pixels_at(ref, image: np.ndarray, h: int, w: int) -> np.ndarray:
    """transformers' PIL-path steps at a forced output size: resize, rescale, normalise, patchify."""
    from transformers.image_processing_backends import PilBackend
    from transformers.image_utils import SizeDict

    chw = np.moveaxis(np.asarray(Image.fromarray(image).convert("RGB")), -1, 0)
    chw = PilBackend.resize(ref, chw, SizeDict(height=h, width=w), resample=ref.resample)
    x = ref.normalize(ref.rescale(chw, ref.rescale_factor), ref.image_mean, ref.image_std)
    return ref.patchify(x, ref.patch_size, ref.merge_size, ref.temporal_patch_size)[0]


def _no_class_check(cls):
    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": lambda self, name, arg: type(arg)})


@pytest.fixture(scope="module")
def hf_tokenizer(qwen_tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=qwen_tokenizer.backend)


def hf_processor(family, tokenizer, image_cfg, video_processor=None):
    import transformers

    cls = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
           "qwen3_vl": transformers.Qwen3VLProcessor}[family]
    return _no_class_check(cls)(image_processor=hf_image_processor(image_cfg), tokenizer=tokenizer,
                                video_processor=video_processor)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_video

    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 200), (37, 211), (211, 37), (28, 28), (4000, 3000), (11, 2000), (10000, 10000)]
    sizes += [tuple(int(x) for x in rng.integers(1, 5000, 2)) for _ in range(200)]
    checked = 0
    for h, w in sizes:
        for factor, lo, hi in ((28, 3136, 1003520), (28, 3136, 12845056), (32, 65536, 16777216), (32, 4096, 50000)):
            try:
                ref = hf(h, w, factor, lo, hi)
            except ValueError:
                with pytest.raises(MediaError, match="aspect ratio"):
                    smart_resize(h, w, factor, lo, hi)
                continue
            assert smart_resize(h, w, factor, lo, hi) == ref
            checked += 1
            for t in (2, 3, 8, 64):
                assert smart_resize_video(t, h, w, 2, factor, lo, hi * 4) == hf_video(t, h, w, 2, factor, lo, hi * 4)
    assert checked > 700
    with pytest.raises(MediaError, match="aspect ratio"):
        smart_resize(1, 201)


@pytest.mark.parametrize("family,cfg", [("qwen2_vl", {}), ("qwen2_5_vl", QWEN2_HUB), ("qwen3_vl", QWEN3_HUB)])
def test_images_match_transformers_exactly(family, cfg):
    ref = hf_image_processor(cfg)
    ours = VisionProcessor(family, image=ImageProcessorConfig.from_dict(cfg, VisionProcessor(family).image))
    batch = []
    for name in PHOTOS:
        for a in crops(photo(name)):
            im = Image.fromarray(a)
            batch.append(im)
            r, o = ref(images=[im], return_tensors="np"), ours(images=[im])
            np.testing.assert_array_equal(o.image_grid_thw, r["image_grid_thw"])
            assert o.pixel_values.dtype == np.float32 and o.pixel_values.shape == r["pixel_values"].shape
            assert np.abs(o.pixel_values - r["pixel_values"]).max() <= 1e-6
            h, w = a.shape[:2]
            # the per-image token count transformers reports without an image (vLLM's hook)
            assert ours.num_image_tokens(h, w) == ref.get_number_of_image_patches(h, w) // 4
    # several images in one request: rows concatenated in order
    r, o = ref(images=batch, return_tensors="np"), ours(images=batch)
    np.testing.assert_array_equal(o.image_grid_thw, r["image_grid_thw"])
    np.testing.assert_array_equal(o.pixel_values, r["pixel_values"])
    assert len(o.image_keys) == len(batch) and o.pixel_values_videos is None


def test_numpy_and_alpha_inputs_match_transformers():
    """transformers' numpy path (grey 2-D, RGB, RGBA composited onto white) and PIL alpha modes."""
    ref = hf_image_processor(QWEN3_HUB)
    ours = VisionProcessor("qwen3_vl")
    a = photo("chelsea")[:97, :131]
    alpha = np.linspace(0, 255, a.shape[1]).astype(np.uint8)[None, :].repeat(a.shape[0], 0)
    rgba = np.dstack([a, alpha])
    pal = Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    grey = photo("camera")[:61, :83]
    cases = [(grey, grey[..., None]), (a, a), (rgba, rgba), (Image.fromarray(rgba),) * 2,
             (Image.fromarray(rgba).convert("LA"),) * 2, (pal, pal)]
    for x, x_ref in cases:  # transformers takes greyscale arrays as (H, W, 1), we also take (H, W)
        r, o = ref(images=[x_ref], return_tensors="np"), ours(images=[x])
        np.testing.assert_array_equal(o.image_grid_thw, r["image_grid_thw"])
        np.testing.assert_array_equal(o.pixel_values, r["pixel_values"])
    # the alpha matters: compositing on white differs from dropping it
    assert not np.array_equal(ours(images=[rgba]).pixel_values, ours(images=[a]).pixel_values)


def test_expand_prompt_matches_transformers_processors(hf_tokenizer):
    images = [Image.fromarray(photo("astronaut")[:100, :150]), Image.fromarray(photo("coffee")[:37, :211])]
    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Compare with "
            "<|vision_start|><|image_pad|><|vision_end|>.<|im_end|>\n<|im_start|>assistant\n")
    for family, cfg in (("qwen2_vl", {}), ("qwen2_5_vl", QWEN2_HUB), ("qwen3_vl", QWEN3_HUB)):
        hf = hf_processor(family, hf_tokenizer, cfg)
        ref = hf(text=[text], images=images)
        proc = VisionProcessor(family, image=ImageProcessorConfig.from_dict(cfg, VisionProcessor(family).image))
        vi = proc(images=images)
        expanded = proc.expand_prompt(text, vi)
        assert hf_tokenizer(expanded)["input_ids"] == ref["input_ids"][0]
        assert hf_tokenizer.decode(ref["input_ids"][0]) == expanded
        n = sum(num_placeholder_tokens(g) for g in vi.image_grid_thw)
        assert expanded.count("<|image_pad|>") == n == sum(np.asarray(ref["mm_token_type_ids"][0]) == 1) > 2


def test_expand_prompt_errors():
    vi = VisualInputs(image_grid_thw=np.array([[1, 4, 6]]))
    assert expand_prompt("a<|image_pad|>b", vi, "qwen2_vl") == "a" + "<|image_pad|>" * 6 + "b"
    with pytest.raises(PromptError, match="2 <\\|image_pad\\|>"):
        expand_prompt("<|image_pad|><|image_pad|>", vi, "qwen2_vl")
    with pytest.raises(PromptError, match="0 <\\|image_pad\\|>"):
        expand_prompt("no placeholder", vi, "qwen2_vl")
    with pytest.raises(PromptError, match="1 <\\|video_pad\\|>"):
        expand_prompt("<|image_pad|><|video_pad|>", vi, "qwen2_vl")
    with pytest.raises(PromptError, match="timestamps"):
        expand_prompt("<|video_pad|>", VisualInputs(video_grid_thw=np.array([[1, 2, 2]])), "qwen3_vl")
    with pytest.raises(ConfigError, match="qwen9_vl"):
        expand_prompt("x", vi, "qwen9_vl")


def test_request_pixel_cap_resizes_down_with_a_warning():
    ref = hf_image_processor(QWEN3_HUB)
    proc = VisionProcessor("qwen3_vl", max_pixels_per_request=400_000)
    photos = [photo(n) for n in PHOTOS[:3]]
    uncapped = VisionProcessor("qwen3_vl")(images=photos)
    assert (uncapped.image_grid_thw.prod(1) * 256).sum() > 400_000
    with pytest.warns(PixelCapWarning, match="max_pixels_per_request=400000"):
        vi = proc(images=photos)
    pixels = vi.image_grid_thw.prod(1) * 16 * 16
    assert pixels.sum() <= 400_000 and (pixels < uncapped.image_grid_thw.prod(1) * 256).all()
    rows = np.cumsum([0] + list(vi.image_grid_thw.prod(1)))
    for i, a in enumerate(photos):  # capped images are still exactly transformers' pixels at that size
        _, gh, gw = vi.image_grid_thw[i]
        np.testing.assert_array_equal(vi.pixel_values[rows[i]:rows[i + 1]], hf_pixels_at(ref, a, gh * 16, gw * 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # under the cap: no warning
        VisionProcessor("qwen3_vl", max_pixels_per_request=10**8)(images=photos)
    with pytest.raises(MediaError, match="max_pixels_per_request=5000"):
        VisionProcessor("qwen2_vl", max_pixels_per_request=5000)(images=photos * 3)


def test_keys_identify_content_size_and_settings():
    a = photo("rocket")[:200, :300]
    b = a.copy()
    b[0, 0, 0] ^= 1
    proc = VisionProcessor("qwen2_vl")
    k = proc(images=[a, Image.fromarray(a), b]).image_keys
    assert k[0] == k[1] != k[2] and len(k[0]) == 64
    assert VisionProcessor("qwen3_vl")(images=[a]).image_keys[0] != k[0]
    smaller = VisionProcessor("qwen2_vl", image=ImageProcessorConfig(max_pixels=28 * 28 * 4))
    assert smaller(images=[a]).image_keys[0] != k[0]


def _write(d: Path, files: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, obj in files.items():
        (d / name).write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return d


def test_processor_configs_load_like_transformers(tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    # Qwen2-VL Hub layout: legacy top-level min/max_pixels, no video config (video reuses it)
    d = _write(tmp_path / "q2", {"config.json": {"model_type": "qwen2_vl"}, "preprocessor_config.json": QWEN2_HUB})
    family, img, vid = load_processor_configs(d)
    ref = Qwen2VLImageProcessorPil.from_pretrained(d)
    assert family == "qwen2_vl" and img.patch_size == ref.patch_size == 14
    assert (img.min_pixels, img.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"]) == (3136, 12845056)
    assert (vid.min_pixels, vid.max_pixels) == (3136, 12845056) and vid.fps == 2.0
    # Qwen3-VL Hub layout: both files
    d = _write(tmp_path / "q3", {"config.json": {"model_type": "qwen3_vl_moe"}, "preprocessor_config.json": QWEN3_HUB,
                                 "video_preprocessor_config.json": QWEN3_VIDEO_HUB})
    family, img, vid = load_processor_configs(d)
    vref = Qwen3VLVideoProcessor.from_pretrained(d)
    assert family == "qwen3_vl" and (img.patch_size, img.min_pixels, img.max_pixels) == (16, 65536, 16777216)
    assert (vid.min_pixels, vid.max_pixels) == (vref.size["shortest_edge"], vref.size["longest_edge"])
    assert (vid.fps, vid.min_frames, vid.max_frames) == (vref.fps, vref.min_frames, vref.max_frames)
    assert tuple(vid.image_mean) == tuple(vref.image_mean) == (0.5, 0.5, 0.5)
    # transformers 5 nested processor_config.json wins
    d = _write(tmp_path / "nested", {"processor_config.json": {"image_processor": {**QWEN3_HUB, "size": {
        "shortest_edge": 1024, "longest_edge": 4096}}, "video_processor": {**QWEN3_VIDEO_HUB, "fps": 4}},
        "preprocessor_config.json": QWEN3_HUB})
    _, img, vid = load_processor_configs(d, "qwen3_vl")
    assert (img.min_pixels, img.max_pixels, vid.fps) == (1024, 4096, 4)
    # nothing on disk: each family's defaults
    _, img, vid = load_processor_configs(_write(tmp_path / "none", {}), "qwen3_vl")
    assert (img.patch_size, img.image_mean, vid.max_pixels) == (16, (0.5,) * 3, 32 * 32 * 768)
    _, img, _ = load_processor_configs(tmp_path / "none", "qwen2_5_vl")
    assert (img.patch_size, img.max_pixels, img.image_std) == (14, 28 * 28 * 1280, CLIP_STD)
    proc = VisionProcessor.from_pretrained(tmp_path / "q3")
    assert proc.family == "qwen3_vl" and proc.video.max_pixels == 25165824


@pytest.mark.parametrize("bad,match", [
    ({"patch_size": 0}, "patch_size"), ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"image_std": [0.5, 0.0, 0.5]}, "std"), ({"size": 7}, "size"), ({"max_pixels": "big"}, "max_pixels"),
    ({"fps": -1}, "fps"), ({"max_frames": 0}, "max_frames")])
def test_bad_processor_configs_raise(tmp_path, bad, match):
    d = _write(tmp_path, {"video_preprocessor_config.json": {**QWEN3_VIDEO_HUB, **bad},
                          "preprocessor_config.json": {**QWEN3_HUB, **bad}})
    with pytest.raises(ConfigError, match=match):
        load_processor_configs(d, "qwen3_vl")


def test_unreadable_config_and_unknown_family(tmp_path):
    with pytest.raises(ConfigError, match="unreadable JSON"):
        load_processor_configs(_write(tmp_path, {"preprocessor_config.json": "{not json"}), "qwen2_vl")
    with pytest.raises(ConfigError, match="model_type 'qwen2'"):
        load_processor_configs(_write(tmp_path / "t", {"config.json": {"model_type": "qwen2"}}))


@pytest.mark.parametrize("cfg", [ImageProcessorConfig(), ImageProcessorConfig(image_mean=(0.5,) * 3, image_std=(0.5,) * 3),
                                 ImageProcessorConfig(do_rescale=False), ImageProcessorConfig(do_normalize=False),
                                 ImageProcessorConfig(rescale_factor=1 / 127.5, image_mean=(0.1, 0.2, 0.3))])
def test_vector_normalisation_equals_the_lookup_table(cfg, monkeypatch):
    """patchify normalises with float32 vector ops only when they reproduce transformers'
    float64-rescale-then-float32 table exactly; the table lookup is the fallback."""
    from qwen_mlx.vision import processing

    frames = np.random.default_rng(1).integers(0, 256, (3, 56, 84, 3), dtype=np.uint8)
    fast, grid = processing.patchify(frames, cfg)
    monkeypatch.setattr(processing, "_vector_ops", lambda cfg, lut: None)
    slow, grid2 = processing.patchify(frames, cfg)
    assert grid == grid2 == (2, 4, 6)
    np.testing.assert_array_equal(fast, slow)
    lut = processing._lut(cfg)
    np.testing.assert_array_equal(slow.reshape(48, 3, 2, 196)[0, :, 0, 0], lut[[0, 1, 2], frames[0, 0, 0]])
