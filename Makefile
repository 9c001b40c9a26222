# mlkv.c
#   make          build ./mlkv (OpenMP when the compiler has it; OMP=0 to disable)
#   make demo     the built-in demo: corpus, tiny model, training (no download)
#   make test     tokenize.py's tests, then the C tests built with gcc and clang
#                 (those installed), each with and without OpenMP, warnings as errors
CC ?= cc
OMP ?= 1
# -march=native where the compiler accepts it: the binary is built where it runs
NATIVE := $(shell $(CC) -march=native -E -x c /dev/null >/dev/null 2>&1 && echo -march=native)
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

# tokenize.py's tests, then one build of the binary and the test program per
# compiler and OpenMP setting, under build/, each run on the committed fixtures.
test:
	@python3 dev/test_tokenize.py
	@set -e; for cc in $(TEST_COMPILERS); do for omp in 1 0; do \
	  d=build/$$cc-omp$$omp; mkdir -p $$d; \
	  flags="-O2 -Wall -Wextra -Werror"; \
	  if [ $$omp = 1 ]; then \
	    if ! echo 'int main(void){return 0;}' | $$cc -fopenmp -x c - -o /dev/null 2>/dev/null; then \
	      echo "error: $$cc has no OpenMP support"; exit 1; fi; \
	    flags="$$flags -fopenmp"; fi; \
	  echo "== $$cc, OpenMP $$omp: build"; \
	  $$cc $$flags -o $$d/mlkv mlkv.c -lm; \
	  $$cc $$flags -DMLKV_NO_MAIN -o $$d/test_mlkv test_mlkv.c mlkv.c -lm; \
	  echo "== $$cc, OpenMP $$omp: tests"; \
	  OMP_NUM_THREADS=2 $$d/test_mlkv $$d/mlkv; \
	done; done

clean:
	rm -rf mlkv build demo

.PHONY: demo test clean
