"""Video input against transformers 5.23 on short synthetic files written with PyAV.

transformers' video processors resize with torchvision, which is not installable here, so:
- decoding and metadata are compared with transformers' ``read_video_pyav``;
- sampling rules with its ``sample_frames`` (Qwen3-VL's class imports without torchvision; the
  Qwen2-VL module is executed from its source with the one torchvision import set to None);
- sampling, patch layout, grids, ``second_per_grid_ts`` and prompt text with the real video
  processors + processors run with resize/rescale/normalise switched off on frames we resized;
- normalised pixels with transformers' PIL image path applied to each sampled frame.
The torchvision resize itself is not compared.
"""

import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen_mlx.errors import MediaError
from qwen_mlx.vision.media import MediaLimits
from qwen_mlx.vision.processing import VIDEO_DEFAULTS, PixelCapWarning, VideoProcessorConfig, VisionProcessor
from qwen_mlx.vision.video import (
    open_video,
    qwen2_frame_indices,
    qwen3_frame_indices,
    qwen3_timestamps,
)
from tests.vision.test_processing import QWEN2_HUB, QWEN3_HUB, QWEN3_VIDEO_HUB, hf_image_processor, hf_pixels_at, hf_processor

av = pytest.importorskip("av")
W, H, N, FPS = 97, 75, 17, 10
TEXT = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What moves?<|im_end|>\n"


def frame(i: int) -> np.ndarray:
    a = np.zeros((H, W, 3), np.uint8)
    a[:] = (i * 12, 60 + i * 5, 200 - i * 9)
    a[10:35, 4 * i:4 * i + 20] = (255, 255, 0)  # a square moving right
    a[50 + i % 5:60 + i % 5, 60:80] = (0, 0, 255)
    return a


def write_video(path: Path, n: int = N, codec="mpeg4", fmt="mp4", pix_fmt="yuv420p") -> Path:
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, pix_fmt
        c.start_encoding()
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(frame(i), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {"mp4": write_video(d / "clip.mp4"),  # odd size 97x75, 17 frames at 10 fps
            "mkv": write_video(d / "clip.mkv", codec="ffv1", fmt="matroska", pix_fmt="yuv444p"),  # no frame count
            "one": write_video(d / "one.mp4", n=1),
            "zero": write_video(d / "zero.avi", n=0, fmt="avi"),
            "nostream": write_video(d / "nostream.mp4", n=0)}


@pytest.fixture(scope="module")
def hf_tokenizer(qwen_tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=qwen_tokenizer.backend)


def qwen2_video_module():
    """transformers' Qwen2-VL video processor module, run from source with ``tvF = None``."""
    import transformers

    name = "transformers.models.qwen2_vl._video_processing_qwen2_vl_no_torchvision"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(transformers.__file__).parent / "models/qwen2_vl/video_processing_qwen2_vl.py"
    src = path.read_text()
    line = "import torchvision.transforms.v2.functional as tvF"
    assert src.count(line) == 1
    mod = types.ModuleType(name)
    mod.__package__, mod.__file__ = "transformers.models.qwen2_vl", str(path)
    sys.modules[name] = mod
    exec(compile(src.replace(line, "tvF = None"), str(path), "exec"), mod.__dict__)
    return mod


def hf_decode_all(path):
    from transformers.video_utils import read_video_pyav

    return read_video_pyav(str(path), sample_indices_fn=lambda metadata, **kw: np.arange(metadata.total_num_frames))


def test_probe_and_decode_match_transformers_read_video_pyav(videos):
    from transformers.video_utils import read_video_pyav

    src = open_video(videos["mp4"])
    idx = np.array([0, 3, 4, 11, 16])
    ref, meta = read_video_pyav(str(videos["mp4"]), sample_indices_fn=lambda metadata, **kw: idx)
    assert (src.total_num_frames, src.fps, src.height, src.width) == (meta.total_num_frames, meta.fps, H, W) == (N, FPS, H, W)
    np.testing.assert_array_equal(src.read(idx), ref)
    np.testing.assert_array_equal(src.read([16, 0, 0])[1:], ref[[0, 0]])  # any order, repeats
    assert np.abs(src.read([5]).astype(int)[0] - frame(5)).mean() < 8  # it is our clip
    # a Matroska stream stores no frame count (transformers reads 0): counted from packets
    mkv = open_video(videos["mkv"])
    assert av.open(str(videos["mkv"])).streams.video[0].frames == 0 and mkv.total_num_frames == N
    diff = mkv.read([0, 16]).astype(int) - np.stack([frame(0), frame(16)])
    assert np.abs(diff).max() <= 2  # ffv1 4:4:4: lossless up to the RGB <-> YUV rounding
    src.total_num_frames = 30  # a header that promises more frames than the stream holds
    with pytest.raises(MediaError, match="ended before frame 25"):
        src.read([25])


def test_sampling_rules_match_transformers():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    q2 = qwen2_video_module().Qwen2VLVideoProcessor()
    q3 = Qwen3VLVideoProcessor()
    checked = 0
    for total in list(range(1, 40)) + [47, 97, 240, 1001, 3000, 20000]:
        for video_fps in (1.0, 7.5, 23.976, 29.97, 60.0):
            for fps in (0.5, 1.0, 2.0, 4.0):
                meta = VideoMetadata(total_num_frames=total, fps=video_fps)
                ours = qwen2_frame_indices(total, video_fps, fps, None, 4, 768, 2)
                try:
                    ref = q2.sample_frames(meta, fps=fps, temporal_patch_size=2, min_frames=4, max_frames=768)
                    np.testing.assert_array_equal(ours, ref.numpy())
                except ZeroDivisionError:  # transformers fails below one temporal patch; we keep the frames
                    assert total < 2 and ours.tolist() == [0]
                ours3 = qwen3_frame_indices(total, video_fps, fps, None, 4, 768)
                np.testing.assert_array_equal(ours3, q3.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps), fps=fps))
                checked += 1
        for n in (2, 4, 6, 16):
            if n <= total:
                meta = VideoMetadata(total_num_frames=total, fps=30.0)
                np.testing.assert_array_equal(qwen2_frame_indices(total, 30.0, None, n),
                                              q2.sample_frames(meta, num_frames=n, temporal_patch_size=2).numpy())
                np.testing.assert_array_equal(qwen3_frame_indices(total, 30.0, None, n),
                                              q3.sample_frames(meta, num_frames=n, fps=None))
    assert checked > 800


def test_qwen3_timestamps_match_transformers():
    from transformers import Qwen3VLProcessor

    for idx, fps in (([0, 5, 11, 16], 10.0), ([0, 3, 7], 29.97), (list(range(0, 300, 7)), 23.976), ([4], 24)):
        ref = Qwen3VLProcessor._calculate_timestamps(None, list(idx), fps, 2)
        assert qwen3_timestamps(idx, fps, 2) == ref
    assert qwen3_timestamps([0, 5, 11, 16], 10.0) == [0.25, 1.35]


def _raw(family, base):
    """The family's video config with rescale/normalise off: raw patch values, comparable with
    transformers' processors run without torchvision."""
    return VideoProcessorConfig.from_dict({**base, "do_rescale": False, "do_normalize": False}, VIDEO_DEFAULTS[family])


def _resize_all(path, h, w):
    frames, meta = hf_decode_all(path)
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in frames]), meta


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_video_pipeline_matches_transformers_processors(videos, hf_tokenizer, family):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_video_smart_resize

    q3 = family == "qwen3_vl"
    vcfg, icfg = (QWEN3_VIDEO_HUB, QWEN3_HUB) if q3 else ({}, QWEN2_HUB)
    ours = VisionProcessor(family, video=_raw(family, vcfg))
    vi = ours(videos=[videos["mp4"]])
    t, gh, gw = (int(x) for x in vi.video_grid_thw[0])
    p = 16 if q3 else 14
    h, w = gh * p, gw * p
    frames, meta = _resize_all(videos["mp4"], h, w)
    vp = Qwen3VLVideoProcessor(**vcfg) if q3 else qwen2_video_module().Qwen2VLVideoProcessor(**vcfg)
    hf = hf_processor(family, hf_tokenizer, icfg, vp)
    ref = hf(text=[TEXT], videos=[frames], video_metadata=[{"total_num_frames": meta.total_num_frames, "fps": meta.fps}],
             do_sample_frames=True, fps=2, do_resize=False, do_convert_rgb=False, do_rescale=False, do_normalize=False,
             cap_pixels_per_frame=False, return_metadata=True)
    idx = np.asarray(ref["video_metadata"][0].frames_indices)
    size = vp.size
    if q3:
        assert hf_video_smart_resize(len(idx), H, W, 2, 32, size["shortest_edge"], size["longest_edge"]) == (h, w)
        assert idx.tolist() == [0, 5, 11, 16] and vi.second_per_grid_ts is None
    else:
        assert hf_smart_resize(H, W, 28, size["shortest_edge"], size["longest_edge"]) == (h, w)
        assert idx.tolist() == [0, 4, 8, 12] and vi.video_timestamps is None
    np.testing.assert_array_equal(vi.video_grid_thw, np.asarray(ref["video_grid_thw"]))
    np.testing.assert_array_equal(vi.pixel_values_videos, np.asarray(ref["pixel_values_videos"], np.float32))
    expanded = ours.expand_prompt(TEXT, vi)
    assert hf_tokenizer(expanded)["input_ids"] == ref["input_ids"][0]
    if q3:
        assert "<0.2 seconds><|vision_start|>" in expanded and "<1.4 seconds>" in expanded
    if family == "qwen2_5_vl":
        np.testing.assert_allclose(vi.second_per_grid_ts, ref["second_per_grid_ts"], rtol=1e-6)
        assert vi.second_per_grid_ts.tolist() == pytest.approx([2 / (4 / 17 * 10)])

    # normalised pixels: transformers' PIL image path on each sampled frame, stacked in time
    norm = VisionProcessor(family, video=VideoProcessorConfig.from_dict(vcfg, VIDEO_DEFAULTS[family]))
    got = norm(videos=[videos["mp4"]])
    ref_img = hf_image_processor(icfg)
    decoded, _ = hf_decode_all(videos["mp4"])
    per_frame = [hf_pixels_at(ref_img, decoded[i], h, w).reshape(gh * gw, 3, 2, p * p) for i in idx]
    expected = np.concatenate([np.concatenate([a[:, :, :1], b[:, :, :1]], axis=2)
                               for a, b in zip(per_frame[0::2], per_frame[1::2])]).reshape(t * gh * gw, -1)
    np.testing.assert_array_equal(got.pixel_values_videos, expected)
    assert got.video_keys != vi.video_keys  # settings are part of the key


def test_frames_arrays_bytes_and_files_agree(videos):
    proc = VisionProcessor("qwen3_vl")
    from_file = proc(videos=[videos["mp4"]])
    decoded, _ = hf_decode_all(videos["mp4"])
    from_array = proc(videos=[decoded], video_fps=FPS)
    from_bytes = proc(videos=videos["mp4"].read_bytes())
    from_list = proc(videos=[[Image.fromarray(f) for f in decoded]], video_fps=FPS)
    for other in (from_array, from_bytes, from_list):
        np.testing.assert_array_equal(other.pixel_values_videos, from_file.pixel_values_videos)
        assert other.video_keys == from_file.video_keys and other.video_timestamps == from_file.video_timestamps
    # frames of unknown rate: Qwen3-VL assumes 24 fps (as transformers), Qwen2 families take every frame
    with pytest.warns(UserWarning, match="assuming 24 fps"):
        vi = proc(videos=[decoded])
    assert vi.video_grid_thw[0, 0] == 2 and vi.video_timestamps == [qwen3_timestamps([0, 5, 11, 16], 24.0)]
    vi = VisionProcessor("qwen2_5_vl")(videos=[decoded])
    assert vi.video_grid_thw[0, 0] == 9 and vi.second_per_grid_ts.tolist() == pytest.approx([2 / 24])


def test_short_clips_are_padded_where_transformers_fails(videos):
    for family in ("qwen2_vl", "qwen3_vl"):
        vi = VisionProcessor(family)(videos=[videos["one"]])
        assert vi.video_grid_thw[0, 0] == 1 and np.isfinite(vi.pixel_values_videos).all()
        n = vi.pixel_values_videos.shape[1] // 6
        both = vi.pixel_values_videos.reshape(-1, 3, 2, n)
        np.testing.assert_array_equal(both[:, :, 0], both[:, :, 1])  # the one frame fills the temporal patch


def test_bad_videos_raise(videos, tmp_path, monkeypatch):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    data = videos["mp4"].read_bytes()
    cases = [(videos["zero"], "zero frames"), (videos["nostream"], "no video stream"), (text, "not a readable video"),
             (data[: len(data) // 2], "not a readable video|zero frames|corrupt"), (tmp_path / "gone.mp4", "no such video"),
             (np.zeros((3, 4)), "video array"), ([], "at least one frame"),
             ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], "differ in size")]
    for src, match in cases:
        with pytest.raises(MediaError, match=match):
            VisionProcessor("qwen2_5_vl")(videos=[src])
    with pytest.raises(MediaError, match="max_decode_pixels=1000"):
        open_video(videos["mp4"], limits=MediaLimits(max_decode_pixels=1000))
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    with pytest.raises(MediaError, match="needs PyAV"):
        open_video(videos["mp4"])


def test_request_cap_covers_videos_and_images(videos):
    img = np.zeros((300, 400, 3), np.uint8)
    proc = VisionProcessor("qwen2_vl", max_pixels_per_request=300_000)
    free = VisionProcessor("qwen2_vl")(images=[img], videos=[videos["mp4"]])
    need = free.image_grid_thw.prod() * 196 + free.video_grid_thw[0, 1:].prod() * 196 * 4
    assert need > 300_000
    with pytest.warns(PixelCapWarning):
        vi = proc(images=[img], videos=[videos["mp4"]])
    got = vi.image_grid_thw.prod() * 196 + vi.video_grid_thw[0, 1:].prod() * 196 * 4  # 4 sampled frames
    assert got <= 300_000 and vi.pixel_values_videos.shape[0] == vi.video_grid_thw.prod()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VisionProcessor("qwen2_vl", max_pixels_per_request=10**7)(images=[img], videos=[videos["mp4"]])


def test_video_sizes_match_transformers_token_counts():
    """Frame sizes (hence token counts) with and without transformers' ``cap_pixels_per_frame``."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    mod = qwen2_video_module()
    q2, q3 = mod.Qwen2VLVideoProcessor(), Qwen3VLVideoProcessor(**QWEN3_VIDEO_HUB)
    seen = {}

    class Stop(Exception):
        pass

    def spy(height, width, factor, min_pixels, max_pixels):  # Qwen2's resize: record, skip torchvision
        seen["hw"] = mod.__dict__["_real_smart_resize"](height, width, factor, min_pixels, max_pixels)
        raise Stop

    mod.__dict__.setdefault("_real_smart_resize", mod.smart_resize)
    import torch

    for n, h, w in ((4, 75, 97), (8, 1080, 1920), (64, 720, 1280), (768, 480, 640), (2, 3000, 20), (16, 31, 33)):
        for cap in (False, True):
            ours3 = VisionProcessor("qwen3_vl", video=VideoProcessorConfig.from_dict(
                {**QWEN3_VIDEO_HUB, "cap_pixels_per_frame": cap}, VIDEO_DEFAULTS["qwen3_vl"]))
            gh, gw = (x // 16 for x in ours3.video_size(n, h, w))
            assert -(-n // 2) * gh * gw == q3.get_num_of_video_patches(n, h, w, {"cap_pixels_per_frame": cap})
            ours2 = VisionProcessor("qwen2_vl", video=VideoProcessorConfig(cap_pixels_per_frame=cap))
            mod.smart_resize = spy
            try:
                q2.resize(torch.zeros(1, 1, 1, 1, 1).expand(1, n, 3, h, w), q2.size, None, 28, 2, cap)  # shape only
            except Stop:
                pass
            finally:
                mod.smart_resize = mod.__dict__["_real_smart_resize"]
            assert ours2.video_size(n, h, w) == seen.pop("hw")


def test_mixed_image_and_video_prompt_matches_transformers(videos, hf_tokenizer):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from qwen_mlx.vision.processing import ImageProcessorConfig

    raw = {"do_resize": False, "do_rescale": False, "do_normalize": False}
    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    ours = VisionProcessor("qwen3_vl", image=ImageProcessorConfig.from_dict({**QWEN3_HUB, **raw}, VisionProcessor("qwen3_vl").image),
                           video=_raw("qwen3_vl", QWEN3_VIDEO_HUB))
    vi = ours(images=[img, img[:32]], videos=[videos["mp4"]])
    _, gh, gw = vi.video_grid_thw[0]
    frames, meta = _resize_all(videos["mp4"], gh * 16, gw * 16)
    text = ("<|vision_start|><|image_pad|><|vision_end|> then <|vision_start|><|video_pad|><|vision_end|>"
            " then <|vision_start|><|image_pad|><|vision_end|>")
    hf = hf_processor("qwen3_vl", hf_tokenizer, QWEN3_HUB, Qwen3VLVideoProcessor(**QWEN3_VIDEO_HUB))
    ref = hf(text=[text], images=[img, img[:32]], videos=[frames], video_metadata=[{"total_num_frames": N, "fps": FPS}],
             do_convert_rgb=False, cap_pixels_per_frame=False, return_metadata=True, **raw)
    assert hf_tokenizer(ours.expand_prompt(text, vi))["input_ids"] == ref["input_ids"][0]
    np.testing.assert_array_equal(vi.pixel_values, ref["pixel_values"])
    np.testing.assert_array_equal(vi.pixel_values_videos, np.asarray(ref["pixel_values_videos"], np.float32))
    with pytest.raises(MediaError, match="multiples of patch_size x merge_size = 32"):
        ours(images=[img[:33]])
