set -u
export PYTHONPATH=.
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }
timeout 120 python3 benchmarks/profile.py --impls softmax,ssmax_learned,rbf,cudnn --dims 64,128 --lengths 4096 --causal 0,1 --modes fwdbwd --top 6 --out $OUT/profile.json 2>&1 | filter > $OUT/profile.log
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 400 python3 -m pallas_kernels.check --json "$OUT/check.json" 2>&1 | filter > "$OUT/check.log" &
fwd=$!
timeout 400 python3 -m pallas_kernels.check_backward --only check 2>&1 | filter > "$OUT/check_backward.log" &
bwd=$!
wait $fwd $bwd
grep -E "^(softmax|ssmax|rbf|cudnn)|concatenate|reduce_fusion|mosaic" $OUT/profile.log | cut -c1-110
if grep -q '^case ' "$OUT/check.log"; then sed -n '/^case /,$p' "$OUT/check.log"
else echo "forward check cut off"; grep -o '"name": "[^"]*"\|"pass": [a-z]*' "$OUT/check.log" | paste - -; fi
if grep -q '^== correctness' "$OUT/check_backward.log"; then sed -n '/^== correctness/,/^$/p' "$OUT/check_backward.log"
else echo "backward check cut off"; grep "PASS\|FAIL" "$OUT/check_backward.log"; fi
