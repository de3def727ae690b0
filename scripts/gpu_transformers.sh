#!/usr/bin/env bash
# Hugging Face transformers continuous batching on pagedattn, on the GPU machine (issue 16).
# Run from the repository root:
#   PYTHONPATH=src bash scripts/gpu_transformers.sh one          # 1 GPU: 1B-class Llama, 64 requests,
#                                                                # prompts 100-2000, bf16: equality with
#                                                                # generate() and paged|sdpa, tokens/s, profile
#   PYTHONPATH=src bash scripts/gpu_transformers.sh tp           # 2 GPUs: the same requests one GPU vs
#                                                                # torchrun --nproc-per-node 2, tp_plan auto
#   PYTHONPATH=src bash scripts/gpu_transformers.sh one --tiny   # the same logic on CPU at toy size
#   PYTHONPATH=src bash scripts/gpu_transformers.sh tp --tiny    #   (interpreter, gloo): test the script here
# Logs and JSON under $OUT (default ./out/transformers); a short table is printed last.
# transformers' tensor parallel loading needs `accelerate` (and CB on CPU needs psutil): when they are not
# installed, wheels in .whl/hf/ (carry it) are installed with --no-index into $OUT/../hf-deps.
set -uo pipefail
MODE=${1:-one}
TINY=${2:-}
OUT=${OUT:-out/transformers}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1   # the machine's rules
export NCCL_GRAPH_MIXING_SUPPORT=0                             # transformers CB + TP asks for it
export PYTHONPATH=${PYTHONPATH:-src}

DEPS=${DEPS:-/tmp/pagedattn-hf-deps}
if ! $PY -c "import accelerate, psutil" 2>/dev/null && ls .whl/hf/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --target "$DEPS" .whl/hf/*.whl && export PYTHONPATH="$DEPS:$PYTHONPATH"
fi
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" \
    | tee "$OUT/versions.txt"

if [ "$TINY" = "--tiny" ]; then
    export TRITON_INTERPRET=1
    COMMON=(--device cpu --model-config llama-gqa --requests 4 --min-prompt 5 --max-prompt 70 --new-tokens 4)
    AGAINST="paged|sdpa,generate,paged|flash_attention_2"
    STEP_TIMEOUT=${STEP_TIMEOUT:-600}
else
    COMMON=(--device cuda --model-config llama-1b --dtype bf16 --requests 64 --min-prompt 100 --max-prompt 2000
            --new-tokens 64)
    AGAINST="paged|sdpa,generate,paged|flash_attention_2"
    STEP_TIMEOUT=${STEP_TIMEOUT:-420}
fi
MODEL_DIR=${MODEL_DIR:-/tmp/pagedattn-hf-model-$MODE}
EX=examples/hf_continuous_batching.py

case "$MODE" in
one)
    timeout "$STEP_TIMEOUT" $PY $EX "${COMMON[@]}" --against "$AGAINST" --profile --json "$OUT/one.json" \
        2>&1 | grep -v "eos_token_id\|Passing .generation" | tee "$OUT/one.log"
    ;;
tp)
    # one process, one GPU: pagedattn and paged|sdpa tokens saved, model saved for the sharded load
    timeout "$STEP_TIMEOUT" $PY $EX "${COMMON[@]}" --against "paged|sdpa" --save-model "$MODEL_DIR" \
        --save-tokens "$OUT/tp_reference_tokens.json" --json "$OUT/tp_one.json" \
        2>&1 | grep -v "eos_token_id\|Passing .generation" | tee "$OUT/tp_one.log"
    NPROC=2
    timeout "$STEP_TIMEOUT" $PY -m torch.distributed.run --nproc-per-node $NPROC $EX "${COMMON[@]}" --tp --load-model "$MODEL_DIR" \
        --against "paged|sdpa" --expect-tokens "$OUT/tp_reference_tokens.json" --json "$OUT/tp_two.json" \
        2>&1 | grep -v "eos_token_id\|Passing .generation" | tee "$OUT/tp_two.log"
    ;;
*)
    echo "usage: bash scripts/gpu_transformers.sh one|tp [--tiny]"; exit 2 ;;
esac

$PY - "$OUT" "$MODE" <<'EOF'
import json, os, sys
out, mode = sys.argv[1], sys.argv[2]
names = ["one.json"] if mode == "one" else ["tp_one.json", "tp_two.json"]
print(f"\n== transformers continuous batching on pagedattn ({mode}) ==")
ok = True
for name in names:
    path = os.path.join(out, name)
    if not os.path.exists(path):
        print(f"{name}: missing (the run failed: see the .log beside it)"); ok = False; continue
    r = json.load(open(path))
    print(f"{name}: {r['model']} {r['dtype']} x{r['world_size']} {r['requests']} requests, prompts "
          f"{min(r['prompt_lengths'])}-{max(r['prompt_lengths'])}, {r['new_tokens']} new tokens")
    print(f"  {'implementation':28s} {'seconds':>8s} {'gen tok/s':>10s}")
    for impl, run in r["runs"].items():
        if "seconds" in run:
            print(f"  {impl:28s} {run['seconds']:8.2f} {run['generated_tokens_per_s']:10.1f}")
        else:
            print(f"  {impl:28s} not run: {run['error'][:70]}")
    for what, c in r["comparisons"].items():
        print(f"  {what:44s} {c['identical']}/{c['requests']} identical"
              + (f", max |dlogprob| {c['max_logprob_diff']:.3g}" if "max_logprob_diff" in c else "")
              + (f", first divergences {c['first_divergences'][:3]}" if c.get("first_divergences") else ""))
    if "profile" in r:
        p = r["profile"]
        print(f"  attention share ({p['basis']}): {p['share']:.1%}")
EOF
