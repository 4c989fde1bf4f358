"""The simulator and planner on small clusters (seconds, no engine)."""

from __future__ import annotations

import pytest

from runtime.cli import main
from runtime.scheduler.sim.cost_model import H100X8, LLAMA3_70B, CostModel
from runtime.scheduler.sim.plan import long_prefill_share, plan, policy_config
from runtime.scheduler.sim.report import summarize
from runtime.scheduler.sim.simulator import ClusterSpec, simulate
from runtime.scheduler.sim.workload import TraceRequest, mixed, read_trace

COST = CostModel(LLAMA3_70B, H100X8)


def test_cost_model_shows_the_quadratic_prefill_wall():
    t32k, t128k = COST.prefill_s(32_768), COST.prefill_s(131_072)
    assert t128k > 4.5 * t32k  # more than linear
    assert COST.decode_step_s(64, 64 * 2000) < COST.decode_step_s(64, 64 * 20_000)
    assert COST.transfer_s(32_768) == pytest.approx(
        32_768 * LLAMA3_70B.kv_bytes_per_token / H100X8.link_bytes_per_s, rel=0.05)


@pytest.mark.parametrize("mode", ["colocated", "static", "policy"])
def test_every_request_is_served_and_times_are_causal(mode):
    trace = mixed(400, rate_per_s=20, long_fraction=0.02, seed=5)
    spec = ClusterSpec(mode, 3, 2, num_long_prefill=1, policy=policy_config(COST, 16384))
    run = simulate(spec, COST, trace)
    assert all(r.arrival <= r.first_token <= r.finish for r in run.reqs)
    summary = summarize(run, 16384, 300, 50)
    assert summary.num_failed == 0 and summary.throughput_rps > 0


def test_a_lone_long_prompt_on_a_colocated_replica_takes_its_prefill_time():
    # every chunk of the prompt is a step, even with no batch decoding beside it
    reqs = simulate(ClusterSpec("colocated", 1, 0), COST, [TraceRequest(0.0, 32_768, 10)]).reqs
    assert reqs[0].first_token >= COST.prefill_s(32_768)
    assert reqs[0].finish > reqs[0].first_token


def test_simulation_is_deterministic():
    trace = mixed(300, rate_per_s=30, seed=6)
    spec = ClusterSpec("policy", 3, 2, num_long_prefill=1, policy=policy_config(COST, 16384))
    first = [(r.first_token, r.finish, r.cost) for r in simulate(spec, COST, trace).reqs]
    assert first == [(r.first_token, r.finish, r.cost) for r in simulate(spec, COST, trace).reqs]


def test_short_requests_do_not_wait_behind_long_prefills_with_the_policy():
    # a steady stream of short chat requests, then a burst of 128K-token prompts
    short = [TraceRequest(0.05 * i, 500, 50) for i in range(200)]
    burst = [TraceRequest(2.0 + 0.01 * i, 131_072, 50) for i in range(6)]
    trace = sorted(short + burst, key=lambda r: r.arrival_s)
    config = policy_config(COST, 16384)

    def short_ttft_p99(mode: str) -> float:
        spec = ClusterSpec(mode, 4, 2, num_long_prefill=2, policy=config)  # type: ignore[arg-type]
        return summarize(simulate(spec, COST, trace), 16384, 300, 50).short_ttft_p99_ms

    without_burst = summarize(simulate(ClusterSpec("policy", 4, 2, 2, policy=config), COST,
                                       short), 16384, 300, 50).short_ttft_p99_ms
    assert short_ttft_p99("policy") < 1.5 * without_burst + 20
    assert short_ttft_p99("static") > 5 * short_ttft_p99("policy")


def test_planner_ranks_by_goodput_and_sizes_the_long_lane():
    trace = mixed(600, rate_per_s=20, long_fraction=0.02, seed=7)
    assert 0 < long_prefill_share(COST, trace, 16384) < 1
    rows = plan(COST, trace, 4, 300, 50)
    goodputs = [row.summary.goodput_rps for row in rows]
    assert goodputs == sorted(goodputs, reverse=True)
    assert {row.mode for row in rows} == {"colocated", "static", "policy"}
    assert len(rows) == 1 + 2 * 3


def test_trace_files_replay(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("timestamp,input,output\n0.5,1000,20\n0.1,200,5\n")
    trace = read_trace(path)
    assert [(r.arrival_s, r.prompt_len) for r in trace] == [(0.1, 200), (0.5, 1000)]


def test_plan_command_recommends_a_split(capsys):
    assert main(["plan", "--replicas", "3", "--requests", "200", "--rate", "10"]) == 0
    out = capsys.readouterr().out
    assert "recommendation:" in out and "goodput/s" in out
