"""Clients of the two pools, as the ingress uses them: over the direct connection to the
replica the scheduler chose when one is up (runtime/direct_calls.py), else over Serve handles.

`target` pins the replica the scheduler chose (runtime/routing.py: PinnedReplicaRouter);
without one Serve picks. A generation's tokens come over the ingress's token stream when it
has one (runtime/token_stream.py). A call that fails because its replica did (the actor died,
its engine died, Serve has no replica to run it) raises `ReplicaFailed` naming the replica, so
the router can stop choosing it and retry the request elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from kv_transfer.params import TransferParams
from runtime.direct_calls import CallClient, DirectCalls, RemoteCallError
from runtime.messages import DecodeChunk, PrefillResult
from runtime.requests import GenerateRequest
from runtime.token_stream import TokenInbox, TokenSink, merged

# Exceptions that mean the replica (not the request) failed, by class name anywhere in the
# error's type hierarchy: Ray raises RayTaskError subclasses of the replica's own exception.
_REPLICA_FAILURES = frozenset({
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError",
    "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
    "DeploymentUnavailableError", "BackPressureError",
    "EngineDeadError", "EngineGenerateError",
    "ReplicaConnectionLost", "ReplicaDraining",  # direct calls (runtime/direct_calls.py)
})


MAX_KNOWN_ENDPOINTS = 256


class ReplicaFailed(RuntimeError):
    """A call failed because the replica running it failed."""

    def __init__(self, role: str, replica_id: str, cause: BaseException) -> None:
        super().__init__(f"{role} replica {replica_id or '?'} failed: {type(cause).__name__}")
        self.role = role
        self.replica_id = replica_id


def is_replica_failure(err: BaseException) -> bool:
    names = err.class_names if isinstance(err, RemoteCallError) \
        else (cls.__name__ for cls in type(err).__mro__)
    return any(name in _REPLICA_FAILURES for name in names)


def _direct(direct: DirectCalls | None, target: str) -> CallClient | None:
    return direct.client(target) if direct is not None and target else None


class RemotePrefill:
    """PrefillClient over a Serve handle; also a DecodeClient for degraded mode, where a
    prefill replica serves whole requests (`prefill_local`)."""

    def __init__(self, handle: Any, sink: TokenSink | None = None,
                 direct: DirectCalls | None = None) -> None:
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._sink = sink
        self._direct = direct
        self._endpoints: dict[str, str] = {}  # replica id -> its KV endpoint (fixed for life)

    async def prefill(self, request: GenerateRequest, target: str = "",
                      stream_handle: str = "") -> PrefillResult:
        try:
            client = _direct(self._direct, target)
            result: PrefillResult = await (
                client.call("prefill", request, stream_handle=stream_handle) if client
                else self._handle.prefill.remote(request, target_replica=target,
                                                 stream_handle=stream_handle))
        except Exception as err:
            if is_replica_failure(err):
                raise ReplicaFailed("prefill", target, err) from err
            raise
        return result

    async def kv_endpoint(self, target: str = "") -> str:
        """Where the replica serves its KV blocks: asked once per replica (a call each time
        when Serve picks the replica)."""
        if (known := self._endpoints.get(target)) is not None:
            return known
        client = _direct(self._direct, target)
        endpoint: str = await (client.call("kv_endpoint") if client
                               else self._handle.kv_endpoint.remote(target_replica=target))
        if target:
            if len(self._endpoints) >= MAX_KNOWN_ENDPOINTS:  # replicas come and go
                self._endpoints.clear()
            self._endpoints[target] = endpoint
        return endpoint

    async def release(self, transfer: TransferParams) -> None:
        await self._handle.release.remote(transfer)

    def decode(self, request: GenerateRequest, first_token_id: int | None,
               transfer: TransferParams | None, target: str = "") -> AsyncIterator[DecodeChunk]:
        return _generate(self._stream, _direct(self._direct, target), self._sink, "prefill",
                         request, first_token_id, transfer, target)


class RemoteDecode:
    """DecodeClient over a Serve handle; closing the stream cancels it on the replica."""

    def __init__(self, handle: Any, sink: TokenSink | None = None,
                 direct: DirectCalls | None = None) -> None:
        self._unary = handle
        self._stream = handle.options(stream=True)
        self._sink = sink
        self._direct = direct

    async def prefetch(self, endpoint: str, stream_handle: str, num_tokens: int,
                       target: str = "") -> bool:
        client = _direct(self._direct, target)
        started: bool = await (
            client.call("prefetch", endpoint, stream_handle, num_tokens) if client
            else self._unary.prefetch.remote(endpoint, stream_handle, num_tokens,
                                             target_replica=target))
        return started

    async def cancel_prefetch(self, stream_handle: str, target: str = "") -> None:
        client = _direct(self._direct, target)
        await (client.call("cancel_prefetch", stream_handle) if client
               else self._unary.cancel_prefetch.remote(stream_handle, target_replica=target))

    def decode(self, request: GenerateRequest, first_token_id: int | None,
               transfer: TransferParams | None, target: str = "") -> AsyncIterator[DecodeChunk]:
        return _generate(self._stream, _direct(self._direct, target), self._sink, "decode",
                         request, first_token_id, transfer, target)


async def _generate(handle: Any, client: CallClient | None, sink: TokenSink | None, role: str,
                    request: GenerateRequest, first_token_id: int | None,
                    transfer: TransferParams | None,
                    target: str) -> AsyncIterator[DecodeChunk]:
    inbox = sink.open(request.request_id) if sink is not None else TokenInbox()
    address = sink.address if sink is not None else ""
    # a direct stream is cancelled on the replica when merged() stops reading it
    stream: Any = client.stream("decode", request, first_token_id, transfer, sink=address) \
        if client else handle.decode.remote(request, first_token_id, transfer,
                                            target_replica=target, sink=address)
    try:
        prompt_sent = False
        async for tokens, logprobs, final in merged(inbox, stream):
            # the prompt's logprobs (echo): with the first chunk out after they came
            prompt_logprobs = None if prompt_sent else (
                inbox.prompt_logprobs if final is None or inbox.prompt_logprobs is not None
                else final.prompt_logprobs)
            prompt_sent = prompt_sent or prompt_logprobs is not None
            if final is None:
                yield DecodeChunk(tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
            else:
                yield DecodeChunk(tokens, final.finish_reason, final.timings,
                                  final.stop_reason, logprobs, prompt_logprobs)
    except Exception as err:
        if is_replica_failure(err):
            raise ReplicaFailed(role, target, err) from err
        raise
    finally:
        if sink is not None:
            sink.close(request.request_id)
        if client is None:
            stream.cancel()
