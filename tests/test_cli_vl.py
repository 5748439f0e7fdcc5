"""`qwen-mlx generate --image/--video` and `/image`, `/video` in `qwen-mlx chat` on a tiny VL dir."""

import mlx.core as mx
import pytest
from PIL import Image
from typer.testing import CliRunner

import qwen_mlx
from qwen_mlx.cli import app
from tests.test_multimodal import tiny_vl

skdata = pytest.importorskip("skimage.data")
runner = CliRunner()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.fromarray(skdata.chelsea()).save(d / "cat.png")
    Image.fromarray(skdata.coffee()).save(d / "coffee.jpg")
    pytest.importorskip("av")
    from tests.vision.test_video import write_video

    return d / "cat.png", d / "coffee.jpg", write_video(d / "clip.mp4")


@pytest.fixture(scope="module")
def vl_path(tmp_path_factory, qwen_tokenizer):
    return tiny_vl("qwen2_5_vl", qwen_tokenizer, tmp_path_factory)


def stats(stderr):
    """(prompt tokens, prefilled tokens) of each turn's statistics line."""
    out = []
    for line in (x for x in stderr.splitlines() if "prefilled" in x):
        p = line.split("prompt ")[1]
        out.append((int(p.split(" tok")[0]), int(p.split("prefilled ")[1].split(")")[0])))
    return out


def test_generate_with_images_and_video(vl_path, media):
    cat, coffee, clip = media
    r = runner.invoke(app, ["generate", "-m", str(vl_path), "--image", str(cat), "--image", str(coffee),
                            "--video", str(clip), "-p", "Compare them.", "-n", "6", "--temp", "0"])
    assert r.exit_code == 0, r.output
    llm = qwen_mlx.load(vl_path, dtype=mx.float32)
    want = llm.generate("Compare them.", images=[cat, coffee], videos=[clip], temperature=0, max_tokens=6)
    assert r.stdout == want + "\n"
    req = llm.prepare_request("Compare them.", images=[cat, coffee], videos=[clip])
    assert stats(r.stderr) == [(len(req.ids), len(req.ids))] and req.visual.n_images == 2


def test_chat_attaches_media_to_the_next_message(vl_path, media):
    cat, _, clip = media
    script = (f"/image {cat}\nWhat is this?\nAnd its colour?\n/video {clip}\n/image /no/such.png\n"
              "What happens?\n/image\n/quit\n")
    r = runner.invoke(app, ["chat", "-m", str(vl_path), "-n", "4", "--temp", "0"], input=script)
    assert r.exit_code == 0, r.output
    assert "/image PATH" in r.stderr and "attached image" in r.stderr and "attached video" in r.stderr
    assert "no such image file: /no/such.png" in r.stderr and "usage:" in r.stderr
    (p1, f1), (p2, f2), (p3, f3) = stats(r.stderr)
    assert f1 == p1 > 64  # the image went with turn 1
    assert f2 < 30 and p2 > p1  # turn 2: only the new text, the image stays in the cache
    assert p3 - p2 > 16 and f3 < p3 - p2 + 30  # turn 3 adds the video, prefix reused


def test_media_on_text_only_model(tiny_qwen3_dir, media):
    cat, _, _ = media
    r = runner.invoke(app, ["generate", "-m", str(tiny_qwen3_dir), "--image", str(cat), "-p", "hi", "-n", "2"])
    assert r.exit_code == 1 and "text-only" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["chat", "-m", str(tiny_qwen3_dir), "-n", "2"], input=f"/image {cat}\n/quit\n")
    assert r.exit_code == 0 and "text-only" in r.stderr
    r = runner.invoke(app, ["generate", "-m", str(tiny_qwen3_dir), "--video", "missing.mp4", "-p", "hi"])
    assert r.exit_code == 1 and "text-only" in r.stderr
