"""Streaming detokenization with mlx-lm's `StreamingDetokenizer` interface.

mlx-lm's `BPEStreamingDetokenizer` drops the leading space of the first word (Qwen's decode
keeps it), maps added tokens through the byte table and importing it pulls in transformers,
so we decode windows of ids with the tokenizer itself instead: text is released once the window
decodes without a trailing U+FFFD (an unfinished UTF-8 character), and the text of the
previous window is kept as context so decoders that treat a first token specially stay exact.
For byte-level BPE, concat(pieces) after `finalize()` is exactly `decode(all ids)`.
"""

from typing import Callable, List

_REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    def __init__(self, decode: Callable[[List[int]], str]):
        self._decode = decode
        self.reset()

    def reset(self):
        self.offset = 0
        self.tokens: List[int] = []
        self.text = ""
        self._ctx = 0  # first id of the context window
        self._done = 0  # ids before this are in `text`
        self._ctx_text = ""  # decode(tokens[_ctx:_done])

    def add_token(self, token):
        self.tokens.append(int(token))
        s = self._decode(self.tokens[self._ctx :])
        if len(s) > len(self._ctx_text) and not s.endswith(_REPLACEMENT):
            self.text += s[len(self._ctx_text) :]
            self._ctx, self._done = self._done, len(self.tokens)
            self._ctx_text = self._decode(self.tokens[self._ctx : self._done])

    def finalize(self):
        if self._done < len(self.tokens):
            s = self._decode(self.tokens[self._ctx :])
            self.text += s[len(self._ctx_text) :]
        self._ctx = self._done = len(self.tokens)
        self._ctx_text = ""

    @property
    def last_segment(self) -> str:
        """Text added since the last time this was read."""
        seg = self.text[self.offset :]
        self.offset = len(self.text)
        return seg
