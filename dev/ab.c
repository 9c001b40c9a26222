/*
 * dev/ab.c - two builds of mlkv.c compared side by side, in one process:
 * training steps of Pythia-160M (random weights and tokens) alternate between
 * build A and build B (A B, B A, A B, ...), so that both see the same
 * moments of a shared machine. On the 2-core machines this project is
 * developed on, the speed of identical runs moves by 20-30% from one minute
 * to the next (other tenants' load on the host); run one after the other, a
 * 3% change cannot be seen, while the ratio of neighbouring steps shows it.
 * Each build is a shared library with its own static buffers (dlopen with
 * RTLD_LOCAL), so both models are in memory at once (2 x 3.4 GiB at 1 x 2048).
 *
 * usage: build/ab A.so B.so MHA|MLKV-2|DEMO B T PAIRS [PRECISION_A PRECISION_B]
 * (dev/ab.sh builds them; precisions fp32, the default, or bf16: one build
 * against itself in both gives bf16's speed-up over fp32)
 * prints every step's seconds, A/B, then the median of the pairs' speed
 * ratios (time A / time B: above 1, B is faster) and both final losses.
 */
#include "../mlkv.h"
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_PAIRS 64

typedef struct {
    float (*train_step)(Model *, const OptimConfig *, const int *, int, int, double *);
    Model model;
} Build;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void load(Build *b, const char *path, const char *variant, int B, int T, const char *precision) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) { fprintf(stderr, "ab: %s\n", dlerror()); exit(1); }
    int (*config_load)(Config *, const char *, char **) = (int (*)(Config *, const char *, char **))dlsym(lib, "config_load");
    int (*init)(Model *, const Config *, uint64_t) = (int (*)(Model *, const Config *, uint64_t))dlsym(lib, "model_init_random");
    int (*prepare)(Model *, int, int, int) = (int (*)(Model *, int, int, int))dlsym(lib, "model_prepare");
    int (*set_precision)(Precision, int) = (int (*)(Precision, int))dlsym(lib, "gemm_set_precision");
    b->train_step = (float (*)(Model *, const OptimConfig *, const int *, int, int, double *))dlsym(lib, "train_step");
    if (!config_load || !init || !prepare || !b->train_step || !set_precision) { fprintf(stderr, "ab: %s lacks mlkv's API\n", path); exit(1); }
    if (strcmp(precision, "bf16") == 0 && !set_precision(PRECISION_BF16, 1))
        fprintf(stderr, "ab: %s: bf16 without AMX (the portable kernel)\n", path);
    Config c;
    if (config_load(&c, "dev/pythia-160m.config.json", NULL) != 0) { fprintf(stderr, "ab: run from the repository root\n"); exit(1); }
    if (strcmp(variant, "MLKV-2") == 0) { /* as dev/bench.c: 2 owning layers of 1 K/V head, MLP grown */
        c.n_kv_layer = 2;
        c.n_kv_head = 1;
        c.intermediate_size = 3830;
    } else if (strcmp(variant, "DEMO") == 0) { /* make demo's model (cmd_demo in mlkv.c): heads of 16 */
        c.vocab_size = 64;
        c.hidden_size = 192;
        c.intermediate_size = 768;
        c.max_position_embeddings = 128;
        c.rotary_pct = 1.0;
    }
    if (init(&b->model, &c, 1) != 0 || prepare(&b->model, B, T, 1) != 0) { fprintf(stderr, "ab: %s: no model\n", path); exit(1); }
}

static int by_value(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

int main(int argc, char **argv) {
    if ((argc != 7 && argc != 9) || atoi(argv[4]) < 1 || atoi(argv[5]) < 1 || atoi(argv[6]) < 1 || atoi(argv[6]) > MAX_PAIRS) {
        fprintf(stderr, "usage: build/ab A.so B.so MHA|MLKV-2|DEMO B T PAIRS (at most %d) [fp32|bf16 fp32|bf16]\n",
                MAX_PAIRS);
        return 2;
    }
    int B = atoi(argv[4]), T = atoi(argv[5]), pairs = atoi(argv[6]);
    Build build[2];
    const char *precision[2] = {argc == 9 ? argv[7] : "fp32", argc == 9 ? argv[8] : "fp32"};
    load(&build[0], argv[1], argv[3], B, T, precision[0]);
    load(&build[1], argv[2], argv[3], B, T, precision[1]);
    int *tokens = malloc(sizeof(int) * (size_t)B * (T + 1));
    if (!tokens) { fprintf(stderr, "ab: out of memory\n"); return 1; }
    uint64_t r = 12345;
    for (int i = 0; i < B * (T + 1); i++) {
        r = r * 6364136223846793005ULL + 1442695040888963407ULL;
        tokens[i] = (int)((r >> 33) % (uint64_t)build[0].model.config.vocab_size);
    }
    OptimConfig o = {6e-4, 0.9, 0.95, 1e-8, 0.01, 1.0, 1, 1000, SCHEDULE_COSINE};
    double norm, seconds[2][MAX_PAIRS], ratio[MAX_PAIRS];
    float loss[2];
    for (int v = 0; v < 2; v++) loss[v] = build[v].train_step(&build[v].model, &o, tokens, 1, 0, &norm); /* warm-up */
    printf("%s %d x %d, %s/%s, seconds per step, A/B:", argv[3], B, T, precision[0], precision[1]);
    for (int p = 0; p < pairs; p++) {
        for (int turn = 0; turn < 2; turn++) {
            int v = p % 2 ? 1 - turn : turn; /* A B, then B A: neither always goes first */
            double t0 = now();
            loss[v] = build[v].train_step(&build[v].model, &o, tokens, 1, p + 1, &norm);
            seconds[v][p] = now() - t0;
        }
        ratio[p] = seconds[0][p] / seconds[1][p];
        printf(" %.3f/%.3f", seconds[0][p], seconds[1][p]);
        fflush(stdout);
    }
    qsort(ratio, (size_t)pairs, sizeof(double), by_value);
    double median = (ratio[(pairs - 1) / 2] + ratio[pairs / 2]) / 2;
    printf("\nspeed of B over A, median of %d pairs: %.3f (range %.3f-%.3f); losses A %.4f, B %.4f\n", pairs,
           median, ratio[0], ratio[pairs - 1], loss[0], loss[1]);
    free(tokens);
    return 0;
}
