"""The comparison benchmark's pure parts: summaries, goodput, the report, the targets' configs."""

from __future__ import annotations

import math

import pytest

from benchmarks import rayllm_app
from benchmarks.affinity import parse_core_set
from benchmarks.compare import build_parser, workload
from benchmarks.compare_report import markdown, plots
from benchmarks.cpu_usage import role_of
from benchmarks.loadgen import RequestRecord
from benchmarks.summary import SLO, summarize
from benchmarks.targets import (
    TARGETS,
    EngineSettings,
    SchedulerSettings,
    app_config,
    rayllm_argv,
)
from runtime.app_config import AppConfig


def _record(i: int, prompt_len: int, ttft_ms: float, e2e_ms: float, num_tokens: int = 11,
            error: str = "", mode: str = "local") -> RequestRecord:
    record = RequestRecord(i, prompt_len, num_tokens, scheduled_s=i * 0.1, sent_s=100 + i * 0.1)
    if error:
        record.error = error
        return record
    record.ttft_ms, record.e2e_ms, record.num_output_tokens = ttft_ms, e2e_ms, num_tokens
    phases = {p: 1.0 for p in ("scheduler_queue", "prefill_queue", "prefill_compute",
                               "kv_transfer", "decode_queue", "decode_compute")}
    record.server_timings = {"phases_ms": phases, "mode": mode}
    return record


def test_summary_splits_classes_and_counts_goodput_under_both_slos():
    records = [_record(i, 100, ttft_ms=50.0 + i, e2e_ms=150.0 + i) for i in range(10)]
    records.append(_record(10, 5000, ttft_ms=2000.0, e2e_ms=2100.0, mode="disaggregated"))
    records.append(_record(11, 100, ttft_ms=80.0, e2e_ms=2080.0))  # TPOT 200 ms: misses
    records.append(_record(12, 100, 0, 0, error="HTTP 500"))
    summary = summarize("disagg", 4.0, records, SLO(ttft_ms=1000, tpot_ms=100), 1024)
    short, long_ = summary.classes["short"], summary.classes["long"]
    assert (short.num_requests, short.num_errors, long_.num_requests) == (12, 1, 1)
    assert short.ttft_ms["p50"] == pytest.approx(55.0)  # 50..59 and 80
    assert short.tpot_ms["p99"] == pytest.approx(200.0, rel=0.1)
    assert long_.num_slo_met == 0  # TTFT 2 s > 1 s
    assert summary.classes["all"].num_slo_met == 10
    # the run lasts from the first send to the last finish
    assert summary.duration_s == pytest.approx(1.1 + 2.08)
    assert summary.goodput_per_s == pytest.approx(10 / summary.duration_s)
    assert long_.modes == {"disaggregated": 1} and short.modes == {"local": 11}


def test_report_states_ratios_to_colocated_and_writes_the_plots(tmp_path):
    slo = SLO(1000, 100)
    runs, records = [], {}
    for target, scale in (("disagg", 1.0), ("colocated", 4.0), ("vllm", 2.0)):
        for rate in (2.0, 4.0):
            recs = [_record(i, 100 if i % 5 else 6000, 40.0 * scale, 400.0 * scale)
                    for i in range(20)]
            runs.append(summarize(target, rate, recs, slo, 1024))
            records[(target, rate)] = recs
    text = markdown("t", runs, slo, ["note"])
    assert "## 2 requests/s" in text and "## 4 requests/s" in text
    row = next(line for line in text.splitlines() if line.startswith("| disagg | short"))
    assert "0.25x" in row  # p99 TTFT 40 ms vs colocated's 160 ms
    paths = plots(tmp_path, runs, records, 1024)
    assert [p.name for p in paths] == ["ttft_cdf_short.png", "phases.png",
                                       "p99_ttft_vs_rate.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_targets_get_the_same_engines_and_cores():
    engine = EngineSettings("/m", ("0", "1"), 8448, 32, 2048, 512 << 20)
    scheduler = SchedulerSettings(1024, 1024)
    disagg = AppConfig.model_validate(app_config("disagg", engine, scheduler, 8000))
    colocated = AppConfig.model_validate(app_config("colocated", engine, scheduler, 8000))
    assert disagg.serving == "disaggregated" and colocated.serving == "colocated"
    assert (disagg.prefill.replicas, disagg.decode.replicas) == (1, 1)
    assert disagg.prefill.cpu_cores + disagg.decode.cpu_cores == ["0", "1"]
    assert colocated.decode.replicas == 2 and colocated.decode.cpu_cores == ["0", "1"]
    assert disagg.decode_engine == colocated.decode_engine  # identical engines
    assert colocated.decode_engine.max_num_batched_tokens == 2048
    assert colocated.decode_engine.long_prefill_chunk_tokens == 512  # the app's defaults
    assert colocated.decode_engine.scheduling_policy == "priority"
    # --long-prefill-chunk-tokens / --scheduling-policy reach every engine of our targets
    tuned = SchedulerSettings(1024, 1024, long_prefill_chunk_tokens=0, scheduling_policy="fcfs")
    for name in ("disagg", "colocated"):
        config = AppConfig.model_validate(app_config(name, engine, tuned, 8000))
        assert config.decode_engine.long_prefill_chunk_tokens == 0
        assert config.prefill_engine.scheduling_policy == "fcfs"


def test_rayllm_serves_one_model_with_a_replica_per_engine_and_the_same_engine_args(tmp_path):
    engine = EngineSettings("/m", ("0", "2-3"), 8448, 32, 2048, 512 << 20)
    # 1. the harness's command line carries every engine setting to the app, unchanged
    argv = rayllm_argv(engine, 8123, tmp_path / "ready")
    assert argv[1:3] == ["-m", "benchmarks.rayllm_app"]
    args = rayllm_app.build_parser().parse_args(argv[3:])
    assert rayllm_app.engine_settings(args) == engine
    assert (args.port, args.ready_file) == (8123, tmp_path / "ready")
    # 2. one LLMConfig: model id `tiny`, one replica per core set, on CPU
    (config,) = rayllm_app.serving_args(engine)["llm_configs"]
    assert config["model_loading_config"] == {"model_id": "tiny", "model_source": "/m"}
    assert config["deployment_config"] == {"num_replicas": 2}
    assert config["accelerator_config"] == {"kind": "cpu"}
    assert "experimental_configs" not in config  # Ray Serve LLM's defaults (stream batching)
    # 3. the engine arguments the `vllm` target passes on its command line
    assert config["engine_kwargs"] == {
        "dtype": "float32", "block_size": 128, "max_model_len": 8448, "max_num_seqs": 32,
        "max_num_batched_tokens": 2048, "kv_cache_memory_bytes": 512 << 20,
        "enforce_eager": True}
    # 4. one environment for every replica: no binding by vLLM, one OpenMP thread each (the
    #    harness pins each engine to its own core once up)
    assert config["runtime_env"] == {"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                                  "OMP_NUM_THREADS": "1"}}
    assert rayllm_app.num_logical_cpus(2) == 5  # 2 x (replica actor + engine bundle) + ingress
    assert "rayllm" in TARGETS and build_parser().parse_args([]).targets == list(TARGETS)


def test_core_sets_parse_as_vllm_writes_them():
    assert parse_core_set("3") == {3}
    assert parse_core_set("2-4") == {2, 3, 4}
    assert parse_core_set("0|2-3") == {0, 2, 3}


@pytest.mark.parametrize(("title", "role"), [
    ("ray::ServeReplica:rayllm:LLMServer:tiny", "replica"),
    ("ray::ServeReplica:rayllm:OpenAiIngress", "ingress"),
    ("ray::ServeReplica:bench-disagg:Ingress", "ingress"),
    ("ray::ServeReplica:bench-disagg:DecodeServer", "replica"),
    ("ray::ProxyActor", "proxy"),
    ("ray::ServeController", "serve_ctl"),
    ("VLLM::EngineCore", "engine"),
    ("VLLM::Worker", "engine"),
    ("ray::TelemetryAgent", "ray_system"),
])
def test_processes_of_every_setup_get_their_role(title, role):
    padded = title + " " * 40  # Ray pads its process titles
    assert role_of(title, padded, is_root=False) == role


def test_the_same_seed_gives_every_target_the_same_arrivals():
    args = build_parser().parse_args(["--duration-s", "10"])
    a, b = workload(args, 4.0, seed=1), workload(args, 4.0, seed=1)
    assert a == b and len(a) == 40
    assert not math.isclose(a[0].arrival_s, workload(args, 4.0, seed=2)[0].arrival_s)


def test_bad_options_are_refused_with_the_choices():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--targets", "disagg,sglang"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--rates", "0"])


def test_trace_replay_keeps_the_trace_mix_at_the_asked_rate():
    from pathlib import Path

    traces = Path(__file__).resolve().parents[2] / "benchmarks" / "traces"
    for name in ("azure_sample.csv", "mooncake_sample.jsonl"):
        args = build_parser().parse_args(["--trace", str(traces / name), "--duration-s", "20"])
        requests = workload(args, 4.0, seed=0)
        assert len(requests) == 80
        assert 2.8 < len(requests) / requests[-1].arrival_s < 5.2  # about 4 per second
        assert max(r.prompt_len for r in requests) <= 8192 - 64
        assert any(r.prompt_len >= 1024 for r in requests)  # the trace's long prompts


def test_family_table_states_the_targets_ratios():
    from benchmarks.families import family_table

    def run(target, short_p99, short_p50, goodput, long_p99=float("nan"), cpu=5.0):
        def cls(p50, p99):
            return {"ttft_ms": {"p50": p50, "p90": p99, "p99": p99}, "mean_ttft_ms": p50,
                    "num_requests": 7}
        return {"target": target, "rate_per_s": 2.0, "goodput_per_s": goodput,
                "cpu_ms_per_token": cpu,
                "classes": {"short": cls(short_p50, short_p99), "long": cls(1.0, long_p99)}}

    table = family_table({"summaries": [run("disagg", 100, 50, 1.9, 2200),
                                        run("colocated", 150, 60, 1.9, 2000),
                                        run("vllm", 1000, 50, 2.0, 2100)]})
    row = table[2].split(" | ")
    assert row[2] == "20.0"  # vLLM's p99 is 20x its p50: head-of-line blocking
    assert row[3] == "0.10x" and row[4] == "0.95x"
    assert row[5] == "1.10x (1.00x), n 7"  # the long p99 of 7 requests, and their mean


def test_every_help_text_formats():
    """`--help` of the CLI and of each subcommand prints (argparse %-formats help strings:
    a bare percent sign in a workload's description had made `bench compare --help` crash)."""
    import argparse

    from benchmarks.compare import build_parser as compare_parser
    from runtime.cli import build_parser

    parsers = [compare_parser(), build_parser()]
    while parsers:
        parser = parsers.pop()
        assert parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())


def test_a_terminated_benchmark_stops_what_it_started(tmp_path):
    """SIGTERM runs the `finally` that stops the target, as Ctrl-C does."""
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "stopped"
    code = ("import time\nfrom benchmarks.compare import stop_on_sigterm\nstop_on_sigterm()\n"
            f"try:\n    print('ready', flush=True)\n    time.sleep(60)\n"
            f"finally:\n    open({str(marker)!r}, 'w').write('yes')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert marker.read_text() == "yes" and time.monotonic() - started < 30


def test_idle_cpu_is_per_process_per_second_busiest_first():
    from benchmarks.cpu_usage import CpuSnapshot
    from benchmarks.idle_cpu import per_process

    before = CpuSnapshot({(1, 0.0): 10.0, (2, 0.0): 5.0}, {(1, 0.0): "engine", (2, 0.0): "ingress"})
    after = CpuSnapshot({(1, 0.0): 10.2, (2, 0.0): 5.8, (3, 1.0): 0.4},
                        {(1, 0.0): "engine", (2, 0.0): "ingress", (3, 1.0): "replica"})
    rows = per_process(before, after, 4.0)
    assert [(round(r, 3), role) for r, role, _ in rows] == [
        (0.2, "ingress"), (0.1, "replica"), (0.05, "engine")]  # a new process counts from 0
