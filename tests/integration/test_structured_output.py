"""Structured output (`response_format`) through the app: the engine constrains the tokens,
and the scheduler runs such a request on one engine (a grammar's state cannot move with the
KV cache): never disaggregated."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.integration.serve_app import API_KEY, MODEL

# a top-level enum: no room for whitespace, so even the tiny random model finishes it
ANSWER = {"type": "string", "enum": ["yes", "no"]}
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=f"{serve_app}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.mark.parametrize(("prompt", "mode"), [
    ("Is the sky blue? " * 10, ("local", "prefill_local")),
    # long (over the app's long_prompt_tokens, 1,000): served whole by the prefill replica
    ("q" * 1200, ("prefill_local",)),
])
def test_a_json_schema_is_followed_on_one_engine(client, prompt, mode):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=200,
        response_format=_schema_format(ANSWER), **GREEDY)
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice
    assert json.loads(choice.message.content) in ("yes", "no")
    timings = response.model_extra["timings"]
    assert timings["mode"] in mode and "one engine" in timings["decision_reason"], timings
    assert timings["kv_transfer_bytes"] == 0


def test_streamed_json_object_and_plain_text_format(client):
    stream = client.completions.create(model=MODEL, prompt="Give me JSON: " * 20,
                                       max_tokens=200, stream=True, **GREEDY,
                                       extra_body={"response_format": {"type": "json_object"}})
    text, finish = "", None
    for chunk in stream:
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    if finish == "stop":  # a complete object (else 200 tokens of it)
        assert isinstance(json.loads(text), dict)
    assert text.lstrip().startswith("{"), text
    # "text" asks for nothing: the request may split as any other
    plain = client.completions.create(model=MODEL, prompt="plain " * 50, max_tokens=4,
                                      extra_body={"response_format": {"type": "text"}},
                                      **GREEDY)
    assert "one engine" not in plain.model_extra["timings"]["decision_reason"]


def test_a_schema_the_engine_refuses_is_a_400_and_the_server_stays_up(serve_app):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{serve_app}/v1/chat/completions", headers=headers, timeout=60,
                          json={"model": MODEL, "max_tokens": 8,
                                "messages": [{"role": "user", "content": "hi"}],
                                "response_format": _schema_format({"type": "no-such-type"})})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "BadRequestError"
    ok = httpx.post(f"{serve_app}/v1/completions", headers=headers, timeout=60,
                    json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_echo_with_logprobs_gives_the_prompts_on_one_engine(serve_app):
    """The prompt's logprobs come from the engine that computes the prompt: such a request
    runs whole on one engine, the prompt's tokens first in its logprobs."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    prompt = "p" * 300  # over the app's local_max_prompt_tokens: others of its size split
    body = httpx.post(f"{serve_app}/v1/completions", headers=headers, timeout=60,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": 3, "echo": True,
                            "logprobs": 1, "temperature": 0}).json()
    timings = body["timings"]
    assert "one engine" in timings["decision_reason"] and timings["kv_transfer_bytes"] == 0
    logprobs = body["choices"][0]["logprobs"]
    num_prompt = body["usage"]["prompt_tokens"]
    assert len(logprobs["tokens"]) == num_prompt + body["usage"]["completion_tokens"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert body["choices"][0]["text"].startswith(prompt)
