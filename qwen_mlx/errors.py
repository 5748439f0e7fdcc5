"""Errors raised by qwen_mlx. Every problem with user input is a `QwenMLXError`."""


class QwenMLXError(Exception):
    """Base class of every error qwen_mlx raises on bad input."""


class ModelNotFoundError(QwenMLXError):
    """A model path or hub id that cannot be resolved (offline, missing directory)."""


class ConfigError(QwenMLXError):
    """config.json missing, unreadable, or describing an unknown/invalid architecture."""


class WeightsError(QwenMLXError):
    """Weights missing, of the wrong shape, or in a corrupt/truncated file."""


class TokenizerError(QwenMLXError):
    """Tokenizer files missing or malformed."""


class PromptError(QwenMLXError):
    """An empty prompt, or one longer than the model's context."""


class MediaError(QwenMLXError):
    """An image or video that cannot be used: unreadable, truncated, corrupt, of an unsupported
    format, too large to decode safely, or a video without frames."""


class VisionInputError(MediaError):
    """Pixel rows or grids that do not fit the vision tower."""
