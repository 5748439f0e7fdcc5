"""Tiny transformers VL models (text hidden 64, 2 layers, vision depth 2) and prompt builders
shared by the VL model and rope-index tests."""

import numpy as np

from tests.helpers import torch_setup

VOCAB, IMAGE, VIDEO, VSTART, VEND = 300, 290, 291, 292, 293
IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
           vision_end_token_id=VEND)
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_vl_moe": 16}

_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             max_position_embeddings=1024, rms_norm_eps=1e-6)


def text_config(family: str) -> dict:
    if family in ("qwen2_vl", "qwen2_5_vl"):  # head_dim = 64 / 2 = 32, chunked M-RoPE
        return dict(_TEXT, num_attention_heads=2, num_key_value_heads=1,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6]))
    cfg = dict(_TEXT, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
               rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[6, 5, 5],
                                    mrope_interleaved=True))
    if family == "qwen3_vl_moe":  # 2I = 80 != H = 64: a transposed expert weight fails
        cfg.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40)
    return cfg


def vision_config(family: str) -> dict:
    if family == "qwen2_vl":
        return dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14)
    if family == "qwen2_5_vl":
        return dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                    patch_size=14, window_size=56, fullatt_block_indexes=[1], tokens_per_second=4)
    return dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])


def hf_classes(family: str):
    import transformers as t

    return {
        "qwen2_vl": (t.Qwen2VLConfig, t.Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (t.Qwen2_5_VLConfig, t.Qwen2_5_VLForConditionalGeneration),
        "qwen3_vl": (t.Qwen3VLConfig, t.Qwen3VLForConditionalGeneration),
        "qwen3_vl_moe": (t.Qwen3VLMoeConfig, t.Qwen3VLMoeForConditionalGeneration),
    }[family]


def hf_model(family: str, tie: bool = False, seed: int = 0):
    torch = torch_setup()
    torch.manual_seed(seed)
    C, M = hf_classes(family)
    cfg = C(text_config=text_config(family), vision_config=vision_config(family),
            tie_word_embeddings=tie, **IDS)
    return M(cfg).float().eval()


# ---- prompts: a row is a list of ("t", n) | ("i", grid) | ("v", grid) ----------------------

def n_tokens(grid, merge=2) -> int:
    return int(np.prod(grid)) // merge**2


def build_row(segments, rng, family: str):
    ids = []
    for kind, arg in segments:
        if kind == "t":
            ids += rng.integers(1, 280, size=arg).tolist()
        elif kind == "i":
            ids += [VSTART] + [IMAGE] * n_tokens(arg) + [VEND]
        elif family.startswith("qwen3"):  # a frame each, separated by timestamp text
            t, h, w = arg
            for _ in range(t):
                ids += rng.integers(1, 280, size=3).tolist() + [VSTART] + [VIDEO] * n_tokens((1, h, w)) + [VEND]
        else:
            ids += [VSTART] + [VIDEO] * n_tokens(arg) + [VEND]
    return ids


def build_batch(rows, family: str, seed: int = 0, pad_left: bool = False):
    """-> ids (B, L), mask (B, L), image grids, video grids (prompt order over the batch)."""
    rng = np.random.default_rng(seed)
    seqs = [build_row(r, rng, family) for r in rows]
    L = max(map(len, seqs))
    if not pad_left and len({len(s) for s in seqs}) > 1:
        raise ValueError("rows of different lengths need pad_left")
    ids, mask = np.zeros((len(seqs), L), np.int64), np.zeros((len(seqs), L), np.int64)
    for b, s in enumerate(seqs):
        ids[b, L - len(s):], mask[b, L - len(s):] = s, 1
    images = [g for r in rows for k, g in r if k == "i"]
    videos = [g for r in rows for k, g in r if k == "v"]
    as_grid = lambda gs: np.array(gs, np.int64).reshape(-1, 3) if gs else None  # noqa: E731
    return ids, mask, as_grid(images), as_grid(videos)


def token_types(ids: np.ndarray) -> np.ndarray:
    return np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
