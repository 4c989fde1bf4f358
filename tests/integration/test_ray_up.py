"""`ray up` as the README says, end to end on this machine (slow: a few minutes; run it with
`pytest -m slow tests/integration/test_ray_up.py -s` to see the timings).

1. `scripts/local-cluster.sh up`: its own sshd on 127.0.0.1, `ray up deploy/cluster-local.yaml`,
   `disagg serve --address auto --detach`, until /health answers 200.
2. One completion through the openai client.
3. `disagg status` on the cluster.
4. `scripts/local-cluster.sh down`.
5. Nothing left: no process of the cluster (Ray node, its workers, vLLM engines, the sshd), no
   key in authorized_keys, the GCS and HTTP ports free.
Every step has its own timeout (together under 10 minutes); a failed step still runs `down`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil
import pytest
import yaml

from runtime.engines import free_port

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
SCRIPT = PROJECT / "scripts" / "local-cluster.sh"
DISAGG = Path(sys.executable).parent / "disagg"
UP_S, COMPLETION_S, STATUS_S, DOWN_S = 330, 45, 60, 120  # 555 s in all
Snapshot = dict[int, float]  # pid -> create time


def _can_run() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    has_tools = Path("/usr/sbin/sshd").exists() and shutil.which("rsync")
    if not has_tools and not (os.geteuid() == 0 and shutil.which("apt-get")):
        return "needs openssh-server and rsync (or root with apt-get to install them)"
    return None


def _run(args: list[str], env: dict[str, str], timeout_s: float) -> tuple[str, float]:
    """Run a step in its own process group; past its timeout the whole group is stopped."""
    start = time.monotonic()
    proc = subprocess.Popen(args, cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"{args} ran past {timeout_s} s:\n{out}") from None
    print(out)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{out}"
    return out, time.monotonic() - start


def _cluster_processes(state: Path) -> Snapshot:
    """The Ray node that node-start keeps under its pid file, everything under it (GCS, raylet,
    workers, replicas, vLLM engines), and the cluster's sshd with its sessions."""
    roots = [int((state / name).read_text()) for name in ("ray-node.pid", "sshd.pid")]
    snapshot: Snapshot = {}
    for root in roots:
        proc = psutil.Process(root)
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                snapshot[p.pid] = p.create_time()
    return snapshot


def _engine_count(snapshot: Snapshot) -> int:
    count = 0
    for pid in snapshot:
        with contextlib.suppress(psutil.Error):
            count += "EngineCore" in " ".join(psutil.Process(pid).cmdline())
    return count


def _left(snapshot: Snapshot) -> list[str]:
    left = []
    for pid, created in snapshot.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return left


def _listener(port: int) -> int:
    [pid] = {c.pid for c in psutil.net_connections("tcp")
             if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    return pid


def _port_free(port: int) -> bool:
    return all(c.laddr.port != port for c in psutil.net_connections("tcp")
               if c.status == psutil.CONN_LISTEN)


def test_ray_up_serve_complete_status_down(tiny_model: Path, tmp_path: Path) -> None:
    reason = _can_run()
    if reason:
        pytest.skip(reason)
    state = tmp_path / "cluster"
    ray_port, http_port = free_port(), free_port()
    app = yaml.safe_load((PROJECT / "deploy" / "tiny.yaml").read_text())
    app["engine"]["model"] = str(tiny_model)
    app["server"].update(http_port=http_port, grpc_port=free_port())
    config = tmp_path / "app.yaml"
    config.write_text(yaml.safe_dump(app))
    env = {**os.environ, "DISAGG_CLUSTER_DIR": str(state), "DISAGG_RAY_PORT": str(ray_port)}
    timings: dict[str, float] = {}
    try:
        # 1. up: sshd, ray up, the app, /health
        out, timings["up (all)"] = _run(["bash", str(SCRIPT), "up", "--config", str(config)],
                                        env, UP_S)
        for phase in ("ray up", "app"):
            timings[phase] = float(re.search(rf"\] {phase}: (\d+) s", out).group(1))
        url = re.search(r"URL: (http://\S+)", out).group(1)
        assert url == f"http://127.0.0.1:{http_port}"

        # 2. one completion through the OpenAI client
        start = time.monotonic()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=COMPLETION_S)
        completion = client.completions.create(model="tiny", prompt="The cluster says",
                                               max_tokens=8, temperature=0)
        timings["completion"] = time.monotonic() - start
        assert completion.choices[0].finish_reason in ("length", "stop")
        assert completion.usage is not None and completion.usage.completion_tokens >= 1

        # 3. disagg status, as a client of the cluster
        # with Serve's throughput-optimized settings in its environment too (a process that
        # started an app has them): its handles then need an event loop
        client_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{ray_port}", "RAY_AUTH_MODE": "token",
                      "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
        out, timings["status"] = _run([str(DISAGG), "status", "--address", "auto"], client_env,
                                      STATUS_S)
        assert re.search(r"application disagg: \S*RUNNING", out)
        assert re.search(r"prefill replica .* kv cache", out) and "decode replica" in out

        processes = _cluster_processes(state)
        assert _engine_count(processes) >= 2, "expected the prefill and decode engines"
        # direct ingress on a cluster it joined: the Ingress replica itself serves HTTP
        assert "Ingress" in " ".join(psutil.Process(_listener(http_port)).cmdline())
        key = (state / "id_ed25519.pub").read_text().split()[1]
    except BaseException:
        subprocess.run(["bash", str(SCRIPT), "down"], cwd=PROJECT, env=env, timeout=DOWN_S)
        raise

    # 4. down
    _, timings["down"] = _run(["bash", str(SCRIPT), "down"], env, DOWN_S)
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))

    # 5. nothing left
    assert _left(processes) == []
    assert not any(f"127.0.0.1:{ray_port}" in " ".join(p.info["cmdline"] or [])
                   for p in psutil.process_iter(["cmdline"]))
    assert _port_free(ray_port) and _port_free(http_port)
    authorized = Path.home() / ".ssh" / "authorized_keys"
    assert not authorized.exists() or key not in authorized.read_text()
    assert not (state / "sshd.pid").exists() and not (state / "ray-node.pid").exists()
