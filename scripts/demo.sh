#!/usr/bin/env bash
# Install if needed, then run the main job on the embedded default (the generated tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/disagg demo "$@"
