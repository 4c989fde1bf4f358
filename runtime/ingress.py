"""The global scheduler as the Ray Serve ingress: the OpenAI-compatible HTTP API.

Also serves the gRPC API (runtime/grpc_api.py) on server.grpc_port, from the same replica.
Routes: POST /v1/completions, POST /v1/chat/completions (both stream with SSE when asked),
GET /v1/models, GET /health, GET /metrics (Prometheus), GET /v1/disagg/status. Every
completion carries the request's latency split as `timings` (in the body, or in the final chunk
of a stream). With an API key configured, /v1/* needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.background import BackgroundTask

from runtime.app_config import AppConfig
from runtime.clients import RemoteDecode, RemotePrefill
from runtime.engines import stream_hosts
from runtime.grpc_api import start_grpc_server
from runtime.metrics import Metrics
from runtime.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    StreamEncoder,
    chat_body,
    completion_body,
    sse,
    usage_chunk,
)
from runtime.router import PreparedRequest, Router, live_config
from runtime.scheduler.live import LiveScheduler
from runtime.scheduler.types import ReplicaReport
from runtime.token_stream import TokenSink

logger = logging.getLogger("ray.serve")
api = FastAPI(title="disagg", description="Disaggregated prefill/decode LLM serving")


@api.exception_handler(APIError)
async def _api_error(request: Request, err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def internal_error(request_id: str) -> APIError:
    """What a client sees of an unexpected failure: no exception text, an id to report."""
    return APIError(500, f"internal error (request id {request_id}); the server log has the "
                    "details", "server_error", code="internal_error")


@api.exception_handler(Exception)
async def _server_error(request: Request, err: Exception) -> JSONResponse:
    request_id = f"err-{secrets.token_hex(6)}"
    logger.exception("request %s failed: %s", request_id, err)
    return JSONResponse(internal_error(request_id).body(), status_code=500)


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()
    )
    return APIError(400, f"invalid request: {problems}", param=where)


@serve.deployment
@serve.ingress(api)
class Ingress:
    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self, config: AppConfig, prefill: Any, decode: Any
    ) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self._prefill_handle, self._decode_handle = prefill, decode
        self.metrics = Metrics()
        tokenizer = AutoTokenizer.from_pretrained(config.engine.model, local_files_only=True)
        self.live = LiveScheduler(live_config(config))
        self.sink: TokenSink | None = None
        if config.server.token_stream:
            self.sink = TokenSink(config.transfer.auth_token.get_secret_value())
            await self.sink.start(*stream_hosts(config.transfer.bind_host,
                                                config.transfer.advertise_host))
        prefill_client = RemotePrefill(prefill, self.sink) if prefill else None
        self.router = Router(config, tokenizer, prefill_client, RemoteDecode(decode, self.sink),
                             self.metrics, self.live, prefill_generation=prefill_client)
        key = config.server.api_key
        self._api_key = key.get_secret_value().encode() if key else None
        self._grpc_server = None
        if config.server.grpc_port:
            self._grpc_server = await start_grpc_server(
                self.router, config.server.host, config.server.grpc_port,
                key.get_secret_value() if key else None,
                config.server.max_concurrent_requests, config.server.max_body_bytes,
            )

    @api.get("/health", response_model=None)
    async def health(self) -> JSONResponse:
        """200 while requests can be served: "ok", or "degraded" when one pool has no live
        replica and the other serves alone; 503 while the engines are still starting, or
        when no replica of either pool is live. The body counts live replicas per pool."""
        view = self.live.health()
        return JSONResponse(view, status_code=200 if view["status"] in ("ok", "degraded")
                            else 503)

    @api.get("/metrics")
    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [{
            "id": self.config.model_name, "object": "model", "owned_by": "disagg",
            "max_model_len": self.router.max_model_len,
        }]}

    @api.get("/v1/disagg/status")
    async def status(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return await self.pool_status()

    async def pool_status(self) -> dict[str, Any]:
        """One replica of each pool (the one Serve routes to): its engine load and KV state;
        and the scheduler's view of every replica, lane and decision count."""
        pools: dict[str, Any] = {}
        if self._prefill_handle is not None:  # colocated serving has no prefill pool
            pools["prefill"] = asdict(await self._prefill_handle.status.remote())
        pools["decode"] = asdict(await self._decode_handle.status.remote())
        return {**pools, "scheduler": self.live.snapshot()}

    async def report_load(self, report: ReplicaReport) -> None:
        """Called by every pool replica a few times a second."""
        self.live.report(report)
        if report.role == "prefill":
            self.metrics.pending_tokens.labels(replica=report.replica_id).set(
                report.num_pending_tokens)

    @api.post("/v1/completions", response_model=None)
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body = self._parse(CompletionRequest, await self._json(request))
        assert isinstance(body, CompletionRequest)
        self.router.check_model(body.model)
        body.refuse_unsupported()
        prepared = self.router.prepare(await self.router.prompts.tokenize(body.prompt),
                                       body.sampling(16),
                                       "cmpl")
        if body.stream:
            return self._sse(prepared, body.model, chat=False, usage=body.include_usage)
        text, finish, timings = await self._collect(prepared)
        return JSONResponse(completion_body(prepared.request.request_id, body.model, text,
                                            finish, timings))

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        body = self._parse(ChatCompletionRequest, await self._json(request))
        assert isinstance(body, ChatCompletionRequest)
        self.router.check_model(body.model)
        body.refuse_unsupported()
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        default_max = self.router.max_model_len
        prompt = await self.router.prompts.tokenize_chat(
            [{"role": m.role, "content": m.text} for m in body.messages])
        prepared = self.router.prepare(prompt, body.sampling(default_max - len(prompt)), "chat")
        if body.stream:
            return self._sse(prepared, body.model, chat=True, usage=body.include_usage)
        text, finish, timings = await self._collect(prepared)
        return JSONResponse(chat_body(prepared.request.request_id, body.model, text, finish,
                                      timings))

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self._api_key):
            raise APIError(401, "missing or wrong API key (use 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key")

    async def _json(self, request: Request) -> Any:
        """The body as JSON: at most server.max_body_bytes (413 beyond, read no further)."""
        limit = self.config.server.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body ({int(declared):,} bytes) is larger than "
                           f"server.max_body_bytes ({limit:,})", code="body_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise APIError(413, f"the request body is larger than server.max_body_bytes "
                               f"({limit:,})", code="body_too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from err
        except RecursionError as err:
            raise APIError(400, "the request body's JSON is nested too deeply") from err

    @staticmethod
    def _parse(model: type[CompletionRequest] | type[ChatCompletionRequest],
               data: Any) -> CompletionRequest | ChatCompletionRequest:
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise _validation_error(err) from err

    async def _collect(self, prepared: PreparedRequest) -> tuple[str, str | None, Any]:
        text, finish, timings = [], None, None
        async for event in self.router.stream(prepared):
            text.append(event.text)
            finish = event.finish_reason or finish
            timings = event.timings or timings
        assert timings is not None, "request ended without timings"
        return "".join(text), finish, timings

    def _sse(self, prepared: PreparedRequest, model: str, chat: bool,
             usage: bool = False) -> StreamingResponse:
        request_id = prepared.request.request_id
        encoder = StreamEncoder(request_id, model, chat)

        async def events() -> AsyncIterator[str]:
            first = True
            try:
                async for event in self.router.stream(prepared):
                    if event.timings is None:
                        yield encoder.text(event.text, first)
                    else:
                        yield encoder.last(event.text, event.finish_reason, event.timings,
                                           first)
                        if usage:
                            yield sse(usage_chunk(request_id, model, chat, event.timings))
                    first = False
            except APIError as err:
                yield sse(err.body())
            except Exception:  # noqa: BLE001 - the client gets an error event, not a cut
                logger.exception("stream %s failed", request_id)
                yield sse(internal_error(request_id).body())
            yield sse("[DONE]")

        # a client gone before the first event: Starlette never starts events(), so the
        # booking its finally would release is released here instead
        return StreamingResponse(events(), media_type="text/event-stream",
                                 background=BackgroundTask(self.router.discard, prepared))
