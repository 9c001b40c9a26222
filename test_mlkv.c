/*
 * test_mlkv.c - the tests of mlkv.c. Run from the repository root:
 *     ./test_mlkv path/to/mlkv
 * (make test builds and runs it for every compiler and OpenMP setting).
 *
 * Numbers are checked against fixtures that dev/gen_fixtures.py computed with
 * PyTorch and HF transformers (dev/fixtures/NAME/ref.safetensors). Errors are
 * normalised by the reference tensor's scale: err = max|ours - ref| / max|ref|.
 * Tolerances:
 *   logits, loss             1e-5
 *   gradients                1e-4 (every parameter tensor)
 *   per-step loss and norm   1e-5 over 3 AdamW steps (warmup, cosine, clipping,
 *                            decay, 2 accumulated micro-batches)
 *   parameters after 3 steps 1e-3 of the largest parameter change: Adam divides
 *                            by |g|, so an element whose gradient is 1/100 of
 *                            its tensor's largest sees the gradient error
 *                            (< 1e-5 of the largest) amplified ~100x. Key-bias
 *                            components with a zero true gradient are
 *                            excluded (see is_key_bias).
 *
 * What the tests state, in main()'s order:
 *   - the model equals PyTorch's GPT-NeoX / MLKV on every fixture (MHA, GQA,
 *     MQA, MLKV placements, KV-MLP, a layer map, the reference-compatible
 *     rotary), the reference's pytorch_model.bin checkpoints too;
 *   - the fast kernels equal the naive references of mlkv.c (gemm_naive,
 *     attention_*_naive), and the gradient equals finite differences;
 *   - decoding over the KV cache equals the full forward pass, and the cache
 *     holds 2 * kvL * kvH * hs floats per token;
 *   - MLKV's properties: the owner placement of the reference code, each
 *     layer reading an owner at or below it, K/V parameters in owners only,
 *     an owner's K/V gradient the sum of its readers';
 *   - the converter equals an independent PyTorch statement of the
 *     reference's conversion; the tokenizer equals HF tokenizers; evaluation
 *     equals HF transformers' scores with lm-evaluation-harness's requests
 *     and aggregations;
 *   - the command line: resume bit for bit, graceful stops, and every bad
 *     input refused with a message naming the file and the problem.
 */
#define _POSIX_C_SOURCE 200809L
#define _XOPEN_SOURCE 700 /* realpath */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>
#include <sys/wait.h>

#include "mlkv.h"

static int passed, failed;
static const char *mlkv_bin;
static char tmp_dir[256];

#define CHECK(cond, ...)                                        \
    do {                                                        \
        if (cond) passed++;                                     \
        else {                                                  \
            failed++;                                           \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);         \
            printf(__VA_ARGS__);                                \
            printf("\n");                                       \
        }                                                       \
    } while (0)

/* The model fixtures: every folder of dev/fixtures that holds a
 * ref.safetensors (dev/gen_fixtures.py writes one per configuration), in
 * name order, found at start-up rather than listed here by hand */
#define MAX_FIXTURES 64
static char fixture_names[MAX_FIXTURES][64];
static size_t n_fixtures;

static int exists(const char *fmt, const char *a) {
    char path[600];
    struct stat st;
    snprintf(path, sizeof(path), fmt, a);
    return stat(path, &st) == 0;
}

static int by_name(const void *a, const void *b) {
    return strcmp((const char *)a, (const char *)b);
}

static void find_fixtures(void) {
    DIR *dir = opendir("dev/fixtures");
    for (struct dirent *e; dir && (e = readdir(dir)) != NULL && n_fixtures < MAX_FIXTURES;)
        if (e->d_name[0] != '.' && strlen(e->d_name) < sizeof(fixture_names[0]) &&
            exists("dev/fixtures/%s/ref.safetensors", e->d_name))
            strcpy(fixture_names[n_fixtures++], e->d_name);
    if (dir) closedir(dir);
    qsort(fixture_names, n_fixtures, sizeof(fixture_names[0]), by_name);
}

static double max_abs(const float *x, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(x[i]));
    return m;
}

/* max|a - b| / max|b| */
static double scaled_error(const float *a, const float *b, size_t n) {
    double e = 0;
    for (size_t i = 0; i < n; i++) e = fmax(e, fabs((double)a[i] - b[i]));
    double scale = max_abs(b, n);
    return scale > 0 ? e / scale : e;
}

static float *read_tensor(const SafeTensors *st, const char *name, int ndim, const int *shape,
                          size_t numel) {
    float *x = malloc(numel * sizeof(float));
    if (st_read(st, name, ndim, shape, x, NULL) != 0) {
        printf("fixture: %s\n", mlkv_error());
        exit(1);
    }
    return x;
}

static double meta_number(const SafeTensors *st, const char *key) {
    const char *v = st_metadata(st, key);
    if (!v) { printf("fixture %s: no metadata %s\n", st->path, key); exit(1); }
    return atof(v);
}

/* --- forward, backward and 3 AdamW steps against PyTorch ------------------ */

typedef struct { double logits, loss, grad, step_loss, param; } FixtureErrors;

/* A key bias b adds q.b to every score of a query's row where rotary does not
 * act, which softmax cancels: those components have an exactly-zero true
 * gradient, so Adam turns rounding noise into +-lr steps in any implementation
 * and their values after training are not comparable. */
static int is_key_bias(const ParamInfo *p) {
    return strstr(p->name, "attention.key.bias") || strstr(p->name, "attention.key.dense_out.bias");
}

static int outside_rotary(const Model *m, size_t k) {
    return (int)(k % m->config.head_size) >= m->config.rotary_ndims;
}

/* The model folder dev/fixtures/NAME against dev/fixtures/REF/ref.safetensors */
static void test_fixture(const char *name, const char *ref_name, FixtureErrors *worst) {
    char dir[512], path[600], pname[MLKV_NAME_MAX + 8];
    snprintf(dir, sizeof(dir), "dev/fixtures/%s", name);
    snprintf(path, sizeof(path), "dev/fixtures/%s/ref.safetensors", ref_name);
    Model m;
    SafeTensors ref;
    if (model_load(&m, dir) != 0 || st_open(&ref, path) != 0) {
        CHECK(0, "%s: cannot load: %s", name, mlkv_error());
        return;
    }
    int S = (int)meta_number(&ref, "steps"), A = (int)meta_number(&ref, "grad_accum");
    int B = (int)meta_number(&ref, "batch"), T = (int)meta_number(&ref, "seq"),
        V = m.config.vocab_size;
    int tshape[4] = {S, A, B, T + 1};
    int *tokens = malloc(sizeof(int) * S * A * B * (T + 1));
    CHECK(st_read(&ref, "tokens", 4, tshape, NULL, tokens) == 0, "%s: tokens: %s", name,
          mlkv_error());
    CHECK(model_prepare(&m, B, T, 1) == 0, "%s: prepare: %s", name, mlkv_error());

    /* one forward and backward of micro-batch (0, 0) */
    int *inputs = malloc(sizeof(int) * B * T), *targets = malloc(sizeof(int) * B * T);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            inputs[b * T + t] = tokens[b * (T + 1) + t];
            targets[b * T + t] = tokens[b * (T + 1) + t + 1];
        }
    float loss = model_forward(&m, inputs, targets, B, T);
    int lshape[3] = {B, T, V}, one = 1;
    float *ref_logits = read_tensor(&ref, "logits", 3, lshape, (size_t)B * T * V);
    float *ref_loss = read_tensor(&ref, "loss", 1, &one, 1);
    double e_logits = scaled_error(m.a.logits, ref_logits, (size_t)B * T * V);
    double e_loss = fabs(loss - ref_loss[0]) / fabs(ref_loss[0]);
    CHECK(e_logits <= 1e-5, "%s: logits error %.3g > 1e-5", name, e_logits);
    CHECK(e_loss <= 1e-5, "%s: loss %.7f vs %.7f", name, loss, ref_loss[0]);
    model_zero_grad(&m);
    float loss2 = model_forward_backward(&m, inputs, targets, B, T, 1.0f);
    CHECK(loss2 == loss, "%s: the training pass's loss %.9g differs from the forward's %.9g", name,
          loss2, loss);
    double e_grad = 0;
    for (int i = 0; i < m.n_params; i++) {
        const ParamInfo *p = &m.params[i];
        snprintf(pname, sizeof(pname), "grad.%s", p->name);
        float *g = read_tensor(&ref, pname, p->ndim, p->shape, p->numel);
        double e = scaled_error(m.grad_memory + p->offset, g, p->numel);
        CHECK(e <= 1e-4, "%s: gradient of %s error %.3g > 1e-4", name, p->name, e);
        if (is_key_bias(p)) {
            double floor_ = 0, scale = max_abs(g, p->numel);
            for (size_t k = 0; k < p->numel; k++)
                if (outside_rotary(&m, k))
                    floor_ = fmax(floor_, fabs(m.grad_memory[p->offset + k]));
            CHECK(floor_ <= 1e-5 * scale,
                  "%s: %s outside the rotary dims has gradient %.3g (should be ~0)", name, p->name,
                  floor_);
        }
        e_grad = fmax(e_grad, e);
        free(g);
    }

    /* S optimizer steps from the initial parameters */
    Model fresh;
    CHECK(model_load(&fresh, dir) == 0 && model_prepare(&fresh, B, T, 1) == 0, "%s: reload", name);
    OptimConfig o = {.lr = meta_number(&ref, "lr"), .beta1 = meta_number(&ref, "beta1"),
        .beta2 = meta_number(&ref, "beta2"), .eps = meta_number(&ref, "eps"),
        .weight_decay = meta_number(&ref, "weight_decay"), .clip = meta_number(&ref, "clip"),
        .warmup_steps = (int)meta_number(&ref, "warmup_steps"), .total_steps = S,
        .schedule = SCHEDULE_COSINE};
    float *ref_losses = read_tensor(&ref, "losses", 1, &S, S),
          *ref_norms = read_tensor(&ref, "norms", 1, &S, S);
    float *initial = malloc(fresh.num_parameters * sizeof(float));
    memcpy(initial, fresh.param_memory, fresh.num_parameters * sizeof(float));
    double e_steps = 0;
    for (int s = 0; s < S; s++) {
        double norm;
        float l = train_step(&fresh, &o, tokens + (size_t)s * A * B * (T + 1), A, s, &norm);
        double el = fabs(l - ref_losses[s]) / fabs(ref_losses[s]),
               en = fabs(norm - ref_norms[s]) / ref_norms[s];
        CHECK(el <= 1e-5 && en <= 1e-5, "%s: step %d loss %.7f vs %.7f, norm %.7f vs %.7f", name, s,
              l, ref_losses[s], norm, ref_norms[s]);
        e_steps = fmax(e_steps, fmax(el, en));
    }
    CHECK(ref_norms[0] > o.clip, "%s: the fixture must exercise clipping (norm %.3f, clip %.3f)",
          name, ref_norms[0], o.clip);
    double e_param = 0;
    for (int i = 0; i < fresh.n_params; i++) {
        const ParamInfo *p = &fresh.params[i];
        snprintf(pname, sizeof(pname), "final.%s", p->name);
        float *want = read_tensor(&ref, pname, p->ndim, p->shape, p->numel);
        float *ours = fresh.param_memory + p->offset, *init = initial + p->offset;
        double err = 0, change = 0;
        for (size_t k = 0; k < p->numel; k++) {
            if (is_key_bias(p) && outside_rotary(&fresh, k)) continue;
            err = fmax(err, fabs((double)ours[k] - want[k]));
            change = fmax(change, fabs((double)want[k] - init[k]));
        }
        CHECK(change > 0 && err <= 1e-3 * change,
              "%s: %s after %d steps: error %.3g vs largest change %.3g", name, p->name, S, err,
              change);
        e_param = fmax(e_param, change > 0 ? err / change : err);
        free(want);
    }
    worst->logits = fmax(worst->logits, e_logits);
    worst->loss = fmax(worst->loss, e_loss);
    worst->grad = fmax(worst->grad, e_grad);
    worst->step_loss = fmax(worst->step_loss, e_steps);
    worst->param = fmax(worst->param, e_param);
    printf("  %-22s logits %.1e  loss %.1e  grads %.1e  steps %.1e  params %.1e\n", name, e_logits,
           e_loss, e_grad, e_steps, e_param);
    free(initial); free(ref_losses); free(ref_norms); free(ref_logits); free(ref_loss);
    free(inputs); free(targets); free(tokens);
    st_close(&ref);
    model_free(&fresh);
    model_free(&m);
}

/* --- generation: cached decoding computes the full forward pass's function -- */

static void test_cached_decoding(void) {
    double worst = 0;
    for (size_t f = 0; f < n_fixtures; f++) {
        char dir[300];
        snprintf(dir, sizeof(dir), "dev/fixtures/%.63s", fixture_names[f]);
        Model m;
        KVCache cache;
        /* 64 positions: two key blocks, six query blocks */
        int B = 2, T = 64, V, tokens[128], step[2];
        CHECK(model_load(&m, dir) == 0 && model_prepare(&m, B, T, 0) == 0, "%s: %s", dir,
              mlkv_error());
        if (f == 0)
            CHECK(model_prepare(&m, 1 << 20, 32, 0) != 0 &&
                      strstr(mlkv_error(), "batch 1048576 x sequence length 32 = "
                                           "33554432 tokens at once exceeds 16777216") &&
                      model_prepare(&m, B, T, 0) == 0,
                  "a batch too large to index: %s", mlkv_error());
        V = m.config.vocab_size;
        for (int i = 0; i < B * T; i++) tokens[i] = (i * 7 + 3) % V;
        model_forward(&m, tokens, NULL, B, T);
        CHECK(kv_cache_init(&cache, &m, B, T, 5, 1) == 0, "cache: %s", mlkv_error());
        /* prefill 5 tokens in one call, then one token at a time */
        int prefill[10];
        for (int b = 0; b < B; b++)
            for (int i = 0; i < 5; i++) prefill[b * 5 + i] = tokens[b * T + i];
        const float *logits = model_cached_forward(&m, &cache, prefill, 5);
        double err = 0, scale = max_abs(m.a.logits, (size_t)B * T * V);
        for (int b = 0; b < B; b++)
            for (int i = 0; i < 5; i++)
                for (int v = 0; v < V; v++)
                    err = fmax(err, fabs(logits[((size_t)b * 5 + i) * V + v] -
                                         m.a.logits[((size_t)b * T + i) * V + v]));
        for (int pos = 5; pos < T; pos++) {
            for (int b = 0; b < B; b++) step[b] = tokens[b * T + pos];
            logits = model_cached_forward(&m, &cache, step, 1);
            for (int b = 0; b < B; b++)
                for (int v = 0; v < V; v++)
                    err = fmax(err, fabs(logits[(size_t)b * V + v] -
                                         m.a.logits[((size_t)b * T + pos) * V + v]));
        }
        CHECK(err <= 1e-5 * scale,
              "%s: cached decoding differs from the full forward by %.3g (scale %.3g)", dir, err,
              scale);
        size_t floats_per_token =
            2 * (size_t)m.config.n_kv_layer * m.config.n_kv_head * m.config.head_size;
        CHECK(cache.cache_bytes == floats_per_token * sizeof(float) * B * T, "%s: cache bytes %zu",
              dir, cache.cache_bytes);
        CHECK(model_cached_forward(&m, &cache, step, 1) == NULL &&
                  strstr(mlkv_error(), "holds 64 positions"),
              "a full cache is an error: %s", mlkv_error());
        worst = fmax(worst, err / scale);
        kv_cache_free(&cache);
        model_free(&m);
    }
    printf("  cached decoding vs full forward: worst %.1e "
           "of the largest logit over %zu configurations\n", worst, n_fixtures);
}

/* --- the GEMM against a naive product ------------------------------------- */

/* A small seeded generator for test data: the next 16 bits of an LCG, and a
 * number in [-1000, 1000] / divisor from it. */
static int next_random(unsigned *s) {
    *s = *s * 1103515245u + 12345u;
    return (int)(*s >> 16);
}

static float random_value(unsigned *s, float divisor) {
    return (float)(next_random(s) % 2001 - 1000) / divisor;
}

/* bf16 rounding of x, as the bf16 GEMM packs its inputs (nearest even) */
static double bf16_round(float x) {
    unsigned u;
    memcpy(&u, &x, sizeof(u));
    u += 0x7FFFu + ((u >> 16) & 1u);
    u &= 0xFFFF0000u;
    float r;
    memcpy(&r, &u, sizeof(r));
    return r;
}

/* C = bias + A B with the three stride layouts mlkv uses (forward: B = W^T;
 * input gradient: B = W; weight gradient: A = dout^T, accumulating into C),
 * against gemm_naive. The error of each element is measured against
 * |start| + sum_k |a_ik b_kj| (the scale of its rounding errors: gemm_naive
 * of the absolute values); fp32 must stay below 1e-6 of it, bf16 (inputs
 * rounded, fp32 sums) below 1e-5, against the naive product of the rounded
 * inputs. Returns the worst error. */
static double gemm_case(int M, int N, int K, int layout, int bf16) {
    size_t na = (size_t)M * K, nb = (size_t)K * N, nc = (size_t)M * N;
    float *a = malloc(sizeof(float) * na), *b = malloc(sizeof(float) * nb),
          *c = malloc(sizeof(float) * nc);
    float *bias = malloc(sizeof(float) * N), *ref = malloc(sizeof(float) * nc),
          *scale = malloc(sizeof(float) * nc);
    float *abs_a = malloc(sizeof(float) * na), *abs_b = malloc(sizeof(float) * nb),
          *abs_bias = malloc(sizeof(float) * N);
    unsigned s = (unsigned)(M * 131 + N * 7 + K + layout);
    for (size_t i = 0; i < na; i++) a[i] = random_value(&s, 997.0f);
    for (size_t i = 0; i < nb; i++) b[i] = random_value(&s, 991.0f);
    for (int i = 0; i < N; i++) bias[i] = (float)i / (float)N - 0.5f;
    for (size_t i = 0; i < nc; i++) c[i] = ref[i] = (float)(i % 17) / 17.0f;
    /* logical A(i, k), B(k, j) of each layout, over the same buffers */
    size_t ar = layout == 2 ? 1 : (size_t)K, ac = layout == 2 ? (size_t)M : 1;
    size_t br = layout == 0 ? 1 : (size_t)N, bc = layout == 0 ? (size_t)K : 1;
    int accumulate = layout == 2;
    gemm(M, N, K, a, ar, ac, b, br, bc, c, accumulate, accumulate ? NULL : bias);
    if (bf16) { /* the reference multiplies what the bf16 kernel multiplies */
        for (size_t i = 0; i < na; i++) a[i] = (float)bf16_round(a[i]);
        for (size_t i = 0; i < nb; i++) b[i] = (float)bf16_round(b[i]);
    }
    for (size_t i = 0; i < na; i++) abs_a[i] = fabsf(a[i]);
    for (size_t i = 0; i < nb; i++) abs_b[i] = fabsf(b[i]);
    for (int i = 0; i < N; i++) abs_bias[i] = fabsf(bias[i]);
    for (size_t i = 0; i < nc; i++) scale[i] = fabsf(ref[i]);
    gemm_naive(M, N, K, a, ar, ac, b, br, bc, ref, accumulate, accumulate ? NULL : bias);
    gemm_naive(M, N, K, abs_a, ar, ac, abs_b, br, bc, scale, accumulate,
               accumulate ? NULL : abs_bias);
    double worst = 0;
    for (size_t i = 0; i < nc; i++) worst = fmax(worst, fabs(c[i] - ref[i]) / scale[i]);
    free(a);
    free(b);
    free(c);
    free(bias);
    free(ref);
    free(scale);
    free(abs_a);
    free(abs_b);
    free(abs_bias);
    return worst;
}

/* (64 x 96 x 320: whole 32 x 32 blocks on both sides, which bf16 packs by
 * other loops than ragged ones) */
static void test_gemm(void) {
    const int shapes[][3] = {{1, 1, 1},      {1, 7, 33},     {7, 33, 5},    {33, 7, 257},
                             {13, 257, 70},  {257, 33, 300}, {40, 65, 513}, {3, 50304, 768},
                             {2, 768, 2100}, {64, 96, 320}};
    const char *layouts[3] = {"forward", "input gradient", "weight gradient"};
    double worst[2] = {0, 0};
    for (int bf16 = 0; bf16 <= 1; bf16++) {
        gemm_set_precision(bf16 ? PRECISION_BF16 : PRECISION_FP32, 1);
        for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
            for (int layout = 0; layout < 3; layout++) {
                double e = gemm_case(shapes[s][0], shapes[s][1], shapes[s][2], layout, bf16);
                CHECK(e < (bf16 ? 1e-5 : 1e-6), "gemm %s %dx%dx%d %s: error %.3g",
                      bf16 ? "bf16" : "fp32", shapes[s][0], shapes[s][1], shapes[s][2],
                      layouts[layout], e);
                worst[bf16] = fmax(worst[bf16], e);
            }
    }
    gemm_set_precision(PRECISION_FP32, 1);
    printf("  gemm vs a naive product, %zu shapes x 3 layouts: "
           "worst fp32 %.1e, bf16 %.1e (of sum |a b|)\n",
           sizeof(shapes) / sizeof(shapes[0]), worst[0], worst[1]);
}

/* Each row of C is computed the same way however many rows there are (so a
 * decoding step equals the full pass), and bf16 on AMX or AVX512-BF16 agrees
 * with the portable kernel (to rounding: it differs, so it ran). */
static void test_gemm_rows_and_kernels(void) {
    int M = 50, N = 70, K = 600;
    float *a = malloc(sizeof(float) * M * K), *w = malloc(sizeof(float) * N * K);
    float *all = malloc(sizeof(float) * M * N), *one = malloc(sizeof(float) * N),
          *portable = malloc(sizeof(float) * M * N);
    for (int i = 0; i < M * K; i++) a[i] = sinf((float)i * 0.37f);
    for (int i = 0; i < N * K; i++) w[i] = cosf((float)i * 0.11f);
    int same = 1;
    for (int bf16 = 0; bf16 <= 1; bf16++) {
        gemm_set_precision(bf16 ? PRECISION_BF16 : PRECISION_FP32, 1);
        gemm(M, N, K, a, K, 1, w, 1, K, all, 0, NULL);
        for (int i = 0; i < M; i++) {
            gemm(1, N, K, a + (size_t)i * K, K, 1, w, 1, K, one, 0, NULL);
            same &= memcmp(one, all + (size_t)i * N, sizeof(float) * N) == 0;
        }
    }
    CHECK(same, "a row of the GEMM differs when computed alone");
    int fast = gemm_set_precision(PRECISION_BF16, 1);
    gemm(M, N, K, a, K, 1, w, 1, K, all, 0, NULL);
    gemm_set_precision(PRECISION_BF16, 0);
    gemm(M, N, K, a, K, 1, w, 1, K, portable, 0, NULL);
    gemm_set_precision(PRECISION_FP32, 1);
    double e = scaled_error(all, portable, (size_t)M * N);
    CHECK(e < 1e-6 && (fast == BF16_PORTABLE || e > 0),
          "bf16: %s kernel vs portable kernel: %.3g", bf16_kernel_name(fast), e);
    printf("  gemm rows alone equal the whole product; bf16 %s kernel vs portable: %.1e\n",
           bf16_kernel_name(fast), e);
    free(a); free(w); free(all); free(one); free(portable);
}

/* --- the tiled attention against the textbook one ------------------------- */

/* The largest difference, relative to the largest magnitude of the reference */
static double max_error(const float *x, const float *ref, size_t n) {
    double e = 0, scale = 0;
    for (size_t i = 0; i < n; i++)
        e = fmax(e, fabs(x[i] - ref[i])), scale = fmax(scale, fabs(ref[i]));
    return scale > 0 ? e / scale : e;
}

/* T = 75 spans three key blocks and seven query blocks with ragged ends;
 * GQA groups; head sizes 16 (half a kernel panel) and 64 (two panels).
 * T = 400 and 800 span two and three of the backward pass's chunks of 384
 * keys, whose partial query gradients are summed at the end. */
static void test_attention(void) {
    /* B, T, H, kvH, hs */
    const int cases[][5] = {{2, 75, 4, 2, 16}, {1, 75, 2, 1, 64}, {1, 33, 3, 3, 8},
                            {1, 800, 2, 1, 64}, {2, 400, 4, 2, 16}};
    double worst = 0;
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        int B = cases[c][0], T = cases[c][1], H = cases[c][2], kvH = cases[c][3], hs = cases[c][4];
        size_t nq = (size_t)B * T * H * hs, nkv = (size_t)B * T * kvH * hs,
               stats = (size_t)B * H * T;
        AttentionShape shape = {B, T, H, kvH, hs};
        size_t panels = attention_panel_floats(shape, 1);
        float *q = malloc(sizeof(float) * nq), *k = malloc(sizeof(float) * nkv),
              *v = malloc(sizeof(float) * nkv);
        float *dout = malloc(sizeof(float) * nq), *out = malloc(sizeof(float) * nq),
              *lse = malloc(sizeof(float) * stats);
        float *dq = malloc(sizeof(float) * nq), *dk = calloc(nkv, sizeof(float)),
              *dv = calloc(nkv, sizeof(float));
        float *delta = malloc(sizeof(float) * stats), *scratch = malloc(sizeof(float) * panels);
        /* the naive attention's outputs, and its probabilities [B, H, T, T] */
        float *r_out = malloc(sizeof(float) * nq), *r_lse = malloc(sizeof(float) * stats);
        float *r_dq = malloc(sizeof(float) * nq), *r_dk = calloc(nkv, sizeof(float)),
              *r_dv = calloc(nkv, sizeof(float));
        float *att = malloc(sizeof(float) * stats * T);
        unsigned s = 99 + (unsigned)c;
        for (size_t i = 0; i < nq; i++) {
            q[i] = random_value(&s, 250.0f);
            dout[i] = random_value(&s, 1000.0f);
        }
        for (size_t i = 0; i < nkv; i++) {
            k[i] = random_value(&s, 250.0f);
            v[i] = random_value(&s, 1000.0f);
        }
        attention_forward(out, lse, scratch, q, k, v, shape);
        attention_backward(dq, dk, dv, delta, scratch, dout, q, k, v, out, lse, shape);
        attention_forward_naive(r_out, r_lse, att, q, k, v, shape);
        attention_backward_naive(r_dq, r_dk, r_dv, dout, att, q, k, v, shape);
        double e[5] = {max_error(out, r_out, nq), max_error(lse, r_lse, stats),
                       max_error(dq, r_dq, nq), max_error(dk, r_dk, nkv), max_error(dv, r_dv, nkv)};
        const char *names[5] = {"out", "lse", "dq", "dk", "dv"};
        for (int i = 0; i < 5; i++) {
            CHECK(e[i] < 1e-5, "attention B=%d T=%d H=%d kvH=%d hs=%d: %s error %.3g", B, T, H, kvH,
                  hs, names[i], e[i]);
            worst = fmax(worst, e[i]);
        }
        free(q);
        free(k);
        free(v);
        free(dout);
        free(out);
        free(lse);
        free(dq);
        free(dk);
        free(dv);
        free(delta);
        free(scratch); free(r_out); free(r_lse); free(r_dq); free(r_dk); free(r_dv); free(att);
    }
    printf("  tiled attention vs attention_*_naive (T up to 800, GQA, hs 8/16/64): worst %.1e\n",
           worst);
}

/* --- central finite differences against the analytic gradient ------------- */

static void test_finite_differences(void) {
    Model m;
    CHECK(model_load(&m, "dev/fixtures/mlkv_2x2_compat") == 0, "load: %s", mlkv_error());
    /* 576 rows: the training pass computes the head in two chunks of rows
     * (HEAD_ROWS = 512), attention spans several key and query blocks */
    int B = 9, T = 64, N = B * T, inputs[576], targets[576];
    unsigned s = 7;
    for (int i = 0; i < N; i++) {
        inputs[i] = next_random(&s) % m.config.vocab_size;
        targets[i] = next_random(&s) % m.config.vocab_size;
    }
    model_prepare(&m, B, T, 1);
    model_zero_grad(&m);
    float loss = model_forward_backward(&m, inputs, targets, B, T, 1.0f);
    /* the same loss from all logits at once (a model prepared without gradients) */
    Model whole;
    CHECK(model_load(&whole, "dev/fixtures/mlkv_2x2_compat") == 0 &&
              model_prepare(&whole, B, T, 0) == 0 && whole.head_rows == N && m.head_rows < N,
          "prepare: %s", mlkv_error());
    float whole_loss = model_forward(&whole, inputs, targets, B, T);
    CHECK(whole_loss == loss, "loss in chunks of rows %.9g, all at once %.9g", loss, whole_loss);
    CHECK(isnan(model_forward_backward(&whole, inputs, targets, B, T, 1.0f)) &&
              strstr(mlkv_error(), "without gradients"),
          "a training pass on a model prepared without gradients: %s", mlkv_error());
    CHECK(isnan(model_forward(&m, inputs, NULL, B, T)) && strstr(mlkv_error(), "without gradients"),
          "all logits of a training model: %s", mlkv_error());
    model_free(&whole);
    /* shared K/V of an owner (layer 0 serves layers 0 and 1), a non-owner's query,
     * LayerNorms, MLP, embeddings and head */
    const char *names[] = {"gpt_neox.layers.0.attention.key.weight",
                           "gpt_neox.layers.0.attention.value.bias",
                           "gpt_neox.layers.2.attention.key.bias",
                           "gpt_neox.layers.1.attention.query.weight",
                           "gpt_neox.layers.3.input_layernorm.weight",
                           "gpt_neox.layers.1.mlp.dense_4h_to_h.weight",
                           "gpt_neox.embed_in.weight",
                           "embed_out.weight",
                           "gpt_neox.final_layer_norm.bias"};
    double worst = 0;
    for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++) {
        const ParamInfo *p = model_param(&m, names[k]);
        CHECK(p != NULL, "no parameter %s", names[k]);
        if (!p) continue;
        /* the element with the largest gradient: finite differences in float
         * resolve it well */
        size_t best = 0;
        for (size_t i = 0; i < p->numel; i++)
            if (fabsf(m.grad_memory[p->offset + i]) > fabsf(m.grad_memory[p->offset + best]))
                best = i;
        float *x = m.param_memory + p->offset + best, x0 = *x, h = 1e-2f;
        *x = x0 + h;
        double up = model_forward(&m, inputs, targets, B, T);
        *x = x0 - h;
        double down = model_forward(&m, inputs, targets, B, T);
        *x = x0;
        double fd = (up - down) / (2.0 * h), analytic = m.grad_memory[p->offset + best];
        double rel = fabs(fd - analytic) / fmax(fabs(analytic), 1e-3);
        CHECK(rel < 2e-2, "finite differences, %s[%zu]: %.6g vs analytic %.6g", names[k], best, fd,
              analytic);
        worst = fmax(worst, rel);
    }
    printf("  finite differences: worst relative error %.2e over %zu tensors\n", worst,
           sizeof(names) / sizeof(names[0]));
    model_free(&m);
}

/* --- small pure functions ------------------------------------------------- */

static void test_owner_placement(void) {
    /* the reference's placement [0] + [int((i+1) * (L / kvL)) for i in range(kvL-1)]
     * on its own examples for L = 12, and kvL not dividing L */
    struct { int L, kvL, owners[8];
    } cases[] = {{12, 4, {0, 3, 6, 9}}, {12, 6, {0, 2, 4, 6, 8, 10}}, {12, 2, {0, 6}}, {12, 1, {0}},
                 {4, 3, {0, 1, 2}},     {24, 5, {0, 4, 9, 14, 19}}};
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        int owners[MLKV_MAX_LAYERS];
        kv_owner_layers(cases[c].L, cases[c].kvL, owners);
        int same = 1;
        for (int i = 0; i < cases[c].kvL; i++) same &= owners[i] == cases[c].owners[i];
        CHECK(same, "owners of L=%d kvL=%d", cases[c].L, cases[c].kvL);
    }
    Config cfg = {.vocab_size = 8, .hidden_size = 8, .n_layer = 12, .n_head = 2,
        .intermediate_size = 8, .max_position_embeddings = 8, .n_kv_head = 1, .n_kv_layer = 4,
        .rotary_pct = 0.5, .rotary_base = 10000, .layer_norm_eps = 1e-5};
    CHECK(config_finalize(&cfg, "test") == 0, "finalize: %s", mlkv_error());
    int want[12] = {0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9};
    for (int l = 0; l < 12; l++)
        CHECK(cfg.kv_layer_of[l] == want[l], "layer %d reads %d", l, cfg.kv_layer_of[l]);
}

/* --- MLKV's properties, stated directly ----------------------------------- */

/* In every model fixture: each layer reads the K/V of an owner at or below
 * it, an owner reads its own, there are num_key_value_layers owners, and only
 * owners have K/V parameters (a reader has none to train). The cache's
 * 2 * kvL * kvH * hs floats per token: test_cached_decoding. */
static void test_mlkv_layers(void) {
    for (size_t f = 0; f < n_fixtures; f++) {
        char dir[96], key[MLKV_NAME_MAX], value[MLKV_NAME_MAX];
        snprintf(dir, sizeof(dir), "dev/fixtures/%.63s", fixture_names[f]);
        Model m;
        if (model_load(&m, dir) != 0) {
            CHECK(0, "load %s: %s", dir, mlkv_error());
            continue;
        }
        const Config *c = &m.config;
        const char *projection = c->use_kv_mlp ? ".dense_out" : "";
        int owners = 0;
        for (int l = 0; l < c->n_layer; l++) {
            int owner = c->kv_layer_of[l], is_owner = owner == l;
            CHECK(owner >= 0 && owner <= l && c->kv_layer_of[owner] == owner,
                  "%s: layer %d reads layer %d, which is no owner at or below it", dir, l, owner);
            owners += is_owner;
            snprintf(key, sizeof(key), "gpt_neox.layers.%d.attention.key%s.weight", l, projection);
            snprintf(value, sizeof(value), "gpt_neox.layers.%d.attention.value%s.weight", l,
                     projection);
            CHECK((model_param(&m, key) != NULL) == is_owner &&
                      (model_param(&m, value) != NULL) == is_owner,
                  "%s: layer %d (%s) %s K/V parameters", dir, l, is_owner ? "an owner" : "a reader",
                  is_owner ? "lacks" : "has");
        }
        CHECK(owners == c->n_kv_layer, "%s: %d owners, num_key_value_layers %d", dir, owners,
              c->n_kv_layer);
        model_free(&m);
    }
}

/* An owner's K/V gradient is the sum of its readers' contributions. Two
 * layers read one owner's k, v, each with its own queries and output
 * gradient; the model runs both attention backward passes into the owner's
 * one dk, dv. That must equal the two readers' gradients computed apart
 * (by the naive attention) and added. */
static void test_readers_add_into_owner(void) {
    AttentionShape shape = {1, 40, 4, 2, 16};
    size_t nq = (size_t)shape.B * shape.T * shape.H * shape.hs;
    size_t nkv = (size_t)shape.B * shape.T * shape.kvH * shape.hs;
    size_t stats = (size_t)shape.B * shape.H * shape.T;
    float *k = malloc(sizeof(float) * nkv), *v = malloc(sizeof(float) * nkv);
    float *dk = calloc(nkv, sizeof(float)), *dv = calloc(nkv, sizeof(float));
    float *dk_apart[2] = {calloc(nkv, sizeof(float)), calloc(nkv, sizeof(float))};
    float *dv_apart[2] = {calloc(nkv, sizeof(float)), calloc(nkv, sizeof(float))};
    float *q = malloc(sizeof(float) * nq), *dout = malloc(sizeof(float) * nq),
          *out = malloc(sizeof(float) * nq);
    float *dq = malloc(sizeof(float) * nq), *lse = malloc(sizeof(float) * stats),
          *delta = malloc(sizeof(float) * stats);
    float *att = malloc(sizeof(float) * stats * shape.T);
    float *panels = malloc(sizeof(float) * attention_panel_floats(shape, 1));
    unsigned s = 5;
    for (size_t i = 0; i < nkv; i++) {
        k[i] = random_value(&s, 250.0f);
        v[i] = random_value(&s, 1000.0f);
    }
    for (int reader = 0; reader < 2; reader++) {
        for (size_t i = 0; i < nq; i++) {
            q[i] = random_value(&s, 250.0f);
            dout[i] = random_value(&s, 1000.0f);
        }
        attention_forward(out, lse, panels, q, k, v, shape);
        /* adds into the owner's dk, dv */
        attention_backward(dq, dk, dv, delta, panels, dout, q, k, v, out, lse, shape);
        attention_forward_naive(out, lse, att, q, k, v, shape);
        attention_backward_naive(dq, dk_apart[reader], dv_apart[reader], dout, att, q, k, v, shape);
    }
    for (size_t i = 0; i < nkv; i++) {
        dk_apart[0][i] += dk_apart[1][i];
        dv_apart[0][i] += dv_apart[1][i];
    }
    double ek = max_error(dk, dk_apart[0], nkv), ev = max_error(dv, dv_apart[0], nkv);
    double second = max_abs(dk_apart[1], nkv) / max_abs(dk_apart[0], nkv);
    CHECK(ek < 1e-5 && ev < 1e-5,
          "the owner's dk, dv differ from the sum of its readers' by %.3g, %.3g", ek, ev);
    CHECK(second > 0.1, "the second reader's share is too small to tell (%.3g)", second);
    printf("  two readers of one owner: its dk, dv = the sum of theirs apart, within %.1e, %.1e\n",
           ek, ev);
    free(k); free(v); free(dk); free(dv); free(dk_apart[0]); free(dk_apart[1]); free(dv_apart[0]);
    free(dv_apart[1]);
    free(q);
    free(dout);
    free(out);
    free(dq);
    free(lse);
    free(delta);
    free(att);
    free(panels);
}

static void test_schedule(void) {
    OptimConfig o = {.lr = 1.0, .warmup_steps = 2, .total_steps = 10, .schedule = SCHEDULE_COSINE};
    CHECK(lr_at_step(&o, 0) == 0.0, "the first update uses lr 0");
    CHECK(fabs(lr_at_step(&o, 1) - 0.5) < 1e-15, "warmup is linear");
    CHECK(fabs(lr_at_step(&o, 2) - 1.0) < 1e-15, "peak after warmup");
    CHECK(fabs(lr_at_step(&o, 6) - 0.5) < 1e-12, "cosine midpoint");
    o.schedule = SCHEDULE_LINEAR;
    CHECK(fabs(lr_at_step(&o, 6) - 0.5) < 1e-12, "linear midpoint");
    o.schedule = SCHEDULE_CONSTANT;
    CHECK(lr_at_step(&o, 9) == 1.0, "constant");
}

static void test_json(void) {
    const char *text =
        "{\"a\": [1, -2.5e3, true, null], \"s\": \"x\\u00e9\\ud83d\\ude00\\n\\\"\", \"o\": {}}";
    Json j;
    CHECK(json_parse(text, strlen(text), "inline", &j) == 0, "parse: %s", mlkv_error());
    const Json *a = json_get(&j, "a"), *s = json_get(&j, "s");
    CHECK(a && a->length == 4 && a->items[1].number == -2500.0 && a->items[2].type == JSON_BOOL,
          "array values");
    CHECK(s && strcmp(s->string, "x\xc3\xa9\xf0\x9f\x98\x80\n\"") == 0, "string escapes to UTF-8");
    json_free(&j);
    const char *bad[] = {"{\"a\": }", "[1, 2", "{\"a\" 1}", "\"\\q\"", "[1] x", "{\"a\": tru}"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        CHECK(json_parse(bad[i], strlen(bad[i]), "bad.json", &j) != 0 &&
                  strstr(mlkv_error(), "bad.json: invalid JSON"),
              "malformed JSON %s must fail with the file name, got: %s", bad[i], mlkv_error());
    }
}

/* A safetensors file: the 8-byte header length, the header, the data */
static void write_safetensors(const char *path, const char *header, const void *data,
                              size_t bytes) {
    uint64_t n = strlen(header);
    FILE *f = fopen(path, "wb");
    fwrite(&n, 8, 1, f);
    fwrite(header, 1, n, f);
    fwrite(data, 1, bytes, f);
    fclose(f);
}

/* F16 and BF16 bit patterns with values fixed by IEEE 754 */
static void test_half_precision(void) {
    char path[300];
    snprintf(path, sizeof(path), "%s/halves.safetensors", tmp_dir);
    const char *header = "{\"h\":{\"dtype\":\"F16\",\"shape\":[5],\"data_offsets\":[0,10]},"
                         "\"b\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[10,16]}}";
    uint16_t data[8] = {0x3C00, 0xC100, 0x7BFF, 0x0001, 0xFC00, 0x3F80, 0xC020, 0x4049};
    write_safetensors(path, header, data, sizeof(data));
    SafeTensors st;
    float h[5], b[3];
    int five = 5, three = 3;
    CHECK(st_open(&st, path) == 0, "open: %s", mlkv_error());
    CHECK(st_read(&st, "h", 1, &five, h, NULL) == 0 && st_read(&st, "b", 1, &three, b, NULL) == 0,
          "read halves");
    CHECK(h[0] == 1.0f && h[1] == -2.5f && h[2] == 65504.0f && h[3] == ldexpf(1.0f, -24) &&
              isinf(h[4]) && h[4] < 0,
          "F16 values: %g %g %g %g %g", h[0], h[1], h[2], h[3], h[4]);
    CHECK(b[0] == 1.0f && b[1] == -2.5f && b[2] == 3.140625f, "BF16 values: %g %g %g", b[0], b[1],
          b[2]);
    int four = 4;
    CHECK(st_read(&st, "h", 1, &four, h, NULL) != 0 &&
              strstr(mlkv_error(), "has shape [5], expected [4]"),
          "shape mismatch is reported: %s", mlkv_error());
    st_close(&st);
}

/* --- sampling ------------------------------------------------------------ */

/* splitmix64's uniform in [0, 1), the generator sample_token draws from */
static double splitmix_uniform(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return ((z ^ (z >> 31)) >> 11) * (1.0 / 9007199254740992.0);
}

static int by_probability(const void *a, const void *b) {
    float x = ((const Candidate *)a)->p, y = ((const Candidate *)b)->p;
    return x < y ? 1 : x > y ? -1 : ((const Candidate *)a)->id - ((const Candidate *)b)->id;
}

/* top-k / top-p by their definition: every candidate sorted, the kept prefix
 * summed and drawn from in that order */
static int sample_by_sorting(const float *logits, int V, const SamplingConfig *s,
                             uint64_t *rng, Candidate *c) {
    int best = 0;
    for (int i = 1; i < V; i++) best = logits[i] > logits[best] ? i : best;
    double sum = 0, kept = 0, total = 0;
    for (int i = 0; i < V; i++) {
        c[i] = (Candidate){(float)exp((logits[i] - logits[best]) / s->temperature), i};
        sum += c[i].p;
    }
    qsort(c, (size_t)V, sizeof(Candidate), by_probability);
    int keep = s->top_k > 0 && s->top_k < V ? s->top_k : V;
    for (int i = 0; i < keep; i++)
        if ((kept += c[i].p / sum) >= s->top_p && s->top_p < 1.0) { keep = i + 1; break; }
    for (int i = 0; i < keep; i++) total += c[i].p;
    double r = splitmix_uniform(rng) * total;
    for (int i = 0; i < keep; i++)
        if ((r -= c[i].p) < 0) return c[i].id;
    return c[keep - 1].id;
}

/* sample_token: with top_k / top_p the very tokens of sorting the whole
 * vocabulary, draw for draw (it selects the kept ones a chunk at a time);
 * without them, each token as often as softmax(logits / T) says */
static void test_sampling(void) {
    enum { V = 3000, DRAWS = 4000, FREQ_DRAWS = 200000 };
    static float logits[V];
    static Candidate scratch[V], reference[V];
    static int counts[V];
    unsigned seed = 99;
    for (int i = 0; i < V; i++) logits[i] = random_value(&seed, 150.0f); /* spread +-6.7 */
    SamplingConfig cases[] = {{1.0, 1.0, 10},  {0.8, 0.9, 0},    {1.0, 0.5, 50},
                              {1.3, 0.999, 0}, {1.0, 1.0, 1},    {2.0, 0.3, 0},
                              {1.0, 1.0, V - 1}};
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        uint64_t a = 7 + k, b = 7 + k;
        int same = 0;
        for (int d = 0; d < DRAWS; d++)
            same += sample_token(logits, V, &cases[k], &a, scratch) ==
                    sample_by_sorting(logits, V, &cases[k], &b, reference);
        CHECK(same == DRAWS, "top_k %d top_p %g T %g: %d of %d draws as by sorting",
              cases[k].top_k, cases[k].top_p, cases[k].temperature, same, DRAWS);
    }
    SamplingConfig all = {1.0, 1.0, 0};
    uint64_t rng = 1;
    double sum = 0, worst = 0;
    float max = logits[0];
    for (int i = 1; i < V; i++) max = logits[i] > max ? logits[i] : max;
    for (int i = 0; i < V; i++) sum += exp(logits[i] - max);
    for (int d = 0; d < FREQ_DRAWS; d++) counts[sample_token(logits, V, &all, &rng, scratch)]++;
    /* in standard deviations of a count: each token expected 50 times or more, and the
     * rare ones together */
    double rare_p = 0, rare_count = 0;
    for (int i = 0; i < V; i++) {
        double p = exp(logits[i] - max) / sum;
        if (FREQ_DRAWS * p < 50) { rare_p += p, rare_count += counts[i]; continue; }
        worst = fmax(worst, fabs(counts[i] - FREQ_DRAWS * p) / sqrt(FREQ_DRAWS * p * (1 - p)));
    }
    worst = fmax(worst, fabs(rare_count - FREQ_DRAWS * rare_p) /
                            sqrt(FREQ_DRAWS * rare_p * (1 - rare_p)));
    CHECK(worst < 5.5, "the whole distribution: a count %.1f standard deviations off", worst);
    printf("  sampling: top-k / top-p draw for draw as by sorting (%d draws x 7), the whole "
           "softmax within %.1f standard deviations (%d draws)\n", DRAWS, worst, FREQ_DRAWS);
}

/* flush_subnormals (which main() called first): where the CPU has the mode, a
 * result below fp32's smallest normal number is 0, on every OpenMP thread */
static void test_flush_subnormals(void) {
#if (defined(__x86_64__) || defined(__aarch64__)) && (defined(__GNUC__) || defined(__clang__))
    int threads_seen = 0, flushed = 0;
#ifdef _OPENMP
#pragma omp parallel reduction(+ : threads_seen, flushed)
#endif
    {
        volatile float smallest_normal = 1.17549435e-38f, half = 0.5f;
        threads_seen++;
        flushed += smallest_normal * half == 0.0f;
    }
    CHECK(flushed == threads_seen, "subnormal results flushed on %d of %d threads", flushed,
          threads_seen);
#endif
}

/* --- the command line: resume, errors ------------------------------------- */

/* Runs a shell command; returns its exit code, the output of all of it
 * (stdout and stderr, less what the command itself sends elsewhere, as a
 * 2>/dev/null of its own) in tmp_dir/out.txt */
static int run(const char *fmt, ...) {
    char cmd[2048], full[2400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    snprintf(full, sizeof(full), "{ %s\n} > %s/out.txt 2>&1", cmd, tmp_dir);
    int status = system(full);
    return status == -1 ? -1 : WEXITSTATUS(status);
}

static char *output(void) {
    static char buf[65536];
    char path[300];
    snprintf(path, sizeof(path), "%s/out.txt", tmp_dir);
    FILE *f = fopen(path, "rb");
    size_t n = f ? fread(buf, 1, sizeof(buf) - 1, f) : 0;
    if (f) fclose(f);
    buf[n] = '\0';
    return buf;
}

/* What a computing command printed after its first line, which says which
 * kernels and threads compute ("mlkv: AVX-512 (chosen at run time) kernels,
 * 2 threads ..."); "" when that line is not there */
static const char *after_kernels_line(const char *out) {
    const char *end = strchr(out, '\n');
    if (strncmp(out, "mlkv: ", 6) != 0 || !end || !strstr(out, " kernels, ") ||
        strstr(out, " kernels, ") > end)
        return "";
    return end + 1;
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    char *d = malloc(*len + 1);
    *len = fread(d, 1, *len, f);
    d[*len] = '\0';
    fclose(f);
    return d;
}

static int same_file(const char *a, const char *b) {
    size_t la = 0, lb = 0;
    char *x = slurp(a, &la), *y = slurp(b, &lb);
    int same = x && y && la == lb && memcmp(x, y, la) == 0;
    free(x);
    free(y);
    return same;
}

/* The loss column of a training log, one line per step. */
static void log_losses(const char *path, char *out, size_t n) {
    size_t len;
    char *d = slurp(path, &len);
    out[0] = '\0';
    for (char *line = d ? strtok(d, "\n") : NULL; line; line = strtok(NULL, "\n")) {
        char *c1 = strchr(line, ','), *c2 = c1 ? strchr(c1 + 1, ',') : NULL,
             *c3 = c2 ? strchr(c2 + 1, ',') : NULL;
        char *c4 = c3 ? strchr(c3 + 1, ',') : NULL;
        if (!c4) continue;
        /* step, loss, lr, norm; tokens/s varies between runs */
        snprintf(out + strlen(out), n - strlen(out), "%.*s|", (int)(c4 - line), line);
    }
    free(d);
}

static void write_tokens(const char *path, int n, int vocab, unsigned seed) {
    uint16_t *t = malloc(sizeof(uint16_t) * n);
    for (int i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        t[i] = (uint16_t)((seed >> 16) % (unsigned)vocab);
    }
    CHECK(tokens_save(path, t, (size_t)n) == 0, "tokens_save: %s", mlkv_error());
    free(t);
}

static void test_resume(void) {
    char train[300];
    snprintf(train, sizeof(train), "%s/train.bin", tmp_dir);
    write_tokens(train, 3000, 64, 99);
    const char *common = "--model dev/fixtures/gqa --batch 2 --seq 16 --grad-accum 2 --steps 6 "
                         "--lr 1e-2 --warmup-steps 2 --eval-every 0";
    CHECK(run("%s train %s --train %s --val %s --out %s/straight", mlkv_bin, common, train, train,
              tmp_dir) == 0,
          "straight run: %s", output());
    CHECK(strstr(output(), "step     6/6") != NULL, "progress lines: %s", output());
    CHECK(run("%s train %s --train %s --val %s --out %s/pieces --stop-after 4 --threads 1",
              mlkv_bin, common, train, train, tmp_dir) == 0,
          "first piece: %s", output());
    CHECK(run("%s train --resume --batch 2 --seq 16 --grad-accum 2 --steps 6 --lr 1e-2 "
              "--warmup-steps 2 --eval-every 0 --train %s --val %s --out %s/pieces",
              mlkv_bin, train, train, tmp_dir) == 0,
          "resumed piece: %s", output());
    CHECK(strstr(output(), "resuming at step 4 of 6") != NULL, "resume message: %s", output());
    char a[300], b[300], la[4096], lb[4096];
    snprintf(a, sizeof(a), "%s/straight.log.csv", tmp_dir);
    snprintf(b, sizeof(b), "%s/pieces.log.csv", tmp_dir);
    log_losses(a, la, sizeof(la));
    log_losses(b, lb, sizeof(lb));
    CHECK(strlen(la) > 40 && strcmp(la, lb) == 0, "resumed losses differ:\n%s\n%s", la, lb);
    const char *files[] = {"model.safetensors", "optimizer.safetensors", "config.json"};
    for (int i = 0; i < 3; i++) {
        snprintf(a, sizeof(a), "%s/straight/%s", tmp_dir, files[i]);
        snprintf(b, sizeof(b), "%s/pieces/%s", tmp_dir, files[i]);
        CHECK(same_file(a, b), "%s differs between the straight and the resumed run", files[i]);
    }
    /* resuming a finished run trains nothing and rewrites nothing */
    snprintf(a, sizeof(a), "%s/pieces/model.safetensors", tmp_dir);
    struct stat before_resume, after_resume;
    CHECK(stat(a, &before_resume) == 0, "%s exists", a);
    CHECK(run("%s train --resume --batch 2 --seq 16 --grad-accum 2 --steps 6 --lr 1e-2 "
              "--warmup-steps 2 --eval-every 0 --train %s --val %s --out %s/pieces",
              mlkv_bin, train, train, tmp_dir) == 0 &&
              strstr(output(), "already trained to step 6 of 6; nothing to do") &&
              !strstr(output(), "step     6/6"),
          "resuming a finished run: %s", output());
    CHECK(stat(a, &after_resume) == 0 && after_resume.st_mtime == before_resume.st_mtime &&
              after_resume.st_ino == before_resume.st_ino,
          "a finished run's checkpoint is left as it was");
    snprintf(b, sizeof(b), "%s/pieces.log.csv", tmp_dir);
    log_losses(b, lb, sizeof(lb));
    CHECK(strcmp(la, lb) == 0, "a finished run's log is left as it was:\n%s\n%s", la, lb);
    /* a save that cannot complete leaves the previous checkpoint as it was */
    CHECK(run("%s train %s --train %s --out %s/kept --stop-after 2 --verbose", mlkv_bin, common,
              train, tmp_dir) == 0 &&
              strstr(output(), "= activations") && strstr(output(), "AdamW moments"),
          "--verbose memory: %s", output());
    snprintf(a, sizeof(a), "%s/kept/model.safetensors", tmp_dir);
    size_t before_len, after_len;
    char *before = slurp(a, &before_len);
    CHECK(run("touch %s/kept.saving", tmp_dir) == 0, "block the staging folder");
    CHECK(run("%s train --resume --batch 2 --seq 16 --grad-accum 2 --steps 6 --lr 1e-2 "
              "--warmup-steps 2 --eval-every 0 --train %s --out %s/kept",
              mlkv_bin, train, tmp_dir) == 1 &&
              strstr(output(), "kept.saving: exists and is not a folder"),
          "a failed save: %s", output());
    char *after = slurp(a, &after_len);
    CHECK(before && after && before_len == after_len && !memcmp(before, after, before_len),
          "the previous checkpoint is intact after a failed save");
    free(before);
    free(after);
    /* a save interrupted between its two renames leaves the checkpoint as DIR.previous: resume says
     * so */
    CHECK(run("rm -f %s/kept.saving && mv %s/kept %s/kept.previous && mkdir %s/kept", tmp_dir,
              tmp_dir, tmp_dir, tmp_dir) == 0,
          "move the checkpoint aside");
    CHECK(run("%s train --resume --batch 2 --seq 16 --grad-accum "
              "2 --steps 6 --train %s --out %s/kept", mlkv_bin, train, tmp_dir) == 1 &&
              strstr(output(), "mlkv: error: ") && strstr(output(), "kept/config.json") &&
              strstr(output(), "\nmlkv: note: ") &&
              strstr(output(), "kept.previous holds the last complete checkpoint"),
          "resume beside DIR.previous: %s", output());
    /* a resume must keep the settings that made the checkpoint */
    CHECK(run("%s train --resume --batch 4 --seq 16 --grad-accum "
              "2 --steps 6 --train %s --out %s/pieces", mlkv_bin, train, tmp_dir) == 1 &&
              strstr(output(), "resume with the same settings"),
          "changed settings: %s", output());
    /* and its position is checked, not trusted: a step past the run (same length, so the header
     * still fits) */
    snprintf(a, sizeof(a), "%s/pieces/optimizer.safetensors", tmp_dir);
    size_t len;
    /* the step in the JSON header, searched past its 8-byte length */
    char *opt = slurp(a, &len), *at = opt && len > 8 ? strstr(opt + 8, "\"step\":\"6\"") : NULL;
    if (at) {
        at[8] = '9';
        FILE *f = fopen(a, "wb");
        fwrite(opt, 1, len, f);
        fclose(f);
    }
    CHECK(at &&
              run("%s train --resume --batch 2 --seq 16 --grad-accum 2 --steps 6 --lr 1e-2 "
                  "--warmup-steps 2 --eval-every 0 --train %s --out %s/pieces",
                  mlkv_bin, train, tmp_dir) == 1 &&
              strstr(output(), "metadata step \"9\", epoch") &&
              strstr(output(), "are not a position in this run of 6 steps"),
          "a step past the run: %s", output());
    free(opt);
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    fputs(text, f);
    fclose(f);
}

/* Copies a fixture model folder to tmp_dir/name, optionally with another config. */
static void copy_model(const char *fixture, const char *name, const char *config_text) {
    CHECK(run("rm -rf %s/%s && mkdir -p %s/%s && cp dev/fixtures/%s/config.json "
              "dev/fixtures/%s/model.safetensors %s/%s",
              tmp_dir, name, tmp_dir, name, fixture, fixture, tmp_dir, name) == 0,
          "copy %s", fixture);
    if (config_text) {
        char path[400];
        snprintf(path, sizeof(path), "%s/%s/config.json", tmp_dir, name);
        write_text(path, config_text);
    }
}

#define TINY_CONFIG(extra)                                                                         \
    "{\"model_type\": \"gpt_neox\", \"vocab_size\": 64, \"hidden_size\": 32, "                     \
    "\"num_hidden_layers\": 4, "                                                                   \
    "\"num_attention_heads\": 4, \"intermediate_size\": 64, \"rotary_pct\": 0.5" extra "}"

static void test_errors(void) {
    char train[300], path[400];
    /* its own: no test depends on another's files */
    snprintf(train, sizeof(train), "%s/errors_train.bin", tmp_dir);
    write_tokens(train, 3000, 64, 99);
    struct { const char *config, *message;
    } configs[] = {
        {"{\"model_type\": \"llama\", \"vocab_size\": 8}", "not a GPT-NeoX config"},
        {"{\"model_type\": \"gpt_neox\", \"vocab_size\": 64,", "invalid JSON"},
        {TINY_CONFIG(", \"num_key_value_heads\": 3"), "not divisible by num_key_value_heads 3"},
        {TINY_CONFIG(", \"num_key_value_layers\": 5"),
         "num_key_value_layers 5 must be in 1..num_hidden_layers (4)"},
        {TINY_CONFIG(", \"num_key_value_layers\": 0"), "num_key_value_layers 0 must be in 1.."},
        {TINY_CONFIG(", \"num_key_value_heads\": 8"),
         "num_key_value_heads 8 must be in 1..num_attention_heads"},
        {"{\"model_type\": \"gpt_neox\", \"vocab_size\": 64, \"hidden_size\": 30, "
         "\"num_hidden_layers\": 4, \"num_attention_heads\": 4, \"intermediate_size\": 64}",
         "hidden_size 30 is not divisible by num_attention_heads 4"},
        /* hostile values: bounded before any array is filled, no inf written back, one meaning per
           key */
        {"{\"model_type\": \"gpt_neox\", \"vocab_size\": 64, \"hidden_size\": 32, "
         "\"num_hidden_layers\": 300, \"num_attention_heads\": 4, \"intermediate_size\": 64, "
         "\"mlkv_kv_layer_map\": [0]}",
         "num_hidden_layers 300 is outside 1..256"},
        {TINY_CONFIG(", \"mlkv_kv_layer_map\": [0, 0, 1e12, 0]"),
         "mlkv_kv_layer_map[2] is not a layer number below 4"},
        {TINY_CONFIG(", \"layer_norm_eps\": 1e400"), "a number out of range"},
        {"{\"model_type\": \"gpt_neox\", \"vocab_size\": 64, \"hidden_size\": 2097152, "
         "\"num_hidden_layers\": 4, \"num_attention_heads\": 4, \"intermediate_size\": 64}",
         "hidden_size 2097152 must be in 1..1048576"},
        {"{\"model_type\": \"gpt_neox\", \"vocab_size\": 64, \"hidden_size\": 8192, "
         "\"num_hidden_layers\": 4, \"num_attention_heads\": 8192, \"intermediate_size\": 64}",
         "num_attention_heads 8192 must be in 1..4096"},
        {TINY_CONFIG(", \"use_key_value_mlp\": true, \"kv_intermediate_size\": 2000000"),
         "kv_intermediate_size (use_key_value_mlp) 2000000 must be in 1..1048576"},
        {TINY_CONFIG(", \"num_key_value_heads\": 2, \"num_key_value_heads\": 4"),
         "the key \"num_key_value_heads\" appears twice"},
    };
    for (size_t i = 0; i < sizeof(configs) / sizeof(configs[0]); i++) {
        snprintf(path, sizeof(path), "%s/bad_config.json", tmp_dir);
        write_text(path, configs[i].config);
        int rc = run("%s init --config %s --out %s/never", mlkv_bin, path, tmp_dir);
        CHECK(rc == 1 && strstr(output(), configs[i].message) &&
                  strstr(output(), "bad_config.json"),
              "config error '%s': exit %d, output: %s", configs[i].message, rc, output());
        CHECK(!exists("%s/never", tmp_dir), "no output after a config error");
    }

    /* files that are not regular files, overlapping safetensors, an added token with a NUL, raw
     * names */
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/never", mlkv_bin, tmp_dir,
              tmp_dir) == 1 &&
              strstr(output(), "is a folder, not a file"),
          "a folder as a token file: %s", output());
    snprintf(path, sizeof(path), "%s/overlap.safetensors", tmp_dir);
    {
        const char *header =
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\\u001b[31m\":{"
            "\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}";
        float data[3] = {1, 2, 3};
        write_safetensors(path, header, data, sizeof(data));
        SafeTensors st;
        CHECK(st_open(&st, path) != 0 &&
                  strstr(mlkv_error(), "share bytes (overlapping data_offsets)") &&
                  strstr(mlkv_error(), "b\\x1b[31m") && !strchr(mlkv_error(), 0x1b),
              "overlapping tensors, names escaped: %s", mlkv_error());
    }
    snprintf(path, sizeof(path), "%s/nul_tokenizer.json", tmp_dir);
    {
        size_t len;
        char *text = slurp("dev/fixtures/tokenizer/bytes-tokenizer.json", &len);
        char *eot = text ? strstr(text, "\"<|endoftext|>\"") : NULL;
        if (eot) {
            FILE *f = fopen(path, "wb");
            fwrite(text, 1, (size_t)(eot - text), f);
            fputs("\"e\\u0000x\"", f);
            fputs(eot + strlen("\"<|endoftext|>\""), f);
            fclose(f);
        }
        Tokenizer tok;
        CHECK(eot && tokenizer_load(&tok, path) != 0 &&
                  strstr(mlkv_error(), "contains a NUL character"),
              "an added token with a NUL: %s", mlkv_error());
        free(text);
    }

    /* checkpoints: a fixture copied, then its config replaced or its weights damaged */
    enum { INTACT, TRUNCATED, REPLACED_BY_TEXT };
    struct {
        const char *fixture, *name, *config;
        int damage;
        const char *message;
    } checkpoints[] = {
        {"gqa", "truncated", NULL, TRUNCATED, "the file is truncated"},
        {"gqa", "garbage", NULL, REPLACED_BY_TEXT, "not safetensors"},
        {"gqa", "wrong_shape", TINY_CONFIG(", \"num_key_value_heads\": 1"), INTACT,
         "attention.key.weight has shape [16, 32], expected [8, 32]"},
        {"mlkv_3x2", "missing", TINY_CONFIG(", \"num_key_value_heads\": 2"), INTACT,
         "missing tensor gpt_neox.layers.3.attention.key.weight"},
        {"gqa", "extra", TINY_CONFIG(", \"num_key_value_heads\": 2, \"num_key_value_layers\": 2"),
         INTACT, "unexpected tensor gpt_neox.layers.1.attention.key"},
        {"mha", "fused_mismatch", TINY_CONFIG(", \"num_key_value_layers\": 2"), INTACT,
         "fused query_key_value"},
    };
    for (size_t i = 0; i < sizeof(checkpoints) / sizeof(checkpoints[0]); i++) {
        copy_model(checkpoints[i].fixture, checkpoints[i].name, checkpoints[i].config);
        snprintf(path, sizeof(path), "%s/%s/model.safetensors", tmp_dir, checkpoints[i].name);
        if (checkpoints[i].damage == TRUNCATED)
            CHECK(run("truncate -s -100 %s", path) == 0, "truncate");
        if (checkpoints[i].damage == REPLACED_BY_TEXT)
            write_text(path, "this is not a safetensors file at all");
        CHECK(run("%s train --model %s/%s --train %s --out %s/never "
                  "--steps 1 --seq 16 --batch 1 --grad-accum 1",
                  mlkv_bin, tmp_dir, checkpoints[i].name, train, tmp_dir) == 1 &&
                  strstr(output(), checkpoints[i].message) && strstr(output(), checkpoints[i].name),
              "checkpoint %s: %s", checkpoints[i].name, output());
    }

    /* token files */
    snprintf(path, sizeof(path), "%s/bad.bin", tmp_dir);
    write_text(path, "not a token file, far too short");
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/never", mlkv_bin, path,
              tmp_dir) == 1 &&
              strstr(output(), "bad.bin: shorter than the 1024-byte header") &&
              strstr(output(), "text becomes token files with tokenize.py (python3 tokenize.py "
                               "shards --help)"),
          "short token file: %s", output());
    size_t len;
    char *whole = slurp(train, &len);
    snprintf(path, sizeof(path), "%s/cut.bin", tmp_dir);
    FILE *cut = fopen(path, "wb");
    fwrite(whole, 1, 2000, cut); /* the header promises 3000 tokens; 488 follow */
    fclose(cut);
    free(whole);
    CHECK(run("%s train --model dev/fixtures/gqa --train %s/cut.bin --out %s/never", mlkv_bin,
              tmp_dir, tmp_dir) == 1 &&
              strstr(output(), "cut.bin: header says 3000 tokens"),
          "truncated token file: %s", output());
    CHECK(run("dd if=/dev/zero of=%s/magic.bin bs=1024 count=2 2>/dev/null", tmp_dir) == 0,
          "zeros");
    CHECK(run("%s train --model dev/fixtures/gqa --train %s/magic.bin --out %s/never", mlkv_bin,
              tmp_dir, tmp_dir) == 1 &&
              strstr(output(), "not a token file") && strstr(output(), "tokenize.py shards"),
          "bad magic: %s", output());
    snprintf(path, sizeof(path), "%s/big_ids.bin", tmp_dir);
    write_tokens(path, 500, 200, 5);
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/never", mlkv_bin, path,
              tmp_dir) == 1 &&
              strstr(output(), "outside the model's vocabulary (vocab_size 64)"),
          "token id range: %s", output());
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/never --seq 100", mlkv_bin,
              train, tmp_dir) == 1 &&
              strstr(output(), "exceeds the model's max_position_embeddings (64)"),
          "seq too long: %s", output());

    /* a NaN weight: training stops at the first step, writes nothing */
    Model m;
    CHECK(model_load(&m, "dev/fixtures/gqa") == 0, "load gqa");
    m.w.embed_out[5] = NAN;
    CHECK(run("mkdir -p %s/nan_model", tmp_dir) == 0, "mkdir");
    snprintf(path, sizeof(path), "%s/nan_model/config.json", tmp_dir);
    CHECK(config_save(&m.config, m.config_extra, 0, path) == 0, "config_save");
    snprintf(path, sizeof(path), "%s/nan_model/model.safetensors", tmp_dir);
    TensorGroup g = {"", m.param_memory};
    CHECK(model_write_safetensors(&m, &g, 1, path, NULL) == 0, "write: %s", mlkv_error());
    model_free(&m);
    CHECK(run("%s train --model %s/nan_model --train %s --out "
              "%s/never --steps 3 --seq 16 --batch 2 --grad-accum 1",
              mlkv_bin, tmp_dir, train, tmp_dir) == 1 &&
              strstr(output(), "training diverged: loss nan"),
          "NaN loss: %s", output());
    CHECK(!exists("%s/never", tmp_dir), "no checkpoint after divergence");

    /* the output folder must not hold foreign files; usage errors exit 2 */
    CHECK(run("mkdir -p %s/foreign && touch %s/foreign/notes.txt", tmp_dir, tmp_dir) == 0, "mkdir");
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/foreign --steps 1", mlkv_bin,
              train, tmp_dir) == 1 &&
              strstr(output(), "notes.txt, which mlkv did not write"),
          "foreign output folder: %s", output());
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/x --bogus 1", mlkv_bin, train,
              tmp_dir) == 2 &&
              strstr(output(), "unknown argument --bogus"),
          "unknown flag: %s", output());
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/x --lr abc", mlkv_bin, train,
              tmp_dir) == 2,
          "bad number: %s", output());
    CHECK(run("%s train --help", mlkv_bin) == 0 && strstr(output(), "--grad-accum"),
          "train --help");
    CHECK(run("%s init --help", mlkv_bin) == 0 && strstr(output(), "--config"), "init --help");
    CHECK(run("%s demo --help", mlkv_bin) == 0 && strstr(output(), "--uptrain-steps"),
          "demo --help");
    CHECK(run("%s frobnicate", mlkv_bin) == 2, "unknown command");
}

static void test_init(void) {
    char path[400];
    snprintf(path, sizeof(path), "%s/tiny_config.json", tmp_dir);
    write_text(path, TINY_CONFIG(", \"num_key_value_layers\": 2, \"num_key_value_heads\": 1, "
                                 "\"initializer_range\": 0.5"));
    CHECK(run("%s init --config %s --out %s/fresh --seed 3", mlkv_bin, path, tmp_dir) == 0,
          "init: %s", output());
    CHECK(strstr(output(), "owning layers (0 2)") != NULL, "init summary: %s", output());
    Model m;
    snprintf(path, sizeof(path), "%s/fresh", tmp_dir);
    CHECK(model_load(&m, path) == 0, "load the initialised model: %s", mlkv_error());
    const ParamInfo *w = model_param(&m, "gpt_neox.layers.2.attention.key.weight");
    const ParamInfo *ln = model_param(&m, "gpt_neox.layers.1.input_layernorm.weight");
    const ParamInfo *b = model_param(&m, "gpt_neox.layers.1.mlp.dense_h_to_4h.bias");
    CHECK(w && ln && b && !model_param(&m, "gpt_neox.layers.1.attention.key.weight"),
          "K/V only in owning layers");
    if (w && ln && b) {
        double sum = 0, sumsq = 0;
        for (size_t i = 0; i < w->numel; i++) {
            sum += m.param_memory[w->offset + i];
            sumsq += m.param_memory[w->offset + i] * m.param_memory[w->offset + i];
        }
        double std = sqrt(sumsq / w->numel - (sum / w->numel) * (sum / w->numel));
        CHECK(fabs(std - 0.5) < 0.1, "weights have std initializer_range: %.3f", std);
        CHECK(m.param_memory[ln->offset] == 1.0f && m.param_memory[b->offset] == 0.0f,
              "LayerNorm 1, bias 0");
    }
    model_free(&m);
}

/* --- the converter against dev/gen_convert_fixtures.py ------------------- */

static void test_convert(void) {
    const char *pythia = "dev/fixtures/convert/pythia";
    SafeTensors exp;
    Model mha;
    if (st_open(&exp, "dev/fixtures/convert/expected.safetensors") != 0 ||
        model_load(&mha, pythia) != 0) {
        CHECK(0, "convert fixtures: %s", mlkv_error());
        return;
    }
    const Json *meta = json_get(&exp.header, "__metadata__");
    int configs = 0;
    double worst = 0;
    for (size_t c = 0; meta && c < meta->length; c++) {
        const char *name = meta->keys[c];
        Json spec;
        CHECK(json_parse(meta->items[c].string, strlen(meta->items[c].string), name, &spec) == 0,
              "metadata %s", name);
        const Json *args = json_get(&spec, "args");
        char cmd[1024], out[400], path[500];
        snprintf(out, sizeof(out), "%s/convert_%s", tmp_dir, name);
        int n = snprintf(cmd, sizeof(cmd), "%s convert %s --out %s", mlkv_bin, pythia, out);
        for (size_t a = 0; args && a < args->length; a++)
            n += snprintf(cmd + n, sizeof(cmd) - n, " %s", args->items[a].string);
        CHECK(run("%s", cmd) == 0 && strstr(output(), "KV cache bytes/token"), "%s: %s", cmd,
              output());
        Model conv;
        snprintf(path, sizeof(path), "%s/model.safetensors", out);
        SafeTensors got;
        if (model_load(&conv, out) != 0 || st_open(&got, path) != 0) {
            CHECK(0, "%s: %s", name, mlkv_error());
            json_free(&spec);
            continue;
        }
        configs++;
        CHECK(conv.config.intermediate_size == (int)json_get(&spec, "intermediate_size")->number &&
                  conv.config.kv_intermediate_size ==
                      (int)json_get(&spec, "kv_intermediate_size")->number,
              "%s: intermediate %d, kv_intermediate %d", name, conv.config.intermediate_size,
              conv.config.kv_intermediate_size);
        /* every tensor the reference computed (pooled K/V of owners, grown MLPs) */
        size_t prefix = strlen(name) + 1;
        for (size_t i = 0; i < exp.header.length; i++) {
            const char *key = exp.header.keys[i];
            if (strncmp(key, name, prefix - 1) != 0 || key[prefix - 1] != '/') continue;
            const Json *sh = json_get(json_get(&exp.header, key), "shape");
            int shape[2] = {(int)sh->items[0].number,
                            sh->length > 1 ? (int)sh->items[1].number : 0};
            size_t numel = (size_t)shape[0] * (sh->length > 1 ? shape[1] : 1);
            float *want = read_tensor(&exp, key, (int)sh->length, shape, numel);
            char target[200];
            snprintf(target, sizeof(target), "%s", key + prefix);
            char *pooled = strstr(target, ".pooled_");
            const float *mine = NULL;
            if (pooled) { /* KV-MLP: the pooled projection sits in the first rows of dense_in */
                char rest[32];
                snprintf(rest, sizeof(rest), "%s", pooled + 8);
                snprintf(pooled, sizeof(target) - (size_t)(pooled - target), ".dense_in.%s", rest);
            }
            const ParamInfo *p = model_param(&conv, target);
            if (p) mine = conv.param_memory + p->offset;
            CHECK(p && p->numel >= numel, "%s: no tensor %s of %zu values", name, target, numel);
            if (p) {
                double e = scaled_error(mine, want, numel);
                worst = fmax(worst, e);
                CHECK(e <= 1e-6, "%s: %s differs from the PyTorch conversion by %.3g", name, target,
                      e);
            }
            free(want);
        }
        /* tensors the conversion keeps are copied exactly */
        const char *kept[] = {"gpt_neox.embed_in.weight",
                              "gpt_neox.layers.1.attention.query.weight",
                              "gpt_neox.layers.3.attention.dense.bias",
                              "gpt_neox.layers.2.input_layernorm.weight", "embed_out.weight"};
        for (int k = 0; k < 5; k++) {
            const ParamInfo *a = model_param(&mha, kept[k]), *b = model_param(&conv, kept[k]);
            CHECK(a && b &&
                      !memcmp(mha.param_memory + a->offset, conv.param_memory + b->offset,
                              a->numel * 4),
                  "%s: %s is not an exact copy", name, kept[k]);
        }
        /* KV-MLP: random parts within Kaiming-uniform (1/sqrt(fan_in)) and uniform(-1, 1) */
        for (int i = 0; conv.config.use_kv_mlp && i < conv.n_params; i++) {
            const ParamInfo *p = &conv.params[i];
            if (!strstr(p->name, "attention.key.dense_") &&
                !strstr(p->name, "attention.value.dense_"))
                continue;
            /* dense_in's first kvH*hs rows hold the pooled projection; the rest is random */
            size_t row = (size_t)(p->ndim == 2 ? p->shape[1] : 1);
            size_t skip = strstr(p->name, "dense_in")
                              ? (size_t)conv.config.n_kv_head * conv.config.head_size * row
                              : 0;
            double bound = p->ndim == 2 ? 1.0 / sqrt((double)p->shape[1]) : 1.0;
            double biggest = max_abs(conv.param_memory + p->offset + skip, p->numel - skip);
            CHECK(biggest <= bound * (1 + 1e-6) && biggest > 0.5 * bound,
                  "%s: %s: largest %.3g, bound %.3g", name, p->name, biggest, bound);
        }
        st_close(&got);
        model_free(&conv);
        json_free(&spec);
    }
    CHECK(configs == 12, "converted %d of the 12 fixture configurations", configs);
    printf("  converter: %d configurations, worst difference from PyTorch %.1e\n", configs, worst);
    /* the converted config keeps the keys mlkv does not interpret */
    char path[500];
    size_t len;
    snprintf(path, sizeof(path), "%s/convert_mlkv_l2h1/config.json", tmp_dir);
    char *text = slurp(path, &len);
    CHECK(text && strstr(text, "\"transformers_version\"") &&
              strstr(text, "\"num_key_value_layers\": 2"),
          "converted config.json: %s", text ? text : "(missing)");
    free(text);
    st_close(&exp);

    /* export --fused writes the stock layout; loading it back gives the same parameters */
    CHECK(run("%s export dev/fixtures/mha --fused --out %s/exported", mlkv_bin, tmp_dir) == 0,
          "export: %s", output());
    Model back, orig;
    snprintf(path, sizeof(path), "%s/exported", tmp_dir);
    CHECK(model_load(&back, path) == 0 && model_load(&orig, "dev/fixtures/mha") == 0, "reload: %s",
          mlkv_error());
    CHECK(back.num_parameters == orig.num_parameters &&
              !memcmp(back.param_memory, orig.param_memory, orig.num_parameters * sizeof(float)),
          "export round trip");
    model_free(&back);
    model_free(&orig);
    snprintf(path, sizeof(path), "%s/exported/config.json", tmp_dir);
    text = slurp(path, &len);
    CHECK(text && !strstr(text, "num_key_value") && strstr(text, "\"rotary_pct\": 0.5"),
          "stock config: %s", text);
    free(text);
    snprintf(path, sizeof(path), "%s/exported/model.safetensors", tmp_dir);
    SafeTensors st;
    CHECK(st_open(&st, path) == 0 &&
              st_entry(&st, "gpt_neox.layers.0.attention.query_key_value.weight") &&
              !st_entry(&st, "gpt_neox.layers.0.attention.key.weight"),
          "fused names in the export");
    st_close(&st);

    /* bad input: clear error, exit 1, nothing written */
    struct { const char *args, *message;
    } bad[] = {
        {"--kv-layers 2 --kv-heads 3",
         "--kv-heads 3: the 4 attention heads must split into 3 equal groups"},
        {"--kv-layers 5 --kv-heads 1", "--kv-layers 5: the model has 4 layers"},
        {"--kv-map 0,0,3,1 --kv-heads 1", "mlkv_kv_layer_map[2] = 3 must be in 0..2"},
        {"--kv-map 0,0,1,1 --kv-heads 1", "layer 1 does not own K/V"},
        {"--kv-map 0,0,2 --kv-heads 1", "has 3 entries; the model has 4 layers"},
    };
    for (int i = 0; i < 5; i++) {
        CHECK(run("%s convert %s %s --out %s/never", mlkv_bin, pythia, bad[i].args, tmp_dir) == 1 &&
              strstr(output(), bad[i].message), "convert %s: %s", bad[i].args, output());
        CHECK(!exists("%s/never", tmp_dir), "no output after a failed conversion");
    }
    CHECK(run("%s convert dev/fixtures/gqa --kv-layers 2 --kv-heads 1 --out %s/never", mlkv_bin,
              tmp_dir) == 1 &&
              strstr(output(), "already shares K/V"),
          "convert a GQA model: %s", output());
    copy_model("mha", "llama", "{\"model_type\": \"llama\", \"hidden_size\": 32}");
    CHECK(run("%s convert %s/llama --kv-layers 2 --kv-heads 1 --out %s/never", mlkv_bin, tmp_dir,
              tmp_dir) == 1 &&
              strstr(output(), "not a GPT-NeoX config"),
          "convert a llama: %s", output());
    copy_model("mha", "cut", NULL);
    CHECK(run("truncate -s -8 %s/cut/model.safetensors", tmp_dir) == 0, "truncate");
    CHECK(run("%s convert %s/cut --kv-layers 2 --kv-heads 1 --out %s/never", mlkv_bin, tmp_dir,
              tmp_dir) == 1 &&
              strstr(output(), "truncated"),
          "convert a truncated checkpoint: %s", output());
    CHECK(run("%s export dev/fixtures/gqa --fused --out %s/never", mlkv_bin, tmp_dir) == 1 &&
          strstr(output(), "only MHA models"), "export GQA: %s", output());
    CHECK(!exists("%s/never", tmp_dir), "no output after a failed conversion");
    CHECK(run("%s convert --help", mlkv_bin) == 0 && strstr(output(), "--grow-mlp"),
          "convert --help");
    CHECK(run("%s export --help", mlkv_bin) == 0 && strstr(output(), "--fused"), "export --help");
    model_free(&mha);
}

/* --- the tokenizer against HF tokenizers (dev/gen_tokenizer_fixtures.py) ---- */

/* --- pytorch_model.bin: the reference's checkpoints as they are ------------ */

/* model_load of the folder dir gives PyTorch's logits on the tokens of its
 * ref.safetensors */
static double bin_logits_error(const char *dir) {
    char path[400];
    const char *name = dir;
    snprintf(path, sizeof(path), "%s/ref.safetensors", dir);
    Model m;
    SafeTensors ref;
    if (model_load(&m, dir) != 0 || st_open(&ref, path) != 0) {
        CHECK(0, "%s: %s", name, mlkv_error());
        return INFINITY;
    }
    const Json *shape = json_get(json_get(&ref.header, "tokens"), "shape");
    int B = (int)shape->items[0].number, T = (int)shape->items[1].number, V = m.config.vocab_size;
    int tshape[2] = {B, T}, lshape[3] = {B, T, V}, *tokens = malloc(sizeof(int) * B * T);
    CHECK(st_read(&ref, "tokens", 2, tshape, NULL, tokens) == 0, "%s tokens: %s", name,
          mlkv_error());
    float *want = read_tensor(&ref, "logits", 3, lshape, (size_t)B * T * V);
    CHECK(model_prepare(&m, B, T, 0) == 0, "%s: prepare", name);
    model_forward(&m, tokens, NULL, B, T);
    double e = scaled_error(m.a.logits, want, (size_t)B * T * V);
    free(tokens);
    free(want);
    st_close(&ref);
    model_free(&m);
    return e;
}

static int same_parameters(const char *dir_a, const char *dir_b) {
    Model a, b;
    if (model_load(&a, dir_a) != 0) return 0;
    if (model_load(&b, dir_b) != 0) { model_free(&a); return 0; }
    int same = a.num_parameters == b.num_parameters &&
               memcmp(a.param_memory, b.param_memory, a.num_parameters * sizeof(float)) == 0;
    model_free(&a);
    model_free(&b);
    return same;
}

static void test_torch_checkpoints(void) {
    const char *names[] = {"f32", "f16", "bf16"};
    for (int i = 0; i < 3; i++) {
        char dir[300];
        snprintf(dir, sizeof(dir), "dev/fixtures/reference_bin/%s", names[i]);
        double e = bin_logits_error(dir);
        CHECK(e <= 1e-5, "reference_bin/%s: logits error %.3g > 1e-5", names[i], e);
        printf("  pytorch_model.bin %-4s logits vs PyTorch %.1e\n", names[i], e);
    }
    CHECK(same_parameters("dev/fixtures/reference_bin/f32", "dev/fixtures/mlkv_2x2_compat"),
          "pytorch_model.bin (views at offsets, shared "
          "storages) and safetensors give other parameters");
    CHECK(same_parameters("dev/fixtures/reference_bin/mha_hf", "dev/fixtures/mha"),
          "fused MHA .bin differs");

    /* the rotary rule: num_key_value_layers without mlkv_shared_key_rotary is the reference's
     * function */
    Config c;
    char path[600];
    CHECK(config_load(&c, "dev/fixtures/reference_bin/f32/config.json", NULL) == 0 &&
              c.shared_key_rotary == 0,
          "a reference config must load with un-rotated shared keys");
    snprintf(path, sizeof(path), "%s/rule.json", tmp_dir);
    write_text(path,
               TINY_CONFIG(", \"num_key_value_layers\": 2, \"mlkv_shared_key_rotary\": true"));
    CHECK(config_load(&c, path, NULL) == 0 && c.shared_key_rotary == 1, "an explicit key must win");
    write_text(path, TINY_CONFIG(", \"num_key_value_heads\": 2"));
    CHECK(config_load(&c, path, NULL) == 0 && c.shared_key_rotary == 1,
          "GQA without the key stays mlkv's default");

    /* safetensors is preferred when both are present: a hostile .bin beside it is never read */
    copy_model("mlkv_2x2_compat", "both", NULL);
    CHECK(
        run("cp dev/fixtures/reference_bin/hostile/global_os_system.bin %s/both/pytorch_model.bin",
            tmp_dir) == 0,
        "cp");
    snprintf(path, sizeof(path), "%s/both", tmp_dir);
    CHECK(same_parameters(path, "dev/fixtures/mlkv_2x2_compat"),
          "model.safetensors must be preferred: %s", mlkv_error());

    /* hostile and broken files: a clear error naming the file, never a crash */
    struct { const char *file, *message;
    } hostile[] = {{"global_os_system.bin",
                    "names os.system, which a state dict of tensors does not use: refused"},
                   {"reduce_storage.bin", "calls a storage type"},
                   {"short_storage.bin", "truncated"},
                   {"non_contiguous.bin", "non-contiguous view"},
                   {"compressed.bin", "is compressed"}};
    Model m;
    for (size_t i = 0; i < sizeof(hostile) / sizeof(hostile[0]); i++) {
        CHECK(run("rm -rf %s/bad && mkdir %s/bad && cp dev/fixtures/reference_bin/f32/config.json "
                  "%s/bad/ && cp dev/fixtures/reference_bin/hostile/%s %s/bad/pytorch_model.bin",
                  tmp_dir, tmp_dir, tmp_dir, hostile[i].file, tmp_dir) == 0,
              "cp");
        snprintf(path, sizeof(path), "%s/bad", tmp_dir);
        CHECK(model_load(&m, path) != 0 && strstr(mlkv_error(), hostile[i].message) &&
                  strstr(mlkv_error(), "bad/pytorch_model.bin"),
              "%s: %s", hostile[i].file, mlkv_error());
    }
    /* every cut of the file at these lengths fails cleanly (the zip directory is at the end) */
    size_t len = 0;
    char *whole = slurp("dev/fixtures/reference_bin/f32/pytorch_model.bin", &len);
    size_t cuts[] = {0, 1, 21, 22, 100, len / 2, len - 200, len - 23, len - 22, len - 1};
    int clean = 0;
    for (size_t i = 0; whole && i < sizeof(cuts) / sizeof(cuts[0]); i++) {
        snprintf(path, sizeof(path), "%s/bad/pytorch_model.bin", tmp_dir);
        FILE *f = fopen(path, "wb");
        fwrite(whole, 1, cuts[i], f);
        fclose(f);
        snprintf(path, sizeof(path), "%s/bad", tmp_dir);
        clean += model_load(&m, path) != 0 && strstr(mlkv_error(), "pytorch_model.bin");
    }
    CHECK(clean == 10, "truncated pytorch_model.bin: %d of 10 cuts refused cleanly (last: %s)",
          clean, mlkv_error());
    free(whole);

    /* a reference folder trains and converts, and what mlkv writes states the rotary mode */
    CHECK(run("%s convert dev/fixtures/reference_bin/mha_hf "
              "--kv-layers 2 --kv-heads 2 --out %s/from_bin", mlkv_bin, tmp_dir) == 0 &&
              run("%s convert dev/fixtures/mha --kv-layers 2 --kv-heads 2 --out %s/from_st",
                  mlkv_bin, tmp_dir) == 0,
          "convert: %s", output());
    char a[400], b[400];
    snprintf(a, sizeof(a), "%s/from_bin/model.safetensors", tmp_dir);
    snprintf(b, sizeof(b), "%s/from_st/model.safetensors", tmp_dir);
    CHECK(same_file(a, b),
          "converting pytorch_model.bin and model.safetensors of one model must agree");
    snprintf(a, sizeof(a), "%s/from_bin/config.json", tmp_dir);
    char *text = slurp(a, &len);
    CHECK(text && strstr(text, "\"mlkv_shared_key_rotary\": true"),
          "convert must state the default mode: %s", text);
    free(text);
    CHECK(run("%s convert dev/fixtures/mha --kv-layers 2 "
              "--kv-heads 2 --rotary reference --out %s/ref_mode", mlkv_bin, tmp_dir) == 0,
          "convert --rotary reference: %s", output());
    snprintf(a, sizeof(a), "%s/ref_mode/config.json", tmp_dir);
    text = slurp(a, &len);
    CHECK(text && strstr(text, "\"mlkv_shared_key_rotary\": false"), "--rotary reference: %s",
          text);
    free(text);
    snprintf(a, sizeof(a), "%s/ref_tokens.bin", tmp_dir);
    write_tokens(a, 2000, 64, 5);
    CHECK(run("%s train --model dev/fixtures/reference_bin/f32 --train %s --val %s --out "
              "%s/ref_trained --steps 2 --batch 2 --seq 8 --grad-accum 1",
              mlkv_bin, a, a, tmp_dir) == 0 &&
              strstr(output(), "shared keys un-rotated, as the reference code computes") &&
              strstr(output(), "| val "),
          "train and validate a reference checkpoint: %s", output());
    snprintf(a, sizeof(a), "%s/ref_trained/config.json", tmp_dir);
    text = slurp(a, &len);
    CHECK(text && strstr(text, "\"mlkv_shared_key_rotary\": false"),
          "a trained reference checkpoint keeps its mode");
    free(text);

    /* bench-kv writes the reference's measurements.csv: its columns, appended, a header once */
    snprintf(a, sizeof(a), "%s/measurements.csv", tmp_dir);
    CHECK(run("%s bench-kv dev/fixtures/reference_bin/f32 --prefill 9 --decode 4 --batches 2,3 "
              "--csv %s --csv-format reference",
              mlkv_bin, a) == 0 &&
              run("%s bench-kv dev/fixtures/reference_bin/f32 --prefill 9 --decode 4 --batches "
                  "1,200 --mem-limit 1 --csv %s --csv-format reference",
                  mlkv_bin, a) == 0,
          "bench-kv reference csv: %s", output());
    text = slurp(a, &len);
    int lines = 0, fields_ok = 1, headers = 0;
    for (char *line = text ? strtok(text, "\n") : NULL; line; line = strtok(NULL, "\n"), lines++) {
        int commas = 0;
        for (char *q = line; *q; q++) commas += *q == ',';
        fields_ok &= commas == 9;
        headers +=
            strncmp(line,
                    "model_name,batch_size,sequence_length,background_memory_usage,model_memory_"
                    "usage,memory_usage,kv_cache_mem,inference_time,inference_speed,is_oom",
                    140) == 0;
    }
    CHECK(lines == 5 && headers == 1 && fields_ok,
          "measurements.csv: %d lines, %d headers, 10 fields each: %d", lines, headers, fields_ok);
    free(text);
    text = slurp(a, &len);
    CHECK(text && strstr(text, "dev/fixtures/reference_bin/f32,3,4,") && strstr(text, ",False\n") &&
              strstr(text, "dev/fixtures/reference_bin/f32,200,4,,,,,,,True\n"),
          "measurements.csv rows:\n%s", text);
    free(text);
    CHECK(run("%s bench-kv dev/fixtures/mha --batches 4,0", mlkv_bin) == 1 &&
          strstr(output(), "--batches: 0 is not a batch size"), "bad --batches: %s", output());
}

/* --- checkpoints of transformers 4 and the reference, buffers and all ------- */

/* The largest |a - b| over the parameters of two loaded models of one shape,
 * relative to the largest |b|; -1 when they differ in shape. */
static double parameters_error(const char *dir_a, const char *dir_b) {
    Model a, b;
    if (model_load(&a, dir_a) != 0) return -1;
    if (model_load(&b, dir_b) != 0) { model_free(&a); return -1; }
    double e = a.num_parameters == b.num_parameters
                   ? scaled_error(a.param_memory, b.param_memory, a.num_parameters)
                   : -1;
    model_free(&a);
    model_free(&b);
    return e;
}

/* dev/gen_hf4_fixtures.py: a Pythia as the hub keeps it (fp16, the causal mask,
 * masked_bias and inv_freq of transformers 4 in every layer; one file and two
 * shards), and what the reference's own convert_to_mlkv.py made of it (MLKV:
 * fp16 and fp32 tensors mixed; KV-MLP from the fp32 save with a uint8 mask).
 * Each loads, computes the logits of transformers' GPT-NeoX (the Pythia) or of
 * the reference's own model (the conversions), and trains; a buffer that does
 * not fit its model, and any other tensor that is no parameter, is refused by
 * name, by the safetensors reader as by the .bin reader (one rule). */
static void test_transformers4_checkpoints(void) {
    const char *dirs[] = {"pythia", "pythia_sharded", "mlkv", "kvmlp"};
    char dir[300], path[600], tokens[400];
    snprintf(tokens, sizeof(tokens), "%s/hf4_tokens.bin", tmp_dir);
    write_tokens(tokens, 600, 64, 11);
    for (int i = 0; i < 4; i++) {
        snprintf(dir, sizeof(dir), "dev/fixtures/hf4/%s", dirs[i]);
        double e = bin_logits_error(dir);
        CHECK(e <= 1e-5, "hf4/%s: logits error %.3g > 1e-5", dirs[i], e);
        printf("  transformers 4 / reference checkpoint %-14s logits vs PyTorch %.1e\n", dirs[i],
               e);
        CHECK(run("%s train --model %s --train %s --val %s --out %s/hf4_%s --steps 1 "
                  "--warmup-steps 0 --batch 2 --seq 8 --grad-accum 1",
                  mlkv_bin, dir, tokens, tokens, tmp_dir, dirs[i]) == 0 &&
                  strstr(output(), "| val "),
              "train one step from hf4/%s: %s", dirs[i], output());
    }
    Model m;
    CHECK(model_load(&m, "dev/fixtures/hf4/int64_extra") != 0 &&
              strstr(mlkv_error(), "int64_extra/pytorch_model.bin: unexpected tensor "
                                   "gpt_neox.embed_in.position_ids"),
          "an int64 tensor that is no GPT-NeoX buffer is refused by name: %s", mlkv_error());
    CHECK(same_parameters("dev/fixtures/hf4/pythia", "dev/fixtures/hf4/pythia_sharded"),
          "one file and two shards of one state dict load the same parameters");
    Config c;
    CHECK(config_load(&c, "dev/fixtures/hf4/mlkv/config.json", NULL) == 0 &&
              c.shared_key_rotary == 0 && c.n_kv_layer == 2 && c.n_kv_head == 2,
          "the reference's MLKV config: 2 K/V layers of 2 heads, its rotary");

    /* mlkv's converter on the hub file gives the reference's converter's weights, to the
     * rounding of the reference's fp16 arithmetic (it pools fp16 tensors in fp16) */
    CHECK(run("%s convert dev/fixtures/hf4/pythia --kv-layers 2 --kv-heads 2 --rotary reference "
              "--out %s/hf4_converted",
              mlkv_bin, tmp_dir) == 0,
          "convert the hub Pythia: %s", output());
    snprintf(path, sizeof(path), "%s/hf4_converted", tmp_dir);
    double e = parameters_error(path, "dev/fixtures/hf4/mlkv");
    CHECK(e >= 0 && e <= 1e-4,
          "mlkv convert vs convert_to_mlkv.py: %.3g (fp16 rounding: <= 1e-4)", e);
    printf("  mlkv convert vs the reference's convert_to_mlkv.py on the hub file: %.1e\n", e);

    /* one rule for both readers: a shard of safetensors beside the mha fixture's weights
     * (the shapes of hf4/pythia) holding one tensor */
    struct { const char *name, *dtype, *shape; size_t bytes; const char *refused;
    } cases[] = {
        {"gpt_neox.layers.3.attention.bias", "BOOL", "1,1,64,64", 4096, NULL},
        {"gpt_neox.layers.0.attention.bias", "U8", "1,1,64,64", 4096, NULL},
        {"gpt_neox.layers.0.attention.masked_bias", "F16", "", 2, NULL},
        {"gpt_neox.layers.1.attention.rotary_emb.inv_freq", "F32", "2", 8, NULL},
        {"gpt_neox.rotary_emb.inv_freq", "BF16", "2", 4, NULL},
        {"gpt_neox.layers.4.attention.bias", "BOOL", "1,1,64,64", 4096,
         "gpt_neox.layers.4.attention.bias belongs to layer 4, but the model has 4 layers"},
        {"gpt_neox.layers.0.attention.bias", "F32", "1,1,64,64", 16384,
         "buffer gpt_neox.layers.0.attention.bias has dtype F32"},
        {"gpt_neox.layers.0.attention.bias", "BOOL", "1,1,32,32", 1024,
         "a GPT-NeoX bias is bool or uint8 [1, 1, max_position_embeddings, "
         "max_position_embeddings]"},
        {"gpt_neox.layers.0.attention.rotary_emb.inv_freq", "F32", "4", 16,
         "a GPT-NeoX rotary_emb.inv_freq is float [rotary_ndims / 2]"},
        {"gpt_neox.layers.0.attention.masked_bias", "I64", "", 8, "masked_bias has dtype I64"},
        {"gpt_neox.embed_in.position_ids", "I64", "1,64", 512,
         "unexpected tensor gpt_neox.embed_in.position_ids"},
        {"gpt_neox.layers.00.attention.bias", "BOOL", "1,1,64,64", 4096,
         "unexpected tensor gpt_neox.layers.00.attention.bias"},
        {"gpt_neox.layers.0.attention.causal_mask", "BOOL", "1,1,64,64", 4096,
         "unexpected tensor gpt_neox.layers.0.attention.causal_mask"}};
    static unsigned char zeros[16384];
    snprintf(dir, sizeof(dir), "%s/buffers", tmp_dir);
    CHECK(run("rm -rf %s && mkdir %s && cp dev/fixtures/mha/config.json %s/ && "
              "cp dev/fixtures/mha/model.safetensors %s/a.safetensors",
              dir, dir, dir, dir) == 0,
          "cp");
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
    write_text(path, "{\"weight_map\": {\"gpt_neox.embed_in.weight\": \"a.safetensors\", "
                     "\"extra\": \"b.safetensors\"}}");
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char header[300];
        snprintf(header, sizeof(header),
                 "{\"%s\":{\"dtype\":\"%s\",\"shape\":[%s],\"data_offsets\":[0,%zu]}}",
                 cases[i].name, cases[i].dtype, cases[i].shape, cases[i].bytes);
        snprintf(path, sizeof(path), "%s/b.safetensors", dir);
        write_safetensors(path, header, zeros, cases[i].bytes);
        int rc = model_load(&m, dir);
        if (rc == 0) model_free(&m);
        if (cases[i].refused)
            CHECK(rc != 0 && strstr(mlkv_error(), "b.safetensors") &&
                      strstr(mlkv_error(), cases[i].refused),
                  "%s %s [%s] must be refused (%s): %s", cases[i].name, cases[i].dtype,
                  cases[i].shape, cases[i].refused, rc ? mlkv_error() : "loaded");
        else
            CHECK(rc == 0, "the buffer %s %s [%s] is skipped: %s", cases[i].name, cases[i].dtype,
                  cases[i].shape, mlkv_error());
    }
}

/* --- evaluation: lm-evaluation-harness's numbers, from HF transformers ------ */

static const Json *json_path(const Json *j, const char *a, const char *b, const char *c) {
    return json_get(json_get(json_get(j, a), b), c);
}

/* On every kind of model (GQA, MLKV with 3 of 4 owners, the reference's
 * rotary mode, KV-MLP, a layer map) a task's loglikelihoods, computed with
 * the context run once and forked through the KV cache, equal those of full
 * forward passes over context + continuation. */
static void test_eval_model_kinds(void) {
    const char *kinds[] = {"gqa", "mlkv_3x2", "mlkv_2x2_compat", "mlkv_kvmlp", "mlkv_map"};
    const int context[] = {5, 17, 3, 44, 9, 12, 60},
              conts[3][4] = {{7, 2, 9, 0}, {31, 0, 0, 0}, {8, 8, 1, 0}};
    const int lens[3] = {3, 1, 3}, n_ctx = 7;
    char path[400];
    snprintf(path, sizeof(path), "%s/kinds.jsonl", tmp_dir);
    write_text(path, "{\"task\": \"t\", \"kind\": \"multiple_choice\", \"choices\": [\"abc\", "
                     "\"d\", \"efg\"], \"gold\": 2, \"context_ids\": [5, 17, 3, 44, 9, 12, 60], "
                     "\"continuation_ids\": [[7, 2, 9], [31], [8, 8, 1]]}\n");
    double worst = 0;
    for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
        char dir[300];
        snprintf(dir, sizeof(dir), "dev/fixtures/%s", kinds[k]);
        Model m;
        TaskResult r;
        double ll[3];
        int greedy[3];
        if (model_load(&m, dir) != 0 ||
            evaluate_task_file(&m, path, NULL, 0, &r, ll, greedy, 3) != 0 ||
            model_prepare(&m, 1, n_ctx + 3, 0) != 0) {
            CHECK(0, "%s: %s", kinds[k], mlkv_error());
            continue;
        }
        int V = m.config.vocab_size;
        for (int c = 0; c < 3; c++) {
            int seq[16], n = n_ctx + lens[c] - 1;
            memcpy(seq, context, sizeof(context));
            memcpy(seq + n_ctx, conts[c], sizeof(int) * (size_t)(lens[c] - 1));
            model_forward(&m, seq, NULL, 1, n);
            double want = 0;
            for (int t = 0; t < lens[c]; t++) {
                const float *z = m.a.logits + (size_t)(n_ctx - 1 + t) * V;
                double max = -INFINITY, sum = 0;
                for (int i = 0; i < V; i++) max = fmax(max, z[i]);
                for (int i = 0; i < V; i++) sum += exp(z[i] - max);
                want += z[conts[c][t]] - max - log(sum);
            }
            worst = fmax(worst, fabs(ll[c] - want) / fabs(want));
            CHECK(fabs(ll[c] - want) <= 1e-5 * fabs(want),
                  "%s choice %d: forked %.9g, full forward %.9g", kinds[k], c, ll[c], want);
        }
        model_free(&m);
    }
    printf("  eval on GQA, MLKV, reference rotary, KV-MLP, "
           "layer map: forked contexts vs full forward %.1e\n", worst);
}

/* dev/fixtures/eval (dev/gen_eval_fixtures.py): every continuation's
 * loglikelihood within 1e-5 (relative), greedy flags and accuracies exactly,
 * standard errors of accuracies to rounding, perplexity and its bootstrap
 * standard error within 1e-5 and 1e-4 */
static void test_eval_tasks(void) {
    size_t len;
    char *text = slurp("dev/fixtures/eval/expected.json", &len);
    Json expected;
    Model m;
    if (!text || json_parse(text, len, "expected.json", &expected) != 0 ||
        model_load(&m, "dev/fixtures/eval/model") != 0) {
        CHECK(0, "eval fixtures: %s", mlkv_error());
        free(text);
        return;
    }
    free(text);
    const Json *tasks = json_get(&expected, "tasks");
    double worst_ll = 0;
    int greedy_true = 0, tasks_checked = 0;
    for (size_t t = 0; tasks && t < tasks->length; t++) {
        const char *name = tasks->keys[t];
        const Json *e = &tasks->items[t], *lls = json_get(e, "loglikelihoods"),
                   *greedy = json_get(e, "greedy");
        char path[300];
        /* the five converted by tokenize.py, or a task of one's own in text alone */
        snprintf(path, sizeof(path), "dev/fixtures/eval/tasks/%s.jsonl", name);
        if (!exists("%s", path))
            snprintf(path, sizeof(path), "dev/fixtures/eval/text/%s.jsonl", name);
        double ours[64];
        int ours_greedy[64];
        TaskResult r;
        if (evaluate_task_file(&m, path, "dev/fixtures/eval/model", 0, &r, ours, ours_greedy, 64) !=
            0) {
            CHECK(0, "%s: %s", name, mlkv_error());
            continue;
        }
        tasks_checked++;
        for (size_t i = 0; i < lls->length && i < 64; i++) {
            double want = lls->items[i].number, err = fabs(ours[i] - want) / fabs(want);
            worst_ll = fmax(worst_ll, err);
            CHECK(err <= 1e-5, "%s continuation %zu: loglikelihood %.9g, HF %.9g", name, i, ours[i],
                  want);
            CHECK(ours_greedy[i] == (int)greedy->items[i].number, "%s continuation %zu: greedy %d",
                  name, i, ours_greedy[i]);
            greedy_true += ours_greedy[i];
        }
        const Json *metrics = json_get(e, "metrics");
        CHECK((size_t)r.n_metrics == metrics->length, "%s: %d metrics, expected %zu", name,
              r.n_metrics, metrics->length);
        for (int k = 0; k < r.n_metrics; k++) {
            const Json *want = json_get(metrics, r.metric[k].name);
            if (!want) {
                CHECK(0, "%s: metric %s is not the harness's", name, r.metric[k].name);
                continue;
            }
            double v = want->items[0].number, se = want->items[1].number;
            int is_ppl = strcmp(r.metric[k].name, "perplexity") == 0;
            double ev = is_ppl ? fabs(r.metric[k].value - v) / v : fabs(r.metric[k].value - v);
            double es =
                is_ppl ? fabs(r.metric[k].stderr_ - se) / se : fabs(r.metric[k].stderr_ - se);
            CHECK(ev <= (is_ppl ? 1e-5 : 0) && es <= (is_ppl ? 1e-4 : 1e-12),
                  "%s %s: %.9g +- %.9g, harness %.9g +- %.9g", name, r.metric[k].name,
                  r.metric[k].value, r.metric[k].stderr_, v, se);
        }
    }
    CHECK(tasks_checked == 7 && greedy_true >= 2, "%d tasks checked, %d greedy continuations",
          tasks_checked, greedy_true);
    printf("  eval: 5 tasks and 2 of text alone vs HF transformers + the harness's formulas: "
           "loglikelihoods within %.1e\n", worst_ll);
    model_free(&m);
    json_free(&expected);

    /* the command: a table, and results.json in the harness's shape */
    char out[400], tokens[400], bad[400];
    snprintf(out, sizeof(out), "%s/results.json", tmp_dir);
    CHECK(run("%s eval dev/fixtures/eval/model --tasks dev/fixtures/eval/tasks --out %s", mlkv_bin,
              out) == 0 &&
              strstr(output(), "| lambada_openai | 3 | acc | 0.3333 |"),
          "eval --tasks: %s", output());
    text = slurp(out, &len);
    Json results;
    CHECK(text && json_parse(text, len, out, &results) == 0 &&
              json_path(&results, "results", "arc_easy", "acc_norm,none") &&
              json_path(&results, "results", "lambada_openai", "perplexity_stderr,none") &&
              json_path(&results, "n-samples", "sciq", "original") &&
              json_get(json_get(&results, "config"), "model_args"),
          "results.json in the harness's shape: %s", text);
    json_free(&results);
    free(text);
    CHECK(run("%s eval dev/fixtures/eval/model --task "
              "dev/fixtures/eval/tasks/arc_easy.jsonl --limit 1", mlkv_bin) == 0 &&
              strstr(output(), "| arc_easy | 1 | acc |") && strstr(output(), "| N/A |"),
          "--limit 1 (no standard error of one document): %s", output());

    /* bad task files: the file and line are named */
    snprintf(bad, sizeof(bad), "%s/bad.jsonl", tmp_dir);
    struct { const char *line, *message;
    } broken[] = {
        {"{\"task\": \"arc_easy\", \"kind\": \"multiple_choice\"", "bad.jsonl:2: invalid JSON"},
        {"{\"task\": \"arc_easy\", \"kind\": \"multiple_choice\", \"choices\": [\"a\"], \"gold\": "
         "0, \"context_ids\": [1], \"continuation_ids\": [[320]]}",
         "bad.jsonl:2: continuation_ids[0] must be"},
        {"{\"task\": \"arc_easy\", \"kind\": \"multiple_choice\", \"choices\": [\"a\"], \"gold\": "
         "1, \"context_ids\": [1], \"continuation_ids\": [[3]]}",
         "bad.jsonl:2: \"gold\" must be the index of a choice"},
        {"{\"task\": \"piqa\", \"kind\": \"multiple_choice\", \"choices\": [\"a\"], \"gold\": 0, "
         "\"context_ids\": [1], \"continuation_ids\": [[3]]}",
         "bad.jsonl:2: task \"piqa\""},
    };
    for (size_t i = 0; i < sizeof(broken) / sizeof(broken[0]); i++) {
        char body[1024];
        snprintf(
            body, sizeof(body),
            "{\"task\": \"arc_easy\", \"kind\": \"multiple_choice\", \"choices\": [\"a\", \"b\"], "
            "\"gold\": 0, \"context_ids\": [1, 2], \"continuation_ids\": [[3], [4, 5]]}\n%s\n",
            broken[i].line);
        write_text(bad, body);
        CHECK(run("%s eval dev/fixtures/eval/model --task %s", mlkv_bin, bad) == 1 &&
                  strstr(output(), broken[i].message),
              "bad task line %zu: %s", i, output());
    }
    write_text(bad, "\n\n");
    CHECK(run("%s eval dev/fixtures/eval/model --task %s", mlkv_bin, bad) == 1 &&
              strstr(output(), "no documents"),
          "empty task file: %s", output());

    /* a task of one's own: the text file scored here gives the results.json of the same file
     * with the ids tokenize.py writes */
    const char *own[] = {"own_choice", "own_word"};
    for (int i = 0; i < 2; i++) {
        char a[400], b[400], ids[400];
        snprintf(a, sizeof(a), "%s/%s.text.json", tmp_dir, own[i]);
        snprintf(b, sizeof(b), "%s/%s.ids.json", tmp_dir, own[i]);
        snprintf(ids, sizeof(ids), "%s/%s.jsonl", tmp_dir, own[i]);
        CHECK(run("%s eval dev/fixtures/eval/model --task dev/fixtures/eval/text/%s.jsonl --out %s",
                  mlkv_bin, own[i], a) == 0 &&
                  run("python3 tokenize.py tasks --tokenizer "
                      "dev/fixtures/eval/model/tokenizer.json --input "
                      "dev/fixtures/eval/text/%s.jsonl --out %s", own[i], ids) == 0 &&
                  run("%s eval dev/fixtures/eval/model --task %s --out %s", mlkv_bin, ids, b) ==
                      0 &&
                  same_file(a, b),
              "%s: text and tokenize.py's ids must give one results.json: %s", own[i], output());
    }
    struct { const char *lines, *message;
    } text_tasks[] = {
        {"{\"context\": \"a\", \"choices\": [\"b\", \"c\"]}", "bad.jsonl:1: \"gold\" must be"},
        {"{\"context\": \"a\", \"choices\": [\"b\"], \"context_ids\": [1]}",
         "bad.jsonl:1: give both \"context_ids\" and \"continuation_ids\", or neither"},
        {"{\"context\": \"caf\u00e9\", \"choices\": [\"b\"]}",
         "bad.jsonl:1: the text is not ASCII, which mlkv's tokenizer does not encode exactly: "
         "write the file's ids with python3 tokenize.py tasks"},
        {"{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 0}\n"
         "{\"context\": \"a\", \"choices\": [\"b\"]}",
         "bad.jsonl:2: task \"bad\" (loglikelihood) in a file of bad"},
        {"{\"task\": \"a_task_name_of_sixty_four_characters_is_one_more_than_names_hold\", "
         "\"context\": \"a\", \"choices\": [\"b\"]}",
         "bad.jsonl:1: a task name of 64 characters: 1 to 63"},
        {"{\"context\": \"a\", \"choices\": [\"\"], \"target_delimiter\": \"\"}",
         "bad.jsonl:1: the choice \"\" adds no token to the context"}};
    for (size_t i = 0; i < sizeof(text_tasks) / sizeof(text_tasks[0]); i++) {
        write_text(bad, text_tasks[i].lines);
        CHECK(run("%s eval dev/fixtures/eval/model --task %s", mlkv_bin, bad) == 1 &&
                  strstr(output(), text_tasks[i].message),
              "text task %zu: %s", i, output());
    }
    write_text(bad, "{\"context\": \"a\", \"choices\": [\"b\"]}");
    CHECK(run("%s eval dev/fixtures/mha --task %s", mlkv_bin, bad) == 1 &&
              strstr(output(), "bad.jsonl:1: no token ids here, and the tokenizer to make them") &&
              strstr(output(), "dev/fixtures/mha"),
          "a model folder without tokenizer.json: %s", output());
    CHECK(run("%s eval dev/fixtures/mha --task %s --tokenizer "
              "dev/fixtures/eval/model/tokenizer.json", mlkv_bin, bad) == 1 &&
              strstr(output(), "bad.jsonl:1: the tokenizer gives id ") &&
              strstr(output(), "past the model's vocabulary of 64"),
          "--tokenizer, whose ids the model does not have: %s", output());

    /* --data: windows of T predictions; a file of T + 1 tokens is one window */
    snprintf(tokens, sizeof(tokens), "%s/eval_tokens.bin", tmp_dir);
    write_tokens(tokens, 17, 320, 9);
    CHECK(run("%s eval dev/fixtures/eval/model --data %s --seq 16", mlkv_bin, tokens) == 0 &&
          strstr(output(), ": 16 predictions in windows of 16: loss "), "one window: %s", output());
    write_tokens(tokens, 2 * 16 + 1 + 5, 320, 9);
    CHECK(run("%s eval dev/fixtures/eval/model --data %s --seq 16 --batch 3", mlkv_bin, tokens) ==
                  0 &&
              strstr(output(), ": 37 predictions in windows of 16: loss "),
          "two windows and 5 more: %s", output());
    /* the same loss as the model's own forward pass on those windows */
    TokenFile f;
    Model e;
    if (tokens_load(&f, tokens, 320) == 0 && model_load(&e, "dev/fixtures/eval/model") == 0 &&
        model_prepare(&e, 2, 16, 0) == 0) {
        int in[32], tg[32];
        for (int i = 0; i < 32; i++) in[i] = f.tokens[i], tg[i] = f.tokens[i + 1];
        double sum = (double)model_forward(&e, in, tg, 2, 16) * 32;
        for (int i = 0; i < 5; i++) in[i] = f.tokens[32 + i], tg[i] = f.tokens[33 + i];
        sum += (double)model_forward(&e, in, tg, 1, 5) * 5;
        char want[64];
        snprintf(want, sizeof(want), "loss %.6f", sum / 37);
        CHECK(strstr(output(), want) != NULL, "eval --data %s: %s", want, output());
        model_free(&e);
        tokens_free(&f);
    } else CHECK(0, "eval --data reference: %s", mlkv_error());
    CHECK(run("%s eval dev/fixtures/eval/model --data %s --seq 16 --max-tokens 20", mlkv_bin,
              tokens) == 0 &&
              strstr(output(), ": 20 predictions"),
          "--max-tokens: %s", output());
}

static int is_ascii(const char *s) {
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80) return 0;
    return 1;
}

static void test_tokenizer(void) {
    size_t len;
    char *text = slurp("dev/fixtures/tokenizer/expected.json", &len);
    Json expected;
    CHECK(text && json_parse(text, len, "expected.json", &expected) == 0, "tokenizer fixture: %s",
          mlkv_error());
    free(text);
    for (size_t f = 0; f < expected.length; f++) {
        char path[300];
        snprintf(path, sizeof(path), "dev/fixtures/tokenizer/%s", expected.keys[f]);
        Tokenizer tok;
        if (tokenizer_load(&tok, path) != 0) {
            CHECK(0, "load %s: %s", path, mlkv_error());
            continue;
        }
        const Json *cases = json_get(&expected.items[f], "cases");
        int decoded_ok = 0, encoded = 0, encoded_ok = 0, ids[4096];
        char buf[65536];
        for (size_t c = 0; c < cases->length; c++) {
            const Json *want_ids = json_get(&cases->items[c], "ids");
            const Json *want = json_get(&cases->items[c], "decoded"),
                       *in = json_get(&cases->items[c], "text");
            const char *want_text = want->string, *input = in->string;
            size_t n = 0;
            int ok = 1;
            for (size_t i = 0; i < want_ids->length && ok; i++) {
                int k;
                const char *b = tokenizer_token(&tok, (int)want_ids->items[i].number, &k);
                ok = b && n + (size_t)k < sizeof(buf);
                if (ok) { memcpy(buf + n, b, (size_t)k); n += (size_t)k; }
            }
            decoded_ok += ok && n == want->length && !memcmp(buf, want_text, n);
            CHECK(ok && n == want->length && !memcmp(buf, want_text, n), "%s: decode of case %zu",
                  path, c);
            if (strlen(input) != in->length) continue; /* a NUL inside: C strings end there */
            if (!is_ascii(input)) {
                CHECK(tokenizer_encode(&tok, input, ids, 4096) == -1 &&
                          strstr(mlkv_error(), "tokenize.py encode"),
                      "non-ASCII text is refused with a pointer to tokenize.py");
                continue;
            }
            int got = tokenizer_encode(&tok, input, ids, 4096);
            int same = got == (int)want_ids->length;
            for (int i = 0; same && i < got; i++) same = ids[i] == (int)want_ids->items[i].number;
            encoded++;
            encoded_ok += same;
            CHECK(same, "%s: encode of case %zu (%.40s): %d ids, expected %zu", path, c, input, got,
                  want_ids->length);
        }
        printf("  tokenizer %s: %d of %zu decodings and %d "
               "of %d ASCII encodings equal HF tokenizers\n",
               expected.keys[f], decoded_ok, cases->length, encoded_ok, encoded);
        CHECK(encoded >= 40, "%s: only %d ASCII cases", path, encoded);
        tokenizer_free(&tok);
    }
    json_free(&expected);
    /* streaming holds back a character until its last byte arrives */
    char stream_path[300];
    snprintf(stream_path, sizeof(stream_path), "%s/stream.txt", tmp_dir);
    FILE *f = fopen(stream_path, "wb");
    Utf8Stream st = {{0}, 0};
    const char *whole = "a\xc3\xa9\xe6\x97\xa5\xf0\x9f\x98\x80z";
    for (const char *p = whole; *p; p++) {
        long before = ftell(f);
        utf8_stream_write(&st, p, 1, f);
        long after = ftell(f);
        int ends_char = p[1] == '\0' || ((unsigned char)p[1] & 0xC0) != 0x80;
        CHECK((after > before) == ends_char, "stream output at byte %ld", (long)(p - whole));
    }
    utf8_stream_flush(&st, f);
    fclose(f);
    char *back = slurp(stream_path, &len);
    CHECK(back && !strcmp(back, whole), "stream writes every byte once");
    free(back);
    CHECK(run("%s encode --tokenizer dev/fixtures/tokenizer/pythia-tokenizer.json "
              "\"Hello  world<|endoftext|>\"", mlkv_bin) == 0 &&
              !strcmp(output(), "12092 50276 10186 0\n"),
          "mlkv encode: %s", output());
    CHECK(run("mkdir -p %s/model_with_tokenizer && cp dev/fixtures/tokenizer/pythia-tokenizer.json "
              "%s/model_with_tokenizer/tokenizer.json", tmp_dir, tmp_dir) == 0, "copy");
    CHECK(run("%s decode --tokenizer %s/model_with_tokenizer 12092 50276 10186 0", mlkv_bin,
              tmp_dir) == 0 &&
              !strcmp(output(), "Hello  world<|endoftext|>"),
          "mlkv decode: %s", output());
    CHECK(run("%s decode --tokenizer dev/fixtures/tokenizer/pythia-tokenizer.json 99999",
              mlkv_bin) == 1 &&
              strstr(output(), "99999: not a token id"),
          "bad id: %s", output());
    CHECK(run("%s encode --tokenizer dev/fixtures/tokenizer/pythia-tokenizer.json caf\xc3\xa9",
              mlkv_bin) == 1 &&
              strstr(output(), "tokenize.py encode"),
          "non-ASCII: %s", output());
    snprintf(stream_path, sizeof(stream_path), "%s/bad_tokenizer.json", tmp_dir);
    write_text(stream_path, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": "
                            "[\"a b\"]}, \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}");
    Tokenizer bad;
    CHECK(tokenizer_load(&bad, stream_path) != 0 &&
              strstr(mlkv_error(), "merge 0 (a b) uses a token not in the vocabulary"),
          "bad merges: %s", mlkv_error());
    write_text(stream_path, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": "
                            "[]}, \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}");
    CHECK(tokenizer_load(&bad, stream_path) != 0 && strstr(mlkv_error(), "no token for byte 0x00"),
          "a vocabulary without byte tokens: %s", mlkv_error());
}

/* The reference converter's bookkeeping (add = round(params_lost // L / hidden),
 * MLP += add // 2), checked on its published sizes (Pythia-160M MLKV-2: 3830). */
static void test_convert_sizes(void) {
    Config c = {.vocab_size = 50304,
                .hidden_size = 768,
                .n_layer = 12,
                .n_head = 12,
                .intermediate_size = 3072,
                .max_position_embeddings = 2048,
                .n_kv_head = 12,
                .n_kv_layer = 12,
                .rotary_pct = 0.25,
                .rotary_base = 10000,
                .layer_norm_eps = 1e-5};
    CHECK(config_finalize(&c, "160m") == 0, "finalize");
    int I, kvI;
    convert_sizes(&c, 1, 2, 0, &I, &kvI);
    CHECK(I == 3830 && kvI == 0, "Pythia-160M MLKV-2: intermediate %d (3830 expected)", I);
    convert_sizes(&c, 12, 12, 0, &I, &kvI);
    CHECK(I == 3072, "MHA keeps the MLP: %d", I);
}

/* --- sample and bench-kv -------------------------------------------------- */

/* Greedy continuation of prompt by full forward passes, the slow way. */
static void greedy_by_forward(Model *m, int *seq, int prompt, int total) {
    model_prepare(m, 1, total, 0);
    for (int t = prompt; t < total; t++) {
        model_forward(m, seq, NULL, 1, t);
        const float *z = m->a.logits + (size_t)(t - 1) * m->config.vocab_size;
        int best = 0;
        for (int v = 1; v < m->config.vocab_size; v++) best = z[v] > z[best] ? v : best;
        seq[t] = best;
    }
}

/* sample stops at <|endoftext|> (unless --ignore-eos) and at --stop, and never
 * samples an id the tokenizer lacks. The model: the eval fixture with a head
 * that always prefers id 300 (past the byte tokenizer's 257), then id 256,
 * <|endoftext|>: the final LayerNorm outputs its bias e_0 at every position,
 * so the logits are the head's column 0. */
/* Finished work is never replaced without --overwrite (train: or --resume),
 * an input is never its own output, and a model carries its tokenizer. */
static void test_folder_rules(void) {
    char cfg[400], tokens[400];
    snprintf(cfg, sizeof(cfg), "%s/rules_config.json", tmp_dir);
    write_text(cfg, "{\"model_type\": \"gpt_neox\", \"vocab_size\": 320, \"hidden_size\": 32, "
                    "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"intermediate_size\": "
                    "64, \"max_position_embeddings\": 64}");
    snprintf(tokens, sizeof(tokens), "%s/rules_tokens.bin", tmp_dir);
    write_tokens(tokens, 3000, 320, 4);
    CHECK(run("%s init --config %s --out %s/owned --tokenizer "
              "dev/fixtures/tokenizer/bytes-tokenizer.json",
              mlkv_bin, cfg, tmp_dir) == 0 &&
              strstr(output(), "with its tokenizer") && exists("%s/owned/tokenizer.json", tmp_dir),
          "init --tokenizer FILE: %s", output());
    CHECK(run("%s sample %s/owned --prompt hi -n 2", mlkv_bin, tmp_dir) == 0,
          "the folder's tokenizer: %s", output());
    CHECK(run("%s init --config %s --out %s/owned", mlkv_bin, cfg, tmp_dir) == 1 &&
              strstr(output(), "already holds a model") && strstr(output(), "--overwrite"),
          "init over a model: %s", output());
    CHECK(run("%s init --config %s --out %s/owned --overwrite --tokenizer %s/owned", mlkv_bin, cfg,
              tmp_dir, tmp_dir) == 0 &&
              exists("%s/owned/tokenizer.json", tmp_dir),
          "re-init keeping the folder's tokenizer: %s", output());
    CHECK(run("%s init --config %s --out %s/owned2 --tokenizer %s/owned", mlkv_bin, cfg, tmp_dir,
              tmp_dir) == 0 &&
              exists("%s/owned2/tokenizer.json", tmp_dir),
          "init --tokenizer DIR: %s", output());
    CHECK(run("%s init --config %s --out %s/owned3 --tokenizer %s", mlkv_bin, cfg, tmp_dir, cfg) ==
                  1 &&
              strstr(output(), "--tokenizer: ") && !exists("%s/owned3", tmp_dir),
          "a bad tokenizer: %s", output());
    CHECK(run("%s train --model %s/owned --train %s --out %s/run "
              "--steps 2 --batch 2 --seq 16 --grad-accum 1",
              mlkv_bin, tmp_dir, tokens, tmp_dir) == 0 &&
              exists("%s/run/tokenizer.json", tmp_dir),
          "train carries the tokenizer: %s", output());
    CHECK(run("%s train --model %s/owned --train %s --out %s/run "
              "--steps 2 --batch 2 --seq 16 --grad-accum 1",
              mlkv_bin, tmp_dir, tokens, tmp_dir) == 1 &&
              strstr(output(), "--overwrite") && strstr(output(), "--resume"),
          "train over a finished run: %s", output());
    CHECK(run("%s train --model %s/owned --train %s --out %s/run --steps 2 --batch 2 --seq 16 "
              "--grad-accum 1 --overwrite",
              mlkv_bin, tmp_dir, tokens, tmp_dir) == 0,
          "train --overwrite: %s", output());
    CHECK(run("%s train --model %s/run --train %s --out %s/run/ --steps 2 --batch 2 --seq 16 "
              "--grad-accum 1 --overwrite",
              mlkv_bin, tmp_dir, tokens, tmp_dir) == 1 &&
              strstr(output(), "is also the input model"),
          "train into its own input: %s", output());
    CHECK(run("%s convert dev/fixtures/mha --kv-layers 2 "
              "--kv-heads 2 --out dev/fixtures/mha --overwrite", mlkv_bin) == 1 &&
              strstr(output(), "is also the input model"),
          "convert into its own input: %s", output());
    /* one run writes a folder at a time: a live lock refuses, a dead one is taken over and released
     */
    char lock[400];
    snprintf(lock, sizeof(lock), "%s/locked.lock", tmp_dir);
    char pid[32];
    snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
    write_text(lock, pid);
    CHECK(run("%s train --model %s/owned --train %s --out %s/locked "
              "--steps 2 --batch 2 --seq 16 --grad-accum 1",
              mlkv_bin, tmp_dir, tokens, tmp_dir) == 1 &&
              strstr(output(), "being written by another mlkv run (process"),
          "a live lock: %s", output());
    write_text(lock, "999999999\n");
    CHECK(run("%s train --model %s/owned --train %s --out %s/locked "
              "--steps 2 --batch 2 --seq 16 --grad-accum 1",
              mlkv_bin, tmp_dir, tokens, tmp_dir) == 0 &&
              !exists("%s/locked.lock", tmp_dir),
          "a stale lock: %s", output());
    /* the folders a save replaces beside OUT are checked like OUT: nothing of the user's is deleted
     */
    CHECK(run("mkdir -p %s/guarded.saving && echo mine > %s/guarded.saving/notes.txt", tmp_dir,
              tmp_dir) == 0,
          "mkdir");
    CHECK(run("%s train --model %s/owned --train %s --out %s/guarded "
              "--steps 2 --batch 2 --seq 16 --grad-accum 1",
              mlkv_bin, tmp_dir, tokens, tmp_dir) == 1 &&
              strstr(output(), "guarded.saving: holds notes.txt, which mlkv did not write") &&
              exists("%s/guarded.saving/notes.txt", tmp_dir),
          "a foreign file in OUT.saving: %s", output());
}

/* train refuses a plan that cannot learn and proposes one that can; a time
 * budget ends a run with a checkpoint that resumes; --log-every thins the
 * printed steps, not the log file. */
static void test_train_plan(void) {
    char tokens[400];
    snprintf(tokens, sizeof(tokens), "%s/plan_tokens.bin", tmp_dir);
    write_tokens(tokens, 40 * 16 + 1, 64, 6); /* 40 sequences of 16 predictions */
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/plan --seq 16", mlkv_bin,
              tokens, tmp_dir) == 1 &&
              strstr(output(),
                     "40 sequences of 16 tokens make 0 optimizer steps of 4 x 32 sequences: too "
                     "few to learn. Try --batch 1 --grad-accum 1, or --epochs 64"),
          "the default recipe on a small file: %s", output());
    CHECK(run("%s train --model dev/fixtures/gqa --train %s "
              "--out %s/plan --seq 16 --batch 1 --grad-accum 2", mlkv_bin, tokens, tmp_dir) == 0 &&
              strstr(output(), "20 steps of 1 x 2 x 16") && !strstr(output(), "not used"),
          "the proposed plan runs: %s", output());
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/plan2 --seq 16 --batch 1 "
              "--grad-accum 1 --epochs 0.6",
              mlkv_bin, tokens, tmp_dir) == 0 &&
              strstr(output(), "24 steps"),
          "a fraction of an epoch: %s", output());
    /* a token budget: 1000 tokens are 62 sequences of 16, 31 steps of 2 */
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/budget --seq 16 --batch 2 "
              "--grad-accum 1 --max-tokens 1000",
              mlkv_bin, tokens, tmp_dir) == 0 &&
              strstr(output(), "31 steps of 2 x 1 x 16"),
          "--max-tokens: %s", output());
    CHECK(run("%s train --model dev/fixtures/gqa --train %s "
              "--out %s/never --steps 5 --max-tokens 1000", mlkv_bin, tokens, tmp_dir) == 2 &&
              strstr(output(), "give one of --steps, --epochs and --max-tokens"),
          "two lengths: %s", output());
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/plan3 --seq 16 --batch 3 "
              "--grad-accum 2 --epochs 3",
              mlkv_bin, tokens, tmp_dir) == 0 &&
              strstr(output(), "train: 0 of 120") == NULL && strstr(output(), "20 steps") &&
              !strstr(output(), "not used"),
          "whole steps: %s", output());
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/plan4 --seq 16 --batch 7 "
              "--grad-accum 1 --epochs 4",
              mlkv_bin, tokens, tmp_dir) == 0 &&
              strstr(output(), "train: 6 of 160 sequences are not used"),
          "unused sequences are reported: %s", output());
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/plan5 --seq 16 --steps 1",
              mlkv_bin, tokens, tmp_dir) == 1 &&
              strstr(output(), "warmup of 1 step leaves none of the 1 at the full learning rate"),
          "warmup without a full-rate step: %s", output());
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/timed --seq 16 --batch 1 "
              "--grad-accum 1 --steps 500 --max-time 0.001s --log-every 100",
              mlkv_bin, tokens, tmp_dir) == 0 &&
              strstr(output(), "step     1/500") && strstr(output(), "stopped by --max-time"),
          "--max-time: %s", output());
    /* A step takes about a millisecond here, so the run stops after step 1 or a few more: read
     * which. */
    const char *stopped = strstr(output(), "stopped by --max-time after step ");
    int stop_step = stopped ? atoi(stopped + strlen("stopped by --max-time after step ")) : 0;
    CHECK(stop_step >= 1 && stop_step < 99, "--max-time 0.001s stops early: after step %d",
          stop_step);
    char resumed_at[64], last_logged[32], not_logged[32];
    snprintf(resumed_at, sizeof(resumed_at), "resuming at step %d of 500", stop_step);
    snprintf(last_logged, sizeof(last_logged), "step %5d/500", stop_step);
    snprintf(not_logged, sizeof(not_logged), "step %5d/500", stop_step + 1);
    CHECK(strstr(output(), last_logged) && !strstr(output(), not_logged),
          "the last step is logged: %s", output());
    CHECK(run("%s train --resume --train %s --out %s/timed --seq 16 --batch 1 --grad-accum 1 "
              "--steps 500 --log-every 100",
              mlkv_bin, tokens, tmp_dir) == 0 &&
              strstr(output(), resumed_at) && strstr(output(), "step   100/500") &&
              !strstr(output(), "step    99/500") && strstr(output(), "step   500/500"),
          "resume after --max-time, --log-every: %s", output());
    char log[400];
    snprintf(log, sizeof(log), "%s/timed.log.csv", tmp_dir);
    size_t len;
    char *text = slurp(log, &len);
    int lines = 0;
    for (size_t i = 0; text && i < len; i++) lines += text[i] == '\n';
    CHECK(lines == 501, "the log keeps every step: %d lines", lines);
    free(text);
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/x --max-time soon", mlkv_bin,
              tokens, tmp_dir) == 2 &&
              strstr(output(), "give a duration such as 90s"),
          "bad --max-time: %s", output());
}

/* Messages a user reads: a likely typo gets the flag meant, integer bounds
 * print as integers, counts agree with their nouns, sizes have a unit that fits. */
static void test_messages(void) {
    CHECK(run("%s train --lrr 3", mlkv_bin) == 2 &&
              strstr(output(), "unknown argument --lrr: did you mean --lr?"),
          "did you mean: %s", output());
    CHECK(run("%s sample x --temprature 0", mlkv_bin) == 2 &&
              strstr(output(), "did you mean --temperature?"),
          "did you mean: %s", output());
    CHECK(run("%s train --frobnicate", mlkv_bin) == 2 &&
              !strcmp(output(), "mlkv: unknown argument --frobnicate (mlkv train --help: every "
                                "option)\n"),
          "no suggestion for a far-off flag, one line: %s", output());
    CHECK(run("%s eval dev/fixtures/mha --lrr=3", mlkv_bin) == 2 &&
              !strcmp(output(), "mlkv: unknown argument --lrr=3 (mlkv eval --help: every "
                                "option)\n"),
          "--flag=value, unknown: %s", output());
    CHECK(run("%s sample dev/fixtures/mha --prompt-ids=1,2 -n=2 --temperature=0", mlkv_bin) == 2 &&
              strstr(output(), "unknown argument -n=2"),
          "only --long flags take =: %s", output());
    CHECK(run("%s sample dev/fixtures/mha --prompt-ids=1,2 -n 2 --temperature=0", mlkv_bin) == 0,
          "--flag=value: %s", output());
    CHECK(run("%s convert dev/fixtures/mha --kv-layers=1 --kv-heads=1 --overwrite=yes --out %s/eq",
              mlkv_bin, tmp_dir) == 2 &&
              strstr(output(), "--overwrite takes no value"),
          "a switch with a value: %s", output());
#ifdef _OPENMP
    CHECK(run("%s sample dev/fixtures/mha --prompt-ids 1 -n 1 --threads 512", mlkv_bin) == 0 &&
              strstr(output(), "mlkv: warning: --threads 512 on ") &&
              strstr(output(), "leave --threads out to use every core"),
          "more threads than cores: %s", output());
#else
    CHECK(run("%s sample dev/fixtures/mha --prompt-ids 1 -n 1 --threads 2", mlkv_bin) == 0 &&
              strstr(output(), "this build has no OpenMP and computes on one thread"),
          "--threads without OpenMP: %s", output());
#endif
    CHECK(run("%s eval", mlkv_bin) == 2 &&
              strstr(output(), "mlkv: eval: DIR and --data, --task or --tasks are required\n"
                               "usage: mlkv eval DIR --data") &&
              strstr(output(), "(mlkv eval --help: every option)\n") &&
              !strstr(output(), "Measures a model"),
          "a usage error: the message, the synopsis, where the rest is: %s", output());
    CHECK(run("%s train --steps 0", mlkv_bin) == 2 &&
              strstr(output(), "--steps 0 is out of range [1, 2147483647]"),
          "integer bounds: %s", output());
    CHECK(run("%s convert dev/fixtures/mha --kv-layers 1 --kv-heads 1 --out %s/one_head", mlkv_bin,
              tmp_dir) == 0 &&
              strstr(output(), "(1 layer x 1 head; was 4 x 4)") && strstr(output(), "x smaller)"),
          "plurals: %s", output());
    /* convert without --out: into the current folder, named after the model (for an HF cache
     * snapshot, .../models--ORG--NAME/snapshots/HASH, after NAME), never beside the input */
    CHECK(run("d=%s/hub/models--EleutherAI--pythia-tiny/snapshots/0123abc && mkdir -p $d %s/work "
              "&& cp dev/fixtures/mha/config.json dev/fixtures/mha/model.safetensors $d && cd "
              "%s/work && %s convert $d --kv-layers 2 --kv-heads 2 && %s convert $d/ --kv-layers 1 "
              "--kv-heads 4 --kv-mlp",
              tmp_dir, tmp_dir, tmp_dir, mlkv_bin, mlkv_bin) == 0 &&
              exists("%s/work/pythia-tiny_mlkv_2_2/model.safetensors", tmp_dir) &&
              exists("%s/work/pythia-tiny_mlkv_mlp_1_4/model.safetensors", tmp_dir) &&
              !exists("%s/hub/models--EleutherAI--pythia-tiny/snapshots/0123abc_mlkv_2_2",
                      tmp_dir) &&
              strstr(output(), "-> pythia-tiny_mlkv_2_2\n"),
          "convert's default --out: %s", output());
    CHECK(run("repo=$(pwd) && cd %s/work && %s convert $repo/dev/fixtures/mha --kv-layers 1 "
              "--kv-heads 1", tmp_dir, mlkv_bin) == 0 &&
              exists("%s/work/mha_mlkv_1_1/config.json", tmp_dir),
          "convert's default --out, a folder's name: %s", output());
    CHECK(run("%s convert %s/work/mha_mlkv_1_1 --kv-layers 1 --kv-heads 1 --out %s/never", mlkv_bin,
              tmp_dir, tmp_dir) == 1 &&
              strstr(output(), "already shares K/V (1 head in 1 layer)"),
          "plurals of one: %s", output());
    CHECK(run("%s sample %s/one_head --prompt-ids 1 -n 2", mlkv_bin, tmp_dir) == 0 &&
              strstr(output(), "KV cache 192 B;"),
          "a small cache in bytes: %s", output());
    char count_tokens[400];
    snprintf(count_tokens, sizeof(count_tokens), "%s/count_tokens.bin", tmp_dir);
    write_tokens(count_tokens, 40 * 16 + 1, 64, 5);
#ifdef _OPENMP
    /* every command waits passively (spinning threads collapse beside a busy process) */
    /* (the runtimes' own report: libgomp's spin count, LLVM libomp's block time, 0 when passive) */
    CHECK(run("OMP_DISPLAY_ENV=verbose %s sample dev/fixtures/gqa --prompt-ids 1 -n 2", mlkv_bin) ==
                  0 &&
              (strstr(output(), "GOMP_SPINCOUNT = '0'") || strstr(output(), "KMP_BLOCKTIME='0'")),
          "sample waits passively: %s", output());
    CHECK(run("OMP_DISPLAY_ENV=verbose %s train --model dev/fixtures/gqa --train %s --out "
              "%s/passive --seq 16 --batch 1 --grad-accum 1 --steps 2 --warmup-steps 1", mlkv_bin,
              count_tokens, tmp_dir) == 0 &&
              (strstr(output(), "GOMP_SPINCOUNT = '0'") || strstr(output(), "KMP_BLOCKTIME='0'")),
          "train waits passively: %s", output());
    CHECK(run("OMP_DISPLAY_ENV=verbose OMP_WAIT_POLICY=active "
              "%s sample dev/fixtures/gqa --prompt-ids 1 -n 2", mlkv_bin) == 0 &&
              !strstr(output(), "GOMP_SPINCOUNT = '0'") && !strstr(output(), "KMP_BLOCKTIME='0'"),
          "a user's policy wins: %s", output());
#endif
    /* counts from a user or a file, range-checked before any conversion */
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/many --seq 16 --batch 1 "
              "--grad-accum 1 --epochs 1e9 --stop-after 1",
              mlkv_bin, count_tokens, tmp_dir) == 0 &&
              strstr(output(), "2147483647 steps of 1 x 1 x 16"),
          "huge --epochs: as many steps as an int holds: %s", output());
    CHECK(run("%s train --resume --train %s --out %s/many --seq 16 --batch 1 --grad-accum 1 "
              "--epochs 1e9 --stop-after 2147483647 --max-time 1s --log-every 1000000",
              mlkv_bin, count_tokens, tmp_dir) == 0 &&
              strstr(output(), "resuming at step 1 of 2147483647") &&
              strstr(output(), "stopped by --max-time"),
          "--stop-after past the int range on resume: %s", output());
    CHECK(run("%s decode --tokenizer dev/fixtures/tokenizer/bytes-tokenizer.json 65 4294967361",
              mlkv_bin) == 1 &&
              strstr(output(), "4294967361: not a token id"),
          "an id past 2^32: %s", output());
    char empty[400];
    snprintf(empty, sizeof(empty), "%s/empty_tokenizer.json", tmp_dir);
    write_text(empty, "{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}, "
                      "\"pre_tokenizer\": {\"type\": \"ByteLevel\"}, \"added_tokens\": []}");
    CHECK(run("%s encode --tokenizer %s hi", mlkv_bin, empty) == 1 &&
              strstr(output(), "the vocabulary is empty"),
          "an empty vocabulary: %s", output());
    /* a full disk: output that did not arrive is an error */
    CHECK(run("(%s decode --tokenizer dev/fixtures/tokenizer/pythia-tokenizer.json "
              "12092 50276 10186 > /dev/full)", mlkv_bin) == 1 &&
              strstr(output(), "standard output: write error"),
          "decode into a full disk: %s", output());
    CHECK(run("(%s sample dev/fixtures/gqa --prompt-ids 1 -n 3 > /dev/full)", mlkv_bin) == 1 &&
              strstr(output(), "standard output: write error"),
          "sample into a full disk: %s", output());
    char full_tokens[400];
    snprintf(full_tokens, sizeof(full_tokens), "%s/full_tokens.bin", tmp_dir);
    write_tokens(full_tokens, 2000, 64, 3);
    CHECK(run("ln -sf /dev/full %s/full_run.log.csv && %s train --model dev/fixtures/gqa --train "
              "%s --out %s/full_run --steps 3 --batch 2 --seq 16 --grad-accum 1",
              tmp_dir, mlkv_bin, full_tokens, tmp_dir) == 1 &&
              strstr(output(), "full_run.log.csv: write error"),
          "a training log on a full disk: %s", output());
    /* progress into a file: whole lines, no carriage returns */
    char tokens[400];
    snprintf(tokens, sizeof(tokens), "%s/progress_tokens.bin", tmp_dir);
    write_tokens(tokens, 33, 320, 2);
    CHECK(run("%s eval dev/fixtures/eval/model --data %s --seq 16", mlkv_bin, tokens) == 0 &&
              strstr(output(), "eval: 32 / 32 tokens | ") && !strchr(output(), '\r'),
          "progress in a file: %s", output());
}

/* --freeze-embeds: the token embedding and the output head get no gradient,
 * so the clipping norm is the rest's (PyTorch's with requires_grad = False:
 * norm^2 frozen + their squared gradients = norm^2 of everything), and a
 * training run leaves them bit for bit as they were while the rest learns. */
static double sum_squares(const float *x, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

static void test_freeze_embeds(void) {
    Model m;
    int B = 2, T = 16, inputs[32], targets[32];
    CHECK(model_load(&m, "dev/fixtures/gqa") == 0 && model_prepare(&m, B, T, 1) == 0, "load: %s",
          mlkv_error());
    for (int i = 0; i < B * T; i++) inputs[i] = (i * 5 + 1) % 64, targets[i] = (i * 11 + 3) % 64;
    size_t embed = (size_t)m.config.vocab_size * m.config.hidden_size;
    double norm[2], frozen_squares = 0, left = 0;
    for (int frozen = 0; frozen <= 1; frozen++) {
        m.freeze_embeddings = frozen;
        model_zero_grad(&m);
        model_forward_backward(&m, inputs, targets, B, T, 1.0f);
        double embed_squares = sum_squares(m.g.embed_in, embed) + sum_squares(m.g.embed_out, embed);
        if (frozen) left = embed_squares;
        else frozen_squares = embed_squares;
        norm[frozen] = clip_gradients(&m, 0);
    }
    CHECK(left == 0 && frozen_squares > 0 &&
              fabs(norm[1] * norm[1] + frozen_squares - norm[0] * norm[0]) <=
                  1e-5 * norm[0] * norm[0],
          "frozen gradients: %g left; norms %.9g and %.9g, embeddings' squares %.9g", left, norm[0],
          norm[1], frozen_squares);
    model_free(&m);

    char tokens[400], out[400];
    snprintf(tokens, sizeof(tokens), "%s/freeze_tokens.bin", tmp_dir);
    write_tokens(tokens, 2000, 64, 9);
    CHECK(run("%s train --model dev/fixtures/gqa --train %s --out %s/frozen --steps 20 --batch 2 "
              "--seq 16 --grad-accum 1 --freeze-embeds",
              mlkv_bin, tokens, tmp_dir) == 0 &&
              strstr(output(), "are frozen (--freeze-embeds)"),
          "train --freeze-embeds: %s", output());
    snprintf(out, sizeof(out), "%s/frozen", tmp_dir);
    Model before, after;
    CHECK(model_load(&before, "dev/fixtures/gqa") == 0 && model_load(&after, out) == 0,
          "reload: %s", mlkv_error());
    int same_embeddings = !memcmp(before.w.embed_in, after.w.embed_in, embed * sizeof(float)) &&
                          !memcmp(before.w.embed_out, after.w.embed_out, embed * sizeof(float));
    int rest_moved = memcmp(before.w.layer[0].fc_w, after.w.layer[0].fc_w, sizeof(float) * 16) != 0;
    CHECK(same_embeddings && rest_moved, "frozen embeddings unchanged (%d), the rest trained (%d)",
          same_embeddings, rest_moved);
    model_free(&before);
    model_free(&after);
}

/* experiment on a tiny MHA model and a grid of three: every output file, the
 * pictures well-formed XML (Python's expat parser), a rerun that skips every
 * finished stage, and an uptraining stopped by --max-time that a rerun
 * continues to the bytes of an uninterrupted one. */
static int starts_with(const char *s, const char *prefix) {
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

static int count_lines(const char *path) {
    size_t len;
    char *text = slurp(path, &len);
    int lines = 0;
    for (size_t i = 0; text && i < len; i++) lines += text[i] == '\n';
    free(text);
    return text ? lines : -1;
}

/* The bytes of a unit as format_bytes writes them ("KiB." with its period too) */
static double unit_bytes(const char *unit) {
    return !strncmp(unit, "KiB", 3) ? 1024.0
           : !strncmp(unit, "MiB", 3) ? 1048576.0
           : !strncmp(unit, "GiB", 3) ? 1073741824.0
                                     : 1.0;
}

static void test_experiment(void) {
    char train[400], val[400], a[400], b[400];
    snprintf(train, sizeof(train), "%s/exp_train.bin", tmp_dir);
    snprintf(val, sizeof(val), "%s/exp_val.bin", tmp_dir);
    write_tokens(train, 3000, 320, 11);
    write_tokens(val, 600, 320, 12);
    char recipe[1200];
    snprintf(recipe, sizeof(recipe),
             "%s experiment --model dev/fixtures/eval/model --train %s --val %s --configs "
             "MHA-8=2:4,GQA-4=2:2,MLKV-1=1:1 --tasks dev/fixtures/eval/tasks --task-limit 3 --seq "
             "32 --batch 2 --grad-accum 1 --steps 24 --val-batches 2",
             mlkv_bin, train, val);
    /* the whole plan is checked before the first stage, and a refusal writes nothing: the
     * corrected command then runs in the same folder */
    snprintf(a, sizeof(a), "%s/exp_train64.bin", tmp_dir);
    CHECK(run("%s --warmup-steps 30 --out %s/exp_refused", recipe, tmp_dir) == 1 &&
              strstr(output(), "warmup of 30 steps leaves none of the 24") &&
              !strstr(output(), "== experiment [") && !exists("%s/exp_refused", tmp_dir),
          "a plan that cannot learn is refused before the first stage: %s", output());
    write_tokens(a, 3000, 64, 13); /* the vocabulary of mlkv_3x2 */
    CHECK(run("%s --out %s/exp_refused --model dev/fixtures/mlkv_3x2 --train %s --val %s",
              recipe, tmp_dir, a, a) == 1 &&
              strstr(output(), "already shares K/V") && !exists("%s/exp_refused", tmp_dir),
          "an MLKV --model is refused before the first stage: %s", output());
    CHECK(run("%s --out %s/exp_refused --configs MLKV-1=1:1 --steps 2 --warmup-steps 0 --keep all",
              recipe, tmp_dir) == 0 &&
              strstr(output(), "experiment: done in") &&
              exists("%s/exp_refused/MLKV-1/uptrained/optimizer.safetensors", tmp_dir),
          "the corrected command in the same --out, --keep all: %s", output());
    CHECK(run("%s --out %s/exp", recipe, tmp_dir) == 0 &&
              strstr(output(), "[3/3] MLKV-1: measure decoding") &&
              strstr(output(), "| MLKV-1 | 1 x 1 | 1 |") && strstr(output(), "experiment: done in"),
          "experiment: %s", output());
    /* the disk: the estimate printed first, what the run holds at the end, near each other;
     * --keep final (the default) has deleted the finished uptrainings' moments */
    double estimate = 0, held = 0;
    char unit_e[8] = "", unit_h[8] = "";
    const char *line = strstr(output(), "experiment: disk: about ");
    const char *holds = strstr(output(), "/exp holds ");
    CHECK(line && holds &&
              sscanf(line, "experiment: disk: about %lf %7s", &estimate, unit_e) == 2 &&
              sscanf(holds, "/exp holds %lf %7s", &held, unit_h) == 2 &&
              held * unit_bytes(unit_h) > 0.6 * estimate * unit_bytes(unit_e) &&
              held * unit_bytes(unit_h) < 1.2 * estimate * unit_bytes(unit_e),
          "the disk estimate (%g %s) and the use (%g %s): %s", estimate, unit_e, held, unit_h,
          output());
    /* a disk too small for the estimate: refused before any stage, nothing written (a 512 KiB
     * tmpfs in a mount namespace of its own; root, as CI runs) */
    CHECK(run("mkdir -p %s/small && unshare -m sh -c 'mount -t tmpfs -o size=512k tmpfs %s/small "
              "&& %s --out %s/small/exp; echo rc=$?; ls -A %s/small'",
              tmp_dir, tmp_dir, recipe, tmp_dir, tmp_dir) == 0 &&
              strstr(output(), "/small/exp: the experiment needs about ") &&
              strstr(output(), "free some, or choose --out on a larger disk") &&
              strstr(output(), "rc=1\n") && !strstr(output(), "exp\n") &&
              !strstr(output(), "[1/3]"),
          "a disk too small is refused before the first stage: %s", output());
    CHECK(!exists("%s/exp/MLKV-1/uptrained/optimizer.safetensors", tmp_dir) &&
              exists("%s/exp/MLKV-1/uptrained/model.safetensors", tmp_dir),
          "--keep final: the moments deleted, the model kept");
    snprintf(a, sizeof(a), "%s/exp/results.csv", tmp_dir);
    size_t len;
    char *csv = slurp(a, &len);
    CHECK(csv &&
              starts_with(
                  csv,
                  "config,kv_layers,kv_heads,total_kv_heads,parameters,kv_bytes_per_token,val_loss_"
                  "converted,val_loss_uptrained,arc_easy_acc_converted,arc_easy_acc_uptrained,") &&
              strstr(csv, ",decode_tok_s_batch_1,decode_tok_s_batch_4,decode_tok_s_batch_16\n") &&
              strstr(csv, "\nGQA-4,2,2,4,") && strstr(csv, "\nMLKV-1,1,1,1,") &&
              !strstr(csv, "nan"),
          "results.csv: %s", csv ? csv : "(none)");
    free(csv);
    CHECK(count_lines(a) == 4, "results.csv: a header and 3 rows (%d lines)", count_lines(a));
    /* experiment.json: JSON whose numbers and names read as they were given */
    snprintf(a, sizeof(a), "%s/exp/experiment.json", tmp_dir);
    char *settings = slurp(a, &len);
    Json j = {0};
    const Json *recipe_json =
        settings && json_parse(settings, len, a, &j) == 0 ? json_get(&j, "recipe") : NULL;
    const Json *lr = recipe_json ? json_get(recipe_json, "lr") : NULL,
               *schedule = recipe_json ? json_get(recipe_json, "schedule") : NULL,
               *seq = recipe_json ? json_get(recipe_json, "seq") : NULL;
    CHECK(lr && lr->number == 6e-4 && schedule && schedule->string &&
              !strcmp(schedule->string, "cosine") && seq && seq->number == 32 &&
              strstr(settings, "\"lr\": 0.0006,") && strstr(settings, "\"eps\": 1e-08}"),
          "experiment.json: %s", settings ? settings : "(none)");
    json_free(&j);
    free(settings);
    snprintf(b, sizeof(b), "%s/exp/results.md", tmp_dir);
    CHECK(count_lines(b) == 5, "results.md: %d lines", count_lines(b));
    /* each accuracy with the harness's standard error, sqrt(p (1 - p) / (n - 1)): arc_easy's
     * first, over 3 documents */
    char *md = slurp(b, &len);
    const char *row = md ? strstr(md, "\n| MLKV-1 |") : NULL;
    double acc = -1, se = -1;
    for (int bar = 0; row && bar < 8; bar++) row = strchr(row + 1, '|'); /* to arc_easy's cell */
    CHECK(md && strstr(md, "| arc_easy acc converted ± s.e. |") && row &&
              sscanf(row, "| %lf ± %lf |", &acc, &se) == 2 &&
              fabs(se - sqrt(acc * (1 - acc) / 2)) < 1e-4,
          "results.md's standard errors (acc %g, s.e. %g): %s", acc, se, md ? md : "(none)");
    free(md);
    const char *files[] = {"MHA-8/stages.json", "MHA-8/decode.csv",
                           "GQA-4/converted/model.safetensors",
                           "MLKV-1/uptrained/model.safetensors", "MLKV-1/uptrained.log.csv"};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        snprintf(a, sizeof(a), "%s/exp/%s", tmp_dir, files[i]);
        CHECK(exists("%s", a), "experiment wrote %s", files[i]);
    }
    snprintf(a, sizeof(a), "%s/exp/results.csv", tmp_dir);
    CHECK(!exists("%s/exp.lock", tmp_dir), "the lock is gone after the run");
    /* well-formed SVG, with what each must say: the converted loss and the dashed line named,
     * the rolling window, a tick at every batch size, the tasks; legends outside the frame
     * (the first <rect> after the white background) */
    CHECK(run("cd / && python3 -I -c \"import sys, xml.dom.minidom as x\n"
              "want = {'loss_vs_kv': ['after conversion', 'MHA-8 uptrained'], "
              "'loss_curves': ['mean of the last', 'MLKV-1'], 'decode': ['1', '4', '16', "
              "'MLKV-1'], 'tasks': ['arc_easy', 'after conversion']}\n"
              "for n in want:\n"
              "    d = x.parse(sys.argv[1] + '/' + n + '.svg').documentElement\n"
              "    texts = d.getElementsByTagName('text')\n"
              "    words = [t.firstChild.data for t in texts if t.firstChild]\n"
              "    found = lambda w: any(w == s or (len(w) > 3 and w in s) for s in words)\n"
              "    assert all(found(w) for w in want[n]), (n, words)\n"
              "    frame = d.getElementsByTagName('rect')[1]\n"
              "    right = float(frame.getAttribute('x')) + float(frame.getAttribute('width'))\n"
              "    legend = [t for t in texts\n"
              "              if t.firstChild and t.firstChild.data == want[n][-1]]\n"
              "    assert float(legend[-1].getAttribute('x')) > right, n\n"
              "print('svg ok')\" %s/exp", tmp_dir) == 0 && strstr(output(), "svg ok"),
          "the pictures are well-formed SVG and say what they show: %s", output());
    CHECK(run("cp %s %s/results_before.csv", a, tmp_dir) == 0, "copy");
    /* a rerun: nothing to do but the tables and pictures */
    CHECK(run("%s --out %s/exp", recipe, tmp_dir) == 0 && !strstr(output(), "== experiment [") &&
              strstr(output(), "experiment: done in"), "a finished experiment again: %s", output());
    snprintf(b, sizeof(b), "%s/results_before.csv", tmp_dir);
    CHECK(same_file(a, b), "the same results from the recorded stages");
    /* stopped by --max-time during the first uptraining, then continued */
    CHECK(run("%s --out %s/exp2 --max-time 0.001s", recipe, tmp_dir) == 0 &&
              strstr(output(), "MHA-8 stopped after step ") && !strstr(output(), "[2/3]"),
          "an experiment stopped by --max-time: %s", output());
    CHECK(run("%s --out %s/exp2", recipe, tmp_dir) == 0 &&
              strstr(output(), "[1/3] MHA-8: continue uptraining") &&
              !strstr(output(), "[1/3] MHA-8: convert") && strstr(output(), "experiment: done in"),
          "the experiment continued: %s", output());
    snprintf(a, sizeof(a), "%s/exp/MHA-8/uptrained/model.safetensors", tmp_dir);
    snprintf(b, sizeof(b), "%s/exp2/MHA-8/uptrained/model.safetensors", tmp_dir);
    CHECK(same_file(a, b),
          "an interrupted and continued uptraining ends with the bytes of an uninterrupted one");
    /* SIGTERM during an uptraining: the step ends, the checkpoint is saved, exit 143; a rerun
     * continues. (The wait reads the log with cat: `wc -l < LOG 2>/dev/null` has the shell
     * report a missing LOG before the redirection applies, and on a busy machine those lines
     * filled the captured output.) */
    CHECK(run("(%s --out %s/exp4 --configs MHA-8=2:4 --steps 200 --batch 16 --seq 64 & pid=$!; "
              "while kill -0 $pid 2>/dev/null && [ \"$(cat %s/exp4/MHA-8/uptrained.log.csv "
              "2>/dev/null | wc -l)\" -lt 3 ]; do sleep 0.01; "
              "done; kill -TERM $pid; wait $pid; echo \"exit $?\")",
              recipe, tmp_dir, tmp_dir) == 0 &&
              strstr(output(), "stopped by SIGTERM after step ") && strstr(output(), "exit 143") &&
              strstr(output(), "run the same command again to continue") &&
              !strstr(output(), "--resume") && !strstr(output(), "experiment: done"),
          "SIGTERM during an experiment, one hint: %s", output());
    CHECK(run("%s --out %s/exp4 --configs MHA-8=2:4 --steps 200 --batch 16 --seq 64", recipe,
              tmp_dir) == 0 &&
              strstr(output(), "MHA-8: continue uptraining") &&
              strstr(output(), "step   200/200") && strstr(output(), "experiment: done"),
          "the experiment continued after SIGTERM: %s", output());
    CHECK(run("%s --out %s/exp3 --resume", recipe, tmp_dir) == 2 &&
              strstr(output(), "run the same experiment command again"),
          "--resume is train's: %s", output());
    CHECK(run("%s --out %s/exp --lr 1e-3", recipe, tmp_dir) == 1 &&
              strstr(output(), "was started with other settings"),
          "a finished experiment with another recipe: %s", output());
    CHECK(run("%s --out %s/exp --configs MHA-8=2:2", recipe, tmp_dir) == 1 &&
              strstr(output(), "holds MHA-8 as 2 K/V layers x 4 heads, not 2 x 2"),
          "a configuration renamed: %s", output());
    CHECK(run("%s --out %s/exp3 --configs X=9:1", recipe, tmp_dir) != 0 &&
              !exists("%s/exp3/X/converted", tmp_dir),
          "an impossible configuration: %s", output());
    CHECK(run("mkdir -p %s/mine && touch %s/mine/notes.txt && %s --out %s/mine", tmp_dir, tmp_dir,
              recipe, tmp_dir) == 1 &&
              strstr(output(), "holds notes.txt but no experiment.json"),
          "a folder that is not an experiment's: %s", output());
}

/* SIGTERM during training: the current step ends, a checkpoint is saved,
 * the exit status is 128 + 15, and --resume finishes the run with the same
 * bytes as a run that was never stopped. */
static void test_graceful_stop(void) {
    char tokens[400], a[400], b[400];
    snprintf(tokens, sizeof(tokens), "%s/stop_tokens.bin", tmp_dir);
    write_tokens(tokens, 20000, 64, 8);
    const char *common =
        "--model dev/fixtures/gqa --steps 300 --batch 4 --seq 64 --grad-accum 1 --log-every 100";
    CHECK(run("%s train %s --train %s --out %s/unstopped", mlkv_bin, common, tokens, tmp_dir) == 0,
          "straight: %s", output());
    /* started in the background, stopped once its log shows two steps (or left alone if it already
     * ended) */
    CHECK(run("(%s train %s --train %s --out %s/stopped & pid=$!; while kill -0 $pid 2>/dev/null "
              "&& [ \"$(cat %s/stopped.log.csv 2>/dev/null | wc -l)\" -lt 3 ]; do sleep "
              "0.01; done; kill -TERM $pid; wait $pid; echo \"exit $?\")",
              mlkv_bin, common, tokens, tmp_dir, tmp_dir) == 0 &&
              strstr(output(), "stopped by SIGTERM after step ") && strstr(output(), "exit 143") &&
              !strstr(output(), "step   300/300"),
          "SIGTERM: %s", output());
    CHECK(run("%s train --resume %s --train %s --out %s/stopped", mlkv_bin,
              common + strlen("--model dev/fixtures/gqa "), tokens, tmp_dir) == 0 &&
              strstr(output(), "step   300/300"),
          "resume after SIGTERM: %s", output());
    snprintf(a, sizeof(a), "%s/unstopped/model.safetensors", tmp_dir);
    snprintf(b, sizeof(b), "%s/stopped/model.safetensors", tmp_dir);
    CHECK(same_file(a, b), "a stopped and resumed run ends with the bytes of an uninterrupted one");
    /* a second signal (here SIGTERM and SIGINT together) ends the run at
     * once: killed by one of the two (the kernel may deliver them in either
     * order), nothing saved. The process is stopped while both are sent, so
     * that they arrive together: sent one after the other to a running
     * process, a step could end between them on a loaded machine, and the
     * first alone would save a checkpoint. */
    CHECK(run("(%s train %s --train %s --out %s/twice --batch 32 & pid=$!; while kill -0 $pid "
              "2>/dev/null && [ \"$(cat %s/twice.log.csv 2>/dev/null | wc -l)\" -lt 3 ]; do "
              "sleep 0.01; done; kill -STOP $pid; kill -TERM $pid; kill -INT $pid; kill -CONT "
              "$pid; wait $pid; echo \"exit $?\")",
              mlkv_bin, common, tokens, tmp_dir, tmp_dir) == 0 &&
              (strstr(output(), "exit 130") || strstr(output(), "exit 143")) &&
              !strstr(output(), "stopped by") && !strstr(output(), "saved "),
          "a second signal: %s", output());
    snprintf(a, sizeof(a), "%s/twice", tmp_dir);
    struct stat st;
    CHECK(stat(a, &st) != 0, "no checkpoint after a second signal");
    CHECK(run("%s train %s --train %s --out %s/twice --steps 20", mlkv_bin, common, tokens,
              tmp_dir) == 0 &&
              strstr(output(), "step    20/20"),
          "the lock of the killed run is taken over: %s", output());
}


static void test_sample_stops(void) {
    Model m;
    char dir[300], path[400];
    snprintf(dir, sizeof(dir), "%s/eos_model", tmp_dir);
    if (model_load(&m, "dev/fixtures/eval/model") != 0) {
        CHECK(0, "eval model: %s", mlkv_error());
        return;
    }
    int C = m.config.hidden_size, V = m.config.vocab_size;
    for (int i = 0; i < C; i++) m.w.lnf_w[i] = 0.0f, m.w.lnf_b[i] = i == 0;
    for (int v = 0; v < V; v++)
        m.w.embed_out[(size_t)v * C] = v == 300 ? 20.0f : v == 256 ? 10.0f : 0.0f;
    TensorGroup params = {"", m.param_memory};
    CHECK(run("mkdir -p %s && cp dev/fixtures/eval/model/tokenizer.json %s/", dir, dir) == 0,
          "mkdir");
    snprintf(path, sizeof(path), "%s/config.json", dir);
    int ok = config_save(&m.config, NULL, 0, path) == 0;
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    ok = ok && model_write_safetensors(&m, &params, 1, path, NULL) == 0;
    model_free(&m);
    CHECK(ok, "write the model: %s", mlkv_error());
    CHECK(run("%s sample %s --prompt hi -n 5 --temperature 0", mlkv_bin, dir) == 0 &&
              starts_with(after_kernels_line(output()), "hi\n[") &&
              strstr(output(), "decode 1 x 1:"),
          "stops at <|endoftext|>, never samples id 300: [%s]", output());
    CHECK(run("%s sample %s --prompt hi -n 3 --temperature 0 --ignore-eos", mlkv_bin, dir) == 0 &&
              starts_with(after_kernels_line(output()),
                          "hi<|endoftext|><|endoftext|><|endoftext|>\n["),
          "--ignore-eos: [%s]", output());
    CHECK(run("%s sample dev/fixtures/eval/model --prompt 'the "
              "cat sat on the' -n 12 --temperature 0", mlkv_bin) == 0 &&
              starts_with(after_kernels_line(output()), "the cat sat on the mat\rmat mat\n["),
          "greedy text: [%s]", output());
    CHECK(run("%s sample dev/fixtures/eval/model --prompt 'the cat sat "
              "on the' -n 12 --temperature 0 --stop at", mlkv_bin) == 0 &&
              starts_with(after_kernels_line(output()), "the cat sat on the m\n["),
          "--stop: [%s]", output());
    CHECK(run("%s sample dev/fixtures/eval/model --prompt 'the cat' --stop ''", mlkv_bin) == 2 &&
              strstr(output(), "--stop needs a non-empty string"),
          "an empty --stop is refused: %s", output());
    CHECK(run("%s sample dev/fixtures/gqa --prompt-ids 1 --stop x", mlkv_bin) == 1 &&
              strstr(output(), "--tokenizer"),
          "--stop needs a tokenizer, and the message says how to give one: %s", output());
}

static void test_sample_and_bench(void) {
    Model m;
    int seq[8] = {1, 2, 3};
    CHECK(model_load(&m, "dev/fixtures/mlkv_3x2") == 0, "load");
    greedy_by_forward(&m, seq, 3, 8);
    model_free(&m);
    char want[64];
    snprintf(want, sizeof(want), "%d %d %d %d %d", seq[3], seq[4], seq[5], seq[6], seq[7]);
    CHECK(run("%s sample dev/fixtures/mlkv_3x2 --prompt-ids 1,2,3 -n 5 --temperature 0 2>/dev/null",
              mlkv_bin) == 0 &&
              !strncmp(output(), want, strlen(want)),
          "greedy sample %s, expected %s", output(), want);
    CHECK(run("%s sample dev/fixtures/mlkv_3x2 --prompt-ids '1 2 3' -n 5 --top-k 1 2>/dev/null",
              mlkv_bin) == 0 &&
              !strncmp(output(), want, strlen(want)),
          "top-k 1 is greedy: %s", output());
    CHECK(run("%s sample dev/fixtures/mlkv_2x2_compat "
              "--prompt-ids 5 -n 6 --batch 3 --top-p 0.9 --seed 3", mlkv_bin) == 0 &&
              strstr(output(), "--- sample 2") && strstr(output(), "decode 3 x 6") &&
              strstr(output(), "shared keys un-rotated, as the reference code computes"),
          "batch sampling: %s", output());
    CHECK(run("%s sample dev/fixtures/gqa --prompt-ids 1 -n 100", mlkv_bin) == 1 &&
          strstr(output(), "exceed max_position_embeddings (64)"), "too long: %s", output());
    CHECK(run("%s sample dev/fixtures/gqa --prompt-ids 1,64", mlkv_bin) == 1 &&
              strstr(output(), "64 is not a token id"),
          "bad prompt id: %s", output());
    CHECK(run("%s sample dev/fixtures/gqa --prompt hi", mlkv_bin) == 1 &&
              strstr(output(), "tokenizer.json"),
          "no tokenizer: %s", output());
    /* a model with a tokenizer: the prompt is encoded, the output streamed as text */
    char path[400];
    snprintf(path, sizeof(path), "%s/bytes_config.json", tmp_dir);
    write_text(path, "{\"model_type\": \"gpt_neox\", \"vocab_size\": 320, \"hidden_size\": 32, "
                     "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"intermediate_size\": "
                     "64, \"max_position_embeddings\": 64}");
    CHECK(run("%s init --config %s --out %s/bytes_model && cp "
              "dev/fixtures/tokenizer/bytes-tokenizer.json %s/bytes_model/tokenizer.json",
              mlkv_bin, path, tmp_dir, tmp_dir) == 0,
          "init: %s", output());
    CHECK(run("%s sample %s/bytes_model --prompt 'Hello there' -n 8 --seed 1", mlkv_bin, tmp_dir) ==
                  0 &&
              starts_with(after_kernels_line(output()), "Hello there") &&
              strstr(output(), "prefill 1 x 11 tokens"),
          "text sample: %s", output());
    CHECK(run("%s sample %s/bytes_model --prompt 'Hello there' -n 4 --batch 2 2>/dev/null",
              mlkv_bin, tmp_dir) == 0 &&
              starts_with(output(), "--- sample 0\nHello there") &&
              strstr(output(), "\n--- sample 1\nHello there"),
          "each sample of a batch begins with the prompt: %s", output());
    CHECK(run("%s sample --help", mlkv_bin) == 0 && strstr(output(), "--top-p"), "sample --help");

    /* bench-kv: measured cache bytes are the formula's; the memory limit stops cleanly */
    snprintf(path, sizeof(path), "%s/bench.csv", tmp_dir);
    CHECK(run("%s bench-kv dev/fixtures/mlkv_3x2 --prefill 6 --decode 3 --max-batch 4 --repeat 4 "
              "--csv %s", mlkv_bin, path) == 0 &&
              strstr(output(), "| decode tok/s (median) | decode tok/s (range) |"),
          "bench-kv: %s", output());
    size_t len;
    char *csv = slurp(path, &len);
    int rows = 0, same = 1, ordered = 1;
    for (char *line = csv ? strtok(csv, "\n") : NULL; line; line = strtok(NULL, "\n")) {
        long long bytes, formula;
        int batch, threads, repeats;
        double resident, prefill, median, low, high;
        if (sscanf(line, "MLKV-6,3,2,%d,6,3,%lld,%lld,%lf,%lf,%lf,%d,%lf,%lf,%d", &batch, &bytes,
                   &formula, &resident, &prefill, &median, &threads, &low, &high,
                   &repeats) == 10) {
            rows++;
            same &= bytes == formula && bytes == 2LL * 3 * 2 * 8 * 4 * batch * 9;
            ordered &= repeats == 4 && low <= median && median <= high && low > 0;
        }
    }
    free(csv);
    CHECK(rows == 3 && same, "bench-kv CSV: %d rows, cache bytes as the formula: %d", rows, same);
    CHECK(ordered, "bench-kv CSV: the median of 4 runs within their range");
    CHECK(run("%s bench-kv dev/fixtures/mlkv_3x2 --prefill 6 --decode 3 --mem-limit 0.1 --csv %s",
              mlkv_bin, path) == 0 &&
              strstr(output(), "stop: would need"),
          "memory limit: %s", output());
    snprintf(path, sizeof(path), "%s/grid_config.json", tmp_dir);
    write_text(path,
               "{\"model_type\": \"gpt_neox\", \"vocab_size\": 16, \"hidden_size\": 48, "
               "\"num_hidden_layers\": 12, \"num_attention_heads\": 12, \"intermediate_size\": 32, "
               "\"max_position_embeddings\": 16, \"rotary_pct\": 0.5}");
    char csv_path[400];
    snprintf(csv_path, sizeof(csv_path), "%s/grid.csv", tmp_dir);
    CHECK(run("%s bench-kv --config %s --grid --prefill 4 --decode 2 --max-batch 1 --csv %s",
              mlkv_bin, path, csv_path) == 0 &&
              strstr(output(), "| MLKV-1 | 1 |") && strstr(output(), "| MHA-144 | 1 | 0.03 |"),
          "grid: %s", output());
    CHECK(run("%s bench-kv --theory", mlkv_bin) == 0 &&
              strstr(output(), "| 160m | MLKV-2 | 2 x 1 | 512 | 1024 |") &&
              strstr(output(), "| 160m | MHA-144 | 12 x 12 | 36864 |") &&
              strstr(output(), "| 14m | MQA-6 | 6 x 1 |"),
          "theory: %s", output());
    /* another shape: the grid adapted and honestly named, exact --only, defaults that fit, the CSV
     * in the current folder, named after the config file */
    write_text(path, "{\"model_type\": \"gpt_neox\", \"vocab_size\": 16, \"hidden_size\": 32, "
                     "\"num_hidden_layers\": 6, \"num_attention_heads\": 4, \"intermediate_size\": "
                     "32, \"max_position_embeddings\": 32}");
    CHECK(run("mkdir -p %s/here && cd %s/here && %s bench-kv --config %s --grid --max-batch 2",
              tmp_dir, tmp_dir, mlkv_bin, path) == 0 &&
              strstr(output(), "prefill 24, decode 8,") && strstr(output(), "| MHA-24 | 1 |") &&
              strstr(output(), "| MLKV-16 | 2 |") && strstr(output(), "| MQA-6 | 1 |") &&
              strstr(output(), "| MLKV-1 | 2 |") && !strstr(output(), "skipped") &&
              exists("%s/here/grid_config.bench-kv.csv", tmp_dir) &&
              !exists("%s/grid_config.json.bench-kv.csv", tmp_dir),
          "an adapted grid: %s", output());
    CHECK(run("cd %s/here && %s bench-kv --config %s --grid --only MLKV-1,MQA-6 --max-batch 1",
              tmp_dir, mlkv_bin, path) == 0 &&
              strstr(output(), "| MLKV-1 | 1 |") && strstr(output(), "| MQA-6 | 1 |") &&
              !strstr(output(), "| MLKV-16 |"),
          "--only by exact names: %s", output());
    CHECK(run("cd %s/here && %s bench-kv --config %s --grid --only MLKV-12", tmp_dir, mlkv_bin,
              path) == 1 &&
              strstr(output(), "--only: no configuration MLKV-12 here (MHA-24, MLKV-16, MQA-6, "
                               "MLKV-8, MLKV-4, MLKV-2, MLKV-1)"),
          "an unknown --only: %s", output());
    CHECK(run("cd %s/here && %s bench-kv --config %s --grid --only MLKV-1 --max-batch 64 "
              "--time-limit 0", tmp_dir, mlkv_bin, path) == 0 &&
              strstr(output(), "| MLKV-1 | 2 | stop: --time-limit 0 s reached |"),
          "a time budget: %s", output());
}

/* Every instruction set the fast kernels hold, each against PyTorch (every
 * model fixture) and the naive references (GEMM, attention, cached
 * decoding): a plain x86-64 build holds AVX-512, AVX2+FMA and the baseline
 * and runs each this CPU has; a build for one CPU holds its own alone and
 * refuses the others by name. Then the best again, as mlkv runs. */
static void test_kernel_sets(FixtureErrors *worst) {
    const char *sets[] = {"avx512", "avx2", "portable"};
    int ran = 0, dispatching = strstr(kernels_name(), "chosen at run time") != NULL;
    for (int i = 0; i < 3; i++) {
        if (kernels_select(sets[i]) != 0) {
            CHECK(strstr(mlkv_error(), dispatching ? "this CPU has no" : "this build runs"),
                  "kernels_select(%s): %s", sets[i], mlkv_error());
            printf("kernels %s: not run here (%s)\n", sets[i], mlkv_error());
            continue;
        }
        CHECK(strstr(kernels_name(), i == 0 ? "AVX-512" : i == 1 ? "AVX2" : "portable"),
              "kernels_select(%s) runs %s", sets[i], kernels_name());
        printf("kernels %s:\n", kernels_name());
        for (size_t f = 0; f < n_fixtures; f++)
            test_fixture(fixture_names[f], fixture_names[f], worst);
        test_gemm();
        test_gemm_rows_and_kernels();
        test_attention();
        test_cached_decoding();
        ran++;
    }
    CHECK(ran >= 1 && (!dispatching || ran >= 2), "kernel sets run: %d", ran);
    CHECK(kernels_select("sse9") != 0 && strstr(mlkv_error(), "unknown instruction set 'sse9'"),
          "an unknown set: %s", mlkv_error());
    CHECK(kernels_select("auto") == 0, "auto: %s", mlkv_error());
    /* mlkv's own choice, said on its first line, and MLKV_KERNELS */
    CHECK(run("%s sample dev/fixtures/gqa --prompt-ids 1 -n 2 --threads 1", mlkv_bin) == 0 &&
              strstr(output(), kernels_name()) && *after_kernels_line(output()),
          "the kernels line names %s: %s", kernels_name(), output());
    CHECK(run("MLKV_KERNELS=portable %s sample dev/fixtures/gqa --prompt-ids 1 -n 2", mlkv_bin) ==
                  0 &&
              (dispatching ? strstr(output(), "mlkv: portable (baseline x86-64, chosen at run "
                                              "time) kernels, ") != NULL
                           : strstr(output(), "this build runs") != NULL ||
                                 strstr(kernels_name(), "portable") != NULL),
          "MLKV_KERNELS=portable: %s", output());
    CHECK(run("MLKV_KERNELS=sse9 %s sample dev/fixtures/gqa --prompt-ids 1 -n 2", mlkv_bin) == 0 &&
              strstr(output(), "warning: MLKV_KERNELS: unknown instruction set 'sse9'") &&
              strstr(output(), kernels_name()),
          "MLKV_KERNELS=sse9: %s", output());
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s path/to/mlkv   (run from the repository root)\n", argv[0]);
        return 2;
    }
    static char bin_path[PATH_MAX]; /* absolute: some tests run in folders of their own */
    mlkv_bin = realpath(argv[1], bin_path) ? bin_path : argv[1];
    flush_subnormals(); /* the arithmetic mlkv itself computes with */
    snprintf(tmp_dir, sizeof(tmp_dir), "/tmp/mlkv_test_XXXXXX");
    if (!mkdtemp(tmp_dir)) { perror("mkdtemp"); return 2; }
    printf("PyTorch fixtures (error = max|ours - ref| / max|ref|):\n");
    FixtureErrors worst = {0};
    find_fixtures();
    CHECK(n_fixtures > 0,
          "no model fixtures (dev/fixtures/*/ref.safetensors): run from the repository root");
    test_kernel_sets(&worst);
    /* pytorch_model.bin as torch.save writes it, the same weights and functions:
     * the reference's MLKV checkpoint (config without mlkv_shared_key_rotary),
     * in one file and in two shards, and the stock MHA layout */
    test_fixture("reference_bin/f32", "mlkv_2x2_compat", &worst);
    test_fixture("reference_bin/sharded", "mlkv_2x2_compat", &worst);
    test_fixture("reference_bin/mha_hf", "mha", &worst);
    printf("  worst: logits %.1e, loss %.1e, grads %.1e, steps %.1e, params %.1e\n", worst.logits,
           worst.loss, worst.grad, worst.step_loss, worst.param);
    test_finite_differences();
    test_sample_and_bench();
    test_sample_stops();
    test_folder_rules();
    test_train_plan();
    test_messages();
    test_graceful_stop();
    test_freeze_embeds();
    test_experiment();
    test_owner_placement();
    test_mlkv_layers();
    test_readers_add_into_owner();
    test_schedule();
    test_json();
    test_half_precision();
    test_flush_subnormals();
    test_sampling();
    test_init();
    test_convert_sizes();
    test_convert();
    test_torch_checkpoints();
    test_transformers4_checkpoints();
    test_eval_tasks();
    test_eval_model_kinds();
    test_tokenizer();
    test_resume();
    test_errors();
    if (failed == 0) run("rm -rf %s", tmp_dir);
    else printf("test files kept in %s\n", tmp_dir);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
