"""Typed hand-off between the processors, the vision towers and the VL models."""

from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx
import numpy as np


@dataclass
class VisualInputs:
    """Processor output for one request. Images and videos are each in prompt order;
    ``pixel_values`` rows are the patches of every image, one after another."""

    pixel_values: Optional[np.ndarray] = None  # (N_patches, C * T * P * P) float32
    image_grid_thw: Optional[np.ndarray] = None  # (n_images, 3) int64
    pixel_values_videos: Optional[np.ndarray] = None
    video_grid_thw: Optional[np.ndarray] = None  # (n_videos, 3) int64
    second_per_grid_ts: Optional[np.ndarray] = None  # Qwen2.5-VL: seconds per temporal grid step, per video
    video_timestamps: Optional[List[List[float]]] = None  # Qwen3-VL: seconds of each temporal grid step
    image_keys: List[str] = field(default_factory=list)  # content hashes (feature cache keys)
    video_keys: List[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return 0 if self.image_grid_thw is None else len(self.image_grid_thw)

    @property
    def n_videos(self) -> int:
        return 0 if self.video_grid_thw is None else len(self.video_grid_thw)


@dataclass
class TowerOutput:
    """Vision tower output: merged features, one row per placeholder token, and (Qwen3-VL)
    the DeepStack features of selected ViT layers, same rows, one array per decoder layer."""

    embeds: mx.array  # (N_tokens, text hidden)
    deepstack: List[mx.array] = field(default_factory=list)
