"""The global scheduler as the Ray Serve ingress: the OpenAI-compatible HTTP API.

Also serves the gRPC API (runtime/grpc_api.py) on server.grpc_port, from the same replica.
Routes: POST /v1/completions, POST /v1/chat/completions (both stream with SSE when asked),
GET /v1/models, GET /health, GET /metrics (Prometheus), GET /v1/disagg/status. Every
completion carries the request's latency split as `timings` (in the body, or in the final chunk
of a stream). With an API key configured, /v1/* needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.background import BackgroundTask

from runtime import fanout
from runtime.app_config import AppConfig
from runtime.clients import RemoteDecode, RemotePrefill
from runtime.direct_calls import DirectCalls
from runtime.engines import stream_hosts
from runtime.grpc_api import start_grpc_server
from runtime.logprobs import LogprobsWriter
from runtime.loop_watch import LoopWatch
from runtime.messages import REPORT_PERIOD_S, UsageReport
from runtime.metrics import Metrics
from runtime.openai_api import (
    SCHEMA_ERROR,
    APIError,
    ChatCompletionRequest,
    ChoiceResult,
    CompletionRequest,
    StreamEncoder,
    response_body,
    sse,
)
from runtime.router import Router, live_config
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
                    "details", code="internal_error")


@api.exception_handler(Exception)
async def _server_error(request: Request, err: Exception) -> JSONResponse:
    request_id = f"err-{secrets.token_hex(6)}"
    logger.exception("request %s failed: %s", request_id, err)
    return JSONResponse(internal_error(request_id).body(), status_code=500)


# Fields vLLM's request schema takes as any number and its sampling checks bound later: a
# value out of range is a "BadRequestError" there, any other schema failure a "Bad Request".
_SAMPLING_BOUNDS = {"temperature", "top_p", "top_k", "n", "max_tokens", "min_tokens",
                    "presence_penalty", "frequency_penalty", "repetition_penalty", "messages"}
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal",
                 "too_short"}


def _validation_error(err: ValidationError) -> APIError:
    errors = err.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors
    )
    sampling = all(e["type"] in _BOUND_ERRORS and e["loc"] and e["loc"][0] in _SAMPLING_BOUNDS
                   for e in errors)
    return APIError(400, f"invalid request: {problems}", param=where,
                    type=None if sampling else SCHEMA_ERROR)


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
        self.direct = DirectCalls(config.transfer.auth_token.get_secret_value()) \
            if config.server.direct_calls else None
        self._roles: dict[str, str] = {}  # replica id -> pool, from its reports
        self._load_reads = asyncio.get_running_loop().create_task(self._read_loads()) \
            if self.direct is not None else None
        prefill_client = RemotePrefill(prefill, self.sink, self.direct) if prefill else None
        self.router = Router(config, tokenizer, prefill_client,
                             RemoteDecode(decode, self.sink, self.direct),
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
        self._loop_watch = LoopWatch("ingress")  # logs what holds up every request here
        self._loop_watch.start()

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
            pools["prefill"] = await self._prefill_handle.status.remote()
        pools["decode"] = await self._decode_handle.status.remote()
        direct = self.direct.snapshot() if self.direct is not None else None
        return {**pools, "scheduler": self.live.snapshot(), "direct_calls": direct}

    async def report_load(self, report: ReplicaReport) -> float:
        """Called by every pool replica a few times a second while this ingress does not read
        its load over a direct connection; answers with the pool's demand in replicas, which
        the replica hands to Serve's autoscaler."""
        return self._take_report(report)

    async def _read_loads(self) -> None:
        """Every REPORT_PERIOD_S, read the load of each replica with an open direct
        connection over it, handing it its pool's demand: a frame each way instead of a
        Serve call from each replica (a Ray call in both processes, 2.5 a second each). A
        replica not read for PULL_GRACE_PERIODS reports over Serve again. Reads are independent:
        one replica slow to answer (draining, stuck) delays no other's (all of them late
        would make every replica look stale, and the scheduler refuse requests)."""
        assert self.direct is not None
        reading: dict[str, asyncio.Task[None]] = {}
        while True:
            await asyncio.sleep(REPORT_PERIOD_S)
            for rid in [rid for rid, task in reading.items() if task.done()]:
                del reading[rid]
            for rid, client in self.direct.open_clients().items():
                if rid not in reading:
                    reading[rid] = asyncio.ensure_future(self._read_load(rid, client))

    async def _read_load(self, replica_id: str, client: Any) -> None:
        role = self._roles.get(replica_id)
        demand = self.live.demand(role).replicas if role is not None else None
        try:
            report, usage = await asyncio.wait_for(client.call("load_report", demand),
                                                   2 * REPORT_PERIOD_S)
        except Exception:  # noqa: BLE001 - lost, draining, slow: it reports over Serve again
            return
        assert self.direct is not None  # reads run only with direct calls
        self.direct.num_load_reads += 1
        self._take_report(report)
        if usage is not None:
            await self.report_usage(usage)

    def _take_report(self, report: ReplicaReport) -> float:
        self._roles[report.replica_id] = report.role
        self.live.report(report)
        if self.direct is not None:
            self.direct.update(report.replica_id, report.call_address)
        if report.role == "prefill":
            self.metrics.pending_tokens.labels(replica=report.replica_id).set(
                report.num_pending_tokens)
        demand = self.live.demand(report.role)
        self.metrics.demand.labels(pool=report.role).set(demand.replicas)
        self.metrics.live_replicas.labels(pool=report.role).set(
            self.live.health()["pools"].get(report.role, {}).get("live", 0))
        return demand.replicas

    async def report_usage(self, report: UsageReport) -> None:
        """Called by every pool replica every few seconds: its engine's busy and wall time."""
        self.metrics.record_usage(report.role, report.replica_id, report.usage)

    @api.post("/v1/completions", response_model=None)
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body = self._parse(CompletionRequest, await self._json(request))
        assert isinstance(body, CompletionRequest)
        model = self._model(body.model)
        body.refuse_unsupported()
        prompts = [await self.router.prompts.tokenize(p) for p in body.prompts]
        jobs = fanout.plan(self.router, prompts, body.n, body.sampling(16), "cmpl")
        echo = [self.router.prompts.text_of(p) for p in body.prompts] if body.echo else None
        return await self._respond(jobs, body.n, model, False, body.stream,
                                   body.include_usage, echo, body.echo_only)

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        body = self._parse(ChatCompletionRequest, await self._json(request))
        assert isinstance(body, ChatCompletionRequest)
        model = self._model(body.model)
        body.refuse_unsupported()
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        prompt = await self.router.prompts.tokenize_chat(
            [m.for_template() for m in body.messages])
        sampling = body.sampling(self.router.max_model_len - len(prompt))
        jobs = fanout.plan(self.router, [prompt], body.n, sampling, "chat")
        return await self._respond(jobs, body.n, model, True, body.stream,
                                   body.include_usage, None)

    def _model(self, model: str | None) -> str:
        """The model a request names (the served one when it names none)."""
        if model is None:
            return self.config.model_name
        self.router.check_model(model)
        return model

    async def _respond(self, jobs: list[fanout.Job], n: int, model: str, chat: bool,
                       stream: bool, usage: bool, echo: list[str] | None,
                       echo_only: bool = False) -> Response:
        """The response to a request's jobs; `echo_only`: only the prompt goes back (the
        token generated to run it is dropped, as vLLM's server does for max_tokens 0)."""
        request_id = jobs[0].prepared.request.request_id
        if stream:
            return self._sse(jobs, n, model, chat, usage, echo, echo_only)
        texts: dict[int, list[str]] = {j.index: [echo[j.prompt_index]] if echo else []
                                       for j in jobs}
        logprobs = self._logprobs(jobs, chat)
        done: list[ChoiceResult] = []
        async for job, event in fanout.run(self.router, jobs, n):
            if echo_only:
                event = replace(event, text="", token_ids=(), logprobs=())
            texts[job.index].append(event.text)
            if logprobs is not None:
                logprobs.add(job.index, event, job.prepared.request.prompt_token_ids)
            if event.timings is not None:
                done.append(ChoiceResult(job.index, job.prompt_index,
                                         "".join(texts[job.index]), event.finish_reason,
                                         event.stop_reason, event.timings,
                                         logprobs.take(job.index) if logprobs else None))
        return JSONResponse(response_body(request_id, model, chat, done),
                            background=BackgroundTask(self._after_response, jobs))

    def _logprobs(self, jobs: list[fanout.Job], chat: bool) -> LogprobsWriter | None:
        top = jobs[0].prepared.request.sampling.logprobs
        if top is None:
            return None
        tokenizer = self.router.tokenizer
        return LogprobsWriter(chat, top, lambda token_id: str(tokenizer.decode(token_id)))

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self._api_key):
            raise APIError(401, "missing or wrong API key (use 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

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

    def _sse(self, jobs: list[fanout.Job], n: int, model: str, chat: bool,
             usage: bool, echo: list[str] | None, echo_only: bool) -> StreamingResponse:
        request_id = jobs[0].prepared.request.request_id
        encoder = StreamEncoder(request_id, model, chat)

        logprobs = self._logprobs(jobs, chat)

        async def events() -> AsyncIterator[str]:
            started: set[int] = set()
            done: list[ChoiceResult] = []
            try:
                async for job, event in fanout.run(self.router, jobs, n):
                    if echo_only:
                        event = replace(event, text="", token_ids=(), logprobs=())
                    first = job.index not in started
                    started.add(job.index)
                    text = echo[job.prompt_index] + event.text if echo and first \
                        else event.text
                    if logprobs is not None:  # this chunk's tokens' (and the prompt's)
                        logprobs.add(job.index, event, job.prepared.request.prompt_token_ids)
                    chunk_logprobs = logprobs.take(job.index) if logprobs else None
                    if event.timings is None:
                        yield encoder.text(job.index, text, first, chunk_logprobs)
                        continue
                    choice = ChoiceResult(job.index, job.prompt_index, text,
                                          event.finish_reason, event.stop_reason,
                                          event.timings, chunk_logprobs)
                    done.append(choice)
                    yield encoder.last(choice, text, first, usage=len(jobs) == 1)
                if usage and done:
                    yield encoder.usage(done)
            except APIError as err:
                yield sse(err.body())
            except Exception:  # noqa: BLE001 - the client gets an error event, not a cut
                logger.exception("stream %s failed", request_id)
                yield sse(internal_error(request_id).body())
            yield sse("[DONE]")

        # a client gone before the first event: Starlette never starts events(), so the
        # bookings its finally would release are released here instead
        return StreamingResponse(events(), media_type="text/event-stream",
                                 background=BackgroundTask(self._after_response, jobs))

    async def _after_response(self, jobs: list[fanout.Job]) -> None:
        """After the response (Starlette's background task): the requests' bookkeeping
        runs (Router.answered); bookings of requests never streamed are released. Async, so
        it runs on the event loop that owns the scheduler's state (a sync one would run in a
        worker thread, a thread started per request)."""
        for job in jobs:
            self.router.answered(job.prepared)
            self.router.discard(job.prepared)
