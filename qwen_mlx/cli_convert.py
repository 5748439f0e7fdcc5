"""`qwen-mlx convert`: quantizing conversion with recipes and a quality report."""

import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import QwenMLXError

err = Console(stderr=True)
out = Console()


def parse_size(text: str) -> int:
    """``"5GB"``, ``"200MB"``, ``"123456"`` -> bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise QwenMLXError(f"--shard-size: cannot read '{text}' (e.g. 5GB, 500MB)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def _recipes_table() -> Table:
    from .quant.recipes import ALIASES, RECIPES

    names = {v: k for k, v in ALIASES.items()}
    t = Table(title="quantization recipes (qwen-mlx convert --recipe NAME)")
    t.add_column("recipe", style="bold")
    t.add_column("what it does")
    t.add_column("rules (module alias or regex -> spec)", overflow="fold")
    for name, r in RECIPES.items():
        rules = "; ".join(f"{names.get(p, p)} -> {v if isinstance(v, str) else ','.join(f'{k}={x}' for k, x in v.items())}"
                          for p, v in r.rules)
        t.add_row(name, r.description, rules or "-")
    return t


def _errors_table(res) -> Table:
    t = Table(title=f"relative weight error ||W - deq(q(W))|| / ||W||  ({len(res.errors)} tensors)")
    for c in ("tensor", "spec", "shape", "rel. error"):
        t.add_column(c, justify="right" if c == "rel. error" else "left")
    for e in res.errors:
        t.add_row(e.name, e.spec, "x".join(map(str, e.shape)), f"{e.rel_err:.3e}")
    return t


def _summary_table(res) -> Table:
    from .quant.report import error_summary

    t = Table(title="relative weight error by spec")
    for c in ("spec", "tensors", "mean", "max"):
        t.add_column(c)
    for spec, d in error_summary(res.errors).items():
        t.add_row(spec, str(d["tensors"]), f"{d['mean']:.3e}", f"{d['max']:.3e}")
    return t


def convert(
    src: Optional[str] = typer.Argument(None, help="HF dir, .gguf file, MLX/mlx-lm dir or hub id."),
    dst: Optional[str] = typer.Argument(None, help="Output directory (must not exist)."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help="Body bits: 2, 3, 4, 5, 6 or 8."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g", help="32, 64 or 128 (affine)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="affine | mxfp4 | nvfp4 | mxfp8."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16 | float16 | float32 for float tensors (default: "
                                        "the source's; GGUF: float16, bfloat16 if it has BF16 tensors)."),
    recipe: str = typer.Option("uniform", "--recipe", "-r", help="See --list-recipes."),
    keep_bits: Optional[str] = typer.Option(None, "--keep-bits",
                                            help="Extra rules, e.g. embed=8,lm_head=8,router=keep,down_proj=6/32."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest shard file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
    report: bool = typer.Option(False, "--report", help="Print the per-tensor relative weight error."),
    eval_text: Optional[Path] = typer.Option(None, "--eval-text", help="Text file: perplexity of source vs converted."),
    list_recipes: bool = typer.Option(False, "--list-recipes", help="List the recipes and exit."),
):
    """Convert (and quantize) a checkpoint into an MLX directory that mlx-lm also loads."""
    from .quant import ConvertOptions
    from .quant import convert as run

    if list_recipes:
        out.print(_recipes_table())
        return
    if not src or not dst:
        err.print("[red]error:[/] convert needs SRC and DST (or --list-recipes)")
        raise typer.Exit(2)
    try:
        text = None
        if eval_text is not None:
            from .quant.report import read_text
            text = read_text(eval_text)
        opts = ConvertOptions(bits=bits, group_size=group_size, mode=mode, dtype=dtype, recipe=recipe,
                              keep_bits=keep_bits, shard_bytes=parse_size(shard_size), overwrite=overwrite,
                              report=report)
        with Progress(TextColumn("[bold]converting[/]"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task("reading", total=None)
            res = run(src, dst, opts, progress=lambda d, t, n: bar.update(task, completed=d, total=t, description=n))
        if report:
            out.print(_errors_table(res))
            out.print(_summary_table(res))
        counts = ", ".join(f"{n} {k}" for k, n in sorted(res.plan.counts().items()))
        err.print(f"wrote {res.path} ({len(res.shards)} shard(s), {res.bytes_written / 1e6:.1f} MB, "
                  f"{res.dtype}) in {res.seconds:.1f} s — modules: {counts}")
        for note in res.notices:
            err.print(f"[yellow]exact:[/] {note}")
        skipped = sorted(p for p, r in res.plan.reasons.items() if "multiple" in r)
        if skipped:
            err.print(f"[yellow]kept float:[/] {len(skipped)} module(s) whose input size the group size "
                      f"does not divide (e.g. {skipped[0]}: {res.plan.reasons[skipped[0]]})")
        if text is not None:
            from .quant.report import compare_perplexity

            err.print("[dim]measuring perplexity...[/]")
            p = compare_perplexity(src, dst, text)
            t = Table(title=f"perplexity on {eval_text.name} ({p.tokens} tokens)")
            for c in ("model", "perplexity", "change"):
                t.add_column(c)
            t.add_row("source (float32)", f"{p.source:.3f}", "")
            t.add_row(f"converted ({res.plan.recipe}, {res.plan.base or 'float'})", f"{p.converted:.3f}",
                      f"{100 * (p.converted / p.source - 1):+.2f}%")
            out.print(t)
    except QwenMLXError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
