"""`load_model`: a checkpoint directory, a hub id or a GGUF file -> an MLX model."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..config import FORMAT_VERSION, load_config
from ..errors import ConfigError, ModelNotFoundError, WeightsError
from ..registry import get_family
from .remap import remap_weights
from .safetensors_io import load_file, shard_files

Progress = Optional[Callable[[int, int, str], None]]
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.tiktoken", "*.model"]


def resolve_model_path(path_or_id: Union[str, Path]) -> Path:
    """A local directory/file, or a hub id fetched into the huggingface_hub cache."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        return p
    s = str(path_or_id)
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"no such model file or directory: {s}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(f"'{s}' is not a local path and huggingface_hub is not installed")
    try:
        return Path(snapshot_download(s, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(s, allow_patterns=_HUB_PATTERNS))
    except Exception as e:
        raise ModelNotFoundError(
            f"'{s}' is not a local path and could not be downloaded from the Hugging Face hub "
            f"(offline or unknown repo?): {type(e).__name__}: {str(e)[:200]}"
        ) from None


def default_dtype(cfg: dict) -> mx.Dtype:
    """float32 on the CPU backend (only float32 matmuls are fast there), else the checkpoint's."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    return {"float16": mx.float16, "float32": mx.float32}.get(name, mx.bfloat16)


def _quant_params(cfg: dict, path: str):
    """What config.json's ``quantization`` block (mlx-lm's layout) declares for ``path``:
    its own entry (any of bits / group_size / mode; as in mlx-lm, an entry without a mode
    is affine), False (explicitly unquantized), or else the global mode."""
    q = cfg.get("quantization") or {}
    per = q.get(path)
    if per is False:
        return False
    if isinstance(per, dict):
        return {"mode": "affine", **per}
    return {"mode": q["mode"]} if "mode" in q else {}


def quant_layout(cfg: dict, base: str, w: mx.array, s: mx.array, in_dims: int,
                 b: Optional[mx.array] = None) -> dict:
    """Bits, group size and mode of a quantized triplet, read off the packed shapes
    (``in_dims`` comes from the float model): packed = in * bits / 32, groups = in / group;
    uint8 scales mean an fp mode (mxfp4 / nvfp4 / mxfp8), float scales affine."""
    from ..quant.spec import QuantizationError, packed_spec

    declared = _quant_params(cfg, base)
    if declared is False:
        raise QuantizationError(f"quantized tensor '{base}' is declared unquantized (false) in config.json")
    return packed_spec(base, w, s, b, in_dims, declared).config()


def _quantize_modules(model: nn.Module, weights: Dict[str, mx.array], cfg: dict) -> None:
    """Turn every module whose weights come as quantized triplets into its quantized form."""

    def predicate(path, module):
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        return quant_layout(cfg, path, weights[f"{path}.weight"], weights[f"{path}.scales"],
                            module.weight.shape[-1], weights.get(f"{path}.biases"))

    nn.quantize(model, class_predicate=predicate)


def dequantize_weights(model: nn.Module, weights: Dict[str, mx.array], dtype: mx.Dtype,
                       cfg: dict, only=None) -> Dict[str, mx.array]:
    """Replace quantized triplets (of the modules in ``only``, default all) by float weights
    (the fast path of MLX's CPU backend)."""
    from ..quant.spec import QuantSpec, dequantize

    expected = dict(tree_flatten(model.parameters()))
    out = dict(weights)
    for name in [n for n in weights if n.endswith(".scales")]:
        base = name[: -len(".scales")]
        if only is not None and base not in only:
            continue
        w, s, b = out.pop(f"{base}.weight", None), out.pop(name), out.pop(f"{base}.biases", None)
        if w is None or f"{base}.weight" not in expected:
            raise WeightsError(f"quantized tensor '{base}' has scales but no matching weight")
        q = quant_layout(cfg, base, w, s, expected[f"{base}.weight"].shape[-1], b)
        out[f"{base}.weight"] = dequantize({"weight": w, "scales": s, "biases": b}, QuantSpec(**q), dtype)
    return out


def _fusable_part(w: Dict[str, mx.array], base: str, expected: Dict[str, mx.array]) -> bool:
    """``base``'s weight is there with the model's shape (packed: its rows)."""
    if f"{base}.weight" not in w or f"{base}.weight" not in expected:
        return False
    got, want = tuple(w[f"{base}.weight"].shape), tuple(expected[f"{base}.weight"].shape)
    return got[:-1] == want[:-1] if f"{base}.scales" in w else got == want


def _fuse_dequantized(model: nn.Module, weights: Dict[str, mx.array], dtype: mx.Dtype, cfg: dict,
                      release: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Fusion on the dequantize path, done on the checkpoint's tensors before they are bound:
    each q/k/v and gate/up group (models/fuse.py) becomes one float tensor. Parts packed
    alike (same bits, group size, mode) are concatenated packed along the output rows and
    dequantized once, straight into the fused layout (a group never spans two rows, so this
    equals fusing the dequantized parts bit for bit, without a float copy of each part);
    others are dequantized / cast apiece, then concatenated. The model's modules are fused to
    match; the parts are dropped from ``release`` (the checkpoint's dict)."""
    from ..models.fuse import fuse_projections, fusion_groups
    from ..quant.spec import QuantSpec, dequantize

    expected = dict(tree_flatten(model.parameters()))
    out, done = dict(weights), set()
    for path, names, fused in fusion_groups(model):
        bases = [f"{path}.{n}" for n in names]
        if not all(_fusable_part(out, b, expected) and (f"{b}.bias" in out) == (f"{bases[0]}.bias" in out)
                   for b in bases):
            continue  # missing or odd tensors: left for the checks to name
        specs = [quant_layout(cfg, b, out[f"{b}.weight"], out[f"{b}.scales"], expected[f"{b}.weight"].shape[-1],
                              out.get(f"{b}.biases")) if f"{b}.scales" in out else None for b in bases]
        parts = [{k: out.pop(f"{b}.{k}") for k in ("weight", "scales", "biases", "bias") if f"{b}.{k}" in out}
                 for b in bases]
        for b in bases:
            for k in ("weight", "scales", "biases", "bias"):
                release.pop(f"{b}.{k}", None)
        if specs[0] is not None and all(sp == specs[0] for sp in specs):
            packed = {k: mx.concatenate([p[k] for p in parts], axis=-2) for k in ("weight", "scales", "biases")
                      if k in parts[0]}
            w = dequantize(packed, QuantSpec(**specs[0]), dtype)
        else:
            w = mx.concatenate([dequantize(p, QuantSpec(**sp), dtype) if sp else p["weight"].astype(dtype)
                                for p, sp in zip(parts, specs)], axis=-2)
        out[f"{path}.{fused}.weight"] = w
        if "bias" in parts[0]:
            out[f"{path}.{fused}.bias"] = mx.concatenate([p["bias"] for p in parts], axis=-1)
        done.add(path)
    fuse_projections(model, only=done)  # the freshly built model's (lazy, never evaluated) parameters
    return out


def _check_weights(model: nn.Module, weights: Dict[str, mx.array], where: str) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"{where}: missing tensors {', '.join(missing[:5])}{more}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise WeightsError(f"{where}: unexpected tensors {', '.join(extra[:5])}{more}")
    for name, w in weights.items():
        if tuple(w.shape) != tuple(expected[name].shape):
            raise WeightsError(
                f"{where}: tensor '{name}' has shape {tuple(w.shape)}, expected {tuple(expected[name].shape)}"
            )


def _widens(src: mx.Dtype, dst: mx.Dtype) -> bool:
    return src == dst or dst == mx.float32


def _bound(name: str, v: mx.array, dtype: mx.Dtype, weights: Dict[str, mx.array]) -> mx.array:
    """A tensor in the model dtype, except quantization scales / biases that it cannot hold
    exactly (they stay as stored): GGUF Q4_K / Q5_K / Q5_0 / Q5_1 and GPTQ / AWQ imports carry exact
    float32 ones (an fp16 ``d`` times a 6-bit scale: up to 17 significant bits, 8 in bfloat16),
    GGUF Q4_0 / Q4_1 / Q8_0 float16 ones. MLX's quantized kernels take them beside half
    activations, computing in float32; the projections cast their outputs back to the
    activations' dtype (`_keep_output_dtype`, models/linear.py, models/decoder.py)."""
    if not mx.issubdtype(v.dtype, mx.floating) or v.dtype == dtype:
        return v
    base, leaf = name.rsplit(".", 1)
    if leaf in ("scales", "biases") and f"{base}.scales" in weights and not _widens(v.dtype, dtype):
        return v
    return v.astype(dtype)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """`nn.QuantizedEmbedding` whose rows come out in ``out_dtype`` (its lookup returns the
    scales' dtype: float32 for exact scales kept beside a half-precision model)."""

    out_dtype: Optional[mx.Dtype] = None

    def __call__(self, x):
        y = super().__call__(x)
        return y if self.out_dtype is None else y.astype(self.out_dtype)


def _keep_output_dtype(model: nn.Module, dtype: mx.Dtype) -> None:
    """Quantized modules whose scales `_bound` kept wider than ``dtype`` return ``dtype``:
    MLX's own QuantizedLinear becomes ours (models/linear.py: the output cast to the input's
    dtype), QuantizedEmbedding the subclass above (same parameters, only the class changes)."""
    from ..models.linear import QuantizedLinear

    for _, m in model.named_modules():
        s = m.get("scales") if "scales" in m else None
        if s is None or not mx.issubdtype(s.dtype, mx.floating) or s.dtype == dtype:
            continue
        if type(m) is nn.QuantizedLinear:
            m.__class__ = QuantizedLinear
        elif type(m) is nn.QuantizedEmbedding:
            m.__class__ = QuantizedEmbedding
            m.out_dtype = dtype


def build_model(cfg: dict) -> nn.Module:
    family = get_family(cfg["model_type"])
    try:
        args = family.ModelArgs.from_config(cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"invalid config for model_type '{cfg['model_type']}': {e}") from None
    return family.Model(args)


@dataclass
class Checkpoint:
    config: dict
    weights: Dict[str, mx.array]
    where: str
    gguf_metadata: Optional[dict] = None


def load_checkpoint(path: Path, import_options=None) -> Checkpoint:
    """Read config and (lazy) weights in our layout, remapped from HF names if needed.
    GPTQ / AWQ / FP8 checkpoints are imported first (see `loading.imports.ImportOptions`)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import read_gguf
        ck = read_gguf(path)
        return Checkpoint(ck.config, ck.weights, str(path), ck.metadata)
    if path.is_file():
        raise ModelNotFoundError(f"{path} is a file; expected a checkpoint directory or a .gguf file")
    cfg = load_config(path)
    if cfg.get("qwen_mlx_format", 0) > FORMAT_VERSION:
        raise ConfigError(f"{path} was written by a newer qwen_mlx (format {cfg['qwen_mlx_format']})")
    family = get_family(cfg["model_type"])  # an unknown model_type fails before any weight is read
    weights = {}
    for f in shard_files(path):
        weights.update(load_file(f))
    if "qwen_mlx_format" not in cfg:
        from .imports import import_quantized
        cfg, weights = import_quantized(cfg, weights, import_options, str(path))
        weights = remap_weights(weights, cfg.get("num_experts") or 0, cfg.get("tie_word_embeddings", False),
                                rules=getattr(family, "REMAP", None), cfg=cfg)
    else:  # our writer's names for this family (layouts.LAYOUTS) -> ours
        from .layouts import read_names
        weights = read_names(cfg, weights)
    return Checkpoint(cfg, weights, str(path))


def model_from_checkpoint(ck: Checkpoint, *, dtype: Optional[mx.Dtype] = None,
                          dequantize: Optional[bool] = None, lazy: bool = False,
                          progress: Progress = None, fuse: bool = True) -> nn.Module:
    """Build the model and bind the weights. ``dequantize`` defaults to True on the CPU
    backend, where float32 matmuls are the fast path; elsewhere weights stay quantized.
    ``fuse``: q/k/v and gate/up as one projection each (models/fuse.py; the checkpoint's
    tensors it supersedes are dropped from ``ck.weights`` so that they are not kept); when
    dequantizing, packed parts are fused before they are dequantized (`_fuse_dequantized`)."""
    cfg, weights = ck.config, ck.weights
    if hasattr(weights, "read_all"):  # a GGUF file: every tensor at once (one mx.load where it can)
        weights.read_all()
    dtype = dtype or default_dtype(cfg)
    if dequantize is None:
        dequantize = mx.default_device() == mx.cpu
    model = build_model(cfg)
    if dequantize:
        if fuse:
            weights = _fuse_dequantized(model, weights, dtype, cfg, ck.weights)
        weights = dequantize_weights(model, weights, dtype, cfg)
    elif any(n.endswith(".scales") for n in weights):  # modules whose weight the model reads
        from ..quant.plan import direct_weight_reads  # directly (not as a matmul / lookup): float
        weights = dequantize_weights(model, weights, dtype, cfg, only=direct_weight_reads(model))
    if any(n.endswith(".scales") for n in weights):
        _quantize_modules(model, weights, cfg)
    _check_weights(model, weights, ck.where)
    weights = {k: _bound(k, v, dtype, weights) for k, v in weights.items()}
    model.update(tree_unflatten(list(weights.items())))
    del weights  # the model holds its arrays; fusion below supersedes some of them
    _keep_output_dtype(model, dtype)
    if fuse:
        from ..models.fuse import fuse_projections
        fuse_projections(model, release=ck.weights)
    if not lazy:
        _materialize(model, progress)
    model.eval()
    return model


def load_model(path_or_id: Union[str, Path], *, return_config: bool = False, **kw):
    """``load_model(path)`` -> model; ``model(input_ids)`` -> logits ``[B, L, vocab]``.
    Options: ``dtype``, ``dequantize``, ``lazy``, ``progress`` (see `model_from_checkpoint`)."""
    ck = load_checkpoint(resolve_model_path(path_or_id))
    model = model_from_checkpoint(ck, **kw)
    return (model, ck.config) if return_config else model


def _materialize(model: nn.Module, progress: Progress) -> None:
    layers = model.layers
    total = len(layers) + 1
    try:
        for i, layer in enumerate(layers):
            mx.eval(layer.parameters())
            if progress:
                progress(i + 1, total, "layers")
        mx.eval(model.parameters())
    except (RuntimeError, ValueError) as e:
        raise WeightsError(f"failed to read weights: {e}") from None
    if progress:
        progress(total, total, "done")
