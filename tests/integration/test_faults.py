"""Transfer faults end cleanly: a clear error or a local recompute, within a deadline, and
no blocks held on either side afterwards (checked by the no_leaks fixture)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time

import pytest

from kv_transfer.control_client import release_handle
from kv_transfer.params import TransferParams
from runtime.engines import free_port
from runtime.messages import KVTransferFailed
from runtime.requests import GenerateRequest
from tests.integration.conftest import BLOCK_SIZE, LEASE_S, SEED_OFFSETS
from tests.integration.faults import CuttingProxy
from tests.integration.helpers import colocated_tokens, greedy, make_prompt
from tests.integration.nccl_peer import FakeNcclProducer

_ids = itertools.count()
FAULT_DEADLINE_S = 15.0


def _request(length: int, seed: int, max_tokens: int = 5) -> GenerateRequest:
    return GenerateRequest(f"fault-{next(_ids)}", make_prompt(length, seed), greedy(max_tokens))


async def _decode_all(cluster, request, first, transfer, policy, channel="tcp"):
    tokens = [first.first_token_id]
    timings = None
    decoder = cluster.decoders[channel]
    async for chunk in decoder.decode(request, first.first_token_id, transfer, policy):
        tokens.extend(chunk.token_ids)
        timings = chunk.timings or timings
    return tuple(tokens), timings


def _run_fault(cluster, request, tamper, policy, channel="tcp"):
    """Prefill, tamper with the transfer, decode; always free the real lease afterwards."""

    async def run():
        first = await cluster.prefill.prefill(request)
        assert first.transfer is not None
        try:
            return await asyncio.wait_for(
                _decode_all(cluster, request, first, tamper(first.transfer), policy, channel),
                FAULT_DEADLINE_S,
            )
        finally:
            await asyncio.to_thread(release_handle, first.transfer,
                                    cluster.transfer.auth_token.get_secret_value())

    return cluster.runner.run(run())


def _expected(cluster, request):
    return cluster.runner.run(colocated_tokens(
        cluster.oracle, f"oracle-{request.request_id}", request.prompt_token_ids,
        request.sampling,
    ))


def _unreachable(transfer):
    return dataclasses.replace(transfer, endpoint=f"127.0.0.1:{free_port()}")


def _unknown_handle(transfer):
    return dataclasses.replace(transfer, handle="not-a-handle-" + "x" * 20)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [(_unreachable, "unreachable"), (_unknown_handle, "does not know the transfer handle")],
)
def test_fault_fails_with_a_clear_error(cluster, channel, tamper, message):
    request = _request(700, seed=1)
    start = time.monotonic()
    with pytest.raises(KVTransferFailed, match=message):
        _run_fault(cluster, request, tamper, "fail", channel)
    assert time.monotonic() - start < FAULT_DEADLINE_S


@pytest.mark.parametrize("tamper", [_unreachable, _unknown_handle])
def test_fault_recomputes_locally_when_configured(cluster, tamper):
    request = _request(700, seed=2)
    tokens, timings = _run_fault(cluster, request, tamper, "recompute")
    assert tokens == _expected(cluster, request)
    assert timings.transfer_error
    assert timings.num_loaded_tokens == 0
    assert timings.num_computed_prompt_tokens > 1


def test_expired_lease_frees_blocks_and_fails_the_pull(cluster):
    request = _request(500, seed=3)

    async def run():
        first = await cluster.prefill.prefill(request)
        assert (await cluster.prefill.kv_stats()).num_leases == 1
        await asyncio.sleep(LEASE_S + 1.5)
        # 1. the idle producer freed the blocks on its own
        assert (await cluster.prefill.kv_stats()).num_leases == 0
        # 2. a late consumer gets a clear error
        return await _decode_all(cluster, request, first, first.transfer, "fail")

    with pytest.raises(KVTransferFailed, match="no longer valid: lease expired"):
        cluster.runner.run(run())


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_stream_cut_midway(cluster, policy):
    """On the gRPC data channel (the bulk TCP channel's cut is covered by the transport's unit
    tests: its data port is not behind the gRPC endpoint this proxy stands in for)."""
    request = _request(3000, seed=4)
    proxies: list[CuttingProxy] = []

    def through_cutting_proxy(transfer):
        proxies.append(CuttingProxy(transfer.endpoint, cut_after_bytes=2 << 20))
        return dataclasses.replace(transfer, endpoint=proxies[0].endpoint)

    try:
        if policy == "fail":
            with pytest.raises(KVTransferFailed, match="producer|transfer"):
                _run_fault(cluster, request, through_cutting_proxy, policy, "grpc")
        else:
            tokens, timings = _run_fault(cluster, request, through_cutting_proxy, policy, "grpc")
            assert tokens == _expected(cluster, request)
            assert timings.transfer_error
        assert proxies[0].num_cuts >= 1
    finally:
        for proxy in proxies:
            proxy.close()


def test_next_request_after_faults_is_exact(cluster, channel):
    request = _request(900, seed=5 + SEED_OFFSETS[channel], max_tokens=7)
    completion = cluster.runner.run(cluster.pipeline(channel).generate(request))
    assert completion.token_ids == _expected(cluster, request)
    assert completion.timings.num_loaded_tokens == 900


@pytest.mark.parametrize("num_events_before_leaving", [0, 1, 2])
def test_client_gone_at_any_stage_leaks_nothing(cluster, channel, num_events_before_leaving):
    """A client that leaves during prefill (0 events), after the first token but before decode
    (1), or while decode streams (2): every block comes back, no lease waits for its expiry
    (checked by the no_leaks fixture, which waits less than a lease lasts)."""
    # a prompt no engine has cached, so the prefill takes long enough to be cancelled in
    seed = 20 + num_events_before_leaving + SEED_OFFSETS[channel]
    request = _request(3000, seed=seed, max_tokens=40)
    pipeline = cluster.pipeline(channel)

    async def leave_early() -> None:
        stream = pipeline.stream(request)
        if num_events_before_leaving == 0:
            task = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0.02)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        else:
            for _ in range(num_events_before_leaving):
                await stream.__anext__()
        await stream.aclose()

    start = time.monotonic()
    cluster.runner.run(leave_early())
    produced = cluster.runner.run(cluster.prefill.kv_stats())
    deadline = time.monotonic() + LEASE_S / 2
    while produced.num_leases and time.monotonic() < deadline:
        time.sleep(0.05)
        produced = cluster.runner.run(cluster.prefill.kv_stats())
    assert produced.num_leases == 0, "a lease waited for its expiry"
    assert time.monotonic() - start < LEASE_S


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_nccl_peer_dies_mid_transfer_then_restarts(cluster, tiny_model, policy):
    """The nccl (gloo) path against a producer process that crashes after its first chunk:
    1. the decode request fails with a clear error, or recomputes to the oracle's tokens,
       within the deadline; 2. the same endpoint, restarted, serves the next pull over a fresh
       group; 3. nothing leaks (no_leaks fixture; the restarted producer's lease is released).
    The stand-in serves synthetic blocks, so only the first request's tokens are checked."""
    port = free_port()
    token = cluster.transfer.auth_token.get_secret_value()
    request = _request(3000, seed=40 + (policy == "fail"))
    num_blocks = -(-3000 // BLOCK_SIZE)
    dying = FakeNcclProducer(port, token, tiny_model, BLOCK_SIZE, die_after_chunks=1)

    def to_dying_peer(transfer):
        dying.grant(transfer.handle, list(range(num_blocks)))
        return dataclasses.replace(transfer, endpoint=dying.endpoint,
                                   block_ids=tuple(range(num_blocks)))

    try:
        start = time.monotonic()
        if policy == "fail":
            with pytest.raises(KVTransferFailed, match="transfer|producer|group"):
                _run_fault(cluster, request, to_dying_peer, policy, "nccl")
        else:
            tokens, timings = _run_fault(cluster, request, to_dying_peer, policy, "nccl")
            assert tokens == _expected(cluster, request)
            assert timings.transfer_error
        assert time.monotonic() - start < FAULT_DEADLINE_S
        dying.process.join(5)
        assert not dying.process.is_alive(), "the stand-in producer did not die mid-transfer"
    finally:
        dying.stop()

    restarted = FakeNcclProducer(port, token, tiny_model, BLOCK_SIZE)
    try:
        prompt = make_prompt(500, seed=42 + (policy == "fail"))
        handle = f"restart-{policy}-" + "x" * 20
        restarted.grant(handle, [0, 1, 2, 3])
        transfer = TransferParams(restarted.endpoint, handle, (0, 1, 2, 3), 500, BLOCK_SIZE,
                                  30.0)
        after = GenerateRequest(f"fault-{next(_ids)}", prompt, greedy(3))
        tokens, timings = _until_reachable(cluster, after, transfer)
        assert timings.transfer_error == "" and timings.num_loaded_tokens == 500
        assert restarted.num_leases() == 0, "the consumer did not release the restarted lease"
    finally:
        restarted.stop()


def _until_reachable(cluster, request, transfer, wait_s=10.0):
    """gRPC redials a restarted endpoint after its reconnect backoff (about a second)."""
    deadline = time.monotonic() + wait_s
    attempt = 0
    while True:
        retry = dataclasses.replace(request, request_id=f"{request.request_id}-{attempt}")
        first = _FirstToken(request.prompt_token_ids[-1])
        try:
            return cluster.runner.run(_decode_all(cluster, retry, first, transfer, "fail", "nccl"))
        except KVTransferFailed as err:
            if "unreachable" not in str(err) or time.monotonic() > deadline:
                raise
            attempt += 1
            time.sleep(0.5)


@dataclasses.dataclass(frozen=True)
class _FirstToken:
    first_token_id: int
