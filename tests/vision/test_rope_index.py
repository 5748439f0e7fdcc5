"""M-RoPE position ids: our numpy `get_rope_index` against transformers' own, called on the
tiny HF model of each family, for text only, several images, videos, image + video, a mixed
batch with a text-only row, a left-padded batch, and decode steps after the prompt."""

import numpy as np
import pytest

from qwen_mlx.errors import PromptError
from qwen_mlx.vision.rope_index import RopeIndexConfig, decode_positions, get_rope_index, offset_deltas
from tests.models.vl_configs import FAMILIES, build_batch, hf_model, token_types
from tests.helpers import torch_setup

CASES = {
    "text_only": [[("t", 9)]],
    "two_images": [[("t", 3), ("i", (1, 4, 6)), ("t", 2), ("i", (1, 8, 4)), ("t", 4)]],
    "video": [[("t", 2), ("v", (3, 4, 4)), ("t", 3)]],
    "two_videos": [[("t", 2), ("v", (2, 4, 6)), ("t", 1), ("v", (4, 6, 4)), ("t", 3)]],
    "image_video": [[("t", 2), ("i", (1, 6, 4)), ("t", 1), ("v", (2, 4, 4)), ("t", 2)]],
    # rows of equal length: the second has no media
    "mixed_batch": [[("t", 2), ("i", (1, 4, 4)), ("t", 3)], [("t", 11)]],
}
PADDED = [[("t", 1), ("i", (1, 4, 4)), ("t", 2)], [("t", 4)], [("t", 2), ("v", (2, 4, 4)), ("t", 1)]]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, hf_model(request.param)


def ours_cfg(hf):
    c = hf.config
    v = c.vision_config
    return RopeIndexConfig(spatial_merge_size=v.spatial_merge_size, image_token_id=c.image_token_id,
                           video_token_id=c.video_token_id,
                           tokens_per_second=getattr(v, "tokens_per_second", None)
                           if c.model_type == "qwen2_5_vl" else None,
                           video_frames_split=c.model_type.startswith("qwen3"))


def hf_index(hf, ids, mask, images, videos, seconds=None):
    torch = torch_setup()
    kw = {} if seconds is None else {"second_per_grid_ts": torch.tensor(seconds, dtype=torch.float32)}
    t = lambda a: None if a is None else torch.tensor(a)  # noqa: E731
    pos, d = hf.model.get_rope_index(torch.tensor(ids), mm_token_type_ids=torch.tensor(token_types(ids)),
                                     image_grid_thw=t(images), video_grid_thw=t(videos),
                                     attention_mask=t(mask), **kw)
    return pos.numpy(), d.numpy().reshape(-1)


@pytest.mark.parametrize("case", list(CASES))
def test_rope_index_matches_transformers(family, case):
    name, hf = family
    ids, mask, images, videos = build_batch(CASES[case], name)
    ref_pos, ref_d = hf_index(hf, ids, mask, images, videos)
    pos, d = get_rope_index(ours_cfg(hf), ids, images, videos)  # types from the placeholder ids
    assert pos.shape == (3,) + ids.shape
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(d, ref_d)
    if case == "text_only":
        assert (pos == np.arange(ids.shape[1])).all() and (d == 0).all()
    elif case == "mixed_batch":
        assert d[1] == 0 and d[0] != 0


def test_left_padded_batch_and_decode(family):
    """Padding gets position 0 and is not counted; decode positions continue from the
    cache offset (which counts padding) with the per-row delta, as transformers' do."""
    torch = torch_setup()
    name, hf = family
    ids, mask, images, videos = build_batch(PADDED, name, pad_left=True)
    ref_pos, ref_d = hf_index(hf, ids, mask, images, videos)
    pos, d = get_rope_index(ours_cfg(hf), ids, images, videos, attention_mask=mask)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(d, ref_d)
    assert (pos[:, mask == 0] == 0).all() and (mask == 0).any()

    B, L = ids.shape

    class Past:
        def get_seq_length(self):
            return L

    hf.model.rope_deltas = torch.tensor(ref_d).reshape(-1, 1)
    for n in (1, 3):  # one decode step, then a 3-token chunk
        full = np.concatenate([mask, np.ones((B, n), np.int64)], axis=1)
        ref = hf.model.compute_3d_position_ids(
            input_ids=torch.tensor(ids[:, :n]), inputs_embeds=torch.zeros(B, n, 8),
            attention_mask=torch.tensor(full), past_key_values=Past(),
            image_grid_thw=None, video_grid_thw=None).numpy()[..., -n:]
        np.testing.assert_array_equal(decode_positions(L, n, offset_deltas(d, mask)), ref)
    hf.model.rope_deltas = None


@pytest.mark.parametrize("seconds", [[0.5, 1.0], [0.3, 1.7]])
def test_qwen2_5_absolute_time(seconds):
    """``tokens_per_second`` x ``second_per_grid_ts`` spreads T (float32, truncated):
    4 x 0.3 = 1.2 gives T offsets 0 1 2 3 (2.4, 3.6 truncated)."""
    hf = hf_model("qwen2_5_vl")
    ids, mask, images, videos = build_batch(CASES["two_videos"], "qwen2_5_vl")
    ref_pos, ref_d = hf_index(hf, ids, mask, images, videos, seconds)
    pos, d = get_rope_index(ours_cfg(hf), ids, images, videos, second_per_grid_ts=seconds)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(d, ref_d)
    no_time, _ = get_rope_index(ours_cfg(hf), ids, images, videos)  # default: 1 s per grid step
    assert not np.array_equal(no_time, pos)


def test_qwen3_interleaved_video_frames_are_runs():
    """Qwen3-VL: a (3, h, w) video is 3 runs of one frame; each starts after the timestamp
    text, so T never exceeds the frame's start."""
    hf = hf_model("qwen3_vl")
    ids, _, _, videos = build_batch(CASES["video"], "qwen3_vl")
    pos, _ = get_rope_index(ours_cfg(hf), ids, None, videos)
    vid = ids[0] == 291
    assert len(np.unique(pos[0, 0, vid])) == 3  # one T per frame


def test_bad_media_counts_raise():
    ids, _, images, _ = build_batch(CASES["two_images"], "qwen2_vl")
    cfg = RopeIndexConfig(image_token_id=290, video_token_id=291)
    with pytest.raises(PromptError, match="more image placeholder runs"):
        get_rope_index(cfg, ids, images[:1], None)
    with pytest.raises(PromptError, match="3 image grids given"):
        get_rope_index(cfg, ids, np.concatenate([images, images[:1]]), None)
    with pytest.raises(PromptError, match="placeholders"):
        get_rope_index(cfg, ids, images * np.array([1, 2, 1]), None)
    with pytest.raises(PromptError, match="batch, length"):
        get_rope_index(cfg, ids[0], images, None)
