"""Stop strings, as vLLM applies them, on the text the ingress detokenizes.

The engines get the stop strings too (so they stop generating), but under disaggregation the
decode engine's text starts after the first token, which the prefill engine made: a stop
string that begins in the first token's text is only visible here. So the ingress applies
vLLM's rules itself, token by token (vllm/v1/engine/detokenizer.py, check_stop_strings):
  - a stop string is looked for only in text new since the last check (plus its own length
    back), and only once more than `min_tokens` tokens were generated;
  - the stop strings are tried in the order given; the first found ends the output, cut before
    it (or after it, with include_stop_str_in_output), and later tokens are dropped;
  - while streaming, the last len(longest stop) - 1 characters are held back (they could be
    the start of a stop string), unless the stop string is to be included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StopChecker:
    def __init__(self, stop: Sequence[str], min_tokens: int = 0,
                 include_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.min_tokens = min_tokens
        self.include_in_output = include_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1 \
            if self.stop and not include_in_output else 0
        self.text = ""
        self.num_tokens = 0
        self.stop_reason: str | None = None
        self._sent = 0

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def push(self, token_text: str) -> None:
        """One more generated token (its text, maybe ""). No-op once stopped."""
        if self.stopped:
            return
        self.num_tokens += 1
        start = len(self.text)
        self.text += token_text
        if not token_text or not self.stop or self.num_tokens <= self.min_tokens:
            return
        new_chars = len(self.text) - start
        for stop in self.stop:
            index = self.text.find(stop, max(0, len(self.text) + 1 - new_chars - len(stop)))
            if index == -1:
                continue
            end = index + len(stop) if self.include_in_output else index
            self.text = self.text[:end]
            self.stop_reason = stop
            return

    def take(self, final: bool) -> str:
        """Text not yet returned, holding back what could still start a stop string."""
        end = len(self.text) if final or self.stopped else max(self._sent,
                                                                len(self.text) - self.holdback)
        out = self.text[self._sent:end]
        self._sent = end
        return out


class OutputText:
    """One request's output as the client sees it: token ids in, text out, vLLM's stop string
    rules applied (tokens after the one that completes a stop string are dropped)."""

    def __init__(self, detokenizer: Any, stop: Sequence[str] = (), min_tokens: int = 0,
                 include_stop_str_in_output: bool = False) -> None:
        self._detok = detokenizer
        self._stops = StopChecker(stop, min_tokens, include_stop_str_in_output)
        self.token_ids: list[int] = []

    @property
    def stop_reason(self) -> str | None:
        return self._stops.stop_reason

    def push(self, token_ids: Sequence[int]) -> tuple[tuple[int, ...], str]:
        """(the tokens kept, the text that can be sent now)."""
        kept = []
        for token_id in token_ids:
            if self._stops.stopped:
                break
            kept.append(token_id)
            self._stops.push(self._detok.push([token_id]))
        self.token_ids.extend(kept)
        return tuple(kept), self._stops.take(final=False)

    def finish(self) -> str:
        """The text held back so far (the output ended)."""
        return self._stops.take(final=True)
