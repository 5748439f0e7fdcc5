"""Streaming and crash safety, in child processes: converting a model larger than the
shard size keeps peak RSS far below the model; SIGKILL at any stage leaves no DST, and
the next conversion removes the dead run's temp dir."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen_mlx import load_model
from qwen_mlx.quant import ConvertOptions, convert
from tests.quant.convert_child import make_source

ROOT = Path(__file__).resolve().parents[2]


SHARD = 2 << 20
STAGES = ["start", "mid-shard", "before-rename"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One child (the imports cost ~5-10 s) forks a run per job: the RSS measurement, then
    one conversion per kill stage, SIGKILLed from here when it reports reaching the stage."""
    root = tmp_path_factory.mktemp("stream")
    src = root / "src"
    size = make_source(src)
    jobs = [["rss", str(src), str(root / "q4"), SHARD]]
    jobs += [["kill", str(src), str(root / s), s, str(root / f"{s}.marker")] for s in STAGES]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # files, not pipes: a child blocked on a full pipe would hang until the deadline
    fout, ferr = open(root / "child.out", "w+"), open(root / "child.err", "w+")
    p = subprocess.Popen([sys.executable, "-m", "tests.quant.convert_child", json.dumps(jobs)], cwd=ROOT,
                         env=env, stdout=fout, stderr=ferr, text=True)
    killed = []
    try:
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline:
            for s in STAGES:
                m = root / f"{s}.marker"
                if s not in killed and m.exists() and m.read_text():
                    os.kill(int(m.read_text()), signal.SIGKILL)
                    killed.append(s)
            time.sleep(0.05)
    finally:
        if p.poll() is None:
            p.kill()
    p.wait(timeout=60)
    out, err = (root / "child.out").read_text(), (root / "child.err").read_text()
    fout.close(), ferr.close()
    assert p.returncode == 0, err[-3000:]
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return dict(root=root, src=src, size=size, rss=lines[0], results=lines[1:], killed=killed, stderr=err)


def test_peak_rss_stays_near_one_shard(runs):
    r, size = runs["rss"], runs["size"]
    assert runs["results"][0] == {"job": "rss", "stage": None, "status": 0}, runs["stderr"][-2000:]
    grew = (r["peak_kb"] - r["base_kb"]) * 1024
    print(f"\nsource {size / 2**20:.1f} MiB float32 -> {r['written'] / 2**20:.1f} MiB 4-bit in {r['shards']} "
          f"shards of <= {SHARD / 2**20:.0f} MiB; RSS before {r['base_kb'] / 1024:.0f} MiB, peak "
          f"{r['peak_kb'] / 1024:.0f} MiB (+{grew / 2**20:.1f} MiB) in {r['seconds']:.1f} s")
    assert size > 40 * SHARD and r["shards"] >= 6
    assert grew < size / 3, f"conversion grew RSS by {grew / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
    ids = mx.array([[1, 2, 3, 4, 5]])
    ref = np.array(load_model(runs["src"], dtype=mx.float32)(ids))
    assert np.abs(np.array(load_model(runs["root"] / "q4")(ids)) - ref).max() < 0.2 * np.abs(ref).max()


def test_sigkill_at_any_stage_leaves_no_destination(runs):
    root = runs["root"]
    assert runs["killed"] == STAGES
    assert [r["status"] for r in runs["results"][1:]] == [signal.SIGKILL] * 3  # killed, not finished
    for s in STAGES:
        assert not (root / s).exists(), s
        stale = list(root.glob(f".{s}.partial-*"))
        assert len(stale) == 1, (s, stale)  # the dead run's temp dir ...
        names = sorted(p.name for p in stale[0].iterdir())
        if s == "start":
            assert names == []
        elif s == "mid-shard":
            assert names == ["shard-00001.safetensors", "shard-00002.safetensors"]
        else:  # everything was written: only the rename was missing
            assert "config.json" in names and "model.safetensors.index.json" in names
    # ... is removed by the next conversion to the same DST, which succeeds
    res = convert(runs["src"], root / "mid-shard", ConvertOptions(bits=4, shard_bytes=1 << 20))
    assert res.path.exists() and not list(root.glob(".mid-shard.*"))
    assert (res.path / "config.json").exists() and len(res.shards) > 1
    assert len(list(root.glob(".start.partial-*"))) == 1  # other DSTs' temp dirs are not touched
