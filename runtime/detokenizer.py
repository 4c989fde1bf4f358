"""Incremental detokenization for streaming: text deltas that never split a character."""

from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._sent = ""

    def push(self, token_ids: tuple[int, ...], final: bool = False) -> str:
        """Add tokens; return the new text (held back while it ends mid-character)."""
        self._ids.extend(token_ids)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if not final and text.endswith(_INCOMPLETE):
            return ""
        delta = text[len(self._sent):] if text.startswith(self._sent) else text
        self._sent = text
        return delta

    @property
    def text(self) -> str:
        return self._sent
