"""`disagg status` formats the ingress's pool_status: every entry it has today, and entries it
does not know (a new one crashed the command once: KeyError 'load')."""

from __future__ import annotations

from runtime.serve_cli import format_pool_status

MODEL = {f"predicted_ms_{n}": float(n) / 10 for n in (128, 1024, 4096, 8192)}
KV = {"num_leases": 1, "num_leased_blocks": 4, "num_loads_done": 7, "num_loads_failed": 0}


def _status() -> dict:
    return {
        "scheduler": {
            "lanes": {"short": {"in_flight": 2}, "long": {"in_flight": 1}},
            "prefill": [{"replica": "p0", "lane": "short", "outstanding": 1,
                         "remaining_ms": {"short": 5.0, "long": 300.0}, "model": MODEL,
                         "decode_step": {"s0_ms": 6.0, "s1_ms_per_seq": 0.5, "fitted": False},
                         "report_age_s": 0.2}],
            "decode": [{"replica": "d0", "free_blocks": 90, "total_blocks": 100,
                        "active_seqs": 3, "tpot_ms": 12.5,
                        "local_remaining_ms": {"short": 1.0, "long": 0.0}, "model": MODEL,
                        "decode_step": {"s0_ms": 4.0, "s1_ms_per_seq": 0.75, "fitted": True}}],
            "decisions": {"short/local": 5, "long/disaggregated": 2}, "moved": 1,
            "handoff": {"first_token_ms": 12.5, "transfer_latency_ms": 20.0, "samples": 7},
            "demand": {"prefill": {"replicas": 1.5, "reason": "queued work"}},
        },
        "direct_calls": {"connected": 2, "replicas": {"p0": "a", "d0": "b"},
                         "calls": {"direct": 9, "serve": 1}, "load_reads": 42},
        "prefill": {"replica_id": "p0", "load": None, "kv": KV},
        "decode": {"replica_id": "d0", "load": {"kv_cache_usage": 0.1, "num_running": 3},
                   "kv": KV, "usage": {"wall_s": 10.0, "busy_s": 4.0, "attributed_s": 3.5}},
    }


def test_every_part_of_the_status_is_printed():
    status = {**_status(), "something_new": {"entries": 3}}
    text = "\n".join(format_pool_status(status))
    assert "prefill p0 [short]: 1 prompts in flight" in text
    assert "decode d0: 90/100 blocks free" in text
    assert "decode step 4.0 + 0.75 ms per sequence (fitted)" in text
    assert "decode step 6.0 + 0.50 ms per sequence (estimated until it is fitted)" in text
    assert "long prompts moved while waiting: 1" in text
    assert "measured, 7 requests): first token +12.5 ms, transfer latency 20.0 ms" in text
    assert "direct calls: 2 of 2 replicas connected" in text
    assert "load reports read over them 42" in text
    assert "decode replica d0: kv cache 10.0% used, 3 running" in text
    assert "engine busy 4.0 s of 10.0 s (40%" in text
    assert "prefill pool demand: 1.50 replicas (queued work)" in text
