# mlkv.c
#   make          build ./mlkv (OpenMP when the compiler has it; OMP=0 to disable)
#   make demo     the MLKV experiment in miniature (no download): corpus, a 12-layer
#                 model pretrained, the paper's nine configurations converted, uptrained, compared
#   make test     tokenize.py's tests, then the C tests built with gcc and clang
#                 (those installed), native and portable builds, warnings as errors
#   make bench    training speed and GEMM shapes against the measured fp32 peak,
#                 and the plain cc build's speed against the native build's
#   make fuzz     libFuzzer on every file format (clang; FUZZ_SECONDS per target, 600)
CC ?= cc
OMP ?= 1
# -march=native where the compiler accepts it: the binary is built where it runs.
# gcc otherwise uses 256-bit vectors on many AVX-512 CPUs; the GEMM wants 512.
NATIVE := $(shell $(CC) -march=native -E -x c /dev/null >/dev/null 2>&1 && echo -march=native)
NATIVE += $(shell $(CC) -mprefer-vector-width=512 -E -x c /dev/null >/dev/null 2>&1 && echo -mprefer-vector-width=512)
CFLAGS ?= -O3 $(NATIVE)
WARN = -Wall -Wextra
HAS_OPENMP = $(shell echo 'int main(void){return 0;}' | $(1) -fopenmp -x c - -o /dev/null >/dev/null 2>&1 && echo -fopenmp)
ifeq ($(OMP),1)
OMPFLAGS := $(call HAS_OPENMP,$(CC))
endif
# gcc and clang where installed (cc is one of them); plain cc otherwise
TEST_COMPILERS := $(or $(foreach c,gcc clang,$(if $(shell command -v $(c)),$(c))),cc)

mlkv: mlkv.c mlkv.h
	$(CC) $(CFLAGS) $(WARN) $(OMPFLAGS) -o $@ mlkv.c -lm

demo: mlkv
	./mlkv demo

# tokenize.py's tests, then the C tests on builds under build/: per compiler,
# the native build (OpenMP, -march=native: this CPU's instruction set alone)
# and the portable build (no -march, as `cc -O3 -o mlkv mlkv.c -lm`) with and
# without OpenMP, which on x86-64 holds the kernels for AVX-512, AVX2+FMA and
# the baseline and tests each this CPU runs; warnings are errors. OpenMP's
# threads get 128 KiB stacks, the smallest default there is (musl), so that a
# kernel's stack frame that outgrows them fails here. Each build's two
# binaries compile side by side.
test:
	@python3 dev/test_tokenize.py
	@set -e; for cc in $(TEST_COMPILERS); do for build in native-omp portable-omp portable; do \
	  d=build/$$cc-$$build; mkdir -p $$d; \
	  flags="-O2 -Wall -Wextra -Werror"; \
	  case $$build in native*) flags="-O3 $(NATIVE) -Wall -Wextra -Werror";; esac; \
	  case $$build in *omp) \
	    if ! echo 'int main(void){return 0;}' | $$cc -fopenmp -x c - -o /dev/null 2>/dev/null; then \
	      echo "error: $$cc has no OpenMP support"; exit 1; fi; \
	    flags="$$flags -fopenmp";; esac; \
	  echo "== $$cc, $$build: build ($$flags)"; \
	  $$cc $$flags -o $$d/mlkv mlkv.c -lm & \
	  $$cc $$flags -DMLKV_NO_MAIN -o $$d/test_mlkv test_mlkv.c mlkv.c -lm || exit 1; \
	  wait $$! || exit 1; \
	  echo "== $$cc, $$build: tests"; \
	  OMP_NUM_THREADS=2 OMP_STACKSIZE=128K $$d/test_mlkv $$d/mlkv; \
	done; done
	@$(MAKE) --no-print-directory test-sanitize fuzz-smoke

# The sanitizers: AddressSanitizer and UndefinedBehaviorSanitizer (leaks
# included, any report fails), with clang where installed, else gcc.
SAN_CC := $(or $(shell command -v clang),gcc)
SANITIZE = -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer

# the whole C suite under the sanitizers
test-sanitize:
	@mkdir -p build/sanitize
	@echo "== $(SAN_CC), AddressSanitizer + UndefinedBehaviorSanitizer: tests"
	@$(SAN_CC) $(SANITIZE) -Wall -Wextra -o build/sanitize/mlkv mlkv.c -lm & \
	$(SAN_CC) $(SANITIZE) -Wall -Wextra -DMLKV_NO_MAIN -o build/sanitize/test_mlkv test_mlkv.c mlkv.c -lm && \
	wait $$!
	@ASAN_OPTIONS=detect_leaks=1 build/sanitize/test_mlkv build/sanitize/mlkv

# Every reader, fuzzed (dev/fuzz/fuzz.c): fuzz-smoke replays the committed seed
# corpora under the sanitizers; fuzz runs libFuzzer from them.
FUZZ_TARGETS := json:1 config:2 safetensors:3 torch:4 tokenizer:5 tokens:6 tasks:7 optimizer:8
FUZZ_SECONDS ?= 600
# The replays build side by side (the readers alone matter here: each kernel
# compiled once, MLKV_ONE_KERNEL_SET), then run one by one.
fuzz-smoke:
	@mkdir -p build/fuzz
	@set -e; pids=; for t in $(FUZZ_TARGETS); do name=$${t%%:*}; id=$${t#*:}; \
	  $(SAN_CC) $(SANITIZE) -Wall -Wextra -DMLKV_ONE_KERNEL_SET -DFUZZ_STANDALONE -DFUZZ_TARGET=$$id -I. \
	    -o build/fuzz/replay-$$name dev/fuzz/fuzz.c -lm & pids="$$pids $$!"; done; \
	for p in $$pids; do wait $$p; done; \
	for t in $(FUZZ_TARGETS); do name=$${t%%:*}; \
	  ASAN_OPTIONS=detect_leaks=1 build/fuzz/replay-$$name dev/fuzz/corpus/$$name/* 2>/dev/null; \
	  echo "== fuzz-smoke $$name: seed files replayed clean: $$(ls dev/fuzz/corpus/$$name | wc -l)"; done

fuzz:
	@command -v clang >/dev/null || { echo "make fuzz needs clang (libFuzzer)"; exit 1; }
	@mkdir -p build/fuzz
	@set -e; for t in $(FUZZ_TARGETS); do name=$${t%%:*}; id=$${t#*:}; mkdir -p build/fuzz/$$name; \
	  clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
	    -DMLKV_ONE_KERNEL_SET -DFUZZ_TARGET=$$id -I. -o build/fuzz/fuzz-$$name dev/fuzz/fuzz.c -lm; \
	  echo "== fuzz $$name for $(FUZZ_SECONDS) s"; \
	  build/fuzz/fuzz-$$name -max_total_time=$(FUZZ_SECONDS) -close_fd_mask=3 -max_len=100000 \
	    build/fuzz/$$name dev/fuzz/corpus/$$name; done

# Training speed as a fraction of this machine's measured fp32 peak
# (dev/bench.c), then the plain build's speed beside the native build's
# (dev/bench_plain.sh)
bench: build/bench
	./build/bench
	dev/bench_plain.sh
build/bench: dev/bench.c dev/linear.h mlkv.c mlkv.h
	@mkdir -p build
	$(CC) $(CFLAGS) $(WARN) $(OMPFLAGS) -DMLKV_NO_MAIN -o $@ dev/bench.c mlkv.c -lm

# the native flags, for dev/ab.sh's builds
print-cflags:
	@echo $(NATIVE)

clean:
	rm -rf mlkv build demo

.PHONY: demo test test-sanitize fuzz-smoke fuzz bench print-cflags clean
