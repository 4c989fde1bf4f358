"""Cost per simulated request: the live runtime's StepLedger accounting, in the simulator and
in `disagg plan` (seconds, no engine)."""

from __future__ import annotations

import math

import pytest

from runtime.cli import build_parser, main
from runtime.scheduler.sim.accounting import BLOCK_SIZE
from runtime.scheduler.sim.cost_model import H100X8, LLAMA3_70B, CostModel
from runtime.scheduler.sim.plan import policy_config
from runtime.scheduler.sim.report import summarize
from runtime.scheduler.sim.simulator import ClusterSpec, SimRun, simulate
from runtime.scheduler.sim.workload import TraceRequest, mixed

COST = CostModel(LLAMA3_70B, H100X8)
CONFIG = policy_config(COST, 16384)


def _spec(mode: str, **prices: float) -> ClusterSpec:
    return ClusterSpec(mode, 3, 2, num_long_prefill=1, policy=CONFIG,  # type: ignore[arg-type]
                       **prices)


def _shares_by_replica(run: SimRun) -> dict[str, float]:
    """Each replica's engine-seconds, from the requests' own costs and where they ran."""
    shares = dict.fromkeys((replica.name for replica in run.replicas), 0.0)
    for req in run.reqs:
        if req.finish < 0:
            continue
        if req.local:
            pool = "c" if any(name.startswith("c") for name in shares) else "d"
            shares[f"{pool}{req.decode_id}"] += req.cost.engine_s
        else:
            shares[f"p{req.prefill_id}"] += req.cost.prefill_engine_s
            shares[f"d{req.decode_id}"] += req.cost.decode_engine_s
    return shares


@pytest.mark.parametrize("mode", ["colocated", "static", "policy"])
def test_requests_shares_and_idle_add_up_to_every_replicas_time(mode):
    run = simulate(_spec(mode), COST, mixed(300, rate_per_s=15, long_fraction=0.03, seed=3))
    shares = _shares_by_replica(run)
    for replica in run.replicas:
        usage = replica.usage
        assert usage.busy_s > 0, f"{replica.name} never ran a step"
        assert shares[replica.name] + usage.unattributed_s == pytest.approx(usage.busy_s,
                                                                           rel=1e-9)
        assert usage.busy_s + usage.idle_s == pytest.approx(run.wall_s, rel=1e-12)
    cost = summarize(run, 16384, 300, 50).cost
    assert cost.total.engine_s + cost.unattributed_s + cost.idle_s == pytest.approx(
        len(run.replicas) * run.wall_s, rel=1e-9)
    assert 0 < cost.idle_fraction < 1
    if mode != "colocated":
        assert cost.total.bytes_moved > 0 and cost.total.prefill_kv_block_s > 0


def test_a_lone_request_costs_its_own_steps_lease_and_bytes():
    """1. a 1,000-token prompt is one prefill step on p0; 2. its KV moves to d0; 3. two decode
    steps there make its 2nd and 3rd tokens. Alone, it takes every step's whole time."""
    run = simulate(_spec("static"), COST, [TraceRequest(0.0, 1000, 3)])
    (req,) = run.reqs
    blocks = math.ceil(1000 / BLOCK_SIZE)
    joined_s = req.first_token + COST.transfer_s(1000)
    assert req.cost.prefill_engine_s == pytest.approx(COST.prefill_s(1000))
    assert req.cost.decode_engine_s == pytest.approx(req.finish - joined_s)
    assert req.cost.prefill_kv_block_s == pytest.approx(
        blocks * (COST.prefill_s(1000) + COST.transfer_s(1000)))  # computed, then leased
    step_s = (req.finish - joined_s) / 2
    assert req.cost.decode_kv_block_s == pytest.approx(
        blocks * COST.transfer_s(1000) + (1001 + 1002) * step_s / BLOCK_SIZE)
    assert req.cost.bytes_moved == blocks * BLOCK_SIZE * LLAMA3_70B.kv_bytes_per_token
    assert req.cost.dollars == 0.0, "no price: engine-seconds only"
    idle = {replica.name: replica.usage.idle_s for replica in run.replicas}
    assert idle["p0"] == pytest.approx(run.wall_s - COST.prefill_s(1000))
    assert idle["p1"] == idle["p2"] == run.wall_s


def test_a_long_prompt_costs_more_prefill_per_token():
    # one at a time, so no step is shared: the per-token cost is the prompt's own
    trace = [TraceRequest(0.0, 1000, 20), TraceRequest(10.0, 65_536, 20)]
    run = simulate(_spec("policy"), COST, trace)
    short, long_ = run.reqs
    assert long_.cost.prefill_engine_s / 65_536 > 1.3 * short.cost.prefill_engine_s / 1000
    bands = {band.name: band for band in summarize(run, 16384, 300, 50).cost.bands}
    assert bands[">=16384"].prefill_engine_s_per_1k_prompt_tokens > \
        1.3 * bands["<16384"].prefill_engine_s_per_1k_prompt_tokens


def test_each_pool_prices_its_own_engine_seconds():
    trace = mixed(200, rate_per_s=15, long_fraction=0.03, seed=4)
    once = simulate(_spec("policy", prefill_cost_per_replica_hour=36.0,
                          decode_cost_per_replica_hour=72.0), COST, trace)
    twice = simulate(_spec("policy", prefill_cost_per_replica_hour=72.0,
                           decode_cost_per_replica_hour=144.0), COST, trace)
    for a, b in zip(once.reqs, twice.reqs, strict=True):
        assert b.cost.dollars == pytest.approx(2 * a.cost.dollars)
        assert b.cost.engine_s == a.cost.engine_s
        prefill_price = 72.0 if a.local else 36.0  # local mode prefills on a decode replica
        assert a.cost.dollars == pytest.approx(
            (a.cost.prefill_engine_s * prefill_price + a.cost.decode_engine_s * 72.0) / 3600)
    cost_once, cost_twice = (summarize(run, 16384, 300, 50).cost for run in (once, twice))
    assert cost_once.per_1k_output_tokens.dollars > 0
    assert cost_twice.per_1k_output_tokens.dollars == pytest.approx(
        2 * cost_once.per_1k_output_tokens.dollars)
    assert cost_once.idle_dollars > 0
    assert cost_twice.idle_dollars == pytest.approx(2 * cost_once.idle_dollars)


def _table(out: str) -> list[list[str]]:
    lines = out[out.index("mode "):out.index("recommendation:")].strip().splitlines()
    return [line.split() for line in lines]


def test_plan_ranks_splits_with_their_cost_per_request(capsys):
    args = ["plan", "--replicas", "3", "--requests", "200", "--rate", "10"]
    assert main([*args, "--prefill-cost-per-replica-hour", "30",
                 "--decode-cost-per-replica-hour", "30"]) == 0
    out = capsys.readouterr().out
    header, *rows = _table(out)
    assert header[-6:] == ["eng-s/req", "P+D", "eng-s/1K", "$/req", "$/1K", "idle"]
    assert len(rows) == 5  # colocated, static and policy at 1:2 and 2:1
    for row in rows:
        prefill_s, decode_s = map(float, row[-5].split("+"))
        per_1k_s, per_request_dollars, per_1k_dollars = map(float, row[-4:-1])
        assert prefill_s > 0 and decode_s > 0
        assert per_request_dollars == pytest.approx((prefill_s + decode_s) * 30 / 3600,
                                                    abs=1e-4)
        assert per_1k_dollars == pytest.approx(per_1k_s * 30 / 3600, abs=1e-4)
        assert 0 <= float(row[-1].rstrip("%")) < 100
    assert "<16384 tokens:" in out and "engine-s per 1K prompt tokens" in out
    assert main(args) == 0
    header, *_ = _table(capsys.readouterr().out)
    assert "$/req" not in header and header[-1] == "idle", "no price: engine-seconds only"


def test_plan_help_explains_the_cost_columns_and_refuses_negative_prices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for column in ("'eng-s/req P+D'", "'eng-s/1K'", "'$/req'", "'$/1K'", "'idle'"):
        assert column in text
    with pytest.raises(SystemExit) as exited:
        main(["plan", "--decode-cost-per-replica-hour", "-1"])
    assert exited.value.code == 2


def test_the_simulated_replicas_decode_step_model_follows_the_cost_model():
    """The simulator gives the policy each replica's decode step as a live replica would fit
    it: within 5% of the cost model's own step time from 4 to 64 sequences."""
    step = COST.decode_step_model(context_tokens=2048)
    assert step.s0_ms > 0 and step.s1_ms > 0
    for batch in (4, 16, 64):
        actual_ms = 1e3 * COST.decode_step_s(batch, batch * 2048)
        assert step.step_ms(batch) == pytest.approx(actual_ms, rel=0.05)
