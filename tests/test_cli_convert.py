"""`qwen-mlx convert`: recipes listed, conversion with report and perplexity, clean errors;
`convert/to_mlx.py` forwards quantization options to the same converter."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from qwen_mlx.cli import app
from qwen_mlx.loading.loader import build_model
from qwen_mlx.quant import RECIPES
from tests.quant.builders import write_tokenizer

runner = CliRunner()
CFG = dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=320,
           tie_word_embeddings=True, torch_dtype="float32")


def invoke(*args):
    return runner.invoke(app, ["convert", *map(str, args)])


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "src"
    path.mkdir()
    model = build_model(CFG)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(CFG))
    write_tokenizer(path, 320)
    return path


def test_list_recipes():
    r = runner.invoke(app, ["convert", "--list-recipes"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for name in RECIPES:
        assert name in r.stdout
    assert "edge_down -> bits=6" in r.stdout and "lm_head -> bits=8" in r.stdout


def test_convert_with_report_and_perplexity(src, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{(7 * i) % 300 + 2}" for i in range(80)))
    r = runner.invoke(app, ["convert", str(src), str(tmp_path / "out"), "--recipe", "mixed-4-8", "--keep-bits",
                            "v_proj=keep", "--shard-size", "20KB", "--report", "--eval-text", str(text)],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["model.embed_tokens"]["bits"] == 8 and q["model.layers.0.self_attn.v_proj"] is False
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    assert "model.layers.1.mlp.down_proj.weight" in r.stdout and "affine 6-bit g64" in r.stdout
    assert "relative weight error by spec" in r.stdout
    assert "rel. error" in r.stdout and "perplexity on eval.txt (79 tokens)" in r.stdout
    assert "source (float32)" in r.stdout and "converted (mixed-4-8, affine 4-bit g64)" in r.stdout
    assert "wrote" in r.stderr and "shard(s)" in r.stderr


@pytest.mark.parametrize("args,code,msg", [
    ([], 2, "needs SRC and DST"),
    (["--bits", "7"], 1, "supports bits [2, 3, 4, 5, 6, 8], got 7"),
    (["--mode", "int4"], 1, "unknown quantization mode 'int4'"),
    (["--recipe", "q4km"], 1, "unknown recipe 'q4km'"),
    (["--keep-bits", "embed"], 1, "is not KEY=VALUE"),
    (["--shard-size", "big"], 1, "--shard-size: cannot read 'big'"),
    (["--dtype", "int8"], 1, "unknown dtype 'int8'"),
    (["--eval-text", "/nonexistent/file.txt"], 1, "cannot read --eval-text file"),
])
def test_bad_options(src, tmp_path, args, code, msg):
    r = invoke(*([src, tmp_path / "out"] if args else []), *args)
    assert r.exit_code == code, r.output
    assert msg in " ".join(r.output.split())
    assert not (tmp_path / "out").exists()


def test_existing_destination(src, tmp_path):
    (tmp_path / "out").mkdir()
    r = invoke(src, tmp_path / "out", "--bits", "8")
    assert r.exit_code == 1 and "exists" in r.output and "--overwrite" in r.output
    r = invoke(src, tmp_path / "out", "--bits", "8", "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["bits"] == 8


def test_to_mlx_script_forwards_quantization(src, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("to_mlx", "convert/to_mlx.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(src), str(tmp_path / "q"), "--bits", "4", "--recipe", "mixed-4-6"]) == 0
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["model.embed_tokens"]["bits"] == 6
    assert mod.main([str(src), str(tmp_path / "lossless")]) == 0
    assert "quantization" not in json.loads((tmp_path / "lossless" / "config.json").read_text())
    assert mod.main([str(src), str(tmp_path / "q"), "--bits", "4"]) == 1
    assert "exists" in capsys.readouterr().err
