/*
 * dev/linear.h - the products of Pythia-160M's Linear layers that make bench
 * (dev/bench.c, its GEMM table) and dev/ab.sh GEMM (dev/ab.c) time, shared so
 * that both measure the same calls. A Linear layer is out[N, OC] =
 * inp[N, IC] W[OC, IC]^T; its backward pass makes two more products.
 */
#include <stdlib.h>

typedef struct { const char *name; int OC, IC, N; } LinearShape;

/* Pythia-160M's Linear layers at `rows` = B*T rows (the LM head in one chunk
 * of 512 rows, as training computes it); the MLKV-2 conversion's wider MLP
 * too. Returns their count (at most LINEAR_SHAPES). */
#define LINEAR_SHAPES 7
static int linear_shapes(int rows, LinearShape *out) {
    const LinearShape shapes[LINEAR_SHAPES] = {
        {"QKV (each of q, k, v)", 768, 768, rows}, {"attention output", 768, 768, rows},
        {"MLP in", 3072, 768, rows},               {"MLP out", 768, 3072, rows},
        {"MLP in, MLKV-2", 3830, 768, rows},       {"MLP out, MLKV-2", 768, 3830, rows},
        {"LM head, one chunk of 512 rows", 50304, 768, 512},
    };
    for (int i = 0; i < LINEAR_SHAPES; i++) out[i] = shapes[i];
    return LINEAR_SHAPES;
}

static const char *const linear_products[3] = {"forward", "input gradient", "weight gradient"};

/* The operands of one shape: x [N, IC], w [OC, IC], y [N, OC] (the output,
 * or dout), dx [N, IC] and dw [OC, IC], filled with small repeating values. */
typedef struct { float *x, *w, *y, *dx, *dw; } LinearOperands;

static void linear_free(LinearOperands *o) {
    free(o->x);
    free(o->w);
    free(o->y);
    free(o->dx);
    free(o->dw);
}

/* 0, or -1 when out of memory (nothing is left allocated) */
static int linear_operands(LinearShape s, LinearOperands *o) {
    size_t nx = (size_t)s.N * s.IC, nw = (size_t)s.OC * s.IC, ny = (size_t)s.N * s.OC;
    o->x = malloc(sizeof(float) * nx);
    o->w = malloc(sizeof(float) * nw);
    o->y = malloc(sizeof(float) * ny);
    o->dx = calloc(nx, sizeof(float));
    o->dw = calloc(nw, sizeof(float));
    if (!o->x || !o->w || !o->y || !o->dx || !o->dw) {
        linear_free(o);
        return -1;
    }
    for (size_t i = 0; i < nx; i++) o->x[i] = (float)(i % 13) * 0.01f;
    for (size_t i = 0; i < nw; i++) o->w[i] = (float)(i % 7) * 0.01f;
    for (size_t i = 0; i < ny; i++) o->y[i] = (float)(i % 5) * 0.01f;
    return 0;
}

typedef void (*GemmFunction)(int, int, int, const float *, size_t, size_t, const float *, size_t,
                             size_t, float *, int, const float *);

/* Product `kind` of the layer, by gemm(): 0 the forward pass y = x W^T,
 * 1 the input gradient dx += y W, 2 the weight gradient dW += y^T x. */
static void linear_product(GemmFunction gemm_function, int kind, LinearShape s,
                           LinearOperands *o) {
    int N = s.N, OC = s.OC, IC = s.IC;
    if (kind == 0) gemm_function(N, OC, IC, o->x, IC, 1, o->w, 1, IC, o->y, 0, NULL);
    else if (kind == 1) gemm_function(N, IC, OC, o->y, OC, 1, o->w, IC, 1, o->dx, 1, NULL);
    else gemm_function(OC, IC, N, o->y, 1, OC, o->x, IC, 1, o->dw, 1, NULL);
}
