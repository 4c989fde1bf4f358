"""Locust load test of the OpenAI-compatible HTTP API (disagg, or any OpenAI server), bounded.

    locust -f benchmarks/locustfile.py --headless --host http://127.0.0.1:8000 \\
        --users 8 --spawn-rate 2 --run-time 60s --model tiny

Each user sends streaming completions of the `mixed` shape (mostly short prompts, a
`--long-fraction` of long ones), reads the SSE stream to the end and reports to Locust:
`completion` (until the response headers), `E2E` (to the stream's end), `TTFT` (first token)
and `TPOT` (per output token after the first).
The run always ends: at `--run-time` when given, else after `--max-run-s` (default 120 s).
Prompts are random token ids (no prefix-cache effects). Keep --host on 127.0.0.1 for tests.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from locust import HttpUser, LoadTestShape, between, events, task


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--model", default="tiny", help="model name the server serves")
    parser.add_argument("--long-fraction", type=float, default=0.1)
    parser.add_argument("--max-context", type=int, default=4096,
                        help="long prompts take 50-90%% of this many tokens")
    parser.add_argument("--max-run-s", type=float, default=120.0,
                        help="stop after this long when --run-time is not given")


class CompletionUser(HttpUser):
    wait_time = between(0.2, 1.0)

    @task
    def completion(self) -> None:
        options = self.environment.parsed_options
        rng = random.Random()
        if rng.random() < options.long_fraction:
            prompt_len = rng.randint(options.max_context // 2, int(0.9 * options.max_context))
            max_tokens = rng.randint(16, 64)
        else:
            prompt_len, max_tokens = rng.randint(64, 512), rng.randint(16, 128)
        body = {"model": options.model, "prompt": [rng.randrange(3, 256)
                                                    for _ in range(prompt_len)],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}
        start = time.perf_counter()
        first_at, num_tokens = None, 0
        with self.client.post("/v1/completions", json=body, stream=True, catch_response=True,
                              name="completion", timeout=300) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines():
                if not line or line == b"data: [DONE]" or not line.startswith(b"data: "):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    response.failure(str(data["error"].get("message", data["error"])))
                    return
                if data.get("choices"):
                    num_tokens += 1
                    if first_at is None:
                        first_at = time.perf_counter()
            response.success()
        end = time.perf_counter()
        self._report("E2E", (end - start) * 1e3)
        if first_at is not None:
            self._report("TTFT", (first_at - start) * 1e3)
            if num_tokens > 1:
                self._report("TPOT", (end - first_at) * 1e3 / (num_tokens - 1))

    def _report(self, name: str, ms: float) -> None:
        self.environment.events.request.fire(request_type="SSE", name=name, response_time=ms,
                                             response_length=0, exception=None, context={})


class Bounded(LoadTestShape):
    """--users/--spawn-rate as given, and a hard stop (no unbounded run by accident)."""

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None and self.runner.environment.parsed_options is not None
        options = self.runner.environment.parsed_options
        limit_s = options.run_time or options.max_run_s
        if self.get_run_time() >= limit_s:
            return None
        return options.num_users or 1, options.spawn_rate or 1.0
