#!/usr/bin/env bash
# The test suite (what CI runs): lint, then pytest. Sets up .venv when missing.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
