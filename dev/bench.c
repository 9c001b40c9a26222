/*
 * dev/bench.c - `make bench`: how fast mlkv.c trains, as a fraction of what
 * this machine's cores can do, measured in one run.
 *
 *   1. peak: the fp32 FMA throughput of all cores (independent FMA chains in
 *      vector registers, nothing else), the denominator of every ratio; a
 *      short one also between the repetitions of each GEMM and between
 *      training steps, printed beside (see peak_next_to_it);
 *   2. every GEMM shape of a Pythia-160M training step (B*T = 2048 rows):
 *      forward, input gradient and weight gradient, GFLOP/s and fraction of
 *      peak in fp32, and GFLOP/s with bf16 inputs (AMX where the CPU has it);
 *      then attention alone (forward and backward) at T = 256 and 2048;
 *   3. training steps (forward, backward, AdamW) of Pythia-160M, MHA and
 *      MLKV-2, at T = 256 (B = 8) and T = 2048 (B = 1): tokens/s, MFU and
 *      peak resident memory (each case in its own process); Pythia-14M too
 *      where asked (--case 14M:4x256, dev/bench_plain.sh).
 *
 * FLOPs of a training step per token: 6 x (matmul parameters, the LM head
 * included) + 12 x L x C x T (attention scores and weighted sums, forward and
 * backward, counted without the causal half, as PaLM's MFU does).
 *
 * usage: build/bench [--threads N] [--steps N] [--quick | --gemm | --attention] [--case MODEL:BxT[:bf16] ...]
 *                    [--subnormals] [--busy]
 */
#include "../mlkv.h"
#include "linear.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* --- 1. Peak: ACC independent chains of v = v * m + a per thread, enough to
 * cover the FMA latency on every FMA port, in the widest vectors there are. */
#if defined(__AVX512F__)
#define LANES 16
#define ACC 16
#else
#define LANES 8
#define ACC 10
#endif
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static __attribute__((noinline)) float fma_chains(long iters, float mul, float add) {
    vec acc[ACC], m, a;
    for (int j = 0; j < LANES; j++) m[j] = mul, a[j] = add;
    for (int i = 0; i < ACC; i++)
        for (int j = 0; j < LANES; j++) acc[i][j] = (float)(i + j) * 1e-3f;
    for (long it = 0; it < iters; it++) {
#pragma GCC unroll 16
        for (int i = 0; i < ACC; i++) acc[i] = acc[i] * m + a;
    }
    float s = 0;
    for (int i = 0; i < ACC; i++)
        for (int j = 0; j < LANES; j++) s += acc[i][j];
    return s;
}

/* The best of `reps` runs of `iters` iterations on every thread, GFLOP/s */
static double fma_peak(long iters, int reps) {
    double best = 0;
    for (int rep = 0; rep < reps; rep++) {
        float sink = 0;
        double t0 = now();
#pragma omp parallel reduction(+ : sink)
        sink += fma_chains(iters, 0.999999f, 1e-7f);
        double t = now() - t0, flops = 2.0 * ACC * LANES * (double)iters * threads();
        if (flops / t > best) best = flops / t;
        if (sink == 12345.0f) printf(" ");
    }
    return best / 1e9;
}

/* about 0.3 s: the run's peak */
static double measure_peak(void) { return fma_peak(20000000, 5); }

/* about 10 ms, between repetitions of what is timed: the identical runs of
 * this machine move by 20-30% from one minute to the next (other tenants of
 * a shared host), so a fraction of the run's highest peak understates what
 * a product reached in a slow minute; the peak measured next to it is
 * printed beside it */
static double peak_next_to_it(void) { return fma_peak(2000000, 1); }

/* --- 2. GEMM shapes: a Linear layer out[N, OC] = inp[N, IC] W[OC, IC]^T */
static void bench_gemm(double peak) {
    LinearShape shapes[LINEAR_SHAPES];
    int n_shapes = linear_shapes(2048, shapes);
    printf("\nGEMM shapes of a Pythia-160M step, B*T = 2048 rows (best of 7, after one warm-up)\n");
    const char *bf16_name = bf16_kernel_name(gemm_set_precision(PRECISION_BF16, 1));
    gemm_set_precision(PRECISION_FP32, 1);
    printf("| product | shape (M x N x K) | fp32 GFLOP/s | of the run's peak | of the peak next to it | bf16 GFLOP/s (%s) |\n"
           "|---|---|---|---|---|---|\n", bf16_name);
    for (int s = 0; s < n_shapes; s++) {
        int OC = shapes[s].OC, IC = shapes[s].IC, N = shapes[s].N;
        LinearOperands o;
        if (linear_operands(shapes[s], &o) != 0) { fprintf(stderr, "bench: out of memory\n"); exit(1); }
        for (int kind = 0; kind < 3; kind++) {
            double gf[2], local_peak = 0;
            for (int bf16 = 0; bf16 <= 1; bf16++) {
                gemm_set_precision(bf16 ? PRECISION_BF16 : PRECISION_FP32, 1);
                double best = 1e30;
                for (int rep = 0; rep < 8; rep++) {
                    double t0 = now();
                    linear_product(gemm, kind, shapes[s], &o);
                    double t = now() - t0;
                    if (rep > 0 && t < best) best = t;
                    if (rep > 0 && !bf16) {
                        double p = peak_next_to_it();
                        local_peak = p > local_peak ? p : local_peak;
                    }
                }
                gf[bf16] = 2.0 * N * OC * IC / best / 1e9;
            }
            gemm_set_precision(PRECISION_FP32, 1);
            int M = kind == 2 ? OC : N, NN = kind == 1 || kind == 2 ? IC : OC, K = kind == 0 ? IC : kind == 1 ? OC : N;
            printf("| %s, %s | %d x %d x %d | %.0f | %.2f | %.2f | %.0f |\n", shapes[s].name, linear_products[kind], M, NN, K,
                   gf[0], gf[0] / peak, gf[0] / local_peak, gf[1]);
            fflush(stdout);
        }
        linear_free(&o);
    }
}

/* --- 2b. Attention alone (causal, Pythia-160M's 12 heads of 64): GFLOP/s of
 * the products it needs, counted causal (half of T x T): forward q k^T and
 * p v, 2 T^2 hs per head; backward the scores' and dp's recomputation is
 * not counted, only dq, dk, dv and dp, 4 T^2 hs per head. */
static void bench_attention(double peak) {
    struct { int B, T, kvH; } cases[] = {{8, 256, 12}, {1, 2048, 12}, {1, 2048, 1}};
    int H = 12, hs = 64;
    printf("\nAttention of 12 heads of 64 (best of 5 after one warm-up; FLOPs counted causal, without recomputation)\n");
    printf("| B x T | K/V heads | forward GFLOP/s | of peak | backward GFLOP/s | of peak |\n|---|---|---|---|---|---|\n");
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        int B = cases[c].B, T = cases[c].T, kvH = cases[c].kvH;
        AttentionShape shape = {B, T, H, kvH, hs};
        size_t nq = (size_t)B * T * H * hs, nkv = (size_t)B * T * kvH * hs, nstat = (size_t)B * H * T;
        float *q = malloc(4 * nq), *k = malloc(4 * nkv), *v = malloc(4 * nkv), *out = malloc(4 * nq), *dout = malloc(4 * nq);
        float *dq = malloc(4 * nq), *dk = calloc(nkv, 4), *dv = calloc(nkv, 4), *lse = malloc(4 * nstat);
        float *delta = malloc(4 * nstat), *panels = malloc(4 * attention_panel_floats(shape, 1));
        if (!q || !k || !v || !out || !dout || !dq || !dk || !dv || !lse || !delta || !panels) {
            fprintf(stderr, "bench: out of memory\n");
            exit(1);
        }
        for (size_t i = 0; i < nq; i++) q[i] = (float)(i % 17) * 0.05f - 0.4f, dout[i] = (float)(i % 11) * 0.01f;
        for (size_t i = 0; i < nkv; i++) k[i] = (float)(i % 13) * 0.05f - 0.3f, v[i] = (float)(i % 7) * 0.1f;
        double best[2] = {1e30, 1e30};
        for (int rep = 0; rep < 6; rep++) {
            double t0 = now();
            attention_forward(out, lse, panels, q, k, v, shape);
            double t1 = now();
            attention_backward(dq, dk, dv, delta, panels, dout, q, k, v, out, lse, shape);
            double t2 = now();
            if (rep > 0 && t1 - t0 < best[0]) best[0] = t1 - t0;
            if (rep > 0 && t2 - t1 < best[1]) best[1] = t2 - t1;
        }
        double causal = (double)B * H * T * (T + 1) / 2 * hs * 2; /* one product's FLOPs */
        printf("| %d x %d | %d | %.0f | %.2f | %.0f | %.2f |\n", B, T, kvH, 2 * causal / best[0] / 1e9,
               2 * causal / best[0] / 1e9 / peak, 4 * causal / best[1] / 1e9, 4 * causal / best[1] / 1e9 / peak);
        fflush(stdout);
        free(q); free(k); free(v); free(out); free(dout); free(dq); free(dk); free(dv); free(lse); free(delta);
        free(panels);
    }
}

/* --- 3. Training steps */
static double step_flops_per_token(const Model *m, int T) {
    const Config *c = &m->config;
    double matmul_params = 0;
    for (int i = 0; i < m->n_params; i++)
        if (m->params[i].ndim == 2 && strcmp(m->params[i].name, "gpt_neox.embed_in.weight") != 0)
            matmul_params += (double)m->params[i].numel;
    return 6.0 * matmul_params + 12.0 * c->n_layer * c->hidden_size * T;
}

/* How a training case runs: as mlkv runs, with subnormal numbers kept, or
 * beside one busy process (another program holding a core) */
enum { AS_MLKV, SUBNORMALS_KEPT, BESIDE_BUSY };

static int bench_train(const char *variant, int B, int T, const char *precision, int steps, double peak,
                       int mode) {
    if (mode != SUBNORMALS_KEPT) flush_subnormals(); /* as mlkv itself runs */
    Config c; /* Pythia-160M, or Pythia-14M for the case 14M */
    const char *config = strcmp(variant, "14M") == 0 ? "dev/pythia-14m.config.json" : "dev/pythia-160m.config.json";
    if (config_load(&c, config, NULL) != 0) { fprintf(stderr, "%s\n", mlkv_error()); return 1; }
    if (strcmp(variant, "MLKV-2") == 0) { /* the converter's MLKV-2: 2 owning layers of 1 K/V head, MLP grown */
        c.n_kv_layer = 2;
        c.n_kv_head = 1;
        c.intermediate_size = 3830;
    }
    int bf16 = strcmp(precision, "bf16") == 0, kernel = gemm_set_precision(bf16 ? PRECISION_BF16 : PRECISION_FP32, 1);
    char label[32];
    snprintf(label, sizeof(label), "bf16 (%s)", bf16_kernel_name(kernel));
    Model m;
    if (model_init_random(&m, &c, 1) != 0 || model_prepare(&m, B, T, 1) != 0) {
        fprintf(stderr, "%s\n", mlkv_error());
        return 1;
    }
    int *tokens = malloc(sizeof(int) * B * (T + 1));
    uint64_t r = 12345;
    for (int i = 0; i < B * (T + 1); i++) {
        r = r * 6364136223846793005ULL + 1442695040888963407ULL;
        tokens[i] = (int)((r >> 33) % (uint64_t)c.vocab_size);
    }
    OptimConfig o = {6e-4, 0.9, 0.95, 1e-8, 0.01, 1.0, 1, 1000, SCHEDULE_COSINE};
    double norm, t_total = 0, local_peak = 0;
    float loss = train_step(&m, &o, tokens, 1, 0, &norm); /* warm-up: first touch of every buffer */
    for (int s = 1; s <= steps; s++) {
        double t0 = now();
        loss = train_step(&m, &o, tokens, 1, s, &norm);
        t_total += now() - t0;
        double p = peak_next_to_it();
        local_peak = p > local_peak ? p : local_peak;
    }
    /* the machines this runs on are shared and their clocks vary: the peak is
     * measured again right after the steps, and the highest peak seen is the
     * denominator (the conservative choice) */
    double peak_after = measure_peak();
    peak = peak_after > peak ? peak_after : peak;
    double tok_s = (double)B * T * steps / t_total, fpt = step_flops_per_token(&m, T);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("| %s | %d x %d | %s%s | %.1f | %.0f | %.0f | %.2f | %.0f | %.2f | %.2f | %.2f |\n", variant, B, T,
           bf16 ? label : "fp32", mode == SUBNORMALS_KEPT ? ", subnormals kept" : mode == BESIDE_BUSY ? ", beside a busy process" : "", tok_s, tok_s * fpt / 1e9, peak,
           tok_s * fpt / 1e9 / peak, local_peak, tok_s * fpt / 1e9 / local_peak, (double)ru.ru_maxrss / 1048576.0,
           loss);
    free(tokens);
    model_free(&m);
    return 0;
}

static void usage(void) {
    fprintf(stderr, "usage: dev/bench [--threads N] [--steps N] [--quick | --gemm | --attention] [--case MODEL:BxT ...]\n"
                    "  --threads N   OpenMP threads (all cores)\n"
                    "  --steps N     timed training steps per case, after one warm-up (2)\n"
                    "  --quick       skip the GEMM and attention tables\n"
                    "  --gemm        the GEMM table alone\n"
                    "  --attention   the attention table alone\n"
                    "  --case C      a training case: MHA or MLKV-2 (Pythia-160M) or 14M (Pythia-14M, MHA),\n"
                    "                B x T, and fp32 (default) or bf16,\n"
                    "                e.g. MLKV-2:1x2048:bf16 (repeatable; default: MHA and MLKV-2 at 8x256\n"
                    "                and 1x2048, fp32 and bf16)\n"
                    "  --subnormals  run each case also with subnormal numbers computed as they are\n"
                    "                (mlkv flushes them to zero: flush_subnormals), beside it\n"
                    "  --busy        run each case also beside one busy process (a loop on one core,\n"
                    "                as yes > /dev/null), beside it\n");
}

int main(int argc, char **argv) {
    int steps = 2, quick = 0, attention_only = 0, gemm_only = 0, n_cases = 0, n_threads = 0, subnormals = 0, busy = 0;
    const char *cases[16];
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) n_threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc) steps = atoi(argv[++i]);
        else if (strcmp(argv[i], "--quick") == 0) quick = 1;
        else if (strcmp(argv[i], "--attention") == 0) attention_only = 1;
        else if (strcmp(argv[i], "--gemm") == 0) gemm_only = 1;
        else if (strcmp(argv[i], "--subnormals") == 0) subnormals = 1;
        else if (strcmp(argv[i], "--busy") == 0) busy = 1;
        else if (strcmp(argv[i], "--case") == 0 && i + 1 < argc && n_cases < 16) cases[n_cases++] = argv[++i];
        else if (strcmp(argv[i], "--train-case") == 0 && i + 7 < argc) { /* internal: one case per process */
#ifdef _OPENMP
            if (n_threads > 0) omp_set_num_threads(n_threads);
#endif
            return bench_train(argv[i + 1], atoi(argv[i + 2]), atoi(argv[i + 3]), argv[i + 4], atoi(argv[i + 5]),
                               atof(argv[i + 6]), atoi(argv[i + 7]));
        } else { usage(); return 2; }
    }
#ifdef _OPENMP
    if (n_threads > 0) omp_set_num_threads(n_threads);
#endif
    if (n_cases == 0) {
        static const char *all[8] = {"MHA:8x256",      "MHA:1x2048",      "MLKV-2:8x256",      "MLKV-2:1x2048",
                                     "MHA:8x256:bf16", "MHA:1x2048:bf16", "MLKV-2:8x256:bf16", "MLKV-2:1x2048:bf16"};
        for (n_cases = 0; n_cases < 8; n_cases++) cases[n_cases] = all[n_cases];
    }
    flush_subnormals();
    double peak = measure_peak();
    printf("threads: %d\nfp32 FMA peak, measured: %.0f GFLOP/s (%.1f per thread)\n", threads(), peak, peak / threads());
    if (attention_only || gemm_only) {
        if (gemm_only) bench_gemm(peak);
        if (attention_only) bench_attention(peak);
        return 0;
    }
    if (!quick) {
        bench_gemm(peak);
        bench_attention(peak);
    }
    /* the training cases wait at barriers as mlkv does (passively: mlkv.c's main says why) */
    if (!getenv("OMP_WAIT_POLICY")) setenv("OMP_WAIT_POLICY", "passive", 1);
    printf("\nTraining steps of Pythia-160M (14M: Pythia-14M; random weights and tokens; mean of %d steps after one warm-up)\n", steps);
    printf("FLOPs per token = 6 x (matmul parameters, LM head included) + 12 x L x C x T\n");
    printf("| model | B x T | precision | tokens/s | GFLOP/s | run's peak GFLOP/s | MFU | peak between steps | MFU "
           "(peak between steps) | peak RSS GiB | loss |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
    fflush(stdout);
    for (int i = 0; i < n_cases; i++) {
        char model[32], precision[8] = "fp32", cmd[1024];
        int B, T;
        int fields = sscanf(cases[i], "%31[^:]:%dx%d:%7s", model, &B, &T, precision);
        if (fields < 3 || B < 1 || T < 1 ||
            (strcmp(model, "MHA") != 0 && strcmp(model, "MLKV-2") != 0 && strcmp(model, "14M") != 0) ||
            (strcmp(precision, "fp32") != 0 && strcmp(precision, "bf16") != 0)) {
            fprintf(stderr, "bench: bad case %s\n", cases[i]);
            usage();
            return 2;
        }
        for (int mode = AS_MLKV; mode <= BESIDE_BUSY; mode++) {
            if ((mode == SUBNORMALS_KEPT && !subnormals) || (mode == BESIDE_BUSY && !busy)) continue;
            snprintf(cmd, sizeof(cmd), "%s --threads %d --train-case %s %d %d %s %d %.3f %d", argv[0], threads(), model,
                     B, T, precision, steps, peak, mode);
            pid_t spinner = mode == BESIDE_BUSY ? fork() : -1;
            if (spinner == 0) for (volatile unsigned long n = 0;; n++) {} /* the busy neighbour */
            int rc = system(cmd);
            if (spinner > 0) kill(spinner, SIGKILL), waitpid(spinner, NULL, 0);
            if (rc != 0) { fprintf(stderr, "bench: %s failed\n", cmd); return 1; }
        }
    }
    return 0;
}
