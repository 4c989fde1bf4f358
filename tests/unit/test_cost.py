"""Cost per request: engine steps divided among their requests, blocks held, prices."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from runtime.app_config import AppConfig, PoolConfig
from runtime.cost import EngineUsage, RequestCost, StepLedger, dollars
from runtime.cost_tracker import MAX_STEP_PERIOD_S, CostTracker, StepCounts


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


@pytest.mark.parametrize("num_decoding", [1, 2, 7, 64])
def test_a_step_with_k_sequences_is_shared_out_exactly(num_decoding):
    ledger = StepLedger()
    decoding = [f"d{i}" for i in range(num_decoding)]
    shares = ledger.record_step(0.0137, {"p0": 300, "p1": 45}, decoding)
    assert math.isclose(sum(shares.values()), 0.0137, rel_tol=1e-12)
    assert ledger.attributed_s == ledger.busy_s == 0.0137
    assert len({shares[d] for d in decoding}) == 1, "decoding sequences share equally"


def test_prefill_shares_go_by_scheduled_prompt_tokens():
    ledger = StepLedger()
    shares = ledger.record_step(1.0, {"long": 300, "short": 100}, [])
    assert shares == pytest.approx({"long": 0.75, "short": 0.25})
    # a decoding sequence weighs as its one token
    shares = ledger.record_step(1.0, {"p": 9}, ["d"])
    assert shares == pytest.approx({"p": 0.9, "d": 0.1})


def test_tokens_of_unknown_requests_are_busy_but_unattributed():
    ledger = StepLedger()
    shares = ledger.record_step(2.0, {"p": 50}, ["d"], num_other_tokens=49)
    assert math.isclose(sum(shares.values()) + 2.0 * 49 / 100, 2.0)
    assert ledger.busy_s == 2.0 and ledger.attributed_s == pytest.approx(1.02)
    ledger.record_step(0.5, {}, [])  # a step with nothing scheduled: busy, nobody's
    assert ledger.busy_s == 2.5


def test_shares_accumulate_over_steps_by_phase():
    ledger = StepLedger()
    ledger.record_step(0.4, {"a": 100}, [])
    ledger.record_step(0.2, {"b": 100}, ["a"])
    ledger.record_step(0.1, {}, ["a", "b"])
    ledger.hold_blocks(2.0, {"a": 3}, "prefill")
    ledger.hold_blocks(1.0, {"a": 4, "b": 1}, "decode")
    a = ledger.close("a")
    assert a.prefill_engine_s == pytest.approx(0.4)
    assert a.decode_engine_s == pytest.approx(0.2 / 101 + 0.05)
    assert (a.prefill_kv_block_s, a.decode_kv_block_s) == (6.0, 4.0)
    b = ledger.close("b")
    assert b.prefill_engine_s == pytest.approx(0.2 * 100 / 101)
    assert a.engine_s + b.engine_s == pytest.approx(0.7)
    assert ledger.num_open == 0 and ledger.close("a") == RequestCost(), "closed means forgotten"


def test_price_per_replica_hour_turns_engine_seconds_into_dollars():
    assert dollars(3600.0, 2.5) == 2.5
    assert dollars(1.8, 2.0) == pytest.approx(0.001)
    cost = RequestCost(prefill_engine_s=1.0, decode_engine_s=0.8, prefill_kv_block_s=9.0)
    assert cost.priced(2.0).dollars == pytest.approx(0.001)
    assert cost.priced(0.0).dollars == 0.0, "no price: seconds only"
    # each pool prices its own seconds; the request's costs add up
    total = RequestCost(prefill_engine_s=1.8).priced(2.0) + RequestCost(
        decode_engine_s=3.6, bytes_moved=10).priced(1.0)
    assert total.dollars == pytest.approx(0.002) and total.engine_s == pytest.approx(5.4)
    assert total.bytes_moved == 10


def test_cost_per_replica_hour_is_validated_per_pool():
    assert PoolConfig().cost_per_replica_hour == 0.0
    config = AppConfig.model_validate({"engine": {"model": "m"},
                                       "prefill": {"cost_per_replica_hour": 4.0},
                                       "decode": {"cost_per_replica_hour": 1.5}})
    assert (config.prefill.cost_per_replica_hour, config.decode.cost_per_replica_hour) == (4, 1.5)
    with pytest.raises(ValidationError, match="cost_per_replica_hour"):
        PoolConfig(cost_per_replica_hour=-1.0)
    with pytest.raises(ValidationError, match="cost_per_replica_hours"):
        PoolConfig.model_validate({"cost_per_replica_hours": 1.0})


def test_engine_usage_reports_idle_capacity_apart():
    usage = EngineUsage(busy_s=3.0, wall_s=10.0, attributed_s=2.5)
    assert (usage.idle_s, usage.unattributed_s, usage.busy_fraction) == (7.0, 0.5, 0.3)


def test_untimed_steps_take_their_period_from_the_replicas_clock():
    """With the model in the engine core ("uni" executor) vLLM's step timer covers only the
    sampling: a step then lasts from the previous step's output, or from when work came to
    an idle engine (the idle time before is no step's), at most MAX_STEP_PERIOD_S."""
    clock = FakeClock()
    tracker = CostTracker(block_size=16, clock=clock)
    clock.now_s += 5.0  # idle
    tracker.begin("a", 40)
    clock.now_s += 0.2
    tracker.on_step(StepCounts(None, num_prefill_requests=1, num_prefill_tokens=40,
                               num_decode_requests=0))
    clock.now_s += 0.05
    tracker.on_step(StepCounts(None, 0, 0, num_decode_requests=1))
    a = tracker.end("a")
    assert (a.prefill_engine_s, a.decode_engine_s) == (pytest.approx(0.2), pytest.approx(0.05))
    clock.now_s += 9.0  # idle again
    tracker.begin("b", 10)
    clock.now_s += 0.1
    tracker.on_step(StepCounts(None, 1, 10, 0))
    assert tracker.end("b").prefill_engine_s == pytest.approx(0.1)
    clock.now_s += 30.0  # a step of nobody's, 30 s after the last output
    tracker.on_step(StepCounts(None, 1, 10, 0))
    assert tracker.usage().busy_s == pytest.approx(0.35 + MAX_STEP_PERIOD_S)


def test_tracker_follows_requests_through_prefill_and_decode():
    """1. a prompt of 40 tokens is chunked over two steps with another request's prompt;
    2. both decode; 3. each request's cost is its shares, and nothing is left open."""
    clock = FakeClock()
    tracker = CostTracker(block_size=16, cost_per_replica_hour=36.0, clock=clock)
    tracker.begin("a", 40)
    tracker.begin("b", 10)
    clock.now_s += 0.1
    tracker.on_step(StepCounts(0.1, num_prefill_requests=1, num_prefill_tokens=32,
                               num_decode_requests=0))
    clock.now_s += 0.1
    tracker.on_step(StepCounts(0.1, num_prefill_requests=2, num_prefill_tokens=18,
                               num_decode_requests=0))
    for _ in range(3):
        clock.now_s += 0.05
        tracker.on_step(StepCounts(0.05, 0, 0, num_decode_requests=2))
    a, b = tracker.end("a"), tracker.end("b")
    assert a.prefill_engine_s == pytest.approx(0.1 + 0.1 * 8 / 18)
    assert b.prefill_engine_s == pytest.approx(0.1 * 10 / 18)
    assert a.decode_engine_s == b.decode_engine_s == pytest.approx(0.075)
    assert a.engine_s + b.engine_s == pytest.approx(tracker.usage().busy_s)
    assert a.dollars == pytest.approx(a.engine_s / 100)
    # a holds 2 blocks for its first step, 3 (40 tokens) for the second, then 3 decoding
    assert a.prefill_kv_block_s == pytest.approx(0.2 + 0.3)
    assert a.decode_kv_block_s == pytest.approx(0.15 * 3)  # 41 to 43 tokens: 3 blocks
    assert tracker.ledger.num_open == 0


def test_tracker_leaves_steps_of_unknown_requests_unattributed():
    clock = FakeClock()
    tracker = CostTracker(block_size=16, clock=clock)
    tracker.on_step(StepCounts(0.5, 1, 100, 0))  # e.g. the replica's calibration prompt
    tracker.begin("a", 20)
    tracker.on_step(StepCounts(0.2, 2, 120, 0))  # a's 20 tokens and 100 of someone else's
    usage = tracker.usage()
    assert usage.busy_s == pytest.approx(0.7)
    assert usage.attributed_s == pytest.approx(0.2 * 20 / 120)
    assert tracker.end("a").prefill_engine_s == pytest.approx(usage.attributed_s)


def test_a_first_token_seen_corrects_the_estimate():
    """A prefix-cache hit computes less than the prompt: once the replica sees the first
    token, the request decodes, whatever the estimate said."""
    tracker = CostTracker(block_size=16, clock=FakeClock())
    tracker.begin("a", 100)
    tracker.on_step(StepCounts(0.1, 1, 36, 0))  # 64 tokens were cached
    tracker.first_token("a")
    tracker.on_step(StepCounts(0.02, 0, 0, 1))
    cost = tracker.end("a")
    assert (cost.prefill_engine_s, cost.decode_engine_s) == pytest.approx((0.1, 0.02))


def test_a_request_loading_its_kv_holds_blocks_but_takes_no_prompt_tokens():
    clock = FakeClock()
    tracker = CostTracker(block_size=16, clock=clock)
    tracker.begin("remote", 64, loads_kv=True)
    tracker.begin("local", 32)
    clock.now_s += 1.0
    tracker.on_step(StepCounts(0.3, 1, 32, 0))  # the local prompt, while remote's KV loads
    tracker.first_token("remote")
    clock.now_s += 0.1
    tracker.on_step(StepCounts(0.1, 0, 0, 2))
    remote, local = tracker.end("remote"), tracker.end("local")
    assert remote.prefill_engine_s == 0.0 and local.prefill_engine_s == pytest.approx(0.3)
    assert remote.decode_engine_s == local.decode_engine_s == pytest.approx(0.05)
    assert remote.decode_kv_block_s == pytest.approx(4 * 1.0 + 5 * 0.1)
    assert remote.prefill_kv_block_s == 0.0


def _prefill_result(cost: RequestCost, num_blocks: int):
    from kv_transfer.params import TransferParams
    from runtime.messages import PrefillResult, PrefillTimings

    transfer = TransferParams("h:1", "x" * 32, tuple(range(num_blocks)), num_blocks * 16, 16,
                              30.0)
    return PrefillResult("r", 7, None, transfer, num_blocks * 16, 0,
                         PrefillTimings(1.0, 2.0, 3.0), cost=cost)


def test_a_handed_off_request_costs_both_engines_the_lease_and_the_bytes():
    from runtime.messages import DecodeTimings
    from runtime.pipeline import handoff_cost

    first = _prefill_result(RequestCost(prefill_engine_s=0.5, prefill_kv_block_s=1.0,
                                        dollars=0.25), num_blocks=4)
    decode = DecodeTimings(queue_ms=100.0, transfer_ms=40.0, transfer_bytes=4096,
                           first_token_ms=200.0, decode_ms=300.0, num_loaded_tokens=64,
                           num_computed_prompt_tokens=1, transfer_error="",
                           transfer_exposed_ms=50.0,
                           cost=RequestCost(decode_engine_s=0.2, decode_kv_block_s=2.0,
                                            dollars=0.5))
    cost = handoff_cost(first, decode)
    assert (cost.prefill_engine_s, cost.decode_engine_s) == (0.5, 0.2)
    assert cost.prefill_kv_block_s == pytest.approx(1.0 + 4 * 0.15), "4 blocks leased 150 ms"
    assert (cost.decode_kv_block_s, cost.bytes_moved, cost.dollars) == (2.0, 4096, 0.75)
    assert handoff_cost(first, None) == first.cost, "ended at its first token: prefill only"


def test_cost_reaches_usage_metrics_and_grpc():
    from protos import inference_pb2 as pb
    from runtime.grpc_api import cost_message
    from runtime.messages import PhaseTimings
    from runtime.metrics import Metrics
    from runtime.openai_api import ChoiceResult, usage_body

    cost = RequestCost(prefill_engine_s=0.5, decode_engine_s=0.25, bytes_moved=10,
                       dollars=0.125)
    timings = PhaseTimings(0, 0, 0, 0, 10, 0, 0, 1, 1, 2, 8, 4, 0, 0, lane="long",
                           mode="disaggregated", cost=cost)
    choices = [ChoiceResult(i, 0, "t", "length", None, timings) for i in range(2)]
    usage = usage_body(choices)
    assert usage["cost"]["prefill_engine_s"] == 1.0 and usage["cost"]["dollars"] == 0.25
    metrics = Metrics()
    metrics.record(timings)
    metrics.record_usage("decode", "r1", EngineUsage(busy_s=2.0, wall_s=8.0, attributed_s=1.5))
    text = metrics.render().decode()
    assert 'disagg_cost_engine_seconds_total{lane="long",mode="disaggregated",phase="prefill"}' \
        ' 0.5' in text
    assert 'disagg_cost_dollars_total{lane="long",mode="disaggregated"} 0.125' in text
    assert 'disagg_engine_busy_fraction{pool="decode",replica="r1"} 0.25' in text
    assert 'disagg_engine_unattributed_seconds{pool="decode",replica="r1"} 0.5' in text
    wire = pb.Timings(cost=cost_message(cost))
    assert pb.Timings.FromString(wire.SerializeToString()).cost.dollars == 0.125


def test_bench_reports_cost_per_1000_output_tokens(tmp_path):
    from benchmarks.compare_report import markdown, plots
    from benchmarks.loadgen import RequestRecord
    from benchmarks.summary import PHASES, SLO, summarize

    records = []
    for i in range(4):
        record = RequestRecord(i, 100, 250, scheduled_s=0.0, sent_s=1.0 + i)
        record.ttft_ms, record.e2e_ms, record.num_output_tokens = 10.0, 100.0, 250
        cost = {"prefill_engine_s": 0.1, "decode_engine_s": 0.4, "prefill_kv_block_s": 1.0,
                "decode_kv_block_s": 2.0, "bytes_moved": 0, "dollars": 0.002}
        phases = dict.fromkeys(PHASES, 1.0)
        record.server_timings = {"phases_ms": phases, "mode": "local", "cost": cost}
        records.append(record)
    summary = summarize("disagg", 1.0, records, SLO(1000, 100), 1024, engine_busy_s=2.5)
    assert summary.cost_per_1k_tokens["decode_engine_s"] == pytest.approx(1.6)  # 4 x 0.4 / 1k
    assert summary.cost_coverage == pytest.approx(0.8)  # 4 x 0.5 engine-s of 2.5 s busy
    assert "busy time over the run (server-reported): disagg 80.0%." in markdown(
        "t", [summary], SLO(1, 1), [])
    assert summary.cost_per_1k_tokens["dollars"] == pytest.approx(0.008)
    assert "| disagg | 0.4 | 1.6 | 4 | 8 | 0.008 |" in markdown("t", [summary], SLO(1, 1), [])
    paths = plots(tmp_path, [summary], {("disagg", 1.0): records}, 1024)
    assert paths[-1].name == "cost_vs_prompt.png" and paths[-1].stat().st_size > 1000
    records[0].server_timings = None  # a target that reports no cost (plain vLLM)
    assert summarize("vllm", 1.0, records, SLO(1000, 100), 1024).cost_per_1k_tokens == {}


def test_prompt_tokens_split_evenly_as_vllm_caps_each_prefill_per_step():
    """Three prompts scheduled together under a 512-token cap per prefill: the short ones
    take what they need, the long one its cap; started prefills go before waiting ones."""
    tracker = CostTracker(block_size=16, clock=FakeClock(), by_priority=True)
    tracker.begin("short", 60)
    tracker.begin("long", 3000, priority=1)
    tracker.begin("mid", 200)
    tracker.on_step(StepCounts(0.772, 3, 60 + 512 + 200, 0))
    tracker.begin("new", 100)  # waits behind the running long prefill
    tracker.on_step(StepCounts(0.5, 1, 500, 2))
    tracker.first_token("short")
    tracker.first_token("mid")
    costs = {rid: tracker.end(rid) for rid in ("short", "long", "mid", "new")}
    assert costs["short"].prefill_engine_s == pytest.approx(0.06)
    assert costs["mid"].prefill_engine_s == pytest.approx(0.2)
    assert costs["long"].prefill_engine_s == pytest.approx(0.512 + 0.5 * 500 / 502)
    assert costs["new"].prefill_engine_s == 0.0


def test_bench_reads_the_engines_busy_time_from_the_ingress_metrics():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from benchmarks.compare import engines_busy_s

    text = ('# HELP disagg_engine_busy_seconds x\n'
            'disagg_engine_busy_seconds{pool="prefill",replica="a"} 1.5\n'
            'disagg_engine_busy_seconds{pool="decode",replica="b"} 2.25\n'
            'disagg_engine_wall_seconds{pool="decode",replica="b"} 9.0\n')

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = (text if self.path == "/metrics" else "").encode()
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert engines_busy_s([url]) == pytest.approx(3.75)
        text = "vllm:num_requests_running 0\n"  # a server without our metric
        assert engines_busy_s([url]) is None
    finally:
        server.shutdown()
