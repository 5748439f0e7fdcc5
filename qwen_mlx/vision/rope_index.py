"""M-RoPE position ids of a vision-language prompt (host-side numpy, before the graph).

A port of transformers 5.23 ``get_rope_index`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL). The prompt
is cut into runs of one modality (0 text, 1 image, 2 video). Text advances all three axes
together; a media run of grid (t, h, w) (after the ``spatial_merge_size`` merge) gets

    T = start + int(k * interval),  H = start + i,  W = start + j

over its t x h x w tokens, and the next run starts ``max(h, w)`` later (not ``t``: time
is only spread by the interval). Example: text "a b", an image of merged grid 1 x 2 x 3,
then "c": T = 0 1 2 2 2 2 2 2 5, H = 0 1 2 2 2 3 3 3 5, W = 0 1 2 3 4 2 3 4 5 (the image
starts at 2, "c" at 2 + max(2, 3)); delta = max + 1 - length = 6 - 9 = -3.

``interval`` is 1 except for Qwen2.5-VL videos: ``tokens_per_second * second_per_grid_ts``
(absolute time: 2 tokens/s and 1 s per grid step gives T = start + 0, 2, 4, ...), computed
in float32 and truncated like torch's ``.long()``. Qwen3-VL splits every video into one
grid per frame (its prompt separates frames by timestamp text), each frame a run of its own.

Returned ``deltas`` follow transformers: after the prompt, the token at valid index n
(padding not counted) has position ``n + delta`` on all three axes.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ..errors import PromptError


@dataclass(frozen=True)
class RopeIndexConfig:
    spatial_merge_size: int = 2
    image_token_id: int = 151655
    video_token_id: int = 151656
    tokens_per_second: Optional[float] = None  # Qwen2.5-VL: absolute-time video positions
    video_frames_split: bool = False  # Qwen3-VL: one grid per video frame


def token_types(input_ids: np.ndarray, cfg: RopeIndexConfig) -> np.ndarray:
    """``mm_token_type_ids`` from the placeholder ids: 0 text, 1 image, 2 video."""
    ids = np.asarray(input_ids)
    return np.where(ids == cfg.image_token_id, 1, np.where(ids == cfg.video_token_id, 2, 0))


def _runs(types: np.ndarray):
    edges = np.flatnonzero(np.diff(types)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(types)]])
    return [(int(types[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def vision_positions(start: int, grid, merge: int, interval=None) -> np.ndarray:
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    if interval is None:
        tt = np.arange(t, dtype=np.int64)
    else:  # torch: (arange(t) * float32 interval).long() truncates toward zero
        tt = (np.arange(t, dtype=np.float32) * np.float32(interval)).astype(np.int64)
    T, H, W = np.meshgrid(tt + start, np.arange(h) + start, np.arange(w) + start, indexing="ij")
    return np.stack([T, H, W]).reshape(3, -1)


def get_rope_index(cfg: RopeIndexConfig, input_ids, image_grid_thw=None, video_grid_thw=None,
                   attention_mask=None, mm_token_type_ids=None,
                   second_per_grid_ts=None) -> Tuple[np.ndarray, np.ndarray]:
    """``input_ids`` (B, L) -> positions (3, B, L) int64 and deltas (B,) int64.

    Grids are (n, 3) in prompt order over the whole batch; ``attention_mask`` (B, L) marks
    valid tokens (padding gets position 0); ``mm_token_type_ids`` default to the
    placeholder ids of ``cfg``; ``second_per_grid_ts`` (n_videos,) for Qwen2.5-VL."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise PromptError(f"input_ids must be (batch, length), got shape {ids.shape}")
    B, L = ids.shape
    types = token_types(ids, cfg) if mm_token_type_ids is None else np.asarray(mm_token_type_ids)
    grids = {1: _grid_list(image_grid_thw), 2: _grid_list(video_grid_thw)}
    if cfg.video_frames_split:
        grids[2] = [(1, h, w) for t, h, w in grids[2] for _ in range(t)]
    used = {1: 0, 2: 0}
    seconds = None if second_per_grid_ts is None else np.asarray(second_per_grid_ts, np.float32).reshape(-1)
    positions = np.zeros((3, B, L), dtype=np.int64)
    deltas = np.zeros(B, dtype=np.int64)
    for b in range(B):
        keep = np.ones(L, bool) if attention_mask is None else np.asarray(attention_mask[b]).astype(bool)
        parts, cur = [], 0
        for kind, s, e in _runs(types[b][keep]) if keep.any() else []:
            if kind == 0:
                parts.append(np.broadcast_to(np.arange(e - s) + cur, (3, e - s)))
                cur += e - s
                continue
            name = "image" if kind == 1 else "video"
            if used[kind] >= len(grids[kind]):
                raise PromptError(f"the prompt has more {name} placeholder runs than {name}s given "
                                  f"({len(grids[kind])})")
            grid = grids[kind][used[kind]]
            interval = None
            if kind == 2 and cfg.tokens_per_second is not None:
                sec = np.float32(1.0) if seconds is None else seconds[used[kind]]
                interval = np.float32(cfg.tokens_per_second) * sec
            used[kind] += 1
            pos = vision_positions(cur, grid, cfg.spatial_merge_size, interval)
            if pos.shape[1] != e - s:
                raise PromptError(f"{name} {used[kind] - 1} has grid {tuple(grid)} = {pos.shape[1]} "
                                  f"tokens but the prompt holds {e - s} placeholders for it")
            parts.append(pos)
            cur += max(grid[1], grid[2]) // cfg.spatial_merge_size
        if parts:
            row = np.concatenate(parts, axis=1)
            positions[:, b, keep] = row
            deltas[b] = row.max() + 1 - int(keep.sum())
    for kind, name in ((1, "image"), (2, "video")):
        if used[kind] != len(grids[kind]):
            raise PromptError(f"{len(grids[kind])} {name} grids given but the prompt has "
                              f"{used[kind]} {name} placeholder runs")
    return positions, deltas


def _grid_list(grid) -> list:
    if grid is None:
        return []
    g = np.asarray(grid, dtype=np.int64).reshape(-1, 3)
    return [tuple(int(x) for x in r) for r in g]


def offset_deltas(deltas: np.ndarray, attention_mask=None) -> np.ndarray:
    """Deltas relative to the cache offset (which counts left padding): position of the
    next token = offset + delta. Without padding these are the transformers deltas."""
    d = np.asarray(deltas, dtype=np.int64).reshape(-1)
    if attention_mask is None:
        return d
    m = np.asarray(attention_mask)
    return d - (m.shape[1] - m.astype(bool).sum(axis=1))


def decode_positions(offset: int, n: int, delta) -> np.ndarray:
    """(3, B, n) positions of ``n`` text tokens fed at cache ``offset``; ``delta`` (B,)
    from `offset_deltas`."""
    d = np.asarray(delta, dtype=np.int64).reshape(-1, 1)
    p = np.arange(offset, offset + n, dtype=np.int64)[None, :] + d
    return np.broadcast_to(p, (3,) + p.shape).copy()
