#!/usr/bin/env bash
# The main job: a CPU-sized run of what jaxattn is for. Sets up .venv when missing.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "== 1. demo: train a small LM on pydoc text with each attention variant =="
.venv/bin/python -m jaxattn.demo "$@"
echo; echo "== 2. theory: the papers' claims, checked numerically (CI size) =="
.venv/bin/python -m theory.check
echo; echo "== 3. experiment: convergence-rate plots (small preset) =="
.venv/bin/python -m experiments.convergence_rates --preset small
