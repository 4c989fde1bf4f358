"""Log-probabilities of generated tokens: taken from vLLM's outputs on the replicas, carried
to the ingress with the token ids, written in the OpenAI shapes there (no vLLM import).

One generated token's entry is a tuple of (token id, logprob, token text) rows in vLLM's
order: the sampled token first, then the top tokens by rank (a token in both appears once,
as in vLLM's dict). The text is the engine's own (`Logprob.decoded_token`: the replica asks
its engine to detokenize when logprobs are requested), so it is the string vLLM's server
would show; None where the engine gave none (the ingress then decodes the id alone, as
vLLM's server does).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

Row = tuple[int, float, str | None]
Named = tuple[int, float, str]  # a row with its text
TokenLogprobs = tuple[Row, ...]

MAX_LOGPROBS = 20  # vLLM's default max_logprobs: more is refused, as vLLM refuses it
_FLOOR = -9999.0  # OpenAI's stand-in for -inf (JSON has no infinity), as vLLM writes it


def from_vllm(logprobs: Sequence[Any] | None, start: int, end: int) -> tuple[TokenLogprobs, ...]:
    """Entries start..end of a vLLM CompletionOutput's `logprobs` (one dict of token id ->
    Logprob per generated token); () when the request asked for none."""
    if not logprobs:
        return ()
    out = []
    for position in range(start, end):
        step = logprobs[position]
        out.append(tuple((int(token_id), float(lp.logprob), lp.decoded_token)
                         for token_id, lp in step.items()))
    return tuple(out)


_REPLACEMENT = "\ufffd"
_CONTEXT = 4  # tokens of context: enough for any UTF-8 sequence, as vLLM takes


def mend_continuation(entries: Sequence[TokenLogprobs], start: int, earlier: Sequence[int],
                      sampled: Sequence[int], decode: Callable[[list[int]], str],
                      ) -> tuple[TokenLogprobs, ...]:
    """Token texts as one engine would have named them, for the first entries of a request
    that an engine continued after `earlier` tokens another engine sampled (the first token,
    made by the prefill).

    vLLM names a byte-fallback token (one that decodes alone to U+FFFD, part of a split
    UTF-8 character) from the request's last sampled tokens; the continuing engine never
    saw `earlier`, so it named such a token "" where one engine names the whole character.
    Here the rule is applied again with `earlier` in the context (vLLM's
    LogprobsProcessor._correct_decoded_token). The entries are the continuing engine's
    from its `start`th sampled token on; `sampled`: all it sampled so far.
    """
    out = list(entries)
    for index in range(max(0, min(len(entries), _CONTEXT - start))):
        context = [*earlier, *sampled[:start + index]][-_CONTEXT:]
        if all(row[2] != "" for row in entries[index]):
            continue
        out[index] = tuple(
            (token_id, logprob, _mend(token_id, context, decode)
             if text == "" and decode([token_id]).endswith(_REPLACEMENT) else text)
            for token_id, logprob, text in entries[index])
    return tuple(out)


def _mend(token_id: int, context: list[int], decode: Callable[[list[int]], str]) -> str:
    for num in range(1, len(context) + 1):
        tail = context[-num:]
        full = decode([*tail, token_id])
        if full.endswith(_REPLACEMENT):
            continue
        # the context's own byte-fallback tokens were named "": their text is this one's
        clean_end = len(tail)
        for j in range(len(tail) - 1, -1, -1):
            if not decode([tail[j]]).endswith(_REPLACEMENT):
                break
            clean_end = j
        prefix = decode(tail[:clean_end]) if clean_end else ""
        # (a tokenizer's normalization can change the prefix: cut what the two share)
        return full[len(os.path.commonprefix([prefix, full])):]
    return ""


def prompt_from_vllm(logprobs: Sequence[Any]) -> tuple[TokenLogprobs, ...]:
    """A vLLM RequestOutput's `prompt_logprobs`: one entry per prompt token, () for the
    first (nothing predicts it; vLLM gives None)."""
    out = []
    for position in range(len(logprobs)):
        step = logprobs[position]
        out.append(() if not step else tuple(
            (int(token_id), float(lp.logprob), lp.decoded_token)
            for token_id, lp in step.items()))
    return tuple(out)


def token_view(entries: Sequence[TokenLogprobs], token_ids: Sequence[int], top: int,
               decode: Callable[[int], str]) -> list[tuple[Named, tuple[Named, ...]]]:
    """Per token: its own row and the `top` most likely rows at its position, texts filled
    in and -inf floored (what the gRPC API sends; no OpenAI shape)."""
    out = []
    for token_id, rows in zip(token_ids, entries, strict=True):
        sampled = next((r for r in rows if r[0] == token_id), (token_id, _FLOOR, None))
        best = sorted(rows, key=lambda r: -r[1])[:top]
        out.append(((token_id, _logprob(sampled), _text(sampled, decode)),
                    tuple((r[0], _logprob(r), _text(r, decode)) for r in best)))
    return out


def _text(row: Row, decode: Callable[[int], str]) -> str:
    return row[2] if row[2] is not None else decode(row[0])


def _logprob(row: Row) -> float:
    return max(row[1], _FLOOR)


def completion_body(entries: Sequence[TokenLogprobs], token_ids: Sequence[int], top: int,
                    decode: Callable[[int], str], text_offset: int = 0) -> dict[str, Any]:
    """The `logprobs` of a /v1/completions choice (or of one streamed chunk, whose offsets
    start where the choice's text so far ends): tokens, their logprobs, the top `top` + 1
    alternatives of each (the sampled one and the top `top`, as vLLM and OpenAI give), and
    each token's offset in the text."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = text_offset
    for token_id, rows in zip(token_ids, entries, strict=True):
        sampled = next((r for r in rows if r[0] == token_id), None)
        token = _text(sampled, decode) if sampled is not None else decode(token_id)
        tokens.append(token)
        token_logprobs.append(_logprob(sampled) if sampled is not None else None)
        top_logprobs.append({_text(r, decode): _logprob(r) for r in rows[:top + 1]}
                            if sampled is not None else None)
        offsets.append(offset)
        offset += len(token)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": top_logprobs}


def chat_body(entries: Sequence[TokenLogprobs], token_ids: Sequence[int], top: int,
              decode: Callable[[int], str]) -> dict[str, Any]:
    """The `logprobs` of a /v1/chat/completions choice (or of one streamed chunk): per
    token its text, logprob, UTF-8 bytes and the top `top` alternatives."""
    content = []
    for token_id, rows in zip(token_ids, entries, strict=True):
        sampled = next((r for r in rows if r[0] == token_id), None)
        if sampled is None:
            token = decode(token_id)
            content.append({"token": token, "logprob": _FLOOR,
                            "bytes": list(token.encode("utf-8", errors="replace")),
                            "top_logprobs": []})
            continue
        token = _text(sampled, decode)
        content.append({
            "token": token, "logprob": _logprob(sampled),
            "bytes": None if sampled[2] is None
            else list(sampled[2].encode("utf-8", errors="replace")),
            "top_logprobs": [{"token": (text := _text(r, decode)), "logprob": _logprob(r),
                              "bytes": list(text.encode("utf-8", errors="replace"))}
                             for r in rows[:top]],
        })
    return {"content": content}


class LogprobsWriter:
    """The `logprobs` objects of one response's choices, from their text events: `add` each
    event of a choice, `take` what was added since the last take (a streamed chunk's, or the
    whole choice's)."""

    def __init__(self, chat: bool, top: int, decode: Callable[[int], str]) -> None:
        self.chat, self.top, self._decode = chat, top, decode
        self._pending: dict[int, tuple[list[int], list[TokenLogprobs]]] = {}
        self._offsets: dict[int, int] = {}  # completions: where the choice's text has got to

    def add(self, index: int, event: Any, prompt_ids: Sequence[int] = ()) -> None:
        """An event's tokens; the prompt's first (`prompt_ids`) if the event carries their
        logprobs (echo with logprobs)."""
        ids, entries = self._pending.setdefault(index, ([], []))
        if getattr(event, "prompt_logprobs", None) is not None:
            ids.extend(prompt_ids)
            entries.extend(event.prompt_logprobs)
        ids.extend(event.token_ids)
        entries.extend(event.logprobs)
        entries.extend(() for _ in range(len(ids) - len(entries)))  # none came: decoded here

    def take(self, index: int) -> dict[str, Any]:
        ids, entries = self._pending.pop(index, ([], []))
        if self.chat:
            return chat_body(entries, ids, self.top, self._decode)
        body = completion_body(entries, ids, self.top, self._decode,
                               self._offsets.get(index, 0))
        if body["tokens"]:
            self._offsets[index] = body["text_offset"][-1] + len(body["tokens"][-1])
        return body
