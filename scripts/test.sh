#!/usr/bin/env bash
# Install if needed, then lint and run the whole test suite (real vLLM CPU engines; ~2 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
