"""Stop strings as vLLM applies them, the API's new request fields, and the fan-out of a batch
of prompts x n samples (no Ray, no engine)."""

from __future__ import annotations

import asyncio

import pytest

from runtime.messages import PreparedRequest, TextEvent
from runtime.openai_api import APIError, ChatCompletionRequest, CompletionRequest
from runtime.requests import GenerateRequest, SamplingSpec
from runtime.stops import OutputText, StopChecker


def _feed(checker: StopChecker, pieces: list[str]) -> list[str]:
    sent = []
    for piece in pieces:
        checker.push(piece)
        sent.append(checker.take(final=False))
    sent.append(checker.take(final=True))
    return sent


def test_stop_string_cuts_the_output_before_it_and_holds_back_its_start():
    checker = StopChecker(["ab"])
    sent = _feed(checker, ["x", "a", "b", "c"])
    assert checker.stop_reason == "ab" and checker.text == "x"
    assert "".join(sent) == "x"
    assert sent[:2] == ["", "x"]  # the last char could start "ab": held back each time
    assert checker.num_tokens == 3  # the token after the stop is not counted


def test_a_held_back_start_that_is_no_stop_is_sent_later():
    checker = StopChecker(["abc"])
    sent = _feed(checker, ["x", "a", "b", "d"])
    assert checker.stop_reason is None and "".join(sent) == "xabd"
    assert sent[:2] == ["", ""]  # "xa" and then "xab": two chars held back each time


def test_include_stop_str_in_output_and_no_holdback():
    checker = StopChecker(["ab"], include_in_output=True)
    sent = _feed(checker, ["x", "a", "bc"])
    assert checker.text == "xab" and "".join(sent) == "xab"
    assert sent[0] == "x" and sent[1] == "a"


def test_min_tokens_delays_stop_strings_and_order_decides_between_them():
    checker = StopChecker(["z"], min_tokens=2)
    _feed(checker, ["z", "z", "qz"])
    assert checker.stop_reason == "z" and checker.text == "zzq"
    first_listed = StopChecker(["b", "a"])
    first_listed.push("ab")  # both appear: the first listed wins, as in vLLM
    assert first_listed.stop_reason == "b" and first_listed.text == "a"


def test_output_text_drops_tokens_after_the_stop():
    class Detok:
        def push(self, ids):
            return "".join(chr(96 + i) for i in ids)

    out = OutputText(Detok(), ["cd"])
    kept, text = out.push([1, 2, 3])  # "abc": "c" held back
    assert kept == (1, 2, 3) and text == "ab"
    kept, text = out.push([4, 5])  # "d" completes "cd"; "e" is dropped
    assert kept == (4,) and out.stop_reason == "cd" and out.token_ids == [1, 2, 3, 4]
    assert text + out.finish() == ""


def test_completion_request_prompts_and_fields():
    base = {"model": "m", "max_tokens": 4}
    assert CompletionRequest.model_validate({**base, "prompt": "hi"}).prompts == ["hi"]
    assert CompletionRequest.model_validate({**base, "prompt": [1, 2]}).prompts == [[1, 2]]
    assert CompletionRequest.model_validate({**base, "prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert CompletionRequest.model_validate({**base, "prompt": [[1], [2]]}).prompts == [[1], [2]]
    with pytest.raises(APIError):
        CompletionRequest.model_validate({**base, "prompt": []}).prompts  # noqa: B018
    request = CompletionRequest.model_validate({"prompt": "x", "stop": "\n", "min_tokens": 2,
                                                "best_of": 3, "max_tokens": 5})
    assert request.model is None  # the served model
    request.refuse_unsupported()  # best_of: ignored, as vLLM's server does
    spec = request.sampling(16)
    assert spec.stop == ("\n",) and spec.min_tokens == 2 and spec.max_tokens == 5
    with pytest.raises(APIError, match="min_tokens"):
        CompletionRequest.model_validate({"prompt": "x", "min_tokens": 9,
                                          "max_tokens": 5}).sampling(16)
    for field in ("prompt_logprobs", "structured_outputs", "kv_transfer_params"):
        with pytest.raises(APIError, match=field):
            CompletionRequest.model_validate({"prompt": "x", field: {"a": 1}}
                                             ).refuse_unsupported()


def test_chat_messages_keep_name_and_accept_the_template_roles():
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"},
        {"role": "assistant", "content": None}]})
    assert [m.for_template() for m in request.messages] == [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": ""}]


class FakeRouter:
    """Prepares and streams by itself: each request yields its prompt back, token by token."""

    def __init__(self, refuse_at: int | None = None) -> None:
        self.prepared: list[str] = []
        self.discarded: list[str] = []
        self.started: list[str] = []
        self.refuse_at = refuse_at

    def prepare(self, prompt_ids, sampling, kind):
        if len(self.prepared) == self.refuse_at:
            raise APIError(429, "full")
        rid = f"r{len(self.prepared)}"
        self.prepared.append(rid)
        return PreparedRequest(GenerateRequest(rid, tuple(prompt_ids), sampling), "short", 0.0)

    def discard(self, prepared):
        if prepared.request.request_id not in self.started:
            self.discarded.append(prepared.request.request_id)

    async def stream(self, prepared):
        self.started.append(prepared.request.request_id)
        for token in prepared.request.prompt_token_ids:
            await asyncio.sleep(0.001)
            yield TextEvent(str(token), (token,))
        yield TextEvent("", (), "length", object())


def test_fanout_runs_every_prompt_and_sample_and_tags_choices():
    from runtime import fanout

    router = FakeRouter()
    jobs = fanout.plan(router, [[1, 2], [3]], 2, SamplingSpec(), "cmpl")
    assert [(j.index, j.prompt_index) for j in jobs] == [(0, 0), (1, 0), (2, 1), (3, 1)]

    async def collect():
        texts = {}
        async for job, event in fanout.run(router, jobs, 2):
            texts[job.index] = texts.get(job.index, "") + event.text
        return texts

    assert asyncio.run(collect()) == {0: "12", 1: "12", 2: "3", 3: "3"}
    assert not router.discarded


def test_fanout_runs_choices_concurrently_each_in_a_fresh_context():
    # Ray Serve tags handle calls with the request held in a context variable; concurrent
    # calls carrying one request's id hung, so no choice may see the caller's context.
    import contextvars

    from runtime import fanout

    request_var: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="")
    seen: list[str] = []
    running = {"now": 0, "most": 0}

    class Watching(FakeRouter):
        async def stream(self, prepared):
            seen.append(request_var.get())
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
            try:
                async for event in super().stream(prepared):
                    yield event
            finally:
                running["now"] -= 1

    router = Watching()
    jobs = fanout.plan(router, [[1, 2, 3], [4, 5, 6]], 1, SamplingSpec(), "cmpl")

    async def collect():
        request_var.set("the API request")
        return [job.index async for job, _ in fanout.run(router, jobs, 1)]

    assert sorted(set(asyncio.run(collect()))) == [0, 1]
    assert seen == ["", ""]  # a fresh context each
    assert running["most"] == 2  # the two prompts ran at once


def test_fanout_refused_midway_releases_what_it_booked():
    from runtime import fanout

    router = FakeRouter(refuse_at=2)
    with pytest.raises(APIError):
        fanout.plan(router, [[1], [2]], 2, SamplingSpec(), "cmpl")
    assert router.discarded == ["r0", "r1"]


def test_seeded_samples_get_seed_plus_index_as_vllm_gives_them():
    from runtime.fanout import _sample_spec
    from runtime.requests import SamplingSpec

    seeded = SamplingSpec(max_tokens=4, temperature=1.0, seed=7)
    assert [_sample_spec(seeded, i).seed for i in range(3)] == [7, 8, 9]
    unseeded = SamplingSpec(max_tokens=4, temperature=1.0)
    assert _sample_spec(unseeded, 2) is unseeded
