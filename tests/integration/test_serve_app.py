"""The cluster runtime on a real Ray Serve app with real vLLM CPU engines, used as clients use
it: the official openai client, raw HTTP for bad input, and disconnects mid-stream."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import openai
import psutil
import pytest

from runtime.serve_cli import format_pool_status
from tests.integration.helpers import colocated_text, greedy, make_prompt
from tests.integration.serve_app import API_KEY, MODEL


@pytest.fixture
def client(serve_app):
    return openai.OpenAI(base_url=f"{serve_app}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _text(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _oracle_text(cluster, tokenizer, prompt_ids, max_tokens) -> str:
    return cluster.runner.run(colocated_text(cluster.oracle, f"o-{time.monotonic_ns()}",
                                             tuple(prompt_ids), greedy(max_tokens)))


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.mark.parametrize("length", [20, 1500])
def test_completions_plain_and_streaming_equal_colocated(client, cluster, tokenizer, length):
    prompt = _text(tokenizer, make_prompt(length, seed=500))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expected = _oracle_text(cluster, tokenizer, prompt_ids, 12)

    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
    assert plain.choices[0].text == expected
    assert plain.usage.prompt_tokens == len(prompt_ids) and plain.usage.completion_tokens == 12
    timings = plain.model_extra["timings"]
    assert timings["lane"] == ("long" if len(prompt_ids) >= 1000 else "short")
    if len(prompt_ids) > 256:
        assert timings["mode"] == "disaggregated"
    else:
        assert timings["mode"] in ("local", "disaggregated")
        assert timings["decision_reason"] and timings["predicted_prefill_ms"] > 0
    assert timings["decode_replica"]

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                            stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["timings"]["num_output_tokens"] == 12


def test_chat_plain_and_streaming_equal_colocated(client, cluster, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=False)
    prompt_ids = tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    expected = _oracle_text(cluster, tokenizer, prompt_ids, 9)

    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9,
                                           **GREEDY)
    assert plain.choices[0].message.content == expected
    assert plain.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9,
                                            stream=True, **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert "timings" in chunks[-1].model_extra


def test_timings_are_consistent(client):
    # a prompt no other test sends: blocks of it in the decode engine's prefix cache (the fuzz
    # tests send "x" * 300) would not be pulled, and fewer than 800 tokens loaded
    response = client.completions.create(model=MODEL, prompt="j" * 800, max_tokens=20, **GREEDY)
    t = response.model_extra["timings"]
    assert t["ttft_ms"] >= t["prefill_compute_ms"] > 0
    assert t["e2e_ms"] >= t["ttft_ms"]
    phases = sum(t["phases_ms"].values())
    # The phases are measured on three processes; what they leave out is the hops between
    # them (Ray Serve calls, detokenization): at most 100 ms + 25% of the request here.
    assert phases <= t["e2e_ms"] + 1.0
    assert t["e2e_ms"] - phases <= 100 + 0.25 * t["e2e_ms"], t
    assert t["kv_transfer_bytes"] > 0 and t["num_loaded_tokens"] == 800
    cost = t["cost"]  # each engine's share of its steps, priced at 3.6 and 1.8 per hour
    assert 0 < cost["prefill_engine_s"] <= t["prefill_compute_ms"] / 1e3 + 0.05, t
    assert 0 < cost["decode_engine_s"] <= t["decode_compute_ms"] / 1e3 + 0.05, t
    assert cost["prefill_kv_block_s"] > 0 and cost["decode_kv_block_s"] > 0
    assert cost["bytes_moved"] == t["kv_transfer_bytes"]
    assert cost["dollars"] == pytest.approx(
        (cost["prefill_engine_s"] * 3.6 + cost["decode_engine_s"] * 1.8) / 3600)
    assert response.usage.model_extra["cost"] == cost


def test_metrics_expose_phases_by_lane_and_mode(client, serve_app):
    client.completions.create(model=MODEL, prompt="y" * 1200, max_tokens=3, **GREEDY)
    text = httpx.get(f"{serve_app}/metrics").text
    for phase in ("prefill_compute", "kv_transfer", "decode_queue", "ttft", "tpot", "e2e"):
        assert (f'disagg_phase_seconds_count{{lane="long",mode="disaggregated",'
                f'phase="{phase}"}}') in text
    assert "disagg_kv_transfer_bytes_total" in text and "disagg_tokens_total" in text
    for phase in ("prefill", "decode"):
        assert (f'disagg_cost_engine_seconds_total{{lane="long",mode="disaggregated",'
                f'phase="{phase}"}}') in text
    assert 'disagg_cost_dollars_total{lane="long",mode="disaggregated"}' in text
    deadline = time.monotonic() + 10  # replicas send their busy / wall time every 2 s
    while 'disagg_engine_busy_fraction{pool="decode"' not in text and time.monotonic() < deadline:
        time.sleep(0.5)
        text = httpx.get(f"{serve_app}/metrics").text
    assert 'disagg_engine_busy_fraction{pool="prefill"' in text
    assert 'disagg_engine_busy_fraction{pool="decode"' in text
    usage = _status(serve_app)["decode"]["usage"]  # idle capacity, apart from the requests
    assert 0 < usage["attributed_s"] <= usage["busy_s"] + 1e-6 < usage["wall_s"], usage


def test_models_and_health(client, serve_app):
    assert [m.id for m in client.models.list()] == [MODEL]
    health = httpx.get(f"{serve_app}/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "pools": {"prefill": {"live": 1, "replicas": 1},
                                                       "decode": {"live": 1, "replicas": 1}}}


def _post(serve_app, path, body, key=API_KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(f"{serve_app}{path}", content=raw, headers=headers, timeout=30)
    # json.dumps escapes a lone surrogate as "\\ud800" (httpx's encoder would refuse it)
    return httpx.post(f"{serve_app}{path}", content=json.dumps(body).encode(),
                      headers={**headers, "Content-Type": "application/json"}, timeout=30)


@pytest.mark.parametrize(
    ("body", "raw", "status", "needle"),
    [
        (None, b"{not json", 400, "not valid JSON"),
        (None, b"[1, 2]", 400, "JSON object"),
        ({"model": 5, "prompt": "hi"}, None, 400, "model"),
        ({"model": MODEL, "prompt": 5}, None, 400, "prompt"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, None, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, None, 400, "at least 1"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 20000}, None, 400, "context"),
        ({"model": MODEL, "prompt": "z" * 17000}, None, 400, "context"),
        ({"model": MODEL, "prompt": [1, 99999]}, None, 400, "vocabulary"),
        ({"model": "gpt-9", "prompt": "hi"}, None, 404, "not found"),
        ({"model": MODEL, "prompt": "hi", "logprobs": 25}, None, 400, "logprobs"),
        ({"model": MODEL, "prompt": "hi", "prompt_logprobs": 2}, None, 400, "prompt_logprobs"),
        ({"model": MODEL, "prompt": "hi", "n": 99}, None, 400, "n"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 5}, None, 400,
         "min_tokens"),
        ({"model": MODEL, "prompt": "hi\ud800"}, None, 400, "Unicode"),
        ({"model": MODEL, "prompt": "hi", "temperature": -1}, None, 400, "temperature"),
    ],
)
def test_bad_input_gets_a_clear_error_and_the_server_stays_up(serve_app, body, raw, status,
                                                              needle):
    response = _post(serve_app, "/v1/completions", body, raw=raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"]
    assert httpx.get(f"{serve_app}/health").status_code == 200


def test_bad_chat_input(serve_app):
    # vLLM accepts any role the chat template renders; a message without one is refused
    response = _post(serve_app, "/v1/chat/completions",
                     {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}],
                      "max_tokens": 2})
    assert response.status_code == 200, response.text
    response = _post(serve_app, "/v1/chat/completions",
                     {"model": MODEL, "messages": [{"content": "hi"}]})
    assert response.status_code == 400 and "role" in response.json()["error"]["message"]
    response = _post(serve_app, "/v1/chat/completions", {"model": MODEL, "messages": []})
    assert response.status_code == 400


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_api_key_is_refused(serve_app, key):
    response = _post(serve_app, "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=key)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(f"{serve_app}/v1/models").status_code == 401


def _status(serve_app) -> dict:
    response = httpx.get(f"{serve_app}/v1/disagg/status",
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    return response.json()


def test_client_disconnect_aborts_the_decode_and_frees_the_prefill_blocks(serve_app):
    # 1. a long generation (2,000 tokens: ~10 s if it ran to the end), streamed
    body = {"model": MODEL, "prompt": "q" * 700, "max_tokens": 2000, "stream": True,
            "temperature": 0, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{serve_app}/v1/completions", json=body, headers=headers,
                      timeout=60) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6), strict=False) if line]
        assert any(json.loads(line[6:])["choices"][0]["text"] is not None
                   for line in received if line.startswith("data: {"))
        assert _status(serve_app)["decode"]["load"]["num_running"] == 1
    # 2. the client has gone: the decode replica drops the request within seconds
    deadline = time.monotonic() + 5
    status = _status(serve_app)
    while status["decode"]["load"]["num_running"] and time.monotonic() < deadline:
        time.sleep(0.2)
        status = _status(serve_app)
    assert status["decode"]["load"]["num_running"] == 0, status
    assert status["decode"]["load"]["kv_cache_usage"] == 0.0, status
    assert status["prefill"]["kv"]["num_leases"] == 0, status


def test_scheduler_prefills_short_prompts_locally_and_splits_long_ones(client, serve_app):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # a long prompt keeps the prefill replica busy; a short one sent meanwhile is
        # predicted to start sooner on the (idle) decode replica
        pending = pool.submit(client.completions.create, model=MODEL, prompt="l" * 4000,
                              max_tokens=4, **GREEDY)
        time.sleep(0.1)
        short = client.completions.create(model=MODEL, prompt="s" * 100, max_tokens=4,
                                          **GREEDY)
        long_ = pending.result()
    ts, tl = short.model_extra["timings"], long_.model_extra["timings"]
    assert ts["mode"] == "local", (ts, _status(serve_app)["scheduler"])
    assert ts["mode"] == "local" and ts["kv_transfer_bytes"] == 0 and not ts["prefill_replica"]
    assert ts["num_decode_computed_prompt_tokens"] >= 1
    assert tl["mode"] == "disaggregated" and tl["lane"] == "long" and tl["kv_transfer_bytes"] > 0
    view = _status(serve_app)["scheduler"]
    assert view["decisions"].get("short/local", 0) >= 1
    assert view["decisions"].get("long/disaggregated", 0) >= 1
    assert view["prefill"][0]["report_age_s"] < 5 and view["decode"][0]["total_blocks"] > 0
    lines = format_pool_status(_status(serve_app))  # what `disagg status` prints of it
    assert any(line.startswith("  decisions: ") and "short/local" in line for line in lines)
    assert any(line.startswith("  decode replica ") for line in lines), lines
    assert any(line.startswith("  direct calls: ") for line in lines), lines
    # the decode replica's step model, fitted at start (decode calibration) and reported
    step = view["decode"][0]["decode_step"]
    assert step["fitted"] and step["s0_ms"] + step["s1_ms_per_seq"] > 0, step
    assert any("ms per sequence (fitted)" in line for line in lines), lines
    metrics = httpx.get(f"{serve_app}/metrics").text
    assert 'disagg_scheduler_decisions_total{lane="short",mode="local"}' in metrics
    assert "disagg_prefill_pending_tokens" in metrics


def test_pool_calls_go_over_the_direct_connections(client, serve_app):
    before = _status(serve_app)["direct_calls"]
    assert before["connected"] == 2, before  # the prefill and the decode replica
    for prompt in ("d" * 100, "e" * 3000):  # prefilled locally / on the prefill replica
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, **GREEDY)
    after = _status(serve_app)["direct_calls"]
    assert after["calls"]["direct"] >= before["calls"]["direct"] + 2, (before, after)
    assert after["calls"]["serve"] == before["calls"]["serve"], (before, after)
    # the replicas' load is read over the same connections (every 0.4 s), not sent over Serve
    assert after["load_reads"] > before["load_reads"], (before, after)


def test_vllm_own_benchmark_client_runs_unchanged_against_the_api(serve_app, tiny_model,
                                                                  tmp_path):
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.vllm_bench_serve", "--backend", "openai",
         "--base-url", str(serve_app), "--endpoint", "/v1/completions", "--model", MODEL,
         "--tokenizer", str(tiny_model), "--dataset-name", "random", "--random-input-len", "64",
         "--random-output-len", "8", "--num-prompts", "6", "--request-rate", "4",
         "--ignore-eos", "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path),
         "--result-filename", "bench.json"],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "OPENAI_API_KEY": API_KEY, "VLLM_LOGGING_LEVEL": "WARNING"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_output_tokens"] == 6 * 8
    assert result["mean_ttft_ms"] > 0


def test_stop_strings_batches_n_and_echo_as_vllm_gives_them(client, cluster, tokenizer):
    prompt = _text(tokenizer, make_prompt(40, seed=700))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = _oracle_text(cluster, tokenizer, prompt_ids, 24)
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    expected = full[:full.index(stop)]
    for stream in (False, True):
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                             stop=[stop], stream=stream, **GREEDY)
        chunks = list(response) if stream else [response]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == expected, (stop, full)
        assert chunks[-1].choices[0].finish_reason == "stop"
    # two prompts, two samples each, the prompt echoed: four choices, indexed prompt * n + j
    # (greedy n > 1 is refused, as vLLM does; seeded samples are reproducible)
    with pytest.raises(openai.BadRequestError, match="greedy"):
        client.completions.create(model=MODEL, prompt=prompt, n=2, max_tokens=4, **GREEDY)
    sampled = {"temperature": 1.0, "seed": 11, "extra_body": {"ignore_eos": True}}
    batches = [client.completions.create(model=MODEL, prompt=[prompt, prompt[:20]], n=2,
                                         max_tokens=6, echo=True, **sampled)
               for _ in range(2)]
    for batch in batches:
        assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
        by_index = {c.index: c.text for c in batch.choices}
        assert by_index[0].startswith(prompt) and by_index[1].startswith(prompt)
        assert by_index[2].startswith(prompt[:20]) and by_index[3].startswith(prompt[:20])
        assert batch.usage.completion_tokens == 24
    texts = [sorted((c.index, c.text) for c in batch.choices) for batch in batches]
    assert texts[0] == texts[1]  # the same seed, the same samples


def _process_name(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline()) or proc.name()
    return ""


def _serve_replicas() -> list[psutil.Process]:
    """The Serve replica processes under this test process."""
    return [p for p in psutil.Process().children(recursive=True)
            if _process_name(p).startswith("ray::ServeReplica:")]


def test_replicas_and_their_engines_run_at_niceness_0(serve_app):
    """Ray starts its workers at niceness 15 and the engines a replica spawns inherit it (a Ray
    daemon on an engine's core would then take the core from it); `disagg serve` starts its
    Ray with worker niceness 0, as a plain vLLM server runs."""
    replicas = _serve_replicas()
    engines = [c for r in replicas for c in r.children(recursive=True)
               if _process_name(c).startswith("VLLM::")]
    assert len(replicas) >= 3 and len(engines) >= 2, (replicas, engines)
    assert {p.nice() for p in replicas + engines} == {0}


def test_each_engine_is_one_process(serve_app):
    """The model runs in the engine core process (executor 'uni'): vLLM's CPU default would
    start a worker process per engine whose engine core busy-waits on it for every step."""
    replicas = _serve_replicas()
    per_replica = [[n for c in r.children(recursive=True)
                    if (n := _process_name(c)).startswith("VLLM::")] for r in replicas]
    engines = [names for names in per_replica if names]
    assert len(engines) >= 2, per_replica
    assert all(len(names) == 1 and names[0].startswith("VLLM::EngineCore")
               for names in engines), per_replica
