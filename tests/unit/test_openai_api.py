"""OpenAI request parsing as real clients send it (no server)."""

from __future__ import annotations

import json

import pytest

from runtime.openai_api import APIError, ChatCompletionRequest, CompletionRequest


def test_clients_that_send_every_field_are_accepted():
    # vLLM's benchmark client sends these with neutral values
    body = CompletionRequest.model_validate({
        "model": "m", "prompt": "hi", "max_tokens": 4, "logprobs": None,
        "repetition_penalty": 1.0, "stream": True, "stream_options": {"include_usage": True},
    })
    body.refuse_unsupported()
    assert body.include_usage
    spec = body.sampling(16)
    assert spec.max_tokens == 4 and spec.repetition_penalty == 1.0


def test_unsupported_parameters_are_named():
    body = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "prompt_logprobs": 3,
                                             "structured_outputs": {"regex": "[a-z]"},
                                             "echo": True})
    with pytest.raises(APIError, match="prompt_logprobs, structured_outputs"):
        body.refuse_unsupported()


def test_logprobs_are_asked_for_as_vllms_server_takes_them():
    def spec(cls, **fields):
        return cls.model_validate({"prompt": "hi", "messages": [{"role": "user",
                                                                 "content": "hi"}], **fields}
                                  ).sampling(16).logprobs

    assert spec(CompletionRequest) is None and spec(CompletionRequest, logprobs=0) == 0
    assert spec(CompletionRequest, logprobs=5) == 5
    # echo: the prompt's logprobs too, as many (vLLM's server does the same)
    echo = CompletionRequest.model_validate({"prompt": "hi", "echo": True, "logprobs": 2})
    assert echo.sampling(16).prompt_logprobs == 2
    assert CompletionRequest.model_validate({"prompt": "hi", "logprobs": 2}
                                            ).sampling(16).prompt_logprobs is None
    assert spec(ChatCompletionRequest) is None
    assert spec(ChatCompletionRequest, logprobs=True) == 0
    assert spec(ChatCompletionRequest, logprobs=True, top_logprobs=3) == 3
    assert spec(ChatCompletionRequest, logprobs=False, top_logprobs=0) is None
    # more than the engine's max_logprobs (20), or -1 (the whole vocabulary): refused
    for cls, fields in ((CompletionRequest, {"logprobs": 21}),
                        (CompletionRequest, {"logprobs": -1}),
                        (ChatCompletionRequest, {"logprobs": True, "top_logprobs": 21})):
        with pytest.raises(APIError, match="greater than max allowed: 20"):
            spec(cls, **fields)
    # malformed: a 400 BadRequestError, as vLLM's server answers them
    for cls, fields in ((CompletionRequest, {"logprobs": -2}),
                        (ChatCompletionRequest, {"logprobs": True, "top_logprobs": -3}),
                        (ChatCompletionRequest, {"top_logprobs": 2})):
        with pytest.raises(APIError, match="logprobs") as refused:
            spec(cls, **fields)
        assert refused.value.status == 400 and refused.value.type == "BadRequestError"


def test_chat_content_may_be_text_parts():
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
    ]})
    assert [m.text for m in body.messages] == ["ab", "c"]
    with pytest.raises(ValueError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})


@pytest.mark.parametrize(("fields", "param"), [
    ({"stop": ""}, "stop"),
    ({"stop": ["x", ""]}, "stop"),
    ({"stop": "\ud800"}, "stop"),  # a lone surrogate: not text any engine can match
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"n": 2, "temperature": 0}, "n"),  # vLLM: n must be 1 when using greedy sampling
])
def test_sampling_fields_the_engine_would_refuse_are_a_400(fields, param):
    request = CompletionRequest(model="tiny", prompt="hello", **fields)
    with pytest.raises(APIError) as err:
        request.sampling(16)
    assert err.value.status == 400 and err.value.param == param


def test_response_format_becomes_the_engines_structured_output():
    def spec(cls, response_format):
        return cls.model_validate({"prompt": "hi", "messages": [{"role": "user",
                                                                 "content": "hi"}],
                                   "response_format": response_format}).sampling(16)

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for cls in (CompletionRequest, ChatCompletionRequest):
        assert spec(cls, {"type": "text"}).structured is None
        assert json.loads(spec(cls, {"type": "json_object"}).structured) == {"json_object": True}
        named = spec(cls, {"type": "json_schema",
                           "json_schema": {"name": "a", "schema": schema, "strict": True}})
        assert json.loads(named.structured) == {"json": schema}
        params = named.to_vllm()  # vLLM's own StructuredOutputsParams
        assert params.structured_outputs is not None and params.structured_outputs.json == schema
        with pytest.raises(ValueError, match="another engine"):
            named.to_vllm(continuation=True)  # the grammar cannot move with the KV cache
    with pytest.raises(APIError, match="'json_schema' field must be provided"):
        spec(CompletionRequest, {"type": "json_schema"})
    with pytest.raises(APIError, match="structural_tag") as refused:
        spec(ChatCompletionRequest, {"type": "structural_tag", "format": {}})
    assert refused.value.code == "unsupported_parameter"
    with pytest.raises(ValueError):  # not a type OpenAI or vLLM know: the schema refuses it
        spec(ChatCompletionRequest, {"type": "yaml"})
