#!/bin/sh
# dev/bench_plain.sh [PAIRS]: the README's plain build (cc -O3 -o mlkv mlkv.c -lm:
# no -march, no OpenMP; on x86-64 the kernels are chosen at run time) against
# a build for this CPU (make's -march=native, no OpenMP), training steps
# alternated in one process on one thread (dev/ab.c): Pythia-14M at 4 x 256
# and Pythia-160M at 8 x 256. B/A is the plain build's share of the native
# build's speed. make bench runs it last. PAIRS: 3.
set -e
pairs=${1:-3}
cc=${CC:-cc}
mkdir -p build/ab
$cc -O3 $(make -s --no-print-directory print-cflags) -fPIC -shared -DMLKV_NO_MAIN -o build/ab/native.so mlkv.c -lm
$cc -O3 -fPIC -shared -DMLKV_NO_MAIN -o build/ab/plain.so mlkv.c -lm
$cc -O2 -Wall -Wextra -o build/ab/ab dev/ab.c -ldl
echo "A = $cc -O3 $(make -s --no-print-directory print-cflags) (this CPU), B = $cc -O3 (plain), one thread"
for shape in "14M 4 256" "MHA 8 256"; do
    build/ab/ab build/ab/native.so build/ab/plain.so $shape "$pairs"
done
