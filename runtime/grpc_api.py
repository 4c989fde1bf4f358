"""The gRPC client API (protos/inference.proto), served by the ingress replica.

It shares the HTTP API's path: the same validation (Router.prepare), the same disaggregated
request flow and timings; only the encoding differs. Errors map to gRPC status codes.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from collections.abc import AsyncIterator

import grpc

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from runtime.cost import RequestCost
from runtime.logprobs import MAX_LOGPROBS, token_view
from runtime.messages import TextEvent
from runtime.openai_api import APIError
from runtime.pipeline import PhaseTimings
from runtime.requests import SamplingSpec
from runtime.router import Router

logger = logging.getLogger("ray.serve")
_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def cost_message(c: RequestCost) -> pb.Cost:
    return pb.Cost(
        prefill_engine_s=c.prefill_engine_s, decode_engine_s=c.decode_engine_s,
        prefill_kv_block_s=c.prefill_kv_block_s, decode_kv_block_s=c.decode_kv_block_s,
        bytes_moved=c.bytes_moved, dollars=c.dollars,
    )


def timings_message(t: PhaseTimings) -> pb.Timings:
    return pb.Timings(
        scheduler_queue_ms=t.scheduler_queue_ms, prefill_queue_ms=t.prefill_queue_ms,
        prefill_compute_ms=t.prefill_compute_ms, kv_transfer_ms=t.kv_transfer_ms,
        kv_transfer_bytes=t.kv_transfer_bytes, decode_queue_ms=t.decode_queue_ms,
        decode_compute_ms=t.decode_compute_ms, ttft_ms=t.ttft_ms, tpot_ms=t.tpot_ms,
        e2e_ms=t.e2e_ms, lane=t.lane, mode=t.mode, prefill_replica=t.prefill_replica,
        decode_replica=t.decode_replica, num_loaded_tokens=t.num_loaded_tokens,
        transfer_error=t.transfer_error, decision_reason=t.decision_reason,
        predicted_prefill_ms=t.predicted_prefill_ms, predicted_ttft_ms=t.predicted_ttft_ms,
        num_cached_prompt_tokens=t.num_cached_prompt_tokens, cost=cost_message(t.cost),
    )


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, router: Router, api_key: str | None) -> None:
        self._router = router
        self._api_key = api_key.encode() if api_key else None

    async def Generate(  # noqa: N802 - the method name is the RPC's
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        prepared = None
        try:
            self._authorize(context)
            prepared = self._router.prepare(await self._prompt(request),
                                            self._sampling(request), "grpc")
            top = prepared.request.sampling.logprobs
            async for event in self._router.stream(prepared):
                response = pb.GenerateResponse(token_ids=event.token_ids, text=event.text)
                if top is not None:
                    response.logprobs.extend(self._logprobs(event, top))
                if event.timings is not None:
                    response.finish_reason = event.finish_reason or ""
                    if isinstance(event.stop_reason, str):
                        response.stop_reason = event.stop_reason
                    response.usage.prompt_tokens = event.timings.num_prompt_tokens
                    response.usage.completion_tokens = event.timings.num_output_tokens
                    response.usage.cost.CopyFrom(cost_message(event.timings.cost))
                    response.timings.CopyFrom(timings_message(event.timings))
                yield response
        except APIError as err:
            await context.abort(_STATUS_CODES.get(err.status, grpc.StatusCode.INTERNAL),
                                err.message)
        except Exception:  # noqa: BLE001 - a clear status, never the exception's text
            request_id = f"err-{secrets.token_hex(6)}"
            logger.exception("gRPC request %s failed", request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id "
                                f"{request_id}); the server log has the details")
        finally:  # the final status follows at once, before the bookkeeping runs
            if prepared is not None:
                self._router.answered(prepared)

    async def Health(  # noqa: N802
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        live = self._router.live
        return pb.HealthResponse(status="ok" if live is None else live.health()["status"])

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self._api_key is None:
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, token = str(value).partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(token.encode(),
                                                                      self._api_key):
                    return
        raise APIError(401, "missing or wrong API key ('authorization: Bearer <key>')")

    def _logprobs(self, event: TextEvent, top: int) -> list[pb.TokenLogprob]:
        entries = list(event.logprobs)
        entries += [() for _ in range(len(event.token_ids) - len(entries))]  # decoded here
        tokenizer = self._router.tokenizer
        return [pb.TokenLogprob(token_id=own[0], logprob=own[1], token=own[2],
                                top=[pb.TopLogprob(token_id=t, logprob=lp, token=text)
                                     for t, lp, text in best])
                for own, best in token_view(entries, event.token_ids, top,
                                            lambda i: str(tokenizer.decode(i)))]

    async def _prompt(self, request: pb.GenerateRequest) -> list[int]:
        self._router.check_model(request.model)
        if request.prompt and request.prompt_token_ids:
            raise APIError(400, "give prompt or prompt_token_ids, not both", param="prompt")
        if request.prompt_token_ids:
            return self._router.prompts.check_ids(list(request.prompt_token_ids))
        return await self._router.prompts.tokenize(request.prompt)

    @staticmethod
    def _sampling(request: pb.GenerateRequest) -> SamplingSpec:
        max_tokens = request.max_tokens or 16
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}",
                           param="max_tokens")
        if not 0 <= request.temperature <= 2 or not 0 <= request.top_p <= 1:
            raise APIError(400, "temperature must be in [0, 2] and top_p in (0, 1]")
        if request.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({request.min_tokens}) must be less than or equal "
                           f"to max_tokens ({max_tokens})", param="min_tokens")
        logprobs = request.logprobs if request.HasField("logprobs") else None
        if logprobs is not None and logprobs > MAX_LOGPROBS:
            raise APIError(400, f"Requested sample logprobs of {logprobs}, which is greater "
                           f"than max allowed: {MAX_LOGPROBS}", param="logprobs")
        return SamplingSpec(
            max_tokens=max_tokens, temperature=request.temperature,
            top_p=request.top_p or 1.0, top_k=max(request.top_k, 0),
            seed=request.seed if request.HasField("seed") else None,
            ignore_eos=request.ignore_eos, stop=tuple(s for s in request.stop if s),
            stop_token_ids=tuple(request.stop_token_ids),
            include_stop_str_in_output=request.include_stop_str_in_output,
            min_tokens=request.min_tokens, logprobs=logprobs,
            structured=_structured(request),
        )


def _structured(request: pb.GenerateRequest) -> str | None:
    """vLLM's structured-output fields for the request, as JSON (None: none asked)."""
    if request.json_schema and request.json_object:
        raise APIError(400, "give json_schema or json_object, not both", param="json_schema")
    if request.json_object:
        return json.dumps({"json_object": True})
    if not request.json_schema:
        return None
    try:
        schema = json.loads(request.json_schema)
    except (json.JSONDecodeError, RecursionError) as err:
        raise APIError(400, f"json_schema is not valid JSON: {err}",
                       param="json_schema") from err
    if not isinstance(schema, dict):
        raise APIError(400, "json_schema must be a JSON object", param="json_schema")
    return json.dumps({"json": schema})


async def start_grpc_server(router: Router, host: str, port: int, api_key: str | None,
                            max_concurrent_rpcs: int = 1024,
                            max_message_bytes: int = 16 << 20) -> grpc.aio.Server:
    """The gRPC API on host:port: at most max_concurrent_rpcs calls at once (beyond that,
    RESOURCE_EXHAUSTED), requests up to max_message_bytes, keepalive against dead clients."""
    server = grpc.aio.server(maximum_concurrent_rpcs=max_concurrent_rpcs, options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        # find dead clients: ping after 30 s without traffic, drop after 10 s without an answer
        ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ])
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(router, api_key), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"gRPC API cannot bind {host}:{port}")
    await server.start()
    return server
