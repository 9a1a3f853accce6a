#!/usr/bin/env bash
# Static checks, as CI runs them before the tests: lint, format and types (configured in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python -m ruff check .
python -m ruff format --check .
python -m mypy
