"""The gRPC API on the Ray Serve app (the same app as test_serve_app.py's HTTP tests)."""

from __future__ import annotations

import json

import pytest

from tests.integration.helpers import colocated_tokens, greedy, make_prompt
from tests.integration.serve_app import API_KEY, MODEL


@pytest.fixture
def grpc_stub(serve_app):
    import grpc

    from protos import inference_pb2_grpc

    with grpc.insecure_channel(serve_app.grpc_endpoint) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


AUTH = (("authorization", f"Bearer {API_KEY}"),)


def test_grpc_generate_streams_tokens_equal_to_colocated(grpc_stub, cluster, tokenizer):
    from protos import inference_pb2 as pb

    prompt_ids = list(make_prompt(1100, seed=600))
    expected_ids = cluster.runner.run(colocated_tokens(
        cluster.oracle, "o-grpc", tuple(prompt_ids), greedy(10)))
    request = pb.GenerateRequest(model=MODEL, prompt_token_ids=prompt_ids, max_tokens=10,
                                 ignore_eos=True)
    responses = list(grpc_stub.Generate(request, metadata=AUTH, timeout=120))
    token_ids = [t for r in responses for t in r.token_ids]
    assert tuple(token_ids) == expected_ids
    assert "".join(r.text for r in responses) == tokenizer.decode(
        expected_ids, skip_special_tokens=True)
    last = responses[-1]
    assert last.finish_reason == "length" and last.usage.completion_tokens == 10
    assert last.timings.lane == "long" and last.timings.kv_transfer_bytes > 0
    assert last.timings.e2e_ms >= last.timings.ttft_ms >= last.timings.prefill_compute_ms > 0
    assert last.timings.cost.prefill_engine_s > 0 and last.timings.cost.dollars > 0
    assert last.usage.cost == last.timings.cost
    assert grpc_stub.Health(pb.HealthRequest(), timeout=10).status == "ok"


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"model": "gpt-9", "prompt": "hi"}, "NOT_FOUND", "not found"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": -3}, "INVALID_ARGUMENT", "at least 1"),
        ({"model": MODEL, "prompt": "hi", "prompt_token_ids": [5]}, "INVALID_ARGUMENT", "both"),
        ({"model": MODEL, "prompt": "z" * 17000}, "INVALID_ARGUMENT", "context"),
        ({"model": MODEL, "prompt": ""}, "INVALID_ARGUMENT", "empty"),
        ({"model": MODEL, "prompt": "hi", "temperature": 7}, "INVALID_ARGUMENT", "temperature"),
        ({"model": MODEL, "prompt": "hi", "logprobs": 21}, "INVALID_ARGUMENT", "max allowed"),
        ({"model": MODEL, "prompt": "hi", "json_schema": "{no"}, "INVALID_ARGUMENT", "valid JSON"),
        ({"model": MODEL, "prompt": "hi", "json_schema": "{}", "json_object": True},
         "INVALID_ARGUMENT", "not both"),
        # refused by the engine's grammar backend as the request is added: still the client's
        ({"model": MODEL, "prompt": "hi", "json_schema": '{"type": "no-such-type"}'},
         "INVALID_ARGUMENT", "no-such-type"),
    ],
)
def test_grpc_bad_input_gets_the_right_status(grpc_stub, fields, code, needle):
    import grpc

    from protos import inference_pb2 as pb

    with pytest.raises(grpc.RpcError) as err:
        list(grpc_stub.Generate(pb.GenerateRequest(**fields), metadata=AUTH, timeout=30))
    assert err.value.code().name == code and needle in err.value.details()


def test_grpc_logprobs_and_json_schema(grpc_stub):
    """What the HTTP API's logprobs and response_format give, over gRPC: an entry per token
    id in every response, and output that follows the schema (run on one engine)."""
    from protos import inference_pb2 as pb

    schema = json.dumps({"type": "string", "enum": ["yes", "no"]})
    request = pb.GenerateRequest(model=MODEL, prompt="Is it? " * 20, max_tokens=30,
                                 logprobs=2, json_schema=schema)
    responses = list(grpc_stub.Generate(request, metadata=AUTH, timeout=120))
    text = "".join(r.text for r in responses)
    assert json.loads(text) in ("yes", "no")
    entries = [e for r in responses for e in r.logprobs]
    assert [e.token_id for e in entries] == [t for r in responses for t in r.token_ids]
    # the tokens' names spell the text (and the EOS that ended it, which the text skips)
    assert "".join(e.token for e in entries).startswith(text)
    for entry in entries:
        assert entry.logprob <= 0 and 1 <= len(entry.top) <= 2
        assert entry.top[0].logprob >= entry.logprob - 1e-5  # the top one is the likeliest
    assert "one engine" in responses[-1].timings.decision_reason
    plain = list(grpc_stub.Generate(pb.GenerateRequest(model=MODEL, prompt="hi", max_tokens=3),
                                    metadata=AUTH, timeout=60))
    assert not any(r.logprobs for r in plain)  # none unless asked


def test_grpc_without_the_api_key_is_unauthenticated(grpc_stub):
    import grpc

    from protos import inference_pb2 as pb

    with pytest.raises(grpc.RpcError) as err:
        list(grpc_stub.Generate(pb.GenerateRequest(model=MODEL, prompt="hi"), timeout=30))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
