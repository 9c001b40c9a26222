# mlkv.c
#   make          build ./mlkv (OpenMP when the compiler has it; OMP=0 to disable)
#   make demo     the built-in demo: corpus, tiny model, training (no download)
#   make test     tokenize.py's tests, then the C tests built with gcc and clang
#                 (those installed), native and portable builds, warnings as errors
#   make bench    training speed and GEMM shapes against the measured fp32 peak
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
# the fast native build (OpenMP, -march=native: the AVX-512 kernels where the
# CPU has them) and the portable fallback (no -march: SSE2 on x86-64) with and
# without OpenMP; warnings are errors.
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
	  $$cc $$flags -o $$d/mlkv mlkv.c -lm; \
	  $$cc $$flags -DMLKV_NO_MAIN -o $$d/test_mlkv test_mlkv.c mlkv.c -lm; \
	  echo "== $$cc, $$build: tests"; \
	  OMP_NUM_THREADS=2 $$d/test_mlkv $$d/mlkv; \
	done; done

# Training speed as a fraction of this machine's measured fp32 peak (dev/bench.c)
bench: build/bench
	./build/bench
build/bench: dev/bench.c mlkv.c mlkv.h
	@mkdir -p build
	$(CC) $(CFLAGS) $(WARN) $(OMPFLAGS) -DMLKV_NO_MAIN -o $@ dev/bench.c mlkv.c -lm

clean:
	rm -rf mlkv build demo

.PHONY: demo test bench clean
