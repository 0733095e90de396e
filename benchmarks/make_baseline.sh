#!/usr/bin/env bash
# Copies pallas_kernels at git revision REV to .old/pallas_kernels_base (imports renamed), for
# `benchmarks/kernels.py --baseline pallas_kernels_base` (see run_ab.sh). .old/ is git-ignored
# through .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: benchmarks/make_baseline.sh REV}
mkdir -p .git/info && (grep -qx "/.old/" .git/info/exclude 2>/dev/null || echo "/.old/" >> .git/info/exclude)
rm -rf .old/pallas_kernels_base && mkdir -p .old
git archive "$rev" pallas_kernels | tar -x -C .old
mv .old/pallas_kernels .old/pallas_kernels_base
grep -rl "pallas_kernels" .old/pallas_kernels_base | xargs sed -i \
  's/\bpallas_kernels\./pallas_kernels_base./g; s/from pallas_kernels import/from pallas_kernels_base import/g'
echo ".old/pallas_kernels_base = pallas_kernels at $(git rev-parse --short "$rev")"
