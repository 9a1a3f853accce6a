#!/usr/bin/env bash
# Sets up the environment (once) and runs the whole test suite on the CPU, every tier (see the README's Testing).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec python -m pytest -q --durations=15 tests "$@"  # the slowest 15 are listed, to keep the suite in check
