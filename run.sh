#!/usr/bin/env bash
# The main job: the papers' claims checked numerically, then each experiment of the papers at a
# CPU size, then results/report.md with every plot and table. Sets up .venv when missing.
#
#   ./run.sh                 # CPU presets, results/ (about 12 minutes on 2 cores)
#   ./run.sh --preset gpu    # paper-size presets on one H100 with the fused kernels, results/gpu/
#   ./run.sh --steps theory,max_retrieval   # some steps only (the report needs every step's JSON)
#
# Every experiment resumes: a run killed part-way continues where it stopped when started again.
set -euo pipefail
cd "$(dirname "$0")"

preset=cpu
all_steps=theory,max_retrieval,minilm_dispersion,minilm_variants,byte_lm,convergence_rates,long_dispersion,report
steps=$all_steps
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset="${2:?--preset needs cpu or gpu}"; shift 2 ;;
    --preset=*) preset="${1#--preset=}"; shift ;;
    --steps) steps="${2:?--steps needs a comma-separated list}"; shift 2 ;;
    --steps=*) steps="${1#--steps=}"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (use --preset cpu|gpu, --steps a,b)" >&2; exit 2 ;;
  esac
done
case "$preset" in
  cpu) results=results; theory_flags=""; rates=small ;;
  gpu) results=results/gpu; theory_flags="--full"; rates=paper ;;
  *) echo "error: --preset must be cpu or gpu, got '$preset'" >&2; exit 2 ;;
esac

if [ "$preset" = cpu ]; then scripts/setup.sh; py=.venv/bin/python; else py=${JAXATTN_PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for s in ${steps//,/ }; do
  case ",$all_steps," in *",$s,"*) ;; *)
    echo "error: --steps: unknown step '$s' (steps: $all_steps)" >&2; exit 2 ;;
  esac
done
timings=""

step() {  # step NAME COMMAND...: runs and times one step, if it was asked for
  local name=$1 t0 t1; shift
  case ",$steps," in *",$name,"*) ;; *) return 0 ;; esac
  echo; echo "== $name: $*"
  t0=$(date +%s)
  "$@"
  t1=$(date +%s)
  timings="${timings:+$timings,}$name=$((t1 - t0))"
}

step theory "$py" -m theory.check --quiet $theory_flags --out "$results/theory/claims.json"
step max_retrieval "$py" -m experiments.max_retrieval --preset "$preset" --no-progress \
  --out-dir "$results/max_retrieval"
step minilm_dispersion "$py" -m experiments.minilm_dispersion --preset "$preset" --no-progress \
  --out "$results/minilm_dispersion"
step minilm_variants "$py" -m experiments.minilm_variants --preset "$preset" --no-progress \
  --out "$results/minilm_variants"
step byte_lm "$py" -m experiments.byte_lm --preset "$preset" --no-progress --out "$results/byte_lm"
step convergence_rates "$py" -m experiments.convergence_rates --preset "$rates" \
  --out-dir "$results/convergence_rates"
step long_dispersion "$py" -m experiments.long_dispersion --preset "$preset" \
  --out "$results/long_dispersion"
case ",$steps," in *",report,"*)
  echo; "$py" -m experiments.report --results "$results" --timings "$timings" ;;
esac
