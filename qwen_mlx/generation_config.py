"""Sampling defaults and stop ids from a checkpoint's ``generation_config.json``."""

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import List, Optional, Set


@dataclass
class SamplingParams:
    """What a request may set; ``None`` means "the checkpoint's recommendation"."""

    max_tokens: int = 256
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 64
    presence_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)

    def merged(self, defaults: "GenerationConfig") -> "SamplingParams":
        d = defaults.sampling
        upd = {f.name: getattr(d, f.name) for f in fields(self)
               if getattr(self, f.name) is None and getattr(d, f.name) is not None}
        return replace(self, **upd)


@dataclass
class GenerationConfig:
    eos_token_ids: Set[int] = field(default_factory=set)
    sampling: SamplingParams = field(default_factory=SamplingParams)

    @classmethod
    def from_dir(cls, path: Path) -> "GenerationConfig":
        f = Path(path) / "generation_config.json"
        if not f.exists():
            return cls()
        try:
            g = json.loads(f.read_text())
        except (OSError, ValueError):
            return cls()
        eos = g.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        greedy = g.get("do_sample") is False
        s = SamplingParams(
            temperature=0.0 if greedy else g.get("temperature"),
            top_p=None if greedy else g.get("top_p"),
            top_k=None if greedy else g.get("top_k"),
            min_p=None if greedy else g.get("min_p"),
            repetition_penalty=g.get("repetition_penalty"),
            presence_penalty=g.get("presence_penalty"),
        )
        return cls(eos_token_ids=eos, sampling=s)
