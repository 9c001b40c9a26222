#!/bin/sh
# dev/ab.sh REV [MHA|MLKV-2|DEMO|ATTENTION[-KVH]|GEMM] [B] [T] [PAIRS] [PRECISION_A PRECISION_B]
# Training speed of the working tree (B) against git revision REV (A), steps
# alternated in one process (dev/ab.c says why). Defaults: MHA 8 256 6.
# ATTENTION needs REV from afd7bbe on (the attention kernels take an AttentionShape since).
# Example: dev/ab.sh HEAD MHA 1 2048 4
# bf16 against fp32, both the working tree: dev/ab.sh HEAD MHA 1 2048 4 fp32 bf16
# (A is then HEAD: commit first, or read it as the old code's fp32)
set -e
[ $# -ge 1 ] || { echo "usage: dev/ab.sh REV [MHA|MLKV-2|DEMO|ATTENTION[-KVH]|GEMM] [B] [T] [PAIRS] [PRECISION_A PRECISION_B]" >&2; exit 2; }
rev=$1 model=${2:-MHA} batch=${3:-8} seq=${4:-256} pairs=${5:-6} precision_a=${6:-fp32} precision_b=${7:-fp32}
cc=${CC:-cc}
flags="-O3 $(make -s --no-print-directory print-cflags) -fopenmp -fPIC -shared -DMLKV_NO_MAIN"
mkdir -p build/ab/a
git show "$rev:mlkv.c" > build/ab/a/mlkv.c
git show "$rev:mlkv.h" > build/ab/a/mlkv.h
$cc $flags -o build/ab/a.so build/ab/a/mlkv.c -lm
$cc $flags -o build/ab/b.so mlkv.c -lm
$cc -O2 -Wall -Wextra -o build/ab/ab dev/ab.c -ldl
echo "A = $rev, B = the working tree"
build/ab/ab build/ab/a.so build/ab/b.so "$model" "$batch" "$seq" "$pairs" "$precision_a" "$precision_b"
