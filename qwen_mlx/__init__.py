"""qwen_mlx: run the open-weight Qwen family on MLX.

>>> import qwen_mlx
>>> llm = qwen_mlx.load()                      # the embedded offline default
>>> llm.generate("What is the capital of France?", max_tokens=20)
"""

from .errors import (
    ConfigError,
    MediaError,
    ModelNotFoundError,
    PromptError,
    QwenMLXError,
    TokenizerError,
    WeightsError,
)
from .loading.loader import load_model

__version__ = "0.1.0"


def load(path_or_id=None, **kwargs):
    """Load model + tokenizer into an `LLM` (``None`` = the embedded default model)."""
    from .llm import LLM

    return LLM.load(path_or_id, **kwargs)


__all__ = ["load", "load_model", "QwenMLXError", "ConfigError", "ModelNotFoundError",
           "PromptError", "TokenizerError", "WeightsError", "MediaError"]
