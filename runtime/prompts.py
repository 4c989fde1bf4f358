"""Prompt text to token ids, safely: the ingress's one place for it.

A hostile or careless client can send a 10 MB prompt, text that is not valid Unicode (a lone
surrogate escaped in JSON), or token ids outside the vocabulary. Each gets a 400 here, before
any engine sees it, and the event loop that serves every other request never tokenizes a
large text itself:
  1. text longer than the context could ever hold (`MAX_CHARS_PER_TOKEN` characters per
     token) is refused without tokenizing it;
  2. text that does not encode as UTF-8 is refused;
  3. text over `INLINE_CHARS` characters is tokenized in a worker thread;
  4. token ids must be in the vocabulary.
"""

from __future__ import annotations

import asyncio
from typing import Any

from runtime.openai_api import APIError

# No tokenizer this project targets makes a token of more than this many characters on
# average over a whole prompt; above it the prompt cannot fit the context.
MAX_CHARS_PER_TOKEN = 32
INLINE_CHARS = 8192  # shorter texts are tokenized on the event loop (cheaper than a thread)


class PromptTokenizer:
    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_chars = max_model_len * MAX_CHARS_PER_TOKEN

    async def tokenize(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        if not isinstance(prompt, str):
            return self.check_ids(prompt, param)
        self._check_text(prompt, param)
        return await self._run(self._encode, prompt)

    async def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions",
                           param="messages")
        for message in messages:
            self._check_text(message["content"], "messages")
        template = str(getattr(self.tokenizer, "chat_template", None) or "")
        if '"developer"' not in template and "'developer'" not in template:
            # vLLM's renderer: a template that does not know the developer role gets "system"
            messages = [{**m, "role": "system"} if m["role"] == "developer" else m
                        for m in messages]
        text = await self._run(lambda: self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False))
        self._check_text(text, "messages")
        return await self._run(self._encode, text)

    def text_of(self, prompt: str | list[int]) -> str:
        """A prompt as text (echo): as given, or its token ids decoded."""
        if isinstance(prompt, str):
            return prompt
        return str(self.tokenizer.decode(prompt, skip_special_tokens=False))

    def check_ids(self, token_ids: list[int], param: str = "prompt") -> list[int]:
        vocab_size = len(self.tokenizer)
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"token ids out of the vocabulary [0, {vocab_size}): {bad[:5]}",
                           param=param)
        return list(token_ids)

    def _check_text(self, text: str, param: str) -> None:
        if len(text) > self.max_chars:
            raise APIError(400, f"the prompt has {len(text):,} characters: more than the "
                           f"model's context of {self.max_model_len} tokens can hold",
                           param=param, code="context_length_exceeded")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise APIError(400, f"the {param} is not valid Unicode text (character "
                           f"{err.start}: {text[err.start]!r} is a lone surrogate or not "
                           "encodable as UTF-8)", param=param) from err

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def _run(self, fn: Any, *args: Any) -> Any:
        size = sum(len(a) for a in args if isinstance(a, str))
        if size <= INLINE_CHARS:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)
