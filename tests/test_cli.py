"""`qwen-mlx generate / chat / info`: answers on stdout, stats on stderr, clean errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from qwen_mlx.cli import app

runner = CliRunner()


def invoke(args, input=None):
    return runner.invoke(app, args, input=input)


def test_generate_default_model_answers_on_stdout(smollm2_path):
    r = invoke(["generate", "--prompt", "What is the capital of France?", "--temp", "0",
                "--max-tokens", "24"])
    assert r.exit_code == 0, r.output
    assert "Paris" in r.stdout and "tok/s" not in r.stdout
    assert "tok/s" in r.stderr


def test_generate_options(tiny_qwen3_dir):
    r = invoke(["generate", "-m", str(tiny_qwen3_dir), "-p", "hi", "-n", "5", "--temp", "0.7",
                "--top-p", "0.9", "--top-k", "10", "--seed", "1", "--system", "S", "--no-think",
                "--repetition-penalty", "1.1", "--kv-bits", "8"])
    assert r.exit_code == 0, r.output
    assert "generated 5 tok" in r.stderr
    again = invoke(["generate", "-m", str(tiny_qwen3_dir), "-p", "hi", "-n", "5", "--temp", "0.7",
                    "--top-p", "0.9", "--top-k", "10", "--seed", "1", "--system", "S", "--no-think",
                    "--repetition-penalty", "1.1", "--kv-bits", "8"])
    assert again.stdout == r.stdout  # seeded


def test_chat_repl_commands(tiny_qwen3_dir):
    r = invoke(["chat", "-m", str(tiny_qwen3_dir), "-n", "4", "--temp", "0"],
               input="hello\n/think\nsecond turn\n/reset\n/bogus\nthird\n/quit\n")
    assert r.exit_code == 0, r.output
    assert "thinking off" in r.stderr and "conversation reset" in r.stderr  # Qwen3 vocab: has <think>
    assert "unknown command /bogus" in r.stderr
    lines = [l for l in r.stderr.splitlines() if "prefilled" in l]
    assert len(lines) == 3
    # turn 2 reuses the prefix of turn 1; turn 3 follows a reset and prefills everything
    def nums(l):
        p = l.split("prompt ")[1]
        return int(p.split(" tok")[0]), int(p.split("prefilled ")[1].split(")")[0])
    (p1, f1), (p2, f2), (p3, f3) = map(nums, lines)
    assert f1 == p1 and f2 < p2 - p1 + 3 and f3 == p3


def test_info_json(tiny_qwen3_dir, smollm2_path):
    r = invoke(["info", str(tiny_qwen3_dir), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["model_type"] == "qwen3" and d["layers"] == 2 and d["heads"] == "4 q / 2 kv x 32"
    assert d["weights"] == {"float32": 1.0} and d["bits_per_weight"] == 32.0
    g = json.loads(invoke(["info", str(smollm2_path), "--json"]).stdout)
    assert g["model_type"] == "llama" and g["parameters"] == 134_515_008
    assert 4 < g["bits_per_weight"] < 8 and "4-bit" in g["weights"]


@pytest.mark.parametrize("args,match", [
    (["generate", "-m", "/no/such/model", "-p", "hi"], "no such model"),
    (["info", "/no/such/model"], "no such model"),
])
def test_errors_are_messages_not_tracebacks(args, match):
    r = invoke(args)
    assert r.exit_code == 1 and match in r.stderr and "Traceback" not in r.output


def test_empty_prompt_error(tiny_qwen3_dir):
    r = invoke(["generate", "-m", str(tiny_qwen3_dir), "-p", "  "])
    assert r.exit_code == 1 and "prompt is empty" in r.stderr


def test_installed_entry_point(tiny_qwen3_dir):
    exe = shutil.which("qwen-mlx")
    cmd = [exe] if exe else [sys.executable, "-m", "qwen_mlx.cli"]
    r = subprocess.run(cmd + ["generate", "-m", str(tiny_qwen3_dir), "-p", "hi", "-n", "3", "--temp", "0"],
                       capture_output=True, text=True, env=os.environ, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "generated 3 tok" in r.stderr


def test_think_toggle_on_model_without_thinking(smollm2_path):
    r = invoke(["chat"], input="/think\n/quit\n")
    assert r.exit_code == 0 and "no thinking mode" in r.stderr
