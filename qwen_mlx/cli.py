"""`qwen-mlx` command line: generate, chat, info (images and videos for the VL families)."""

import json
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import QwenMLXError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run Qwen models on MLX (Apple silicon; CPU/CUDA elsewhere).")
err = Console(stderr=True)

MODEL = typer.Option(None, "--model", "-m", help="Checkpoint dir, .gguf file or hub id (default: embedded SmolLM2).")
MEDIA_HELP = "/image PATH, /video PATH (attach to your next message)"


def _load(model: Optional[str]):
    import qwen_mlx

    with Progress(TextColumn("[bold]loading[/] {task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(model or "embedded default", total=None)
        llm = qwen_mlx.load(model, progress=lambda d, t, _: bar.update(task, completed=d, total=t))
    return llm


def _fail(e: Exception):
    err.print(f"[red]error:[/] {e}")
    raise typer.Exit(1)


def _sampling(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, presence_penalty, seed, stop):
    opts = dict(max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                seed=seed, stop=list(stop or []))
    return {k: v for k, v in opts.items() if v is not None}


def _stats_line(s) -> str:
    return (f"prompt {s.prompt_tokens} tok (prefilled {s.prefill_tokens}) {s.prefill_tps:.1f} tok/s | "
            f"generated {s.generated_tokens} tok {s.decode_tps:.1f} tok/s | "
            f"peak {s.peak_memory_gb:.2f} GB | {s.finish_reason}")


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="User message ('-' reads stdin)."),
    model: Optional[str] = MODEL,
    system: Optional[str] = typer.Option(None, help="System prompt."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n"),
    temp: Optional[float] = typer.Option(None, "--temp", help="Temperature (0 = greedy)."),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    min_p: Optional[float] = typer.Option(None, "--min-p"),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty"),
    presence_penalty: Optional[float] = typer.Option(None, "--presence-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    no_think: bool = typer.Option(False, "--no-think", help="Disable Qwen3 thinking."),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is, without the chat template."),
    max_kv_size: Optional[int] = typer.Option(None, "--max-kv-size", help="Rotating KV cache size."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Quantize the KV cache (4 or 8)."),
    show_thinking: bool = typer.Option(False, "--show-thinking", help="Print reasoning to stderr."),
    image: Optional[List[str]] = typer.Option(None, "--image", "-i", help="Image file (repeatable; VL models)."),
    video: Optional[List[str]] = typer.Option(None, "--video", help="Video file (repeatable; VL models)."),
):
    """Answer one prompt: the answer on stdout, statistics on stderr. Images and videos go
    before the prompt text, in the order given."""
    if prompt == "-":
        prompt = sys.stdin.read()
    try:
        llm = _load(model)
        stats = None
        for c in llm.stream(prompt, images=list(image or []), videos=list(video or []),
                            system=system, raw=raw, enable_thinking=False if no_think else None,
                            max_kv_size=max_kv_size, kv_bits=kv_bits,
                            **_sampling(max_tokens, temp, top_p, top_k, min_p, repetition_penalty,
                                        presence_penalty, seed, stop)):
            if c.channel == "reasoning":
                if show_thinking:
                    err.print(c.text, end="", style="dim")
            else:
                sys.stdout.write(c.text)
                sys.stdout.flush()
            stats = c.stats or stats
        sys.stdout.write("\n")
        err.print(_stats_line(stats))
    except QwenMLXError as e:
        _fail(e)


@app.command()
def chat(
    model: Optional[str] = MODEL,
    system: Optional[str] = typer.Option(None, help="System prompt."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n"),
    temp: Optional[float] = typer.Option(None, "--temp"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    no_think: bool = typer.Option(False, "--no-think"),
    max_kv_size: Optional[int] = typer.Option(None, "--max-kv-size"),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits"),
):
    """Multi-turn chat. Commands: /think (toggle thinking), /reset, /quit; on VL models
    /image PATH and /video PATH attach media to your next message."""
    try:
        llm = _load(model)
    except QwenMLXError as e:
        _fail(e)
    opts = _sampling(max_tokens, temp, top_p, top_k, None, None, None, seed, None)
    session = llm.session(system, max_kv_size=max_kv_size, kv_bits=kv_bits)
    think = False if no_think else None
    vl = llm.processor is not None
    commands = "/think /reset /quit" + (f"; {MEDIA_HELP}" if vl else "")
    err.print(f"[bold]qwen-mlx chat[/] — {llm.path.name}. {commands}")
    out = Console()
    media = {"image": [], "video": []}
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            break
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit", "/bye"):
            break
        if cmd == "/reset":
            session.reset()
            media = {"image": [], "video": []}
            err.print("[dim]conversation reset[/]")
            continue
        kind, _, arg = cmd.partition(" ")
        if kind in ("/image", "/video"):
            _attach(media, kind[1:], arg.strip(), vl)
            continue
        if cmd == "/think":
            if not getattr(llm.tokenizer, "has_thinking", False):
                err.print("[dim]this model has no thinking mode[/]")
                continue
            think = False if think in (None, True) else True
            err.print(f"[dim]thinking {'on' if think else 'off'}[/]")
            continue
        if cmd.startswith("/"):
            err.print(f"[yellow]unknown command {cmd}[/] ({commands})")
            continue
        try:
            stats = None
            images, videos = media["image"], media["video"]
            media = {"image": [], "video": []}
            for c in session.stream(line, images=images, videos=videos, enable_thinking=think, **opts):
                out.print(c.text, end="", style="dim" if c.channel == "reasoning" else None,
                          highlight=False, markup=False)
                stats = c.stats or stats
            out.print()
            err.print(f"[dim]{_stats_line(stats)}[/]")
        except QwenMLXError as e:
            err.print(f"[red]error:[/] {e}")


def _attach(media: dict, kind: str, path: str, vl: bool) -> None:
    from pathlib import Path

    if not vl:
        err.print(f"[red]error:[/] this model is text-only: it cannot take {kind}s")
    elif not path:
        err.print(f"[yellow]usage:[/] /{kind} PATH")
    elif not Path(path).expanduser().is_file():
        err.print(f"[red]error:[/] no such {kind} file: {path}")
    else:
        media[kind].append(str(Path(path).expanduser()))
        n = len(media["image"]) + len(media["video"])
        err.print(f"[dim]attached {kind} {path} ({n} item(s) go with your next message)[/]")


@app.command()
def info(path: str = typer.Argument(..., help="Checkpoint dir, .gguf file or hub id."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Architecture, parameters, bits and a memory estimate (reads no weight data)."""
    from .inspect import checkpoint_info

    try:
        data = checkpoint_info(path)
    except QwenMLXError as e:
        _fail(e)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    from rich.table import Table

    t = Table(show_header=False, box=None)
    for k, v in data.items():
        if v is not None:
            t.add_row(f"[bold]{k}[/]", json.dumps(v) if isinstance(v, dict) else f"{v:,}" if isinstance(v, int) else str(v))
    Console().print(t)


from .cli_convert import register as _register_convert  # noqa: E402

_register_convert(app)


def main():
    app()


if __name__ == "__main__":
    main()
