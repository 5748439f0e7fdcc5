"""Vision towers against transformers' visual modules (tiny random configs, every parameter
perturbed, float32): merged features and DeepStack features within 1e-4 relative error, for
both attention routes, on two images of odd merged sizes plus a 2-frame video at once."""

import mlx.core as mx
import numpy as np
import pytest

from qwen_mlx.errors import ConfigError, QwenMLXError
from qwen_mlx.vision import tower_qwen2_5_vl, tower_qwen2_vl, tower_qwen3_vl
from qwen_mlx.vision.vit import AttnPlan, VisionInputError, frame_segments, patch_positions
from tests.helpers import REL_TOL, perturb, rel_err, torch_setup

# merged grids 5x7 and 3x9 (odd), and a 2-frame video of 4x3 merged tokens
GRID = np.array([[1, 10, 14], [1, 6, 18], [2, 8, 6]], dtype=np.int64)
ROPE = {"rope_type": "axial", "rope_theta": 5000.0}  # not the default: a port ignoring it fails
COMMON = dict(depth=4, num_heads=4, in_channels=3, temporal_patch_size=2, spatial_merge_size=2,
              rope_parameters=ROPE)


def _hf_config(family):
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
        return Qwen2VLVisionConfig(embed_dim=64, hidden_size=48, mlp_ratio=2, patch_size=14, **COMMON)
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        # window 56 px = 2 merged tokens a side: 5x7 -> 3x4 windows with partial edges
        return Qwen2_5_VLVisionConfig(hidden_size=64, intermediate_size=80, out_hidden_size=48,
                                      patch_size=14, window_size=56, fullatt_block_indexes=[1, 3], **COMMON)
    if family == "qwen3_vl_moe":
        from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import (
            Qwen3VLMoeVisionConfig as Qwen3VLVisionConfig)
    else:
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    return Qwen3VLVisionConfig(hidden_size=64, intermediate_size=80, out_hidden_size=48, patch_size=16,
                               num_position_embeddings=36, deepstack_visual_indexes=[0, 2], **COMMON)


def _hf_model(family, cfg):
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as M
    elif family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel as M
    elif family == "qwen3_vl_moe":  # the same tower under another name
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel as M
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as M
    model = perturb(M(cfg).float().eval())
    torch = torch_setup()
    with torch.no_grad():  # sharpen attention (logits ~ O(1), not ~0.1): rotary errors then show
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    return model


TOWERS = {"qwen2_vl": tower_qwen2_vl, "qwen2_5_vl": tower_qwen2_5_vl, "qwen3_vl": tower_qwen3_vl,
          "qwen3_vl_moe": tower_qwen3_vl}


@pytest.fixture(scope="module", params=list(TOWERS))
def case(request):
    """(family, HF config, HF state dict, pixel rows, reference embeds, reference DeepStack)."""
    torch = torch_setup()
    family = request.param
    cfg = _hf_config(family)
    hf = _hf_model(family, cfg)
    rows = int(GRID.prod(axis=1).sum())
    pixels = np.random.default_rng(0).standard_normal((rows, 3 * 2 * cfg.patch_size**2)).astype(np.float32)
    with torch.no_grad():
        out = hf(torch.tensor(pixels), grid_thw=torch.tensor(GRID))
    deep = [d.numpy() for d in getattr(out, "deepstack_features", None) or []]
    weights = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return family, cfg, weights, pixels, out.pooler_output.numpy(), deep


def _ours(family, cfg, weights, **overrides):
    mod = TOWERS[family]
    model = mod.VisionModel(mod.VisionConfig.from_config(cfg.to_dict(), **overrides))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)  # names and shapes
    return model


@pytest.mark.parametrize("attention", ["auto", "batched", "mask"])
def test_tower_parity(case, attention):
    family, cfg, weights, pixels, ref, ref_deep = case
    model = _ours(family, cfg, weights, attention=attention)
    out = model(mx.array(pixels), GRID)
    assert out.embeds.shape == ref.shape == (int(GRID.prod(axis=1).sum()) // 4, 48)
    assert rel_err(out.embeds, ref) <= REL_TOL
    assert len(out.deepstack) == len(ref_deep) == (2 if family.startswith("qwen3") else 0)
    for ours, theirs in zip(out.deepstack, ref_deep):
        assert ours.shape == theirs.shape
        assert rel_err(ours, theirs) <= REL_TOL
    if family == "qwen2_5_vl":  # the windowed blocks really are windowed and in an edge-window plan
        plan = model.plan_grid(GRID)
        assert plan.layers[1] is plan.layers[3] and plan.layers[0] is plan.layers[2]
        assert plan.layers[0].kind == ("mask" if attention == "mask" else "padded")
        assert plan.layers[0].mask is not None or attention == "mask"  # partial windows are padded


def test_each_image_is_independent(case):
    """Features of an image do not depend on what else is in the batch (per-segment attention)."""
    family, cfg, weights, pixels, ref, ref_deep = case
    model = _ours(family, cfg, weights)
    n0, m0 = int(GRID[0].prod()), int(GRID[0].prod()) // 4
    alone = model(mx.array(pixels[:n0]), GRID[:1])
    assert rel_err(alone.embeds, ref[:m0]) <= REL_TOL
    for ours, theirs in zip(alone.deepstack, ref_deep):
        assert rel_err(ours, theirs[:m0]) <= REL_TOL


def test_no_host_sync_in_tower(case, monkeypatch):
    """The tower builds its whole graph without reading an array back: it runs under
    mx.compile (which refuses any eval during tracing) and with tolist/item/bool disabled."""
    family, cfg, weights, pixels, ref, _ = case
    model = _ours(family, cfg, weights)
    compiled = mx.compile(lambda pv: (lambda o: [o.embeds, *o.deepstack])(model(pv, GRID)))
    outs = compiled(mx.array(pixels))
    assert rel_err(outs[0], ref) <= REL_TOL

    def refuse(*_a, **_k):
        raise AssertionError("host sync inside the vision tower")

    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(mx.array, name, refuse)
    monkeypatch.setattr(mx, "eval", refuse)
    monkeypatch.setattr(mx, "async_eval", refuse)
    out = model(mx.array(pixels), GRID)
    monkeypatch.undo()
    assert rel_err(out.embeds, ref) <= REL_TOL


def test_bfloat16_weights(case):
    """bf16 checkpoints run in bf16 (rotary in float32, as HF) and stay near the float32 result."""
    family, cfg, weights, pixels, ref, _ = case
    model = _ours(family, cfg, weights)
    model.set_dtype(mx.bfloat16)
    out = model(pixels, GRID)  # numpy rows are accepted too
    assert out.embeds.dtype == mx.bfloat16
    assert rel_err(out.embeds.astype(mx.float32), ref) <= 3e-2


# --------------------------------------------------------------- host planning vs transformers


GRIDS = [GRID, np.array([[1, 8, 8]]), np.array([[3, 4, 12], [1, 2, 2], [1, 16, 10]])]


@pytest.mark.parametrize("grid", GRIDS)
def test_positions_windows_and_taps_match_transformers(grid):
    torch = torch_setup()
    from transformers.vision_utils import (get_vision_interpolation_indices_and_weights,
                                           get_vision_position_ids, get_vision_window_index)

    g = torch.tensor(grid)
    pos = patch_positions(grid, 2)
    assert np.array_equal(pos, get_vision_position_ids(g, 2).numpy())

    for window_px in (56, 112):  # 2 and 4 merged tokens a side (some grids divide evenly)
        index, sizes = tower_qwen2_5_vl.window_index(grid, 2, window_px // 2 // 14)
        ref_index, ref_cu = get_vision_window_index(g, 2, window_px, 14)
        assert np.array_equal(index, ref_index.numpy())
        assert np.array_equal(np.concatenate([[0], np.cumsum(sizes * 4)]), ref_cu.numpy())

    for side in (6, 48):
        idx, w = tower_qwen3_vl.interpolation_taps(grid, pos, side)
        ref_idx, ref_w = get_vision_interpolation_indices_and_weights(
            g, side, mode="bilinear", align_corners=True, spatial_merge_size=2)
        assert np.array_equal(idx, ref_idx.numpy())
        np.testing.assert_allclose(w, ref_w.numpy(), atol=1e-6)


def test_window_gather_and_its_inverse():
    """The padded window batch holds each window's patches in HF window order, and the scatter
    brings every patch back to its own row (the inverse of the window permutation)."""
    index, sizes = tower_qwen2_5_vl.window_index(GRID, 2, 2)
    order = (index[:, None] * 4 + np.arange(4)).ravel()
    plan = AttnPlan.build(order, sizes * 4, "batched")
    assert plan.kind == "padded" and plan.segments == len(sizes) and plan.length == 16
    gather, scatter = np.array(plan.gather), np.array(plan.scatter)
    valid = np.array(plan.mask).reshape(-1)
    assert np.array_equal(gather[valid], order)  # window order, windows back to back
    assert np.array_equal(gather[scatter], np.arange(len(order)))  # inverse
    assert sorted(np.bincount(np.arange(len(gather)) // 16, weights=valid).astype(int)) == sorted(sizes * 4)


def test_rotate_half_width_equals_rotate_half():
    """`rotate` with half-width cos / sin (broadcast over q / k and heads) is the rotate-half
    RoPE of the text decoder (mrope.apply_rotary) with both halves repeated, bit for bit."""
    from qwen_mlx.models.mrope import apply_rotary
    from qwen_mlx.vision.vit import rotary_angles, rotate

    rng = np.random.default_rng(4)
    x = mx.array(rng.standard_normal((12, 2, 3, 16)).astype(np.float32))
    ang = mx.array(rotary_angles(patch_positions(np.array([[1, 4, 6]]), 2)[:12] + 3, 16, 10000.0))
    assert ang.shape == (12, 8)
    c, s = mx.cos(ang)[:, None, None], mx.sin(ang)[:, None, None]
    ref = apply_rotary(x, mx.concatenate([c, c], -1), mx.concatenate([s, s], -1))
    assert mx.array_equal(rotate(x, c, s), ref)
    assert not mx.array_equal(rotate(x, c, s), rotate(x, s, c))


def test_auto_plan_choice():
    one = frame_segments(np.array([[1, 8, 8]]))
    assert AttnPlan.build(np.arange(64), one).kind == "full"
    frames = frame_segments(np.array([[4, 8, 8]]))
    assert AttnPlan.build(np.arange(256), frames).kind == "dense"  # a reshape, no mask, no gather
    mixed = frame_segments(np.array([[1, 8, 8], [1, 8, 6]]))
    assert AttnPlan.build(np.arange(112), mixed).kind == "padded"  # 2*64^2 < 112^2
    lopsided = frame_segments(np.array([[1, 64, 64]] + [[1, 2, 2]] * 20))
    p = AttnPlan.build(np.arange(int(lopsided.sum())), lopsided)
    assert p.kind == "mask" and p.mask.dtype == mx.bool_  # 21*4096^2 > 4176^2


# ------------------------------------------------------------------------- configs and errors


def test_hub_configs():
    q2 = tower_qwen2_vl.VisionConfig.from_config({  # Qwen2-VL-2B-Instruct (4.x keys)
        "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
        "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "temporal_patch_size": 2})
    assert (q2.hidden_size, q2.out_hidden_size, q2.intermediate_size) == (1280, 1536, 5120)
    assert q2.hidden_act == "quick_gelu" and q2.patch_dim == 1176
    q25 = tower_qwen2_5_vl.VisionConfig.from_config({  # Qwen2.5-VL-3B-Instruct
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "temporal_patch_size": 2})
    assert (q25.window_size, q25.fullatt_block_indexes, q25.rope_theta) == (112, [7, 15, 23, 31], 10000.0)
    q3 = tower_qwen3_vl.VisionConfig.from_config({  # Qwen3-VL-2B-Instruct
        "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1024, "in_channels": 3, "intermediate_size": 4096, "model_type": "qwen3_vl",
        "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2})
    assert (q3.patch_dim, q3.deepstack_visual_indexes, q3.head_dim) == (1536, [5, 11, 17], 64)


@pytest.mark.parametrize("family,cfg,needle", [
    ("qwen2_vl", dict(hidden_act="relu6"), "hidden_act"),
    ("qwen2_vl", dict(num_heads=3), "num_heads"),
    ("qwen2_5_vl", dict(window_size=20), "window_size"),
    ("qwen3_vl", dict(deepstack_visual_indexes=[4]), "deepstack_visual_indexes"),
    ("qwen3_vl", dict(num_position_embeddings=40), "num_position_embeddings"),
])
def test_bad_config(family, cfg, needle):
    base = _hf_config(family).to_dict()
    with pytest.raises(ConfigError, match=needle):
        TOWERS[family].VisionConfig.from_config({**base, **cfg})


def test_bad_inputs(case):
    family, cfg, weights, pixels, _, _ = case
    model = _ours(family, cfg, weights)
    pv = mx.array(pixels)
    for grid, needle in [
        (GRID[:2], "patch rows"),  # rows do not add up
        (np.array([[1, 10, 14], [1, 7, 18], [2, 8, 6]]), "multiples of spatial_merge_size"),
        (GRID.astype(np.float32), "integer"),
        (GRID[:, :2], r"\(n, 3\)"),
    ]:
        with pytest.raises(VisionInputError, match=needle):
            model(pv, grid)
    with pytest.raises(QwenMLXError, match="C\\*T\\*P\\*P"):
        model(pv[:, :-1], GRID)
