#!/usr/bin/env bash
# torch.compile and CUDA graphs on the GPU (docs/torch-integration.md): the GPU tests of
# tests/test_ops.py and tests/test_example.py (inductor vs eager, graph replay vs eager, no sync and
# no allocation on the hot path), then examples/toy_decoder.py eager, with CUDA graphs, compiled, and
# compiled with CUDA graphs. Full logs under $OUT (default gpu-out); a summary table last. Run from
# the repository root; everything runs under one deadline of ${DEADLINE:-290} seconds.
#   bash scripts/gpu_torch_integration.sh
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT=${OUT:-gpu-out}
DEADLINE=${DEADLINE:-290}
mkdir -p "$OUT"
start=$SECONDS
left() { local l=$((DEADLINE - (SECONDS - start))); if [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi; }

{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null
} > "$OUT/ti-device.txt" 2>&1
cat "$OUT/ti-device.txt"

# 1. tests: opcheck on CUDA tensors (the Triton kernels natively), aot_eager and inductor compiles,
#    graph capture and replay with new metadata, sync/allocation-free hot path, the example
timeout "$(left 150)" python3 -m pytest tests/test_ops.py tests/test_example.py -v -n "${JOBS:-4}" \
  -p no:cacheprovider --tb=short > "$OUT/ti-pytest.log" 2>&1
pytest_rc=$?

# 2. the example in four modes (the compiled ones log recompilations and graph breaks)
declare -A caps=([eager]=30 [graphs]=30 [compile]=80 [compile-graphs]=60)
declare -A flags=([eager]="" [graphs]="--cuda-graphs" [compile]="--compile" [compile-graphs]="--compile --cuda-graphs")
declare -A rcs
modes=(eager graphs compile compile-graphs)
for mode in "${modes[@]}"; do
  limit=$(left "${caps[$mode]}")
  if [ "$limit" -le 5 ]; then rcs[$mode]="skipped (deadline)"; continue; fi
  TORCH_LOGS="recompiles,graph_breaks" timeout "$limit" \
    python3 examples/toy_decoder.py --device cuda ${flags[$mode]} > "$OUT/ti-toy_decoder-$mode.log" 2>&1
  rcs[$mode]=$?
done

# 3. summary
field() { grep -F "$2" "$1" 2>/dev/null | tail -1 | sed -E "s/.*$3.*/\\1/"; }
echo
echo "pytest (exit $pytest_rc): passed $(grep -c ' PASSED' "$OUT/ti-pytest.log")  failed $(grep -c ' FAILED' "$OUT/ti-pytest.log")  skipped $(grep -c ' SKIPPED' "$OUT/ti-pytest.log")"
grep -E "FAILED|ERROR" "$OUT/ti-pytest.log" | sed 's/^\[gw[0-9]*\] //' | sort -u | head -20
tail -1 "$OUT/ti-pytest.log"
echo
head -1 "$OUT/ti-toy_decoder-eager.log" 2>/dev/null
printf "%-15s %-6s %-13s %-11s %-12s %-12s %-12s %-9s %-6s\n" mode exit "no-graph ms" "graph ms" "graph-direct" "compiled-eg" "vs ref" recompile result
for mode in "${modes[@]}"; do
  log="$OUT/ti-toy_decoder-$mode.log"
  printf "%-15s %-6s %-13s %-11s %-12s %-12s %-12s %-9s %-6s\n" "$mode" "${rcs[$mode]}" \
    "$(field "$log" "decode step (no graph)" ': ([0-9.]+) ms')" "$(field "$log" "decode step (graph)" ': ([0-9.]+) ms')" \
    "$(field "$log" "graph replay vs direct" ': ([0-9.e+-]+) ')" "$(field "$log" "compiled vs eager" ': ([0-9.e+-]+) ')" \
    "$(field "$log" "dense fp32 reference" ': ([0-9.e+-]+) ')" "$(grep -c 'Recompiling function' "$log" 2>/dev/null)" \
    "$(tail -1 "$log" 2>/dev/null | grep -oE '^(OK|FAIL)$' || echo '?')"
done
echo "total $((SECONDS - start)) s; logs in $OUT/ti-*"
