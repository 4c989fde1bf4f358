"""Differential conformance: the same requests to vLLM's own OpenAI server and to disagg, both
on the tiny model, greedy. Each pair must agree on the outcome class (2xx / 4xx), and then on
every choice's text, finish reason and token count (2xx) or the error type (4xx).
DOCUMENTED lists the divergences we keep on purpose (the README says why); any other fails.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from runtime.engines import free_port
from tests.integration.serve_app import API_KEY, MODEL

# fields (all in the request) -> why disagg answers differently (also in the README's API
# section)
DOCUMENTED: dict[tuple[str, ...], str] = {}
_YES_NO = {"type": "json_schema", "json_schema": {"name": "yn", "schema": {
    "type": "object", "properties": {"a": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["a"]}}}


@pytest.fixture(scope="module")
def vllm_server(tiny_model):
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
            str(tiny_model), "--served-model-name", MODEL, "--host", "127.0.0.1", "--port",
            str(port), "--dtype", "float32", "--block-size", "128", "--max-model-len", "16384",
            "--kv-cache-memory-bytes", str(256 << 20), "--enforce-eager",
            "--disable-uvicorn-access-log"]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, "vLLM's server exited while starting"
        time.sleep(2)
    else:
        proc.kill()
        raise AssertionError("vLLM's server did not start within 300 s")
    yield url
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


PROMPT = "The quick brown fox jumps over"
LONG = "lorem ipsum dolor sit amet " * 12


def _completion_cases() -> list[dict[str, Any]]:
    base = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    single = [
        {}, {"prompt": LONG}, {"prompt": [65, 66, 67, 68]}, {"prompt": [PROMPT, LONG]},
        {"prompt": [[70, 71], [72, 73, 74]]}, {"prompt": ""}, {"prompt": []},
        {"prompt": [99999]}, {"max_tokens": 1}, {"max_tokens": None}, {"max_tokens": 0},
        {"max_tokens": -3}, {"max_tokens": 20000}, {"stop": "a"}, {"stop": ["e", " t"]},
        {"stop": []}, {"stop_token_ids": [101]}, {"min_tokens": 4}, {"min_tokens": 50},
        {"include_stop_str_in_output": True, "stop": "o"}, {"n": 2}, {"n": 0},
        {"echo": True}, {"seed": 7}, {"seed": 2**70}, {"temperature": -1},
        {"top_p": 0}, {"top_p": 1.5}, {"top_k": 5}, {"top_k": -1}, {"user": "u-1"},
        {"model": "no-such-model"}, {"presence_penalty": 0.5}, {"frequency_penalty": 3},
        {"repetition_penalty": 1.2}, {"repetition_penalty": 0}, {"ignore_eos": True},
        {"logprobs": 2}, {"stream": True}, {"stream": True, "stop": "e"},
        {"stream": True, "n": 2}, {"skip_special_tokens": False},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"stop": ""}, {"stop": "zzz"}, {"stop": ["x", "y", "z"]}, {"n": 3}, {"prompt": "a"},
        {"prompt": [PROMPT]}, {"prompt": [[65]]}, {"max_tokens": 2, "min_tokens": 2},
        {"top_p": 0.5}, {"top_k": 0}, {"presence_penalty": 2.5}, {"frequency_penalty": -2},
        {"echo": True, "max_tokens": 1}, {"include_stop_str_in_output": True, "stop": "zz"},
        {"unknown_field": 1}, {"stream": True, "max_tokens": 1},
        {"spaces_between_special_tokens": False},
        {"logprobs": 0}, {"logprobs": 5, "stream": True}, {"logprobs": 1, "n": 2},
        {"logprobs": 1, "stop": "e"}, {"logprobs": 21}, {"logprobs": -2},
        {"logprobs": 1, "prompt": [PROMPT, LONG]}, {"echo": True, "logprobs": 1},
        {"echo": True, "logprobs": 3, "stream": True}, {"echo": True, "logprobs": 0, "n": 2,
                                                         "temperature": 0.7, "seed": 5},
        {"echo": True, "logprobs": 2, "prompt": [PROMPT, LONG], "stop": "e"},
        # echo-only scoring (what evaluation harnesses send): the prompt and its logprobs
        {"echo": True, "max_tokens": 0}, {"echo": True, "max_tokens": 0, "logprobs": 2},
        {"echo": True, "max_tokens": 0, "logprobs": 1, "stream": True},
        {"response_format": _YES_NO, "max_tokens": 40},
        {"response_format": {"type": "json_object"}, "max_tokens": 16, "stream": True},
        {"response_format": {"type": "text"}},
        {"response_format": {"type": "json_schema"}},
        {"response_format": {"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
        {"response_format": _YES_NO, "max_tokens": 40, "logprobs": 2, "n": 2,
         "temperature": 0.8, "seed": 3},
    ]
    combos = [dict(itertools.chain.from_iterable(d.items() for d in pair))
              for pair in itertools.combinations(
                  [{"stop": "e"}, {"min_tokens": 3}, {"n": 2}, {"echo": True},
                   {"prompt": [PROMPT, "Hello"]}, {"max_tokens": 3}, {"stream": True}], 2)]
    return [{**base, **case} for case in single + combos]


def _chat_cases() -> list[dict[str, Any]]:
    base = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 8, "temperature": 0}
    cases = [
        {}, {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": PROMPT}]},
        {"messages": [{"role": "user", "content": PROMPT, "name": "ann"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                      {"role": "user", "content": PROMPT}]},
        {"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user"}]}, {"max_completion_tokens": 3, "max_tokens": None},
        {"stop": "e"}, {"n": 2}, {"stream": True}, {"stream": True, "n": 2},
        {"min_tokens": 4}, {"seed": 3}, {"logprobs": True, "top_logprobs": 2},
        {"response_format": {"type": "json_object"}}, {"model": "gpt-x"},
        {"temperature": -0.5}, {"stop": ["o", "e"], "stream": True},
        {"messages": [{"role": "developer", "content": "Be brief."},
                      {"role": "user", "content": PROMPT}]},
        {"max_tokens": 1}, {"stop": ""}, {"unknown_field": "x"},
        {"logprobs": True}, {"logprobs": True, "top_logprobs": 3, "stream": True},
        {"logprobs": True, "top_logprobs": 1, "n": 2}, {"top_logprobs": 2},
        {"logprobs": True, "top_logprobs": 25}, {"logprobs": False, "top_logprobs": 0},
        {"response_format": _YES_NO, "max_tokens": 40},
        {"response_format": _YES_NO, "max_tokens": 40, "stream": True, "logprobs": True},
        {"response_format": {"type": "json_object"}, "max_tokens": 12},
        {"response_format": {"type": "yaml"}},
    ]
    return [{**base, **case} for case in cases]


def _outcome(base_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if body.get("stream"):
        return _streamed(base_url, path, body, headers)
    response = httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=120)
    data = response.json()
    if response.status_code >= 400:
        return {"status": response.status_code // 100,
                "type": data.get("error", {}).get("type") if isinstance(data, dict) else None}
    choices = {c["index"]: (c.get("text", (c.get("message") or {}).get("content")),
                            c["finish_reason"]) for c in data["choices"]}
    logprobs = {c["index"]: _logprobs(c.get("logprobs")) for c in data["choices"]}
    return {"status": 2, "choices": choices,
            "completion_tokens": data["usage"]["completion_tokens"], "logprobs": logprobs}


def _logprobs(body: dict[str, Any] | None) -> list[tuple[str, float, tuple[str, ...]]] | None:
    """A choice's (or a chunk's) logprobs as (token, logprob, top tokens) per token."""
    if body is None:
        return None
    if "content" in body:  # chat
        return [(t["token"], t["logprob"], tuple(x["token"] for x in t["top_logprobs"]))
                for t in body["content"] or []]
    return [(token, logprob, tuple(top or ()))
            for token, logprob, top in zip(body["tokens"], body["token_logprobs"],
                                           body["top_logprobs"], strict=True)]


def _same(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Equal outcomes; logprobs equal up to the float noise of two engines."""
    ours, theirs = dict(ours), dict(theirs)
    a, b = ours.pop("logprobs", None), theirs.pop("logprobs", None)
    if ours != theirs or (a is None) != (b is None):
        return False
    if a is None or a.keys() != b.keys():
        return a == b
    for index in a:
        x, y = a[index], b[index]
        if (x is None) != (y is None) or (x is not None and len(x) != len(y)):
            return False
        for (token, logprob, top), (token2, logprob2, top2) in zip(x or (), y or (),
                                                                    strict=True):
            if token != token2 or set(top) != set(top2) or (logprob is None) != (
                    logprob2 is None) or (logprob is not None and abs(logprob - logprob2) > 1e-3):
                return False
    return True


def _streamed(base_url: str, path: str, body: dict[str, Any],
              headers: dict[str, str]) -> dict[str, Any]:
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    logprobs: dict[int, list[Any] | None] = {}
    with httpx.stream("POST", f"{base_url}{path}", json=body, headers=headers,
                      timeout=120) as response:
        if response.status_code >= 400:
            data = json.loads(response.read())
            return {"status": response.status_code // 100, "type": data["error"]["type"]}
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 5, "type": chunk["error"]["type"]}
            for c in chunk.get("choices", []):
                delta = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                texts[c["index"]] = texts.get(c["index"], "") + (delta or "")
                if c.get("finish_reason"):
                    finish[c["index"]] = c["finish_reason"]
                chunk_logprobs = _logprobs(c.get("logprobs"))
                if chunk_logprobs is not None:
                    logprobs[c["index"]] = (logprobs.get(c["index"]) or []) + chunk_logprobs
    return {"status": 2, "choices": {i: (t, finish.get(i)) for i, t in texts.items()},
            "logprobs": {i: logprobs.get(i) for i in texts}}


def test_disagg_answers_as_vllm_does(serve_app, vllm_server):
    cases = [("/v1/completions", c) for c in _completion_cases()]
    cases += [("/v1/chat/completions", c) for c in _chat_cases()]
    assert len(cases) >= 100
    divergent, documented = [], []
    for path, body in cases:
        ours, theirs = _outcome(str(serve_app), path, body), _outcome(vllm_server, path, body)
        if _same(ours, theirs):
            continue
        reason = next((why for fields, why in DOCUMENTED.items()
                       if all(field in body for field in fields)), None)
        (documented if reason else divergent).append((path, body, ours, theirs))
    print(f"\n{len(cases)} requests: {len(cases) - len(divergent) - len(documented)} equal, "
          f"{len(documented)} documented divergences, {len(divergent)} others")
    for path, body, ours, theirs in divergent:
        print(f"  {path} {json.dumps(body)[:150]}\n    disagg: {ours}\n    vllm:   {theirs}")
    assert not divergent
