"""Images and videos in prompts: the glue between chat messages, the VL processor, the model's
`embed_multimodal`, a vision-feature cache and the prompt cache.

A request flows: messages (content parts ``{"type": "image", "image": ...}``) -> `split_media`
(sources out, ``{"type": "image"}`` left for the chat template, which writes
``<|vision_start|><|image_pad|><|vision_end|>``) -> processor (pixels, grids, content keys) ->
``expand_prompt`` -> token ids -> `media_prefill` -> ``generate_tokens(prefill=...)``.

Multi-turn reuse: the prompt cache compares `prefill_keys`, where every placeholder token is
``(content key, row)``: a second question about the same image keeps the whole cached prefix
(image included) and prefills only the new text, while a different image at the same place
breaks the match at its first placeholder. Tower outputs are kept by content key in a bounded
LRU (`FeatureCache`) that lives with the prompt cache, so an image seen before never re-runs
the tower even when the KV prefix cannot be reused.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import PromptError
from .generate import EmbeddedPrefill, PromptCache
from .tokenizer.chat import part_kind
from .vision.inputs import TowerOutput, VisualInputs

IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def is_vl(model) -> bool:
    return hasattr(model, "embed_multimodal")


# -- messages -------------------------------------------------------------------------------------
def _source(part: dict, kind: str):
    src = part.get(kind)
    if kind == "image" and src is None:
        src = part.get("image_url")
        src = src.get("url") if isinstance(src, dict) else src
    if src is None:
        raise PromptError(f"a {kind} content part has no '{kind}' source: {str(part)[:80]}")
    return src


def split_media(messages: List[dict]) -> Tuple[List[dict], list, list]:
    """(messages with bare ``{"type": "image"|"video"}`` parts for the template, image sources,
    video sources), both in prompt order. The callers' messages are not modified."""
    out, images, videos = [], [], []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for p in content:
            kind = part_kind(p)
            if kind in ("image", "video"):
                (images if kind == "image" else videos).append(_source(p, kind))
                parts.append({"type": kind})
            else:
                parts.append(p)
        out.append({**m, "content": parts})
    return out, images, videos


def user_content(text, images: Sequence = (), videos: Sequence = ()):
    """A user message's content: ``text`` alone, or images, then videos, then the text (the
    order of the Qwen-VL model cards). ``text`` may already be a list of parts."""
    images, videos = as_list(images), as_list(videos)
    if not images and not videos:
        return text
    head = [{"type": "image", "image": x} for x in images] + [{"type": "video", "video": v} for v in videos]
    if isinstance(text, list):
        return head + list(text)
    return head + ([{"type": "text", "text": text}] if text else [])


def as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, (str, bytes, bytearray, np.ndarray)) or hasattr(x, "__fspath__") or hasattr(x, "getpixel"):
        return [x]
    return list(x)


def check_media_support(model, model_type: str, n_images: int, n_videos: int) -> None:
    if not (n_images or n_videos):
        return
    if not is_vl(model):
        what = " and ".join(w for w, n in (("images", n_images), ("videos", n_videos)) if n)
        raise PromptError(f"this model{f' ({model_type})' if model_type else ''} is text-only: it cannot take "
                          f"{what} (load a Qwen VL checkpoint: {', '.join(VL_TYPES)})")
    caps = getattr(model, "capabilities", frozenset({"vision", "video"}))
    for kind, n, cap in (("images", n_images, "vision"), ("videos", n_videos, "video")):
        if n and cap not in caps:
            raise PromptError(f"this model{f' ({model_type})' if model_type else ''} cannot take {kind}")


# -- feature cache --------------------------------------------------------------------------------
class FeatureCache:
    """Vision-tower outputs by content key, least recently used dropped first once over
    ``max_bytes`` or ``max_items``."""

    def __init__(self, max_bytes: int = 1 << 30, max_items: int = 64):
        self.max_bytes, self.max_items = max_bytes, max_items
        self._items: "OrderedDict[str, Tuple[TowerOutput, int]]" = OrderedDict()
        self.nbytes = self.hits = self.misses = 0

    def __len__(self):
        return len(self._items)

    def __contains__(self, key):
        return key in self._items

    def lookup(self, keys: Sequence[str]) -> Dict[str, TowerOutput]:
        out = {}
        for k in dict.fromkeys(keys):
            if k in self._items:
                self._items.move_to_end(k)
                out[k] = self._items[k][0]
        return out

    def put(self, key: str, value: TowerOutput) -> None:
        size = value.embeds.nbytes + sum(d.nbytes for d in value.deepstack)
        if key in self._items:
            self.nbytes -= self._items.pop(key)[1]
        if size > self.max_bytes:
            return
        self._items[key] = (value, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes or len(self._items) > self.max_items:
            self.nbytes -= self._items.popitem(last=False)[1][1]

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


class MediaPromptCache(PromptCache):
    """A prompt cache that also keeps the vision features of the media it has seen. `reset`
    (a new conversation) keeps the features: they are keyed by content."""

    def __init__(self, model, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None,
                 kv_group_size: int = 64, features: Optional[FeatureCache] = None):
        self.features = features if features is not None else FeatureCache()
        super().__init__(model, max_kv_size, kv_bits, kv_group_size)


def features_of(pc: PromptCache) -> FeatureCache:
    f = getattr(pc, "features", None)
    if f is None:  # a plain PromptCache: give it one for its lifetime
        f = pc.features = FeatureCache()
    return f


# -- prefill --------------------------------------------------------------------------------------
def prefill_keys(ids: Sequence[int], visual: VisualInputs, image_id: int, video_id: int,
                 merge_size: int) -> list:
    """Token ids, with the j-th placeholder token of a media item replaced by (its key, j)."""
    keys = [int(t) for t in ids]
    for token, grid, names in ((image_id, visual.image_grid_thw, visual.image_keys),
                               (video_id, visual.video_grid_thw, visual.video_keys)):
        pos = [i for i, t in enumerate(keys) if t == token]
        if grid is None or not len(grid):
            if pos:
                raise PromptError(f"the prompt has {len(pos)} placeholder tokens (id {token}) but no media for them")
            continue
        counts = [int(np.prod(g)) // merge_size**2 for g in np.asarray(grid).reshape(-1, 3)]
        if sum(counts) != len(pos):
            raise PromptError(f"the prompt has {len(pos)} placeholder tokens (id {token}) but its "
                              f"{len(counts)} media item(s) need {sum(counts)}")
        if len(names) != len(counts):
            raise PromptError(f"{len(names)} content keys for {len(counts)} media item(s)")
        it = iter(pos)
        for name, n in zip(names, counts):
            for j in range(n):
                keys[next(it)] = (name, j)
    return keys


def media_prefill(model, ids: Sequence[int], visual: VisualInputs, pc: PromptCache) -> EmbeddedPrefill:
    """The `EmbeddedPrefill` of a multimodal prompt: its keys, and an ``embed`` that runs the
    tower only on media whose features are not cached (and that lie in the uncached part)."""
    a = model.args
    keys = prefill_keys(ids, visual, a.image_token_id, a.video_token_id, model.rope_config.spatial_merge_size)
    feats = features_of(pc)
    ids2d = np.asarray(ids, np.int64)[None]

    def embed(offset: int):
        known = feats.lookup(list(visual.image_keys) + list(visual.video_keys))
        mm = model.embed_multimodal(ids2d, visual, pc.cache, features=known)
        feats.hits += len(known)
        feats.misses += len(mm.features)
        for k, out in mm.features.items():
            feats.put(k, out)
        return mm

    return EmbeddedPrefill(keys, embed)


def text_only(model, ids: Sequence[int], pc: PromptCache) -> None:
    """Before a text-only prompt on a VL model: no placeholder may appear, and the cached prefix
    it can reuse holds no media (their keys never equal token ids), so positions restart from
    a rope delta of 0."""
    if not is_vl(model):
        return
    a = model.args
    bad = {a.image_token_id: IMAGE_TOKEN, a.video_token_id: VIDEO_TOKEN}
    hit = next((bad[t] for t in ids if t in bad), None)
    if hit is not None:
        raise PromptError(f"the prompt contains {hit} but no image/video was given")
    pc.cache.rope_delta = 0
    pc.cache.media = []


@dataclass
class Request:
    """A rendered, tokenized request: ``visual`` is None for text-only prompts."""

    ids: List[int]
    text: str
    params: object  # SamplingParams
    visual: Optional[VisualInputs] = None


def process_media(processor, tokenizer, model, text: str, images: list, videos: list) -> Tuple[str, VisualInputs]:
    """Process the media and expand the placeholders of the rendered ``text``."""
    a = model.args
    for tok, want, n in ((IMAGE_TOKEN, a.image_token_id, len(images)), (VIDEO_TOKEN, a.video_token_id, len(videos))):
        got = tokenizer.token_to_id(tok)
        if n and got != want:
            raise PromptError(f"the tokenizer maps {tok} to {got}, the model expects {want}")
    visual = processor(images=images, videos=videos)
    return processor.expand_prompt(text, visual), visual

