"""Incremental detokenization for streaming, as vLLM's engine does it (and without vLLM).

A fast tokenizer goes through the `tokenizers` library's DecodeStream primed with the prompt,
which is what vLLM's FastIncrementalDetokenizer does: constant work per token, and text that
ends inside a multi-byte character is held back until the character is complete (an output
that ends mid-character never shows U+FFFD for the missing bytes, as in vLLM). Slow tokenizers
use the prefix/read-offset window of vLLM's `detokenize_incrementally`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_INCOMPLETE = "\ufffd"
_WINDOW = 5  # tokens of context before the first undecoded one (slow tokenizers)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        backend = getattr(tokenizer, "_tokenizer", None)
        self._stream: Any = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(ids=list(prompt_ids),
                                        skip_special_tokens=skip_special_tokens)
        self._ids = list(prompt_ids[-_WINDOW:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text they complete (possibly "")."""
        if self._stream is not None:
            return "".join(self._step(t) for t in token_ids)
        return "".join(self._slow_step(t) for t in token_ids)

    def _step(self, token_id: int) -> str:
        try:
            return self._stream.step(self._backend, token_id) or ""
        except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exceptions
            # A tokenizer can produce non-monotonic invalid UTF-8, which breaks the stream's
            # state; start a fresh one, as vLLM does.
            if not str(err).startswith("Invalid prefix"):
                raise
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=self._skip_special)
            return self._stream.step(self._backend, token_id) or ""

    def _slow_step(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset:self._read_offset],
                        skip_special_tokens=self._skip_special)
        text = decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip_special)
        if len(text) <= len(prefix) or text.endswith(_INCOMPLETE):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix):]
