#!/usr/bin/env bash
# Issue 18 on one GPU in one call of about 8 minutes: selective copying at 4096 (3 seeds) and induction heads
# to 2^20 (5 seeds), each with the recipe `mambakit synth <task>` runs by default (mambakit/tasks/recipes.py),
# eight training processes side by side on the one GPU, fp32. Run from the repository root:
#
#     export PYTHONPATH=$PWD OUT=/some/folder && bash benchmarks/synth_gpu_call.sh
#
# Writes under $OUT: synth-part-<tag>.json (one row per run, rewritten after each evaluated length),
# <tag>.log (training records and probes), synth-<device>.json and synth-<device>-<task>.png (the rows
# merged by `synth_tasks.py summarize`, which also prints the tables), nvidia-smi.txt.
# Training is bounded by --time in each process; the whole call by `timeout` below.
set -euo pipefail
: "${OUT:?set OUT to the folder for the results}"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

run() {  # run TAG ARGS...: one training process in the background, its output in $OUT/TAG.log
    local tag=$1
    shift
    timeout 500 "$PYTHON" benchmarks/synth_tasks.py run --tag "$tag" --out "$OUT" --threads 2 "$@" \
        > "$OUT/$tag.log" 2>&1 &
}

# Selective copying (Mamba Table 1: length 4096, 16 tokens, vocab 16, 2 layers, d_model 64): the recipe's
# length curriculum, then the remaining steps at 4096; probes at 256 and 4096 follow the curriculum.
for seed in 0 1 2; do
    run "sc-mamba-recipe-seed$seed" --task selective-copying --recipe --seed "$seed" --time 400 \
        --lengths 256,1024,4096 --eval-samples 512 --probe-every 500 --probe-lens 256,4096 --probe-samples 128
done
# Induction heads (Table 2: trained at 256, evaluated 2^6 .. 2^20): probes at the end of the 256 stage show
# what the paper's protocol alone reaches; the final evaluation, after the long stage, the recipe's.
for seed in 0 1 2 3 4; do
    run "ih-mamba-recipe-seed$seed" --task induction-heads --recipe --seed "$seed" --time 240 \
        --eval-samples 256 --long-eval-samples 16 --probe-every 500 --probe-lens 4096,65536,1048576 \
        --probe-samples 16
done
wait || true
"$PYTHON" benchmarks/synth_tasks.py summarize --out "$OUT" | tee "$OUT/summary.txt"
# Everything in one archive too: a remote runner may bring back only a few files per call.
tar czf /tmp/synth-results.tgz -C "$OUT" . && mv /tmp/synth-results.tgz "$OUT/"
