"""Logprobs: what the replicas take from vLLM's outputs and how the ingress writes them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.logprobs import (
    LogprobsWriter,
    chat_body,
    completion_body,
    from_vllm,
    mend_continuation,
    prompt_from_vllm,
)
from runtime.messages import TextEvent


@dataclass
class _Logprob:  # the fields of vllm.logprobs.Logprob that are read
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def _decode(token_id: int) -> str:
    return f"<{token_id}>"


def test_from_vllm_keeps_vllms_order_and_the_engines_token_text():
    step0 = {7: _Logprob(-0.1, 1, "a"), 9: _Logprob(-2.5, 2, "b")}
    step1 = {3: _Logprob(-3.0, 4, None), 5: _Logprob(-0.2, 1, "c"), 9: _Logprob(-4.0, 2, "b")}
    assert from_vllm([step0, step1], 1, 2) == (((3, -3.0, None), (5, -0.2, "c"), (9, -4.0, "b")),)
    assert from_vllm([step0, step1], 0, 2)[0] == ((7, -0.1, "a"), (9, -2.5, "b"))
    assert from_vllm(None, 0, 2) == ()


def test_completion_logprobs_give_top_plus_one_alternatives_and_text_offsets():
    entries = [((7, -0.1, "ab"), (8, -2.0, "x"), (9, -3.0, "y")),
               ((8, -float("inf"), "c"), (7, -0.5, "ab"), (9, -1.0, "y"))]
    body = completion_body(entries, [7, 8], top=1, decode=_decode, text_offset=5)
    assert body["tokens"] == ["ab", "c"]
    assert body["token_logprobs"] == [-0.1, -9999.0]  # -inf as OpenAI writes it
    assert body["text_offset"] == [5, 7]
    # the sampled token and the top one: top + 1 entries, as vLLM's server gives
    assert body["top_logprobs"] == [{"ab": -0.1, "x": -2.0}, {"c": -9999.0, "ab": -0.5}]


def test_chat_logprobs_give_top_alternatives_with_bytes():
    entries = [((7, -0.1, "é"), (8, -2.0, "x"), (9, -3.0, None))]
    body = chat_body(entries, [7], top=2, decode=_decode)
    (content,) = body["content"]
    assert content["token"] == "é" and math.isclose(content["logprob"], -0.1)
    assert content["bytes"] == list("é".encode())
    assert [t["token"] for t in content["top_logprobs"]] == ["é", "x"]
    assert chat_body(entries, [7], top=0, decode=_decode)["content"][0]["top_logprobs"] == []
    # an entry without the engine's text is decoded here
    assert chat_body([((9, -3.0, None),)], [9], 1, _decode)["content"][0]["token"] == "<9>"


def test_writer_takes_per_chunk_and_continues_the_offsets():
    writer = LogprobsWriter(chat=False, top=0, decode=_decode)
    writer.add(0, TextEvent("ab", (7,), logprobs=(((7, -0.1, "ab"),),)))
    first = writer.take(0)
    writer.add(0, TextEvent("c", (8,), logprobs=(((8, -0.3, "c"),),)))
    writer.add(1, TextEvent("zz", (5,), logprobs=(((5, -0.7, "zz"),),)))
    second = writer.take(0)
    assert first["text_offset"] == [0] and second["text_offset"] == [2]
    assert second["tokens"] == ["c"] and writer.take(1)["tokens"] == ["zz"]
    assert writer.take(0)["tokens"] == []  # nothing new
    # a token whose entry never came is still listed, decoded here, with no logprob
    writer.add(2, TextEvent("q", (4,)))
    assert writer.take(2)["token_logprobs"] == [None]


_BYTES = {1: b"\xd0", 2: b"\xb8", 3: b"a", 4: b" b"}  # 1 then 2: "\u0438", a split character


def _byte_decode(token_ids: list[int]) -> str:
    return b"".join(_BYTES[t] for t in token_ids).decode("utf-8", errors="replace")


def test_a_continuation_names_a_split_character_as_one_engine_would():
    # the decode engine continued after the prefill's token 1 (its first byte): alone it
    # named token 2 "" (no context); with the prefill's token in context it is the character
    entries = (((2, -0.1, ""), (3, -2.0, "a")), ((4, -0.3, " b"),))
    mended = mend_continuation(entries, 0, [1], [2, 4], _byte_decode)
    assert mended == (((2, -0.1, "\u0438"), (3, -2.0, "a")), ((4, -0.3, " b"),))
    # nothing before it to complete: a genuinely incomplete byte stays ""
    assert mend_continuation(entries, 0, [3], [2, 4], _byte_decode) == entries
    # past the first tokens the continuing engine had the context itself
    assert mend_continuation(entries, 4, [1], [3, 3, 3, 3, 2, 4], _byte_decode) == entries


def test_echo_puts_the_prompts_logprobs_first():
    # vLLM gives None for the first prompt token (nothing predicts it), then one dict each
    prompt = prompt_from_vllm([None, {6: _Logprob(-1.5, 3, "p"), 2: _Logprob(-0.5, 1, "q")}])
    assert prompt == ((), ((6, -1.5, "p"), (2, -0.5, "q")))
    writer = LogprobsWriter(chat=False, top=1, decode=_decode)
    writer.add(0, TextEvent("ab", (7,), logprobs=(((7, -0.1, "ab"),),), prompt_logprobs=prompt),
               prompt_ids=(1, 6))
    body = writer.take(0)
    assert body["tokens"] == ["<1>", "p", "ab"]  # the first prompt token decoded here
    assert body["token_logprobs"] == [None, -1.5, -0.1]
    assert body["top_logprobs"] == [None, {"p": -1.5, "q": -0.5}, {"ab": -0.1}]
    assert body["text_offset"] == [0, 3, 4]
    # later events carry no prompt: only their own tokens
    writer.add(0, TextEvent("c", (8,), logprobs=(((8, -0.3, "c"),),)), prompt_ids=(1, 6))
    assert writer.take(0)["tokens"] == ["c"]
