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
 * usage: build/ab A.so B.so MHA|MLKV-2|14M|DEMO|ATTENTION[-KVH]|GEMM B T PAIRS [PRECISION_A PRECISION_B]
 * (dev/ab.sh builds them; precisions fp32, the default, or bf16: one build
 * against itself in both gives bf16's speed-up over fp32)
 * prints every step's seconds, A/B, then the median of the pairs' speed
 * ratios (time A / time B: above 1, B is faster) and both final losses.
 */
#include "../mlkv.h"
#include "linear.h"
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
        fprintf(stderr, "ab: %s: bf16 without AMX or AVX512-BF16 (the portable kernel)\n", path);
    Config c; /* Pythia-160M, or Pythia-14M for the variant 14M */
    if (config_load(&c, strcmp(variant, "14M") == 0 ? "dev/pythia-14m.config.json" : "dev/pythia-160m.config.json",
                    NULL) != 0) { fprintf(stderr, "ab: run from the repository root\n"); exit(1); }
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

static double median_of(double *x, int n) {
    qsort(x, (size_t)n, sizeof(double), by_value);
    return (x[(n - 1) / 2] + x[n / 2]) / 2;
}

/* both builds must take an AttentionShape (mlkv.c from commit afd7bbe on) */
typedef void (*AttentionForward)(float *, float *, float *, const float *, const float *, const float *,
                                 AttentionShape);
typedef void (*AttentionBackward)(float *, float *, float *, float *, float *, const float *, const float *,
                                  const float *, const float *, const float *, const float *, AttentionShape);

/* ATTENTION: attention alone (Pythia-160M's 12 heads of 64, K/V heads
 * `kv_heads`), forward and backward of both builds alternated on the same
 * random inputs; prints the medians of the pairs' speed ratios. */
static int ab_attention(const char *path_a, const char *path_b, int B, int T, int kv_heads, int pairs) {
    int H = 12, hs = 64;
    AttentionShape shape = {B, T, H, kv_heads, hs};
    AttentionForward forward[2];
    AttentionBackward backward[2];
    size_t npanel = 0; /* the larger scratch of the two builds */
    const char *path[2] = {path_a, path_b};
    for (int v = 0; v < 2; v++) {
        void *lib = dlopen(path[v], RTLD_NOW | RTLD_LOCAL);
        if (!lib) { fprintf(stderr, "ab: %s\n", dlerror()); return 1; }
        forward[v] = (AttentionForward)dlsym(lib, "attention_forward");
        backward[v] = (AttentionBackward)dlsym(lib, "attention_backward");
        size_t (*panel_floats)(AttentionShape, int) =
            (size_t(*)(AttentionShape, int))dlsym(lib, "attention_panel_floats");
        if (!forward[v] || !backward[v] || !panel_floats) { fprintf(stderr, "ab: %s lacks mlkv's attention\n", path[v]); return 1; }
        for (int backward_pass = 0; backward_pass < 2; backward_pass++) {
            size_t n = panel_floats(shape, backward_pass);
            npanel = n > npanel ? n : npanel;
        }
    }
    size_t nq = (size_t)B * T * H * hs, nkv = (size_t)B * T * kv_heads * hs, nstat = (size_t)B * H * T;
    float *buf = malloc(sizeof(float) * (5 * nq + 4 * nkv + 2 * nstat + npanel));
    if (!buf) { fprintf(stderr, "ab: out of memory\n"); return 1; }
    float *q = buf, *out = q + nq, *dout = out + nq, *dq = dout + nq, *k = dq + nq, *vv = k + nkv, *dk = vv + nkv;
    float *dv = dk + nkv, *lse = dv + nkv, *delta = lse + nstat, *panels = delta + nstat;
    uint64_t r = 12345;
    for (size_t i = 0; i < 5 * nq + 4 * nkv; i++) {
        r = r * 6364136223846793005ULL + 1442695040888963407ULL;
        buf[i] = (float)((double)(r >> 40) / (double)(1 << 24) - 0.5);
    }
    double fwd[2][MAX_PAIRS], bwd[2][MAX_PAIRS], ratio_f[MAX_PAIRS], ratio_b[MAX_PAIRS];
    for (int p = -1; p < pairs; p++) /* pair -1: warm-up */
        for (int turn = 0; turn < 2; turn++) {
            int v = p % 2 ? 1 - turn : turn;
            double t0 = now();
            forward[v](out, lse, panels, q, k, vv, shape);
            double t1 = now();
            memset(dk, 0, sizeof(float) * 2 * nkv);
            backward[v](dq, dk, dv, delta, panels, dout, q, k, vv, out, lse, shape);
            if (p >= 0) fwd[v][p] = t1 - t0, bwd[v][p] = now() - t1;
        }
    for (int p = 0; p < pairs; p++) ratio_f[p] = fwd[0][p] / fwd[1][p], ratio_b[p] = bwd[0][p] / bwd[1][p];
    printf("attention %d x %d, 12 heads of 64, %d K/V heads: ms forward A %.2f B %.2f, backward A %.2f B %.2f (medians)\n",
           B, T, kv_heads, 1e3 * median_of(fwd[0], pairs), 1e3 * median_of(fwd[1], pairs), 1e3 * median_of(bwd[0], pairs),
           1e3 * median_of(bwd[1], pairs));
    printf("speed of B over A, median of %d pairs: forward %.3f, backward %.3f\n", pairs, median_of(ratio_f, pairs),
           median_of(ratio_b, pairs));
    free(buf);
    return 0;
}


/* GEMM: the products of make bench's GEMM table (forward, input gradient,
 * weight gradient of each Linear shape of Pythia-160M, B*T = `rows`), each
 * timed `pairs` times in both builds alternately; the median ratio per product */
static int ab_gemm(const char *path_a, const char *path_b, int rows, int pairs, const char *precision) {
    LinearShape shapes[LINEAR_SHAPES];
    int n_shapes = linear_shapes(rows, shapes);
    GemmFunction gemm[2];
    const char *path[2] = {path_a, path_b};
    for (int v = 0; v < 2; v++) {
        void *lib = dlopen(path[v], RTLD_NOW | RTLD_LOCAL);
        if (!lib) { fprintf(stderr, "ab: %s\n", dlerror()); return 1; }
        gemm[v] = (GemmFunction)dlsym(lib, "gemm");
        int (*set_precision)(Precision, int) = (int (*)(Precision, int))dlsym(lib, "gemm_set_precision");
        if (!gemm[v] || !set_precision) { fprintf(stderr, "ab: %s lacks mlkv's gemm\n", path[v]); return 1; }
        set_precision(strcmp(precision, "bf16") == 0 ? PRECISION_BF16 : PRECISION_FP32, 1);
    }
    printf("GEMM, %s: GFLOP/s A, B (medians), speed of B over A (median of %d pairs)\n", precision, pairs);
    for (int s = 0; s < n_shapes; s++) {
        int OC = shapes[s].OC, IC = shapes[s].IC, N = shapes[s].N;
        LinearOperands o;
        if (linear_operands(shapes[s], &o) != 0) { fprintf(stderr, "ab: out of memory\n"); return 1; }
        for (int kind = 0; kind < 3; kind++) {
            double t[2][MAX_PAIRS], ratio[MAX_PAIRS];
            for (int p = -1; p < pairs; p++)
                for (int turn = 0; turn < 2; turn++) {
                    int v = p % 2 ? 1 - turn : turn;
                    double t0 = now();
                    linear_product(gemm[v], kind, shapes[s], &o);
                    if (p >= 0) t[v][p] = now() - t0;
                }
            for (int p = 0; p < pairs; p++) ratio[p] = t[0][p] / t[1][p];
            double flop = 2.0 * N * OC * IC / 1e9;
            printf("  %s, %s: %.0f %.0f  %.3f\n", shapes[s].name, linear_products[kind], flop / median_of(t[0], pairs),
                   flop / median_of(t[1], pairs), median_of(ratio, pairs));
            fflush(stdout);
        }
        linear_free(&o);
    }
    return 0;
}

int main(int argc, char **argv) {
    if ((argc != 7 && argc != 9) || atoi(argv[4]) < 1 || atoi(argv[5]) < 1 || atoi(argv[6]) < 1 || atoi(argv[6]) > MAX_PAIRS) {
        fprintf(stderr, "usage: build/ab A.so B.so MHA|MLKV-2|14M|DEMO|ATTENTION[-KVH]|GEMM B T PAIRS (at most %d) [fp32|bf16 fp32|bf16]\n",
                MAX_PAIRS);
        return 2;
    }
    int B = atoi(argv[4]), T = atoi(argv[5]), pairs = atoi(argv[6]);
    if (strcmp(argv[3], "GEMM") == 0) return ab_gemm(argv[1], argv[2], B * T, pairs, argc == 9 ? argv[8] : "fp32");
    if (strncmp(argv[3], "ATTENTION", 9) == 0) /* ATTENTION (12 K/V heads) or ATTENTION-1 (one) */
        return ab_attention(argv[1], argv[2], B, T, argv[3][9] == '-' ? atoi(argv[3] + 10) : 12, pairs);
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
    for (int v = 0; v < 2; v++) qsort(seconds[v], (size_t)pairs, sizeof(double), by_value);
    printf("tokens/s (median step): A %.0f, B %.0f\n", B * T / seconds[0][(pairs - 1) / 2],
           B * T / seconds[1][(pairs - 1) / 2]);
    free(tokens);
    return 0;
}
