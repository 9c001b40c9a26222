#!/bin/sh
# dev/device_bench.sh [OUT_DIR] - mlkv's training step against PyTorch's on a
# many-core machine with PyTorch and transformers installed (this project's
# device machine: 16 Xeon cores). Pythia-160M shape, MHA, random weights and
# tokens: build/bench (mlkv, fp32 and bf16) and dev/bench_torch.py (HF
# GPTNeoXForCausalLM, eager fp32, AdamW, clipping) run alternately, two rounds
# at all cores (8 x 256 and 1 x 2048), then 8 x 256 at 1, 2, 4 and 8 threads.
# Every table goes to OUT_DIR/device_bench.txt as it is printed (default
# build/device). Leave OMP_PROC_BIND and OMP_PLACES unset: with
# OMP_PROC_BIND=close OMP_PLACES=cores that machine ran mlkv 10 times slower.
set -e
out=${1:-build/device}
mkdir -p "$out"
log="$out/device_bench.txt"
make -s build/bench
cores=$(nproc)
{ echo "== $(date -u) $(grep -m1 'model name' /proc/cpuinfo) ($cores cores)"; git log --oneline -1 2>/dev/null || true; } | tee "$log"
mlkv() { OMP_NUM_THREADS=$1 timeout 300 build/bench --quick --threads "$1" --steps "$2" $3 2>&1 | tee -a "$log"; }
torch() { timeout 300 python3 dev/bench_torch.py --threads "$1" --steps "$2" $3 2>&1 | tee -a "$log"; }
for round in 1 2; do
    echo "== round $round, $cores threads" | tee -a "$log"
    mlkv "$cores" 2 "--case MHA:8x256 --case MHA:1x2048"
    torch "$cores" 2 "--case 8x256 --case 1x2048"
done
echo "== bf16, $cores threads" | tee -a "$log"
mlkv "$cores" 2 "--case MHA:8x256:bf16 --case MHA:1x2048:bf16"
for threads in 1 2 4 8; do
    echo "== $threads threads, 8 x 256, one step" | tee -a "$log"
    mlkv "$threads" 1 "--case MHA:8x256"
    torch "$threads" 1 "--case 8x256"
done
