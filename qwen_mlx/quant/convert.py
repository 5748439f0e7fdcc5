"""Streaming quantizing converter: any checkpoint qwen_mlx loads (HF directory, GGUF file,
MLX / mlx-lm directory, quantized or not) -> an MLX directory mlx-lm also loads.

Tensors are read lazily one at a time, dequantized if the source packed them, cast,
quantized per the plan, and appended to the current shard, which is written when full.
A packed tensor whose spec the plan keeps (a GGUF Q4_1 at 4 bits, group 32) is copied
as it is, its scales / biases cast only where the dtype holds them exactly (the loader's
`_bound`), so that its weights stay the source's bit for bit. Memory stays near one
shard plus one tensor. Output goes through `staged_dir`, so a conversion killed at any
moment leaves no DST.
"""

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import QwenMLXError, WeightsError
from ..loading.layouts import layout_of
from ..loading.loader import _bound, _quant_params, build_model, load_checkpoint, resolve_model_path
from ..loading.writer import SHARD_BYTES, ShardWriter, staged_dir, write_side_files
from .plan import Plan, make_plan, natural_key
from .spec import QuantizationError, QuantSpec, dequantize, packed_spec, quantize

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
Progress = Optional[Callable[[int, int, str], None]]


@dataclass
class ConvertOptions:
    bits: Optional[int] = None
    group_size: Optional[int] = None
    mode: Optional[str] = None
    dtype: Optional[str] = None  # None: the source's (`target_dtype`)
    recipe: str = "uniform"
    keep_bits: Optional[str] = None  # "embed=8,lm_head=8"
    shard_bytes: int = SHARD_BYTES
    overwrite: bool = False
    report: bool = False  # per-tensor relative weight error


@dataclass
class TensorError:
    name: str
    spec: str
    shape: Tuple[int, ...]
    rel_err: float


@dataclass
class ConvertResult:
    path: Path
    plan: Plan
    dtype: str
    shards: List[str]
    bytes_written: int
    seconds: float
    errors: List[TensorError] = field(default_factory=list)
    notices: List[str] = field(default_factory=list)


def target_dtype(name: Optional[str], cfg: dict, dtypes=(), gguf: bool = False) -> str:
    """The dtype of float tensors: ``name`` (--dtype), else the source's ``torch_dtype``, else
    the half type of its tensors (``dtypes``), a GGUF file counting as float16 (llama.cpp
    stores F16 tensors and every block's scale fields as float16, so Q4_0 / Q4_1 / Q8_0
    scales are written as they are): float16 unless it holds bfloat16 tensors (BF16 data
    may exceed float16's range); bfloat16 when nothing says float16. Kept quantized
    tensors' scales / biases may stay wider (`_convert_weight`)."""
    if name is None:
        src = str(cfg.get("torch_dtype") or cfg.get("dtype") or "").replace("torch.", "")
        if src in DTYPES:
            return src
        halves = {d for d in dtypes if d in (mx.float16, mx.bfloat16)} | ({mx.float16} if gguf else set())
        return "float16" if halves == {mx.float16} else "bfloat16"
    if name not in DTYPES:
        raise QuantizationError(f"unknown dtype '{name}' (use one of {', '.join(DTYPES)})")
    return name


def _rel_err(ref: mx.array, approx: mx.array) -> float:
    ref = ref.astype(mx.float32)
    d = mx.linalg.norm((approx.astype(mx.float32) - ref).flatten())
    n = mx.linalg.norm(ref.flatten())
    return float((d / mx.maximum(n, 1e-30)).item())


def _source_layout(ck, expected: Dict[str, mx.array]) -> Dict[str, QuantSpec]:
    """Check names and shapes before anything is written; the specs of packed tensors."""
    w, cfg = ck.weights, ck.config
    packed = {}
    for n in [n for n in w if n.endswith(".scales")]:
        base = n[: -len(".scales")]
        if f"{base}.weight" not in expected or f"{base}.weight" not in w:
            raise WeightsError(f"{ck.where}: quantized tensor '{base}' has scales but no matching weight")
        ref = expected[f"{base}.weight"]
        decl = _quant_params(cfg, base)
        if decl is False:
            raise QuantizationError(f"{ck.where}: quantized tensor '{base}' is declared unquantized (false) in config.json")
        qw, s = w[f"{base}.weight"], w[n]
        packed[base] = packed_spec(base, qw, s, w.get(f"{base}.biases"), ref.shape[-1], decl)
        if tuple(qw.shape[:-1]) != tuple(ref.shape[:-1]):
            raise QuantizationError(
                f"{ck.where}: quantized tensor '{base}' has {tuple(qw.shape[:-1])} output rows, expected "
                f"{tuple(ref.shape[:-1])}")
    names = set(w) - {f"{b}.{s}" for b in packed for s in ("scales", "biases")}
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        what = f"missing tensors {', '.join(missing[:5])}" if missing else f"unexpected tensors {', '.join(extra[:5])}"
        raise WeightsError(f"{ck.where}: {what}")
    for n in names:
        base = n.rsplit(".", 1)[0]
        if base not in packed and tuple(w[n].shape) != tuple(expected[n].shape):
            raise WeightsError(f"{ck.where}: tensor '{n}' has shape {tuple(w[n].shape)}, expected {tuple(expected[n].shape)}")
    return packed


def convert(src, dst, opts: Optional[ConvertOptions] = None, progress: Progress = None) -> ConvertResult:
    """Convert ``src`` into ``dst``; see `ConvertOptions`.

    >>> convert("Qwen3-0.6B", "q3-4bit", ConvertOptions(recipe="mixed-4-6"))
    """
    opts = opts or ConvertOptions()
    t0 = time.perf_counter()
    src, dst = resolve_model_path(src), Path(dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise QwenMLXError(f"destination {dst} is (inside) the source {src}")
    ck = load_checkpoint(src)
    layout = getattr(ck.weights, "layout", None)  # a GGUF source: shapes from its header, no data read
    shapes = replace(ck, weights=layout()) if layout else ck
    dname = target_dtype(opts.dtype, ck.config, {v.dtype for v in shapes.weights.values()},
                         gguf=ck.gguf_metadata is not None)
    dtype = DTYPES[dname]
    model = build_model(ck.config)  # lazy: only shapes and module kinds are used
    expected = dict(tree_flatten(model.parameters()))
    plan = make_plan(model, recipe=opts.recipe, bits=opts.bits, group_size=opts.group_size,
                     mode=opts.mode, keep_bits=opts.keep_bits)
    packed = _source_layout(shapes, expected)
    del model
    names = sorted(expected, key=natural_key)
    errors: List[TensorError] = []
    wider: Dict[str, int] = {}  # scales dtype -> kept tensors whose scales ``dtype`` would round
    weights = ck.weights
    with staged_dir(dst, overwrite=opts.overwrite) as tmp:
        writer = ShardWriter(tmp, opts.shard_bytes, layout_of(ck.config))
        for i, name in enumerate(names):
            base, leaf = name.rsplit(".", 1)
            if leaf == "weight" and base in plan.specs:
                out, err = _convert_weight(weights, base, packed.get(base), plan.specs[base], dtype, opts.report)
                if err is not None:
                    spec = plan.specs[base]
                    errors.append(TensorError(name, str(spec) if spec else dname, tuple(expected[name].shape), err))
            elif base in packed and leaf == "weight":
                # packed in the source but not a module we quantize: store it float
                p = {k: weights.pop(f"{base}.{k}") for k in ("weight", "scales", "biases") if f"{base}.{k}" in weights}
                out = {name: dequantize(p, packed[base], dtype)}
            else:
                t = weights.pop(name)
                out = {name: t.astype(dtype) if mx.issubdtype(t.dtype, mx.floating) else t}
            s = out.get(f"{base}.scales")
            if leaf == "weight" and s is not None and mx.issubdtype(s.dtype, mx.floating) and s.dtype != dtype:
                k = str(s.dtype).rsplit(".", 1)[-1]
                wider[k] = wider.get(k, 0) + 1
            writer.add(out)
            del out
            if progress:
                progress(i + 1, len(names), name)
        shards = writer.close()
        cfg = {k: v for k, v in ck.config.items() if k not in ("quantization", "quantization_config")}
        q = plan.config()
        if q is not None:
            cfg["quantization"] = q
            cfg["quantization_config"] = q  # mlx-lm writes both (HF tooling reads the latter)
        cfg["torch_dtype"] = dname
        if "dtype" in cfg:
            cfg["dtype"] = dname
        write_side_files(ck, src if src.is_dir() else src.parent, tmp, cfg)
    notices = [_wider_notice(wider, dname)] if wider else []
    return ConvertResult(dst, plan, dname, shards, writer.total_bytes, time.perf_counter() - t0, errors, notices)


def _wider_notice(wider: Dict[str, int], dname: str) -> str:
    kinds = ", ".join(f"{n} in {k}" for k, n in sorted(wider.items()))
    return (f"kept the scales / biases of {sum(wider.values())} quantized tensor(s) as the source stores them "
            f"({kinds}): {dname} would round them. qwen_mlx casts those layers' outputs back to {dname}; "
            f"in mlx-lm they come out wider (float32 once mixed with {dname})")


def _convert_weight(weights, base: str, src_spec: Optional[QuantSpec], spec: Optional[QuantSpec],
                    dtype, report: bool):
    name = f"{base}.weight"
    if src_spec is not None:
        p = {k: weights.pop(f"{base}.{k}") for k in ("weight", "scales", "biases") if f"{base}.{k}" in weights}
        if spec == src_spec:  # same layout: the packed data as it is; scales / biases in ``dtype``
            named = {f"{base}.{k}": v for k, v in p.items()}  # where it holds them exactly (the loader's rule)
            out = {k: _bound(k, v, dtype, named) for k, v in named.items()}
            err = None
            if report:
                q = {k.rsplit(".", 1)[1]: v for k, v in out.items()}
                err = _rel_err(dequantize(p, src_spec), dequantize(q, spec))
            return out, err
        w = dequantize(p, src_spec, mx.float32 if report else dtype)
    else:
        w = weights.pop(name)
    if spec is None:
        out = {name: w.astype(dtype)}
        return out, (_rel_err(w, out[name]) if report else None)
    q = quantize(w.astype(dtype), spec, name)
    out = {f"{base}.{k}": v for k, v in q.items()}
    return out, (_rel_err(w, dequantize(q, spec)) if report else None)
