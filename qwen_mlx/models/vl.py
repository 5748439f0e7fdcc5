"""The vision-language models: our text decoder plus a vision tower, one weight store.

A VL model *is* the text `CausalLM` (the same ``model.*`` / ``lm_head`` parameters, so a
text-only prompt runs on the same object at no extra memory) plus ``visual``, the family's
tower (``qwen_mlx.vision.tower_*``). Multimodal prompts take one extra step:

    mm = model.embed_multimodal(ids, visual_inputs, cache)   # host-side planning + tower
    logits = model(None, cache, mm.input_embeds, mm.positions, mm.deepstack)
    logits = model(next_token, cache)                         # decode: offset + rope_delta

`embed_multimodal` puts the tower features at the placeholder tokens (their positions are
read off the token ids on the host, so the graph gathers rows by a host-made index and never
masks), computes the M-RoPE positions of the whole prompt (`vision.rope_index`) and stores
the request's rope delta in the cache, where `__call__` reads it for later text tokens.
"""

from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from ..cache import cache_offset
from ..config import normalize_config, require
from ..errors import ConfigError, PromptError
from ..loading.remap import Permute, Rules
from ..vision.inputs import TowerOutput, VisualInputs
from ..vision.rope_index import RopeIndexConfig, get_rope_index
from .decoder import CausalLM, DecoderArgs
from .mrope import text_positions

# Checkpoint names of every writer -> ours (``model.*``, ``lm_head.*``, ``visual.*``, the hub
# 4.x layout): transformers 5.x nests the decoder in ``model.language_model`` and the tower in
# ``model.visual``; mlx-vlm writes ``language_model.model`` / ``language_model.lm_head`` /
# ``vision_tower`` and its patch Conv3d weight channels-last (out, T, P, P, C).
_RENAME = (
    (r"^model\.language_model\.", "model."),
    (r"^model\.visual\.", "visual."),
    (r"^language_model\.model\.", "model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.", "visual."),
)


def _channels_last(shape: tuple, cfg: dict) -> bool:
    v = cfg.get("vision_config") or {}
    c = v.get("in_channels", v.get("in_chans", 3))
    return len(shape) == 5 and shape[-1] == c and shape[1] != c


REMAP = Rules(rename=_RENAME, permute=(
    Permute(r"^visual\.patch_embed\.proj\.weight$", (0, 4, 1, 2, 3), _channels_last),))


@dataclass
class VLArgs(DecoderArgs):
    vision_config: dict = field(default_factory=dict)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    tokens_per_second: Optional[float] = None  # Qwen2.5-VL: absolute-time video positions
    video_frames_split: bool = False  # Qwen3-VL: one M-RoPE run per video frame

    @classmethod
    def build(cls, cfg: dict, text_args, mrope_section: List[int], mrope_interleaved: bool,
              text_flags: Optional[dict] = None, **vl) -> "VLArgs":
        """The family's text args (``text_args.from_config``) + the VL keys, from a flat or
        nested config. ``mrope_section``: transformers' default when the config has none."""
        cfg = normalize_config(cfg)
        require(cfg, "vision_config")
        if not isinstance(cfg["vision_config"], dict):
            raise ConfigError("vision_config must be a JSON object")
        text = text_args.from_config(cfg, **(text_flags or {}))
        kw = {f.name: getattr(text, f.name) for f in fields(DecoderArgs)}
        kw.update(mrope_section=kw["mrope_section"] or list(mrope_section),
                  mrope_interleaved=mrope_interleaved, vision_config=dict(cfg["vision_config"]))
        for k in ("image_token_id", "video_token_id", "vision_start_token_id"):
            if cfg.get(k) is not None:
                kw[k] = int(cfg[k])
        kw.update(vl)
        return cls(**kw)


@dataclass
class MultimodalEmbeds:
    """What `VLModel.embed_multimodal` hands to the forward, for the uncached part of the prompt."""

    input_embeds: mx.array  # (B, L_new, D)
    positions: mx.array  # (3, B, L_new) M-RoPE ids
    deepstack: Optional[List[mx.array]]  # Qwen3-VL: (B, L_new, D) per leading decoder layer
    rope_delta: np.ndarray  # (B,): a later text token at cache offset o has position o + delta
    features: Dict[str, TowerOutput] = field(default_factory=dict)  # tower outputs computed here, by key


def _take_rows(pixels, starts, sizes, items):
    parts = [pixels[int(starts[i]):int(starts[i] + sizes[i])] for i in items]
    return mx.concatenate(parts) if isinstance(pixels, mx.array) else np.concatenate(parts)


def _split(out: TowerOutput, counts) -> List[TowerOutput]:
    cuts = np.cumsum(counts)[:-1].tolist()
    embeds = mx.split(out.embeds, cuts) if cuts else [out.embeds]
    ds = [mx.split(d, cuts) if cuts else [d] for d in out.deepstack]
    return [TowerOutput(e, [d[i] for d in ds]) for i, e in enumerate(embeds)]


class VLModel(CausalLM):
    tower: ModuleType  # the family's tower module: VisionConfig, VisionModel

    def __init__(self, args: VLArgs):
        super().__init__(args)
        vcfg = self.tower.VisionConfig.from_config(args.vision_config)
        if vcfg.out_hidden_size != args.hidden_size:
            raise ConfigError(f"the vision tower outputs {vcfg.out_hidden_size} features but the text "
                              f"hidden size is {args.hidden_size}")
        self.visual = self.tower.VisionModel(vcfg)
        self.rope_config = RopeIndexConfig(vcfg.spatial_merge_size, args.image_token_id, args.video_token_id,
                                           args.tokens_per_second, args.video_frames_split)

    def __call__(self, input_ids=None, cache=None, input_embeds=None, positions=None, deepstack=None):
        """Text path; after media, tokens continue at ``cache offset + cache.rope_delta``."""
        delta = getattr(cache, "rope_delta", 0) if cache is not None else 0
        if positions is None and not (isinstance(delta, (int, np.integer)) and delta == 0):
            x = input_ids if input_embeds is None else input_embeds
            positions = text_positions(x.shape[0], x.shape[1], cache_offset(cache) + delta)
        return super().__call__(input_ids, cache, input_embeds, positions, deepstack)

    def embed_multimodal(self, input_ids, visual: VisualInputs, cache=None,
                         features: Optional[Dict[str, TowerOutput]] = None) -> MultimodalEmbeds:
        """``input_ids`` (B, L): the whole prompt, a cached prefix included (the cache offset
        says where the new part starts). Media in prompt order over the batch; ``features``:
        tower outputs by ``visual.image_keys`` / ``video_keys`` (a feature cache) - the tower
        runs only on media that have none and lie (partly) in the new part."""
        ids = np.array(input_ids).astype(np.int64)
        if ids.ndim != 2:
            raise PromptError(f"input_ids must be (batch, length), got shape {ids.shape}")
        if cache is not None and not hasattr(cache, "rope_delta"):
            raise PromptError("embed_multimodal needs the cache of model.make_cache() (a RequestCache)")
        B, L = ids.shape
        offset = cache_offset(cache) if cache is not None else 0
        if offset >= L:
            raise PromptError(f"the cache already holds {offset} tokens of this {L}-token prompt")
        pos, deltas = get_rope_index(self.rope_config, ids, visual.image_grid_thw, visual.video_grid_thw,
                                     second_per_grid_ts=visual.second_per_grid_ts)
        n = L - offset
        h = self.model.embed_tokens(mx.array(ids[:, offset:])).reshape(B * n, -1)
        index, ds_index = np.arange(B * n), np.zeros(B * n, np.int64)
        tables, ds_tables, computed = [h], [], {}
        base, ds_base = B * n, 1
        for kind in ("image", "video"):
            got = self._media_rows(kind, ids, offset, visual, features, computed)
            if got is None:
                continue
            dst, table, rows = got
            index[dst], ds_index[dst] = base + rows, ds_base + rows
            base, ds_base = base + table.embeds.shape[0], ds_base + table.embeds.shape[0]
            tables.append(table.embeds.astype(h.dtype))
            ds_tables.append(table.deepstack)
        embeds = mx.concatenate(tables)[mx.array(index)] if len(tables) > 1 else h
        deepstack = None
        if ds_tables and ds_tables[0]:
            zero = mx.zeros((1, h.shape[-1]), h.dtype)
            idx = mx.array(ds_index)
            deepstack = [mx.concatenate([zero] + [t[j].astype(h.dtype) for t in ds_tables])[idx].reshape(B, n, -1)
                         for j in range(len(ds_tables[0]))]
        if cache is not None:
            cache.rope_delta = int(deltas[0]) if B == 1 else mx.array(deltas)
            cache.media = list(visual.image_keys) + list(visual.video_keys)
        return MultimodalEmbeds(embeds.reshape(B, n, -1), mx.array(pos[:, :, offset:].astype(np.int32)),
                                deepstack, deltas, computed)

    def _media_rows(self, kind: str, ids: np.ndarray, offset: int, visual: VisualInputs, features, computed):
        """Placeholders of ``kind`` in the new part: (their flat index in the new part, a
        TowerOutput table of the rows they need, the table row of each) or None."""
        token = self.args.image_token_id if kind == "image" else self.args.video_token_id
        grid = visual.image_grid_thw if kind == "image" else visual.video_grid_thw
        B, L = ids.shape
        flat = np.flatnonzero(ids.reshape(-1) == token)
        if grid is None or len(grid) == 0:
            if len(flat):
                raise PromptError(f"the prompt has {len(flat)} {kind} placeholder tokens but no {kind}s")
            return None
        grid = np.asarray(grid, np.int64).reshape(-1, 3)
        counts = grid.prod(axis=1) // self.rope_config.spatial_merge_size**2
        if counts.sum() != len(flat):
            raise PromptError(f"the prompt has {len(flat)} {kind} placeholder tokens but the {len(grid)} "
                              f"{kind} grids {grid.tolist()} make {int(counts.sum())}")
        b, t = np.divmod(flat, L)
        new = t >= offset
        if not new.any():
            return None
        item = np.repeat(np.arange(len(grid)), counts)
        need = np.unique(item[new])
        outs = self._tower_outputs(kind, need, grid, counts, visual, features, computed)
        local = np.zeros(len(grid), np.int64)
        local[need] = np.cumsum(counts[need]) - counts[need]
        row = np.arange(len(flat)) - (np.cumsum(counts) - counts)[item]  # row within its item
        rows = (local[item] + row)[new]
        table = TowerOutput(mx.concatenate([outs[i].embeds for i in need]),
                            [mx.concatenate(parts) for parts in zip(*[outs[i].deepstack for i in need])])
        return b[new] * (L - offset) + t[new] - offset, table, rows

    def _tower_outputs(self, kind, need, grid, counts, visual, features, computed) -> Dict[int, TowerOutput]:
        keys = list(visual.image_keys if kind == "image" else visual.video_keys)
        if keys and len(keys) != len(grid):
            raise PromptError(f"{len(keys)} {kind} keys for {len(grid)} {kind}s")
        if features and not keys:
            raise PromptError(f"features were given but the visual inputs carry no {kind} keys")
        outs, missing = {}, []
        for i in need:
            got = features.get(keys[i]) if features and keys else None
            if got is None:
                missing.append(int(i))
            elif got.embeds.shape[0] != counts[i]:
                raise PromptError(f"cached features of {kind} '{keys[i]}' have {got.embeds.shape[0]} rows, "
                                  f"its grid {grid[i].tolist()} needs {int(counts[i])}")
            else:
                outs[int(i)] = got
        if missing:
            pixels = visual.pixel_values if kind == "image" else visual.pixel_values_videos
            patches = grid.prod(axis=1)
            if pixels is None or pixels.shape[0] != patches.sum():
                have = "none" if pixels is None else pixels.shape[0]
                raise PromptError(f"{kind} pixel rows: {have}, but the {kind} grids need {int(patches.sum())}")
            if len(missing) < len(grid):
                pixels = _take_rows(pixels, np.cumsum(patches) - patches, patches, missing)
            for i, out in zip(missing, _split(self.visual(pixels, grid[missing]), counts[missing])):
                outs[i] = out
                if keys:
                    computed[keys[i]] = out
        return outs
