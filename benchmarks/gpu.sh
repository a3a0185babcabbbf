#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md in one run (about 8-10 minutes on one H200, most of
# it torch.compile's first compilations):
#
#     bash benchmarks/gpu.sh [LOG_DIR]          # LOG_DIR default /tmp/archflow-gpu
#
# Needs python3 with torch (CUDA), lightning, numpy and pydantic (PYTHON= names another). Each step
# has its own time limit and its own log in LOG_DIR (the most telling first); one that fails is reported and the rest run.
set -u
log=${1:-/tmp/archflow-gpu}
mkdir -p "$log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}                      # DEVICE=cpu: a dry run of the commands (slow at these widths)
wide=${WIDE:-1024}                       # WIDE=64: a quick dry run
only=${ONLY:-}                           # ONLY="smoke moe-bf16": these steps alone

step() {                                 # step NAME SECONDS ARGS...: one python run, its tail, its time
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    [[ -z $only || " $only " == *" $name "* ]] || return 0
    echo "== $name: python $*"
    timeout "$limit" "$py" "$@" >"$log/$name.log" 2>&1
    rc=$?
    grep -v -i "warn\|^ *warnings\.\|^ *return \|^ *self\.\|^ *_C\." "$log/$name.log" | tail -n 14
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
# the MoE's grouped-matmul dispatch against its loop, and every training recipe on the GPU
step smoke 120 benchmarks/cuda_smoke.py "${TMPDIR:-/tmp}/archflow-gpu-smoke"
# MoE (E=4, top-2) vs dense at the default study's shapes (d=128, 4 layers, batch 16 x 128), bf16, compiled
step moe-bf16-compile 150 -m benchmarks.moe --device "$dev" --precision bf16-mixed --compile --contenders sparse \
    --no-decode --rounds 5 --steps 20
# fused parallel block vs serial at d=WIDE (PaLM's claim: >= 1.10x), bf16, compiled
step block-bf16-compile 180 -m benchmarks.block_speed --device "$dev" --precision bf16-mixed --compile \
    --n-embd "$wide" --n-layer 4 --batch-size 16 --block-size 1024 --rounds 5 --steps 10 --blocks serial parallel
# the same with forward and backward replayed as CUDA graphs (torch.compile's reduce-overhead mode)
step moe-bf16-graphs 180 -m benchmarks.moe --device "$dev" --precision bf16-mixed --compile reduce-overhead \
    --contenders sparse --no-decode --rounds 5 --steps 20
# every upcycled kind vs dense, fp32 eager (training and batch-1 decode; the experts in a loop)
step moe-fp32 90 -m benchmarks.moe --device "$dev" --rounds 5 --steps 20
# the sparse one in bf16 eager: grouped matmuls (archflow's choice) and the loop over experts
step moe-bf16 60 -m benchmarks.moe --device "$dev" --precision bf16-mixed --rounds 5 --steps 20 --contenders sparse --no-decode
step moe-bf16-loop 60 -m benchmarks.moe --device "$dev" --precision bf16-mixed --rounds 5 --steps 20 --dispatch loop \
    --contenders sparse --no-decode
# MoE vs dense at d=WIDE, bf16, compiled; the blocks at d=WIDE in eager bf16
step moe-wide-bf16-compile 150 -m benchmarks.moe --device "$dev" --precision bf16-mixed --compile --contenders sparse \
    --no-decode --n-embd "$wide" --batch-size 16 --block-size 1024 --rounds 5 --steps 10
step moe-wide-bf16-graphs 180 -m benchmarks.moe --device "$dev" --precision bf16-mixed --compile reduce-overhead \
    --contenders sparse --no-decode --n-embd "$wide" --batch-size 16 --block-size 1024 --rounds 5 --steps 10
step block-bf16-eager 90 -m benchmarks.block_speed --device "$dev" --precision bf16-mixed \
    --n-embd "$wide" --n-layer 4 --batch-size 16 --block-size 1024 --rounds 5 --steps 10
# batch-1 and batch-16 decode: the eager forward, the fixed-shape step, the step compiled (CUDA graphs)
step decode-compiled 240 -m benchmarks.decode --compiled --device "$dev" --presets serial hybrid mqa --rounds 5 \
    --decode-tokens 48
step decode-compiled-b16 150 -m benchmarks.decode --compiled --device "$dev" --presets serial --step-batch 16 \
    --rounds 5 --decode-tokens 48
