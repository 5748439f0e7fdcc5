"""Tokenization for qwen_mlx: a fast `tokenizers`-backed `Tokenizer`, chat templates,
streaming detokenization and parsing of reasoning / tool calls."""

from .parsing import ThinkingStream, ToolCall, parse_tool_calls, split_thinking
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf, tokenizer_from_tiktoken

__all__ = [
    "Tokenizer",
    "load_tokenizer",
    "tokenizer_from_tiktoken",
    "tokenizer_from_gguf",
    "ToolCall",
    "split_thinking",
    "parse_tool_calls",
    "ThinkingStream",
]
