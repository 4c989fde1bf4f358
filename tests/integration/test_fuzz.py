"""Fuzz suites for the HTTP and gRPC APIs: hundreds of generated malformed requests against the
real app. None may get a 5xx (or gRPC INTERNAL/UNKNOWN); every error carries OpenAI's error
body (a type and a message); the server stays healthy; nothing a request booked stays booked.
"""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest

from tests.integration.serve_app import API_KEY, MODEL

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
NUM_CASES = 240
WEIRD_VALUES = [None, True, -1, 0, 2**70, -(2**70), 1e308, float("inf"), float("nan"), "",
                "x" * 300, "\ud800", [], {}, [[]], [1.5], ["a", 1], {"a": {"b": []}}, 3.7,
                -0.5, "1", [2**40], "\x00", "🎉" * 50]
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream",
          "stream_options", "n", "ignore_eos", "user", "repetition_penalty",
          "presence_penalty", "frequency_penalty", "messages", "max_completion_tokens",
          "kv_transfer_params", "logit_bias", "stop"]


def _value(rng: random.Random):
    choice = rng.random()
    if choice < 0.6:
        return rng.choice(WEIRD_VALUES)
    if choice < 0.8:
        return rng.randint(-5, 20000)
    return "".join(rng.choice("ab\\\"{}[]\u2028\u00e9") for _ in range(rng.randint(0, 20)))


def _body(rng: random.Random, chat: bool) -> tuple[bytes, str]:
    """One malformed-or-odd request body (raw bytes) and a label for failures."""
    kind = rng.random()
    if kind < 0.1:  # not JSON, or JSON that is no object, or nested without end
        raw = rng.choice([b"{", b"[]", b"null", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000,
                          b'{"model": "tiny", "prompt": "\\ud800"}', b"1e99999"])
        return raw, f"raw {raw[:30]!r}"
    body: dict = {"model": MODEL}
    if chat:
        body["messages"] = [{"role": "user", "content": "hello"}]
    else:
        body["prompt"] = "hello"
    body["max_tokens"] = 4
    for _ in range(rng.randint(1, 4)):
        field = rng.choice(FIELDS)
        if rng.random() < 0.1:
            body.pop(field, None)
        else:
            body[field] = _value(rng)
    if chat and rng.random() < 0.3:
        body["messages"] = [{"role": rng.choice(["user", "system", "tool", 5, None]),
                             "content": _value(rng)}]
    try:
        raw = json.dumps(body, allow_nan=True).encode()
    except (TypeError, ValueError):
        raw = b"{}"
    return raw, json.dumps(body, default=str, allow_nan=True)[:200]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_http_fuzz_never_gets_a_server_error(serve_app, path):
    rng = random.Random(hash(path) & 0xFFFF)
    failures = []
    with httpx.Client(base_url=str(serve_app), headers=HEADERS, timeout=60) as client:
        for _ in range(NUM_CASES):
            raw, label = _body(rng, chat="chat" in path)
            response = client.post(path, content=raw,
                                   headers={"content-type": "application/json"})
            if response.status_code >= 500:
                failures.append((response.status_code, label, response.text[:200]))
                continue
            if response.status_code >= 400:
                error = response.json().get("error", {})
                if not (error.get("type") and error.get("message")):
                    failures.append((response.status_code, label, "no OpenAI error body"))
            elif ("text/event-stream" in response.headers.get("content-type", "")
                  and 'InternalServerError' in response.text):
                failures.append((200, label, response.text[:200]))
    assert not failures, failures[:10]
    _assert_healthy_and_nothing_booked(serve_app)


def test_grpc_fuzz_never_gets_an_internal_error(serve_app):
    import grpc

    from protos import inference_pb2 as pb
    from protos import inference_pb2_grpc

    rng = random.Random(7)
    failures = []
    bad_codes = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
    with grpc.insecure_channel(serve_app.grpc_endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for _ in range(NUM_CASES // 2):
            fields = {
                "model": rng.choice([MODEL, MODEL, "", "other"]),
                "max_tokens": rng.choice([0, 1, 4, 20000, 2**31 - 1]),
                "temperature": rng.choice([0.0, 1.0, -1.0, 3.0, float("nan"), float("inf")]),
                "top_p": rng.choice([0.0, 0.5, 1.0, 2.0, float("nan")]),
                "top_k": rng.choice([0, -1, -5, 2**31 - 1]),
            }
            if rng.random() < 0.5:
                fields["prompt_token_ids"] = [rng.choice([0, 5, 300, 2**31 - 1])
                                              for _ in range(rng.randint(0, 40))]
            else:
                fields["prompt"] = rng.choice(["hi", "", "x" * 70_000, "é" * 10])
            if rng.random() < 0.3:
                fields["seed"] = rng.choice([0, -1, 2**62, -(2**62)])
            request = pb.GenerateRequest(**fields)
            try:
                list(stub.Generate(request, metadata=(("authorization",
                                                       f"Bearer {API_KEY}"),), timeout=60))
            except grpc.RpcError as err:
                if err.code() in bad_codes:
                    failures.append((err.code(), fields, err.details()))
    assert not failures, failures[:10]
    _assert_healthy_and_nothing_booked(serve_app)


def _assert_healthy_and_nothing_booked(serve_app) -> None:
    assert httpx.get(f"{serve_app}/health", timeout=30).status_code == 200
    deadline = time.monotonic() + 20
    while True:
        view = httpx.get(f"{serve_app}/v1/disagg/status", headers=HEADERS,
                         timeout=30).json()["scheduler"]
        in_flight = sum(lane["in_flight"] for lane in view["lanes"].values())
        outstanding = sum(p["outstanding"] for p in view["prefill"])
        if (in_flight, outstanding) == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert (in_flight, outstanding) == (0, 0), view
