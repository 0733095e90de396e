#!/usr/bin/env bash
# The test suite (what CI runs): lint, then pytest. Sets up .venv when missing.
# Tests run in one worker process per core (pytest-xdist): the Mosaic GPU interpreter keeps one
# core busy per process, so two workers halve the wall time on a 2-core machine.
# JAXATTN_TEST_WORKERS=0 runs them in this process (e.g. to debug with pdb).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -n "${JAXATTN_TEST_WORKERS:-auto}" "$@"
