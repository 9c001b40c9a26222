/*
 * mlkv.c - Multi-Layer Key-Value sharing (MLKV) on GPT-NeoX (Pythia), trained
 * on the CPU in plain C.
 *
 * MLKV in one paragraph: in standard attention every layer projects its own
 * keys and values (MHA). GQA lets groups of query heads share one K/V head;
 * MQA is one K/V head per layer. MLKV goes further and shares K/V *across
 * layers*: only num_key_value_layers layers (the owners) project K and V, and
 * every other layer attends over the K/V of the nearest owner below it. The
 * KV cache at inference then holds 2 * kvL * kvH * head_size numbers per token
 * instead of 2 * L * H * head_size. In the backward pass the gradients of all
 * the layers that read an owner's K/V flow back into that owner's projections.
 *
 * MLKV is Zuhri et al., "MLKV: Multi-Layer Key-Value Heads for Memory
 * Efficient Transformer Decoding", Findings of NAACL 2025 (arXiv:2406.09297);
 * its code for Pythia, which this file follows where it says "the reference",
 * is github.com/zaydzuhri/pythia-mlkv.
 *
 * Where each MLKV mechanism lives:
 *   - which layers own K/V, and whose K/V each layer reads:
 *     kv_owner_layers and config_finalize (kv_layer_of[l], kv_slot_of[l]), 2
 *   - a non-owner has no K/V parameters: build_param_table, 3
 *   - query heads sharing a K/V head (GQA / MQA): attention_forward, 4
 *   - a layer reading its owner's K/V: layer_acts and forward_layers, 5
 *   - readers' K/V gradients summed into the owner: model_forward_backward, 5
 *   - a KV cache of the owners only: kv_cache_specs, model_cached_forward, 6
 *   - an MHA Pythia turned into GQA / MQA / MLKV: pool_kv_layers, 8
 *
 * Part I, the model (read it top to bottom):
 *   1. utilities: errors, memory, files, random numbers
 *   2. the model configuration and the MLKV owning-layer placement
 *   3. the parameter table
 *   4. kernels: the GEMM (fp32, and bf16 inputs on AMX tiles), then
 *      *_forward / *_backward pairs: matmul, layernorm, gelu, rotary, MLKV
 *      attention, cross-entropy; and their naive references
 *   5. the model: forward and backward
 *   6. generation: prefill and decoding with a KV cache of the owning layers
 *   7. AdamW, gradient clipping, the learning-rate schedule
 *   8. the converter: MHA Pythia to GQA / MQA / MLKV
 * Part II, the machinery (a reader learning MLKV can skip it):
 *   9. the training loop
 *  10. evaluation: loss of a token file, zero-shot tasks
 *  11. config.json
 *  12. safetensors, PyTorch checkpoints and mlkv's checkpoints
 *  13. token files and the data loader
 *  14. JSON
 *  15. the tokenizer (tokenizer.json): decoding, and encoding of ASCII text
 *  16. the built-in demo corpus
 *  17. the command line
 */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE /* syscall(), for the AMX permission request */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h> /* the graceful stop's signal flag */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h> /* the free space an experiment checks before it starts */
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>       /* the AMX tile kernel of train --precision bf16 */
#include <immintrin.h>
#include <sys/syscall.h>
#endif
#ifdef _OPENMP
#include <omp.h>
/* Loops marked PARALLEL_FOR split their iterations across threads; without
 * OpenMP they run serially and compute the same bits. */
#define PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
/* A parallel region whose loops marked OMP_FOR share out their iterations */
#define PARALLEL_REGION _Pragma("omp parallel")
#define OMP_FOR _Pragma("omp for schedule(static)")
/* the GEMM's tiles, each handed to whichever thread is free: on a shared
 * machine one core can run slower for a while, and with a fixed split the
 * others waited for it at the barrier (perf: 5% of a step in libgomp) */
#define OMP_PRAGMA(x) _Pragma(#x)
#define OMP_FOR_2(chunk) OMP_PRAGMA(omp for collapse(2) schedule(dynamic, chunk))
/* iterations dealt out to the threads in turn, for work that grows along the loop */
#define PARALLEL_FOR_CYCLIC _Pragma("omp parallel for schedule(static, 1)")
#else
#define PARALLEL_FOR
#define PARALLEL_REGION
#define OMP_FOR
#define OMP_FOR_2(chunk)
#define PARALLEL_FOR_CYCLIC
#endif

#include "mlkv.h"

#define PI 3.14159265358979323846
#define INV_SQRT2 0.70710678118654752440    /* 1 / sqrt(2) */
#define INV_SQRT_2PI 0.39894228040143267794 /* 1 / sqrt(2 pi) */

/* ===========================================================================
 * 1. Utilities: errors, memory, files, random numbers. Library functions
 *    record what went wrong with fail() (the file and the problem) and return
 *    -1; only the command line (section 17) prints the message and turns it
 *    into an exit code.
 * ======================================================================== */

static char error_message[2048];

const char *mlkv_error(void) { return error_message; }

/* Records a message for mlkv_error() and returns -1, so `return fail(...)`. */
static int fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_message, sizeof(error_message), fmt, ap);
    va_end(ap);
    return -1;
}

/* Puts "where: " before the recorded error message; returns -1. */
static int fail_in(const char *where) {
    size_t n = strlen(where) + 2, len = strlen(error_message);
    if (n >= sizeof(error_message)) return -1;
    if (len > sizeof(error_message) - 1 - n) len = sizeof(error_message) - 1 - n;
    memmove(error_message + n, error_message, len);
    error_message[n + len] = '\0';
    memcpy(error_message, where, n - 2);
    memcpy(error_message + n - 2, ": ", 2);
    return -1;
}

/* s with every byte outside printable ASCII written as \xNN, for messages
 * that quote names from a file (a name must not drive the terminal). The
 * result lives in one of 4 static buffers, so a message may quote 4 names. */
static const char *printable(const char *s) {
    static char buffers[4][256];
    static int next;
    char *out = buffers[next++ % 4];
    size_t n = 0;
    for (; *s && n + 5 < sizeof(buffers[0]); s++) {
        unsigned char c = (unsigned char)*s;
        n += (size_t)(c >= 0x20 && c < 0x7f ? snprintf(out + n, 2, "%c", c)
                                            : snprintf(out + n, 5, "\\x%02x", c));
    }
    if (*s) snprintf(out + n, sizeof(buffers[0]) - n, "...");
    else out[n] = '\0';
    return out;
}

/* A command's exit code from a 0 / -1 result, printing the error of a failure. */
static int exit_code(int rc) {
    if (rc != 0) fprintf(stderr, "mlkv: error: %s\n", mlkv_error());
    return rc == 0 ? 0 : 1;
}

static void *alloc_zeroed(size_t count, size_t size, const char *what) {
    void *p = count ? calloc(count, size) : NULL;
    if (count && !p) fail("out of memory: %.1f MiB for %s", (double)count * size / 1048576.0, what);
    return p;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Room for element `count` of a growing array of `size`-byte elements whose
 * allocation holds *cap of them: doubled when full. Returns the array (maybe
 * moved), or NULL when memory runs out (the old one is then still valid). */
static void *grow(void *items, int count, int *cap, size_t size) {
    if (count < *cap) return items;
    int n = *cap == 0 ? 16 : *cap <= INT_MAX / 2 ? 2 * *cap : 0; /* 0: no larger int count */
    void *p = n > *cap ? realloc(items, (size_t)n * size) : NULL;
    if (p) *cap = n;
    return p;
}

/* A whole decimal number in 0..max (text from a file), or -1 */
static int parse_count(const char *text, long long max, long long *out) {
    char *end;
    errno = 0;
    long long v = text ? strtoll(text, &end, 10) : -1;
    if (!text || end == text || *end || errno || v < 0 || v > max) return -1;
    *out = v;
    return 0;
}

/* qsort order of an array of strings */
static int string_order(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* "dir/" and "dir" name one folder: trailing slashes dropped ("/" kept) */
static void trim_slashes(char *path) {
    for (size_t n = strlen(path); n > 1 && path[n - 1] == '/';) path[--n] = '\0';
}

/* "s" after a count that is not 1: "1 head", "2 heads" */
static const char *plural(long n) { return n == 1 ? "" : "s"; }

/* bytes as B, KiB, MiB or GiB, whichever reads best */
static const char *format_bytes(char *out, size_t n, double bytes) {
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    for (; bytes >= 1024 && u < 4; u++) bytes /= 1024;
    snprintf(out, n, u ? "%.2f %s" : "%.0f %s", bytes, units[u]);
    return out;
}

/* Opens a file to read, which must be a regular file (its size is known and
 * it can be read twice; a folder, pipe or device is refused by name). */
static FILE *open_regular(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    struct stat st;
    if (!f) {
        fail("%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fail("%s: %s", path,
             S_ISDIR(st.st_mode) ? "is a folder, not a file"
                                 : "is not a regular file (a pipe or device?)");
        fclose(f);
        return NULL;
    }
    *size = (size_t)st.st_size;
    return f;
}

/* Reads a whole file, NUL-terminated. */
static int read_file(const char *path, char **data, size_t *len) {
    size_t size;
    FILE *f = open_regular(path, &size);
    if (!f) return -1;
    char *buf = size < SIZE_MAX ? malloc(size + 1) : NULL;
    if (!buf) {
        fclose(f);
        return fail("%s: out of memory reading %zu bytes", path, size);
    }
    if (fread(buf, 1, size, f) != size) {
        free(buf);
        fclose(f);
        return fail("%s: read error", path);
    }
    fclose(f);
    buf[size] = '\0';
    *data = buf;
    *len = size;
    return 0;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

#define PATH_LEN 4096
#define MAX_HEAD_SIZE 256 /* attention tiles of a head fit on the stack of a thread */

/* out = base + suffix ("/config.json", ".saving"); a path that does not fit
 * is an error, never a silently truncated name. out holds PATH_LEN bytes. */
static int make_path(char *out, const char *base, const char *suffix) {
    int n = snprintf(out, PATH_LEN, "%s%s", base, suffix);
    if (n < 0 || n >= PATH_LEN) return fail("path too long: %s%s", base, suffix);
    return 0;
}

/* The name a model goes by, from the path of its folder or config file, for
 * the default names of what a command writes about it: the folder's name;
 * for a hub snapshot in the HF cache (.../models--ORG--NAME/snapshots/HASH)
 * NAME; for a config file its folder's name when it is config.json, else its
 * own name less ".json". */
static void model_name_of(char *name, size_t room, const char *path) {
    char full[PATH_MAX], *part[3] = {NULL, NULL, NULL}; /* the last three parts of the path */
    if (!realpath(path, full)) snprintf(full, sizeof(full), "%s", path);
    trim_slashes(full);
    size_t n = strlen(full);
    if (n >= 12 && !strcmp(full + n - 12, "/config.json")) full[n - 12] = '\0';
    else if (n > 5 && !strcmp(full + n - 5, ".json")) full[n - 5] = '\0';
    for (int i = 0; i < 3; i++) {
        char *slash = strrchr(full, '/');
        part[i] = slash ? slash + 1 : full;
        if (!slash) break;
        *slash = '\0';
    }
    const char *chosen = part[0];
    if (part[1] && part[2] && !strcmp(part[1], "snapshots") && !strncmp(part[2], "models--", 8)) {
        const char *org_end = strstr(part[2] + 8, "--"); /* models--EleutherAI--pythia-160m */
        chosen = org_end ? org_end + 2 : part[2] + 8;
    }
    snprintf(name, room, "%s", *chosen ? chosen : "model");
}

/* A growing string for writing JSON. Allocation failure ends the process:
 * these strings are a few kilobytes. */
typedef struct { char *s; size_t len, cap; } StrBuf;

static void sb_printf(StrBuf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->len;
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? room : 0, fmt, ap);
        va_end(ap);
        if (n < 0) return;
        if (b->s && (size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->len + (size_t)n + 1) cap *= 2;
        char *s = realloc(b->s, cap);
        if (!s) {
            fprintf(stderr, "mlkv: out of memory\n");
            exit(1);
        }
        b->s = s;
        b->cap = cap;
    }
}

/* Checked writes: a full disk or an I/O error is reported with the file name. */
typedef struct { FILE *f; const char *path; int failed; } Writer;

static int writer_open(Writer *w, const char *path) {
    w->path = path;
    w->failed = 0;
    w->f = fopen(path, "wb");
    if (!w->f) return fail("%s: cannot create: %s", path, strerror(errno));
    return 0;
}

static void writer_put(Writer *w, const void *data, size_t n) {
    if (!w->failed && fwrite(data, 1, n, w->f) != n) w->failed = errno ? errno : EIO;
}

/* Flushes to the disk; the file is complete only if this returns 0. */
static int writer_close(Writer *w) {
    if (!w->failed && fflush(w->f) != 0) w->failed = errno ? errno : EIO;
    if (!w->failed && fsync(fileno(w->f)) != 0 && errno != EINVAL) w->failed = errno;
    if (fclose(w->f) != 0 && !w->failed) w->failed = errno ? errno : EIO;
    if (w->failed) return fail("%s: write failed: %s", w->path, strerror(w->failed));
    return 0;
}

static int write_text_file(const char *path, const char *text) {
    Writer w;
    if (writer_open(&w, path) != 0) return -1;
    writer_put(&w, text, strlen(text));
    return writer_close(&w);
}

/* Random numbers: splitmix64, then Box-Muller for normals. One 64-bit state
 * reproduces every stream from the seed. */
static uint64_t rng_next(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_uniform(uint64_t *state) { /* [0, 1) with 53 bits */
    return (rng_next(state) >> 11) * (1.0 / 9007199254740992.0);
}

static double rng_normal(uint64_t *state) {
    double u1 = rng_uniform(state), u2 = rng_uniform(state);
    return sqrt(-2.0 * log(1.0 - u1)) * cos(2.0 * PI * u2);
}

/* ===========================================================================
 * 2. Configuration and the MLKV owning-layer placement. A Config holds
 *    GPT-NeoX's hyperparameters (HF's names in config.json) and MLKV's two:
 *    num_key_value_heads kvH (the K/V heads of an owning layer; H / kvH query
 *    heads share each, as in GQA) and num_key_value_layers kvL (how many
 *    layers own K/V). config_finalize derives, for every layer l,
 *    kv_layer_of[l], the owner whose K/V layer l attends over, and
 *    kv_slot_of[l], that owner's number 0 .. kvL-1 among the owners: where
 *    its K/V live in the activations and in the KV cache. The owners are
 *    placed as the reference code places them (kv_owner_layers): layer 0,
 *    then every L / kvL layers, rounded down, and every other layer reads
 *    the nearest owner below it. For L = 12, kvL = 4 the owners are 0, 3, 6
 *    and 9; layers 1 and 2 read layer 0's K/V, layers 4 and 5 layer 3's. A
 *    config may instead give the map (mlkv_kv_layer_map, mlkv's own key), as
 *    long as each layer reads an owner at or below it.
 * ======================================================================== */

void kv_owner_layers(int n_layer, int n_kv_layer, int *owners) {
    /* Python: [0] + [int((i+1) * (L / kvL)) for i in range(kvL-1)], float division
     * then truncation; doubles give the same values as Python floats. */
    owners[0] = 0;
    for (int i = 0; i < n_kv_layer - 1; i++)
        owners[i + 1] = (int)((i + 1) * ((double)n_layer / (double)n_kv_layer));
}

/* Bounds on every size, far above any real model (Pythia-12B: width 5120,
 * 40 heads), that keep the index arithmetic in range: offsets into tensors
 * and activations are computed in size_t, and what stays in int (a row of
 * B*T, a head, a task of B * heads * query blocks) fits it whenever a width
 * is at most MLKV_MAX_WIDTH, heads at most MLKV_MAX_HEADS and B*T at most
 * MLKV_MAX_TOKENS (model_prepare). */
#define MLKV_MAX_WIDTH (1 << 20)
#define MLKV_MAX_HEADS 4096
#define MLKV_MAX_TOKENS (1 << 24)

static int check_size(const char *what, const char *name, int value, int max) {
    if (value < 1 || value > max) return fail("%s: %s %d must be in 1..%d", what, name, value, max);
    return 0;
}

/* Checks c's sizes (`what` names the config in messages) and derives what
 * the model needs from them: head_size, rotary_ndims, and each layer's owner
 * (kv_layer_of) and owner's slot (kv_slot_of). 0, or -1 with the reason. */
int config_finalize(Config *c, const char *what) {
    if (check_size(what, "vocab_size", c->vocab_size, 1 << 24) ||
        check_size(what, "hidden_size", c->hidden_size, MLKV_MAX_WIDTH) ||
        check_size(what, "num_hidden_layers", c->n_layer, MLKV_MAX_LAYERS) ||
        check_size(what, "num_attention_heads", c->n_head, MLKV_MAX_HEADS) ||
        check_size(what, "intermediate_size", c->intermediate_size, MLKV_MAX_WIDTH) ||
        check_size(what, "max_position_embeddings", c->max_position_embeddings, MLKV_MAX_TOKENS))
        return -1;
    if (c->hidden_size % c->n_head != 0)
        return fail("%s: hidden_size %d is not divisible by num_attention_heads %d", what,
                    c->hidden_size, c->n_head);
    if (c->has_kv_map) { /* an explicit map: each layer reads an owner at or below it */
        int owners = 0;
        for (int l = 0; l < c->n_layer; l++) {
            int p = c->kv_layer_of[l];
            if (p < 0 || p > l)
                return fail("%s: mlkv_kv_layer_map[%d] = %d must be in 0..%d", what, l, p, l);
            if (c->kv_layer_of[p] != p)
                return fail(
                    "%s: mlkv_kv_layer_map[%d] = %d, but layer %d does not own K/V (it reads %d)",
                    what, l, p, p, c->kv_layer_of[p]);
            owners += p == l;
        }
        if (c->n_kv_layer != 0 && c->n_kv_layer != owners)
            return fail(
                "%s: num_key_value_layers %d disagrees with mlkv_kv_layer_map (%d owning layers)",
                what, c->n_kv_layer, owners);
        c->n_kv_layer = owners;
    }
    if (c->hidden_size / c->n_head > MAX_HEAD_SIZE)
        return fail("%s: head size %d exceeds %d", what, c->hidden_size / c->n_head, MAX_HEAD_SIZE);
    if (c->use_kv_mlp && check_size(what, "kv_intermediate_size (use_key_value_mlp)",
                                    c->kv_intermediate_size, MLKV_MAX_WIDTH))
        return -1;
    if (c->n_kv_head < 1 || c->n_kv_head > c->n_head)
        return fail("%s: num_key_value_heads %d must be in 1..num_attention_heads (%d)", what,
                    c->n_kv_head, c->n_head);
    if (c->n_head % c->n_kv_head != 0)
        return fail("%s: num_attention_heads %d is not divisible by num_key_value_heads %d", what,
                    c->n_head, c->n_kv_head);
    if (c->n_kv_layer < 1 || c->n_kv_layer > c->n_layer)
        return fail("%s: num_key_value_layers %d must be in 1..num_hidden_layers (%d)", what,
                    c->n_kv_layer, c->n_layer);
    if (!(c->layer_norm_eps > 0)) return fail("%s: layer_norm_eps must be positive", what);
    if (!(c->rotary_pct >= 0 && c->rotary_pct <= 1))
        return fail("%s: rotary_pct %g must be in [0, 1]", what, c->rotary_pct);
    if (!(c->rotary_base > 0)) return fail("%s: rotary_emb_base must be positive", what);
    c->head_size = c->hidden_size / c->n_head;
    c->rotary_ndims = (int)(c->head_size * c->rotary_pct);
    if (c->rotary_ndims % 2 != 0)
        return fail("%s: rotary dims int(head_size * rotary_pct) = %d must be even", what,
                    c->rotary_ndims);
    if (!c->has_kv_map) { /* the reference's placement: each layer reads the nearest owner below */
        int owners[MLKV_MAX_LAYERS];
        kv_owner_layers(c->n_layer, c->n_kv_layer, owners);
        for (int l = 0, k = 0; l < c->n_layer; l++) {
            if (k + 1 < c->n_kv_layer && owners[k + 1] == l) k++;
            c->kv_layer_of[l] = owners[k];
        }
    }
    for (int l = 0, slot = -1; l < c->n_layer; l++) { /* owners are numbered 0..kvL-1 bottom up */
        if (c->kv_layer_of[l] == l) slot++;
        c->kv_slot_of[l] = c->kv_layer_of[l] == l ? slot : c->kv_slot_of[c->kv_layer_of[l]];
    }
    return 0;
}

/* Plain multi-head attention: every layer owns K/V of all heads, linearly. */
static int is_mha(const Config *c) {
    return c->n_kv_head == c->n_head && c->n_kv_layer == c->n_layer && !c->use_kv_mlp;
}

/* ===========================================================================
 * 3. The parameter table. Every tensor has an HF name, a shape, an offset in
 *    one flat buffer and the place of its pointer in Weights. The same table
 *    lays out the parameters, the gradients and the AdamW moments, and drives
 *    checkpoint I/O and weight decay.
 * ======================================================================== */

typedef struct { Model *m; size_t offset; } TableBuilder;

/* slot: the byte offset, inside Weights, of the pointer to this tensor */
static void table_add(TableBuilder *tb, size_t slot, const char *name, int rows, int cols) {
    ParamInfo *p = &tb->m->params[tb->m->n_params++];
    snprintf(p->name, sizeof(p->name), "%s", name);
    p->ndim = cols ? 2 : 1;
    p->shape[0] = rows;
    p->shape[1] = cols;
    p->numel = (size_t)rows * (size_t)(cols ? cols : 1);
    p->offset = tb->offset;
    p->slot = slot;
    /* HF Trainer decays every weight matrix (embeddings and the head too), not
     * biases and not LayerNorm parameters. */
    p->decayed = cols != 0;
    tb->offset += p->numel;
}

/* The parameter table of m's config: the embedding, each layer's tensors
 * (K/V only in owners), the final LayerNorm, the head. */
static int build_param_table(Model *m) {
    const Config *c = &m->config;
    int C = c->hidden_size, I = c->intermediate_size, V = c->vocab_size;
    int qdim = c->n_head * c->head_size, kvdim = c->n_kv_head * c->head_size,
        kvI = c->kv_intermediate_size;
    TableBuilder tb = {m, 0};
    char name[MLKV_NAME_MAX];
    m->params = alloc_zeroed((size_t)c->n_layer * 20 + 8, sizeof(ParamInfo), "the parameter table");
    if (!m->params) return -1;
    m->n_params = 0;
    table_add(&tb, offsetof(Weights, embed_in), "gpt_neox.embed_in.weight", V, C);
    for (int l = 0; l < c->n_layer; l++) {
        size_t layer = offsetof(Weights, layer) + (size_t)l * sizeof(LayerWeights);
#define LAYER_PARAM(field, suffix, rows, cols) \
    snprintf(name, sizeof(name), "gpt_neox.layers.%d.%s", l, suffix); \
    table_add(&tb, layer + offsetof(LayerWeights, field), name, rows, cols)
        LAYER_PARAM(ln1_w, "input_layernorm.weight", C, 0);
        LAYER_PARAM(ln1_b, "input_layernorm.bias", C, 0);
        LAYER_PARAM(ln2_w, "post_attention_layernorm.weight", C, 0);
        LAYER_PARAM(ln2_b, "post_attention_layernorm.bias", C, 0);
        LAYER_PARAM(q_w, "attention.query.weight", qdim, C);
        LAYER_PARAM(q_b, "attention.query.bias", qdim, 0);
        if (c->kv_layer_of[l] == l && !c->use_kv_mlp) {
            /* only owning layers have K/V projections */
            LAYER_PARAM(k_w, "attention.key.weight", kvdim, C);
            LAYER_PARAM(k_b, "attention.key.bias", kvdim, 0);
            LAYER_PARAM(v_w, "attention.value.weight", kvdim, C);
            LAYER_PARAM(v_b, "attention.value.bias", kvdim, 0);
        } else if (c->kv_layer_of[l] == l) { /* the reference's KeyValueMLP names */
            LAYER_PARAM(k_mlp_w, "attention.key.dense_in.weight", kvI, C);
            LAYER_PARAM(k_mlp_b, "attention.key.dense_in.bias", kvI, 0);
            LAYER_PARAM(k_w, "attention.key.dense_out.weight", kvdim, kvI);
            LAYER_PARAM(k_b, "attention.key.dense_out.bias", kvdim, 0);
            LAYER_PARAM(v_mlp_w, "attention.value.dense_in.weight", kvI, C);
            LAYER_PARAM(v_mlp_b, "attention.value.dense_in.bias", kvI, 0);
            LAYER_PARAM(v_w, "attention.value.dense_out.weight", kvdim, kvI);
            LAYER_PARAM(v_b, "attention.value.dense_out.bias", kvdim, 0);
        }
        LAYER_PARAM(dense_w, "attention.dense.weight", C, C);
        LAYER_PARAM(dense_b, "attention.dense.bias", C, 0);
        LAYER_PARAM(fc_w, "mlp.dense_h_to_4h.weight", I, C);
        LAYER_PARAM(fc_b, "mlp.dense_h_to_4h.bias", I, 0);
        LAYER_PARAM(proj_w, "mlp.dense_4h_to_h.weight", C, I);
        LAYER_PARAM(proj_b, "mlp.dense_4h_to_h.bias", C, 0);
#undef LAYER_PARAM
    }
    table_add(&tb, offsetof(Weights, lnf_w), "gpt_neox.final_layer_norm.weight", C, 0);
    table_add(&tb, offsetof(Weights, lnf_b), "gpt_neox.final_layer_norm.bias", C, 0);
    table_add(&tb, offsetof(Weights, embed_out), "embed_out.weight", V, C);
    m->num_parameters = tb.offset;
    return 0;
}

/* Points every tensor pointer of w into base (parameters or gradients). */
static void point_weights(const Model *m, float *base, Weights *w) {
    memset(w, 0, sizeof(*w));
    for (int i = 0; i < m->n_params; i++)
        *(float **)((char *)w + m->params[i].slot) = base + m->params[i].offset;
}

const ParamInfo *model_param(const Model *m, const char *name) {
    for (int i = 0; i < m->n_params; i++)
        if (strcmp(m->params[i].name, name) == 0) return &m->params[i];
    return NULL;
}

static int model_allocate_params(Model *m) {
    if (build_param_table(m) != 0) return -1;
    m->param_memory = alloc_zeroed(m->num_parameters, sizeof(float), "the parameters");
    if (!m->param_memory) return -1;
    point_weights(m, m->param_memory, &m->w);
    return 0;
}

/* A model of config c with HF's GPT-NeoX initialization (what init does). */
int model_init_random(Model *m, const Config *c, uint64_t seed) {
    memset(m, 0, sizeof(*m));
    m->config = *c;
    if (config_finalize(&m->config, "config") != 0 || model_allocate_params(m) != 0) {
        model_free(m);
        return -1;
    }
    /* HF's GPT-NeoX init: weights normal(0, initializer_range), biases 0, LayerNorm 1 / 0 */
    uint64_t rng = seed;
    for (int i = 0; i < m->n_params; i++) {
        const ParamInfo *p = &m->params[i];
        float *x = m->param_memory + p->offset;
        int is_ln_weight =
            strstr(p->name, "layernorm.weight") || strstr(p->name, "layer_norm.weight");
        for (size_t k = 0; k < p->numel; k++)
            x[k] = p->ndim == 2 ? (float)(rng_normal(&rng) * c->initializer_range)
                                : (is_ln_weight ? 1.0f : 0.0f);
    }
    return 0;
}

/* ===========================================================================
 * 4. Kernels. Shapes use N = B*T rows. Forward kernels overwrite their
 *    output; backward kernels *add* into their input gradients (dinp += ...),
 *    because a tensor may feed several consumers (the residual stream, and the
 *    K/V of an owning layer read by several layers). Every reduction runs in a
 *    fixed order whatever the thread count, so runs are bit-reproducible.
 *    The section opens with the naive references: the math of the two
 *    kernels that matter most, the matrix product and the attention, as
 *    plainly as it can be written. The fast versions that follow compute the
 *    same; the tests check them against these.
 * ======================================================================== */

/* --- Subnormal numbers. fp32 values below 2^-126 (1.2e-38) are subnormal,
 * and training makes them (the squares of small gradients in AdamW, products
 * of small activations and gradients). Many CPUs compute with them through a
 * slow microcode assist, one per operation (one 2-core Zen 5 trained
 * Pythia-160M 5x slower with them than built with -ffast-math, 83 against 460
 * tokens/s; make bench --subnormals shows both on the machine at hand). x86's
 * MXCSR flags flush-to-zero (results) and denormals-are-zero (inputs), and
 * AArch64's FPCR.FZ, make them 0 instead, as -ffast-math's start-up code does,
 * without -ffast-math's other changes to the arithmetic. Nothing a model
 * computes is that small on purpose (fp32's smallest normal number is far
 * below any tolerance here), and every thread flushes alike, so results stay
 * independent of the thread count. Elsewhere the arithmetic is left as it is. */
static void flush_subnormals_here(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    _mm_setcsr(_mm_getcsr() | 0x8040); /* FTZ (bit 15) | DAZ (bit 6) */
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
    uint64_t fpcr;
    __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
    __asm__ volatile("msr fpcr, %0" : : "r"(fpcr | (1u << 24))); /* FZ */
#endif
}

/* The mode is per thread: set on this one and on every OpenMP thread (threads
 * started later copy the floating-point state of the thread starting them). */
void flush_subnormals(void) {
    flush_subnormals_here();
    PARALLEL_REGION { flush_subnormals_here(); }
}

/* --- Naive references. Not used in training; sums run in double, so that
 * their own rounding stays far below the tests' tolerances. */

/* C[M, N] = start + A[M, K] B[K, N], with gemm()'s strides (mlkv.h): A(i, k)
 * = a[i * a_row + k * a_col], B(k, j) = b[k * b_row + j * b_col]; start is C
 * itself when accumulate, else the bias (or zero). A Linear layer's forward
 * pass is out = inp W^T + bias (B = W^T: b_row = 1, b_col = C), its input
 * gradient dinp = dout W, its weight gradient dW += dout^T inp. */
void gemm_naive(int M, int N, int K, const float *a, size_t a_row, size_t a_col, const float *b,
                size_t b_row, size_t b_col, float *c, int accumulate, const float *bias) {
    for (int i = 0; i < M; i++) {
        for (int j = 0; j < N; j++) {
            float *cij = c + (size_t)i * N + j;
            double sum = accumulate ? *cij : bias ? bias[j] : 0.0;
            /* the dot product of row i of A with column j of B */
            for (int k = 0; k < K; k++) {
                sum += (double)a[i * a_row + k * a_col] * b[k * b_row + j * b_col];
            }
            *cij = (float)sum;
        }
    }
}

/* Causal attention, the textbook way, keeping the whole matrix of
 * probabilities att [B, H, T, T]. For query head h at position t:
 *   score_s = q_t . k_s / sqrt(hs) for every key s <= t (causal),
 *   att_ts = exp(score_s) / sum_s' exp(score_s')  (softmax; 0 for s > t),
 *   out_t = sum_s att_ts v_s,   lse_t = log sum_s exp(score_s).
 * k and v are those of K/V head h / (H / kvH): that division is all GQA and
 * MQA add. MLKV's sharing across layers is not in here: the model hands a
 * layer its owner's k and v (section 5). q, out [B, T, H*hs]; k, v
 * [B, T, kvH*hs]; lse [B, H, T]. */
void attention_forward_naive(float *out, float *lse, float *att, const float *q, const float *k,
                             const float *v, AttentionShape shape) {
    int B = shape.B, T = shape.T, H = shape.H, kvH = shape.kvH, hs = shape.hs;
    size_t q_row = (size_t)H * hs, kv_row = (size_t)kvH * hs;
    double scale = 1.0 / sqrt((double)hs);
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            for (int h = 0; h < H; h++) {
                const float *query = q + ((size_t)b * T + t) * q_row + (size_t)h * hs;
                /* key and value s of this head: keys[s * kv_row + d], values[...] */
                size_t kv_head = (size_t)(h / (H / kvH)) * hs;
                const float *keys = k + (size_t)b * T * kv_row + kv_head;
                const float *values = v + (size_t)b * T * kv_row + kv_head;
                float *att_row = att + (((size_t)b * H + h) * T + t) * T;

                /* pass 1: the scores, and their maximum (subtracted before
                 * exp, which then never overflows) */
                double max = -INFINITY;
                for (int s = 0; s <= t; s++) {
                    double dot = 0.0;
                    for (int d = 0; d < hs; d++) {
                        dot += (double)query[d] * keys[s * kv_row + d];
                    }
                    att_row[s] = (float)(dot * scale);
                    if (att_row[s] > max) max = att_row[s];
                }

                /* pass 2: exp, and the softmax's normalizer */
                double sum = 0.0;
                for (int s = 0; s <= t; s++) {
                    double e = exp(att_row[s] - max);
                    att_row[s] = (float)e;
                    sum += e;
                }
                lse[((size_t)b * H + h) * T + t] = (float)(max + log(sum));

                /* pass 3: normalize; the future gets probability 0 */
                for (int s = 0; s < T; s++) {
                    att_row[s] = s <= t ? (float)(att_row[s] / sum) : 0.0f;
                }

                /* pass 4: the probability-weighted sum of the values */
                float *out_t = out + ((size_t)b * T + t) * q_row + (size_t)h * hs;
                for (int d = 0; d < hs; d++) {
                    double acc = 0.0;
                    for (int s = 0; s <= t; s++) {
                        acc += (double)att_row[s] * values[s * kv_row + d];
                    }
                    out_t[d] = (float)acc;
                }
            }
        }
    }
}

/* The backward pass of attention_forward_naive, from its att. With
 * dp_s = dout_t . v_s and D = sum_s att_ts dp_s (= dout_t . out_t):
 *   dv_s += att_ts dout_t,   ds_s = att_ts (dp_s - D)  (softmax's backward),
 *   dq_t = sum_s ds_s k_s / sqrt(hs),   dk_s += ds_s q_t / sqrt(hs).
 * dq is overwritten; dk and dv are added into, as attention_backward does:
 * the query heads of a group add into their one K/V head, and in MLKV the
 * layers reading an owner's K/V add into its one buffer. */
void attention_backward_naive(float *dq, float *dk, float *dv, const float *dout, const float *att,
                              const float *q, const float *k, const float *v,
                              AttentionShape shape) {
    int B = shape.B, T = shape.T, H = shape.H, kvH = shape.kvH, hs = shape.hs;
    size_t q_row = (size_t)H * hs, kv_row = (size_t)kvH * hs;
    double scale = 1.0 / sqrt((double)hs);
    /* one row's dp (T doubles on the stack: the att matrix this kernel reads
     * holds T * T floats per head, which bounds T long before the stack) */
    double dp[T];
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            for (int h = 0; h < H; h++) {
                size_t at = ((size_t)b * T + t) * q_row + (size_t)h * hs;
                const float *query = q + at, *dout_t = dout + at;
                /* key, value and their gradients s of this head: [s * kv_row + d] */
                size_t kv_head = (size_t)b * T * kv_row + (size_t)(h / (H / kvH)) * hs;
                const float *keys = k + kv_head, *values = v + kv_head;
                float *dkeys = dk + kv_head, *dvalues = dv + kv_head;
                const float *att_row = att + (((size_t)b * H + h) * T + t) * T;

                /* pass 1: dp_s = dout_t . v_s, and D = sum_s att_ts dp_s */
                double D = 0.0;
                for (int s = 0; s <= t; s++) {
                    dp[s] = 0.0;
                    for (int d = 0; d < hs; d++) {
                        dp[s] += (double)dout_t[d] * values[s * kv_row + d];
                    }
                    D += att_row[s] * dp[s];
                }

                /* pass 2, each key: ds, then its share of dq, dk and dv */
                double dq_t[MAX_HEAD_SIZE] = {0};
                for (int s = 0; s <= t; s++) {
                    double ds = att_row[s] * (dp[s] - D) * scale;
                    for (int d = 0; d < hs; d++) {
                        dq_t[d] += ds * keys[s * kv_row + d];
                        dkeys[s * kv_row + d] += (float)(ds * query[d]);
                        dvalues[s * kv_row + d] += att_row[s] * dout_t[d];
                    }
                }
                for (int d = 0; d < hs; d++) {
                    dq[at + d] = (float)dq_t[d];
                }
            }
        }
    }
}

/* --- The fast kernels, and the instruction set they run in. They are plain
 * C loops that the compiler turns into the vector instructions of the
 * instruction set it compiles for. Built with -march=native (make), that is
 * this CPU's own; built plainly for x86-64 (cc -O3 -o mlkv mlkv.c -lm), it
 * is SSE2 of 2003: vectors of 4 floats and no fused multiply-add, where a
 * current CPU has 16 floats and two FMA units per core (a Pythia-160M
 * training step on one thread of a Zen 5: 5.4 tokens/s against 120). So
 * there, with gcc or clang, every KERNEL below (the work of one task of a
 * parallel loop) is compiled three times: for AVX-512, for AVX2 with FMA,
 * and for the compiler's baseline, each through a function target attribute
 * with everything it calls inlined (flatten); every call runs the one this
 * CPU has, asked once at start (cpuid), or the one MLKV_KERNELS (avx512,
 * avx2 or portable) names. The parallel loops stay outside the kernels:
 * clang compiles an OpenMP loop's body as a function of its own, without its
 * parent's target attribute. Other compilers and other architectures,
 * builds for a given CPU (-march), and builds with -DMLKV_ONE_KERNEL_SET
 * (the fuzzers: a third of the compile time) compile each kernel once, as
 * the flags say. Each instruction set sums in the same order but rounds its own way
 * (FMA rounds once where a multiply and an add round twice): results agree
 * to fp32 rounding between instruction sets, and bit for bit within one. */
enum { KERNELS_PORTABLE, KERNELS_AVX2, KERNELS_AVX512 };
/* A helper that kernels call: inlined into each caller, always, so that it
 * runs in the caller's instruction set with the caller's constants (clang's
 * flatten inlines one level only, and a GEMM micro-kernel left as a call of
 * its own keeps its accumulators in memory: 5-7x slower, measured) */
#if defined(__GNUC__) || defined(__clang__)
#define KERNEL_INLINE static inline __attribute__((always_inline))
#else
#define KERNEL_INLINE static inline
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__AVX512F__) && \
    !defined(MLKV_ONE_KERNEL_SET)
#define KERNEL_DISPATCH 1
static int kernel_set = KERNELS_PORTABLE; /* chosen before main (kernels_at_start) */
#define TARGET_AVX512                                                                              \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"), flatten))
#define TARGET_AVX2 __attribute__((target("avx2,fma"), flatten))
/* KERNEL(name, (parameters), (arguments)) { body }: the function `name`,
 * whose body is compiled once per instruction set */
#define KERNEL(name, params, args)                                                         \
    static inline void name##_body params;                                                \
    TARGET_AVX512 static void name##_avx512 params { name##_body args; }                  \
    TARGET_AVX2 static void name##_avx2 params { name##_body args; }                      \
    __attribute__((flatten)) static void name##_portable params { name##_body args; }     \
    __attribute__((noinline)) static void name params {                                   \
        if (kernel_set == KERNELS_AVX512) name##_avx512 args;                             \
        else if (kernel_set == KERNELS_AVX2) name##_avx2 args;                            \
        else name##_portable args;                                                        \
    }                                                                                     \
    static inline void name##_body params
#else
#if defined(__AVX512F__)
#define kernel_set KERNELS_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define kernel_set KERNELS_AVX2
#else
#define kernel_set KERNELS_PORTABLE
#endif
#define KERNEL(name, params, args) static void name params
#endif
/* vectors of 16 floats: the GEMM's micro-tile is twice as wide and high */
#define VECTOR_512 (kernel_set == KERNELS_AVX512)

static const char *const kernel_set_names[] = {"portable", "avx2", "avx512"};

int kernels_select(const char *name) {
    int want = -1;
    for (int i = 0; i < 3; i++)
        if (name && !strcmp(name, kernel_set_names[i])) want = i;
    if (name && strcmp(name, "auto") != 0 && want < 0)
        return fail("MLKV_KERNELS: unknown instruction set '%s' (avx512, avx2, portable or auto)",
                    name);
#ifdef KERNEL_DISPATCH
    __builtin_cpu_init();
    int best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
                   ? KERNELS_AVX512
               : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? KERNELS_AVX2
                                                                                 : KERNELS_PORTABLE;
    want = want < 0 ? best : want;
    if (want > best)
        return fail("MLKV_KERNELS: this CPU has no %s (it runs %s at most)",
                    kernel_set_names[want], kernel_set_names[best]);
    kernel_set = want;
#else
    if (want >= 0 && want != kernel_set)
        return fail("MLKV_KERNELS: this build runs its %s kernels only (on x86-64, gcc or "
                    "clang without -march builds all three)", kernel_set_names[kernel_set]);
#endif
    return 0;
}

const char *kernels_name(void) {
#ifdef KERNEL_DISPATCH
    static const char *const chosen[] = {"portable (baseline x86-64, chosen at run time)",
                                         "AVX2+FMA (chosen at run time)",
                                         "AVX-512 (chosen at run time)"};
    return chosen[kernel_set];
#else
    static const char *const built[] = {"portable (as compiled)", "AVX2+FMA (as compiled)",
                                        "AVX-512 (as compiled)"};
    return built[kernel_set];
#endif
}

#ifdef KERNEL_DISPATCH
/* before main, and so before any program using these kernels computes: the
 * best set this CPU runs (mlkv_main then applies MLKV_KERNELS) */
__attribute__((constructor)) static void kernels_at_start(void) { kernels_select("auto"); }
#endif

/* exp(x) without a libm call or a branch, so loops of it vectorize:
 * exp(x) = 2^n exp(r) with n = round(x / ln 2) and |r| <= ln(2) / 2, exp(r)
 * by its Taylor series to r^7 (relative error below 1e-7, about 1 ulp). x is
 * clamped to [-86, 88]: below, the result (5e-38) is negligible in a softmax
 * sum of at least 1. */
KERNEL_INLINE float exp_fast(float x) {
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    x = x < -86.0f ? -86.0f : x > 88.0f ? 88.0f : x;
    float t = x * 1.44269504088896341f + round_magic;
    uint32_t n, bits; /* unsigned: a NaN x gives a NaN-ish result, never undefined behaviour */
    memcpy(&n, &t, sizeof(n));
    n -= 0x4B400000u; /* the bits of round_magic: n = round(x / ln 2), modulo 2^32 */
    t -= round_magic;
    float r = (x - t * 0.693145751953125f) - t * 1.428606765330187e-6f; /* ln 2 in two parts */
    float p = 1.0f + r * (1.0f + r * (1.0f / 2 + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 +
                        r * (1.0f / 720 + r * (1.0f / 5040)))))));
    memcpy(&bits, &p, sizeof(bits));
    bits += n << 23; /* times 2^n: add n to the exponent */
    memcpy(&p, &bits, sizeof(p));
    return p;
}

/* The index of the largest of x[0..n), the first on ties (greedy decoding). */
static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) best = x[i] > x[best] ? i : best;
    return best;
}

/* x[n] *= alpha */
KERNEL_INLINE void scale_floats(float *x, float alpha, int n) {
    for (int i = 0; i < n; i++) x[i] *= alpha;
}

/* x[0..n) = 0 by all threads: a single thread's memset of the 650 MB of
 * Pythia-160M's gradients takes a good part of a step on 16 cores */
static void zero_floats(float *x, size_t n) {
    size_t chunks = (n + 65535) / 65536;
PARALLEL_FOR
    for (size_t i = 0; i < chunks; i++) {
        size_t start = i * 65536, count = n - start < 65536 ? n - start : 65536;
        memset(x + start, 0, count * sizeof(float));
    }
}

/* y[n] += alpha * x[n] */
KERNEL_INLINE void axpy(float *y, float alpha, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += alpha * x[i];
}

/* --- GEMM: the one matrix product behind every Linear layer, forward and
 * backward:
 *
 *     C[M, N] = init + A[M, K] B[K, N]     (init: C itself, bias[N], or 0)
 *
 * A and B are read through strides, A(i, k) = a[i * a_row + k * a_col] and
 * B(k, j) = b[k * b_row + j * b_col], so one routine computes a Linear
 * layer's output (B = W^T), its input gradient (B = W) and its weight
 * gradient (A = dout^T) without a transpose in memory (see matmul_* below).
 *
 * Why it is fast (the GotoBLAS / BLIS scheme, cut down to what we need):
 * - A micro-kernel keeps a GEMM_MR x GEMM_NR block of C in registers and adds
 *   one outer product per k: GEMM_MR numbers of A, each broadcast, times
 *   GEMM_NR contiguous numbers of B. With AVX-512 that is 12 x 32 floats =
 *   24 of the 32 zmm registers, 24 vector FMAs per k against 12 broadcasts
 *   and 2 vector loads, so the FMA units, not the loads, set the pace.
 * - For the kernel to read unit-stride memory, B is first *packed*: copied
 *   into panels in which the GEMM_NR numbers one k step needs are adjacent.
 *   Packing turns any stride into unit stride (so the transpose W^T is free)
 *   and pads ragged edges with zeros, so the kernel has no branches. It costs
 *   one pass over B, against M*N*K FMAs. A needs no such help when its rows
 *   are contiguous (the broadcasts take any address); otherwise (A = dout^T)
 *   it is packed into GEMM_MR-row panels too.
 * - K is cut into slices of GEMM_KC (longer for thin products): a packed B
 *   panel (KC x NR, 32 KiB) stays in the L1 cache while the kernel walks down
 *   a strip of rows of A (GEMM_TASK_ROWS x KC, 96 KiB, L2); the packed blocks
 *   (GEMM_MC x KC and KC x GEMM_NC floats, 4.25 MiB) stay in L2/L3.
 *   Every slice reads C and writes it back, so a K of at most GEMM_K_WHOLE
 *   (768: Pythia-160M's width, or 512 rows of a chunk) is taken in one slice,
 *   with blocks of fewer rows and columns so that they fit the same buffers:
 *   the panels no longer fit L1, but C is written once. Measured against
 *   slices of 256-512, one product at a time in one process: the LM head's
 *   forward product 1.13-1.21 times as fast, the MLP's 1.03-1.19, the LM
 *   head's weight gradient 1.12-1.16; with K = 2048, slices of 768 were slower.
 *   The packed buffers hold slices of 2 * GEMM_KC at GEMM_MC rows and
 *   GEMM_NC columns (8.5 MiB), so the weight gradients (K = B*T = 2048)
 *   take slices of 512-1024, reading and writing C 2-4 times rather than
 *   4-8: 1.02-1.11 times as fast in 16 of 18 comparisons (make bench's
 *   table, old and new builds alternated twice; 0.93 and 1.39 the extremes);
 *   buffers for 4 * GEMM_KC were no faster.
 * - A product of at most THIN_ROWS rows (a decoding step) skips packing:
 *   see gemm_thin.
 * Threads split the tiles of C, never K, and every element of C sums its
 * products in k order whatever the tiling: results do not depend on the
 * thread count or on M, so a one-token decoding step computes the same bits
 * as the full forward pass. (The measurements behind these choices: make
 * bench, README's Speed.) */
/* 12 x 32 accumulators with 512-bit vectors (24 of the 32 zmm registers),
 * else 6 x 16 (12 of AVX2's 16 ymm registers) */
#define GEMM_MR (VECTOR_512 ? 12 : 6)
#define GEMM_NR (VECTOR_512 ? 32 : 16)
#define GEMM_MR_MAX 12
#define GEMM_NR_MAX 32
#define GEMM_KC 256
/* rows of A packed at once (B*T = 2048 in one block): whole panels of 6 or 12 */
#define GEMM_MC 2304
#define GEMM_NC 2048            /* columns of B packed at once */
#define GEMM_K_WHOLE (3 * GEMM_KC) /* products with K up to this take it in one slice */
#define GEMM_TASK_ROWS (8 * GEMM_MR) /* one thread's task: this many rows x GEMM_NR columns */

/* Packed blocks, in static memory: no allocation, pages touched on first use. */
#define FP32_KC_CAPACITY (2 * GEMM_KC) /* the longest slice at GEMM_MC rows or GEMM_NC columns */
static _Alignas(64) float gemm_packed_a[GEMM_MC * FP32_KC_CAPACITY];
static _Alignas(64) float gemm_packed_b[FP32_KC_CAPACITY * GEMM_NC];

/* One panel: dst[k * width + r] = X(r, k) for r < rows (zero for rows <= r <
 * width), k < kc, where X(r, k) = x[r * r_stride + k * k_stride]. The inner
 * loop runs along the panel's rows, so the writes are sequential: where X is
 * transposed on the way (W^T in a forward product, k_stride 1) the compiler
 * gathers the reads into vectors (vgatherdps), 1.6 times as fast as the
 * other loop order, whose single-float stores to rows 128 bytes apart made
 * packing W^T a sixth of the LM head's forward product (measured with perf,
 * one thread). */
/* a whole panel from kc contiguous rows of `width` floats (a constant at
 * every call): copies of constant size, which the compiler inlines (of
 * pack_panel's general loop, gcc makes a call of memmove per row of the
 * panel: 4% of a training step, measured with perf) */
KERNEL_INLINE void copy_panel_rows(float *restrict dst, const float *restrict x, size_t k_stride,
                                   int kc, int width) {
    for (int k = 0; k < kc; k++) memcpy(dst + k * width, x + k * k_stride, width * sizeof(float));
}

KERNEL_INLINE void pack_panel(float *restrict dst, const float *restrict x, size_t r_stride,
                              size_t k_stride, int rows, int kc, int width) {
    if (r_stride == 1 && rows == width) switch (width) { /* the panel widths of the kernels */
        case 6: copy_panel_rows(dst, x, k_stride, kc, 6); return;
        case 12: copy_panel_rows(dst, x, k_stride, kc, 12); return;
        case 16: copy_panel_rows(dst, x, k_stride, kc, 16); return;
        case 32: copy_panel_rows(dst, x, k_stride, kc, 32); return;
        }
    for (int k = 0; k < kc; k++)
        for (int r = 0; r < rows; r++) dst[k * width + r] = x[r * r_stride + k * k_stride];
    for (int k = 0; k < kc; k++)
        for (int r = rows; r < width; r++) dst[k * width + r] = 0.0f;
}

/* The micro-kernel: c[mr, cols] (row stride ldc) = start + A[mr, kc] B[kc, cols],
 * where start is c itself (accumulate), or init[cols] in every row (the
 * bias, or zeros: read straight into the accumulators, saving a pass that
 * writes c only for the kernel to load it back), and
 * A(i, k) = a[i * a_row + k * a_col]:
 * a packed panel [kc, MR] has a_row = 1, a_col = GEMM_MR; a row-major tile
 * [MR, kc] has a_row = its row length, a_col = 1. b: [kc, NR], rows ldb
 * floats apart (GEMM_NR when packed). cols is nr, or nr / 2 (`half`) for
 * attention heads half as wide (read in place, not padded to twice their
 * width). mr and nr are constants at every call (the two shapes, below), and
 * so is half after inlining: gcc and clang unroll the loops and keep acc in
 * registers; per k the inner loop becomes (AVX-512, objdump -d) two vector
 * loads of b, and for each of the 12 rows one vbroadcastss of A and two
 * vfmadd231ps. */
KERNEL_INLINE void gemm_kernel_shaped(int mr, int nr, int kc, const float *restrict a, size_t a_row,
                                      size_t a_col, const float *restrict b, size_t ldb,
                                      float *restrict c, size_t ldc, const float *restrict init,
                                      int half) {
    float acc[GEMM_MR_MAX][GEMM_NR_MAX]; /* of which [mr][nr] are used */
    int cols = half ? nr / 2 : nr;
    for (int i = 0; i < GEMM_MR_MAX; i++)
        for (int j = 0; j < GEMM_NR_MAX; j++)
            acc[i][j] = i >= mr || j >= cols ? 0.0f : init ? init[j] : c[i * ldc + j];
    for (int k = 0; k < kc; k++)
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < cols; j++) acc[i][j] += a[i * a_row + k * a_col] * b[k * ldb + j];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < cols; j++) c[i * ldc + j] = acc[i][j];
}

/* init of the products that start from zero (any number of columns up to GEMM_NC) */
static const float zero_row[GEMM_NC];

/* The micro-kernel at this instruction set's tile, GEMM_MR x GEMM_NR (or
 * GEMM_NR / 2 columns when half) */
KERNEL_INLINE void gemm_kernel(int kc, const float *restrict a, size_t a_row, size_t a_col,
                               const float *restrict b, size_t ldb, float *restrict c, size_t ldc,
                               const float *restrict init, int half) {
    if (VECTOR_512) gemm_kernel_shaped(12, 32, kc, a, a_row, a_col, b, ldb, c, ldc, init, half);
    else gemm_kernel_shaped(6, 16, kc, a, a_row, a_col, b, ldb, c, ldc, init, half);
}

/* A tile of C (rows x cols at most MR x NR, row stride ldc) += A B. The
 * first slice of K of a product that does not accumulate starts the tile
 * from init[cols] (the bias, or zeros) in every row. A ragged tile at the
 * edge of C goes through a full-size copy, so the arithmetic is the kernel's
 * own. */
KERNEL_INLINE void gemm_block(int kc, const float *a, size_t a_row, size_t a_col, const float *b,
                              float *c, size_t ldc, const float *init, int rows, int cols) {
    if (rows == GEMM_MR && cols == GEMM_NR) {
        gemm_kernel(kc, a, a_row, a_col, b, GEMM_NR, c, ldc, init, 0);
        return;
    }
    float tile[GEMM_MR_MAX * GEMM_NR_MAX] = {0};
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) tile[i * GEMM_NR + j] = init ? init[j] : c[i * ldc + j];
    gemm_kernel(kc, a, a_row, a_col, b, GEMM_NR, tile, GEMM_NR, NULL, 0);
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) c[i * ldc + j] = tile[i * GEMM_NR + j];
}

/* --- bf16 matmul inputs (train --precision bf16): the operands of every
 * GEMM are rounded to bfloat16 (fp32's sign, exponent and top 7 mantissa
 * bits) as they are packed, and products are accumulated in fp32; the
 * parameters, gradients and AdamW moments stay fp32 ("master weights"),
 * as mixed-precision training does. The kernel works on 32 x 32 tiles of C
 * and K in steps of 32, in the layouts of Intel's AMX tile instructions:
 *   A panel (32 rows): [K/32][32 rows][32 k]            (rows of 64 bytes)
 *   B panel (32 cols): [K/32][16 k pairs][32 cols][2 k] ("VNNI": the two
 *                      numbers of a k pair side by side)
 * Where the CPU has AMX (Sapphire Rapids and later Xeons), one TDPBF16PS
 * instruction multiplies a 16 x 32 tile of A by a 32 x 16 tile of B into a
 * 16 x 16 tile of C: 8192 multiply-adds (measured with make bench: the bf16
 * GEMMs run 1.5-2.5 times as fast as fp32, the packing now being the limit).
 * Without AMX, where the CPU has AVX512-BF16 (AMD Zen 4 and later), its
 * VDPBF16PS instruction adds to each of 16 fp32 lanes the products of two
 * pairs of bf16 numbers: twice the multiply-adds of an fp32 FMA. (On the
 * Xeon with AMX it ran at half the fp32 FMA rate, AMX's is far higher.)
 * Elsewhere a portable kernel computes the same products in plain C: the
 * same bf16 inputs, fp32 sums. AMX and VDPBF16PS add within a pair or a tile
 * in their own order, so the three agree to fp32 rounding, not bit for bit
 * (the tests compare them). */
#define BF16_TILE 32 /* rows and columns of C per kernel call, and the K step */
#define BF16_KC 1024 /* the longest slice of K: C is read and written once per slice */

static _Alignas(64) uint16_t gemm_bf16_a[GEMM_MC * BF16_KC];
static _Alignas(64) uint16_t gemm_bf16_b[BF16_KC * GEMM_NC];
static Precision gemm_precision = PRECISION_FP32;
static int gemm_bf16_kernel; /* a Bf16Kernel: which kernel the bf16 products run */

/* fp32 -> bf16, rounding to nearest even; NaN stays NaN, denormals become
 * zero (AMX treats them so). Branch-free, so packing loops vectorize. */
KERNEL_INLINE uint16_t bf16_from_float(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u, tiny = (u >> 16) & 0x8000u;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? nan
                      : (u & 0x7F800000u) == 0        ? tiny
                                                      : rounded);
}

KERNEL_INLINE float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, sizeof(x));
    return x;
}

/* Two numbers as the 32-bit word of their bf16 pair, lo in the low half */
KERNEL_INLINE uint32_t bf16_pair(float lo, float hi) {
    return (uint32_t)bf16_from_float(lo) | (uint32_t)bf16_from_float(hi) << 16;
}

/* Where element (r, k) of a 32-row A panel, or (k, r) of a 32-column B panel, lives */
KERNEL_INLINE size_t bf16_a_index(int r, int k) {
    return (size_t)(k / 32) * 1024 + (size_t)r * 32 + k % 32;
}
KERNEL_INLINE size_t bf16_b_index(int r, int k) {
    return (size_t)(k / 32) * 1024 + (size_t)(k % 32 / 2) * 64 + (size_t)r * 2 + k % 2;
}

/* As pack_panel, into bf16 panels of 32 rows of A (or columns of B), K
 * padded with zeros to a multiple of 32 */
KERNEL_INLINE void pack_panel_bf16(uint16_t *restrict dst, const float *restrict x, size_t r_stride,
                                   size_t k_stride, int rows, int kc, int is_b) {
    int kc32 = (kc + 31) / 32 * 32;
    if (rows < BF16_TILE || kc < kc32) { /* ragged: element by element, zeros around */
        memset(dst, 0, sizeof(uint16_t) * BF16_TILE * kc32);
        for (int r = 0; r < rows; r++)
            for (int k = 0; k < kc; k++)
                dst[is_b ? bf16_b_index(r, k) : bf16_a_index(r, k)] =
                    bf16_from_float(x[r * r_stride + k * k_stride]);
        return;
    }
    /* whole blocks of 32 x 32, seen as 32-bit words: two neighbours in k
     * (little-endian: the lower k in the low half). A's block is a_words[r][k/2],
     * B's is b_words[k/2][r]. x is read along its contiguous side into the
     * layout that side gives, and turned (in L1) when the panel wants the
     * other: every loop reads and writes contiguous memory but the turns. Per
     * element, packing 32 x 768 from rows 768 floats apart on this project's
     * AVX-512 machine: 0.26-0.45 ns, where loops that wrote one bf16 number at
     * a time to places 64 bytes apart took 0.9-2.0 (W^T one number at a time,
     * unvectorized); the forward products 1.2-1.9 times as fast, the weight
     * gradients 1.1-1.5 (dev/ab.sh HEAD GEMM 8 256 7 bf16 bf16). */
    for (int k0 = 0; k0 < kc; k0 += 32) {
        const float *xk = x + k0 * k_stride;
        uint32_t a_words[BF16_TILE * 16], b_words[16 * BF16_TILE];
        if (k_stride == 1) /* rows of x along k: pairs along each row, A's layout */
            for (int r = 0; r < BF16_TILE; r++)
                for (int kk = 0; kk < 16; kk++)
                    a_words[r * 16 + kk] =
                        bf16_pair(xk[r * r_stride + 2 * kk], xk[r * r_stride + 2 * kk + 1]);
        else /* rows k and k+1 of x interleaved, B's layout */
            for (int kk = 0; kk < 16; kk++)
                for (int r = 0; r < BF16_TILE; r++)
                    b_words[kk * 32 + r] = bf16_pair(xk[2 * kk * k_stride + r * r_stride],
                                                     xk[(2 * kk + 1) * k_stride + r * r_stride]);
        if (is_b && k_stride == 1) /* B = W^T: turned to B's layout */
            for (int kk = 0; kk < 16; kk++)
                for (int r = 0; r < BF16_TILE; r++) b_words[kk * 32 + r] = a_words[r * 16 + kk];
        else if (!is_b && k_stride != 1) /* A from columns of x: turned to A's */
            for (int r = 0; r < BF16_TILE; r++)
                for (int kk = 0; kk < 16; kk++) a_words[r * 16 + kk] = b_words[kk * 32 + r];
        memcpy(dst + (size_t)k0 * BF16_TILE, is_b ? b_words : a_words, sizeof(b_words));
    }
}

/* c[32, 32] (row stride ldc) += A B over kc32 = K rounded up to 32, portably:
 * 8 rows at a time, 8 x 32 accumulators */
KERNEL_INLINE void bf16_kernel_portable(int kc32, const uint16_t *a, const uint16_t *b, float *c,
                                        size_t ldc) {
    for (int i0 = 0; i0 < BF16_TILE; i0 += 8) {
        float acc[8][BF16_TILE];
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < BF16_TILE; j++) acc[i][j] = c[(i0 + i) * ldc + j];
        for (int k = 0; k < kc32; k++)
            for (int i = 0; i < 8; i++) {
                float ai = bf16_to_float(a[bf16_a_index(i0 + i, k)]);
                for (int j = 0; j < BF16_TILE; j++)
                    acc[i][j] += ai * bf16_to_float(b[bf16_b_index(j, k)]);
            }
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < BF16_TILE; j++) c[(i0 + i) * ldc + j] = acc[i][j];
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* AMX: tiles 0-3 hold C (2 x 2 tiles of 16 x 16 fp32), 4-5 two 16-row tiles
 * of A, 6-7 two 16-column tiles of B. Linux hands the tile registers to a
 * process that asks (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA), and each
 * thread loads the tiles' shapes (LDTILECFG) before it uses them. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileShapes;

static int amx_available(void) {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 22)) ||
        !(edx & (1u << 24)))
        return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}

/* Every tile register 16 rows of 64 bytes: 16 x 16 floats of C, or
 * 16 x 32 bf16 of A and B. Per thread, before its products. */
__attribute__((target("amx-tile"))) static void amx_configure(void) {
    TileShapes shapes;
    memset(&shapes, 0, sizeof(shapes));
    shapes.palette = 1;
    for (int t = 0; t < 8; t++) shapes.rows[t] = 16, shapes.bytes_per_row[t] = 64;
    /* gcc 12's _tile_loadconfig tells the compiler it reads 8 bytes, and the
     * stores above were dropped as dead at -O2: make them happen first */
    __asm__ __volatile__("" : : "m"(shapes) : "memory");
    _tile_loadconfig(&shapes);
}

__attribute__((target("amx-tile"))) static void amx_release(void) { _tile_release(); }

__attribute__((target("amx-tile,amx-bf16"))) static void
bf16_kernel_amx(int kc32, const uint16_t *a, const uint16_t *b, float *c, size_t ldc) {
    size_t stride = ldc * sizeof(float);
    _tile_loadd(0, c, stride);
    _tile_loadd(1, c + 16, stride);
    _tile_loadd(2, c + 16 * ldc, stride);
    _tile_loadd(3, c + 16 * ldc + 16, stride);
    for (int k = 0; k < kc32; k += 32) {
        const uint16_t *ak = a + (size_t)k * 32, *bk = b + (size_t)k * 32;
        _tile_loadd(4, ak, 64);        /* rows 0-15 of A */
        _tile_loadd(5, ak + 512, 64);  /* rows 16-31 */
        _tile_loadd(6, bk, 128);       /* columns 0-15 of B */
        _tile_loadd(7, bk + 32, 128);  /* columns 16-31 */
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, stride);
    _tile_stored(1, c + 16, stride);
    _tile_stored(2, c + 16 * ldc, stride);
    _tile_stored(3, c + 16 * ldc + 16, stride);
}

#else
static int amx_available(void) { return 0; }
static void amx_configure(void) {}
static void amx_release(void) {}
static void bf16_kernel_amx(int kc32, const uint16_t *a, const uint16_t *b, float *c, size_t ldc) {
    bf16_kernel_portable(kc32, a, b, c, ldc);
}
#endif

/* VDPBF16PS, on x86-64 where the compiler has it (gcc 10, clang 9 and later) */
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
static int avx512_bf16_available(void) {
    unsigned eax, ebx, ecx, edx; /* CPUID leaf 7, subleaf 1: EAX bit 5 is AVX512_BF16 */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) &&
           (eax & (1u << 5));
}

/* c[32, 32] (row stride ldc) += A B over kc32, 8 rows x 32 columns of C in
 * 16 registers at a time: per k pair, B's two k rows of 16 columns each (one
 * 64-byte row of its VNNI panel) are loaded once, and each row's pair of A
 * (side by side in A's panel) is broadcast to every lane */
__attribute__((target("avx512f,avx512bf16"))) static void
bf16_kernel_avx512(int kc32, const uint16_t *a, const uint16_t *b, float *c, size_t ldc) {
    for (int i0 = 0; i0 < BF16_TILE; i0 += 8) {
        __m512 acc[8][2];
        for (int i = 0; i < 8; i++) {
            acc[i][0] = _mm512_loadu_ps(c + (i0 + i) * ldc);
            acc[i][1] = _mm512_loadu_ps(c + (i0 + i) * ldc + 16);
        }
        /* a block of 32 k at a time, so that every address inside it is a
         * constant offset from two pointers (computing bf16_a_index per row
         * and pair made the loop a third scalar arithmetic) */
        for (int k0 = 0; k0 < kc32; k0 += 32) {
            const uint16_t *ak = a + bf16_a_index(i0, k0), *bk = b + bf16_b_index(0, k0);
            for (int kk = 0; kk < 32; kk += 2) {
                __m512bh b0 = (__m512bh)_mm512_loadu_si512(bk + kk * 32),
                         b1 = (__m512bh)_mm512_loadu_si512(bk + kk * 32 + 32);
                for (int i = 0; i < 8; i++) {
                    uint32_t pair;
                    memcpy(&pair, ak + i * 32 + kk, sizeof(pair));
                    __m512bh ai = (__m512bh)_mm512_set1_epi32((int)pair);
                    acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
                    acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
                }
            }
        }
        for (int i = 0; i < 8; i++) {
            _mm512_storeu_ps(c + (i0 + i) * ldc, acc[i][0]);
            _mm512_storeu_ps(c + (i0 + i) * ldc + 16, acc[i][1]);
        }
    }
}
#else
static int avx512_bf16_available(void) { return 0; }
static void bf16_kernel_avx512(int kc32, const uint16_t *a, const uint16_t *b, float *c,
                               size_t ldc) {
    bf16_kernel_portable(kc32, a, b, c, ldc);
}
#endif

/* VDPBF16PS runs with the AVX-512 kernels alone (MLKV_KERNELS=avx2 or portable, applied
 * before, turns it off) */
int gemm_set_precision(Precision precision, int allow_fast) {
    gemm_precision = precision;
    static int amx = -1, avx512_bf16 = -1;
    if (precision == PRECISION_BF16 && allow_fast && amx < 0) amx = amx_available();
    if (precision == PRECISION_BF16 && allow_fast && avx512_bf16 < 0)
        avx512_bf16 = avx512_bf16_available();
    gemm_bf16_kernel = precision != PRECISION_BF16 || !allow_fast ? BF16_PORTABLE
                       : amx > 0                                ? BF16_AMX
                       : avx512_bf16 > 0 && VECTOR_512          ? BF16_AVX512
                                                                : BF16_PORTABLE;
    return gemm_bf16_kernel;
}

const char *bf16_kernel_name(int kernel) {
    return kernel == BF16_AMX ? "AMX" : kernel == BF16_AVX512 ? "AVX512-BF16" : "portable";
}

/* A 32 x 32 block of C (rows x cols of it inside C) += A B in bf16, from
 * init[cols] when given; ragged blocks through a full-size copy. */
KERNEL_INLINE void gemm_block_bf16(int kc32, const uint16_t *a, const uint16_t *b, float *c,
                                   size_t ldc, const float *init, int rows, int cols) {
    float tile[BF16_TILE * BF16_TILE];
    int whole = rows == BF16_TILE && cols == BF16_TILE;
    float *t = whole ? c : tile;
    size_t ldt = whole ? ldc : BF16_TILE;
    if (!whole) memset(tile, 0, sizeof(tile)); /* a whole block works on C itself */
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) t[i * ldt + j] = init ? init[j] : c[i * ldc + j];
    if (gemm_bf16_kernel == BF16_AMX) bf16_kernel_amx(kc32, a, b, t, ldt);
    else if (gemm_bf16_kernel == BF16_AVX512) bf16_kernel_avx512(kc32, a, b, t, ldt);
    else bf16_kernel_portable(kc32, a, b, t, ldt);
    for (int i = 0; !whole && i < rows; i++)
        for (int j = 0; j < cols; j++) c[i * ldc + j] = tile[i * BF16_TILE + j];
}

/* A forward product of a few rows (a decoding step: one row per sequence),
 * C[M, N] = start + A[M, K] W[N, K]^T with A's and W's rows contiguous,
 * without packing: packing W^T costs more than the product when M is small.
 * THIN_COLS outputs at a time read THIN_COLS rows of W side by side, each
 * output summing its products in k order from its start, as the kernel does:
 * the same bits as the packed path. */
#define THIN_ROWS 4
#define THIN_COLS 16
/* Columns j0 .. j0+THIN_COLS-1 (fewer at the edge) of C = start + A W^T for
 * at most THIN_ROWS rows (a decoding step), w's rows w_row apart: each a dot
 * product over K. */
KERNEL(gemm_thin_block,
       (int M, int N, int K, const float *a, size_t a_row, const float *w, size_t w_row, float *c,
        int accumulate, const float *bias, int j0),
       (M, N, K, a, a_row, w, w_row, c, accumulate, bias, j0)) {
    int cols = N - j0 < THIN_COLS ? N - j0 : THIN_COLS;
    float acc[THIN_ROWS][THIN_COLS] = {{0}};
    const float *wj[THIN_COLS];
    for (int j = 0; j < THIN_COLS; j++) wj[j] = w + (size_t)(j0 + (j < cols ? j : 0)) * w_row;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < cols; j++)
            acc[i][j] = accumulate ? c[(size_t)i * N + j0 + j] : bias ? bias[j0 + j] : 0.0f;
    for (int k = 0; k < K; k++)
        for (int i = 0; i < THIN_ROWS; i++) {
            float x = i < M ? a[i * a_row + k] : 0.0f;
            for (int j = 0; j < THIN_COLS; j++) acc[i][j] += x * wj[j][k];
        }
    for (int i = 0; i < M; i++)
        for (int j = 0; j < cols; j++) c[(size_t)i * N + j0 + j] = acc[i][j];
}

/* C = start + A W^T for at most THIN_ROWS rows: THIN_COLS columns per task */
static void gemm_thin(int M, int N, int K, const float *a, size_t a_row, const float *w,
                      size_t w_row, float *c, int accumulate, const float *bias) {
    int blocks = (N + THIN_COLS - 1) / THIN_COLS;
PARALLEL_FOR
    for (int blk = 0; blk < blocks; blk++)
        gemm_thin_block(M, N, K, a, a_row, w, w_row, c, accumulate, bias, blk * THIN_COLS);
}

/* How gemm() cuts a product into blocks: panels of mr rows of A and nr
 * columns of B, a thread's task of task_rows rows, slices of k_slice of K,
 * and blocks of mc_block rows and nc_block columns packed at once. */
typedef struct {
    int mr, nr, task_rows, a_in_place, k_slice, mc_block, nc_block;
} GemmPlan;

/* The plan of one product: bf16 packs everything into 32 x 32 tiles; fp32
 * reads rows of A in place when they are contiguous and sizes the slices of
 * K and the blocks to what the packed buffers hold. */
static GemmPlan gemm_plan(int M, int N, int K, size_t a_col, int bf16) {
    int mr = bf16 ? BF16_TILE : GEMM_MR, nr = bf16 ? BF16_TILE : GEMM_NR;
    int task_rows = bf16 ? 2 * BF16_TILE : GEMM_TASK_ROWS;
    /* fp32: A is read in place when its rows are contiguous (a_col = 1:
     * forward and input gradient): the kernel broadcasts single numbers of A,
     * from any address, and 12 rows of one k slice stay in L1. Then only a
     * ragged last panel of A is packed (measured: in-place columns of A, and
     * in-place B, were slower than packing them). bf16 packs everything. */
    int a_in_place = !bf16 && a_col == 1;
    int k_slice;
    if (bf16) { /* equal slices of at most BF16_KC */
        int slices = (K + BF16_KC - 1) / BF16_KC;
        k_slice = ((K + slices - 1) / slices + 31) / 32 * 32;
    } else {
        /* With few rows or columns, slices of K longer than FP32_KC_CAPACITY
         * (as long as the packed blocks hold, up to 4 times) give each pass of
         * the threads more work */
        int rows_packed = a_in_place ? mr : ((M < GEMM_MC ? M : GEMM_MC) + mr - 1) / mr * mr;
        int cols_packed = ((N < GEMM_NC ? N : GEMM_NC) + nr - 1) / nr * nr;
        int k_scale = GEMM_MC / rows_packed < GEMM_NC / cols_packed ? GEMM_MC / rows_packed
                                                                    : GEMM_NC / cols_packed;
        k_slice = K <= GEMM_K_WHOLE ? K : FP32_KC_CAPACITY * (k_scale > 4 ? 4 : k_scale);
    }
    /* of the packed buffers, at GEMM_MC rows and GEMM_NC columns */
    int kc_capacity = bf16 ? BF16_KC : FP32_KC_CAPACITY;
    /* blocks as large as the packed buffers hold at this slice (its length
     * rounded up to the bf16 kernel's K step of 32); A read in place packs
     * one ragged panel at most */
    int k_alloc = (k_slice + 31) / 32 * 32;
    int mc_block = a_in_place ? GEMM_MC : GEMM_MC * kc_capacity / k_alloc / mr * mr;
    int nc_block = kc_capacity * GEMM_NC / k_alloc / nr * nr;
    mc_block = mc_block < GEMM_MC ? mc_block : GEMM_MC;
    nc_block = nc_block < GEMM_NC ? nc_block : GEMM_NC;
    return (GemmPlan){mr, nr, task_rows, a_in_place, k_slice, mc_block, nc_block};
}

/* One block of a product, as its two kernels (packing, and the tiles of a
 * task) see it: rows m0 .. m0+mc-1 and columns n0 .. n0+nc-1 of C, the
 * slice k0 .. k0+kc-1 of K (kc32: kc rounded up to bf16's step of 32) */
typedef struct {
    int M, N, accumulate, bf16;
    const float *a, *b, *bias;
    size_t a_row, a_col, b_row, b_col;
    float *c;
    GemmPlan plan;
    int m0, n0, k0, mc, nc, kc, kc32;
    int a_panels, a_packed_from, a_packs; /* A's panels; those read in place come first */
    const float *init; /* where the first slice starts: the bias, zeros, or NULL (C itself) */
} GemmBlock;

/* Panel q of the block into the packed buffers: A's panels to pack first, then B's */
KERNEL(gemm_pack, (const GemmBlock *g, int q), (g, q)) {
    int mr = g->plan.mr, nr = g->plan.nr;
    /* slot: the panel's place in the packed block (A's from a_packed_from) */
    int is_b = q >= g->a_packs, slot = is_b ? q - g->a_packs : q,
        p = is_b ? slot : g->a_packed_from + q;
    int r0 = (is_b ? g->n0 : g->m0) + p * (is_b ? nr : mr), end = is_b ? g->N : g->M;
    int rows = end - r0 < (is_b ? nr : mr) ? end - r0 : (is_b ? nr : mr);
    const float *x = is_b ? g->b + g->k0 * g->b_row + r0 * g->b_col
                          : g->a + r0 * g->a_row + g->k0 * g->a_col;
    size_t r_stride = is_b ? g->b_col : g->a_row, k_stride = is_b ? g->b_row : g->a_col;
    if (g->bf16)
        pack_panel_bf16((is_b ? gemm_bf16_b : gemm_bf16_a) + (size_t)slot * BF16_TILE * g->kc32, x,
                        r_stride, k_stride, rows, g->kc, is_b);
    else
        pack_panel((is_b ? gemm_packed_b : gemm_packed_a) + (size_t)slot * (is_b ? nr : mr) * g->kc,
                   x, r_stride, k_stride, rows, g->kc, is_b ? nr : mr);
}

/* The tiles of task (down, across): a strip of task_rows rows of the block
 * against its column panel `across` */
KERNEL(gemm_task, (const GemmBlock *g, int down, int across), (g, down, across)) {
    int mr = g->plan.mr, nr = g->plan.nr, kc = g->kc, kc32 = g->kc32, N = g->N;
    int j0 = across * nr, cols = g->nc - j0 < nr ? g->nc - j0 : nr;
    const float *tile_init = g->init ? g->init + j0 : NULL;
    int p1 = (down + 1) * g->plan.task_rows / mr;
    for (int p = down * g->plan.task_rows / mr; p < p1 && p < g->a_panels; p++) {
        int i0 = p * mr, rows = g->mc - i0 < mr ? g->mc - i0 : mr;
        float *ct = g->c + (size_t)(g->m0 + i0) * N + g->n0 + j0;
        if (g->bf16) {
            gemm_block_bf16(kc32, gemm_bf16_a + (size_t)p * BF16_TILE * kc32,
                            gemm_bf16_b + (size_t)across * BF16_TILE * kc32, ct, N, tile_init,
                            rows, cols);
            continue;
        }
        int in_place = p < g->a_packed_from;
        const float *ap = in_place ? g->a + (g->m0 + i0) * g->a_row + g->k0 * g->a_col
                                   : gemm_packed_a + (size_t)(p - g->a_packed_from) * mr * kc;
        size_t ar = in_place ? g->a_row : 1, ac = in_place ? g->a_col : (size_t)mr;
        gemm_block(kc, ap, ar, ac, gemm_packed_b + (size_t)across * nr * kc, ct, N, tile_init,
                   rows, cols);
    }
}

/* C[M, N] = start + A B (mlkv.h states the strides): the packing of each
 * block of A and B, then the micro-kernel over its tiles, both shared out
 * among the threads. */
void gemm(int M, int N, int K, const float *a, size_t a_row, size_t a_col, const float *b,
          size_t b_row, size_t b_col, float *c, int accumulate, const float *bias) {
    int bf16 = gemm_precision == PRECISION_BF16;
    if (!bf16 && M <= THIN_ROWS && a_col == 1 && b_row == 1) {
        gemm_thin(M, N, K, a, a_row, b, b_col, c, accumulate, bias);
        return;
    }
    GemmPlan plan = gemm_plan(M, N, K, a_col, bf16);
    int mr = plan.mr, nr = plan.nr, task_rows = plan.task_rows;
    /* one parallel region for the whole product: every thread walks the same
     * blocks, and the implicit barriers of the two loops keep packing and
     * multiplying apart */
PARALLEL_REGION
    {
        if (bf16 && gemm_bf16_kernel == BF16_AMX) amx_configure();
        for (int m0 = 0; m0 < M; m0 += plan.mc_block)
            for (int n0 = 0; n0 < N; n0 += plan.nc_block)
                for (int k0 = 0; k0 < K; k0 += plan.k_slice) {
                    GemmBlock g = {M, N, accumulate, bf16, a, b, bias, a_row, a_col, b_row, b_col,
                                   c, plan, m0, n0, k0, 0, 0, 0, 0, 0, 0, 0, NULL};
                    g.mc = M - m0 < plan.mc_block ? M - m0 : plan.mc_block;
                    g.nc = N - n0 < plan.nc_block ? N - n0 : plan.nc_block;
                    g.kc = K - k0 < plan.k_slice ? K - k0 : plan.k_slice;
                    g.kc32 = (g.kc + 31) / 32 * 32;
                    g.a_panels = (g.mc + mr - 1) / mr;
                    g.a_packed_from = plan.a_in_place ? g.mc / mr : 0;
                    g.a_packs = g.a_panels - g.a_packed_from;
                    /* the first slice of K starts from the bias (or zero) unless C accumulates */
                    g.init = k0 > 0 || accumulate ? NULL : bias ? bias + n0 : zero_row;
                    int b_panels = (g.nc + nr - 1) / nr,
                        tasks_down = (g.mc + task_rows - 1) / task_rows;
                    /* AMX finishes a tile in a fraction of a microsecond: a
                     * thread takes a whole row of them at a time */
                    int tiles_per_grab = bf16 ? b_panels : 1;
                    (void)tiles_per_grab; /* unused without OpenMP */
OMP_FOR
                    for (int q = 0; q < g.a_packs + b_panels; q++) gemm_pack(&g, q);
OMP_FOR_2(tiles_per_grab)
                    for (int down = 0; down < tasks_down; down++)
                        for (int across = 0; across < b_panels; across++)
                            gemm_task(&g, down, across);
                }
        if (bf16 && gemm_bf16_kernel == BF16_AMX) amx_release();
    }
}

/* --- matmul: a Linear layer in PyTorch's layout, on top of gemm.
 * Forward: out[N, OC] = inp[N, IC] @ weight[OC, IC]^T + bias[OC] */
static void matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                           int N, int IC, int OC) {
    gemm(N, OC, IC, inp, IC, 1, weight, 1, IC, out, 0, bias);
}

/* dinp[N, IC] += dout[N, OC] @ weight[OC, IC]   (skipped when dinp is NULL)
 * dweight[OC, IC] += dout^T @ inp (skipped when NULL: a frozen weight),
 * dbias[OC] += sum_n dout[n, :] */
static void matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                            const float *inp, const float *weight, int N, int IC, int OC) {
    if (dinp) gemm(N, IC, OC, dout, OC, 1, weight, IC, 1, dinp, 1, NULL);
    if (dweight) gemm(OC, IC, N, dout, 1, OC, inp, IC, 1, dweight, 1, NULL);
    if (!dbias) return;
PARALLEL_FOR
    for (int o0 = 0; o0 < OC; o0 += 64) { /* columns split across threads, rows summed in order */
        int o1 = o0 + 64 < OC ? o0 + 64 : OC;
        for (int n = 0; n < N; n++)
            for (int o = o0; o < o1; o++) dbias[o] += dout[(size_t)n * OC + o];
    }
}

/* --- LayerNorm over C channels: out = (x - mean) / sqrt(var + eps) * w + b.
 * stats[N, 2] keeps mean and 1/std for the backward pass. */
KERNEL(layernorm_forward_row,
       (float *out, float *stats, const float *inp, const float *w, const float *b, int C,
        double eps, int n),
       (out, stats, inp, w, b, C, eps, n)) { /* row n */
    const float *x = inp + (size_t)n * C;
    double mean = 0, var = 0;
    for (int i = 0; i < C; i++) mean += x[i];
    mean /= C;
    for (int i = 0; i < C; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= C;
    float m = (float)mean, rstd = (float)(1.0 / sqrt(var + eps));
    float *y = out + (size_t)n * C;
    for (int i = 0; i < C; i++) y[i] = (x[i] - m) * rstd * w[i] + b[i];
    stats[2 * n] = m;
    stats[2 * n + 1] = rstd;
}

static void layernorm_forward(float *out, float *stats, const float *inp, const float *w,
                              const float *b, int N, int C, double eps) {
PARALLEL_FOR
    for (int n = 0; n < N; n++) layernorm_forward_row(out, stats, inp, w, b, C, eps, n);
}

/* With xhat = (x - mean) * rstd and g = dout * w:
 *   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw += dout * xhat,  db += dout */
KERNEL(layernorm_backward_row,
       (float *dinp, const float *dout, const float *inp, const float *w, const float *stats, int C,
        int n),
       (dinp, dout, inp, w, stats, C, n)) { /* dx of row n */
    const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
    float m = stats[2 * n], rstd = stats[2 * n + 1];
    double mean_g = 0, mean_gx = 0;
    for (int i = 0; i < C; i++) {
        float g = dy[i] * w[i];
        mean_g += g;
        mean_gx += g * (x[i] - m) * rstd;
    }
    mean_g /= C;
    mean_gx /= C;
    float *dx = dinp + (size_t)n * C;
    for (int i = 0; i < C; i++) {
        float xhat = (x[i] - m) * rstd;
        dx[i] += rstd * (dy[i] * w[i] - (float)mean_g - xhat * (float)mean_gx);
    }
}

/* dw and db of channels i0 .. i1-1, the rows summed in order */
KERNEL(layernorm_backward_params,
       (float *dw, float *db, const float *dout, const float *inp, const float *stats, int N, int C,
        int i0, int i1),
       (dw, db, dout, inp, stats, N, C, i0, i1)) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
        float m = stats[2 * n], rstd = stats[2 * n + 1];
        for (int i = i0; i < i1; i++) {
            dw[i] += dy[i] * (x[i] - m) * rstd;
            db[i] += dy[i];
        }
    }
}

static void layernorm_backward(float *dinp, float *dw, float *db, const float *dout,
                               const float *inp, const float *w, const float *stats, int N, int C) {
PARALLEL_FOR
    for (int n = 0; n < N; n++) layernorm_backward_row(dinp, dout, inp, w, stats, C, n);
    /* parameter gradients: channels split across threads */
PARALLEL_FOR
    for (int i0 = 0; i0 < C; i0 += 64)
        layernorm_backward_params(dw, db, dout, inp, stats, N, C, i0, i0 + 64 < C ? i0 + 64 : C);
}

/* --- GELU, the erf form (hidden_act "gelu"): x * Phi(x), Phi the standard
 * normal CDF. Phi(x) = (1 + erf(x / sqrt 2)) / 2 with Abramowitz & Stegun's
 * 7.1.26 for erf (absolute error below 1.5e-7, as good as float's rounding):
 * erf(|z|) = 1 - q, q = t (a1 + t (a2 + ... a5)) exp(-z^2), t = 1 / (1 + p|z|).
 * Phi is formed from q directly in both tails, so nothing cancels, and with
 * exp_fast the loops vectorize (libm's erff would not). */
KERNEL_INLINE float normal_cdf(float x) {
    float z = fabsf(x) * (float)INV_SQRT2, t = 1.0f / (1.0f + 0.3275911f * z);
    float poly = 1.061405429f; /* a5, then a4 + t poly ... a1 + t poly (Horner) */
    poly = -1.453152027f + t * poly;
    poly = 1.421413741f + t * poly;
    poly = -0.284496736f + t * poly;
    poly = 0.254829592f + t * poly;
    float q = t * poly * exp_fast(-z * z);
    return x >= 0.0f ? 1.0f - 0.5f * q : 0.5f * q;
}

/* Elementwise kernels run over spans of SPAN numbers, one task each */
#define SPAN 4096
#define SPANS(n) (((n) + SPAN - 1) / SPAN)
#define SPAN_END(i, n) ((i + 1) * SPAN < (n) ? (i + 1) * SPAN : (n))

KERNEL(gelu_forward_span, (float *out, const float *inp, size_t i0, size_t i1),
       (out, inp, i0, i1)) {
    for (size_t i = i0; i < i1; i++) out[i] = inp[i] * normal_cdf(inp[i]);
}

static void gelu_forward(float *out, const float *inp, size_t n) {
PARALLEL_FOR
    for (size_t s = 0; s < SPANS(n); s++) gelu_forward_span(out, inp, s * SPAN, SPAN_END(s, n));
}

/* d/dx x Phi(x) = Phi(x) + x phi(x); in place on the incoming gradient */
KERNEL(gelu_backward_span, (float *dinout, const float *inp, size_t i0, size_t i1),
       (dinout, inp, i0, i1)) {
    for (size_t i = i0; i < i1; i++) {
        float x = inp[i];
        dinout[i] *= normal_cdf(x) + x * exp_fast(-0.5f * x * x) * (float)INV_SQRT_2PI;
    }
}

static void gelu_backward(float *dinout, const float *inp, size_t n) {
PARALLEL_FOR
    for (size_t s = 0; s < SPANS(n); s++) gelu_backward_span(dinout, inp, s * SPAN, SPAN_END(s, n));
}

/* --- Rotary position embedding, GPT-NeoX "rotate_half" on the first rd dims
 * of each head: pair j is (x[j], x[j + rd/2]), rotated by pos * inv_freq[j],
 * inv_freq[j] = base^(-2j/rd). Angles are computed in float as PyTorch does,
 * so long positions round the same way. */
static void rotary_tables(float *cos_t, float *sin_t, int T, int rd, double base) {
    int half = rd / 2;
    for (int j = 0; j < half; j++) {
        float inv_freq = (float)(1.0 / (double)powf((float)base, (float)(2 * j) / (float)rd));
        for (int t = 0; t < T; t++) {
            float angle = (float)t * inv_freq;
            cos_t[t * half + j] = (float)cos((double)angle);
            sin_t[t * half + j] = (float)sin((double)angle);
        }
    }
}

/* One head's vector v rotated in place by the angles whose cosines and sines
 * are c, s [half]. sign +1 is the forward rotation; sign -1 rotates back,
 * which is the backward pass (a rotation's transpose is its inverse). */
KERNEL_INLINE void rotate_head(float *v, const float *c, const float *s, int half, float sign) {
    for (int j = 0; j < half; j++) {
        float x1 = v[j], x2 = v[j + half], sj = sign * s[j];
        v[j] = x1 * c[j] - x2 * sj;
        v[j + half] = x2 * c[j] + x1 * sj;
    }
}

/* x [B, T, nh, hs] rotated in place, row t at position t of the tables. */
static void rotary_apply(float *x, const float *cos_t, const float *sin_t, int B, int T, int nh,
                         int hs, int rd, float sign) {
    int half = rd / 2;
    if (half == 0) return;
PARALLEL_FOR
    for (int bt = 0; bt < B * T; bt++) {
        int t = bt % T;
        for (int h = 0; h < nh; h++)
            rotate_head(x + ((size_t)bt * nh + h) * hs, cos_t + (size_t)t * half,
                        sin_t + (size_t)t * half, half, sign);
    }
}

/* --- MLKV attention. Query head h reads K/V head h / (H / kvH) (GQA groups);
 * k and v are whichever owning layer's tensors this layer reads (MLKV).
 *   q [B, T, H*hs], k, v [B, T, kvH*hs]  ->  out [B, T, H*hs], lse [B, H, T]
 *
 * Computed as FlashAttention does, in tiles: a block of ATT_QB queries of one
 * head against blocks of ATT_KB keys. A tile's two products (the scores
 * q k^T, and p v) are micro-kernel calls, exactly as in the GEMM; the softmax
 * is kept online per query (running max m and sum l; when a block raises the
 * max, what was summed so far is rescaled by exp(m_old - m_new)), so no
 * [T, T] matrix is ever stored: the backward pass recomputes the
 * probabilities from each row's saved log-sum-exp, and memory is linear in T.
 * Key blocks start at multiples of ATT_KB and no query's arithmetic depends
 * on the other rows of its block, so a decoding step (one query over the KV
 * cache) computes the same bits as the full forward pass.
 * The operands that a product needs transposed (keys for q k^T; in the
 * backward pass also values, queries and output gradients) are packed once
 * per layer into panels of ATT_KB rows, [hs, ATT_KB] each ("head panels");
 * the others are read in place. */
/* queries per block: the micro-kernel's rows */
#define ATT_QB GEMM_MR
/* keys per block: two of the AVX-512 kernel's column panels (four of
 * AVX2's), so that the p v product sums over 64 keys per call (measured: one
 * panel, 32 keys, spent about a third of that product loading and storing
 * its accumulators). The same on every instruction set, and so are the
 * sizes below: the scratch a model allocates fits whichever runs. */
#define ATT_KB 64
/* hs rounded up to whole panels of either kernel; T rounded up to whole key blocks */
#define HEAD_WIDTH(hs) ((hs + GEMM_NR_MAX - 1) / GEMM_NR_MAX * GEMM_NR_MAX)
#define PADDED_T(T) ((T + ATT_KB - 1) / ATT_KB * ATT_KB)

/* The rows x [T, hs] (row stride `stride`) of one head as head panels:
 * dst [PADDED_T(T) / ATT_KB][hs][ATT_KB], zero past T. With cos_t / sin_t
 * each row is first rotated by its position (the reference-compatible KV
 * cache holds un-rotated keys). */
KERNEL_INLINE void pack_head_panels(float *dst, const float *x, size_t stride, int T, int hs,
                                    const float *cos_t, const float *sin_t, int half) {
    for (int s0 = 0; s0 < T; s0 += ATT_KB) {
        int rows = T - s0 < ATT_KB ? T - s0 : ATT_KB;
        float *panel = dst + (size_t)s0 * hs;
        pack_panel(panel, x + s0 * stride, stride, 1, rows, hs, ATT_KB);
        for (int r = 0; cos_t && r < rows; r++) { /* rotate column r of the panel */
            float rotated[MAX_HEAD_SIZE];
            for (int d = 0; d < hs; d++) rotated[d] = panel[d * ATT_KB + r];
            rotate_head(rotated, cos_t + (size_t)(s0 + r) * half, sin_t + (size_t)(s0 + r) * half,
                        half, 1.0f);
            for (int d = 0; d < hs; d++) panel[d * ATT_KB + r] = rotated[d];
        }
    }
}

/* Head bh (sequence bh / nh, head bh % nh) of x [B, T, nh*hs] as head
 * panels, into dst [B, nh, PADDED_T(T) * hs] */
KERNEL(pack_head, (float *dst, const float *x, int T, int nh, int hs, int bh),
       (dst, x, T, nh, hs, bh)) {
    pack_head_panels(dst + (size_t)bh * PADDED_T(T) * hs,
                     x + (size_t)bh / nh * T * nh * hs + (size_t)(bh % nh) * hs, (size_t)nh * hs,
                     T, hs, NULL, NULL, 0);
}

/* Every head of x [B, T, nh*hs] as head panels: dst [B, nh, PADDED_T(T) * hs]. */
static void pack_heads(float *dst, const float *x, int B, int T, int nh, int hs) {
PARALLEL_FOR
    for (int bh = 0; bh < B * nh; bh++) pack_head(dst, x, T, nh, hs, bh);
}

/* acc[ATT_QB, HEAD_WIDTH(hs)] += W[ATT_QB, kc] times the rows x[0 .. kc)
 * (row stride `stride`, hs columns), where W(i, s) = w[i * w_row + s * w_col]
 * (a tile of p or ds, or one read transposed): the probability- (or
 * gradient-) weighted sum of value, key or query rows.
 * Whole panels of columns are read in place, and so is a last half panel
 * (heads of 16 where GEMM_NR is 32: padded to 32 they spent half the FMAs
 * on zeros, and training make demo's model ran 1.2 times slower, measured
 * old and new side by side); another ragged last panel goes through a zero-padded copy. */
KERNEL_INLINE void weighted_rows(float *acc, const float *w, size_t w_row, size_t w_col,
                                 const float *x, size_t stride, int kc, int hs) {
    for (int d0 = 0; d0 < hs; d0 += GEMM_NR) {
        if (hs - d0 >= GEMM_NR) {
            gemm_kernel(kc, w, w_row, w_col, x + d0, stride, acc + d0, HEAD_WIDTH(hs), NULL, 0);
        } else if (hs - d0 == GEMM_NR / 2) {
            gemm_kernel(kc, w, w_row, w_col, x + d0, stride, acc + d0, HEAD_WIDTH(hs), NULL, 1);
        } else {
            float panel[ATT_KB * GEMM_NR_MAX];
            pack_panel(panel, x + d0, 1, stride, hs - d0, kc, GEMM_NR);
            gemm_kernel(kc, w, w_row, w_col, panel, GEMM_NR, acc + d0, HEAD_WIDTH(hs), NULL, 0);
        }
    }
}

/* s[ATT_QB, ATT_KB] = A^T B over hs: a [hs, ATT_QB] (a packed panel of
 * ATT_QB rows), b [hs, ATT_KB] (a head panel): scores, or their gradient */
KERNEL_INLINE void tile_product(float *s, const float *a, const float *b, int hs) {
    for (int j0 = 0; j0 < ATT_KB; j0 += GEMM_NR)
        gemm_kernel(hs, a, 1, ATT_QB, b + j0, ATT_KB, s + j0, ATT_KB, zero_row, 0);
}

/* The largest of x[0..n), and a softmax row's sum, over REDUCE_LANES
 * fixed lanes (the order is the code's, not the compiler's: loops vectorize
 * and the bits do not depend on the vector width). The lanes are folded in
 * halves, a tree of 4 steps: a chain of 16 scalar steps made every row of an
 * attention tile wait about 64 cycles (measured with perf on make bench's
 * attention table). A sum stays in its lanes until the last block of keys:
 * folded once per row, not once per block (the forward pass 1.04-1.05 times
 * as fast, dev/ab.sh HEAD ATTENTION, 30 pairs at 8 x 256 and 1 x 2048). */
#define REDUCE_LANES 16
KERNEL_INLINE float fold_max(float *lane) {
    for (int w = REDUCE_LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++) lane[j] = lane[j + w] > lane[j] ? lane[j + w] : lane[j];
    return lane[0];
}

KERNEL_INLINE float fold_sum(float *lane) {
    for (int w = REDUCE_LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++) lane[j] += lane[j + w];
    return lane[0];
}

KERNEL_INLINE float row_max(const float *x, int n) {
    float lane[REDUCE_LANES];
    int i, whole = n / REDUCE_LANES * REDUCE_LANES;
    for (int j = 0; j < REDUCE_LANES; j++) lane[j] = -INFINITY;
    for (i = 0; i < whole; i += REDUCE_LANES)
        for (int j = 0; j < REDUCE_LANES; j++) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
    float max = fold_max(lane);
    for (; i < n; i++) max = x[i] > max ? x[i] : max;
    return max;
}

/* Keys of one head for attention_block_forward: their head panels (packed
 * once for many query blocks), or rows k (row stride `stride`) packed block
 * by block as they are needed (a decoding step reads each key once), rotated
 * on the way when cos_t / sin_t are given. */
typedef struct {
    const float *panels, *k, *cos_t, *sin_t;
    size_t stride;
    int half;
} KeySource;

/* A block of queries (forward) or keys (backward) is ATT_TILES micro-tiles of
 * ATT_QB rows. Each block of ATT_KB keys (or queries) is loaded once per
 * task and serves all its tiles from the L1 cache: with one tile per task,
 * every 12 queries streamed all of a head's keys and values through the
 * caches, and the products waited on those loads (measured with make bench's
 * attention table: about 0.3 of the FMA peak). The tiles' state lives on the
 * thread's stack, sized by the head (variable-length arrays): for heads of
 * 64, 46 KiB in the forward pass and 77 KiB in the backward, so that it fits
 * the smallest default thread stacks (musl's 128 KiB); 221 KiB in the
 * backward at MAX_HEAD_SIZE. */
#define ATT_TILES 4
#define ATT_ROWS (ATT_TILES * ATT_QB)

/* The rows of tile u of a block of `rows` (the last tile may be short) */
KERNEL_INLINE int tile_rows(int rows, int u) {
    return rows - u * ATT_QB < ATT_QB ? rows - u * ATT_QB : ATT_QB;
}

/* The `rows` (at most ATT_ROWS) queries q (row stride q_stride) of one head
 * at positions pos0 .. pos0+rows-1, each over the keys at positions 0 .. its
 * own (causal); values v (row stride v_stride). out = softmax(q k^T * scale) v,
 * lse = the log-sum-exp of each row's scores. */
KERNEL(attention_block_forward,
       (float *out, float *lse, const float *q, size_t q_stride, int rows, int pos0,
        const KeySource *keys_from, const float *v, size_t v_stride, int hs, float scale),
       (out, lse, q, q_stride, rows, pos0, keys_from, v, v_stride, hs, scale)) {
    int width = HEAD_WIDTH(hs), tiles = (rows + ATT_QB - 1) / ATT_QB;
    float qp[ATT_TILES][hs * ATT_QB], kp[hs * ATT_KB], s[ATT_QB * ATT_KB];
    /* l: each row's sum in lanes */
    float o[ATT_TILES][ATT_QB * width], m[ATT_ROWS], l[ATT_ROWS][REDUCE_LANES];
    for (int u = 0; u < tiles; u++) {
        pack_panel(qp[u], q + (size_t)u * ATT_QB * q_stride, q_stride, 1, tile_rows(rows, u), hs,
                   ATT_QB);
        scale_floats(qp[u], scale, hs * ATT_QB); /* the scores' factor, applied once to q */
        memset(o[u], 0, sizeof(float) * ATT_QB * width);
    }
    for (int i = 0; i < ATT_ROWS; i++) {
        m[i] = -INFINITY;
        for (int j = 0; j < REDUCE_LANES; j++) l[i][j] = 0.0f;
    }
    for (int s0 = 0; s0 < pos0 + rows; s0 += ATT_KB) {
        int half = keys_from->half,
            block_keys = pos0 + rows - s0 < ATT_KB ? pos0 + rows - s0 : ATT_KB;
        const float *panel = keys_from->panels ? keys_from->panels + (size_t)s0 * hs : kp;
        if (!keys_from->panels)
            pack_head_panels(kp, keys_from->k + s0 * keys_from->stride, keys_from->stride,
                             block_keys, hs,
                             keys_from->cos_t ? keys_from->cos_t + (size_t)s0 * half : NULL,
                             keys_from->sin_t ? keys_from->sin_t + (size_t)s0 * half : NULL, half);
        for (int u = 0; u < tiles; u++) {
            int tile_pos0 = pos0 + u * ATT_QB, count = tile_pos0 + tile_rows(rows, u);
            if (s0 >= count) continue; /* the tile's queries see none of these keys */
            int keys = count - s0 < ATT_KB ? count - s0 : ATT_KB;
            tile_product(s, qp[u], panel, hs); /* s = scale q k^T */
            for (int i = 0; i < ATT_QB; i++) { /* s becomes p, row by row */
                float *si = s + i * ATT_KB, *mi = m + u * ATT_QB + i, *li = l[u * ATT_QB + i];
                int visible = tile_pos0 + i - s0 + 1; /* keys s0 .. tile_pos0+i of this block */
                visible = visible < keys ? visible : keys;
                /* (every loop below computes all ATT_KB columns and then selects:
                 * no conditional loads, so the compiler vectorizes them; a row
                 * that sees the whole block skips the mask) */
                if (visible < ATT_KB)
                    for (int j = 0; j < ATT_KB; j++) si[j] = j < visible ? si[j] : -INFINITY;
                float max = row_max(si, ATT_KB);
                max = max > *mi ? max : *mi;
                /* rescale what was summed under the old max */
                float correction = exp_fast(*mi - max);
                for (int j = 0; j < ATT_KB; j++) {
                    float p = exp_fast(si[j] - max);
                    si[j] = j < visible ? p : 0.0f;
                }
                for (int j = 0; j < REDUCE_LANES; j++) li[j] *= correction;
                for (int j0 = 0; j0 < ATT_KB; j0 += REDUCE_LANES)
                    for (int j = 0; j < REDUCE_LANES; j++) li[j] += si[j0 + j];
                *mi = max;
                if (correction != 1.0f)
                    for (int d = 0; d < width; d++) o[u][i * width + d] *= correction;
            }
            weighted_rows(o[u], s, ATT_KB, 1, v + s0 * v_stride, v_stride, keys, hs); /* o += p v */
        }
    }
    for (int i = 0; i < rows; i++) {
        float sum = fold_sum(l[i]);
        for (int d = 0; d < hs; d++)
            out[i * q_stride + d] = o[i / ATT_QB][i % ATT_QB * width + d] / sum;
        lse[i] = m[i] + logf(sum);
    }
}

/* panels: [B, kvH, PADDED_T(T) * hs] scratch for the keys' head panels */
void attention_forward(float *out, float *lse, float *panels, const float *q, const float *k,
                       const float *v, AttentionShape shape) {
    int B = shape.B, T = shape.T, H = shape.H, kvH = shape.kvH, hs = shape.hs;
    int group = H / kvH, blocks = (T + ATT_ROWS - 1) / ATT_ROWS;
    float scale = 1.0f / sqrtf((float)hs);
    pack_heads(panels, k, B, T, kvH, hs);
PARALLEL_FOR_CYCLIC /* later query blocks see more keys: deal the tasks out in turn */
    for (int task = 0; task < B * H * blocks; task++) {
        int b = task / (H * blocks), h = task / blocks % H, t0 = task % blocks * ATT_ROWS;
        int rows = T - t0 < ATT_ROWS ? T - t0 : ATT_ROWS, kvh = b * kvH + h / group;
        size_t row = ((size_t)b * T + t0) * H + h, kv = ((size_t)b * T * kvH + h / group) * hs;
        KeySource keys = {panels + (size_t)kvh * PADDED_T(T) * hs, NULL, NULL, NULL, 0, 0};
        attention_block_forward(out + row * hs, lse + ((size_t)b * H + h) * T + t0, q + row * hs,
                                (size_t)H * hs, rows, t0, &keys, v + kv, (size_t)kvH * hs, hs,
                                scale);
    }
}

/* The backward pass. With p = softmax row, dp_s = dout . v_s and
 * D = dout . out = sum_s p_s dp_s:
 *   ds_s = p_s (dp_s - D),  dq = scale sum_s ds_s k_s,  dk_s += scale ds_s q,
 *   dv_s += p_s dout.
 * One pass over blocks of keys (FlashAttention-2's order): a block's tiles
 * of scores and dp (recomputed from the saved log-sum-exp) serve all three
 * gradients, five products per tile where a pass for dq and another for
 * dk, dv took seven (the second recomputed both). dk and dv of a block of
 * keys belong to one task; dq sums over every block of keys, so a task adds
 * into its own partial dq, and a last pass sums the partials in order
 * (never two threads into one number, and the same bits on any number of
 * threads). A task is a chunk of ATT_CHUNK keys of one query head: its
 * partial covers the queries from the chunk's first on (a query sees no
 * later key), [PADDED_T(T) / ATT_KB - first block][DQ_ROWS][HEAD_WIDTH(hs)]
 * floats, query blocks padded to DQ_ROWS rows so that the micro-kernel's
 * rows cover them (the padding rows are never read). dk and dv go to one
 * buffer per query head, summed over each K/V head's group at the end
 * (the heads of a group share a K/V head: two tasks may not add into it). */
/* keys per task: 8 blocks of 48 keys, or 16 of 24 (a multiple of ATT_ROWS,
 * whole blocks of keys, and of ATT_KB) */
#define ATT_CHUNK 384
/* a block of queries in micro-kernel rows (a multiple of 6 and of 12) */
#define DQ_ROWS 72

/* Query blocks of the partial dq of chunks 0 .. chunk-1 of one head: the
 * offset of chunk's partial, in blocks. Chunk c's partial has n - c m
 * blocks (n query blocks in all, m per chunk), so the first `chunk` hold
 * chunk n - m chunk (chunk - 1) / 2. */
static size_t dq_partial_blocks(int T, int chunk) {
    size_t n = (size_t)PADDED_T(T) / ATT_KB, m = ATT_CHUNK / ATT_KB, c = (size_t)chunk;
    return c * n - m * c * (c - 1) / 2;
}

size_t attention_panel_floats(AttentionShape shape, int backward) {
    int B = shape.B, T = shape.T, H = shape.H, kvH = shape.kvH, hs = shape.hs;
    size_t head = (size_t)PADDED_T(T) * hs, heads = (size_t)B * H;
    if (!backward) return (size_t)B * kvH * head; /* the keys' head panels */
    /* queries' and output gradients' head panels, dk and dv per query head, partial dq */
    size_t partial =
        dq_partial_blocks(T, (T + ATT_CHUNK - 1) / ATT_CHUNK) * DQ_ROWS * HEAD_WIDTH(hs);
    return heads * (2 * head + 2 * (size_t)T * hs + partial);
}

/* The T queries of one head for attention_block_backward: rows of q and
 * dout (row stride `stride`), the same as head panels, and each query's lse
 * and delta. */
typedef struct {
    const float *q, *dout, *q_panels, *dout_panels, *lse, *delta;
    size_t stride;
    int T;
} QueryRows;

/* n keys at positions s0 .. s0+n-1 (at most ATT_ROWS): rows of k and v, row
 * stride `stride` */
typedef struct {
    const float *k, *v;
    size_t stride;
    int s0, n;
} KeyBlock;

/* The backward pass of a block of keys for the queries of one head at
 * positions s0 .. T-1 (the queries before s0 see none of these keys):
 * dk, dv [keys, hs] (row stride dkv_stride) are overwritten with this head's
 * share, dk without its factor `scale`; dq_partial [query blocks from s0's
 * on][DQ_ROWS][HEAD_WIDTH(hs)] += ds k, also without it (attention_backward
 * applies both). */
KERNEL(attention_block_backward,
       (float *dk, float *dv, size_t dkv_stride, float *dq_partial, const QueryRows *queries,
        const KeyBlock *block, int hs, float scale),
       (dk, dv, dkv_stride, dq_partial, queries, block, hs, scale)) {
    const float *q = queries->q, *dout = queries->dout, *lse = queries->lse;
    const float *q_panels = queries->q_panels, *dout_panels = queries->dout_panels;
    const float *delta = queries->delta, *k = block->k, *v = block->v;
    size_t q_stride = queries->stride, kv_stride = block->stride;
    int T = queries->T, s0 = block->s0, keys = block->n;
    int tiles = (keys + ATT_QB - 1) / ATT_QB, width = HEAD_WIDTH(hs), tile_acc = ATT_QB * width;
    float kp[ATT_TILES][hs * ATT_QB], vp[ATT_TILES][hs * ATT_QB], s[ATT_QB * ATT_KB];
    /* ds^T of the block's keys against one block of queries [key][query],
     * and ds [query][key] for the dq product, whose micro-tiles of rows are
     * queries: read from ds^T, each of the kernel's multipliers came from
     * one vector load, and gcc spread them with shuffles (the backward ran 3
     * times slower at heads of 16). ds has DQ_ROWS rows, the padded last
     * micro-tile's rows past ATT_KB staying zero. */
    float ds_t[ATT_ROWS * ATT_KB], ds[DQ_ROWS * ATT_ROWS], lse_j[ATT_KB], delta_j[ATT_KB];
    float dk_acc[ATT_ROWS * width], dv_acc[ATT_ROWS * width];
    memset(dk_acc, 0, sizeof(dk_acc));
    memset(dv_acc, 0, sizeof(dv_acc));
    memset(ds, 0, sizeof(ds));
    for (int u = 0; u < tiles; u++) {
        size_t first = (size_t)u * ATT_QB * kv_stride;
        pack_panel(kp[u], k + first, kv_stride, 1, tile_rows(keys, u), hs, ATT_QB);
        scale_floats(kp[u], scale, hs * ATT_QB);
        pack_panel(vp[u], v + first, kv_stride, 1, tile_rows(keys, u), hs, ATT_QB);
    }
    int first_block = s0 / ATT_KB;
    for (int t0 = first_block * ATT_KB; t0 < T; t0 += ATT_KB) {
        int queries = T - t0 < ATT_KB ? T - t0 : ATT_KB;
        for (int j = 0; j < ATT_KB; j++) { /* the statistics of queries t0 .., finite past T */
            lse_j[j] = j < queries ? lse[t0 + j] : 0.0f;
            delta_j[j] = j < queries ? delta[t0 + j] : 0.0f;
        }
        for (int u = 0; u < tiles; u++) {
            int n = tile_rows(keys, u), tile_s0 = s0 + u * ATT_QB;
            float *dsu = ds_t + u * ATT_QB * ATT_KB;
            if (t0 < tile_s0 / ATT_KB * ATT_KB) {
                /* all these queries come before the tile's keys */
                memset(dsu, 0, sizeof(float) * ATT_QB * ATT_KB);
                continue;
            }
            tile_product(s, kp[u], q_panels + (size_t)t0 * hs, hs);     /* scores^T */
            tile_product(dsu, vp[u], dout_panels + (size_t)t0 * hs, hs); /* dp^T */
            for (int i = 0; i < ATT_QB; i++) {
                /* rows: keys tile_s0+i; s becomes p^T and dp^T becomes ds^T */
                int first = tile_s0 + i - t0; /* queries t0+j with j >= first see key tile_s0+i */
                first = i < n ? (first > 0 ? first : 0) : ATT_KB;
                float *si = s + i * ATT_KB, *dsi = dsu + i * ATT_KB;
                for (int j = 0; j < ATT_KB; j++) {
                    int visible = j >= first && j < queries;
                    float p = exp_fast(si[j] - lse_j[j]), ds_ij = p * (dsi[j] - delta_j[j]);
                    si[j] = visible ? p : 0.0f;
                    dsi[j] = visible ? ds_ij : 0.0f;
                }
            }
            /* dv += p dout */
            weighted_rows(dv_acc + u * tile_acc, s, ATT_KB, 1, dout + t0 * q_stride, q_stride,
                          queries, hs);
            /* dk += ds q */
            weighted_rows(dk_acc + u * tile_acc, dsu, ATT_KB, 1, q + t0 * q_stride, q_stride,
                          queries, hs);
        }
        /* dq of these queries += ds k: rows are queries, the sum runs over the block's keys
         * (those of its tiles: the rest of ds_t is never written, and never read) */
        for (int i = 0; i < tiles * ATT_QB; i++)
            for (int j = 0; j < ATT_KB; j++) ds[j * ATT_ROWS + i] = ds_t[i * ATT_KB + j];
        float *dq_block = dq_partial + (size_t)(t0 / ATT_KB - first_block) * DQ_ROWS * width;
        for (int j0 = 0; j0 < DQ_ROWS; j0 += GEMM_MR)
            weighted_rows(dq_block + j0 * width, ds + j0 * ATT_ROWS, ATT_ROWS, 1, k, kv_stride,
                          keys, hs);
    }
    for (int i = 0; i < keys; i++)
        for (int d = 0; d < hs; d++) {
            dk[i * dkv_stride + d] = dk_acc[i * width + d];
            dv[i * dkv_stride + d] = dv_acc[i * width + d];
        }
}

/* panels: scratch of attention_panel_floats(shape, 1) floats:
 * head panels of queries and output gradients, dk and dv per query head
 * [B, T, H*hs] each, the partial dq of every chunk of keys */
void attention_backward(float *dq, float *dk, float *dv, float *delta, float *panels,
                        const float *dout, const float *q, const float *k, const float *v,
                        const float *out, const float *lse, AttentionShape shape) {
    int B = shape.B, T = shape.T, H = shape.H, kvH = shape.kvH, hs = shape.hs;
    int group = H / kvH, chunks = (T + ATT_CHUNK - 1) / ATT_CHUNK, width = HEAD_WIDTH(hs);
    float scale = 1.0f / sqrtf((float)hs);
    size_t q_stride = (size_t)H * hs, kv_stride = (size_t)kvH * hs, head = (size_t)PADDED_T(T) * hs;
    size_t partial_floats = dq_partial_blocks(T, chunks) * DQ_ROWS * width; /* one head's */
    float *q_panels = panels, *dout_panels = q_panels + B * H * head;
    float *dk_heads = dout_panels + B * H * head, *dv_heads = dk_heads + (size_t)B * T * q_stride;
    float *dq_partials = dv_heads + (size_t)B * T * q_stride;
    pack_heads(q_panels, q, B, T, H, hs);
    pack_heads(dout_panels, dout, B, T, H, hs);
    zero_floats(dq_partials, (size_t)B * H * partial_floats);
PARALLEL_FOR
    for (size_t row = 0; row < (size_t)B * T * H; row++) { /* D = dout . out, stored [B, H, T] */
        size_t b = row / ((size_t)T * H), t = row / H % T, h = row % H;
        float D = 0.0f;
        for (int d = 0; d < hs; d++) D += dout[row * hs + d] * out[row * hs + d];
        delta[(b * H + h) * T + t] = D;
    }
PARALLEL_FOR_CYCLIC /* the first chunks see the most queries: they go first */
    for (int task = 0; task < chunks * B * H; task++) {
        int c = task / (B * H), b = task / H % B, h = task % H;
        size_t qh = (size_t)b * T * q_stride + (size_t)h * hs, stat = ((size_t)b * H + h) * T;
        size_t kv = (size_t)b * T * kv_stride + (size_t)(h / group) * hs, bh = (size_t)b * H + h;
        float *partial =
            dq_partials + bh * partial_floats + dq_partial_blocks(T, c) * DQ_ROWS * width;
        QueryRows queries = {q + qh, dout + qh, q_panels + bh * head, dout_panels + bh * head,
                             lse + stat, delta + stat, q_stride, T};
        for (int s0 = c * ATT_CHUNK; s0 < T && s0 < (c + 1) * ATT_CHUNK; s0 += ATT_ROWS) {
            int keys = T - s0 < ATT_ROWS ? T - s0 : ATT_ROWS;
            size_t first = (size_t)(s0 / ATT_KB - c * ATT_CHUNK / ATT_KB) * DQ_ROWS * width;
            size_t at = s0 * q_stride;
            KeyBlock block = {k + kv + s0 * kv_stride, v + kv + s0 * kv_stride, kv_stride, s0,
                              keys};
            attention_block_backward(dk_heads + qh + at, dv_heads + qh + at, q_stride,
                                     partial + first, &queries, &block, hs, scale);
        }
    }
PARALLEL_FOR
    for (size_t row = 0; row < (size_t)B * T; row++) {
        /* sum the partials: dq, then dk and dv over each group */
        size_t b = row / T;
        int t = (int)(row % T);
        for (int h = 0; h < H; h++) {
            const float *partials = dq_partials + ((size_t)b * H + h) * partial_floats;
            float *dq_row = dq + row * q_stride + (size_t)h * hs;
            for (int d = 0; d < hs; d++) dq_row[d] = 0.0f;
            for (int c = 0; c * ATT_CHUNK <= t; c++) {
                size_t block =
                    dq_partial_blocks(T, c) + (size_t)(t / ATT_KB - c * ATT_CHUNK / ATT_KB);
                const float *p = partials + (block * DQ_ROWS + t % ATT_KB) * width;
                for (int d = 0; d < hs; d++) dq_row[d] += p[d];
            }
            for (int d = 0; d < hs; d++) dq_row[d] *= scale;
        }
        for (int g = 0; g < kvH; g++)
            for (int h = g * group; h < (g + 1) * group; h++)
                for (int d = 0; d < hs; d++) {
                    dk[row * kv_stride + (size_t)g * hs + d] +=
                        scale * dk_heads[row * q_stride + (size_t)h * hs + d];
                    dv[row * kv_stride + (size_t)g * hs + d] +=
                        dv_heads[row * q_stride + (size_t)h * hs + d];
                }
    }
}

/* Attention of n = shape.T new queries per sequence over a KV cache: query
 * i of sequence b sits at position pos0 + i and sees cached positions
 * 0 .. pos0+i (its own K/V were appended first). q, out [B, n, H*hs]; k, v
 * [B, kvH, max_T, hs]. With cos_t / sin_t the cached keys are rotated as they
 * are read (the reference-compatible mode caches them un-rotated). */
static void attention_cached(float *out, const float *q, const float *k, const float *v,
                             AttentionShape shape, int pos0, int max_T, const float *cos_t,
                             const float *sin_t, int rd) {
    int B = shape.B, n = shape.T, H = shape.H, kvH = shape.kvH, hs = shape.hs;
    int group = H / kvH, blocks = (n + ATT_ROWS - 1) / ATT_ROWS;
    float scale = 1.0f / sqrtf((float)hs);
PARALLEL_FOR_CYCLIC
    for (int task = 0; task < B * H * blocks; task++) {
        int b = task / (H * blocks), h = task / blocks % H, i0 = task % blocks * ATT_ROWS;
        int rows = n - i0 < ATT_ROWS ? n - i0 : ATT_ROWS;
        size_t row = ((size_t)b * n + i0) * H + h, kv = ((size_t)b * kvH + h / group) * max_T * hs;
        KeySource keys = {NULL, k + kv, cos_t, sin_t, (size_t)hs, rd / 2};
        float lse[ATT_ROWS];
        attention_block_forward(out + row * hs, lse, q + row * hs, (size_t)H * hs, rows, pos0 + i0,
                                &keys, v + kv, (size_t)hs, hs, scale);
    }
}

/* --- Cross-entropy of logits [N, V] against targets [N]:
 * lse[n] = logsumexp(logits[n]), losses[n] = lse[n] - logits[n, target].
 * Max and sum run in REDUCE_LANES interleaved partial results (a fixed order,
 * so the bits do not depend on the compiler's vector width) and vectorize. */
KERNEL(crossentropy_forward_row,
       (float *losses, float *lse, const float *logits, const int *targets, int V, int n),
       (losses, lse, logits, targets, V, n)) {
    const float *z = logits + (size_t)n * V;
    float lane[REDUCE_LANES], max = row_max(z, V);
    int i, whole = V / REDUCE_LANES * REDUCE_LANES;
    for (int j = 0; j < REDUCE_LANES; j++) lane[j] = 0.0f;
    for (i = 0; i < whole; i += REDUCE_LANES)
        for (int j = 0; j < REDUCE_LANES; j++) lane[j] += exp_fast(z[i + j] - max);
    double sum = 0;
    for (int j = 0; j < REDUCE_LANES; j++) sum += lane[j];
    for (; i < V; i++) sum += exp_fast(z[i] - max);
    lse[n] = (float)(max + log(sum));
    losses[n] = lse[n] - z[targets[n]];
}

static void crossentropy_forward(float *losses, float *lse, const float *logits, const int *targets,
                                 int N, int V) {
PARALLEL_FOR
    for (int n = 0; n < N; n++) crossentropy_forward_row(losses, lse, logits, targets, V, n);
}

/* dlogits = (softmax(logits) - onehot(target)) * dloss, in place over the logits */
KERNEL(crossentropy_backward_row,
       (float *logits, const float *lse, const int *targets, int V, float dloss, int n),
       (logits, lse, targets, V, dloss, n)) {
    float *z = logits + (size_t)n * V;
    for (int i = 0; i < V; i++) z[i] = exp_fast(z[i] - lse[n]) * dloss;
    z[targets[n]] -= dloss;
}

static void crossentropy_backward(float *logits, const float *lse, const int *targets, int N, int V,
                                  float dloss) {
PARALLEL_FOR
    for (int n = 0; n < N; n++) crossentropy_backward_row(logits, lse, targets, V, dloss, n);
}

static void add_into(float *y, const float *a, const float *b, size_t n) { /* y = a + b */
PARALLEL_FOR
    for (size_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}

/* ===========================================================================
 * 5. The model: buffers, forward, backward. Pythia is GPT-NeoX: a token
 *    embedding (no position embedding: rotary encodes positions inside
 *    attention), L layers, a final LayerNorm and an output head of its own
 *    (not tied to the embedding). A layer with the parallel residual
 *    (Pythia's) computes x + attention(ln1(x)) + mlp(ln2(x)); without it,
 *    mid = x + attention(ln1(x)), then mid + mlp(ln2(mid)). Its attention:
 *    q from its own ln1 (rotary applied); an owning layer also projects k and
 *    v from its own ln1 (rotary on k); every layer then attends with its q
 *    over its owner's k and v, and the dense projection follows. That is all
 *    MLKV changes: where k and v come from. forward_layers shows it in its
 *    loop (owner = kv_layer_of[l]), and the backward pass runs the layers top
 *    down, so that every reader has added its dK, dV into the owner's
 *    buffers before the owner takes them back into its projections (worked
 *    example in model_forward_backward). All activations sit in one
 *    allocation listed by buffer_specs; K and V are stored once per owner
 *    (kvL slots, not L), and the gradient scratch serves every layer in turn.
 * ======================================================================== */

/* Whether layer l attends over rotated keys. The owner always does; a layer
 * sharing the owner's K does too by default, or reads the owner's un-rotated
 * keys in the reference-compatible mode: the reference code hands an owner's
 * K to the layers above it before rotary is applied, so in a full-sequence
 * pass those layers match rotated queries against un-rotated keys. */
static int reads_rotated_keys(const Config *c, int l) {
    return c->kv_layer_of[l] == l || c->shared_key_rotary;
}

/* Whether any layer reads un-rotated keys, which must then be kept. */
static int reads_unrotated_keys(const Config *c) {
    for (int l = 0; l < c->n_layer; l++)
        if (!reads_rotated_keys(c, l)) return 1;
    return 0;
}

static AttentionShape attention_shape(const Config *c, int B, int T) {
    return (AttentionShape){B, T, c->n_head, c->n_kv_head, c->head_size};
}

typedef struct { const char *name; float **ptr; size_t floats; } BufferSpec;

/* Rows of logits training computes at once: [512, V] is 103 MB for Pythia's
 * vocabulary, against 412 MB for all of B*T = 2048, and 512 rows keep the
 * head's three GEMMs efficient on 16 cores. */
#define HEAD_ROWS 512

/* The activation and gradient-scratch buffers for (B, T), in one table that
 * serves allocation and the --verbose memory report. Fills acts (n_acts of them)
 * and grads; returns the number of grads. */
static int buffer_specs(Model *m, int B, int T, int with_grads, BufferSpec *acts, int *n_acts,
                        BufferSpec *grads) {
    const Config *c = &m->config;
    size_t N = (size_t)B * T, L = (size_t)c->n_layer, KVL = (size_t)c->n_kv_layer,
           C = (size_t)c->hidden_size;
    size_t I = (size_t)c->intermediate_size, V = (size_t)c->vocab_size;
    size_t qd = (size_t)c->n_head * c->head_size, kvd = (size_t)c->n_kv_head * c->head_size;
    size_t stats = (size_t)B * c->n_head * T,
           kvI = c->use_kv_mlp ? (size_t)c->kv_intermediate_size : 0;
    size_t head = (size_t)m->head_rows;
    size_t att_panels = attention_panel_floats(attention_shape(c, B, T), with_grads);
    /* un-rotated keys are kept only where a layer reads them (the reference-compatible mode) */
    size_t k_pre = reads_unrotated_keys(c) ? KVL * N * kvd : 0;
    Activations *a = &m->a;
    GradScratch *d = &m->d;
    BufferSpec act[] = {
        {"residual stream [L+1,B,T,C]", &a->residual, (L + 1) * N * C},
        {"ln1 [B,T,C], recomputed", &a->ln1, N * C},
        {"ln1 stats [L,B,T,2]", &a->ln1_stats, L * N * 2},
        {"queries [L,B,T,H*hs]", &a->q, L * N * qd},
        {"keys before rotary [kvL,B,T,kvH*hs]", &a->k_pre, k_pre},
        {"keys after rotary [kvL,B,T,kvH*hs]", &a->k_rot, KVL * N * kvd},
        {"values [kvL,B,T,kvH*hs]", &a->v, KVL * N * kvd},
        {"KV-MLP keys hidden pre-GELU [kvL,B,T,kvI]", &a->k_hidden_pre, KVL * N * kvI},
        {"KV-MLP keys hidden [kvL,B,T,kvI]", &a->k_hidden, KVL * N * kvI},
        {"KV-MLP values hidden pre-GELU [kvL,B,T,kvI]", &a->v_hidden_pre, KVL * N * kvI},
        {"KV-MLP values hidden [kvL,B,T,kvI]", &a->v_hidden, KVL * N * kvI},
        {"attention log-sum-exp [L,B,H,T]", &a->att_lse, L * stats},
        {"attention K (V, Q, dout) panels", &a->att_panels, att_panels},
        {"attention output [L,B,T,C]", &a->att_out, L * N * C},
        {"sequential residual [L,B,T,C]", &a->resid_mid, c->parallel_residual ? 0 : L * N * C},
        {"ln2 [B,T,C], recomputed", &a->ln2, N * C},
        {"ln2 stats [L,B,T,2]", &a->ln2_stats, L * N * 2},
        {"mlp pre-GELU [L,B,T,I]", &a->fc_pre, L * N * I},
        {"mlp post-GELU [B,T,I], recomputed", &a->fc_act, N * I},
        {"final LN [B,T,C] + stats", &a->lnf, N * C},
        {"final LN stats [B,T,2]", &a->lnf_stats, N * 2},
        {"branch output [B,T,C]", &a->branch, N * C},
        {"logits [head rows,V]", &a->logits, head * V},
        {"losses [B,T]", &a->losses, N},
        {"log-sum-exp of the logits [B,T]", &a->logits_lse, N},
    };
    BufferSpec grad[] = {
        {"d residual [B,T,C]", &d->d_residual, N * C},
        {"d ln1 [B,T,C]", &d->d_ln1, N * C},
        {"d ln2 [B,T,C]", &d->d_ln2, N * C},
        {"d attention output [B,T,C]", &d->d_att_out, N * C},
        {"d branch [B,T,C]", &d->d_branch, N * C},
        {"d queries [B,T,H*hs]", &d->d_q, N * qd},
        {"d keys before rotary [kvL,B,T,kvH*hs]", &d->d_k_pre, k_pre},
        {"d keys after rotary [kvL,B,T,kvH*hs]", &d->d_k_rot, KVL * N * kvd},
        {"d values [kvL,B,T,kvH*hs]", &d->d_v, KVL * N * kvd},
        {"d mlp [B,T,I]", &d->d_fc, N * I},
        {"d KV-MLP hidden [B,T,kvI]", &d->d_kv_hidden, N * kvI},
        {"attention delta [B,H,T]", &d->att_delta, stats},
    };
    *n_acts = (int)(sizeof(act) / sizeof(act[0]));
    memcpy(acts, act, sizeof(act));
    memcpy(grads, grad, sizeof(grad));
    return (int)(sizeof(grad) / sizeof(grad[0]));
}

/* Lays the buffers of specs end to end in one allocation. */
static float *allocate_buffers(BufferSpec *specs, int n, size_t *total, const char *what) {
    *total = 0;
    for (int i = 0; i < n; i++) *total += specs[i].floats;
    float *memory = alloc_zeroed(*total, sizeof(float), what);
    if (!memory) return NULL;
    size_t offset = 0;
    for (int i = 0; i < n; i++) {
        *specs[i].ptr = specs[i].floats ? memory + offset : NULL;
        offset += specs[i].floats;
    }
    return memory;
}

static void free_activations(Model *m) {
    free(m->act_memory);
    free(m->scratch_memory);
    free(m->rope_cos);
    free(m->rope_sin);
    free(m->inputs);
    free(m->targets);
    m->act_memory = m->scratch_memory = m->rope_cos = m->rope_sin = NULL;
    m->inputs = m->targets = NULL;
}

/* Allocates the activations for B sequences of T tokens (and with_grads,
 * the gradient scratch, the gradients and the AdamW moments). */
int model_prepare(Model *m, int B, int T, int with_grads) {
    const Config *c = &m->config;
    if (B < 1 || T < 1) return fail("batch %d and sequence length %d must be positive", B, T);
    if ((long long)B * T > MLKV_MAX_TOKENS)
        return fail("batch %d x sequence length %d = %lld tokens at once exceeds %d", B, T,
                    (long long)B * T, MLKV_MAX_TOKENS);
    if (T > c->max_position_embeddings)
        return fail("sequence length %d exceeds the model's max_position_embeddings (%d)", T,
                    c->max_position_embeddings);
    free_activations(m);
    BufferSpec acts[32], grads[32];
    /* training computes the logits HEAD_ROWS rows at a time; inference keeps them all */
    m->head_rows = with_grads && B * T > HEAD_ROWS ? HEAD_ROWS : B * T;
    int n_acts, n_grads = buffer_specs(m, B, T, with_grads, acts, &n_acts, grads);
    int half = c->rotary_ndims / 2;
    m->B = B;
    m->T = T;
    m->act_memory = allocate_buffers(acts, n_acts, &m->act_floats, "activations");
    m->rope_cos = alloc_zeroed((size_t)T * half + 1, sizeof(float), "rotary tables");
    m->rope_sin = alloc_zeroed((size_t)T * half + 1, sizeof(float), "rotary tables");
    m->inputs = alloc_zeroed((size_t)B * T, sizeof(int), "inputs");
    m->targets = alloc_zeroed((size_t)B * T, sizeof(int), "targets");
    if (!m->act_memory || !m->rope_cos || !m->rope_sin || !m->inputs || !m->targets) {
        free_activations(m);
        return -1;
    }
    rotary_tables(m->rope_cos, m->rope_sin, T, c->rotary_ndims, c->rotary_base);
    if (!with_grads) return 0;
    m->scratch_memory = allocate_buffers(grads, n_grads, &m->scratch_floats, "gradient scratch");
    if (!m->scratch_memory) {
        free_activations(m);
        return -1;
    }
    if (!m->grad_memory) {
        m->grad_memory = alloc_zeroed(m->num_parameters, sizeof(float), "gradients");
        m->adam_m = alloc_zeroed(m->num_parameters, sizeof(float), "AdamW first moments");
        m->adam_v = alloc_zeroed(m->num_parameters, sizeof(float), "AdamW second moments");
        if (!m->grad_memory || !m->adam_m || !m->adam_v) {
            free_activations(m);
            return -1;
        }
        point_weights(m, m->grad_memory, &m->g);
    }
    return 0;
}

/* train --verbose: the bytes of every buffer, from buffer_specs' table. */
void model_print_memory(const Model *m) {
    BufferSpec acts[32], grads[32];
    int n_acts, n_grads = buffer_specs((Model *)m, m->B, m->T, m->scratch_memory != NULL, acts,
                                       &n_acts, grads);
    double MiB = 1048576.0, P = (double)m->num_parameters * 4;
    printf("memory (fp32), B=%d T=%d:\n", m->B, m->T);
    printf("  %-40s %10.1f MiB\n", "parameters", P / MiB);
    if (m->grad_memory) {
        printf("  %-40s %10.1f MiB\n", "gradients", P / MiB);
        printf("  %-40s %10.1f MiB\n", "AdamW moments (m, v)", 2 * P / MiB);
    }
    for (int i = 0; i < n_acts; i++)
        if (acts[i].floats) printf("  %-40s %10.1f MiB\n", acts[i].name, acts[i].floats * 4 / MiB);
    printf("  %-40s %10.1f MiB\n", "= activations", m->act_floats * 4 / MiB);
    if (m->scratch_memory) {
        for (int i = 0; i < n_grads; i++)
            if (grads[i].floats)
                printf("  %-40s %10.1f MiB\n", grads[i].name, grads[i].floats * 4 / MiB);
        printf("  %-40s %10.1f MiB\n", "= gradient scratch", m->scratch_floats * 4 / MiB);
    }
    double packs = (double)(sizeof(gemm_packed_a) + sizeof(gemm_packed_b) + sizeof(gemm_bf16_a) +
                            sizeof(gemm_bf16_b));
    printf("  %-40s %10.1f MiB\n", "GEMM packing blocks (static, at most)", packs / MiB);
    double total =
        P * (m->grad_memory ? 4 : 1) + (double)(m->act_floats + m->scratch_floats) * 4 + packs;
    printf("  %-40s %10.1f MiB\n", "total", total / MiB);
}

void model_free(Model *m) {
    free_activations(m);
    free(m->param_memory);
    free(m->grad_memory);
    free(m->adam_m);
    free(m->adam_v);
    free(m->params);
    free(m->config_extra);
    memset(m, 0, sizeof(*m));
}

void model_zero_grad(Model *m) { zero_floats(m->grad_memory, m->num_parameters); }

/* Pointers to one layer's activations in the flat buffers. */
typedef struct {
    float *x, *next, *ln1, *ln1_stats, *q, *k_pre, *k_rot, *v, *lse, *att_out, *resid_mid, *ln2,
        *ln2_stats;
    float *k_hidden_pre, *k_hidden, *v_hidden_pre, *v_hidden; /* the owner's KV-MLP hidden layers */
    float *fc_pre, *fc_act;
    float *d_k_pre, *d_k_rot, *d_v; /* the owner's K/V gradient accumulators */
} LayerActs;

static LayerActs layer_acts(Model *m, int l, int B, int T) {
    const Config *c = &m->config;
    size_t N = (size_t)B * T, C = (size_t)c->hidden_size, I = (size_t)c->intermediate_size;
    size_t qd = (size_t)c->n_head * c->head_size, kvd = (size_t)c->n_kv_head * c->head_size;
    /* MLKV: the K/V buffers hold kvL slots, one per owner, and layer l's
     * k, v (and their gradients) are those of its owner's slot, kv_slot_of[l]:
     * for an owner its own, for a reader the same memory as its owner's */
    size_t kv = (size_t)c->kv_slot_of[l] * N * kvd;
    size_t kv_hidden = c->use_kv_mlp ? (size_t)c->kv_slot_of[l] * N * c->kv_intermediate_size : 0;
    Activations *a = &m->a;
    LayerActs s;
    s.x = a->residual + l * N * C;
    s.next = s.x + N * C;
    s.ln1 = a->ln1; /* one buffer for all layers: recomputed from x and the stats */
    s.ln1_stats = a->ln1_stats + l * N * 2;
    s.q = a->q + l * N * qd;
    s.k_pre = a->k_pre ? a->k_pre + kv : NULL;
    s.k_rot = a->k_rot + kv;
    s.v = a->v + kv;
    s.k_hidden_pre = c->use_kv_mlp ? a->k_hidden_pre + kv_hidden : NULL;
    s.k_hidden = c->use_kv_mlp ? a->k_hidden + kv_hidden : NULL;
    s.v_hidden_pre = c->use_kv_mlp ? a->v_hidden_pre + kv_hidden : NULL;
    s.v_hidden = c->use_kv_mlp ? a->v_hidden + kv_hidden : NULL;
    s.lse = a->att_lse + (size_t)l * B * c->n_head * T;
    s.att_out = a->att_out + l * N * C;
    s.resid_mid = c->parallel_residual ? NULL : a->resid_mid + l * N * C;
    s.ln2 = a->ln2;
    s.ln2_stats = a->ln2_stats + l * N * 2;
    s.fc_pre = a->fc_pre + l * N * I;
    s.fc_act = a->fc_act; /* gelu(fc_pre), recomputed */
    s.d_k_pre = m->d.d_k_pre ? m->d.d_k_pre + kv : NULL;
    s.d_k_rot = m->d.d_k_rot ? m->d.d_k_rot + kv : NULL;
    s.d_v = m->d.d_v ? m->d.d_v + kv : NULL;
    return s;
}

/* An owner's K or V projection (weights, or their gradients): w [kvd, C] and
 * b [kvd]; with use_key_value_mlp a hidden layer mlp_w [kvI, C], mlp_b [kvI]
 * before it and w [kvd, kvI] (mlp_w NULL means linear). */
typedef struct { float *mlp_w, *mlp_b, *w, *b; } KVProjection;
static KVProjection key_projection(const LayerWeights *lw) {
    return (KVProjection){lw->k_mlp_w, lw->k_mlp_b, lw->k_w, lw->k_b};
}
static KVProjection value_projection(const LayerWeights *lw) {
    return (KVProjection){lw->v_mlp_w, lw->v_mlp_b, lw->v_w, lw->v_b};
}

/* x = ln1 [N, C] -> out [N, kvd]: out = W x + b, or with use_key_value_mlp
 * out = W gelu(W_in x + b_in) + b through hidden_pre, hidden [N, kvI]. */
static void kv_projection_forward(const Config *c, KVProjection p, float *out, float *hidden_pre,
                                  float *hidden, const float *x, int N) {
    int C = c->hidden_size, kvI = c->kv_intermediate_size, kvd = c->n_kv_head * c->head_size;
    if (!p.mlp_w) {
        matmul_forward(out, x, p.w, p.b, N, C, kvd);
        return;
    }
    matmul_forward(hidden_pre, x, p.mlp_w, p.mlp_b, N, C, kvI);
    gelu_forward(hidden, hidden_pre, (size_t)N * kvI);
    matmul_forward(out, hidden, p.w, p.b, N, kvI, kvd);
}

/* dx += d(out)/dx dout, and the projection's gradients into g; d_hidden
 * [N, kvI] is scratch. */
static void kv_projection_backward(const Config *c, KVProjection p, KVProjection g, float *dx,
                                   float *d_hidden, const float *dout, const float *x,
                                   const float *hidden_pre, const float *hidden, int N) {
    int C = c->hidden_size, kvI = c->kv_intermediate_size, kvd = c->n_kv_head * c->head_size;
    if (!p.mlp_w) {
        matmul_backward(dx, g.w, g.b, dout, x, p.w, N, C, kvd);
        return;
    }
    zero_floats(d_hidden, (size_t)N * kvI);
    matmul_backward(d_hidden, g.w, g.b, dout, hidden, p.w, N, kvI, kvd);
    gelu_backward(d_hidden, hidden_pre, (size_t)N * kvI);
    matmul_backward(dx, g.mlp_w, g.mlp_b, d_hidden, x, p.mlp_w, N, C, kvI);
}

/* What layer_tail_forward writes on the way, [N, C] but for ln2_stats [N, 2]
 * and fc_pre, fc_act [N, I]; mid: the sequential residual's x + attn (unused
 * with the parallel residual); branch: the current branch's output. */
typedef struct { float *mid, *ln2, *ln2_stats, *fc_pre, *fc_act, *branch; } TailBuffers;

/* The rest of a layer after attention, on N rows: dense projection, residual,
 * MLP. Parallel: next = x + attn + mlp(ln2 x); sequential: mid = x + attn,
 * next = mid + mlp(ln2 mid). next may be x itself (decoding updates the
 * residual stream in place): ln2 reads x before next is written. */
static void layer_tail_forward(const Config *c, const LayerWeights *lw, const float *x,
                               const float *att_out, const TailBuffers *t, float *next, int N) {
    int C = c->hidden_size, I = c->intermediate_size;
    size_t NC = (size_t)N * C;
    float *mid = t->mid, *ln2 = t->ln2, *ln2_stats = t->ln2_stats, *fc_pre = t->fc_pre;
    float *fc_act = t->fc_act, *branch = t->branch;
    matmul_forward(branch, att_out, lw->dense_w, lw->dense_b, N, C, C);
    if (c->parallel_residual) {
        layernorm_forward(ln2, ln2_stats, x, lw->ln2_w, lw->ln2_b, N, C, c->layer_norm_eps);
        add_into(next, x, branch, NC);
    } else {
        add_into(mid, x, branch, NC);
        layernorm_forward(ln2, ln2_stats, mid, lw->ln2_w, lw->ln2_b, N, C, c->layer_norm_eps);
    }
    matmul_forward(fc_pre, ln2, lw->fc_w, lw->fc_b, N, C, I);
    gelu_forward(fc_act, fc_pre, (size_t)N * I);
    matmul_forward(branch, fc_act, lw->proj_w, lw->proj_b, N, I, C);
    add_into(next, c->parallel_residual ? next : mid, branch, NC);
}

/* The backward pass of layer_tail_forward in training, from the gradient of
 * the layer's output (d->d_residual) to that of the attention output
 * (d->d_att_out); sequential residual: d_residual becomes the gradient of
 * mid. The MLP's inputs are recomputed from what the forward pass kept (x or
 * mid, LayerNorm statistics, pre-GELU), which costs two cheap passes and
 * saves 2 [L, N, C] and an [L, N, I] buffer. Parallel residual: ln2 reads x,
 * as ln1 does, so d->d_ln2 is left for the caller to take back through ln2
 * once the attention branch has read d_residual. */
static void layer_tail_backward(const Config *c, const LayerWeights *lw, LayerWeights *gw,
                                const LayerActs *s, GradScratch *d, int N) {
    int C = c->hidden_size, I = c->intermediate_size;
    size_t NC = (size_t)N * C;
    const float *ln2_in = c->parallel_residual ? s->x : s->resid_mid;
    layernorm_forward(s->ln2, s->ln2_stats, ln2_in, lw->ln2_w, lw->ln2_b, N, C, c->layer_norm_eps);
    gelu_forward(s->fc_act, s->fc_pre, (size_t)N * I);
    zero_floats(d->d_fc, (size_t)N * I);
    matmul_backward(d->d_fc, gw->proj_w, gw->proj_b, d->d_residual, s->fc_act, lw->proj_w, N, I, C);
    gelu_backward(d->d_fc, s->fc_pre, (size_t)N * I);
    zero_floats(d->d_ln2, NC);
    matmul_backward(d->d_ln2, gw->fc_w, gw->fc_b, d->d_fc, s->ln2, lw->fc_w, N, C, I);
    if (!c->parallel_residual) /* d_residual becomes the gradient of mid = x + attn */
        layernorm_backward(d->d_residual, gw->ln2_w, gw->ln2_b, d->d_ln2, s->resid_mid, lw->ln2_w,
                           s->ln2_stats, N, C);
    zero_floats(d->d_att_out, NC);
    matmul_backward(d->d_att_out, gw->dense_w, gw->dense_b, d->d_residual, s->att_out, lw->dense_w,
                    N, C, C);
}

/* Embedding, the layers and the final LayerNorm: a->lnf [N, C]. */
static int forward_layers(Model *m, const int *inputs, const int *targets, int B, int T) {
    const Config *c = &m->config;
    int C = c->hidden_size, H = c->n_head, hs = c->head_size, kvH = c->n_kv_head;
    int L = c->n_layer, rd = c->rotary_ndims, N = B * T, qd = H * hs, kvd = kvH * hs;
    Activations *a = &m->a;
    if (B > m->B || T > m->T)
        return fail("forward of %dx%d exceeds the prepared %dx%d", B, T, m->B, m->T);
    if (inputs != m->inputs) memcpy(m->inputs, inputs, (size_t)N * sizeof(int));
    if (targets && targets != m->targets) memcpy(m->targets, targets, (size_t)N * sizeof(int));
    for (int n = 0; n < N; n++) /* token embedding; GPT-NeoX has no position embedding */
        memcpy(a->residual + (size_t)n * C, m->w.embed_in + (size_t)inputs[n] * C,
               (size_t)C * sizeof(float));
    for (int l = 0; l < L; l++) {
        const LayerWeights *lw = &m->w.layer[l];
        /* MLKV: layer l attends over the K/V of layer `owner` (itself when it
         * owns K/V); s.k_rot, s.k_pre and s.v point at that owner's slot */
        int owner = c->kv_layer_of[l];
        LayerActs s = layer_acts(m, l, B, T);
        /* ln1 = LayerNorm(x) [N, C] */
        layernorm_forward(s.ln1, s.ln1_stats, s.x, lw->ln1_w, lw->ln1_b, N, C, c->layer_norm_eps);
        /* q = ln1 Wq^T + bq [N, H*hs], each head rotated by its position */
        matmul_forward(s.q, s.ln1, lw->q_w, lw->q_b, N, C, qd);
        rotary_apply(s.q, m->rope_cos, m->rope_sin, B, T, H, hs, rd, 1.0f);
        if (owner == l) {
            /* an owner projects the K/V that the layers above it reuse:
             * k = ln1 Wk^T + bk, v = ln1 Wv^T + bv [N, kvH*hs] (through a hidden
             * layer with use_key_value_mlp), k rotated; k before rotary kept
             * too where a reader attends over it (reference-compatible mode) */
            kv_projection_forward(c, key_projection(lw), s.k_pre ? s.k_pre : s.k_rot,
                                  s.k_hidden_pre, s.k_hidden, s.ln1, N);
            kv_projection_forward(c, value_projection(lw), s.v, s.v_hidden_pre, s.v_hidden, s.ln1,
                                  N);
            if (s.k_pre) memcpy(s.k_rot, s.k_pre, (size_t)N * kvd * sizeof(float));
            rotary_apply(s.k_rot, m->rope_cos, m->rope_sin, B, T, kvH, hs, rd, 1.0f);
        }
        /* att_out = softmax(q k^T / sqrt(hs)) v [N, H*hs], causal, over the
         * owner's k and v: this layer's own when it is the owner */
        const float *keys = reads_rotated_keys(c, l) ? s.k_rot : s.k_pre;
        attention_forward(s.att_out, s.lse, a->att_panels, s.q, keys, s.v,
                          attention_shape(c, B, T));
        /* the dense projection, the residual and the MLP: next [N, C] */
        TailBuffers tail = {s.resid_mid, s.ln2, s.ln2_stats, s.fc_pre, s.fc_act, a->branch};
        layer_tail_forward(c, lw, s.x, s.att_out, &tail, s.next, N);
    }
    layernorm_forward(a->lnf, a->lnf_stats, a->residual + (size_t)L * N * C, m->w.lnf_w, m->w.lnf_b,
                      N, C, c->layer_norm_eps);
    return 0;
}

/* The output head and the loss, m->head_rows rows at a time, so that training
 * never holds the whole [N, V] logits (412 MB for Pythia at N = 2048) or their
 * gradient. With dloss != 0 each chunk's gradient is taken while it is at
 * hand (llm.c fuses its classifier the same way): dlogits = (softmax -
 * onehot) dloss, d_lnf (into d->d_branch) = dlogits W, dW += dlogits^T lnf.
 * Returns the mean loss. */
static float head_forward(Model *m, int N, float dloss) {
    const Config *c = &m->config;
    int C = c->hidden_size, V = c->vocab_size;
    Activations *a = &m->a;
    if (dloss != 0.0f) zero_floats(m->d.d_branch, (size_t)N * C);
    for (int r0 = 0; r0 < N; r0 += m->head_rows) {
        int rows = N - r0 < m->head_rows ? N - r0 : m->head_rows;
        const float *x = a->lnf + (size_t)r0 * C;
        matmul_forward(a->logits, x, m->w.embed_out, NULL, rows, C, V);
        crossentropy_forward(a->losses + r0, a->logits_lse + r0, a->logits, m->targets + r0, rows,
                             V);
        if (dloss == 0.0f) continue;
        crossentropy_backward(a->logits, a->logits_lse + r0, m->targets + r0, rows, V, dloss);
        matmul_backward(m->d.d_branch + (size_t)r0 * C,
                        m->freeze_embeddings ? NULL : m->g.embed_out, NULL, a->logits, x,
                        m->w.embed_out, rows, C, V);
    }
    double total = 0;
    for (int n = 0; n < N; n++) total += a->losses[n];
    return (float)(total / N);
}

float model_forward(Model *m, const int *inputs, const int *targets, int B, int T) {
    const Config *c = &m->config;
    int N = B * T;
    if (!targets && N > m->head_rows) {
        fail("logits of %d positions need a model prepared "
             "without gradients (this one holds %d rows)", N, m->head_rows);
        return NAN;
    }
    if (forward_layers(m, inputs, targets, B, T) != 0) return NAN;
    if (targets) return head_forward(m, N, 0.0f);
    matmul_forward(m->a.logits, m->a.lnf, m->w.embed_out, NULL, N, c->hidden_size, c->vocab_size);
    return 0.0f;
}

float model_forward_backward(Model *m, const int *inputs, const int *targets, int B, int T,
                             float loss_scale) {
    const Config *c = &m->config;
    int N = B * T;
    int C = c->hidden_size, H = c->n_head, hs = c->head_size, kvH = c->n_kv_head;
    int L = c->n_layer, rd = c->rotary_ndims, qd = H * hs, kvd = kvH * hs;
    if (!m->scratch_memory) {
        fail("the model was prepared without gradients");
        return NAN;
    }
    if (forward_layers(m, inputs, targets, B, T) != 0) return NAN;
    float loss = head_forward(m, N, loss_scale / (float)N); /* d lnf is in d->d_branch */
    Activations *a = &m->a;
    GradScratch *d = &m->d;
    size_t NC = (size_t)N * C, kv_all = (size_t)c->n_kv_layer * N * kvd;
    zero_floats(d->d_residual, NC);
    layernorm_backward(d->d_residual, m->g.lnf_w, m->g.lnf_b, d->d_branch,
                       a->residual + (size_t)L * NC, m->w.lnf_w, a->lnf_stats, N, C);
    if (d->d_k_pre) zero_floats(d->d_k_pre, kv_all);
    zero_floats(d->d_k_rot, kv_all);
    zero_floats(d->d_v, kv_all);
    /* Top to bottom: every layer that reads an owner's K/V comes before the
     * owner, so the owner's accumulators are complete when it is reached.
     * For example L = 4 with owners {0, 2} (layer map 0 0 2 2): layer 3's
     * attention backward adds its dK, dV into slot 1 (owner 2's), layer 2
     * adds its own and then, as the owner, takes the sum back through
     * rotary and its K/V projections; layers 1 and 0 do the same with slot 0.
     * So an owner's K/V gradient is the sum of its readers' contributions,
     * its own included. */
    for (int l = L - 1; l >= 0; l--) {
        const LayerWeights *lw = &m->w.layer[l];
        LayerWeights *gw = &m->g.layer[l];
        /* whose K/V accumulators (s.d_k_rot, s.d_v) this layer adds into */
        int owner = c->kv_layer_of[l];
        LayerActs s = layer_acts(m, l, B, T);
        /* back through the MLP, the residual and the dense projection:
         * d_att_out [N, H*hs] */
        layer_tail_backward(c, lw, gw, &s, d, N);
        /* attention: dq [N, H*hs], and this layer's dK, dV added into its
         * owner's accumulators [N, kvH*hs] */
        int rotated = reads_rotated_keys(c, l);
        attention_backward(d->d_q, rotated ? s.d_k_rot : s.d_k_pre, s.d_v, d->att_delta,
                           a->att_panels, d->d_att_out, s.q, rotated ? s.k_rot : s.k_pre, s.v,
                           s.att_out, s.lse, attention_shape(c, B, T));
        /* q's rotary undone (rotating back is its transpose), then d_ln1 = dq Wq
         * and dWq += dq^T ln1, dbq += sum dq; ln1 is recomputed from x and its
         * stats (one buffer serves all layers) */
        rotary_apply(d->d_q, m->rope_cos, m->rope_sin, B, T, H, hs, rd, -1.0f);
        layernorm_forward(s.ln1, s.ln1_stats, s.x, lw->ln1_w, lw->ln1_b, N, C, c->layer_norm_eps);
        zero_floats(d->d_ln1, NC);
        matmul_backward(d->d_ln1, gw->q_w, gw->q_b, d->d_q, s.ln1, lw->q_w, N, C, qd);
        if (owner == l) {
            /* all readers are done: the summed dK back through rotary, then
             * dK, dV through the K/V projections into d_ln1 and their weights */
            rotary_apply(s.d_k_rot, m->rope_cos, m->rope_sin, B, T, kvH, hs, rd, -1.0f);
            if (s.d_k_pre) add_into(s.d_k_rot, s.d_k_rot, s.d_k_pre, (size_t)N * kvd);
            kv_projection_backward(c, key_projection(lw), key_projection(gw), d->d_ln1,
                                   d->d_kv_hidden, s.d_k_rot, s.ln1, s.k_hidden_pre, s.k_hidden, N);
            kv_projection_backward(c, value_projection(lw), value_projection(gw), d->d_ln1,
                                   d->d_kv_hidden, s.d_v, s.ln1, s.v_hidden_pre, s.v_hidden, N);
        }
        /* through ln1 (and ln2 with the parallel residual: both branches read
         * x, so their LayerNorm gradients are added last) into d_residual,
         * which becomes the gradient of this layer's input x */
        if (c->parallel_residual)
            layernorm_backward(d->d_residual, gw->ln2_w, gw->ln2_b, d->d_ln2, s.x, lw->ln2_w,
                               s.ln2_stats, N, C);
        layernorm_backward(d->d_residual, gw->ln1_w, gw->ln1_b, d->d_ln1, s.x, lw->ln1_w,
                           s.ln1_stats, N, C);
    }
    /* the token embedding: each position's gradient into its token's row */
    for (int n = 0; n < N && !m->freeze_embeddings; n++)
        axpy(m->g.embed_in + (size_t)m->inputs[n] * C, 1.0f, d->d_residual + (size_t)n * C, C);
    return loss;
}

/* ===========================================================================
 * 6. Generation: prefill and decoding with a KV cache of the owning layers.
 *    Decoding one token at a time needs every earlier position's K and V;
 *    MLKV's saving is that only the owners' are kept: 2 * kvL * kvH * hs
 *    floats per token where MHA keeps 2 * L * H * hs (Pythia-160M, L = H =
 *    12, hs = 64: 72 KiB per token in fp32; with kvL = 2 owners, a sixth of
 *    it). An owner appends its new K/V to the cache at the token's position,
 *    and the layers reading it read the same memory. model_cached_forward
 *    runs model_forward's layers on the new tokens only (a prompt in chunks,
 *    then one token per step); the tests check its logits against the full
 *    forward pass. Then sampling: greedy, temperature, top-k, top-p.
 * ======================================================================== */

/* The cache's buffers, in one table that serves allocation and bench-kv's
 * memory plan. Returns their count. */
static int kv_cache_specs(KVCache *c, const Config *cf, int B, int max_T, int chunk, int all_logits,
                          BufferSpec *specs) {
    size_t N = (size_t)B * chunk, C = (size_t)cf->hidden_size, I = (size_t)cf->intermediate_size;
    size_t kvd = (size_t)cf->n_kv_head * cf->head_size,
           kvI = cf->use_kv_mlp ? (size_t)cf->kv_intermediate_size : 0;
    size_t head_rows = all_logits ? N : (size_t)B, half = (size_t)cf->rotary_ndims / 2;
    size_t cache = (size_t)cf->n_kv_layer * B * max_T * kvd;
    BufferSpec table[] = {
        {"keys", &c->k, cache},
        {"values", &c->v, cache}, /* first: the cache itself */
        {"x", &c->x, N * C},
        {"ln", &c->ln, N * C},
        {"stats", &c->stats, N * 2},
        {"q", &c->q, N * C},
        {"k", &c->k_new, N * kvd},
        {"v", &c->v_new, N * kvd},
        {"attention", &c->att, N * C},
        {"branch", &c->branch, N * C},
        {"mid", &c->mid, cf->parallel_residual ? 0 : N * C},
        {"mlp", &c->fc_pre, N * I},
        {"mlp act", &c->fc_act, N * I},
        {"kv mlp", &c->kv_hidden_pre, N * kvI},
        {"kv mlp act", &c->kv_hidden, N * kvI},
        {"head input", &c->head_in, head_rows * (2 * C + 2)}, /* rows, normalized rows, stats */
        {"logits", &c->logits, head_rows * (size_t)cf->vocab_size},
        {"rotary cos", &c->rope_cos, (size_t)max_T * half + 1},
        {"rotary sin", &c->rope_sin, (size_t)max_T * half + 1},
    };
    memcpy(specs, table, sizeof(table));
    return (int)(sizeof(table) / sizeof(table[0]));
}

/* A cache for B sequences of up to max_T tokens, taking up to `chunk` new
 * tokens per sequence a call, and its rotary tables. */
int kv_cache_init(KVCache *c, const Model *m, int B, int max_T, int chunk, int all_logits) {
    const Config *cf = &m->config;
    BufferSpec specs[32];
    size_t total;
    memset(c, 0, sizeof(*c));
    if (B < 1 || max_T < 1 || chunk < 1)
        return fail("KV cache: batch %d, length %d, chunk %d must be positive", B, max_T, chunk);
    c->B = B;
    c->max_T = max_T;
    c->chunk = chunk;
    c->all_logits = all_logits;
    int n = kv_cache_specs(c, cf, B, max_T, chunk, all_logits, specs);
    c->memory = allocate_buffers(specs, n, &total, "the KV cache");
    if (!c->memory) return -1;
    c->cache_bytes = (specs[0].floats + specs[1].floats) * sizeof(float);
    c->scratch_bytes = total * sizeof(float) - c->cache_bytes;
    rotary_tables(c->rope_cos, c->rope_sin, max_T, cf->rotary_ndims, cf->rotary_base);
    return 0;
}

void kv_cache_free(KVCache *c) {
    free(c->memory);
    memset(c, 0, sizeof(*c));
}

/* The same layers as model_forward, on the rows of the new tokens only. */
const float *model_cached_forward(Model *m, KVCache *c, const int *tokens, int n) {
    const Config *cf = &m->config;
    int B = c->B, N = B * n, pos0 = c->length, C = cf->hidden_size, H = cf->n_head,
        hs = cf->head_size;
    int kvH = cf->n_kv_head, V = cf->vocab_size, rd = cf->rotary_ndims, half = rd / 2;
    if (n < 1 || n > c->chunk) {
        fail("%d tokens at once; the cache takes 1 to %d", n, c->chunk);
        return NULL;
    }
    if (pos0 + n > c->max_T) {
        fail("the KV cache holds %d positions; %d were asked", c->max_T, pos0 + n);
        return NULL;
    }
    for (int r = 0; r < N; r++) {
        if (tokens[r] < 0 || tokens[r] >= V) {
            fail("token %d is outside the vocabulary (%d)", tokens[r], V);
            return NULL;
        }
        memcpy(c->x + (size_t)r * C, m->w.embed_in + (size_t)tokens[r] * C,
               (size_t)C * sizeof(float));
    }
    const float *cos_t = c->rope_cos + (size_t)pos0 * half,
                *sin_t = c->rope_sin + (size_t)pos0 * half;
    for (int l = 0; l < cf->n_layer; l++) {
        const LayerWeights *lw = &m->w.layer[l];
        /* MLKV: the cache has one slot per owner, [B, kvH, max_T, hs] for K
         * and for V; layer l reads its owner's, kv_slot_of[l] */
        size_t slot = (size_t)cf->kv_slot_of[l] * B * kvH * c->max_T * hs;
        /* ln1 and q of the new tokens [N, C], rotated by their positions pos0.. */
        layernorm_forward(c->ln, c->stats, c->x, lw->ln1_w, lw->ln1_b, N, C, cf->layer_norm_eps);
        matmul_forward(c->q, c->ln, lw->q_w, lw->q_b, N, C, H * hs);
        rotary_apply(c->q, cos_t, sin_t, B, n, H, hs, rd, 1.0f);
        if (cf->kv_layer_of[l] == l) {
            /* an owner projects the new tokens' K/V [N, kvH*hs] and appends
             * them to its slot at positions pos0 .. pos0+n-1; a reader adds
             * nothing to the cache */
            kv_projection_forward(cf, key_projection(lw), c->k_new, c->kv_hidden_pre, c->kv_hidden,
                                  c->ln, N);
            kv_projection_forward(cf, value_projection(lw), c->v_new, c->kv_hidden_pre,
                                  c->kv_hidden, c->ln, N);
            if (cf->shared_key_rotary)
                rotary_apply(c->k_new, cos_t, sin_t, B, n, kvH, hs, rd, 1.0f);
            for (int b = 0; b < B; b++)
                for (int h = 0; h < kvH; h++)
                    for (int i = 0; i < n; i++) {
                        size_t from = (((size_t)b * n + i) * kvH + h) * hs;
                        size_t to = slot + (((size_t)b * kvH + h) * c->max_T + pos0 + i) * hs;
                        memcpy(c->k + to, c->k_new + from, (size_t)hs * sizeof(float));
                        memcpy(c->v + to, c->v_new + from, (size_t)hs * sizeof(float));
                    }
        }
        /* the reference-compatible cache holds un-rotated keys: the owner rotates
         * them as it reads, the layers sharing them read them as they are */
        int rotate_on_read = !cf->shared_key_rotary && cf->kv_layer_of[l] == l;
        /* the new queries over every cached position up to their own */
        attention_cached(c->att, c->q, c->k + slot, c->v + slot, attention_shape(cf, B, n), pos0,
                         c->max_T, rotate_on_read ? c->rope_cos : NULL,
                         rotate_on_read ? c->rope_sin : NULL, rd);
        /* the rest of the layer, updating the residual stream c->x in place */
        TailBuffers tail = {c->mid, c->ln, c->stats, c->fc_pre, c->fc_act, c->branch};
        layer_tail_forward(cf, lw, c->x, c->att, &tail, c->x, N);
    }
    c->length += n;
    /* the head, on every row or on the last position of each sequence */
    int rows = c->all_logits ? N : B;
    for (int r = 0; r < rows; r++) {
        int from = c->all_logits ? r : r * n + n - 1;
        memcpy(c->head_in + (size_t)r * C, c->x + (size_t)from * C, (size_t)C * sizeof(float));
    }
    float *normed = c->head_in + (size_t)rows * C, *stats = normed + (size_t)rows * C;
    layernorm_forward(normed, stats, c->head_in, m->w.lnf_w, m->w.lnf_b, rows, C,
                      cf->layer_norm_eps);
    matmul_forward(c->logits, normed, m->w.embed_out, NULL, rows, C, V);
    return c->logits;
}

/* Sampling: greedy at temperature 0, else from softmax(logits / T) kept to
 * the top_k most likely tokens and to the fewest most likely tokens whose
 * probability reaches top_p (SamplingConfig and Candidate: mlkv.h). */

/* Candidates from the most likely down; equal ones by id */
static int candidate_order(const void *a, const void *b) {
    float x = ((const Candidate *)a)->p, y = ((const Candidate *)b)->p;
    return x < y ? 1 : x > y ? -1 : ((const Candidate *)a)->id - ((const Candidate *)b)->id;
}

/* Puts the k first of a[0..n) in candidate_order into a[0..k), in no order
 * (quickselect: linear time on average, where sorting the 50k candidates of a
 * vocabulary for every token cost more than the model's step on small models). */
static void select_first(Candidate *a, int n, int k) {
    int lo = 0, hi = n - 1;
    while (lo < hi && k > lo && k <= hi) {
        Candidate pivot = a[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (candidate_order(&a[i], &pivot) < 0) i++;
            while (candidate_order(&a[j], &pivot) > 0) j--;
            if (i <= j) {
                Candidate t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        /* a[lo..j] come before a[i..hi]; what lies between equals the pivot */
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else break;
    }
}

/* One token from logits [V] as s says; scratch holds V candidates. Without
 * top_k and top_p the draw walks the tokens in id order; with them, the kept
 * tokens in candidate_order, found a chunk at a time (select_first, then a
 * sort of the chunk alone) until top_k or top_p is reached. */
int sample_token(const float *logits, int V, const SamplingConfig *s, uint64_t *rng,
                 Candidate *scratch) {
    int best = argmax(logits, V);
    if (s->temperature <= 0) return best;
    double sum = 0;
    for (int i = 0; i < V; i++) {
        scratch[i] = (Candidate){(float)exp((logits[i] - logits[best]) / s->temperature), i};
        sum += scratch[i].p;
    }
    int keep = s->top_k > 0 && s->top_k < V ? s->top_k : V;
    if (keep == V && s->top_p >= 1.0) { /* the whole distribution */
        double r = rng_uniform(rng) * sum;
        for (int i = 0; i < V; i++) {
            r -= scratch[i].p;
            if (r < 0) return i;
        }
        return best;
    }
    double kept = 0;
    for (int done = 0, chunk = 64, reached = 0; done < keep && !reached; chunk *= 2) {
        int n = keep - done < chunk ? keep - done : chunk;
        select_first(scratch + done, V - done, n);
        qsort(scratch + done, (size_t)n, sizeof(Candidate), candidate_order);
        for (int i = done; i < done + n && !reached; i++) {
            kept += scratch[i].p / sum;
            if (s->top_p < 1.0 && kept >= s->top_p) keep = i + 1, reached = 1;
        }
        done += n;
    }
    double total = 0;
    for (int i = 0; i < keep; i++) total += scratch[i].p;
    double r = rng_uniform(rng) * total;
    for (int i = 0; i < keep; i++) {
        r -= scratch[i].p;
        if (r < 0) return scratch[i].id;
    }
    return scratch[keep - 1].id;
}

/* ===========================================================================
 * 7. AdamW, gradient clipping, the learning-rate schedule, as HF Trainer
 *    runs them in the reference's uptraining: linear warmup, then cosine (or
 *    linear, or constant) decay; gradients clipped to a global norm; AdamW
 *    with decoupled weight decay on the weight matrices only (the parameter
 *    table's `decayed`). train_step is one optimizer step: grad_accum
 *    forward and backward passes, then the update.
 * ======================================================================== */

/* The learning rate of optimizer step `step` (from 0): a linear warmup from
 * 0 over warmup_steps, then cosine or linear decay to 0 at total_steps, or
 * constant. */
double lr_at_step(const OptimConfig *o, int step) {
    int W = o->warmup_steps, S = o->total_steps;
    if (step < W) return o->lr * (double)step / (double)(W > 1 ? W : 1);
    double progress = (double)(step - W) / (double)(S - W > 1 ? S - W : 1);
    switch (o->schedule) {
    case SCHEDULE_COSINE: return o->lr * fmax(0.0, 0.5 * (1.0 + cos(PI * progress)));
    case SCHEDULE_LINEAR:
        return o->lr * fmax(0.0, (double)(S - step) / (double)(S - W > 1 ? S - W : 1));
    default: return o->lr;
    }
}

/* *sum = the sum of g[i]^2 for i0 <= i < i1, in double, in REDUCE_LANES
 * fixed lanes, which the compiler turns into vector FMAs: one running sum
 * made every number wait for the previous addition (1.6% of a training
 * step, measured with perf) */
KERNEL(sum_of_squares, (double *sum, const float *g, size_t i0, size_t i1), (sum, g, i0, i1)) {
    double lane[REDUCE_LANES] = {0};
    size_t i = i0;
    for (; i + REDUCE_LANES <= i1; i += REDUCE_LANES)
        for (int j = 0; j < REDUCE_LANES; j++) lane[j] += (double)g[i + j] * g[i + j];
    for (; i < i1; i++) lane[0] += (double)g[i] * g[i];
    for (int w = REDUCE_LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++) lane[j] += lane[j + w];
    *sum = lane[0];
}

/* Scales all gradients so that their global L2 norm is at most `clip` (0 or
 * less: no clipping); returns the norm before. */
double clip_gradients(Model *m, double clip) {
    /* sum of squares in at most 1024 chunks whose bounds depend on the
     * parameter count alone, summed by all threads, then added in order: the
     * same bits on any number of threads */
    enum { MAX_CHUNKS = 1024 };
    double partial[MAX_CHUNKS], sumsq = 0;
    size_t n = m->num_parameters, chunk = n / MAX_CHUNKS + 1;
    chunk = chunk < 65536 ? 65536 : chunk;
    int chunks = (int)((n + chunk - 1) / chunk);
PARALLEL_FOR
    for (int c = 0; c < chunks; c++)
        sum_of_squares(&partial[c], m->grad_memory, (size_t)c * chunk,
                       (size_t)(c + 1) * chunk < n ? (size_t)(c + 1) * chunk : n);
    for (int c = 0; c < chunks; c++) sumsq += partial[c];
    double norm = sqrt(sumsq);
    if (clip > 0 && clip / (norm + 1e-6) < 1.0) {
        float coef = (float)(clip / (norm + 1e-6));
PARALLEL_FOR
        for (size_t i = 0; i < m->num_parameters; i++) m->grad_memory[i] *= coef;
    }
    return norm;
}

/* With freeze_embeddings, the token embedding and the output head are not
 * trained (as with requires_grad = False in PyTorch): the backward pass
 * leaves their gradients zero, so the clipping norm leaves them out, and
 * AdamW skips them (no update, no decay). */
static int param_frozen(const Model *m, const ParamInfo *p) {
    return m->freeze_embeddings &&
           (p->slot == offsetof(Weights, embed_in) || p->slot == offsetof(Weights, embed_out));
}

/* One step's constants of AdamW, for a tensor */
typedef struct {
    float step_size, bc2_sqrt, b1, b2, eps, decay;
} AdamStep;

/* AdamW on the numbers i0 .. i1-1 of a tensor x, its gradient g and moments */
KERNEL(adamw_span,
       (const AdamStep *a, float *x, const float *g, float *mom, float *vel, size_t i0, size_t i1),
       (a, x, g, mom, vel, i0, i1)) {
    float b1 = a->b1, b2 = a->b2, step_size = a->step_size, bc2_sqrt = a->bc2_sqrt;
    for (size_t i = i0; i < i1; i++) {
        x[i] *= a->decay;
        mom[i] += (1.0f - b1) * (g[i] - mom[i]);
        vel[i] = b2 * vel[i] + (1.0f - b2) * g[i] * g[i];
        x[i] -= step_size * mom[i] / (sqrtf(vel[i]) / bc2_sqrt + a->eps);
    }
}

/* torch.optim.AdamW: p *= 1 - lr*wd (decayed tensors only); m = lerp(m, g, 1-b1);
 * v = b2 v + (1-b2) g^2; p -= lr / (1-b1^t) * m / (sqrt(v) / sqrt(1-b2^t) + eps) */
void adamw_update(Model *m, const OptimConfig *o, double lr, int t) {
    float step_size = (float)(lr / (1.0 - pow(o->beta1, t)));
    float bc2_sqrt = (float)sqrt(1.0 - pow(o->beta2, t));
    float b1 = (float)o->beta1, b2 = (float)o->beta2, eps = (float)o->eps;
    for (int k = 0; k < m->n_params; k++) {
        const ParamInfo *p = &m->params[k];
        if (param_frozen(m, p)) continue;
        float decay = p->decayed ? (float)(1.0 - lr * o->weight_decay) : 1.0f;
        float *x = m->param_memory + p->offset, *g = m->grad_memory + p->offset;
        float *mom = m->adam_m + p->offset, *vel = m->adam_v + p->offset;
AdamStep a = {step_size, bc2_sqrt, b1, b2, eps, decay};
PARALLEL_FOR
        for (size_t s = 0; s < SPANS(p->numel); s++)
            adamw_span(&a, x, g, mom, vel, s * SPAN, SPAN_END(s, p->numel));
    }
}

/* One optimizer step on grad_accum micro-batches of [B, T+1] tokens: the
 * mean loss; no update when the loss or the gradient norm is not finite. */
float train_step(Model *m, const OptimConfig *o, const int *tokens, int grad_accum, int step,
                 double *grad_norm) {
    int B = m->B, T = m->T;
    double total = 0;
    model_zero_grad(m);
    for (int acc = 0; acc < grad_accum; acc++) {
        const int *rows = tokens + (size_t)acc * B * (T + 1);
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) { /* targets are the inputs shifted by one */
                m->inputs[b * T + t] = rows[b * (T + 1) + t];
                m->targets[b * T + t] = rows[b * (T + 1) + t + 1];
            }
        total += model_forward_backward(m, m->inputs, m->targets, B, T, 1.0f / (float)grad_accum);
    }
    float loss = (float)(total / grad_accum);
    *grad_norm = clip_gradients(m, o->clip);
    if (isfinite(loss) && isfinite(*grad_norm)) adamw_update(m, o, lr_at_step(o, step), step + 1);
    return loss;
}

/* ===========================================================================
 * 8. The converter: a pretrained (MHA) Pythia to GQA / MQA / MLKV, step by
 *     step as the reference code's converter does it (split the fused QKV,
 *     mean-pool K/V heads in groups, fold non-owning layers into their owner
 *     by a running pairwise average, grow the MLPs to keep the parameter
 *     count), plus options it lacks. model_load has already split the fused
 *     query_key_value per head (step 1).
 * ======================================================================== */

/* How much wider the MLPs (or the KV-MLP) grow so that the converted model
 * keeps the MHA model's parameter count, by the reference's formula. */
void convert_sizes(const Config *mha, int kv_heads, int kv_layers, int kv_mlp, int *intermediate,
                   int *kv_intermediate) {
    long long H = mha->n_head, L = mha->n_layer, C = mha->hidden_size, hs = mha->head_size;
    long long heads_lost = H * L - (long long)kv_heads * kv_layers;
    long long params_lost = heads_lost * (2 * C * hs + 2 * hs); /* K and V weights and biases */
    *intermediate = mha->intermediate_size;
    *kv_intermediate = 0;
    if (!kv_mlp) {
        /* add = round(params_lost // L / C), Python's round (halves to even, as
         * nearbyint in the default rounding mode); each of the 2 MLP matrices
         * gets half of it */
        long long add = (long long)nearbyint((double)(params_lost / L) / (double)C);
        *intermediate += (int)(add / 2);
    } else {
        /* each owner's K and V MLP regains its share: hidden -> kvI -> kvH*hs */
        long long needed = params_lost / kv_layers / 2 + (long long)kv_heads * hs * C;
        *kv_intermediate = (int)nearbyint((double)needed / (double)(C + (long long)kv_heads * hs));
    }
}

/* Step 2: K or V of one layer, [H*hs, C] and [H*hs], averaged over groups of
 * g = H / kvH consecutive heads into [kvH*hs, C] and [kvH*hs]. */
static void pool_heads(float *w_out, float *b_out, const float *w, const float *b, int H, int kvH,
                       int hs, int C) {
    int g = H / kvH;
    for (int j = 0; j < kvH; j++)
        for (int d = 0; d < hs; d++) {
            float *wo = w_out + ((size_t)j * hs + d) * C;
            float bias = 0.0f;
            for (int i = 0; i < C; i++) wo[i] = 0.0f;
            for (int h = j * g; h < (j + 1) * g; h++) {
                axpy(wo, 1.0f, w + ((size_t)h * hs + d) * C, C);
                bias += b[h * hs + d];
            }
            for (int i = 0; i < C; i++) wo[i] /= (float)g;
            b_out[j * hs + d] = bias / (float)g;
        }
}

/* Uniform(-bound, bound) from the converter's generator. */
static void fill_uniform(float *x, size_t n, double bound, uint64_t *rng) {
    for (size_t i = 0; i < n; i++) x[i] = (float)((2.0 * rng_uniform(rng) - 1.0) * bound);
}

/* The converted model's configuration: the options' K/V heads, owning
 * layers (placed, or the given map), KV-MLP and rotary mode, and the MLP
 * widths that keep the parameter count (convert_sizes). */
static int converted_config(const Config *src, const ConvertOptions *o, Config *c) {
    if (!is_mha(src))
        return fail(
            "the input already shares K/V (%d head%s in %d layer%s): convert from an MHA "
            "checkpoint", src->n_kv_head, plural(src->n_kv_head), src->n_kv_layer,
            plural(src->n_kv_layer));
    *c = *src;
    c->n_kv_head = o->kv_heads;
    c->n_kv_layer = o->kv_layers;
    c->has_kv_map = o->has_map;
    c->use_kv_mlp = o->kv_mlp;
    c->shared_key_rotary = !o->reference_rotary;
    c->kv_intermediate_size = 1; /* set below, once kvL is known */
    if (o->has_map) memcpy(c->kv_layer_of, o->map, sizeof(c->kv_layer_of));
    if (config_finalize(c, "conversion") != 0) return -1;
    int intermediate, kvd = c->n_kv_head * c->head_size;
    convert_sizes(src, c->n_kv_head, c->n_kv_layer, c->use_kv_mlp, &intermediate,
                  &c->kv_intermediate_size);
    if (o->grow != GROW_NONE) c->intermediate_size = intermediate;
    if (c->use_kv_mlp && c->kv_intermediate_size < kvd)
        return fail("kv_intermediate_size %d is narrower than the K/V width %d: the pooled "
                    "projection does not fit its first rows",
                    c->kv_intermediate_size, kvd);
    return 0;
}

/* Step 5, KV-MLP: Kaiming-uniform(a = sqrt(5)) weights, i.e. bound
 * 1/sqrt(fan_in), biases uniform(-1, 1); the pooled linear K or V (pooled:
 * [kvd, C] weights, then [kvd] bias) goes into the first kvd rows of the
 * input layer. */
static void init_kv_mlp(float *in_w, float *in_b, float *w, float *b, const float *pooled, int C,
                        int kvI, int kvd, uint64_t *rng) {
    size_t wsize = (size_t)kvd * C;
    fill_uniform(in_w, (size_t)kvI * C, 1.0 / sqrt((double)C), rng);
    fill_uniform(w, (size_t)kvd * kvI, 1.0 / sqrt((double)kvI), rng);
    fill_uniform(in_b, (size_t)kvI, 1.0, rng);
    fill_uniform(b, (size_t)kvd, 1.0, rng);
    memcpy(in_w, pooled, wsize * sizeof(float));
    memcpy(in_b, pooled + wsize, (size_t)kvd * sizeof(float));
}

/* Steps 2 and 3: the heads of every layer's K and V pooled (pool_heads), then
 * each non-owning layer folded into its owner in increasing layer order: by
 * the reference's running pairwise mean K_p = (K_i + K_p) / 2, or a uniform
 * mean. The result becomes the owner's projection (step 5 with KV-MLP). */
static int pool_kv_layers(const Model *mha, Model *out, const ConvertOptions *o) {
    const Config *c = &out->config;
    int C = c->hidden_size, H = c->n_head, hs = c->head_size, kvH = c->n_kv_head, L = c->n_layer,
        kvd = kvH * hs;
    /* one layer's pooled K (or V): weights, then bias */
    size_t wsize = (size_t)kvd * C, n = wsize + kvd;
    float *pooled = alloc_zeroed((size_t)L * 2 * n, sizeof(float), "pooled K/V");
    float *sums = alloc_zeroed(n, sizeof(float), "pooled K/V");
    if (!pooled || !sums) {
        free(pooled);
        free(sums);
        return -1;
    }
    for (int l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++) { /* 0 key, 1 value */
            const LayerWeights *lw = &mha->w.layer[l];
            float *w = pooled + ((size_t)l * 2 + kv) * n;
            pool_heads(w, w + wsize, kv ? lw->v_w : lw->k_w, kv ? lw->v_b : lw->k_b, H, kvH, hs, C);
        }
    uint64_t rng = o->seed;
    for (int p = 0; p < L; p++) {
        if (c->kv_layer_of[p] != p) continue;
        for (int kv = 0; kv < 2; kv++) {
            float *acc = pooled + ((size_t)p * 2 + kv) * n;
            int members = 1;
            if (o->pool == POOL_UNIFORM) memcpy(sums, acc, n * sizeof(float));
            for (int i = p + 1; i < L; i++) {
                if (c->kv_layer_of[i] != p) continue;
                const float *x = pooled + ((size_t)i * 2 + kv) * n;
                if (o->pool == POOL_UNIFORM) axpy(sums, 1.0f, x, (int)n);
                else /* the reference's running pairwise mean: K_p = (K_i + K_p) / 2 */
                    for (size_t k = 0; k < n; k++) acc[k] = (x[k] + acc[k]) / 2.0f;
                members++;
            }
            if (o->pool == POOL_UNIFORM)
                for (size_t k = 0; k < n; k++) acc[k] = sums[k] / (float)members;
            LayerWeights *lw = &out->w.layer[p];
            float *w = kv ? lw->v_w : lw->k_w, *b = kv ? lw->v_b : lw->k_b;
            if (c->use_kv_mlp) {
                init_kv_mlp(kv ? lw->v_mlp_w : lw->k_mlp_w, kv ? lw->v_mlp_b : lw->k_mlp_b, w, b,
                            acc, C, c->kv_intermediate_size, kvd, &rng);
            } else {
                memcpy(w, acc, wsize * sizeof(float));
                memcpy(b, acc + wsize, (size_t)kvd * sizeof(float));
            }
        }
    }
    free(pooled);
    free(sums);
    return 0;
}

/* Step 4: every MLP grown from I0 to I neurons. The new neurons copy the
 * first ones (the reference); with GROW_ZERO their output columns are 0,
 * which keeps the function. */
static void grow_mlps(const Model *mha, Model *out, GrowKind grow) {
    int C = out->config.hidden_size, I0 = mha->config.intermediate_size,
        I = out->config.intermediate_size;
    for (int l = 0; l < out->config.n_layer && I > I0; l++) {
        const LayerWeights *lw = &mha->w.layer[l];
        LayerWeights *nw = &out->w.layer[l];
        for (int r = 0; r < I; r++) {
            int from = r < I0 ? r : (r - I0) % I0;
            memcpy(nw->fc_w + (size_t)r * C, lw->fc_w + (size_t)from * C,
                   (size_t)C * sizeof(float));
            nw->fc_b[r] = lw->fc_b[from];
        }
        for (int row = 0; row < C; row++)
            for (int j = 0; j < I; j++)
                nw->proj_w[(size_t)row * I + j] =
                    j < I0              ? lw->proj_w[(size_t)row * I0 + j]
                    : grow == GROW_ZERO ? 0.0f
                                        : lw->proj_w[(size_t)row * I0 + (j - I0) % I0];
    }
}

/* The conversion, step by step: the new config, the tensors kept as they
 * are, the K/V heads pooled and the layers folded into their owners, the
 * MLPs grown. */
int model_convert(const Model *mha, Model *out, const ConvertOptions *o) {
    Config c;
    if (converted_config(&mha->config, o, &c) != 0) return -1;
    memset(out, 0, sizeof(*out));
    out->config = c;
    if (mha->config_extra && !(out->config_extra = strdup(mha->config_extra)))
        return fail("out of memory");
    if (model_allocate_params(out) != 0) {
        model_free(out);
        return -1;
    }
    /* tensors that keep their shape are copied: embeddings, LayerNorms, queries,
     * dense, head, and the MLP when it does not grow */
    for (int i = 0; i < out->n_params; i++) {
        const ParamInfo *p = &out->params[i], *q = model_param(mha, p->name);
        if (q && q->numel == p->numel)
            memcpy(out->param_memory + p->offset, mha->param_memory + q->offset,
                   p->numel * sizeof(float));
    }
    if (pool_kv_layers(mha, out, o) != 0) {
        model_free(out);
        return -1;
    }
    grow_mlps(mha, out, o->grow);
    return 0;
}

/* ###########################################################################
 * Part II: the machinery. Sections 1-8 are the model: what MLKV computes and
 * how it is trained. What follows turns that into a program: the training
 * loop with its logging, checkpoints and graceful stop; evaluation; the file
 * formats (config.json, safetensors and PyTorch's pickle, token files, JSON,
 * tokenizer.json); the demo corpus; the command line. A reader learning MLKV
 * can stop here.
 * ######################################################################## */

/* ===========================================================================
 * 9. The training loop: the reference's recipe as defaults
 *    (train_defaults), the set-up or resume (training_prepare), the plan
 *    printed, then the steps: batches from the loader, train_step, a line to
 *    stdout and DIR.log.csv, validation every --eval-every steps, and
 *    checkpoints. SIGINT, SIGTERM or --max-time end the run after the
 *    current step with a checkpoint, and --resume continues it bit for bit.
 * ======================================================================== */

/* Helpers of the file formats and the command line below (sections 12, 14
 * and 17) that the training loop and the evaluation call. */
static void use_threads(int n);
static int check_output_dir(const char *dir, const char *input, int overwrite,
                            const char *or_resume);
static int lock_output(const char *dir, char *lock_path);
static int checkpoint_save(const Model *m, const char *dir, const char *optimizer_metadata,
                           const char *companion_dir, int stock);
static int json_load_file(const char *path, Json *out);
static int json_is_count(const Json *v);
static void sb_number(StrBuf *b, double x);
static void json_write_string(StrBuf *b, const char *s);
static void json_write(StrBuf *b, const Json *j);

typedef struct {
    const char *model_dir, *train_path, *val_path, *out_dir;
    int batch, seq, grad_accum, steps, warmup_steps, eval_every, save_every, val_batches,
        stop_after, threads;
    int resume, overwrite, verbose, precision; /* precision: a Precision */
    int freeze_embeds;        /* embed_in and embed_out are not trained */
    /* token budget: steps = max_tokens / tokens per step (0: --steps or --epochs) */
    uint64_t max_tokens;
    int finished;             /* set by run_training: the steps done when it returned */
    int stopped_by;           /* set by run_training: the signal that stopped it early, or 0 */
    int log_every;            /* print every N-th step (every step goes to the log file) */
    /* after a stop: how to continue ("the same command and --resume"; NULL: the
     * caller says it) */
    const char *how_to_continue;
    double epochs, warmup_ratio, max_time; /* max_time: seconds, 0 = none */
    OptimConfig opt;
    uint64_t seed;
} TrainArgs;

/* The reference's uptraining recipe (HF Trainer, one epoch: AdamW 0.9/0.95/1e-8,
 * lr 6e-4, decay 0.01 except biases and LayerNorms, clip 1.0, warmup ratio 0.2
 * then cosine, sequences of 2048 tokens). Its global batch of 32 x 4
 * accumulation sequences of 2048 tokens is kept as 4 x 32, which needs far
 * less activation memory for the same update. */
static void train_defaults(TrainArgs *t) {
    memset(t, 0, sizeof(*t));
    t->batch = 4;
    t->grad_accum = 32;
    t->epochs = 1;
    t->warmup_steps = -1;
    t->warmup_ratio = 0.2;
    t->eval_every = 100;
    t->save_every = 500;
    t->val_batches = 20;
    t->log_every = 1;
    t->how_to_continue = "the same command and --resume";
    t->seed = 42;
    t->opt = (OptimConfig){.lr = 6e-4,
                           .beta1 = 0.9,
                           .beta2 = 0.95,
                           .eps = 1e-8,
                           .weight_decay = 0.01,
                           .clip = 1.0,
                           .schedule = SCHEDULE_COSINE};
}

static void format_duration(char *out, size_t n, double seconds) {
    int s = (int)(seconds + 0.5);
    if (s >= 3600) snprintf(out, n, "%dh%02dm", s / 3600, s / 60 % 60);
    else if (s >= 60) snprintf(out, n, "%dm%02ds", s / 60, s % 60);
    else snprintf(out, n, "%ds", s);
}

/* Progress of long work, on stderr: rewritten in place on a terminal at most
 * once a second; in a file or a pipe one line every 10 seconds, so that a log
 * keeps them readable. The last report ends the line. */
typedef struct { const char *label, *unit; double start, last; int tty; } Progress;

static Progress progress_start(const char *label, const char *unit) {
    double now = now_seconds();
    return (Progress){label, unit, now, now, isatty(STDERR_FILENO)};
}

static void progress_show(Progress *p, double done, double total) {
    double now = now_seconds();
    int final = done >= total;
    if (!final && now - p->last < (p->tty ? 1.0 : 10.0)) return;
    p->last = now;
    char eta[32];
    format_duration(eta, sizeof(eta), done > 0 ? (now - p->start) / done * (total - done) : 0);
    fprintf(stderr, "%s%s: %.0f / %.0f %s | %.1f %s/s | eta %s%s", p->tty ? "\r" : "", p->label,
            done, total, p->unit, done / fmax(now - p->start, 1e-9), p->unit, eta,
            p->tty && !final ? "   " : "\n");
}

/* The loss of predicting every token of a token file from the ones before
 * it, in windows of T predictions (T + 1 tokens, each window starting where
 * the last one's predictions ended; a shorter window at the end), B windows
 * per forward pass, at most max_predictions of them (0: all). Returns the
 * summed loss (nats) and sets *count to the predictions made. */
static double token_file_loss(Model *m, const TokenFile *f, int B, int T, size_t max_predictions,
                              int progress, size_t *count) {
    size_t total = f->n_tokens > 0 ? f->n_tokens - 1 : 0, done = 0;
    if (max_predictions > 0 && max_predictions < total) total = max_predictions;
    double loss = 0;
    Progress bar = progress_start("eval", "tokens");
    while (done < total) {
        size_t left = total - done;
        int rows = 0, width = left < (size_t)T ? (int)left : T; /* a short last window runs alone */
        for (; rows < B && (size_t)(rows + 1) * width <= left; rows++)
            for (int t = 0; t < width; t++) {
                const uint16_t *src = f->tokens + done + (size_t)rows * width;
                m->inputs[rows * width + t] = src[t];
                m->targets[rows * width + t] = src[t + 1];
            }
        loss += (double)model_forward(m, m->inputs, m->targets, rows, width) * rows * width;
        done += (size_t)rows * width;
        if (progress) progress_show(&bar, (double)done, (double)total);
    }
    *count = done;
    return loss;
}

/* The validation loss: the mean over up to max_batches batches of the
 * validation tokens, in order. */
static float evaluate(Model *m, const TokenFile *val, int max_batches) {
    size_t count;
    double loss = token_file_loss(m, val, m->B, m->T, (size_t)max_batches * m->B * m->T, 0, &count);
    return (float)(loss / (double)count);
}

static int optimizer_metadata(StrBuf *b, const TrainArgs *t, int step, const DataLoader *dl,
                              size_t train_tokens) {
    sb_printf(b,
              "{\"step\":\"%d\",\"epoch\":\"%d\",\"next\":\"%zu\",\"seed\":\"%llu\",\"batch\":\"%"
              "d\",\"seq\":\"%d\",\"grad_accum\":\"%d\",\"steps\":\"%d\",\"train_tokens\":\"%zu\","
              "\"freeze_embeds\":\"%d\"}",
              step, dl->epoch, dl->next, (unsigned long long)t->seed, t->batch, t->seq,
              t->grad_accum, t->opt.total_steps, train_tokens, t->freeze_embeds);
    return 0;
}

/* Restores AdamW moments and the data position saved beside a checkpoint, and
 * checks that the run continues with the settings that produced it. */
static int optimizer_load(Model *m, const char *dir, const TrainArgs *t, size_t train_tokens,
                          int *step, int *epoch, size_t *next) {
    char path[PATH_LEN], name[MLKV_NAME_MAX + 4];
    SafeTensors st;
    if (make_path(path, dir, "/optimizer.safetensors") != 0 || st_open(&st, path) != 0) return -1;
    int rc = 0;
    struct { const char *key; unsigned long long now;
    } same[] = {{"seed", t->seed},
                {"batch", (unsigned long long)t->batch},
                {"seq", (unsigned long long)t->seq},
                {"grad_accum", (unsigned long long)t->grad_accum},
                {"steps", (unsigned long long)t->opt.total_steps},
                {"train_tokens", train_tokens},
                {"freeze_embeds", (unsigned long long)t->freeze_embeds}};
    for (size_t i = 0; rc == 0 && i < sizeof(same) / sizeof(same[0]); i++) {
        const char *v = st_metadata(&st, same[i].key);
        /* checkpoints from before the option */
        if (!v && !strcmp(same[i].key, "freeze_embeds")) v = "0";
        if (!v) rc = fail("%s: metadata has no \"%s\"", path, same[i].key);
        else if (strtoull(v, NULL, 10) != same[i].now)
            rc = fail("%s: the run being resumed used %s %s, this "
                      "one %llu; resume with the same settings", path, same[i].key, v, same[i].now);
    }
    const char *s_step = st_metadata(&st, "step"), *s_epoch = st_metadata(&st, "epoch"),
               *s_next = st_metadata(&st, "next");
    if (rc == 0 && (!s_step || !s_epoch || !s_next))
        rc = fail("%s: metadata lacks step, epoch or next", path);
    for (int i = 0; rc == 0 && i < m->n_params; i++) {
        const ParamInfo *p = &m->params[i];
        snprintf(name, sizeof(name), "m.%s", p->name);
        rc = st_read(&st, name, p->ndim, p->shape, m->adam_m + p->offset, NULL);
        snprintf(name, sizeof(name), "v.%s", p->name);
        if (rc == 0) rc = st_read(&st, name, p->ndim, p->shape, m->adam_v + p->offset, NULL);
    }
    /* the position to resume from, checked: a step within the run, an epoch, a sequence of the data
     */
    long long v_step = 0, v_epoch = 0, v_next = 0;
    if (rc == 0 && (parse_count(s_step, t->steps, &v_step) != 0 ||
                    parse_count(s_epoch, 1 << 30, &v_epoch) != 0 ||
                    parse_count(s_next, (long long)train_tokens, &v_next) != 0))
        rc = fail("%s: metadata step \"%s\", epoch \"%s\", next \"%s\" are not a position in this "
                  "run of %d steps over %zu tokens",
                  path, printable(s_step), printable(s_epoch), printable(s_next), t->steps,
                  train_tokens);
    if (rc == 0) {
        *step = (int)v_step;
        *epoch = (int)v_epoch;
        *next = (size_t)v_next;
    }
    st_close(&st);
    return rc;
}

/* On resume, the log keeps the rows up to the resumed step. */
static FILE *open_log(const char *path, int resume_step) {
    char *old = NULL;
    size_t len = 0;
    if (resume_step > 0 && read_file(path, &old, &len) != 0) old = NULL;
    FILE *f = fopen(path, "w");
    if (!f) { free(old); fail("%s: cannot create: %s", path, strerror(errno)); return NULL; }
    fprintf(f, "step,loss,lr,grad_norm,tokens_per_s,val_loss\n");
    for (char *line = old ? strtok(old, "\n") : NULL; line; line = strtok(NULL, "\n"))
        if (line[0] >= '0' && line[0] <= '9' && strtol(line, NULL, 10) <= resume_step)
            fprintf(f, "%s\n", line);
    free(old);
    fflush(f);
    return f;
}

/* The sequence length when --seq is not given: the model's window, at most
 * the reference's 2048 */
static int default_seq_len(const Config *c) {
    return c->max_position_embeddings < 2048 ? c->max_position_embeddings : 2048;
}

/* KV cache bytes per token: 2 (K and V) * kvL * kvH * head_size elements */
static long kv_cache_bytes(const Config *c, int bytes_per_element) {
    return 2L * c->n_kv_layer * c->n_kv_head * c->head_size * bytes_per_element;
}

/* How layers that read another layer's K/V see its keys: the two rotary modes */
static const char *rotary_mode(const Config *c) {
    int shares = 0;
    for (int l = 0; l < c->n_layer; l++) shares |= c->kv_layer_of[l] != l;
    return !shares                ? "no layer shares K/V"
           : c->shared_key_rotary ? "shared keys rotated (mlkv_shared_key_rotary true)"
                                  : "shared keys un-rotated, as the reference code computes "
                                    "(mlkv_shared_key_rotary false)";
}

#define MIN_PLANNED_STEPS 20 /* fewer optimizer steps from --epochs are refused */

/* A graceful stop: the first SIGINT or SIGTERM during training is noted and
 * the run ends after the current step, with a checkpoint; a second one, of
 * either kind, ends the process at once (a save cut short leaves the last
 * checkpoint whole). Two signals sent together may reach two threads at
 * the same moment, so the first is claimed with an atomic exchange: the
 * handler that finds one already noted restores the default and re-raises. */
static atomic_int stop_signal;

static void note_stop_signal(int sig) {
    if (atomic_exchange(&stop_signal, sig) != 0) {
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
}

/* run_training's set-up: the data, the step plan (--steps, or --epochs /
 * --max-tokens over the data) with its warmup, the activations, and on
 * --resume the optimizer state and the data loader's place. A plan that
 * cannot learn is refused with one that can. */
/* The optimizer steps of t (given, or from the data: --epochs passes over
 * its n_seqs sequences, or --max-tokens of it) and the schedule's warmup. A
 * plan that cannot learn is refused with one that can: too few updates (the
 * reference's 32 x 4 sequences per step need a large corpus), or a warmup
 * that never reaches the peak learning rate (the first update always uses lr
 * 0). say_unused: print how much of the data no step uses. */
static int plan_steps(TrainArgs *t, size_t n_seqs, int say_unused) {
    int planned = t->steps == 0;
    double per_step = (double)t->batch * t->grad_accum, seqs = t->epochs * (double)n_seqs;
    if (t->max_tokens) seqs = floor((double)t->max_tokens / t->seq);
    if (planned)
        t->steps = seqs / per_step < 2147483647.0 ? (int)floor(seqs / per_step) : 2147483647;
    t->opt.total_steps = t->steps;
    t->opt.warmup_steps =
        t->warmup_steps >= 0 ? t->warmup_steps : (int)ceil(t->steps * t->warmup_ratio);
    if (t->resume) return 0;
    if (planned && t->steps < MIN_PLANNED_STEPS) {
        int accum = (int)floor(seqs / (MIN_PLANNED_STEPS * (double)t->batch));
        return fail("%s: %zu sequences of %d tokens make %d optimizer step%s of %d x %d "
                    "sequences: too few to learn. Try %s%d, or --epochs %.0f, or give --steps",
                    t->train_path, n_seqs, t->seq, t->steps, plural(t->steps), t->batch,
                    t->grad_accum, accum >= 1 ? "--grad-accum " : "--batch 1 --grad-accum ",
                    accum >= 1 ? accum : 1, ceil(MIN_PLANNED_STEPS * per_step / (double)n_seqs));
    }
    if (t->opt.warmup_steps >= t->steps)
        return fail("warmup of %d step%s leaves none of the %d at the full learning rate (the "
                    "first update uses lr 0): give --warmup-steps below %d or more --steps",
                    t->opt.warmup_steps, plural(t->opt.warmup_steps), t->steps, t->steps);
    double unused = seqs - (double)t->steps * per_step;
    if (planned && say_unused && unused >= 1)
        printf("train: %.0f of %.0f sequences are not used (less than a whole step of %.0f)\n",
               unused, seqs, per_step);
    return 0;
}

static int training_prepare(TrainArgs *t, Model *model, TokenFile *train, TokenFile *val,
                            DataLoader *loader, int *start_step) {
    int epoch = 0;
    size_t next = 0;
    const Config *c = &model->config;
    if (t->seq == 0) t->seq = default_seq_len(c);
    if (tokens_load(train, t->train_path, c->vocab_size) != 0 ||
        (t->val_path && tokens_load(val, t->val_path, c->vocab_size) != 0))
        return -1;
    if (t->val_path && val->n_tokens < (size_t)t->seq + 1) {
        fail("%s: %zu tokens are fewer than one sequence of %d + 1", t->val_path, val->n_tokens,
             t->seq);
        return -1;
    }
    if (loader_init(loader, train, t->batch, t->seq, t->seed, 1) != 0)
        return fail_in(t->train_path);
    if (model_prepare(model, t->batch, t->seq, 1) != 0 || plan_steps(t, loader->n_seqs, 1) != 0)
        return -1;
    model->freeze_embeddings = t->freeze_embeds;
    if (t->resume &&
        optimizer_load(model, t->out_dir, t, train->n_tokens, start_step, &epoch, &next) != 0)
        return -1;
    loader_seek(loader, epoch, next);
    return 0;
}

/* What a run is about to do: precision, model, data and plan, threads. */
static void print_training_plan(const TrainArgs *t, const Model *model, const TokenFile *train,
                                const DataLoader *loader, int start_step, size_t tokens_per_step,
                                int bf16_kernel) {
    const Config *c = &model->config;
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    if (t->precision == PRECISION_BF16)
        printf("precision: bf16 matmul inputs, fp32 sums and weights (%s)\n",
               bf16_kernel == BF16_AMX      ? "AMX tile kernel"
               : bf16_kernel == BF16_AVX512 ? "AVX512-BF16 kernel"
                                            : "portable kernel: this CPU has neither AMX nor "
                                              "AVX512-BF16, bf16 is slower than fp32 here");
    printf("model: %zu parameters, %d layer%s, %d head%s, K/V in %d layer%s x %d head%s (KV cache "
           "%ld bytes/token fp32); %s\n",
           model->num_parameters, c->n_layer, plural(c->n_layer), c->n_head, plural(c->n_head),
           c->n_kv_layer, plural(c->n_kv_layer), c->n_kv_head, plural(c->n_kv_head),
           kv_cache_bytes(c, 4), rotary_mode(c));
    printf("train: %zu tokens (%zu sequences of %d), %d step%s of "
           "%d x %d x %d = %zu tokens, warmup %d, %d thread%s\n",
           train->n_tokens, loader->n_seqs, t->seq, t->steps, plural(t->steps), t->batch,
           t->grad_accum, t->seq, tokens_per_step, t->opt.warmup_steps, threads, plural(threads));
    if (t->freeze_embeds)
        printf("train: the token embedding and the output head are frozen (--freeze-embeds)\n");
    if (t->resume) printf("resuming at step %d of %d from %s\n", start_step, t->steps, t->out_dir);
    if (t->verbose) model_print_memory(model);
}

/* One optimizer step in the log file (every step: step, loss, lr, gradient
 * norm, tokens/s, validation loss or empty) and, when `printed`, on stdout. */
static int log_step(FILE *log, const char *log_path, int printed, const TrainArgs *t, int step,
                    float loss, double norm, double tokens_per_s, double eta_seconds,
                    float val_loss) {
    double lr = lr_at_step(&t->opt, step);
    if (printed) {
        char eta[32]; /* NAN: the first step of a run, no estimate yet */
        if (!isnan(eta_seconds)) format_duration(eta, sizeof(eta), eta_seconds);
        else snprintf(eta, sizeof(eta), "after step %d", step + 2);
        printf("step %5d/%d | loss %.4f | lr %.2e | norm %.3f | %.0f tok/s | eta %s", step + 1,
               t->steps, loss, lr, norm, tokens_per_s, eta);
        if (!isnan(val_loss)) printf(" | val %.4f", val_loss);
        printf("\n");
        fflush(stdout);
    }
    fprintf(log, "%d,%.9g,%.9g,%.9g,%.1f,", step + 1, loss, lr, norm, tokens_per_s);
    if (!isnan(val_loss)) fprintf(log, "%.9g", val_loss);
    fprintf(log, "\n");
    if (fflush(log) != 0 || ferror(log))
        return fail("%s: write error (%s)", log_path, strerror(errno));
    return 0;
}

/* The checkpoint after `step` steps: the model, the AdamW moments and the
 * run's position (optimizer.safetensors' metadata, which a resume checks),
 * with the tokenizer files of the folder the run started from. */
static int save_training(const TrainArgs *t, const Model *model, int step, const DataLoader *loader,
                         size_t train_tokens) {
    StrBuf meta = {0};
    optimizer_metadata(&meta, t, step, loader, train_tokens);
    int rc = checkpoint_save(model, t->out_dir, meta.s, t->resume ? t->out_dir : t->model_dir, 0);
    free(meta.s);
    return rc;
}

/* Trains as t says; 0, or -1 with the error recorded. A stop by --max-time or a
 * signal saves a checkpoint and returns 0 with t->finished < t->steps and
 * t->stopped_by the signal (0 for --max-time). */
static int run_training(TrainArgs *t) {
    t->finished = 0;
    t->stopped_by = 0;
    Model model;
    TokenFile train = {0}, val = {0};
    DataLoader loader = {0};
    FILE *log = NULL;
    int *batch_tokens = NULL, rc = -1, start_step = 0, timed_out = 0; /* timed_out: stopped early */
    char log_path[PATH_LEN], lock_path[PATH_LEN];
    use_threads(t->threads);
    if (make_path(log_path, t->out_dir, ".log.csv") != 0 || lock_output(t->out_dir, lock_path) != 0)
        return -1;
    if (t->resume) {
        if (model_load(&model, t->out_dir) != 0) {
            char previous[PATH_LEN], error[sizeof(error_message)];
            if (make_path(previous, t->out_dir, ".previous") == 0 && file_exists(previous)) {
                snprintf(error, sizeof(error), "%s", mlkv_error());
                fail("%s\nmlkv: note: %s holds the last complete checkpoint (a save was "
                     "interrupted); rename it to %s to resume", error, previous, t->out_dir);
            }
            unlink(lock_path);
            return -1;
        }
    } else if (check_output_dir(t->out_dir, t->model_dir, t->overwrite,
                                " (its run and log too), --resume to continue its run") != 0 ||
               model_load(&model, t->model_dir) != 0) {
        unlink(lock_path);
        return -1;
    }
    if (training_prepare(t, &model, &train, &val, &loader, &start_step) != 0) goto done;
    batch_tokens =
        alloc_zeroed((size_t)t->grad_accum * t->batch * (t->seq + 1), sizeof(int), "the batch");
    if (!batch_tokens || !(log = open_log(log_path, start_step))) goto done;

    int bf16_kernel = gemm_set_precision((Precision)t->precision, 1);
    size_t tokens_per_step = (size_t)t->batch * t->seq * t->grad_accum;
    print_training_plan(t, &model, &train, &loader, start_step, tokens_per_step, bf16_kernel);

    int last_step = t->stop_after > 0 && t->stop_after < t->steps - start_step
                        ? start_step + t->stop_after
                        : t->steps;
    double t_start = now_seconds(), first_step_end = 0;
    int finished = start_step;
    atomic_store(&stop_signal, 0);
    signal(SIGINT, note_stop_signal);
    signal(SIGTERM, note_stop_signal);
    for (int step = start_step; step < last_step && !timed_out; step++) {
        double t0 = now_seconds(), norm;
        for (int acc = 0; acc < t->grad_accum; acc++)
            loader_next(&loader, batch_tokens + (size_t)acc * t->batch * (t->seq + 1));
        float loss = train_step(&model, &t->opt, batch_tokens, t->grad_accum, step, &norm);
        if (!isfinite(loss) || !isfinite(norm)) {
            fail("training diverged: loss %g, gradient norm %g at step %d; the parameters were not "
                 "updated and no checkpoint was written (lower --lr or check the data)",
                 loss, norm, step + 1);
            goto done;
        }
        double dt = now_seconds() - t0, elapsed = now_seconds() - t_start;
        int done_steps = finished = step + 1;
        float val_loss = NAN;
        timed_out =
            (stop_signal || (t->max_time > 0 && elapsed >= t->max_time)) && done_steps < last_step;
        int is_last = done_steps == last_step || timed_out;
        if (val.tokens && ((t->eval_every > 0 && done_steps % t->eval_every == 0) || is_last))
            val_loss = evaluate(&model, &val, t->val_batches);
        /* the time left at the pace of the steps after the first, which also touches every
         * buffer for the first time and runs several times slower: no estimate from it */
        if (step == start_step) first_step_end = now_seconds();
        double eta = is_last                ? 0
                     : step == start_step ? NAN
                                          : (now_seconds() - first_step_end) /
                                                (done_steps - start_step - 1) *
                                                (last_step - done_steps);
        int printed = done_steps % t->log_every == 0 || is_last || !isnan(val_loss) ||
                      step <= start_step + 1;
        if (log_step(log, log_path, printed, t, step, loss, norm, tokens_per_step / dt, eta,
                     val_loss) != 0)
            goto done;
        if ((t->save_every > 0 && done_steps % t->save_every == 0) || is_last)
            if (save_training(t, &model, done_steps, &loader, train.n_tokens) != 0) goto done;
    }
    t->finished = finished;
    /* resumed at its last step (make demo run again): nothing was trained or saved */
    if (finished == start_step)
        printf("%s: already trained to step %d of %d; nothing to do\n", t->out_dir, finished,
               t->steps);
    else
        printf("saved %s (log %s) in %.1fs\n", t->out_dir, log_path, now_seconds() - t_start);
    if (timed_out) {
        t->stopped_by = stop_signal;
        printf("stopped by %s after step %d of %d%s%s\n",
               stop_signal == SIGINT ? "SIGINT" : stop_signal == SIGTERM ? "SIGTERM" : "--max-time",
               finished, t->steps, t->how_to_continue ? ": continue with " : "",
               t->how_to_continue ? t->how_to_continue : "");
    }
    rc = 0;
done:
    signal(SIGINT, SIG_DFL); /* outside training a signal ends the process at once */
    signal(SIGTERM, SIG_DFL);
    if (log) fclose(log);
    free(batch_tokens);
    loader_free(&loader);
    tokens_free(&train);
    tokens_free(&val);
    model_free(&model);
    unlink(lock_path);
    return rc;
}

/* ===========================================================================
 * 10. Evaluation: the loss of a token file, and the reference's zero-shot
 *     tasks as lm-evaluation-harness scores them
 * ======================================================================== */

/* A task file: one JSON object per line, {"task", "kind", "context",
 * "choices", "gold", "context_ids", "continuation_ids"}: a document of kind
 * "multiple_choice" (scored by which choice's continuation is most likely) or
 * "loglikelihood" (one continuation, lambada: its likelihood and whether
 * greedy decoding produces it). The ids are the harness's: context, and each
 * continuation (target delimiter included) tokenized as the harness does;
 * python3 tokenize.py tasks writes them. A task of one's own may leave out
 * all but "context", "choices" and "gold" (one choice: no gold): the task is
 * named after its file, one choice is a loglikelihood task and several a
 * multiple-choice one, "target_delimiter" is a space, and the ids come from
 * the model's tokenizer (task_encode_pair). */
typedef struct {
    int *context, n_context, n_choices, gold;
    int **continuation, *n_continuation;
    int *chars;          /* each choice's length in characters (code points), for acc_norm */
} TaskDoc;
typedef struct {
    char name[64];
    int loglikelihood;   /* kind: 1 lambada-style, 0 multiple choice */
    int acc_norm;        /* whether the task reports acc_norm ("metrics" of its documents) */
    TaskDoc *docs;
    int n_docs, max_choices, max_context, max_continuation;
} Task;

static void task_free(Task *t) {
    for (int d = 0; d < t->n_docs; d++) {
        TaskDoc *doc = &t->docs[d];
        for (int i = 0; i < doc->n_choices; i++) free(doc->continuation[i]);
        free(doc->continuation);
        free(doc->n_continuation);
        free(doc->chars);
        free(doc->context);
    }
    free(t->docs);
    memset(t, 0, sizeof(*t));
}

/* ids of a JSON array: each a token id below vocab, at least min of them */
static int json_ids(const Json *a, int vocab, int min, int **out, int *n) {
    if (!a || a->type != JSON_ARRAY || a->length < (size_t)min || a->length > (1u << 20)) return -1;
    *out = malloc((a->length ? a->length : 1) * sizeof(int));
    if (!*out) return -1;
    for (size_t i = 0; i < a->length; i++) {
        if (!json_is_count(&a->items[i]) || a->items[i].number >= vocab) {
            free(*out);
            *out = NULL;
            return -1;
        }
        (*out)[i] = (int)a->items[i].number;
    }
    *n = (int)a->length;
    return 0;
}

static int utf8_code_points(const char *s) {
    int n = 0;
    for (; *s; s++) n += ((unsigned char)*s & 0xC0) != 0x80;
    return n;
}

/* What the documents of a task file without token ids need: the task's
 * name by default (the file's), and the tokenizer (a tokenizer.json or a
 * model folder holding one), loaded at the first such document. */
typedef struct {
    const char *path, *tokenizer_path;
    char default_name[64];
    Tokenizer tokenizer;
    int loaded;
} TaskText;

/* Python's str.isspace() on ASCII, which the harness's rstrip() strips */
static int python_space(char c) {
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1C && c <= 0x1F);
}

/* The ids of ids[0..n) below vocab, in a new array */
static int checked_ids(const int *ids, int n, int vocab, int **out) {
    for (int i = 0; i < n; i++)
        if (ids[i] >= vocab)
            return fail("the tokenizer gives id %d, past the model's vocabulary of %d", ids[i],
                        vocab);
    if (!(*out = malloc(sizeof(int) * (size_t)(n ? n : 1)))) return fail("out of memory");
    memcpy(*out, ids, sizeof(int) * (size_t)n);
    return 0;
}

/* lm-evaluation-harness's _encode_pair on text: the context's trailing white
 * space moves into the continuation; the continuation's ids are those of
 * context + continuation after the context's own ids; an empty context is
 * <|endoftext|> alone. The same ids as python3 tokenize.py tasks writes. */
static int task_encode_pair(TaskText *tt, const char *context, const char *continuation,
                            int vocab, int **context_ids, int *n_context_ids,
                            int **continuation_ids, int *n_continuation_ids) {
    if (!tt->loaded) {
        if (!tt->tokenizer_path)
            return fail("no token ids, and no tokenizer to make them: give --tokenizer FILE");
        if (tokenizer_load(&tt->tokenizer, tt->tokenizer_path) != 0)
            return fail_in("no token ids here, and the tokenizer to make them (--tokenizer "
                           "FILE, else the model folder's)");
        tt->loaded = 1;
    }
    size_t n_text = strlen(context), n_whole = n_text + strlen(continuation), kept = n_text;
    while (kept > 0 && python_space(context[kept - 1])) kept--;
    char *whole = malloc(n_whole + 1);
    /* ids of the context, then of the whole: byte-level BPE makes at most one per byte */
    int *ids = malloc(sizeof(int) * 2 * (n_whole + 1)), *all = ids + n_whole + 1, rc = 0;
    if (!whole || !ids) rc = fail("out of memory");
    if (rc == 0) snprintf(whole, n_whole + 1, "%s%s", context, continuation);
    for (size_t i = 0; rc == 0 && i < n_whole; i++)
        if ((unsigned char)whole[i] >= 0x80)
            rc = fail("the text is not ASCII, which mlkv's tokenizer does not encode exactly: "
                      "write the file's ids with python3 tokenize.py tasks --tokenizer FILE "
                      "--input %s --out FILE2", tt->path);
    int n_ctx = 0, n_all = 0;
    if (rc == 0 && kept == 0) { /* the context is <|endoftext|>, the whole text continues it */
        if ((ids[0] = tt->tokenizer.eot_id) < 0) rc = fail("an empty context needs <|endoftext|>");
        n_ctx = 1;
        all[0] = ids[0];
        int n = rc == 0 ? tokenizer_encode(&tt->tokenizer, whole, all + 1, (int)n_whole) : -1;
        n_all = n < 0 ? -1 : n + 1;
    } else if (rc == 0) {
        whole[kept] = '\0';
        n_ctx = tokenizer_encode(&tt->tokenizer, whole, ids, (int)n_whole + 1);
        whole[kept] = context[kept] ? context[kept] : continuation[0];
        n_all = n_ctx < 0 ? -1 : tokenizer_encode(&tt->tokenizer, whole, all, (int)n_whole + 1);
    }
    if (rc == 0 && (n_ctx < 0 || n_all < 0)) rc = -1;
    else if (rc == 0 && n_all <= n_ctx)
        rc = fail("the choice \"%s\" adds no token to the context", printable(continuation));
    if (rc == 0) rc = checked_ids(ids, n_ctx, vocab, context_ids);
    if (rc == 0) rc = checked_ids(all + n_ctx, n_all - n_ctx, vocab, continuation_ids);
    *n_context_ids = n_ctx;
    *n_continuation_ids = n_all - n_ctx;
    free(whole);
    free(ids);
    return rc;
}

/* A string member of j, def when absent; NULL when it is there but no string */
static const char *json_string_or(const Json *j, const char *key, const char *def) {
    const Json *v = json_get(j, key);
    return !v ? def : v->type == JSON_STRING ? v->string : NULL;
}

/* One document of a task file: its task and kind (given, or the defaults of a
 * task of one's own), the context's ids, the continuations' ids (below vocab;
 * given, or made from the text by tt's tokenizer) and the gold answer. */
static int task_doc_parse(TaskDoc *doc, const Json *j, Task *t, int vocab, TaskText *tt) {
    if (j->type != JSON_OBJECT) return fail("not a JSON object");
    const Json *choices = json_get(j, "choices"), *gold = json_get(j, "gold");
    const Json *context_ids = json_get(j, "context_ids"), *conts = json_get(j, "continuation_ids");
    if (!choices || choices->type != JSON_ARRAY || choices->length < 1 || choices->length > 64)
        return fail("\"choices\" must list 1 to 64 strings");
    for (size_t i = 0; i < choices->length; i++)
        if (choices->items[i].type != JSON_STRING) return fail("choice %zu is not a string", i);
    const char *task = json_string_or(j, "task", tt->default_name),
               *kind = json_string_or(j, "kind",
                                      choices->length == 1 ? "loglikelihood" : "multiple_choice");
    if (!task || !kind) return fail("\"task\" and \"kind\" must be strings");
    if (!*task || strlen(task) >= sizeof(t->name))
        return fail("a task name of %zu characters: 1 to %zu", strlen(task), sizeof(t->name) - 1);
    int ll = strcmp(kind, "loglikelihood") == 0;
    if (!ll && strcmp(kind, "multiple_choice") != 0)
        return fail("kind \"%s\" is neither multiple_choice nor loglikelihood", printable(kind));
    if (ll && choices->length != 1)
        return fail("a loglikelihood document has exactly one choice");
    if (!t->name[0]) { /* the first document names the task */
        const Json *metrics = json_get(j, "metrics");
        snprintf(t->name, sizeof(t->name), "%s", task);
        t->loglikelihood = ll;
        t->acc_norm = !metrics && !ll; /* a task of one's own: acc and acc_norm */
        for (size_t i = 0; metrics && metrics->type == JSON_ARRAY && i < metrics->length; i++)
            t->acc_norm |= metrics->items[i].type == JSON_STRING &&
                           !strcmp(metrics->items[i].string, "acc_norm");
    } else if (strcmp(t->name, task) != 0 || t->loglikelihood != ll)
        return fail("task \"%s\" (%s) in a file of %s", printable(task), kind,
                    printable(t->name));
    if (!gold && choices->length > 1) return fail("\"gold\" must be the index of a choice");
    if (gold && (!json_is_count(gold) || gold->number >= (double)choices->length))
        return fail("\"gold\" must be the index of a choice");
    if (!context_ids != !conts)
        return fail("give both \"context_ids\" and \"continuation_ids\", or neither (then "
                    "the text is tokenized)");
    if (conts && (conts->type != JSON_ARRAY || conts->length != choices->length))
        return fail("\"continuation_ids\" must have one list per choice");
    const char *context = json_string_or(j, "context", NULL),
               *delimiter = json_string_or(j, "target_delimiter", " ");
    if (!conts && (!context || !delimiter))
        return fail("\"context\" and \"target_delimiter\" must be strings");
    doc->n_choices = (int)choices->length;
    doc->gold = gold ? (int)gold->number : 0;
    doc->continuation = calloc((size_t)doc->n_choices, sizeof(int *));
    doc->n_continuation = calloc((size_t)doc->n_choices, sizeof(int));
    doc->chars = calloc((size_t)doc->n_choices, sizeof(int));
    if (!doc->continuation || !doc->n_continuation || !doc->chars) return fail("out of memory");
    if (context_ids &&
        json_ids(context_ids, vocab, 1, &doc->context, &doc->n_context) != 0)
        return fail(
            "\"context_ids\" must be a non-empty list of token ids below the vocabulary size %d",
            vocab);
    for (int i = 0; i < doc->n_choices; i++) {
        const char *choice = choices->items[i].string;
        doc->chars[i] = utf8_code_points(choice);
        if (!conts) { /* the text, tokenized: the context's ids once, each choice's */
            StrBuf continuation = {0};
            sb_printf(&continuation, "%s%s", delimiter, choice);
            int *ctx = NULL, n_ctx = 0;
            int rc = continuation.s ? task_encode_pair(tt, context, continuation.s, vocab, &ctx,
                                                       &n_ctx, &doc->continuation[i],
                                                       &doc->n_continuation[i])
                                    : fail("out of memory");
            free(continuation.s);
            if (i == 0) doc->context = ctx, doc->n_context = n_ctx;
            else free(ctx);
            if (rc != 0) return -1;
        } else if (json_ids(&conts->items[i], vocab, 1, &doc->continuation[i],
                            &doc->n_continuation[i]) != 0)
            return fail("continuation_ids[%d] must be a non-empty list "
                        "of token ids below the vocabulary size %d", i, vocab);
        t->max_continuation = doc->n_continuation[i] > t->max_continuation ? doc->n_continuation[i]
                                                                           : t->max_continuation;
    }
    t->max_choices = doc->n_choices > t->max_choices ? doc->n_choices : t->max_choices;
    t->max_context = doc->n_context > t->max_context ? doc->n_context : t->max_context;
    return 0;
}

/* A task's name by default: its file's name without .jsonl */
static void task_name_of(const char *path, char *name, size_t room) {
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    size_t n = strlen(base);
    if (n > 6 && !strcmp(base + n - 6, ".jsonl")) n -= 6;
    snprintf(name, room, "%.*s", (int)n, base);
}

/* Reads up to limit documents (0: all) of a task file; tokenizer (a
 * tokenizer.json or a model folder holding one, or NULL) makes the ids of
 * documents that have none. */
static int task_load(Task *t, const char *path, int vocab, int limit, const char *tokenizer) {
    char *text;
    size_t len;
    memset(t, 0, sizeof(*t));
    if (read_file(path, &text, &len) != 0) return -1;
    TaskText tt = {.path = path, .tokenizer_path = tokenizer};
    task_name_of(path, tt.default_name, sizeof(tt.default_name));
    int rc = 0, line_no = 0, cap = 0;
    for (char *line = text, *next;
         rc == 0 && line < text + len && (limit == 0 || t->n_docs < limit); line = next) {
        char *end = memchr(line, '\n', (size_t)(text + len - line));
        next = end ? end + 1 : text + len;
        line_no++;
        size_t n = (size_t)((end ? end : text + len) - line);
        while (n > 0 && (line[n - 1] == '\r' || line[n - 1] == ' ')) n--;
        if (n == 0) continue;
        TaskDoc *docs = grow(t->docs, t->n_docs, &cap, sizeof(TaskDoc));
        if (!docs) { rc = fail("%s: out of memory", path); break; }
        t->docs = docs;
        TaskDoc *doc = memset(&t->docs[t->n_docs++], 0, sizeof(TaskDoc));
        char where[PATH_LEN + 16];
        snprintf(where, sizeof(where), "%s:%d", path, line_no);
        Json j;
        if (json_parse(line, n, where, &j) != 0) rc = -1;
        else if (task_doc_parse(doc, &j, t, vocab, &tt) != 0) rc = fail_in(where);
        json_free(&j);
    }
    free(text);
    if (tt.loaded) tokenizer_free(&tt.tokenizer);
    if (rc == 0 && t->n_docs == 0) rc = fail("%s: no documents", path);
    if (rc != 0) task_free(t);
    return rc;
}

/* Copies the first `length` cached positions of the one sequence of src into
 * every sequence of dst (a model's caches both): a shared context is computed
 * once and continued in several ways. */
static void kv_cache_fork(KVCache *dst, const KVCache *src, const Config *cf, int length) {
    size_t hs = (size_t)cf->head_size, kvH = (size_t)cf->n_kv_head;
    for (int slot = 0; slot < cf->n_kv_layer; slot++)
        for (int b = 0; b < dst->B; b++)
            for (size_t h = 0; h < kvH; h++) {
                size_t from = (((size_t)slot * kvH + h) * src->max_T) * hs;
                size_t to = ((((size_t)slot * dst->B + b) * kvH + h) * dst->max_T) * hs;
                memcpy(dst->k + to, src->k + from, (size_t)length * hs * sizeof(float));
                memcpy(dst->v + to, src->v + from, (size_t)length * hs * sizeof(float));
            }
    dst->length = length;
}

/* log softmax(z)[target] of a row of n logits, and whether target is its
 * argmax (the first, on ties, as torch.argmax) */
static double log_probability(const float *z, int n, int target, int *greedy) {
    double max = row_max(z, n), sum = 0;
    for (int i = 0; i < n; i++) sum += exp((double)z[i] - max);
    *greedy = argmax(z, n) == target;
    return (double)z[target] - max - log(sum);
}

/* The scoring caches: a context alone, then B continuations of it at once */
typedef struct { KVCache context, choices; } TaskCaches;

/* The loglikelihood of each continuation of a document given its context,
 * and whether greedy decoding would produce it (harness: _loglikelihood_tokens).
 * The input of choice i is context + continuation_i without its last token,
 * cut from the left to the model's window (max_position_embeddings) as the
 * harness cuts it; the logits at the last len(continuation_i) positions score
 * the continuation. When no cut is needed the context runs once and every
 * choice continues it from a copy of its KV cache; otherwise each choice runs
 * alone with its own cut. */
static int score_document(Model *m, TaskCaches *tc, const TaskDoc *doc, double *ll, int *greedy,
                          int *scratch) {
    int window = m->config.max_position_embeddings, V = m->config.vocab_size, longest = 0;
    for (int i = 0; i < doc->n_choices; i++)
        longest = doc->n_continuation[i] > longest ? doc->n_continuation[i] : longest;
    int shared = doc->n_context + longest - 1 <= window;
    for (int first = 0; first < doc->n_choices; first += shared ? doc->n_choices : 1) {
        int count = shared ? doc->n_choices : 1,
            n_cont = shared ? longest : doc->n_continuation[first];
        /* this request's context: the last (window + 1 - n_cont) of context + continuation's tokens
         */
        int cut = doc->n_context + n_cont - 1 > window ? doc->n_context + n_cont - 1 - window : 0;
        int ctx_len = doc->n_context - cut;
        if (ctx_len < 1)
            return fail("a continuation of %d tokens does not fit the model's window of %d", n_cont,
                        window);
        /* a long context loses its start */
        memcpy(scratch, doc->context + cut, (size_t)ctx_len * sizeof(int));
        tc->context.length = 0;
        const float *last = model_cached_forward(m, &tc->context, scratch, ctx_len);
        if (!last) return -1;
        for (int i = first; i < first + count; i++) {
            /* the first continuation token: from the context's end */
            int g;
            ll[i] = log_probability(last, V, doc->continuation[i][0], &g);
            greedy[i] = g;
        }
        if (n_cont < 2) continue;
        kv_cache_fork(&tc->choices, &tc->context, &m->config, ctx_len);
        int width = n_cont - 1, B = tc->choices.B;
        for (int b = 0; b < B; b++) /* rows beyond this document's choices repeat its last one */
            for (int t = 0; t < width; t++) {
                int i = first + (b < count ? b : count - 1);
                scratch[b * width + t] =
                    t + 1 < doc->n_continuation[i] ? doc->continuation[i][t] : 0;
            }
        const float *logits = model_cached_forward(m, &tc->choices, scratch, width);
        if (!logits) return -1;
        for (int b = 0; b < count; b++) {
            int i = first + b;
            for (int t = 1; t < doc->n_continuation[i]; t++) {
                int g;
                ll[i] += log_probability(logits + ((size_t)b * width + t - 1) * V, V,
                                         doc->continuation[i][t], &g);
                greedy[i] &= g;
            }
        }
    }
    return 0;
}

/* --- the harness's metrics and their standard errors (lm_eval/api/metrics.py):
 * mean; sample standard deviation / sqrt(n) for a mean; for perplexity,
 * exp(-mean loglikelihood), and a bootstrap standard error. */
static double sample_stddev(const double *x, size_t n) {
    double mu = 0, ss = 0;
    for (size_t i = 0; i < n; i++) mu += x[i];
    mu /= (double)n;
    for (size_t i = 0; i < n; i++) ss += (x[i] - mu) * (x[i] - mu);
    return sqrt(ss / (double)(n - 1));
}

static double mean_of(const double *x, size_t n) {
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += x[i];
    return sum / (double)n;
}

/* Python's random.Random(seed) for a small int seed: the Mersenne Twister
 * MT19937 initialised by init_by_array([seed]), random() = 53 bits from two
 * outputs. The harness draws its bootstrap resamples with it, so the same
 * draws reproduce its standard errors. */
typedef struct { uint32_t mt[624]; int index; } PyRandom;

static void py_random_seed(PyRandom *r, uint32_t seed) {
    uint32_t *mt = r->mt;
    mt[0] = 19650218u;
    for (int i = 1; i < 624; i++)
        mt[i] = 1812433253u * (mt[i - 1] ^ (mt[i - 1] >> 30)) + (uint32_t)i;
    int i = 1;
    for (int k = 624; k > 0; k--) { /* the key is one word: seed */
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1664525u)) + seed;
        if (++i >= 624) { mt[0] = mt[623]; i = 1; }
    }
    for (int k = 623; k > 0; k--) {
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1566083941u)) - (uint32_t)i;
        if (++i >= 624) { mt[0] = mt[623]; i = 1; }
    }
    mt[0] = 0x80000000u;
    r->index = 624;
}

static uint32_t py_random_u32(PyRandom *r) {
    if (r->index >= 624) {
        for (int k = 0; k < 624; k++) {
            uint32_t y = (r->mt[k] & 0x80000000u) | (r->mt[(k + 1) % 624] & 0x7fffffffu);
            r->mt[k] = r->mt[(k + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
        }
        r->index = 0;
    }
    uint32_t y = r->mt[r->index++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

static double py_random(PyRandom *r) {
    uint32_t a = py_random_u32(r) >> 5, b = py_random_u32(r) >> 6;
    return (a * 67108864.0 + b) * (1.0 / 9007199254740992.0);
}

/* The harness's bootstrap_stderr(perplexity, lls, iters): chunk i of 1000
 * resamples is drawn by random.Random(i).choices(lls, k=n); the result is
 * the sample standard deviation of all resamples' perplexities. */
#define BOOTSTRAP_ITERS 100000 /* the harness's default bootstrap_iters */
static double bootstrap_perplexity_stderr(const double *ll, int n) {
    int chunk = BOOTSTRAP_ITERS < 1000 ? BOOTSTRAP_ITERS : 1000, chunks = BOOTSTRAP_ITERS / chunk;
    double *res = malloc((size_t)chunks * chunk * sizeof(double));
    if (!res) return NAN;
PARALLEL_FOR
    for (int c = 0; c < chunks; c++) {
        PyRandom r;
        py_random_seed(&r, (uint32_t)c);
        for (int k = 0; k < chunk; k++) {
            double sum = 0;
            for (int i = 0; i < n; i++) sum += ll[(int)floor(py_random(&r) * (double)n)];
            res[(size_t)c * chunk + k] = exp(-(sum / n));
        }
    }
    double se = sample_stddev(res, (size_t)chunks * chunk);
    free(res);
    return se;
}

/* Scores every document of a task and computes its metrics: multiple choice
 * acc (the most likely continuation is the right one) and acc_norm (the same
 * with each loglikelihood divided by its choice's length in characters);
 * loglikelihood tasks perplexity and acc (greedy decoding gives the target). */
static int evaluate_task(Model *m, const Task *t, TaskResult *out, double *all_ll, int *all_greedy,
                         size_t room) {
    int window = m->config.max_position_embeddings, rc = 0;
    int max_T = t->max_context + t->max_continuation < window ? t->max_context + t->max_continuation
                                                              : window;
    int chunk = t->max_continuation > 1 ? t->max_continuation - 1 : 1, B = t->max_choices;
    TaskCaches tc;
    double *ll = malloc(sizeof(double) * t->max_choices), *acc = malloc(sizeof(double) * t->n_docs);
    double *acc_norm = malloc(sizeof(double) * t->n_docs),
           *target_ll = malloc(sizeof(double) * t->n_docs);
    int *greedy = malloc(sizeof(int) * t->max_choices);
    int *scratch = malloc(sizeof(int) * (size_t)(max_T + B * chunk));
    if (!ll || !acc || !acc_norm || !target_ll || !greedy || !scratch)
        rc = fail("out of memory scoring %s", t->name);
    int caches = rc == 0 && kv_cache_init(&tc.context, m, 1, max_T, max_T, 0) == 0;
    if (caches && kv_cache_init(&tc.choices, m, B, max_T, chunk, 1) != 0) {
        kv_cache_free(&tc.context);
        caches = 0;
    }
    if (!caches) rc = -1;
    Progress bar = progress_start(t->name, "documents");
    size_t done = 0; /* continuations stored in all_ll */
    for (int d = 0; rc == 0 && d < t->n_docs; d++) {
        const TaskDoc *doc = &t->docs[d];
        if (score_document(m, &tc, doc, ll, greedy, scratch) != 0) {
            char where[128];
            snprintf(where, sizeof(where), "%s document %d", t->name, d + 1);
            rc = fail_in(where);
            break;
        }
        int best = 0, best_norm = 0; /* numpy's argmax: the first on ties */
        for (int i = 1; i < doc->n_choices; i++) {
            best = ll[i] > ll[best] ? i : best;
            best_norm =
                ll[i] / doc->chars[i] > ll[best_norm] / doc->chars[best_norm] ? i : best_norm;
        }
        for (int i = 0; all_ll && i < doc->n_choices && done < room; i++, done++) {
            all_ll[done] = ll[i];
            all_greedy[done] = greedy[i];
        }
        acc[d] = t->loglikelihood ? greedy[0] : best == doc->gold;
        acc_norm[d] = best_norm == doc->gold;
        target_ll[d] = ll[doc->gold];
        progress_show(&bar, d + 1, t->n_docs);
    }
    if (rc == 0) {
        size_t n = (size_t)t->n_docs;
        snprintf(out->task, sizeof(out->task), "%s", t->name);
        out->n_docs = t->n_docs;
        out->n_metrics = 0;
        if (t->loglikelihood)
            out->metric[out->n_metrics++] =
                (Metric){"perplexity", exp(-mean_of(target_ll, n)),
                         n > 1 ? bootstrap_perplexity_stderr(target_ll, t->n_docs) : NAN};
        out->metric[out->n_metrics++] =
            (Metric){"acc", mean_of(acc, n), n > 1 ? sample_stddev(acc, n) / sqrt((double)n) : NAN};
        if (!t->loglikelihood && t->acc_norm)
            out->metric[out->n_metrics++] =
                (Metric){"acc_norm", mean_of(acc_norm, n),
                         n > 1 ? sample_stddev(acc_norm, n) / sqrt((double)n) : NAN};
    }
    if (caches) {
        kv_cache_free(&tc.context);
        kv_cache_free(&tc.choices);
    }
    free(ll); free(acc); free(acc_norm); free(target_ll); free(greedy); free(scratch);
    return rc;
}

int evaluate_task_file(Model *m, const char *path, const char *tokenizer, int limit,
                       TaskResult *out, double *lls, int *greedy, size_t room) {
    Task t;
    if (task_load(&t, path, m->config.vocab_size, limit, tokenizer) != 0) return -1;
    int rc = evaluate_task(m, &t, out, lls, greedy, room);
    task_free(&t);
    return rc;
}

/* results.json in lm-evaluation-harness's shape: "results" (metric,filter
 * keys), "n-shot", "n-samples" and "config", so tools that read its files
 * read these; a standard error that cannot be computed (one document) is
 * "N/A", as the harness writes it. */
static int write_results_json(const char *path, const TaskResult *r, int n, const char *model_dir,
                              int limit) {
    StrBuf b = {0};
    sb_printf(&b, "{\n  \"results\": {");
    for (int t = 0; t < n; t++) {
        sb_printf(&b, "%s\n    ", t ? "," : "");
        json_write_string(&b, r[t].task);
        sb_printf(&b, ": {\"alias\": ");
        json_write_string(&b, r[t].task);
        for (int k = 0; k < r[t].n_metrics; k++) {
            sb_printf(&b, ", \"%s,none\": ", r[t].metric[k].name);
            sb_number(&b, r[t].metric[k].value);
            sb_printf(&b, ", \"%s_stderr,none\": ", r[t].metric[k].name);
            if (isnan(r[t].metric[k].stderr_)) sb_printf(&b, "\"N/A\"");
            else sb_number(&b, r[t].metric[k].stderr_);
        }
        sb_printf(&b, "}");
    }
    sb_printf(&b, "\n  },\n  \"n-shot\": {");
    for (int t = 0; t < n; t++) {
        sb_printf(&b, "%s", t ? ", " : "");
        json_write_string(&b, r[t].task);
        sb_printf(&b, ": 0");
    }
    sb_printf(&b, "},\n  \"n-samples\": {");
    for (int t = 0; t < n; t++) {
        sb_printf(&b, "%s", t ? ", " : "");
        json_write_string(&b, r[t].task);
        sb_printf(&b, ": {\"original\": %d, \"effective\": %d}", r[t].n_docs, r[t].n_docs);
    }
    sb_printf(&b, "},\n  \"config\": {\"model\": \"mlkv.c\", \"model_args\": ");
    json_write_string(&b, model_dir);
    sb_printf(&b, ", \"num_fewshot\": 0, \"bootstrap_iters\": %d, \"limit\": ", BOOTSTRAP_ITERS);
    if (limit > 0) sb_printf(&b, "%d", limit);
    else sb_printf(&b, "null");
    sb_printf(&b, "}\n}\n");
    int rc = write_text_file(path, b.s);
    free(b.s);
    return rc;
}

/* ===========================================================================
 * 11. config.json: reading and writing the model configuration (HF names)
 * ======================================================================== */

/* A number field: absent -> fallback (or an error when required). */
static int config_number(const Json *j, const char *key, double fallback, int required,
                         const char *path, double *out) {
    const Json *v = json_get(j, key);
    if (!v || v->type == JSON_NULL) {
        if (required) return fail("%s: missing \"%s\"", path, key);
        *out = fallback;
        return 0;
    }
    if (v->type != JSON_NUMBER && v->type != JSON_BOOL)
        return fail("%s: \"%s\" must be a number", path, key);
    *out = v->number;
    return 0;
}

static int config_int(const Json *j, const char *key, int fallback, int required, const char *path,
                      int *out) {
    double v = 0;
    if (config_number(j, key, fallback, required, path, &v) != 0) return -1;
    if (v != floor(v) || v < -2147483647.0 || v > 2147483647.0)
        return fail("%s: \"%s\" = %g must be an integer", path, key, v);
    *out = (int)v;
    return 0;
}

/* transformers 5 renames rotary_pct / rotary_emb_base and nests them in
 * rope_parameters; accept every spelling. */
static int config_rope(const Json *j, const char *const *keys, double fallback, const char *path,
                       double *out) {
    const Json *nested = json_get(j, "rope_parameters");
    for (int i = 0; keys[i]; i++) {
        if (json_get(j, keys[i])) return config_number(j, keys[i], fallback, 1, path, out);
        if (json_get(nested, keys[i]))
            return config_number(nested, keys[i], fallback, 1, path, out);
    }
    *out = fallback;
    return 0;
}

static int config_string_is(const Json *j, const char *key, const char *expected) {
    const Json *v = json_get(j, key);
    return !v || (v->type == JSON_STRING && strcmp(v->string, expected) == 0);
}

/* The keys mlkv reads and writes itself; config_save writes every other key
 * of the input config back unchanged. */
static const char *const managed_config_keys[] = {
    "architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "num_key_value_layers", "intermediate_size",
    "hidden_act", "rotary_pct", "rotary_emb_base", "partial_rotary_factor", "rope_theta",
    "rope_parameters", "rope_scaling", "layer_norm_eps", "initializer_range",
    "max_position_embeddings", "use_parallel_residual", "mlkv_shared_key_rotary",
    "tie_word_embeddings", "use_key_value_mlp", "kv_intermediate_size", "mlkv_kv_layer_map",
    "torch_dtype", "dtype", "attention_bias", NULL};

static char *config_extra_members(const Json *j) {
    StrBuf b = {0};
    sb_printf(&b, "%s", "");
    for (size_t i = 0; i < j->length; i++) {
        int managed = 0;
        for (int k = 0; managed_config_keys[k] && !managed; k++)
            managed = !strcmp(j->keys[i], managed_config_keys[k]);
        if (managed) continue;
        sb_printf(&b, "  ");
        json_write_string(&b, j->keys[i]);
        sb_printf(&b, ": ");
        json_write(&b, &j->items[i]);
        sb_printf(&b, ",\n");
    }
    return b.s;
}

/* The Config of a parsed config.json: GPT-NeoX's keys under HF's names (and
 * their newer spellings, partial_rotary_factor and rope_theta), MLKV's keys
 * where present; a missing required key or a wrong type is an error. */
static int config_from_json(Config *c, const Json *j, const char *path) {
    static const char *const pct_keys[] = {"rotary_pct", "partial_rotary_factor", NULL};
    static const char *const base_keys[] = {"rotary_emb_base", "rope_theta", NULL};
    memset(c, 0, sizeof(*c));
    if (j->type != JSON_OBJECT) return fail("%s: not a JSON object", path);
    if (!json_get(j, "model_type") || !config_string_is(j, "model_type", "gpt_neox"))
        return fail("%s: not a GPT-NeoX config (model_type must be \"gpt_neox\")", path);
    if (!config_string_is(j, "hidden_act", "gelu"))
        return fail("%s: hidden_act must be \"gelu\"", path);
    const Json *map = json_get(j, "mlkv_kv_layer_map");
    if (config_int(j, "vocab_size", 0, 1, path, &c->vocab_size) ||
        config_int(j, "hidden_size", 0, 1, path, &c->hidden_size) ||
        config_int(j, "num_hidden_layers", 0, 1, path, &c->n_layer) ||
        config_int(j, "num_attention_heads", 0, 1, path, &c->n_head) ||
        config_int(j, "intermediate_size", 0, 1, path, &c->intermediate_size) ||
        config_int(j, "max_position_embeddings", 2048, 0, path, &c->max_position_embeddings) ||
        config_int(j, "num_key_value_heads", c->n_head, 0, path, &c->n_kv_head) ||
        config_int(j, "num_key_value_layers", map ? 0 : c->n_layer, 0, path, &c->n_kv_layer) ||
        config_int(j, "kv_intermediate_size", 0, 0, path, &c->kv_intermediate_size) ||
        config_rope(j, pct_keys, 0.25, path, &c->rotary_pct) ||
        config_rope(j, base_keys, 10000, path, &c->rotary_base) ||
        config_number(j, "layer_norm_eps", 1e-5, 0, path, &c->layer_norm_eps) ||
        config_number(j, "initializer_range", 0.02, 0, path, &c->initializer_range))
        return -1;
    /* A config with num_key_value_layers but no mlkv_shared_key_rotary was
     * written by the reference code (mlkv always writes the key): its
     * checkpoints were trained with non-owning layers reading the owner's
     * un-rotated keys, so that is the function they compute. */
    double parallel = 1, shared_rot = json_get(j, "num_key_value_layers") ? 0 : 1, tied = 0,
           bias = 1, kv_mlp = 0;
    if (config_number(j, "use_parallel_residual", 1, 0, path, &parallel) ||
        config_number(j, "mlkv_shared_key_rotary", shared_rot, 0, path, &shared_rot) ||
        config_number(j, "tie_word_embeddings", 0, 0, path, &tied) ||
        config_number(j, "attention_bias", 1, 0, path, &bias) ||
        config_number(j, "use_key_value_mlp", 0, 0, path, &kv_mlp))
        return -1;
    if (tied != 0)
        return fail("%s: tie_word_embeddings is not supported (Pythia's head is untied)", path);
    if (bias == 0)
        return fail("%s: attention_bias false is not supported (GPT-NeoX attention has biases)",
                    path);
    const Json *scaling = json_get(j, "rope_scaling");
    if (scaling && scaling->type != JSON_NULL)
        return fail("%s: rope_scaling is not supported", path);
    if (map) {
        /* checked before kv_layer_of[] is filled */
        if (c->n_layer < 1 || c->n_layer > MLKV_MAX_LAYERS)
            return fail("%s: num_hidden_layers %d is outside 1..%d", path, c->n_layer,
                        MLKV_MAX_LAYERS);
        if (map->type != JSON_ARRAY || map->length != (size_t)c->n_layer)
            return fail(
                "%s: mlkv_kv_layer_map must be a list of num_hidden_layers (%d) layer numbers",
                path, c->n_layer);
        for (int l = 0; l < c->n_layer; l++) {
            if (!json_is_count(&map->items[l]) || map->items[l].number >= c->n_layer)
                return fail("%s: mlkv_kv_layer_map[%d] is not a layer number below %d", path, l,
                            c->n_layer);
            c->kv_layer_of[l] = (int)map->items[l].number;
        }
        c->has_kv_map = 1;
    }
    c->parallel_residual = parallel != 0;
    c->shared_key_rotary = shared_rot != 0;
    c->use_kv_mlp = kv_mlp != 0;
    return config_finalize(c, path);
}

int config_load(Config *c, const char *path, char **extra) {
    Json j;
    if (json_load_file(path, &j) != 0) return -1;
    int rc = config_from_json(c, &j, path);
    if (rc == 0 && extra) *extra = config_extra_members(&j);
    json_free(&j);
    return rc;
}

/* config.json of c: `extra` (the input's other keys, kept as they were)
 * first, then the keys mlkv manages; stock: plain GPT-NeoX, without MLKV's
 * keys (an MHA model, for HF transformers as it is). */
int config_save(const Config *c, const char *extra, int stock, const char *path) {
    StrBuf b = {0};
    sb_printf(&b, "{\n%s", extra ? extra : "  \"bos_token_id\": 0,\n  \"eos_token_id\": 0,\n");
    sb_printf(&b,
              "  \"architectures\": [\"GPTNeoXForCausalLM\"],\n  \"model_type\": \"gpt_neox\",\n");
    sb_printf(&b, "  \"vocab_size\": %d,\n  \"hidden_size\": %d,\n  \"num_hidden_layers\": %d,\n",
              c->vocab_size, c->hidden_size, c->n_layer);
    sb_printf(&b,
              "  \"num_attention_heads\": %d,\n  \"intermediate_size\": "
              "%d,\n  \"hidden_act\": \"gelu\",\n", c->n_head, c->intermediate_size);
    const char *names[] = {"rotary_pct", "rotary_emb_base", "partial_rotary_factor",
                           "rope_theta", "layer_norm_eps",  "initializer_range"};
    double values[] = {c->rotary_pct,  c->rotary_base,    c->rotary_pct,
                       c->rotary_base, c->layer_norm_eps, c->initializer_range};
    for (int i = 0; i < 6; i++) {
        /* rotary in both spellings: transformers 4 reads the first, 5 the second */
        sb_printf(&b, "  \"%s\": ", names[i]);
        sb_number(&b, values[i]);
        sb_printf(&b, ",\n");
    }
    sb_printf(&b, "  \"max_position_embeddings\": %d,\n  \"use_parallel_residual\": %s,\n",
              c->max_position_embeddings, c->parallel_residual ? "true" : "false");
    if (!stock) {
        sb_printf(&b, "  \"num_key_value_heads\": %d,\n  \"num_key_value_layers\": %d,\n",
                  c->n_kv_head, c->n_kv_layer);
        sb_printf(&b, "  \"mlkv_shared_key_rotary\": %s,\n",
                  c->shared_key_rotary ? "true" : "false");
        if (c->use_kv_mlp)
            sb_printf(&b, "  \"use_key_value_mlp\": true,\n  \"kv_intermediate_size\": %d,\n",
                      c->kv_intermediate_size);
        if (c->has_kv_map) {
            sb_printf(&b, "  \"mlkv_kv_layer_map\": [");
            for (int l = 0; l < c->n_layer; l++)
                sb_printf(&b, "%s%d", l ? ", " : "", c->kv_layer_of[l]);
            sb_printf(&b, "],\n");
        }
    }
    sb_printf(&b, "  \"torch_dtype\": \"float32\",\n  \"tie_word_embeddings\": false\n}\n");
    int rc = write_text_file(path, b.s);
    free(b.s);
    return rc;
}

/* ===========================================================================
 * 12. safetensors and checkpoints: safetensors read (an 8-byte header
 *     length, a JSON header, the data; F32, F16 and BF16 read as float) and
 *     written; PyTorch's pytorch_model.bin (a zip holding a pickle) read by
 *     a small unpickler that builds tensors and refuses anything else; a
 *     model folder loaded whole (one file or shards, HF's fused
 *     query_key_value split per head); and mlkv's checkpoint folders,
 *     written in full beside the old one and then swapped in by renames.
 * ======================================================================== */

static size_t dtype_size(const char *dtype) {
    static const struct { const char *name; size_t size; } sizes[] = {
        {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F64", 8}, {"I32", 4}, {"I64", 8}, {"I16", 2},
        {"I8", 1}, {"U8", 1}, {"BOOL", 1}};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        if (strcmp(dtype, sizes[i].name) == 0) return sizes[i].size;
    return 0;
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF,
             bits;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24 */
        float v = ldexpf((float)mantissa, -24);
        return sign ? -v : v;
    }
    if (exponent == 31) bits = sign | 0x7F800000u | (mantissa << 13);
    else bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static int st_check_entry(const SafeTensors *st, const char *name, const Json *e, size_t data_len) {
    const Json *dtype = json_get(e, "dtype"), *shape = json_get(e, "shape"),
               *off = json_get(e, "data_offsets");
    if (!dtype || dtype->type != JSON_STRING || !dtype_size(dtype->string))
        return fail("%s: tensor %s has a missing or unknown dtype", st->path, printable(name));
    if (!shape || shape->type != JSON_ARRAY || shape->length > 8)
        return fail("%s: tensor %s has a malformed shape", st->path, printable(name));
    double numel = 1;
    for (size_t i = 0; i < shape->length; i++) {
        if (!json_is_count(&shape->items[i]))
            return fail("%s: tensor %s has a malformed shape", st->path, printable(name));
        numel *= shape->items[i].number;
    }
    if (!off || off->type != JSON_ARRAY || off->length != 2 || !json_is_count(&off->items[0]) ||
        !json_is_count(&off->items[1]) || off->items[0].number > off->items[1].number)
        return fail("%s: tensor %s has malformed data_offsets", st->path, printable(name));
    if (off->items[1].number > (double)data_len)
        return fail(
            "%s: tensor %s ends at byte %.0f past the data (%zu bytes): the file is truncated",
            st->path, printable(name), off->items[1].number, data_len);
    if (off->items[1].number - off->items[0].number != numel * (double)dtype_size(dtype->string))
        return fail("%s: tensor %s: data_offsets span %.0f bytes, but shape and dtype need %.0f",
                    st->path, printable(name), off->items[1].number - off->items[0].number,
                    numel * (double)dtype_size(dtype->string));
    return 0;
}

/* safetensors tensors own their bytes: no two data_offsets ranges overlap
 * (sorted by start, each must begin at or after every earlier one's end) */
typedef struct { double begin, end; const char *name; } Span;
static int span_order(const void *a, const void *b) {
    double x = ((const Span *)a)->begin, y = ((const Span *)b)->begin;
    return x < y ? -1 : x > y;
}
/* No two tensors' data overlap: the spans sorted, each beginning at or after
 * the end of the one before. */
static int st_disjoint(const SafeTensors *st) {
    Span *spans = malloc((st->header.length + 1) * sizeof(Span));
    size_t n = 0;
    if (!spans) return fail("%s: out of memory", st->path);
    for (size_t i = 0; i < st->header.length; i++) {
        const Json *off = json_get(&st->header.items[i], "data_offsets");
        if (strcmp(st->header.keys[i], "__metadata__") != 0)
            spans[n++] = (Span){off->items[0].number, off->items[1].number, st->header.keys[i]};
    }
    qsort(spans, n, sizeof(Span), span_order);
    int rc = 0;
    for (size_t i = 1, reach = 0; rc == 0 && i < n; i++) {
        /* reach: the span that ends last so far */
        if (spans[i - 1].end > spans[reach].end) reach = i - 1;
        if (spans[i].begin < spans[reach].end && spans[i].end > spans[i].begin)
            rc = fail("%s: tensors %s and %s share bytes (overlapping data_offsets)", st->path,
                      printable(spans[reach].name), printable(spans[i].name));
    }
    free(spans);
    return rc;
}

/* Opens a safetensors file and checks its header before any read: every
 * tensor's dtype, shape and offsets within the data, no two overlapping. */
int st_open(SafeTensors *st, const char *path) {
    memset(st, 0, sizeof(*st));
    snprintf(st->path, sizeof(st->path), "%s", path);
    if (!(st->f = open_regular(path, &st->file_size))) return -1;
    unsigned char len_bytes[8];
    uint64_t header_len = 0;
    if (st->file_size < 8 || fread(len_bytes, 1, 8, st->f) != 8) {
        st_close(st);
        return fail("%s: too short to be a safetensors file", path);
    }
    for (int i = 7; i >= 0; i--) header_len = header_len << 8 | len_bytes[i];
    if (header_len < 2 || header_len > st->file_size - 8 || header_len > (100u << 20)) {
        st_close(st);
        return fail("%s: header length %llu does not fit the file "
                    "(%zu bytes): not safetensors, or truncated",
                    path, (unsigned long long)header_len, st->file_size);
    }
    char *text = malloc(header_len);
    if (!text) { st_close(st); return fail("%s: out of memory for the header", path); }
    if (fread(text, 1, header_len, st->f) != header_len) {
        free(text); st_close(st); return fail("%s: cannot read the header", path);
    }
    int rc = json_parse(text, header_len, path, &st->header);
    free(text);
    if (rc != 0) { st_close(st); return -1; }
    if (st->header.type != JSON_OBJECT) {
        st_close(st);
        return fail("%s: header is not a JSON object", path);
    }
    st->data_start = 8 + header_len;
    for (size_t i = 0; i < st->header.length; i++) {
        if (strcmp(st->header.keys[i], "__metadata__") == 0) continue;
        if (st_check_entry(st, st->header.keys[i], &st->header.items[i],
                           st->file_size - st->data_start) != 0) {
            st_close(st);
            return -1;
        }
    }
    if (st_disjoint(st) != 0) { st_close(st); return -1; }
    return 0;
}

void st_close(SafeTensors *st) {
    if (st->f) fclose(st->f);
    json_free(&st->header);
    st->f = NULL;
}

const Json *st_entry(const SafeTensors *st, const char *name) {
    return strcmp(name, "__metadata__") == 0 ? NULL : json_get(&st->header, name);
}

const char *st_metadata(const SafeTensors *st, const char *key) {
    const Json *v = json_get(json_get(&st->header, "__metadata__"), key);
    return v && v->type == JSON_STRING ? v->string : NULL;
}

/* One tensor of the shape asked for, converted to float or int (mlkv.h). */
int st_read(const SafeTensors *st, const char *name, int ndim, const int *shape, float *fdst,
            int *idst) {
    const Json *e = st_entry(st, name);
    if (!e) return fail("%s: missing tensor %s", st->path, name);
    const Json *sh = json_get(e, "shape");
    const char *dtype = json_get(e, "dtype")->string;
    int same = (int)sh->length == ndim;
    for (int i = 0; same && i < ndim; i++) same = sh->items[i].number == shape[i];
    if (!same) {
        char want[64] = "", got[64] = "";
        for (int i = 0; i < ndim; i++)
            snprintf(want + strlen(want), sizeof(want) - strlen(want), "%s%d", i ? ", " : "",
                     shape[i]);
        for (size_t i = 0; i < sh->length; i++)
            snprintf(got + strlen(got), sizeof(got) - strlen(got), "%s%.0f", i ? ", " : "",
                     sh->items[i].number);
        return fail("%s: tensor %s has shape [%s], expected [%s]", st->path, name, got, want);
    }
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) numel *= (size_t)shape[i];
    int is_float = !strcmp(dtype, "F32") || !strcmp(dtype, "F16") || !strcmp(dtype, "BF16");
    int is_int = !strcmp(dtype, "I32") || !strcmp(dtype, "I64");
    if ((fdst && !is_float) || (idst && !is_int))
        return fail("%s: tensor %s has dtype %s, expected %s", st->path, name, dtype,
                    fdst ? "F32, F16 or BF16" : "I32 or I64");
    size_t esize = dtype_size(dtype);
    double begin = json_get(e, "data_offsets")->items[0].number;
    if (fseek(st->f, (long)(st->data_start + (size_t)begin), SEEK_SET) != 0)
        return fail("%s: cannot seek to tensor %s", st->path, name);
    /* convert through a small buffer: no second copy of a large tensor */
    unsigned char buf[1 << 16];
    size_t per = sizeof(buf) / esize;
    for (size_t done = 0; done < numel;) {
        size_t n = numel - done < per ? numel - done : per;
        if (fread(buf, esize, n, st->f) != n)
            return fail("%s: read error in tensor %s (truncated?)", st->path, name);
        for (size_t i = 0; i < n; i++) {
            const unsigned char *b = buf + i * esize;
            uint16_t u16;
            uint32_t u32;
            int32_t i32;
            int64_t i64;
            float f;
            if (!strcmp(dtype, "F32")) { memcpy(&f, b, 4); fdst[done + i] = f;
            } else if (!strcmp(dtype, "F16")) {
                memcpy(&u16, b, 2);
                fdst[done + i] = half_to_float(u16);
            } else if (!strcmp(dtype, "BF16")) {
                memcpy(&u16, b, 2);
                u32 = (uint32_t)u16 << 16;
                memcpy(&f, &u32, 4);
                fdst[done + i] = f;
            } else if (!strcmp(dtype, "I32")) {
                memcpy(&i32, b, 4);
                idst[done + i] = i32;
            } else {
                memcpy(&i64, b, 8);
                idst[done + i] = (int)i64;
            }
        }
        done += n;
    }
    return 0;
}

/* --- pytorch_model.bin: what torch.save writes, read without running it.
 * The file is a zip archive (entries stored, not compressed) holding
 *   PREFIX/data.pkl    the state dict, pickled (Python's pickle protocol 2)
 *   PREFIX/data/KEY    the raw little-endian bytes of each storage
 * A pickle is a program for a small stack machine; unpickling it in Python
 * may call any function it names. Here only the opcodes and the few
 * functions that a state dict of tensors needs are understood:
 *   collections.OrderedDict()                         the dict itself
 *   torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
 *   torch._utils._rebuild_parameter(tensor, ...)      an nn.Parameter
 *   torch.{Float,Half,BFloat16}Storage                storage types, named by
 *     the persistent id ('storage', type, KEY, location, numel) of BINPERSID;
 *   torch.{Bool,Byte,Char,Short,Int,Long,Double}Storage  those of the buffers
 *     that transformers 4 saved beside the parameters (a bool or uint8 causal
 *     mask): read so that load_params_from can check and skip them by name
 * and anything else is refused, naming it: nothing is executed. Each tensor
 * must be a contiguous view (any offset) into its storage; its bytes are then
 * one span of the file, so the result is the same index a safetensors header
 * gives (offsets counted from the file's start), and st_read serves both. */
typedef enum {
    PK_MARK,
    PK_NONE,
    PK_BOOL,
    PK_INT,
    PK_FLOAT,
    PK_TEXT,
    PK_TUPLE,
    PK_LIST,
    PK_DICT,
    PK_FUNCTION,
    PK_STORAGE,
    PK_TENSOR
} PickleKind;
typedef enum {
    FN_ORDERED_DICT,
    FN_REBUILD_TENSOR,
    FN_REBUILD_PARAMETER,
    FN_STORAGE /* the first storage type; the others follow in pickle_functions' order */
} PickleFunction;
static const struct { const char *module, *name, *dtype; /* dtype: a storage's safetensors name */
} pickle_functions[] = {{"collections", "OrderedDict", NULL},
                        {"torch._utils", "_rebuild_tensor_v2", NULL},
                        {"torch._utils", "_rebuild_parameter", NULL},
                        {"torch", "FloatStorage", "F32"},
                        {"torch", "HalfStorage", "F16"},
                        {"torch", "BFloat16Storage", "BF16"},
                        {"torch", "DoubleStorage", "F64"},
                        {"torch", "LongStorage", "I64"},
                        {"torch", "IntStorage", "I32"},
                        {"torch", "ShortStorage", "I16"},
                        {"torch", "CharStorage", "I8"},
                        {"torch", "ByteStorage", "U8"},
                        {"torch", "BoolStorage", "BOOL"}};

typedef struct {
    PickleKind kind;
    /* INT, BOOL; FUNCTION: a PickleFunction; STORAGE: elements; TENSOR: offset in elements */
    int64_t number;
    char *text;       /* TEXT; STORAGE: its key */
    /* TUPLE, LIST; DICT: key, value, key, value ...; TENSOR: storage, shape (a tuple) */
    int *items;
    int n_items, cap;
    const char *dtype; /* STORAGE, TENSOR */
} PickleValue;

#define PICKLE_MAX_VALUES (1 << 20) /* a state dict of 1000 tensors makes about 20,000 */
typedef struct {
    const char *path;
    PickleValue *values; /* every value made, referred to by index */
    int n_values, cap_values;
    int *stack, depth, cap_stack;
    int *memo, cap_memo, memo_size; /* memo[i]: a value index, or -1; memo_size: how many are set */
} Pickle;

static int pickle_new(Pickle *p, PickleKind kind, int64_t number) {
    if (p->n_values == PICKLE_MAX_VALUES)
        return fail("%s: data.pkl holds too many values", p->path);
    PickleValue *v = grow(p->values, p->n_values, &p->cap_values, sizeof(*v));
    if (!v) return fail("%s: out of memory reading data.pkl", p->path);
    p->values = v;
    p->values[p->n_values] = (PickleValue){.kind = kind, .number = number};
    return p->n_values++;
}

static int pickle_add_item(Pickle *p, int container, int item) {
    PickleValue *c = &p->values[container];
    int *items = grow(c->items, c->n_items, &c->cap, sizeof(int));
    if (!items) return fail("%s: out of memory reading data.pkl", p->path);
    c->items = items;
    c->items[c->n_items++] = item;
    return 0;
}

static int pickle_push(Pickle *p, int value) {
    if (value < 0) return -1;
    int *s =
        p->depth < PICKLE_MAX_VALUES ? grow(p->stack, p->depth, &p->cap_stack, sizeof(int)) : NULL;
    if (!s) return fail("%s: data.pkl's stack is too deep", p->path);
    p->stack = s;
    p->stack[p->depth++] = value;
    return 0;
}

/* The top value (not a mark), popped. */
static int pickle_pop(Pickle *p) {
    if (p->depth == 0 || p->values[p->stack[p->depth - 1]].kind == PK_MARK)
        return fail("%s: data.pkl is malformed (a value is missing)", p->path);
    return p->stack[--p->depth];
}

/* The values above the topmost mark, which is removed: returns their first
 * stack slot (they stay there until the caller lowers p->depth). */
static int pickle_since_mark(Pickle *p) {
    for (int i = p->depth - 1; i >= 0; i--)
        if (p->values[p->stack[i]].kind == PK_MARK) {
            memmove(p->stack + i, p->stack + i + 1, (size_t)(p->depth - i - 1) * sizeof(int));
            p->depth--;
            return i;
        }
    return fail("%s: data.pkl is malformed (no mark)", p->path);
}

static int pickle_tuple(Pickle *p, int from) { /* the stack from slot `from` up, as a tuple */
    int t = pickle_new(p, PK_TUPLE, 0);
    for (int i = from; t >= 0 && i < p->depth; i++)
        if (pickle_add_item(p, t, p->stack[i]) != 0) return -1;
    p->depth = from;
    return t;
}

static int pickle_is_int(const Pickle *p, int v) { return p->values[v].kind == PK_INT; }

/* tensor = _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]) */
static int pickle_rebuild_tensor(Pickle *p, const PickleValue *args) {
    if (args->n_items < 4 || p->values[args->items[0]].kind != PK_STORAGE ||
        !pickle_is_int(p, args->items[1]) || p->values[args->items[2]].kind != PK_TUPLE ||
        p->values[args->items[3]].kind != PK_TUPLE)
        return fail("%s: data.pkl: malformed _rebuild_tensor_v2 arguments", p->path);
    const PickleValue *storage = &p->values[args->items[0]], *size = &p->values[args->items[2]];
    const PickleValue *stride = &p->values[args->items[3]];
    if (size->n_items != stride->n_items || size->n_items > 8)
        return fail("%s: data.pkl: a tensor's size and stride do not match", p->path);
    int64_t offset = p->values[args->items[1]].number, expected = 1;
    for (int d = size->n_items - 1; d >= 0; d--) {
        /* contiguous: each stride the product of the later sizes */
        if (!pickle_is_int(p, size->items[d]) || !pickle_is_int(p, stride->items[d]))
            return fail("%s: data.pkl: a tensor's size or stride is not an integer", p->path);
        int64_t n = p->values[size->items[d]].number, s = p->values[stride->items[d]].number;
        if (n < 0 || n > INT32_MAX)
            return fail("%s: data.pkl: a tensor dimension of %lld", p->path, (long long)n);
        if (n > 1 && s != expected)
            return fail("%s: data.pkl: a tensor is a non-contiguous view of its storage (stride "
                        "%lld where %lld is contiguous); save it with .contiguous()",
                        p->path, (long long)s, (long long)expected);
        if (n > 0 && expected > INT64_MAX / n)
            return fail("%s: data.pkl: a tensor is too large", p->path);
        expected *= n;
    }
    if (offset < 0 || offset > storage->number || expected > storage->number - offset)
        return fail("%s: data.pkl: a tensor of %lld elements at "
                    "offset %lld lies outside its storage %s of %lld",
                    p->path, (long long)expected, (long long)offset, storage->text,
                    (long long)storage->number);
    int storage_index = args->items[0], shape_index = args->items[2];
    const char *dtype = storage->dtype;
    /* (moves p->values: args and storage are stale from here) */
    int t = pickle_new(p, PK_TENSOR, offset);
    if (t < 0 || pickle_add_item(p, t, storage_index) != 0 ||
        pickle_add_item(p, t, shape_index) != 0)
        return -1;
    p->values[t].dtype = dtype;
    return t;
}

/* REDUCE: function(*args), for the whitelisted functions */
static int pickle_reduce(Pickle *p, int function, int args) {
    const PickleValue *f = &p->values[function], *a = &p->values[args];
    if (f->kind != PK_FUNCTION || a->kind != PK_TUPLE)
        return fail("%s: data.pkl: malformed REDUCE", p->path);
    switch ((PickleFunction)f->number) {
    case FN_ORDERED_DICT:
        if (a->n_items != 0)
            return fail("%s: data.pkl: OrderedDict called with arguments", p->path);
        return pickle_new(p, PK_DICT, 0);
    case FN_REBUILD_TENSOR: return pickle_rebuild_tensor(p, a);
    case FN_REBUILD_PARAMETER:
        if (a->n_items < 1 || p->values[a->items[0]].kind != PK_TENSOR)
            return fail("%s: data.pkl: malformed _rebuild_parameter arguments", p->path);
        return a->items[0];
    default: return fail("%s: data.pkl calls a storage type", p->path);
    }
}

/* BINPERSID ('storage', type, key, location, numel): one storage of the archive */
static int pickle_storage(Pickle *p, int pid) {
    const PickleValue *t = &p->values[pid];
    if (t->kind != PK_TUPLE || t->n_items != 5 || p->values[t->items[0]].kind != PK_TEXT ||
        strcmp(p->values[t->items[0]].text, "storage") != 0 ||
        p->values[t->items[1]].kind != PK_FUNCTION ||
        p->values[t->items[1]].number < FN_STORAGE || p->values[t->items[2]].kind != PK_TEXT ||
        !pickle_is_int(p, t->items[4]) || p->values[t->items[4]].number < 0)
        return fail("%s: data.pkl: a persistent id that is not a storage of tensors", p->path);
    int s = pickle_new(p, PK_STORAGE, p->values[t->items[4]].number);
    if (s < 0) return -1;
    t = &p->values[pid]; /* pickle_new may have moved the values */
    p->values[s].text = p->values[t->items[2]].text;
    p->values[s].dtype = pickle_functions[p->values[t->items[1]].number].dtype;
    return s;
}

static int pickle_memo_put(Pickle *p, int64_t index) {
    if (p->depth == 0) return fail("%s: data.pkl is malformed (memo of nothing)", p->path);
    if (index < 0 || index >= PICKLE_MAX_VALUES)
        return fail("%s: data.pkl: memo index %lld", p->path, (long long)index);
    if (index >= p->cap_memo) {
        int cap = (int)index + 1 > 2 * p->cap_memo ? (int)index + 1 : 2 * p->cap_memo;
        int *m = realloc(p->memo, (size_t)cap * sizeof(int));
        if (!m) return fail("%s: out of memory reading data.pkl", p->path);
        for (int i = p->cap_memo; i < cap; i++) m[i] = -1;
        p->memo = m;
        p->cap_memo = cap;
    }
    p->memo_size += p->memo[index] < 0;
    p->memo[index] = p->stack[p->depth - 1];
    return 0;
}

/* Little-endian unsigned integer of n bytes at s */
static uint64_t read_le(const unsigned char *s, int n) {
    uint64_t x = 0;
    for (int i = n - 1; i >= 0; i--) x = x << 8 | s[i];
    return x;
}

/* Runs the pickle program; returns the index of its result. */
/* GLOBAL "module\nname\n" (read from code at *at) or STACK_GLOBAL (module
 * and name on the stack): the function, if it is one of pickle_functions; any
 * other is refused, so nothing a file names is ever run. Its value, or -1. */
static int pickle_global(Pickle *p, unsigned char op, const unsigned char *code, size_t len,
                         size_t *at) {
    char module[64] = "", name[64] = "";
    if (op == 'c') {
        for (int part = 0; part < 2; part++) {
            char *dst = part ? name : module;
            const unsigned char *nl = memchr(code + *at, '\n', len - *at);
            if (!nl || nl - (code + *at) >= 63)
                return fail("%s: data.pkl: malformed GLOBAL", p->path);
            memcpy(dst, code + *at, (size_t)(nl - (code + *at)));
            *at = (size_t)(nl - code) + 1;
        }
    } else {
        int ni = pickle_pop(p), mi = ni < 0 ? -1 : pickle_pop(p);
        if (mi < 0) return -1;
        if (p->values[ni].kind != PK_TEXT || p->values[mi].kind != PK_TEXT)
            return fail("%s: data.pkl: malformed STACK_GLOBAL", p->path);
        snprintf(module, sizeof(module), "%s", p->values[mi].text);
        snprintf(name, sizeof(name), "%s", p->values[ni].text);
    }
    int found = -1;
    for (int i = 0; i < (int)(sizeof(pickle_functions) / sizeof(pickle_functions[0])); i++)
        if (!strcmp(module, pickle_functions[i].module) && !strcmp(name, pickle_functions[i].name))
            found = i;
    if (found < 0)
        return fail("%s: data.pkl names %s.%s, which a state dict of tensors does "
                    "not use: refused (nothing in the file is executed)",
                    p->path, printable(module), printable(name));
    return pickle_new(p, PK_FUNCTION, found);
}

/* SETITEM, SETITEMS (op 's', 'u': key-value pairs into a dict), APPEND,
 * APPENDS ('a', 'e': items into a list): one pair or item, or all since the
 * mark, added to the container below them. 0, or -1. */
static int pickle_add_items(Pickle *p, unsigned char op) {
    int single = op == 's' || op == 'a', is_dict = op == 's' || op == 'u';
    int from = single ? p->depth - (is_dict ? 2 : 1) : pickle_since_mark(p);
    if (from < 1 || (is_dict && (p->depth - from) % 2 != 0))
        return from < 0 ? -1 : fail("%s: data.pkl is malformed (SETITEMS)", p->path);
    int target = p->stack[from - 1];
    if (p->values[target].kind != (is_dict ? PK_DICT : PK_LIST))
        return fail("%s: data.pkl: items added to a %s", p->path,
                    is_dict ? "non-dict" : "non-list");
    for (int i = from; i < p->depth; i++) {
        if (p->values[p->stack[i]].kind == PK_MARK)
            return fail("%s: data.pkl is malformed", p->path);
        if (pickle_add_item(p, target, p->stack[i]) != 0) return -1;
    }
    p->depth = from;
    return 0;
}

static int pickle_run(Pickle *p, const unsigned char *code, size_t len) {
    size_t at = 0;
#define NEED(n) if (len - at < (size_t)(n)) return fail("%s: data.pkl is truncated", p->path)
    for (;;) {
        NEED(1);
        unsigned char op = code[at++];
        int v = 0, w, from;
        int64_t n;
        switch (op) {
        case 0x80: NEED(1); at++; break;            /* PROTO */
        case 0x95: NEED(8); at += 8; break;          /* FRAME: a length hint */
        case '(': v = pickle_push(p, pickle_new(p, PK_MARK, 0)); break;
        case 'N': v = pickle_push(p, pickle_new(p, PK_NONE, 0)); break;
        case 0x88: case 0x89: v = pickle_push(p, pickle_new(p, PK_BOOL, op == 0x88)); break;
        case ')': v = pickle_push(p, pickle_new(p, PK_TUPLE, 0)); break;
        case ']': v = pickle_push(p, pickle_new(p, PK_LIST, 0)); break;
        case '}': v = pickle_push(p, pickle_new(p, PK_DICT, 0)); break;
        case 'K': NEED(1); v = pickle_push(p, pickle_new(p, PK_INT, code[at])); at += 1; break;
        case 'M':
            NEED(2);
            v = pickle_push(p, pickle_new(p, PK_INT, (int64_t)read_le(code + at, 2)));
            at += 2;
            break;
        case 'J':
            NEED(4);
            v = pickle_push(p, pickle_new(p, PK_INT, (int32_t)(uint32_t)read_le(code + at, 4)));
            at += 4;
            break;
        case 0x8a: /* LONG1: n bytes, two's complement */
            NEED(1);
            n = code[at++];
            if (n > 8) return fail("%s: data.pkl: an integer of %d bytes", p->path, (int)n);
            NEED(n);
            {
                uint64_t u = read_le(code + at, (int)n);
                if (n > 0 && n < 8 && (code[at + n - 1] & 0x80))
                    u |= ~(uint64_t)0 << (8 * n); /* sign-extend */
                v = pickle_push(p, pickle_new(p, PK_INT, (int64_t)u));
            }
            at += (size_t)n;
            break;
        /* BINFLOAT */
        case 'G': NEED(8); at += 8; v = pickle_push(p, pickle_new(p, PK_FLOAT, 0)); break;
        case 'X': case 0x8c: case 0x8d: { /* BINUNICODE (4-byte length), SHORT_ (1), 8 (8) */
            int lb = op == 'X' ? 4 : op == 0x8c ? 1 : 8;
            NEED(lb);
            uint64_t sl = read_le(code + at, lb);
            at += (size_t)lb;
            NEED(sl);
            w = pickle_new(p, PK_TEXT, 0);
            if (w < 0 || !(p->values[w].text = malloc(sl + 1)))
                return w < 0 ? -1 : fail("%s: out of memory", p->path);
            memcpy(p->values[w].text, code + at, sl);
            p->values[w].text[sl] = '\0';
            at += sl;
            v = pickle_push(p, w);
            break;
        }
        case 'c': case 0x93: v = pickle_push(p, pickle_global(p, op, code, len, &at)); break;
        case 'Q': /* BINPERSID */
            if ((w = pickle_pop(p)) < 0) return -1;
            v = pickle_push(p, pickle_storage(p, w));
            break;
        case 't':
            if ((from = pickle_since_mark(p)) < 0) return -1;
            v = pickle_push(p, pickle_tuple(p, from));
            break;
        case 0x85: case 0x86: case 0x87: /* TUPLE1..3 */
            if (p->depth < op - 0x84)
                return fail("%s: data.pkl is malformed (a value is missing)", p->path);
            for (int i = p->depth - (op - 0x84); i < p->depth; i++)
                if (p->values[p->stack[i]].kind == PK_MARK)
                    return fail("%s: data.pkl is malformed", p->path);
            v = pickle_push(p, pickle_tuple(p, p->depth - (op - 0x84)));
            break;
        case 'R': /* REDUCE */
            if ((w = pickle_pop(p)) < 0 || (v = pickle_pop(p)) < 0) return -1;
            v = pickle_push(p, pickle_reduce(p, v, w));
            break;
        case 'b': /* BUILD: the state of an OrderedDict (its _metadata) is not needed */
            if ((w = pickle_pop(p)) < 0 || p->depth == 0 ||
                p->values[p->stack[p->depth - 1]].kind != PK_DICT)
                return w < 0 ? -1
                             : fail("%s: data.pkl: BUILD of something other than a dict", p->path);
            break;
        case 's': case 'u': case 'a': case 'e': v = pickle_add_items(p, op); break;
        case 'q': NEED(1); v = pickle_memo_put(p, code[at]); at += 1; break;
        case 'r': NEED(4); v = pickle_memo_put(p, (int64_t)read_le(code + at, 4)); at += 4; break;
        case 0x94: v = pickle_memo_put(p, p->memo_size); break; /* MEMOIZE: at the memo's length */
        case 'h': case 'j': { /* BINGET, LONG_BINGET */
            int lb = op == 'h' ? 1 : 4;
            NEED(lb);
            int64_t index = (int64_t)read_le(code + at, lb);
            at += (size_t)lb;
            if (index >= p->cap_memo || p->memo[index] < 0)
                return fail("%s: data.pkl refers to memo %lld, never stored", p->path,
                            (long long)index);
            v = pickle_push(p, p->memo[index]);
            break;
        }
        case '.': /* STOP */
            if (p->depth != 1)
                return fail("%s: data.pkl is malformed (%d values left)", p->path, p->depth);
            return p->stack[0];
        default:
            return fail("%s: data.pkl uses pickle opcode 0x%02x, which "
                        "a state dict of tensors does not need: refused", p->path, op);
        }
        if (v < 0) return -1;
    }
#undef NEED
}

/* The zip container. Only what torch.save writes is accepted: entries
 * stored without compression, found through the central directory at the
 * end of the file (with its zip64 extension for files past 4 GiB). */
typedef struct { char *name; uint64_t header_at, size; int stored; } ZipEntry;

static int read_at(FILE *f, uint64_t at, void *buf, size_t n) {
    if (at > (uint64_t)LONG_MAX || fseek(f, (long)at, SEEK_SET) != 0) return -1;
    return fread(buf, 1, n, f) == n ? 0 : -1;
}

static void zip_free(ZipEntry *e, int n) {
    for (int i = 0; i < n; i++) free(e[i].name);
    free(e);
}

/* The entries of a zip archive, from its central directory (zip64 too):
 * names, sizes, where their local headers are, whether stored. */
static int zip_list(const char *path, FILE *f, uint64_t file_size, ZipEntry **out, int *n_out) {
    unsigned char tail[22 + 65535], rec[56];
    size_t tail_len = file_size < sizeof(tail) ? (size_t)file_size : sizeof(tail);
    *out = NULL;
    *n_out = 0;
    if (tail_len < 22 || read_at(f, file_size - tail_len, tail, tail_len) != 0)
        return fail("%s: not a zip archive (too short)", path);
    /* the end-of-central-directory record, searched from the end */
    size_t eocd = tail_len - 22 + 1;
    while (eocd-- > 0 && read_le(tail + eocd, 4) != 0x06054b50) {}
    if (eocd == (size_t)-1)
        return fail("%s: not a zip archive (no end of central directory): truncated?", path);
    uint64_t count = read_le(tail + eocd + 10, 2), cd_size = read_le(tail + eocd + 12, 4);
    uint64_t cd_at = read_le(tail + eocd + 16, 4), eocd_at = file_size - tail_len + eocd;
    if (count == 0xFFFF || cd_size == 0xFFFFFFFF || cd_at == 0xFFFFFFFF) {
        /* zip64: the locator sits before */
        if (eocd_at < 20 || read_at(f, eocd_at - 20, rec, 20) != 0 ||
            read_le(rec, 4) != 0x07064b50 || read_at(f, read_le(rec + 8, 8), rec, 56) != 0 ||
            read_le(rec, 4) != 0x06064b50)
            return fail("%s: malformed zip64 end of central directory", path);
        count = read_le(rec + 32, 8), cd_size = read_le(rec + 40, 8), cd_at = read_le(rec + 48, 8);
    }
    if (cd_at > file_size || cd_size > file_size - cd_at || cd_size > (64u << 20) ||
        count > cd_size / 46)
        return fail("%s: the zip central directory (%llu entries, "
                    "%llu bytes at %llu) does not fit the file",
                    path, (unsigned long long)count, (unsigned long long)cd_size,
                    (unsigned long long)cd_at);
    unsigned char *cd = malloc(cd_size ? (size_t)cd_size : 1);
    ZipEntry *e = calloc(count ? (size_t)count : 1, sizeof(ZipEntry));
    if (!cd || !e || read_at(f, cd_at, cd, (size_t)cd_size) != 0) {
        free(cd);
        free(e);
        return fail("%s: cannot read the zip central directory", path);
    }
    size_t at = 0;
    int n = 0, rc = 0;
    for (; rc == 0 && (uint64_t)n < count; n++) {
        if (cd_size - at < 46 || read_le(cd + at, 4) != 0x02014b50) {
            rc = fail("%s: malformed zip directory", path);
            break;
        }
        size_t name_len = read_le(cd + at + 28, 2), extra_len = read_le(cd + at + 30, 2);
        size_t record = 46 + name_len + extra_len + read_le(cd + at + 32, 2);
        if (cd_size - at < record || !(e[n].name = malloc(name_len + 1))) {
            rc = fail("%s: malformed zip directory", path);
            break;
        }
        memcpy(e[n].name, cd + at + 46, name_len);
        e[n].name[name_len] = '\0';
        uint64_t packed = read_le(cd + at + 20, 4), size = read_le(cd + at + 24, 4),
                 header = read_le(cd + at + 42, 4);
        /* zip64 extra field (id 1): the 8-byte values of the fields that read
         * 0xFFFFFFFF, in this order */
        for (size_t x = at + 46 + name_len; x + 4 <= at + 46 + name_len + extra_len;) {
            size_t id = read_le(cd + x, 2), len = read_le(cd + x + 2, 2), v = x + 4;
            if (x + 4 + len > at + 46 + name_len + extra_len) break;
            uint64_t *fields[3] = {&size, &packed, &header};
            for (int k = 0; id == 1 && k < 3; k++)
                if (*fields[k] == 0xFFFFFFFF && v + 8 <= x + 4 + len)
                    *fields[k] = read_le(cd + v, 8), v += 8;
            x += 4 + len;
        }
        e[n].stored = read_le(cd + at + 10, 2) == 0 && packed == size;
        e[n].size = size;
        e[n].header_at = header;
        at += record;
    }
    free(cd);
    if (rc != 0) { zip_free(e, n + 1); return rc; }
    *out = e;
    *n_out = n;
    return 0;
}

/* Where the bytes of an entry start in the file (after its local header). */
static int zip_data_at(const char *path, FILE *f, uint64_t file_size, const ZipEntry *e,
                       uint64_t *at) {
    unsigned char h[30];
    if (!e->stored)
        return fail("%s: zip entry %s is compressed (torch.save stores entries)", path,
                    printable(e->name));
    if (e->header_at > file_size || read_at(f, e->header_at, h, 30) != 0 ||
        read_le(h, 4) != 0x04034b50)
        return fail("%s: zip entry %s: malformed local header", path, printable(e->name));
    *at = e->header_at + 30 + read_le(h + 26, 2) + read_le(h + 28, 2);
    if (*at > file_size || e->size > file_size - *at)
        return fail("%s: zip entry %s ends past the end of the file: truncated", path,
                    printable(e->name));
    return 0;
}

/* A pytorch_model.bin as a tensor index: st->header as a safetensors header
 * whose data_offsets count from the start of the file (data_start 0). */
int torch_open(SafeTensors *st, const char *path) {
    memset(st, 0, sizeof(*st));
    snprintf(st->path, sizeof(st->path), "%s", path);
    if (!(st->f = open_regular(path, &st->file_size))) return -1;
    ZipEntry *e;
    int n_entries, pkl = -1, rc;
    if (zip_list(path, st->f, st->file_size, &e, &n_entries) != 0) { st_close(st); return -1; }
    for (int i = 0; i < n_entries; i++) {
        size_t len = strlen(e[i].name);
        if (len >= 9 && strcmp(e[i].name + len - 9, "/data.pkl") == 0 &&
            strchr(e[i].name, '/') == e[i].name + len - 9) {
            if (pkl >= 0) {
                zip_free(e, n_entries);
                st_close(st);
                return fail("%s: two data.pkl entries", path);
            }
            pkl = i;
        }
    }
    uint64_t pkl_at = 0;
    unsigned char *code = NULL;
    rc = pkl < 0 ? fail("%s: no PREFIX/data.pkl entry: not a file written by torch.save", path)
                 : zip_data_at(path, st->f, st->file_size, &e[pkl], &pkl_at);
    if (rc == 0 &&
        (e[pkl].size > (256u << 20) || !(code = malloc(e[pkl].size ? (size_t)e[pkl].size : 1))))
        rc = fail("%s: data.pkl of %llu bytes is too large", path, (unsigned long long)e[pkl].size);
    if (rc == 0 && read_at(st->f, pkl_at, code, (size_t)e[pkl].size) != 0)
        rc = fail("%s: cannot read data.pkl", path);
    Pickle p = {.path = path};
    int result = rc == 0 ? pickle_run(&p, code, (size_t)e[pkl].size) : -1;
    free(code);
    if (result >= 0 && p.values[result].kind != PK_DICT)
        result = fail("%s: data.pkl holds no dict of tensors (a state dict was expected)", path);
    StrBuf h = {0};
    sb_printf(&h, "{");
    const PickleValue *dict = result >= 0 ? &p.values[result] : NULL;
    rc = result < 0 ? -1 : 0;
    for (int i = 0; rc == 0 && i + 1 < dict->n_items; i += 2) {
        const PickleValue *key = &p.values[dict->items[i]], *t = &p.values[dict->items[i + 1]];
        if (key->kind != PK_TEXT) {
            rc = fail("%s: a state dict key that is not a string", path);
            break;
        }
        if (t->kind != PK_TENSOR) {
            rc = fail("%s: %s is not a tensor", path, printable(key->text));
            break;
        }
        const PickleValue *storage = &p.values[t->items[0]], *shape = &p.values[t->items[1]];
        char entry_name[PATH_LEN];
        snprintf(entry_name, sizeof(entry_name), "%.*s/data/%s", (int)(strlen(e[pkl].name) - 9),
                 e[pkl].name, storage->text);
        int found = -1;
        for (int k = 0; k < n_entries && found < 0; k++)
            found = strcmp(e[k].name, entry_name) == 0 ? k : -1;
        size_t esize = dtype_size(t->dtype);
        uint64_t at = 0, numel = 1;
        for (int d = 0; d < shape->n_items; d++)
            numel *= (uint64_t)p.values[shape->items[d]].number;
        if (found < 0) {
            rc = fail("%s: tensor %s: storage %s is missing", path, printable(key->text),
                      printable(storage->text));
            break;
        }
        if ((rc = zip_data_at(path, st->f, st->file_size, &e[found], &at)) != 0) break;
        if ((uint64_t)storage->number > e[found].size / esize) {
            rc = fail("%s: storage %s holds %llu bytes, but its tensors "
                      "need %llu elements of %zu bytes: truncated",
                      path, printable(storage->text), (unsigned long long)e[found].size,
                      (unsigned long long)storage->number, esize);
            break;
        }
        json_write_string(&h, key->text);
        sb_printf(&h, ":{\"dtype\":\"%s\",\"shape\":[", t->dtype);
        for (int d = 0; d < shape->n_items; d++)
            sb_printf(&h, "%s%lld", d ? "," : "", (long long)p.values[shape->items[d]].number);
        uint64_t begin = at + (uint64_t)t->number * esize;
        sb_printf(&h, "],\"data_offsets\":[%llu,%llu]},", (unsigned long long)begin,
                  (unsigned long long)(begin + numel * esize));
    }
    if (rc == 0 && dict->n_items > 0) h.len--; /* the last comma */
    sb_printf(&h, "}");
    /* (which refuses a name that appears twice) */
    if (rc == 0) rc = json_parse(h.s, h.len, path, &st->header);
    for (size_t i = 0; rc == 0 && i < st->header.length; i++)
        rc = st_check_entry(st, st->header.keys[i], &st->header.items[i], st->file_size);
    free(h.s);
    for (int i = 0; i < p.n_values; i++) {
        if (p.values[i].kind == PK_TEXT) free(p.values[i].text);
        free(p.values[i].items);
    }
    free(p.values);
    free(p.stack);
    free(p.memo);
    zip_free(e, n_entries);
    if (rc != 0) st_close(st);
    return rc;
}

static size_t tensor_out_numel(const TensorOut *t) {
    return (size_t)t->shape[0] * (size_t)(t->ndim == 2 ? t->shape[1] : 1);
}

/* A safetensors file of F32 tensors, its header padded to 8 bytes, every
 * write checked (a full disk is an error naming the file). */
int safetensors_write(const char *path, const TensorOut *tensors, int n,
                      const char *metadata_json) {
    StrBuf h = {0};
    size_t offset = 0;
    sb_printf(&h, "{");
    if (metadata_json) sb_printf(&h, "\"__metadata__\":%s", metadata_json);
    for (int i = 0; i < n; i++) {
        const TensorOut *t = &tensors[i];
        size_t numel = tensor_out_numel(t);
        sb_printf(&h, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%d", h.len > 1 ? "," : "", t->name,
                  t->shape[0]);
        if (t->ndim == 2) sb_printf(&h, ",%d", t->shape[1]);
        sb_printf(&h, "],\"data_offsets\":[%zu,%zu]}", offset, offset + numel * 4);
        offset += numel * 4;
    }
    sb_printf(&h, "}");
    while (h.len % 8) sb_printf(&h, " "); /* align the data to 8 bytes */
    unsigned char len_bytes[8];
    for (int i = 0; i < 8; i++) len_bytes[i] = (unsigned char)((uint64_t)h.len >> (8 * i));
    Writer w;
    if (writer_open(&w, path) != 0) { free(h.s); return -1; }
    writer_put(&w, len_bytes, 8);
    writer_put(&w, h.s, h.len);
    free(h.s);
    for (int i = 0; i < n; i++)
        writer_put(&w, tensors[i].data, tensor_out_numel(&tensors[i]) * sizeof(float));
    return writer_close(&w);
}

/* The parameter table laid over each group's base, names prefixed. */
int model_write_safetensors(const Model *m, const TensorGroup *groups, int n_groups,
                            const char *path, const char *metadata_json) {
    TensorOut *list =
        alloc_zeroed((size_t)m->n_params * n_groups, sizeof(TensorOut), "the tensor list");
    if (!list) return -1;
    int n = 0;
    for (int g = 0; g < n_groups; g++)
        for (int i = 0; i < m->n_params; i++, n++) {
            const ParamInfo *p = &m->params[i];
            snprintf(list[n].name, sizeof(list[n].name), "%s%s", groups[g].prefix, p->name);
            list[n].ndim = p->ndim;
            list[n].shape[0] = p->shape[0];
            list[n].shape[1] = p->shape[1];
            list[n].data = groups[g].base + p->offset;
        }
    int rc = safetensors_write(path, list, n, metadata_json);
    free(list);
    return rc;
}

/* The buffers that GPT-NeoX state dicts carry beside the parameters: every
 * layer of transformers before 4.31 (so EleutherAI's Pythia files, and all the
 * reference code saves: its modeling registers them in every layer, owner or
 * not) registered
 *   gpt_neox.layers.N.attention.bias                  the causal mask, bool or
 *                                                     uint8 [1, 1, P, P], P =
 *                                                     max_position_embeddings
 *   gpt_neox.layers.N.attention.masked_bias           a float scalar (-1e9)
 *   gpt_neox.layers.N.attention.rotary_emb.inv_freq   float [rotary_ndims / 2]
 * and later ones one gpt_neox.rotary_emb.inv_freq. They follow from the
 * configuration, so a model leaves them out; one that does not fit it (a
 * layer past the last, another dtype or shape) is refused, as PyTorch's
 * load_state_dict refuses it. 1: such a buffer; 0: another name; -1: refused. */
static int check_buffer(const Config *c, const char *path, const char *name, const Json *entry) {
    static const char *const kinds[] = {"bias", "masked_bias", "rotary_emb.inv_freq"};
    char canonical[MLKV_NAME_MAX], kind[32] = "rotary_emb.inv_freq";
    int layer = 0, found = !strcmp(name, "gpt_neox.rotary_emb.inv_freq");
    if (!found && sscanf(name, "gpt_neox.layers.%d.attention.%31s", &layer, kind) == 2 &&
        layer >= 0) {
        snprintf(canonical, sizeof(canonical), "gpt_neox.layers.%d.attention.%s", layer, kind);
        for (int i = 0; i < 3 && !found; i++)
            found = !strcmp(kind, kinds[i]) && !strcmp(name, canonical);
    }
    if (!found) return 0;
    if (layer >= c->n_layer)
        return fail("%s: %s belongs to layer %d, but the model has %d layers", path,
                    printable(name), layer, c->n_layer);
    const char *dtype = json_get(entry, "dtype")->string;
    const Json *shape = json_get(entry, "shape");
    int is_mask = !strcmp(kind, "bias"), is_scalar = !strcmp(kind, "masked_bias");
    int P = c->max_position_embeddings, want[4] = {1, 1, P, P};
    int ndim = is_mask ? 4 : is_scalar ? 0 : 1;
    if (!is_mask && !is_scalar) want[0] = c->rotary_ndims / 2;
    int float_dtype = !strcmp(dtype, "F32") || !strcmp(dtype, "F16") || !strcmp(dtype, "BF16");
    int ok = is_mask ? !strcmp(dtype, "BOOL") || !strcmp(dtype, "U8") : float_dtype;
    ok &= (int)shape->length == ndim;
    for (int d = 0; ok && d < ndim; d++) ok = shape->items[d].number == want[d];
    if (!ok)
        return fail("%s: buffer %s has dtype %s and %zu dimensions; a GPT-NeoX %s is %s %s", path,
                    printable(name), dtype, shape->length, kind,
                    is_mask ? "bool or uint8" : "float",
                    is_mask ? "[1, 1, max_position_embeddings, max_position_embeddings]"
                    : is_scalar ? "of no dimensions"
                                : "[rotary_ndims / 2]");
    return 1;
}

typedef struct { SafeTensors files[64]; int n; } TensorSource;

static void source_close(TensorSource *src) {
    for (int i = 0; i < src->n; i++) st_close(&src->files[i]);
    src->n = 0;
}

static const SafeTensors *source_find(const TensorSource *src, const char *name) {
    for (int i = 0; i < src->n; i++)
        if (st_entry(&src->files[i], name)) return &src->files[i];
    return NULL;
}

/* One file of tensors: pytorch_model*.bin as torch.save wrote it, else safetensors. */
static int tensor_file_open(SafeTensors *st, const char *path) {
    size_t n = strlen(path);
    return n >= 4 && strcmp(path + n - 4, ".bin") == 0 ? torch_open(st, path) : st_open(st, path);
}

/* The weights of a model folder, the first of these that exists:
 * model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin,
 * pytorch_model.bin.index.json (shards). safetensors first: it is what
 * mlkv writes, and what HF writes by default. */
static int source_open(TensorSource *src, const char *dir) {
    static const char *const singles[] = {"/model.safetensors", NULL, "/pytorch_model.bin", NULL};
    static const char *const indexes[] = {NULL, "/model.safetensors.index.json", NULL,
                                          "/pytorch_model.bin.index.json"};
    char path[PATH_LEN];
    int found = -1;
    memset(src, 0, sizeof(*src));
    for (int i = 0; i < 4 && found < 0; i++) {
        if (make_path(path, dir, singles[i] ? singles[i] : indexes[i]) != 0) return -1;
        if (file_exists(path)) found = i;
    }
    if (found < 0)
        return fail("%s: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
                    "pytorch_model.bin.index.json", dir);
    if (singles[found]) {
        if (tensor_file_open(&src->files[0], path) != 0) return -1;
        src->n = 1;
        return 0;
    }
    Json index;
    if (json_load_file(path, &index) != 0) return -1;
    const Json *map = json_get(&index, "weight_map");
    int rc = 0;
    if (!map || map->type != JSON_OBJECT) rc = fail("%s: no \"weight_map\" object", path);
    for (size_t i = 0; rc == 0 && i < map->length; i++) {
        const Json *file = &map->items[i];
        if (file->type != JSON_STRING || strchr(file->string, '/')) {
            rc = fail("%s: bad file name for %s", path, map->keys[i]);
            break;
        }
        char shard[PATH_LEN], name[PATH_LEN];
        if (make_path(name, "/", file->string) != 0 || make_path(shard, dir, name) != 0) {
            rc = -1;
            break;
        }
        int seen = 0;
        for (int k = 0; k < src->n && !seen; k++) seen = strcmp(src->files[k].path, shard) == 0;
        if (seen) continue;
        if (src->n == 64) { rc = fail("%s: more than 64 shards", path); break; }
        if (tensor_file_open(&src->files[src->n], shard) != 0) rc = -1;
        else src->n++;
    }
    json_free(&index);
    if (rc != 0) source_close(src);
    return rc;
}

/* Stock GPT-NeoX fuses q, k, v into one projection whose rows are ordered
 * [H, 3, hs]: row (h*3 + j)*hs + d is part j (0 q, 1 k, 2 v) of head h. */
static int load_fused_qkv(Model *m, const TensorSource *src, int l) {
    const Config *c = &m->config;
    int C = c->hidden_size, H = c->n_head, hs = c->head_size;
    LayerWeights *lw = &m->w.layer[l];
    char wname[MLKV_NAME_MAX], bname[MLKV_NAME_MAX];
    snprintf(wname, sizeof(wname), "gpt_neox.layers.%d.attention.query_key_value.weight", l);
    snprintf(bname, sizeof(bname), "gpt_neox.layers.%d.attention.query_key_value.bias", l);
    const SafeTensors *st = source_find(src, wname);
    if (!st)
        return fail("%s: missing tensor gpt_neox.layers.%d.attention.query.weight",
                    src->files[0].path, l);
    if (!is_mha(c))
        return fail("%s: layer %d has a fused query_key_value (plain MHA), but the config asks for "
                    "%d K/V head%s in %d layer%s: convert the checkpoint instead",
                    st->path, l, c->n_kv_head, plural(c->n_kv_head), c->n_kv_layer,
                    plural(c->n_kv_layer));
    float *fused = malloc((size_t)3 * C * (C + 1) * sizeof(float));
    if (!fused) return fail("out of memory splitting %s", wname);
    int wshape[2] = {3 * C, C}, bshape[1] = {3 * C};
    const SafeTensors *bst = source_find(src, bname);
    if (st_read(st, wname, 2, wshape, fused, NULL) != 0 ||
        (bst ? st_read(bst, bname, 1, bshape, fused + (size_t)3 * C * C, NULL)
             : fail("%s: missing tensor %s", st->path, bname)) != 0) {
        free(fused);
        return -1;
    }
    float *weights[3] = {lw->q_w, lw->k_w, lw->v_w}, *biases[3] = {lw->q_b, lw->k_b, lw->v_b};
    for (int h = 0; h < H; h++)
        for (int j = 0; j < 3; j++)
            for (int d = 0; d < hs; d++) {
                size_t row = (size_t)(h * 3 + j) * hs + d;
                memcpy(weights[j] + (size_t)(h * hs + d) * C, fused + row * C,
                       (size_t)C * sizeof(float));
                biases[j][h * hs + d] = fused[(size_t)3 * C * C + row];
            }
    free(fused);
    return 0;
}

/* Every parameter of m from the files of src (HF's fused query_key_value
 * split per head where a file has it); a tensor in the files that is no
 * parameter of this configuration is an error, but for HF's buffers. */
static int load_params_from(Model *m, const TensorSource *src) {
    for (int i = 0; i < m->n_params; i++) {
        const ParamInfo *p = &m->params[i];
        const SafeTensors *st = source_find(src, p->name);
        if (st) {
            if (st_read(st, p->name, p->ndim, p->shape, m->param_memory + p->offset, NULL) != 0)
                return -1;
            continue;
        }
        int layer;
        char kind[16];
        /* a missing unfused query means a fused checkpoint; k and v come with it */
        if (sscanf(p->name, "gpt_neox.layers.%d.attention.query.%15s", &layer, kind) == 2 &&
            !strcmp(kind, "weight")) {
            if (load_fused_qkv(m, src, layer) != 0) return -1;
            /* q, k, v weights and biases are loaded */
            i += m->config.kv_layer_of[layer] == layer ? 5 : 1;
            continue;
        }
        return fail("%s: missing tensor %s", src->files[0].path, p->name);
    }
    /* every tensor in the files must be a parameter of this configuration or one
     * of the buffers a GPT-NeoX state dict carries */
    for (int f = 0; f < src->n; f++) {
        const Json *h = &src->files[f].header;
        for (size_t i = 0; i < h->length; i++) {
            const char *name = h->keys[i];
            if (!strcmp(name, "__metadata__") || model_param(m, name)) continue;
            if (strstr(name, "attention.query_key_value.")) continue;
            int buffer = check_buffer(&m->config, src->files[f].path, name, &h->items[i]);
            if (buffer < 0) return -1;
            if (buffer) continue;
            return fail("%s: unexpected tensor %s: not a parameter of "
                        "this configuration (%d K/V layer%s of %d head%s)",
                        src->files[f].path, printable(name), m->config.n_kv_layer,
                        plural(m->config.n_kv_layer), m->config.n_kv_head,
                        plural(m->config.n_kv_head));
        }
    }
    return 0;
}

int model_load(Model *m, const char *dir) {
    char path[PATH_LEN];
    memset(m, 0, sizeof(*m));
    if (make_path(path, dir, "/config.json") != 0 ||
        config_load(&m->config, path, &m->config_extra) != 0 || model_allocate_params(m) != 0) {
        model_free(m);
        return -1;
    }
    TensorSource src;
    if (source_open(&src, dir) != 0) { model_free(m); return -1; }
    int rc = load_params_from(m, &src);
    source_close(&src);
    if (rc != 0) model_free(m);
    return rc;
}


/* Checkpoint folders are written whole into DIR.saving, then swapped in by
 * renames, so an interrupted save leaves the previous checkpoint intact (as
 * DIR, or as DIR.previous during the instant between the two renames). */
static const char *const checkpoint_files[] = {
    "config.json", "model.safetensors", "optimizer.safetensors",
    /* companions: the tokenizer and generation files of the model a checkpoint came from */
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "vocab.json", "merges.txt", NULL};
#define FIRST_COMPANION 3

static void remove_checkpoint_dir(const char *dir) {
    char path[PATH_LEN], name[PATH_LEN];
    for (int i = 0; checkpoint_files[i]; i++)
        if (make_path(name, "/", checkpoint_files[i]) == 0 && make_path(path, dir, name) == 0)
            unlink(path);
    rmdir(dir);
}

static int copy_file(const char *from, const char *to) {
    char *data;
    size_t len;
    if (read_file(from, &data, &len) != 0) return -1;
    Writer w;
    int rc = writer_open(&w, to);
    if (rc == 0) { writer_put(&w, data, len); rc = writer_close(&w); }
    free(data);
    return rc;
}

/* A folder mlkv may write: absent, or holding only checkpoint files (so a
 * save never deletes a file that mlkv did not write), and none of those
 * unless overwrite is set (so finished work is never replaced without a word;
 * train says "or --resume"), and never the folder a command reads from
 * (input: NULL, or that folder). */
static int check_output_dir(const char *dir, const char *input, int overwrite,
                            const char *or_resume) {
    struct stat st, in;
    if (stat(dir, &st) != 0) return 0;
    if (input && stat(input, &in) == 0 && in.st_dev == st.st_dev && in.st_ino == st.st_ino)
        return fail("%s is also the input model: writing there would destroy what is being read; "
                    "choose another output folder",
                    dir);
    if (!S_ISDIR(st.st_mode)) return fail("%s: exists and is not a folder", dir);
    DIR *d = opendir(dir);
    if (!d) return fail("%s: cannot list: %s", dir, strerror(errno));
    struct dirent *e;
    int rc = 0;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        int ours = 0;
        for (int i = 0; checkpoint_files[i] && !ours; i++)
            ours = !strcmp(e->d_name, checkpoint_files[i]);
        if (!ours)
            rc = fail("%s: holds %s, which mlkv did not write; choose a new output folder", dir,
                      e->d_name);
        else if (!overwrite)
            rc = fail("%s already holds a model (%s): give --overwrite "
                      "to replace it%s, or choose a new output folder",
                      dir, e->d_name, or_resume ? or_resume : "");
    }
    closedir(d);
    return rc;
}

/* DIR.lock holds the process id of the run writing DIR: a second run is
 * refused while the first lives; a lock left by a process that is gone (a
 * crash, a kill -9) is taken over. */
static int lock_output(const char *dir, char *lock_path) {
    if (make_path(lock_path, dir, ".lock") != 0) return -1;
    for (int attempt = 0; attempt < 2; attempt++) {
        int fd = open(lock_path, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd >= 0) {
            char pid[32];
            int n = snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
            int ok = write(fd, pid, (size_t)n) == n;
            close(fd);
            if (ok) return 0;
            unlink(lock_path);
            return fail("%s: cannot write the lock", lock_path);
        }
        if (errno != EEXIST) return fail("%s: cannot create: %s", lock_path, strerror(errno));
        char *text = NULL;
        size_t len;
        long long owner = 0;
        if (read_file(lock_path, &text, &len) == 0) {
            text[strcspn(text, "\n")] = '\0';
            if (parse_count(text, 1LL << 30, &owner) != 0) owner = 0;
            free(text);
        }
        if (owner > 0 && kill((pid_t)owner, 0) == 0)
            return fail("%s is being written by another mlkv run "
                        "(process %lld, %s); wait for it, or stop it", dir, owner, lock_path);
        unlink(lock_path); /* its process is gone */
    }
    return fail("%s: cannot take the lock", lock_path);
}

/* Stock GPT-NeoX layout of an MHA model: q, k, v fused per head into
 * query_key_value (rows ordered [H, 3, hs]), the inverse of load_fused_qkv. */
static int write_fused_safetensors(const Model *m, const char *path) {
    const Config *c = &m->config;
    int C = c->hidden_size, H = c->n_head, hs = c->head_size, L = c->n_layer;
    TensorOut *list = alloc_zeroed((size_t)m->n_params, sizeof(TensorOut), "the tensor list");
    float *fused = alloc_zeroed((size_t)L * 3 * C * (C + 1), sizeof(float), "fused projections");
    if (!list || !fused) { free(list); free(fused); return -1; }
    int n = 0;
    for (int i = 0; i < m->n_params; i++) {
        const ParamInfo *p = &m->params[i];
        int l;
        char part[32];
        if (sscanf(p->name, "gpt_neox.layers.%d.attention.%31[a-z.]", &l, part) == 2 &&
            (!strncmp(part, "key.", 4) || !strncmp(part, "value.", 6)))
            continue; /* written inside query_key_value */
        TensorOut *t = &list[n++];
        snprintf(t->name, sizeof(t->name), "%s", p->name);
        t->ndim = p->ndim;
        t->shape[0] = p->shape[0];
        t->shape[1] = p->shape[1];
        t->data = m->param_memory + p->offset;
        if (sscanf(p->name, "gpt_neox.layers.%d.attention.%31[a-z.]", &l, part) != 2 ||
            strncmp(part, "query.", 6))
            continue;
        int is_weight = !strcmp(part, "query.weight"), width = is_weight ? C : 1;
        float *dst = fused + (size_t)l * 3 * C * (C + 1) + (is_weight ? 0 : (size_t)3 * C * C);
        const LayerWeights *lw = &m->w.layer[l];
        const float *parts[3] = {is_weight ? lw->q_w : lw->q_b, is_weight ? lw->k_w : lw->k_b,
                                 is_weight ? lw->v_w : lw->v_b};
        for (int h = 0; h < H; h++)
            for (int j = 0; j < 3; j++)
                memcpy(dst + (size_t)((h * 3 + j) * hs) * width, parts[j] + (size_t)h * hs * width,
                       (size_t)hs * width * sizeof(float));
        snprintf(t->name, sizeof(t->name), "gpt_neox.layers.%d.attention.query_key_value.%s", l,
                 is_weight ? "weight" : "bias");
        t->shape[0] = 3 * C;
        t->data = dst;
    }
    int rc = safetensors_write(path, list, n, "{\"format\":\"pt\"}");
    free(list);
    free(fused);
    return rc;
}

/* optimizer_metadata: NULL saves the model alone. companion_dir: a folder whose
 * tokenizer and generation files travel with the checkpoint, or NULL. stock:
 * plain GPT-NeoX (fused query_key_value, no MLKV keys), for MHA models. */
static int checkpoint_save(const Model *m, const char *dir, const char *optimizer_metadata,
                           const char *companion_dir, int stock) {
    char staging[PATH_LEN], previous[PATH_LEN], path[PATH_LEN], from[PATH_LEN];
    if (make_path(staging, dir, ".saving") != 0 || make_path(previous, dir, ".previous") != 0)
        return -1;
    /* the two folders beside DIR that a save replaces are checked like DIR itself */
    if (check_output_dir(staging, NULL, 1, NULL) != 0 ||
        check_output_dir(previous, NULL, 1, NULL) != 0)
        return -1;
    remove_checkpoint_dir(staging);
    if (mkdir(staging, 0755) != 0) return fail("%s: cannot create: %s", staging, strerror(errno));
    TensorGroup params = {"", m->param_memory};
    TensorGroup moments[2] = {{"m.", m->adam_m}, {"v.", m->adam_v}};
    int rc = make_path(path, staging, "/config.json");
    if (rc == 0) rc = config_save(&m->config, m->config_extra, stock, path);
    if (rc == 0) rc = make_path(path, staging, "/model.safetensors");
    if (rc == 0)
        rc = stock ? write_fused_safetensors(m, path)
                   : model_write_safetensors(m, &params, 1, path, "{\"format\":\"pt\"}");
    if (rc == 0 && optimizer_metadata) rc = make_path(path, staging, "/optimizer.safetensors");
    if (rc == 0 && optimizer_metadata)
        rc = model_write_safetensors(m, moments, 2, path, optimizer_metadata);
    for (int i = FIRST_COMPANION; rc == 0 && companion_dir && checkpoint_files[i]; i++) {
        char name[PATH_LEN];
        rc = make_path(name, "/", checkpoint_files[i]);
        if (rc == 0 && make_path(from, companion_dir, name) == 0 && file_exists(from))
            rc = make_path(path, staging, name) == 0 ? copy_file(from, path) : -1;
    }
    if (rc != 0) { remove_checkpoint_dir(staging); return -1; }
    remove_checkpoint_dir(previous);
    if (file_exists(dir) && rename(dir, previous) != 0) {
        remove_checkpoint_dir(staging);
        return fail("%s: cannot move the old checkpoint aside: %s", dir, strerror(errno));
    }
    if (rename(staging, dir) != 0) {
        int e = errno;
        rename(previous, dir);
        return fail("%s: cannot move the new checkpoint in place: %s", dir, strerror(e));
    }
    remove_checkpoint_dir(previous);
    return 0;
}

/* ===========================================================================
 * 13. Token files (llm.c's format) and the data loader
 * ======================================================================== */

#define TOKENS_MAGIC 20240520
#define TOKENS_VERSION 1
#define TOKENS_HEADER_INTS 256

/* A token file checked whole: its header, its length, and every id below
 * vocab_size. */
/* what to do with text given where token files belong */
#define TOKENS_TEXT_HINT                                                                 \
    "; text becomes token files with tokenize.py (python3 tokenize.py shards --help)"

int tokens_load(TokenFile *tf, const char *path, int vocab_size) {
    memset(tf, 0, sizeof(*tf));
    size_t size;
    FILE *f = open_regular(path, &size);
    if (!f) return -1;
    int32_t header[TOKENS_HEADER_INTS];
    if (fread(header, sizeof(int32_t), TOKENS_HEADER_INTS, f) != TOKENS_HEADER_INTS) {
        fclose(f);
        return fail("%s: shorter than the 1024-byte header of a token file%s", path,
                    TOKENS_TEXT_HINT);
    }
    if (header[0] != TOKENS_MAGIC || header[1] != TOKENS_VERSION) {
        fclose(f);
        return fail("%s: not a token file (magic %d version %d; "
                    "expected %d version %d, llm.c's uint16 format)%s",
                    path, header[0], header[1], TOKENS_MAGIC, TOKENS_VERSION, TOKENS_TEXT_HINT);
    }
    size_t expected =
        TOKENS_HEADER_INTS * sizeof(int32_t) + (size_t)(uint32_t)header[2] * sizeof(uint16_t);
    if (header[2] < 0 || size != expected) {
        fclose(f);
        return fail("%s: header says %d tokens (%zu bytes), but the file has %zu bytes", path,
                    header[2], expected, size);
    }
    tf->n_tokens = (size_t)header[2];
    tf->tokens = alloc_zeroed(tf->n_tokens + 1, sizeof(uint16_t), path);
    if (!tf->tokens) { fclose(f); return -1; }
    if (fseek(f, TOKENS_HEADER_INTS * sizeof(int32_t), SEEK_SET) != 0 ||
        fread(tf->tokens, sizeof(uint16_t), tf->n_tokens, f) != tf->n_tokens) {
        fclose(f);
        tokens_free(tf);
        return fail("%s: read error", path);
    }
    fclose(f);
    for (size_t i = 0; i < tf->n_tokens; i++)
        if (tf->tokens[i] >= vocab_size) {
            int id = tf->tokens[i];
            tokens_free(tf);
            return fail(
                "%s: token %d at position %zu is outside the model's vocabulary (vocab_size %d)",
                path, id, i, vocab_size);
        }
    return 0;
}

int tokens_save(const char *path, const uint16_t *tokens, size_t n) {
    if (n > 2147483647u) return fail("%s: too many tokens for one file", path);
    int32_t header[TOKENS_HEADER_INTS] = {TOKENS_MAGIC, TOKENS_VERSION, (int32_t)n};
    Writer w;
    if (writer_open(&w, path) != 0) return -1;
    writer_put(&w, header, sizeof(header));
    writer_put(&w, tokens, n * sizeof(uint16_t));
    return writer_close(&w);
}

void tokens_free(TokenFile *tf) {
    free(tf->tokens);
    tf->tokens = NULL;
    tf->n_tokens = 0;
}

/* The token stream is cut into n_seqs = (n-1) / T sequences; sequence i is
 * tokens [i*T, i*T + T] (T+1 tokens: inputs and shifted targets). Training
 * visits them in an order shuffled from (seed, epoch), as HF Trainer shuffles
 * its packed samples, so a position (epoch, next) reproduces everything. */
static void loader_shuffle(DataLoader *dl) {
    for (size_t i = 0; i < dl->n_seqs; i++) dl->order[i] = i;
    if (!dl->shuffle) return;
    uint64_t rng = dl->seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(dl->epoch + 1));
    for (size_t i = dl->n_seqs - 1; i > 0; i--) {
        size_t j = (size_t)(rng_next(&rng) % (i + 1));
        size_t t = dl->order[i];
        dl->order[i] = dl->order[j];
        dl->order[j] = t;
    }
}

/* Batches of B rows of T+1 tokens (inputs and their next tokens): the file
 * cut into sequences of T tokens, each read with the token after it, in file
 * order or shuffled each epoch from seed. */
int loader_init(DataLoader *dl, const TokenFile *f, int B, int T, uint64_t seed, int shuffle) {
    memset(dl, 0, sizeof(*dl));
    dl->file = f;
    dl->B = B;
    dl->T = T;
    dl->seed = seed;
    dl->shuffle = shuffle;
    dl->n_seqs = f->n_tokens > 0 ? (f->n_tokens - 1) / (size_t)T : 0;
    if (dl->n_seqs == 0)
        return fail("%zu tokens are fewer than one sequence of %d + 1", f->n_tokens, T);
    dl->order = alloc_zeroed(dl->n_seqs, sizeof(size_t), "the data order");
    if (!dl->order) return -1;
    loader_shuffle(dl);
    return 0;
}

void loader_seek(DataLoader *dl, int epoch, size_t next) {
    dl->epoch = epoch;
    dl->next = next < dl->n_seqs ? next : 0;
    loader_shuffle(dl);
}

void loader_next(DataLoader *dl, int *rows) {
    for (int b = 0; b < dl->B; b++) {
        if (dl->next == dl->n_seqs) loader_seek(dl, dl->epoch + 1, 0);
        const uint16_t *src = dl->file->tokens + dl->order[dl->next++] * (size_t)dl->T;
        for (int t = 0; t <= dl->T; t++) rows[b * (dl->T + 1) + t] = src[t];
    }
}

void loader_free(DataLoader *dl) {
    free(dl->order);
    dl->order = NULL;
}

/* ===========================================================================
 * 14. JSON: a small recursive-descent parser into a tree, enough for
 *    config.json, safetensors headers and tokenizer.json.
 * ======================================================================== */

typedef struct { const char *start, *p, *end, *what; int depth; } JsonParser;

static int json_syntax(JsonParser *ps, const char *msg) {
    return fail("%s: invalid JSON at byte %ld: %s", ps->what, (long)(ps->p - ps->start), msg);
}

static void json_skip_space(JsonParser *ps) {
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int json_hex4(JsonParser *ps, const char *s, unsigned *out) {
    if (ps->end - s < 4) return json_syntax(ps, "short \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hex_digit(s[i]);
        if (h < 0) return json_syntax(ps, "bad \\u escape");
        v = v * 16 + (unsigned)h;
    }
    *out = v;
    return 0;
}

static size_t utf8_encode(unsigned cp, char *out) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12)); out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F)); return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18)); out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Parses a string at ps->p (just after the opening quote). Escapes only
 * shrink text, so the raw span bounds the decoded size. */
static int json_string(JsonParser *ps, char **out, size_t *out_len) {
    const char *s = ps->p;
    const char *q = s;
    while (q < ps->end && *q != '"') q += (*q == '\\') ? 2 : 1;
    if (q >= ps->end) return json_syntax(ps, "unterminated string");
    char *buf = malloc((size_t)(q - s) + 1);
    if (!buf) return fail("%s: out of memory parsing JSON", ps->what);
    size_t n = 0;
    while (s < q) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20) {
            free(buf);
            ps->p = s;
            return json_syntax(ps, "control character in string");
        }
        if (c != '\\') { buf[n++] = (char)c; s++; continue; }
        char e = s[1];
        s += 2;
        switch (e) {
        case '"': buf[n++] = '"'; break;
        case '\\': buf[n++] = '\\'; break;
        case '/': buf[n++] = '/'; break;
        case 'b': buf[n++] = '\b'; break;
        case 'f': buf[n++] = '\f'; break;
        case 'n': buf[n++] = '\n'; break;
        case 'r': buf[n++] = '\r'; break;
        case 't': buf[n++] = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            ps->p = s;
            if (json_hex4(ps, s, &cp) != 0) { free(buf); return -1; }
            s += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && q - s >= 6 && s[0] == '\\' && s[1] == 'u' &&
                json_hex4(ps, s + 2, &lo) == 0 && lo >= 0xDC00 && lo < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                s += 6;
            } else if (cp >= 0xD800 && cp < 0xE000) {
                cp = 0xFFFD; /* a lone surrogate has no UTF-8 form */
            }
            n += utf8_encode(cp, buf + n);
            break;
        }
        default: free(buf); ps->p = s - 1; return json_syntax(ps, "bad escape");
        }
    }
    buf[n] = '\0';
    ps->p = q + 1;
    *out = buf;
    *out_len = n;
    return 0;
}

static int json_value(JsonParser *ps, Json *out);

static int json_push(JsonParser *ps, Json *container, size_t *cap, char *key) {
    if (container->length == *cap) {
        size_t ncap = *cap ? *cap * 2 : 4;
        Json *items = realloc(container->items, ncap * sizeof(Json));
        if (!items) { free(key); return fail("%s: out of memory parsing JSON", ps->what); }
        container->items = items;
        if (container->type == JSON_OBJECT) {
            char **keys = realloc(container->keys, ncap * sizeof(char *));
            if (!keys) { free(key); return fail("%s: out of memory parsing JSON", ps->what); }
            container->keys = keys;
        }
        *cap = ncap;
    }
    Json *slot = &container->items[container->length];
    memset(slot, 0, sizeof(*slot));
    if (container->type == JSON_OBJECT) container->keys[container->length] = key;
    container->length++;
    return json_value(ps, slot);
}

/* An object's keys must differ: JSON leaves duplicates undefined (Python keeps
 * the last, other readers the first), so a file that has them means two
 * things and is refused. Sorted copies of the key pointers, neighbours compared. */
static int json_unique_keys(JsonParser *ps, const Json *object) {
    if (object->type != JSON_OBJECT || object->length < 2) return 0;
    char **keys = malloc(object->length * sizeof(char *));
    if (!keys) return fail("%s: out of memory", ps->what);
    memcpy(keys, object->keys, object->length * sizeof(char *));
    qsort(keys, object->length, sizeof(char *), string_order);
    int rc = 0;
    for (size_t i = 1; rc == 0 && i < object->length; i++)
        if (strcmp(keys[i - 1], keys[i]) == 0)
            rc = fail("%s: the key \"%s\" appears twice", ps->what, printable(keys[i]));
    free(keys);
    return rc;
}

/* An array or object, from after its opening bracket to `close`; objects'
 * keys must be unique; at most 64 levels deep. */
static int json_container(JsonParser *ps, Json *out, char close) {
    size_t cap = 0;
    out->type = close == '}' ? JSON_OBJECT : JSON_ARRAY;
    if (++ps->depth > 64) return json_syntax(ps, "nested too deeply");
    json_skip_space(ps);
    if (ps->p < ps->end && *ps->p == close) { ps->p++; ps->depth--; return 0; }
    for (;;) {
        char *key = NULL;
        json_skip_space(ps);
        if (close == '}') {
            size_t klen;
            if (ps->p >= ps->end || *ps->p != '"') return json_syntax(ps, "expected a key");
            ps->p++;
            if (json_string(ps, &key, &klen) != 0) return -1;
            json_skip_space(ps);
            if (ps->p >= ps->end || *ps->p != ':') {
                free(key);
                return json_syntax(ps, "expected ':'");
            }
            ps->p++;
        }
        if (json_push(ps, out, &cap, key) != 0) return -1;
        json_skip_space(ps);
        if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
        if (ps->p < ps->end && *ps->p == close) {
            ps->p++;
            ps->depth--;
            return json_unique_keys(ps, out);
        }
        return json_syntax(ps, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static int json_value(JsonParser *ps, Json *out) {
    json_skip_space(ps);
    if (ps->p >= ps->end) return json_syntax(ps, "unexpected end");
    char c = *ps->p;
    if (c == '{' || c == '[') { ps->p++; return json_container(ps, out, c == '{' ? '}' : ']'); }
    if (c == '"') {
        ps->p++;
        out->type = JSON_STRING;
        return json_string(ps, &out->string, &out->length);
    }
    static const struct { const char *word; JsonType type; double value; } words[] = {
        {"true", JSON_BOOL, 1}, {"false", JSON_BOOL, 0}, {"null", JSON_NULL, 0}};
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(words[i].word);
        if ((size_t)(ps->end - ps->p) >= n && memcmp(ps->p, words[i].word, n) == 0) {
            out->type = words[i].type;
            out->number = words[i].value;
            ps->p += n;
            return 0;
        }
    }
    char num[64];
    size_t n = 0;
    while (ps->p + n < ps->end && n < sizeof(num) - 1 && strchr("+-0123456789.eE", ps->p[n])) {
        num[n] = ps->p[n];
        n++;
    }
    num[n] = '\0';
    char *endp;
    double v = n ? strtod(num, &endp) : 0;
    if (n == 0 || *endp != '\0') return json_syntax(ps, "unexpected character");
    /* 1e400: written back it would be inf, not JSON */
    if (!isfinite(v)) return json_syntax(ps, "a number out of range");
    out->type = JSON_NUMBER;
    out->number = v;
    ps->p += n;
    return 0;
}

void json_free(Json *j) {
    if (!j) return;
    for (size_t i = 0; i < j->length && (j->type == JSON_ARRAY || j->type == JSON_OBJECT); i++) {
        json_free(&j->items[i]);
        if (j->type == JSON_OBJECT) free(j->keys[i]);
    }
    if (j->type == JSON_ARRAY || j->type == JSON_OBJECT) { free(j->items); free(j->keys); }
    free(j->string);
    memset(j, 0, sizeof(*j));
}

int json_parse(const char *text, size_t len, const char *what, Json *out) {
    JsonParser ps = {text, text, text + len, what, 0};
    memset(out, 0, sizeof(*out));
    if (json_value(&ps, out) != 0) { json_free(out); return -1; }
    json_skip_space(&ps);
    if (ps.p != ps.end) { json_free(out); return json_syntax(&ps, "trailing characters"); }
    return 0;
}

const Json *json_get(const Json *object, const char *key) {
    if (!object || object->type != JSON_OBJECT) return NULL;
    for (size_t i = 0; i < object->length; i++)
        if (strcmp(object->keys[i], key) == 0) return &object->items[i];
    return NULL;
}

static int json_load_file(const char *path, Json *out) {
    char *text;
    size_t len;
    if (read_file(path, &text, &len) != 0) return -1;
    int rc = json_parse(text, len, path, out);
    free(text);
    return rc;
}

static int json_is_count(const Json *v) { /* a non-negative integer */
    return v && v->type == JSON_NUMBER && v->number >= 0 && v->number == floor(v->number) &&
           v->number < 9e15;
}

/* The shortest decimal that reads back as the same double (0.1, not 0.1000000000000000055). */
static void sb_number(StrBuf *b, double x) {
    char text[32];
    if (x == floor(x) && fabs(x) < 1e15) { sb_printf(b, "%.0f", x); return; }
    for (int digits = 1; digits <= 17; digits++) {
        snprintf(text, sizeof(text), "%.*g", digits, x);
        if (strtod(text, NULL) == x) break;
    }
    sb_printf(b, "%s", text);
}

static void json_write_string(StrBuf *b, const char *s) {
    sb_printf(b, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') sb_printf(b, "\\%c", *p);
        else if (*p < 0x20) sb_printf(b, "\\u%04x", *p);
        else sb_printf(b, "%c", *p);
    }
    sb_printf(b, "\"");
}

static void json_write(StrBuf *b, const Json *j) {
    switch (j->type) {
    case JSON_NULL: sb_printf(b, "null"); break;
    case JSON_BOOL: sb_printf(b, j->number ? "true" : "false"); break;
    case JSON_NUMBER: sb_number(b, j->number); break;
    case JSON_STRING: json_write_string(b, j->string); break;
    case JSON_ARRAY:
    case JSON_OBJECT:
        sb_printf(b, j->type == JSON_ARRAY ? "[" : "{");
        for (size_t i = 0; i < j->length; i++) {
            if (i) sb_printf(b, ", ");
            if (j->type == JSON_OBJECT) { json_write_string(b, j->keys[i]); sb_printf(b, ": "); }
            json_write(b, &j->items[i]);
        }
        sb_printf(b, j->type == JSON_ARRAY ? "]" : "}");
        break;
    }
}

/* ===========================================================================
 * 15. The tokenizer: HF tokenizer.json of the byte-level BPE family (GPT-2,
 *    GPT-NeoX). Byte-level BPE spells every byte as one printable character
 *    (the byte alphabet) and merges adjacent tokens by rank. Decoding maps a
 *    token's characters back to bytes. Encoding here is exact for ASCII text;
 *    tokenize.py is exact for all text (it has Unicode's tables).
 * ======================================================================== */

#define ALPHABET_END 324 /* the byte alphabet lies in code points 0..323 */

/* Printable Latin-1 bytes stand for themselves; the other 68 bytes take the
 * code points from 256 up, in byte order. byte_of[cp] = the byte, or -1. */
static void byte_alphabet(unsigned char_of[256], int byte_of[ALPHABET_END]) {
    int extra = 0;
    for (int cp = 0; cp < ALPHABET_END; cp++) byte_of[cp] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        char_of[b] = printable ? (unsigned)b : 256u + (unsigned)extra++;
        byte_of[char_of[b]] = b;
    }
}

/* The bytes of the UTF-8 character a lead byte starts: 1 to 4, or 0 for a
 * byte that starts none. */
static int utf8_length(unsigned char lead) {
    return lead < 0x80             ? 1
           : (lead & 0xE0) == 0xC0 ? 2
           : (lead & 0xF0) == 0xE0 ? 3
           : (lead & 0xF8) == 0xF0 ? 4
                                   : 0;
}

/* One UTF-8 character at s (n bytes left): its length, or 0 if malformed. */
static int utf8_next(const unsigned char *s, size_t n, unsigned *cp) {
    int len = utf8_length(s[0]);
    if (len == 0 || (size_t)len > n) return 0;
    *cp = len == 1 ? s[0] : s[0] & (0xFF >> (len + 1));
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        *cp = *cp << 6 | (s[i] & 0x3F);
    }
    return len;
}

/* As the ByteLevel decoder: every character through the byte alphabet, or the
 * text's own UTF-8 when a character lies outside it (added tokens like runs of
 * spaces). */
static int token_text_to_bytes(const char *text, const int *byte_of, char **out, int *len) {
    size_t n = strlen(text), k = 0;
    char *b = malloc(n + 1);
    if (!b) return fail("out of memory loading a tokenizer");
    for (size_t i = 0; i < n;) {
        unsigned cp;
        int step = utf8_next((const unsigned char *)text + i, n - i, &cp);
        if (step == 0 || cp >= ALPHABET_END || byte_of[cp] < 0) {
            memcpy(b, text, n);
            k = n;
            break;
        }
        b[k++] = (char)byte_of[cp];
        i += (size_t)step;
    }
    *out = b;
    *len = (int)k;
    return 0;
}

static MergeSlot *merge_slot(const Tokenizer *t, uint64_t key) {
    size_t i = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 20) & (t->merge_capacity - 1);
    while (t->merges[i].key != UINT64_MAX && t->merges[i].key != key)
        i = (i + 1) & (t->merge_capacity - 1);
    return &t->merges[i];
}

typedef struct { const char *text; int id; } VocabEntry;

static int vocab_order(const void *a, const void *b) {
    return strcmp(((const VocabEntry *)a)->text, ((const VocabEntry *)b)->text);
}

static int vocab_find(const VocabEntry *sorted, size_t n, const char *text) {
    VocabEntry key = {text, 0};
    const VocabEntry *e = bsearch(&key, sorted, n, sizeof(VocabEntry), vocab_order);
    return e ? e->id : -1;
}

/* A merge as "left right" in buf (NUL after each part): from "a b" (classic
 * files) or ["a", "b"] (newer ones). buf holds at least the merge's text + 2. */
static int merge_parts(const Json *m, char *buf, char **left, char **right) {
    if (m->type == JSON_ARRAY && m->length == 2 && m->items[0].type == JSON_STRING &&
        m->items[1].type == JSON_STRING) {
        *left = strcpy(buf, m->items[0].string);
        *right = strcpy(buf + strlen(buf) + 1, m->items[1].string);
        return 0;
    }
    const char *space = m->type == JSON_STRING ? strchr(m->string, ' ') : NULL;
    if (!space || strchr(space + 1, ' ')) return -1;
    *left = strcpy(buf, m->string);
    buf[space - m->string] = '\0';
    *right = buf + (space - m->string) + 1;
    return 0;
}

static size_t merge_text_length(const Json *m) {
    if (m->type == JSON_STRING) return m->length;
    size_t n = 0;
    for (size_t i = 0; m->type == JSON_ARRAY && i < m->length; i++)
        n += m->items[i].type == JSON_STRING ? m->items[i].length : 0;
    return n;
}

/* The tokenizer of a parsed tokenizer.json: each id's bytes, the merges as a
 * hash table of ranks, the added tokens; anything but byte-level BPE without
 * a prefix space is refused. */
/* The merges "left right" (or ["left", "right"]) as a hash table at most
 * half full: (left id, right id) -> (rank, merged id); the first of two
 * equal pairs keeps its rank. sorted: the vocabulary by text, n_vocab long. */
static int build_merges(Tokenizer *t, const Json *merges, const VocabEntry *sorted,
                        size_t n_vocab, const char *path) {
    for (t->merge_capacity = 16; t->merge_capacity < 2 * merges->length + 16;)
        t->merge_capacity *= 2;
    t->merges = malloc(t->merge_capacity * sizeof(MergeSlot));
    if (!t->merges) return fail("out of memory loading %s", path);
    for (size_t i = 0; i < t->merge_capacity; i++) t->merges[i].key = UINT64_MAX;
    for (size_t r = 0; r < merges->length; r++) {
        size_t n = merge_text_length(&merges->items[r]);
        char *buf = malloc(2 * n + 4), *left, *right, *both = buf + n + 2;
        if (!buf) return fail("out of memory loading %s", path);
        if (merge_parts(&merges->items[r], buf, &left, &right) != 0) {
            free(buf);
            return fail("%s: merge %zu is not a pair", path, r);
        }
        snprintf(both, n + 2, "%s%s", left, right);
        int a = vocab_find(sorted, n_vocab, left), b = vocab_find(sorted, n_vocab, right);
        int ab = vocab_find(sorted, n_vocab, both);
        int rc = a < 0 || b < 0 || ab < 0
                     ? fail("%s: merge %zu (%s %s) uses a token not in the vocabulary", path, r,
                            left, right)
                     : 0;
        free(buf);
        if (rc != 0) return rc;
        MergeSlot *slot = merge_slot(t, (uint64_t)a << 32 | (uint32_t)b);
        if (slot->key == UINT64_MAX)
            *slot = (MergeSlot){(uint64_t)a << 32 | (uint32_t)b, (int)r, ab};
    }
    return 0;
}

static int tokenizer_build(Tokenizer *t, const Json *j, const char *path) {
    const Json *model = json_get(j, "model"), *vocab = json_get(model, "vocab"),
               *merges = json_get(model, "merges");
    const Json *pre = json_get(j, "pre_tokenizer"), *added = json_get(j, "added_tokens");
    if (!vocab || vocab->type != JSON_OBJECT || !merges || merges->type != JSON_ARRAY)
        return fail("%s: not a BPE tokenizer.json (no model.vocab and model.merges)", path);
    if (!pre || !config_string_is(pre, "type", "ByteLevel") || !json_get(pre, "type"))
        return fail("%s: the pre_tokenizer is not ByteLevel", path);
    const Json *prefix = json_get(pre, "add_prefix_space");
    if (prefix && prefix->number != 0)
        return fail("%s: add_prefix_space true is not supported", path);
    unsigned char_of[256];
    int byte_of[ALPHABET_END], max_id = -1;
    byte_alphabet(char_of, byte_of);
    size_t n_added = added && added->type == JSON_ARRAY ? added->length : 0;
    for (size_t i = 0; i < vocab->length; i++) {
        if (!json_is_count(&vocab->items[i]) || vocab->items[i].number >= (1 << 24))
            return fail("%s: vocabulary entry %zu has no valid id", path, i);
        max_id = vocab->items[i].number > max_id ? (int)vocab->items[i].number : max_id;
    }
    for (size_t i = 0; i < n_added; i++) {
        const Json *id = json_get(&added->items[i], "id"),
                   *content = json_get(&added->items[i], "content");
        if (!json_is_count(id) || id->number >= (1 << 24) || !content ||
            content->type != JSON_STRING || !content->string[0])
            return fail("%s: added token %zu has no id or content", path, i);
        /* a C string would end at the NUL and match wrongly */
        if (strlen(content->string) != content->length)
            return fail("%s: added token %zu contains a NUL character, which mlkv does not support",
                        path, i);
        max_id = id->number > max_id ? (int)id->number : max_id;
    }
    if (max_id < 0) return fail("%s: the vocabulary is empty", path);
    t->n_ids = max_id + 1;
    t->bytes = alloc_zeroed((size_t)t->n_ids, sizeof(char *), "the tokenizer");
    t->length = alloc_zeroed((size_t)t->n_ids, sizeof(int), "the tokenizer");
    t->added = alloc_zeroed(n_added + 1, sizeof(char *), "the tokenizer");
    t->added_id = alloc_zeroed(n_added + 1, sizeof(int), "the tokenizer");
    t->added_normalized = alloc_zeroed(n_added + 1, sizeof(int), "the tokenizer");
    VocabEntry *sorted = alloc_zeroed(vocab->length + 1, sizeof(VocabEntry), "the tokenizer");
    if (!t->bytes || !t->length || !t->added || !t->added_id || !t->added_normalized || !sorted) {
        free(sorted);
        return -1;
    }
    for (size_t i = 0; i < vocab->length; i++) {
        int id = (int)vocab->items[i].number;
        sorted[i] = (VocabEntry){vocab->keys[i], id};
        if (!t->bytes[id] &&
            token_text_to_bytes(vocab->keys[i], byte_of, &t->bytes[id], &t->length[id]) != 0) {
            free(sorted);
            return -1;
        }
    }
    qsort(sorted, vocab->length, sizeof(VocabEntry), vocab_order);
    t->eot_id = -1;
    for (size_t i = 0; i < n_added; i++) {
        const Json *tok = &added->items[i], *normalized = json_get(tok, "normalized");
        int id = (int)json_get(tok, "id")->number;
        t->added[t->n_added] = strdup(json_get(tok, "content")->string);
        t->added_id[t->n_added] = id;
        /* HF's default: true */
        t->added_normalized[t->n_added] = !normalized || normalized->number != 0;
        if (!t->added[t->n_added]) { free(sorted); return fail("out of memory loading %s", path); }
        if (!strcmp(t->added[t->n_added], "<|endoftext|>")) t->eot_id = id;
        free(t->bytes[id]);
        if (token_text_to_bytes(t->added[t->n_added], byte_of, &t->bytes[id], &t->length[id]) !=
            0) {
            free(sorted);
            return -1;
        }
        t->n_added++;
    }
    for (int b = 0; b < 256; b++) {
        char ch[8];
        ch[utf8_encode(char_of[b], ch)] = '\0';
        t->byte_id[b] = vocab_find(sorted, vocab->length, ch);
    }
    int rc = build_merges(t, merges, sorted, vocab->length, path);
    free(sorted);
    /* encoding (ASCII) starts from each byte's own token */
    for (int b = 0; rc == 0 && b < 128; b++)
        if (t->byte_id[b] < 0)
            rc = fail("%s: no token for byte 0x%02x: not a byte-level vocabulary", path, b);
    return rc;
}

int tokenizer_load(Tokenizer *t, const char *path) {
    Json j;
    struct stat st;
    char in_folder[PATH_LEN];
    memset(t, 0, sizeof(*t));
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) { /* a model folder: its tokenizer.json */
        if (make_path(in_folder, path, "/tokenizer.json") != 0) return -1;
        path = in_folder;
    }
    if (json_load_file(path, &j) != 0) return -1;
    int rc = tokenizer_build(t, &j, path);
    json_free(&j);
    if (rc != 0) tokenizer_free(t);
    return rc;
}

void tokenizer_free(Tokenizer *t) {
    for (int i = 0; t->bytes && i < t->n_ids; i++) free(t->bytes[i]);
    for (int i = 0; t->added && i < t->n_added; i++) free(t->added[i]);
    free(t->bytes);
    free(t->length);
    free(t->merges);
    free(t->added);
    free(t->added_id);
    free(t->added_normalized);
    memset(t, 0, sizeof(*t));
}

const char *tokenizer_token(const Tokenizer *t, int id, int *length) {
    if (id < 0 || id >= t->n_ids || !t->bytes[id]) return NULL;
    *length = t->length[id];
    return t->bytes[id];
}

/* GPT-2's split pattern on ASCII, where \p{L} is [A-Za-z], \p{N} is [0-9] and
 * \s is [\t\n\v\f\r ]:
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * Returns the length of the piece that starts at s. */
enum { CHAR_LETTER, CHAR_DIGIT, CHAR_SPACE, CHAR_OTHER };

static int ascii_class(char c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return CHAR_LETTER;
    if (c >= '0' && c <= '9') return CHAR_DIGIT;
    if (c == ' ' || (c >= '\t' && c <= '\r')) return CHAR_SPACE;
    return CHAR_OTHER;
}

static size_t next_piece(const char *s, size_t n) {
    static const char *const contractions[] = {"s", "t", "re", "ve", "m", "ll", "d"};
    if (s[0] == '\'')
        for (int i = 0; i < 7; i++) {
            size_t k = strlen(contractions[i]);
            if (n > k && !strncmp(s + 1, contractions[i], k)) return k + 1;
        }
    size_t j = s[0] == ' ' && n > 1 ? 1 : 0; /* the optional leading space */
    int kind = ascii_class(s[j]);
    if (kind != CHAR_SPACE) {
        size_t e = j + 1;
        while (e < n && ascii_class(s[e]) == kind) e++;
        return e;
    }
    size_t e = 0; /* a run of white space keeps its last character for the next word */
    while (e < n && ascii_class(s[e]) == CHAR_SPACE) e++;
    return e == n || e == 1 ? e : e - 1;
}

/* Byte-pair merges on one piece: start from its bytes' tokens, merge the
 * adjacent pair of lowest rank (leftmost first) until no merge applies. */
static int bpe_piece(const Tokenizer *t, const char *s, size_t n, int *ids, int room) {
    if ((size_t)room < n) return fail("the text has more tokens than the %d allowed", room);
    int m = (int)n;
    for (size_t i = 0; i < n; i++) ids[i] = t->byte_id[(unsigned char)s[i]];
    while (m > 1) {
        int at = -1, best_rank = 0, merged = 0;
        for (int i = 0; i + 1 < m; i++) {
            const MergeSlot *slot = merge_slot(t, (uint64_t)ids[i] << 32 | (uint32_t)ids[i + 1]);
            if (slot->key != UINT64_MAX && (at < 0 || slot->rank < best_rank)) {
                at = i;
                best_rank = slot->rank;
                merged = slot->merged;
            }
        }
        if (at < 0) break;
        ids[at] = merged;
        memmove(ids + at + 1, ids + at + 2, (size_t)(m - at - 2) * sizeof(int));
        m--;
    }
    return m;
}

/* The leftmost added token of the given kind in s, the longest where several
 * start there (HF matches special tokens in the raw text, the normalized ones
 * after normalization; for ASCII the two texts are the same). */
static int find_added(const Tokenizer *t, const char *s, size_t n, int normalized, size_t *at,
                      size_t *len) {
    for (size_t pos = 0; pos < n; pos++) {
        int best = -1;
        size_t best_len = 0;
        for (int i = 0; i < t->n_added; i++) {
            size_t k = strlen(t->added[i]);
            if (t->added_normalized[i] == normalized && k > best_len && k <= n - pos &&
                !memcmp(s + pos, t->added[i], k)) {
                best = i;
                best_len = k;
            }
        }
        if (best >= 0) {
            *at = pos;
            *len = best_len;
            return t->added_id[best];
        }
    }
    return -1;
}

/* phase 0: split on special (not normalized) added tokens; phase 1: on the
 * normalized ones; then pieces and merges. Returns the ids written or -1. */
static int encode_span(const Tokenizer *t, const char *s, size_t n, int phase, int *ids, int room) {
    int count = 0;
    while (n > 0) {
        size_t at = n, len = 0;
        int id = phase < 2 ? find_added(t, s, n, phase, &at, &len) : -1;
        size_t plain = id >= 0 ? at : n;
        if (phase < 2) {
            int k = encode_span(t, s, plain, phase + 1, ids + count, room - count);
            if (k < 0) return -1;
            count += k;
        } else {
            for (size_t p = 0; p < plain;) {
                size_t piece = next_piece(s + p, plain - p);
                int k = bpe_piece(t, s + p, piece, ids + count, room - count);
                if (k < 0) return -1;
                count += k;
                p += piece;
            }
        }
        if (id < 0) break;
        if (count >= room) return fail("the text has more tokens than the %d allowed", room);
        ids[count++] = id;
        s += at + len;
        n -= at + len;
    }
    return count;
}

int tokenizer_encode(const Tokenizer *t, const char *text, int *ids, int max_ids) {
    for (const char *p = text; *p; p++)
        if ((unsigned char)*p >= 0x80)
            return fail("the text is not ASCII; mlkv encodes ASCII exactly but not other text: get "
                        "the ids with python3 tokenize.py encode --tokenizer FILE TEXT");
    return encode_span(t, text, strlen(text), 0, ids, max_ids);
}

void utf8_stream_write(Utf8Stream *s, const char *bytes, int n, FILE *out) {
    for (int i = 0; i < n; i++) {
        unsigned char c = (unsigned char)bytes[i];
        /* a broken character goes out as it is */
        if (s->n > 0 && (c & 0xC0) != 0x80) utf8_stream_flush(s, out);
        s->pending[s->n++] = c;
        int want = utf8_length(s->pending[0]);
        if (s->n >= (want ? want : 1)) utf8_stream_flush(s, out); /* complete, or a stray byte */
    }
    fflush(out);
}

void utf8_stream_flush(Utf8Stream *s, FILE *out) {
    if (s->n) fwrite(s->pending, 1, (size_t)s->n, out);
    s->n = 0;
}

/* ===========================================================================
 * 16. The built-in demo: a corpus that needs attention to predict (facts
 *     stated early in a document and asked for later), word tokens, and
 *     recall probes; the demo command (section 17) pretrains a 12-layer
 *     Pythia-shaped model on it and runs the experiment.
 * ======================================================================== */

/* Word tokens: 0 is end of text, then the words below. */
static const char *const demo_words[] = {
    "<|endoftext|>", ".", "again", "ann", "bob", "cat", "dan", "eve", "fay", "gus", "hal", "ivy",
    "jon", "kim", "lee", /* names: 3.. */
    "max", "ned", "oli", "pam", "rex", "sam", "tom", "uma", "val", "wes", "zoe", "ida", "red",
    "blue", "green", "gold", "pink", "gray", "tan", "black", /* colors: 27.. */
    /* things: 35.. */
    "cup", "hat", "box", "key", "pen", "map", "bag", "car"};
#define DEMO_WORDS 43
#define DEMO_NAME0 3
#define DEMO_COLOR0 27
#define DEMO_THING0 35
#define DEMO_FACTS 6   /* facts per document, each recalled once */
#define DEMO_DOC_MAX 64

/* One document: six random facts "ann red cup ." with distinct names, the
 * word "again", the same facts once more, then end of text. In the second half
 * each fact can only be known by attending back to where it was first stated.
 * recalls[i] is the position of the i-th recalled name. Returns the token count. */
static size_t demo_document(uint64_t *rng, uint16_t *out, int recalls[DEMO_FACTS]) {
    int name[DEMO_FACTS], color[DEMO_FACTS], thing[DEMO_FACTS];
    size_t n = 0;
    for (int i = 0; i < DEMO_FACTS; i++) {
        int fresh;
        do {
            name[i] = DEMO_NAME0 + (int)(rng_next(rng) % (DEMO_COLOR0 - DEMO_NAME0));
            fresh = 1;
            for (int k = 0; k < i; k++) fresh &= name[k] != name[i];
        } while (!fresh);
        color[i] = DEMO_COLOR0 + (int)(rng_next(rng) % (DEMO_THING0 - DEMO_COLOR0));
        thing[i] = DEMO_THING0 + (int)(rng_next(rng) % (DEMO_WORDS - DEMO_THING0));
    }
    for (int half = 0; half < 2; half++) {
        for (int i = 0; i < DEMO_FACTS; i++) {
            if (half) recalls[i] = (int)n;
            out[n++] = (uint16_t)name[i];
            out[n++] = (uint16_t)color[i];
            out[n++] = (uint16_t)thing[i];
            out[n++] = 1; /* "." */
        }
        out[n++] = half ? 0 : 2; /* "again", then end of text */
    }
    return n;
}

static int demo_corpus(const char *path, size_t n_tokens, uint64_t seed) {
    uint16_t *tokens = alloc_zeroed(n_tokens + DEMO_DOC_MAX, sizeof(uint16_t), "the demo corpus");
    if (!tokens) return -1;
    uint64_t rng = seed;
    int recalls[DEMO_FACTS];
    size_t n = 0;
    while (n < n_tokens) n += demo_document(&rng, tokens + n, recalls);
    int rc = tokens_save(path, tokens, n);
    free(tokens);
    return rc;
}

/* ===========================================================================
 * 17. The command line: one cmd_* function per command, each with --help;
 *     flags from a table (parse_flags), their ranges checked. Exit codes: 0
 *     done, 1 an error (its message on stderr), 2 a usage error, 128 + N
 *     stopped by signal N with a checkpoint saved.
 * ======================================================================== */

typedef enum { FLAG_INT, FLAG_DOUBLE, FLAG_STRING, FLAG_SWITCH, FLAG_U64, FLAG_CHOICE } FlagKind;
/* FLAG_CHOICE stores the index of the value in choices (NULL-terminated) as an int */
typedef struct {
    const char *name;
    FlagKind kind;
    void *dst;
    double min, max;
    const char *const *choices;
} Flag;
#define INT_FLAG(name, dst, lo, hi) {name, FLAG_INT, dst, lo, hi, NULL}
#define NUMBER_FLAG(name, dst, lo, hi) {name, FLAG_DOUBLE, dst, lo, hi, NULL}
#define STRING_FLAG(name, dst) {name, FLAG_STRING, dst, 0, 0, NULL}
#define SWITCH_FLAG(name, dst) {name, FLAG_SWITCH, dst, 0, 0, NULL}
/* an integer into a uint64_t */
#define U64_FLAG(name, dst, lo, hi) {name, FLAG_U64, dst, lo, hi, NULL}
#define SEED_FLAG(name, dst) U64_FLAG(name, dst, 0, 9007199254740992.0)
#define CHOICE_FLAG(name, dst, choices) {name, FLAG_CHOICE, dst, 0, 0, choices}

#define FLAGS_OK (-1)

/* --threads N (0: all cores) as OpenMP's thread count, and one line (once a
 * process) on what computes: the kernels' instruction set and the threads.
 * More threads than cores only take turns on them, and every parallel loop
 * then waits at its barrier for a thread that is not running: said, not
 * refused. */
static void use_threads(int n) {
    static int said;
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads(n);
    if (n > omp_get_num_procs())
        fprintf(stderr, "mlkv: warning: --threads %d on %d cores: the threads past the cores "
                "take turns, which slows every step; leave --threads out to use every core\n",
                n, omp_get_num_procs());
    if (!said++)
        fprintf(stderr, "mlkv: %s kernels, %d thread%s (OpenMP, %d cores)\n", kernels_name(),
                omp_get_max_threads(), omp_get_max_threads() == 1 ? "" : "s", omp_get_num_procs());
#else
    if (n > 1)
        fprintf(stderr, "mlkv: warning: --threads %d: this build has no OpenMP and computes "
                "on one thread (make, or cc -fopenmp, builds one that uses every core)\n", n);
    if (!said++)
        fprintf(stderr, "mlkv: %s kernels, 1 thread (built without OpenMP: make, or cc "
                "-fopenmp, builds one that uses every core)\n", kernels_name());
#endif
}

/* The command a usage text is of ("usage: mlkv train ..." gives train) */
static void command_of(const char *usage, char *name, size_t room) {
    const char *at = strstr(usage, "mlkv ");
    size_t n = at ? strcspn(at + 5, " \n") : 0;
    snprintf(name, room, "%.*s", (int)n, at ? at + 5 : "");
}

/* A usage error: the message, the command's synopsis (its "usage:" lines) and
 * where the rest is, so the message stays on screen; exit code 2. */
static int usage_error(const char *usage, const char *fmt, ...) {
    va_list ap;
    char command[32];
    fprintf(stderr, "mlkv: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    const char *line = usage;
    while (!strncmp(line, "usage: ", 7) || !strncmp(line, "       mlkv ", 12)) {
        size_t n = strcspn(line, "\n");
        fprintf(stderr, "\n%.*s", (int)n, line);
        line += n + (line[n] == '\n');
    }
    command_of(usage, command, sizeof(command));
    fprintf(stderr, "\n(mlkv %s --help: every option)\n", command);
    return 2;
}

/* Edits (insertions, deletions, substitutions) from a to b, for "did you mean" */
static int edit_distance(const char *a, const char *b) {
    int n = (int)strlen(b), row[64];
    if (n >= 64 || strlen(a) >= 64) return 64;
    for (int j = 0; j <= n; j++) row[j] = j;
    for (int i = 1; a[i - 1]; i++) {
        int diagonal = row[0];
        row[0] = i;
        for (int j = 1; j <= n; j++) {
            int up = row[j], best = diagonal + (a[i - 1] != b[j - 1]);
            best = up + 1 < best ? up + 1 : best;
            best = row[j - 1] + 1 < best ? row[j - 1] + 1 : best;
            diagonal = up;
            row[j] = best;
        }
    }
    return row[n];
}

/* Parses --flag value (or --flag=value) pairs into their destinations.
 * Returns FLAGS_OK, or the exit code when the command must stop here: 0 after
 * --help, 2 for a usage error (message printed). positional, when non-NULL,
 * takes the first argument that is not a flag. */
static int parse_flags(int argc, char **argv, const Flag *flags, int n_flags, const char *usage,
                       const char **positional) {
    for (int i = 0; i < argc; i++) {
        char arg[64];
        const char *equals = !strncmp(argv[i], "--", 2) ? strchr(argv[i], '=') : NULL;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { printf("%s", usage); return 0; }
        if (positional && argv[i][0] != '-' && !*positional) { *positional = argv[i]; continue; }
        snprintf(arg, sizeof(arg), "%.*s", equals ? (int)(equals - argv[i]) : 63, argv[i]);
        const Flag *f = NULL;
        for (int k = 0; k < n_flags && !f; k++)
            if (!strcmp(arg, flags[k].name)) f = &flags[k];
        if (!f) { /* one line, with the nearest flag when a typo is likely */
            int best = -1, distance = 3;
            char command[32];
            for (int k = 0; k < n_flags; k++) {
                int d = edit_distance(arg, flags[k].name);
                if (d < distance) distance = d, best = k;
            }
            char hint[96] = "";
            if (best >= 0) snprintf(hint, sizeof(hint), ": did you mean %s?", flags[best].name);
            command_of(usage, command, sizeof(command));
            fprintf(stderr, "mlkv: unknown argument %s%s (mlkv %s --help: every option)\n",
                    printable(argv[i]), hint, command);
            return 2;
        }
        if (f->kind == FLAG_SWITCH) {
            if (equals) { fprintf(stderr, "mlkv: %s takes no value\n", arg); return 2; }
            *(int *)f->dst = 1;
            continue;
        }
        if (!equals && i + 1 >= argc) {
            fprintf(stderr, "mlkv: %s needs a value\n", arg);
            return 2;
        }
        const char *v = equals ? equals + 1 : argv[++i];
        char *end = NULL;
        double x = 0;
        if (f->kind == FLAG_STRING) { *(const char **)f->dst = v; continue; }
        if (f->kind == FLAG_CHOICE) {
            int k = 0;
            while (f->choices[k] && strcmp(v, f->choices[k]) != 0) k++;
            if (!f->choices[k]) {
                fprintf(stderr, "mlkv: %s must be one of", arg);
                for (k = 0; f->choices[k]; k++) fprintf(stderr, " %s", f->choices[k]);
                fprintf(stderr, ", not %s\n", v);
                return 2;
            }
            *(int *)f->dst = k;
            continue;
        }
        x = strtod(v, &end);
        if (end == v || *end != '\0' || !isfinite(x)) {
            fprintf(stderr, "mlkv: %s needs a number, not %s\n", arg, v);
            return 2;
        }
        if (x < f->min || x > f->max) {
            if (f->kind == FLAG_DOUBLE)
                fprintf(stderr, "mlkv: %s %s is out of range [%g, %g]\n", arg, v, f->min, f->max);
            else
                fprintf(stderr, "mlkv: %s %s is out of range [%.0f, %.0f]\n", arg, v, f->min,
                        f->max);
            return 2;
        }
        if (f->kind != FLAG_DOUBLE && x != floor(x)) {
            fprintf(stderr, "mlkv: %s needs an integer, not %s\n", arg, v);
            return 2;
        }
        if (f->kind == FLAG_INT) *(int *)f->dst = (int)x;
        else if (f->kind == FLAG_U64) *(uint64_t *)f->dst = (uint64_t)x;
        else *(double *)f->dst = x;
    }
    return FLAGS_OK;
}

static const char *const train_usage =
    "usage: mlkv train --model DIR --train TRAIN.bin [--val VAL.bin] --out DIR [options]\n"
    "       mlkv train --resume --train TRAIN.bin [--val VAL.bin] --out DIR [same options]\n"
    "Trains (uptrains) a model on llm.c token files. Defaults are the reference recipe.\n"
    "  --batch N          micro-batch sequences (4)\n"
    "  --seq N            tokens per sequence (min(2048, max_position_embeddings))\n"
    "  --grad-accum N     micro-batches per optimizer step (32; 4 x 32 = the reference's 32 x 4)\n"
    "  --steps N          optimizer steps (default: --epochs over the training tokens)\n"
    "  --epochs X         passes over the training tokens when --steps is not given (1)\n"
    "  --max-tokens N     a token budget instead: N / (batch x grad-accum x seq) steps\n"
    "  --freeze-embeds    do not train the token embedding and the output head\n"
    "  --lr X             peak learning rate (6e-4)\n"
    "  --warmup-steps N   linear warmup steps (default: --warmup-ratio)\n"
    "  --warmup-ratio X   warmup = ceil(steps * X) (0.2)\n"
    "  --schedule S       cosine | linear | constant after warmup (cosine)\n"
    "  --weight-decay X   AdamW decay of weight matrices; not biases or LayerNorms (0.01)\n"
    "  --clip X           gradient clipping at this global norm, 0 = off (1.0)\n"
    "  --beta1 X --beta2 X --eps X   AdamW (0.9, 0.95, 1e-8)\n"
    "  --seed N           data order seed (42)\n"
    "  --eval-every N     validation loss every N steps, 0 = only at the end (100)\n"
    "  --val-batches N    validation batches per evaluation (20)\n"
    "  --save-every N     checkpoint every N steps, 0 = only at the end (500)\n"
    "  --stop-after N     stop after N steps of this run (the schedule still spans --steps);\n"
    "                     continue later with --resume\n"
    "  --max-time D       stop at the first step boundary after D (90s, 45m, 2h), with a\n"
    "                     checkpoint; continue later with --resume (the first Ctrl-C or\n"
    "                     SIGTERM does the same; a second one stops at once)\n"
    "  --log-every N      print every N-th step (the log file gets every step) (1)\n"
    "  --resume           continue the run checkpointed "
    "in --out (model, AdamW state, data position)\n"
    "  --overwrite        replace a model or run already in --out (never the --model folder)\n"
    "  --threads N        OpenMP threads (all cores)\n"
    "  --precision P      fp32 | bf16: matmul inputs rounded to bfloat16, sums, weights and\n"
    "                     AdamW state in fp32 (fast where the CPU has AMX or AVX512-BF16)\n"
    "                     (fp32)\n"
    "  --verbose          print the bytes of every buffer\n"
    "The checkpoint in --out is an HF folder (config.json, model.safetensors) with\n"
    "optimizer.safetensors beside it; the per-step log goes to OUT.log.csv.\n";

/* "90", "90s", "45m", "2h", "1.5h": seconds, or -1 */
static double parse_duration(const char *text) {
    char *end;
    double x = strtod(text, &end);
    double unit = !strcmp(end, "") || !strcmp(end, "s") ? 1
                  : !strcmp(end, "m")                   ? 60
                  : !strcmp(end, "h")                   ? 3600
                                                        : -1;
    return end == text || unit < 0 || !isfinite(x) || x <= 0 || x > 1e9 ? -1 : x * unit;
}

/* The flags of train's recipe, shared with experiment; returns their count.
 * schedule and max_time are parsed into t by finish_train_flags. */
#define TRAIN_FLAGS 32
/* ScheduleKind order */
static const char *const schedule_names[] = {"cosine", "linear", "constant", NULL};
/* Precision order */
static const char *const precision_names[] = {"fp32", "bf16", NULL};

static int train_flag_table(TrainArgs *t, int *schedule, const char **max_time, Flag *flags) {
    const double BIG = 2147483647.0;
    Flag table[] = {
        STRING_FLAG("--model", &t->model_dir),
        STRING_FLAG("--train", &t->train_path),
        STRING_FLAG("--val", &t->val_path),
        STRING_FLAG("--out", &t->out_dir),
        INT_FLAG("--batch", &t->batch, 1, 65536),
        INT_FLAG("--seq", &t->seq, 1, 1 << 20),
        INT_FLAG("--grad-accum", &t->grad_accum, 1, 1 << 20),
        INT_FLAG("--steps", &t->steps, 1, BIG),
        NUMBER_FLAG("--epochs", &t->epochs, 1e-9, 1e9),
        NUMBER_FLAG("--lr", &t->opt.lr, 0, 1e3),
        INT_FLAG("--warmup-steps", &t->warmup_steps, 0, BIG),
        NUMBER_FLAG("--warmup-ratio", &t->warmup_ratio, 0, 1),
        CHOICE_FLAG("--schedule", schedule, schedule_names),
        NUMBER_FLAG("--weight-decay", &t->opt.weight_decay, 0, 1e3),
        NUMBER_FLAG("--clip", &t->opt.clip, 0, 1e30),
        NUMBER_FLAG("--beta1", &t->opt.beta1, 0, 0.999999),
        NUMBER_FLAG("--beta2", &t->opt.beta2, 0, 0.999999999),
        NUMBER_FLAG("--eps", &t->opt.eps, 0, 1),
        SEED_FLAG("--seed", &t->seed),
        INT_FLAG("--eval-every", &t->eval_every, 0, BIG),
        INT_FLAG("--val-batches", &t->val_batches, 1, BIG),
        INT_FLAG("--save-every", &t->save_every, 0, BIG),
        INT_FLAG("--stop-after", &t->stop_after, 1, BIG),
        SWITCH_FLAG("--resume", &t->resume),
        SWITCH_FLAG("--overwrite", &t->overwrite),
        INT_FLAG("--threads", &t->threads, 1, 4096),
        INT_FLAG("--log-every", &t->log_every, 1, BIG),
        STRING_FLAG("--max-time", max_time),
        SWITCH_FLAG("--verbose", &t->verbose),
        CHOICE_FLAG("--precision", &t->precision, precision_names),
        U64_FLAG("--max-tokens", &t->max_tokens, 1, 9007199254740992.0),
        SWITCH_FLAG("--freeze-embeds", &t->freeze_embeds),
    };
    _Static_assert(sizeof(table) / sizeof(table[0]) == TRAIN_FLAGS, "TRAIN_FLAGS counts the table");
    memcpy(flags, table, sizeof(table));
    *schedule = t->opt.schedule;
    t->epochs = 0; /* given or not: one of --steps, --epochs and --max-tokens sets the length */
    return TRAIN_FLAGS;
}

/* After parse_flags: the choices into t, and the checks the flags share */
static int finish_train_flags(TrainArgs *t, int schedule, const char *max_time, const char *usage) {
    t->opt.schedule = (ScheduleKind)schedule;
    if (max_time && (t->max_time = parse_duration(max_time)) <= 0)
        return usage_error(usage, "--max-time %s: give a duration such as 90s, 45m or 2h",
                           max_time);
    if ((t->steps > 0) + (t->epochs > 0) + (t->max_tokens > 0) > 1)
        return usage_error(usage, "give one of --steps, --epochs and --max-tokens");
    if (t->epochs == 0) t->epochs = 1;
    if (t->out_dir) trim_slashes((char *)t->out_dir); /* an argv string */
    return FLAGS_OK;
}

static int cmd_train(int argc, char **argv) {
    TrainArgs t;
    train_defaults(&t);
    int schedule;
    const char *max_time = NULL;
    Flag flags[TRAIN_FLAGS];
    int n_flags = train_flag_table(&t, &schedule, &max_time, flags);
    int parsed = parse_flags(argc, argv, flags, n_flags, train_usage, NULL);
    if (parsed == FLAGS_OK) parsed = finish_train_flags(&t, schedule, max_time, train_usage);
    if (parsed != FLAGS_OK) return parsed;
    if (!t.train_path || !t.out_dir || (!t.model_dir && !t.resume))
        return usage_error(train_usage,
                           "train: --train, --out and --model (or --resume) are required");
    if (run_training(&t) != 0) return exit_code(-1);
    /* stopped by a signal, with a checkpoint: the shell's convention, 128 + the signal */
    return t.stopped_by ? 128 + t.stopped_by : 0;
}

static void print_model_summary(const Model *m) {
    const Config *c = &m->config;
    printf("%zu parameters: %d layer%s, hidden %d, %d head%s of %d, intermediate %d, vocab %d\n",
           m->num_parameters, c->n_layer, plural(c->n_layer), c->hidden_size, c->n_head,
           plural(c->n_head), c->head_size, c->intermediate_size, c->vocab_size);
    printf("K/V: %d head%s in each of %d owning layer%s (", c->n_kv_head, plural(c->n_kv_head),
           c->n_kv_layer, plural(c->n_kv_layer));
    for (int l = 0; l < c->n_layer; l++)
        if (c->kv_layer_of[l] == l) printf("%s%d", l ? " " : "", l);
    printf("); KV cache %ld bytes/token fp16, %ld fp32; %s\n", kv_cache_bytes(c, 2),
           kv_cache_bytes(c, 4), rotary_mode(c));
}

static const char *const convert_usage =
    "usage: mlkv convert PYTHIA_DIR --kv-layers N --kv-heads M [--out DIR] [options]\n"
    "Converts a pretrained MHA Pythia (an HF folder) to GQA / MQA / MLKV as the\n"
    "reference does: per-head split of query_key_value, mean of each group of H/M\n"
    "heads, a running pairwise average of every non-owning layer's K/V into the\n"
    "owning layer below it, and MLPs grown with copied neurons to keep the\n"
    "parameter count. F32, F16 and BF16 in; F32 out.\n"
    "  --kv-layers N    layers that own K/V, 1..L, placed as the reference does\n"
    "  --kv-heads M     K/V heads in each owning layer; must divide the attention heads\n"
    "  --out DIR        output folder (default NAME_mlkv_N_M in the current folder, NAME\n"
    "                   the model's folder, or for an HF cache snapshot the model's name)\n"
    "  --kv-mlp         owners' K and V become two-layer MLPs sized to regain the lost\n"
    "                   parameters (the reference's use_key_value_mlp); MLPs keep their size\n"
    "  --pool P         pairwise: the reference's K_p = (K_i + K_p) / 2 layer by layer, so\n"
    "                   the lowest layers weigh least | uniform: plain mean of the layers\n"
    "  --grow-mlp G     copy: the reference, new neurons copy the first ones (the MLP's\n"
    "                   function changes) | zero: their output weights are 0 (function\n"
    "                   kept) | none: no growth (fewer parameters)\n"
    "  --kv-map LIST    the owning layer of every layer, e.g. 0,0,2,2 (pairs) or\n"
    "                   0,0,0,3,3,3: each at or below its layer, owners read themselves\n"
    "  --seed S         KV-MLP initialisation (0)\n"
    "  --overwrite      replace the model already in --out\n"
    "  --rotary R       shared (default): layers that share an owner's keys read them\n"
    "                   rotated, one function in training, scoring and cached decoding |\n"
    "                   reference: they read the owner's un-rotated keys, as the reference\n"
    "                   code computes in training and scoring; choose it only to reproduce\n"
    "                   or continue the reference's own checkpoints\n";

static int parse_layer_map(const char *text, int n_layer, int *map) {
    int n = 0;
    for (const char *p = text; *p;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v >= n_layer || n == n_layer)
            return fail("--kv-map %s: give %d layer numbers in 0..%d separated by commas", text,
                        n_layer, n_layer - 1);
        map[n++] = (int)v;
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return fail("--kv-map %s: unexpected '%c'", text, *end);
    }
    if (n != n_layer)
        return fail("--kv-map %s has %d entries; the model has %d layers", text, n, n_layer);
    return 0;
}

static int cmd_convert(int argc, char **argv) {
    const char *in = NULL, *out = NULL, *map_text = NULL;
    static const char *const pool_names[] = {"pairwise", "uniform", NULL};   /* PoolKind order */
    static const char *const grow_names[] = {"copy", "zero", "none", NULL};  /* GrowKind order */
    ConvertOptions o = {0};
    static const char *const rotary_names[] = {"shared", "reference", NULL};
    int pool = POOL_PAIRWISE, grow = GROW_COPY, rotary = 0, overwrite = 0;
    Flag flags[] = {CHOICE_FLAG("--rotary", &rotary, rotary_names),
                    SWITCH_FLAG("--overwrite", &overwrite),
                    INT_FLAG("--kv-layers", &o.kv_layers, 1, MLKV_MAX_LAYERS),
                    INT_FLAG("--kv-heads", &o.kv_heads, 1, 1 << 20),
                    STRING_FLAG("--out", &out),
                    SWITCH_FLAG("--kv-mlp", &o.kv_mlp),
                    CHOICE_FLAG("--pool", &pool, pool_names),
                    CHOICE_FLAG("--grow-mlp", &grow, grow_names),
                    STRING_FLAG("--kv-map", &map_text),
                    SEED_FLAG("--seed", &o.seed)};
    int parsed =
        parse_flags(argc, argv, flags, (int)(sizeof(flags) / sizeof(flags[0])), convert_usage, &in);
    if (parsed != FLAGS_OK) return parsed;
    int rc = 0;
    if (!in || !o.kv_heads || (!o.kv_layers && !map_text)) {
        return usage_error(
            convert_usage,
            "convert: PYTHIA_DIR, --kv-heads and --kv-layers (or --kv-map) are required");
    }
    o.pool = (PoolKind)pool;
    o.grow = (GrowKind)grow;
    o.reference_rotary = rotary;
    char in_dir[PATH_LEN], default_out[PATH_LEN], suffix[64];
    snprintf(in_dir, sizeof(in_dir), "%s", in);
    trim_slashes(in_dir);
    Model mha, converted;
    if (model_load(&mha, in_dir) != 0) return exit_code(-1);
    const Config *c = &mha.config;
    if (c->n_head % o.kv_heads != 0 || o.kv_heads > c->n_head)
        rc = fail("--kv-heads %d: the %d attention heads must split into %d equal groups",
                  o.kv_heads, c->n_head, o.kv_heads);
    else if (o.kv_layers > c->n_layer)
        rc = fail("--kv-layers %d: the model has %d layers", o.kv_layers, c->n_layer);
    else if (map_text && (rc = parse_layer_map(map_text, c->n_layer, o.map)) == 0)
        o.has_map = 1;
    int kv_layers = o.kv_layers;
    if (rc == 0 && o.has_map) {
        kv_layers = 0;
        for (int l = 0; l < c->n_layer; l++) kv_layers += o.map[l] == l;
    }
    snprintf(suffix, sizeof(suffix), "_mlkv_%s%d_%d", o.kv_mlp ? "mlp_" : "", kv_layers,
             o.kv_heads);
    if (rc == 0 && !out) { /* in the current folder, never beside the input (an HF cache) */
        char name[PATH_LEN];
        model_name_of(name, sizeof(name), in_dir);
        if ((rc = make_path(default_out, name, suffix)) == 0) out = default_out;
    }
    if (rc == 0) rc = check_output_dir(out, in_dir, overwrite, NULL);
    if (rc == 0) rc = model_convert(&mha, &converted, &o);
    if (rc == 0) {
        rc = checkpoint_save(&converted, out, NULL, in_dir, 0);
        if (rc == 0) {
            const Config *n = &converted.config;
            printf("converted %s -> %s\n", in_dir, out);
            printf("  K/V owners:");
            for (int l = 0; l < n->n_layer; l++)
                if (n->kv_layer_of[l] == l) printf(" %d", l);
            printf(" (%d layer%s x %d head%s; was %d x %d); layer reads:", n->n_kv_layer,
                   plural(n->n_kv_layer), n->n_kv_head, plural(n->n_kv_head), c->n_layer,
                   c->n_head);
            for (int l = 0; l < n->n_layer; l++) printf(" %d", n->kv_layer_of[l]);
            printf("\n  pooling across layers: %s\n", pool_names[o.pool]);
            if (n->use_kv_mlp)
                printf("  KV-MLP hidden width %d; MLPs unchanged\n", n->kv_intermediate_size);
            else
                printf("  MLP intermediate %d -> %d (%s)\n", c->intermediate_size,
                       n->intermediate_size,
                       o.grow == GROW_NONE   ? "no growth"
                       : o.grow == GROW_ZERO ? "new neurons output 0"
                                             : "new neurons copy the first ones");
            printf("  parameters %zu -> %zu\n", mha.num_parameters, converted.num_parameters);
            printf("  KV cache bytes/token: fp16 %ld -> %ld, fp32 %ld -> %ld (%.1fx smaller)\n",
                   kv_cache_bytes(c, 2), kv_cache_bytes(n, 2), kv_cache_bytes(c, 4),
                   kv_cache_bytes(n, 4),
                   (double)kv_cache_bytes(c, 2) / (double)kv_cache_bytes(n, 2));
        }
        model_free(&converted);
    }
    model_free(&mha);
    return exit_code(rc);
}

static const char *const export_usage =
    "usage: mlkv export DIR --fused --out DIR2 [--overwrite]\n"
    "Writes an MHA model in the stock GPT-NeoX layout (fused query_key_value, no\n"
    "MLKV keys in config.json), which plain HF transformers loads. --overwrite\n"
    "replaces a model already in DIR2.\n";

static int cmd_export(int argc, char **argv) {
    const char *in = NULL, *out = NULL;
    int fused = 0, overwrite = 0;
    Flag flags[] = {SWITCH_FLAG("--fused", &fused), STRING_FLAG("--out", &out),
                    SWITCH_FLAG("--overwrite", &overwrite)};
    int parsed = parse_flags(argc, argv, flags, 3, export_usage, &in);
    if (parsed != FLAGS_OK) return parsed;
    int rc = 0;
    if (!in || !out || !fused) {
        return usage_error(export_usage,
                           "export: DIR, --fused (the one format) and --out are required");
    }
    Model m;
    if (model_load(&m, in) != 0) return exit_code(-1);
    const Config *c = &m.config;
    if (!is_mha(c))
        rc = fail("%s: only MHA models have the stock layout (this "
                  "one has %d K/V head%s in %d of %d layers%s)",
                  in, c->n_kv_head, plural(c->n_kv_head), c->n_kv_layer, c->n_layer,
                  c->use_kv_mlp ? ", KV-MLP" : "");
    if (rc == 0) rc = check_output_dir(out, in, overwrite, NULL);
    if (rc == 0) rc = checkpoint_save(&m, out, NULL, in, 1);
    if (rc == 0) printf("wrote %s in the stock GPT-NeoX layout\n", out);
    model_free(&m);
    return exit_code(rc);
}

static const char *const encode_usage =
    "usage: mlkv encode --tokenizer FILE|MODEL_DIR TEXT\n"
    "Prints the token ids of TEXT, exactly as HF tokenizers when TEXT is ASCII (for\n"
    "other text: python3 tokenize.py encode --tokenizer FILE TEXT).\n";

static int cmd_encode(int argc, char **argv) {
    const char *path = NULL, *text = NULL;
    Flag flags[] = {STRING_FLAG("--tokenizer", &path)};
    int parsed = parse_flags(argc, argv, flags, 1, encode_usage, &text);
    if (parsed != FLAGS_OK) return parsed;
    if (!path || !text)
        return usage_error(encode_usage, "encode: --tokenizer and TEXT are required");
    Tokenizer t;
    if (tokenizer_load(&t, path) != 0) return exit_code(-1);
    int room = (int)strlen(text) + 16, *ids = malloc(sizeof(int) * (size_t)room);
    int n = ids ? tokenizer_encode(&t, text, ids, room) : fail("out of memory");
    for (int i = 0; i < n; i++) printf("%s%d", i ? " " : "", ids[i]);
    if (n >= 0) printf("\n");
    free(ids);
    tokenizer_free(&t);
    return exit_code(n >= 0 ? 0 : -1);
}

static const char *const decode_usage =
    "usage: mlkv decode --tokenizer FILE|MODEL_DIR ID...\n"
    "Writes the text of the token ids, as HF tokenizers decodes them.\n";

static int cmd_decode(int argc, char **argv) {
    const char *path = NULL;
    Flag flags[] = {STRING_FLAG("--tokenizer", &path)};
    int first = 0;
    while (first < argc &&
           (argv[first][0] == '-' || (first > 0 && !strcmp(argv[first - 1], "--tokenizer"))))
        first++;
    int parsed = parse_flags(first, argv, flags, 1, decode_usage, NULL);
    if (parsed != FLAGS_OK) return parsed;
    int rc = 0;
    if (!path) return usage_error(decode_usage, "decode: --tokenizer is required");
    Tokenizer t;
    if (tokenizer_load(&t, path) != 0) return exit_code(-1);
    Utf8Stream stream = {{0}, 0};
    for (int i = first; i < argc && rc == 0; i++) {
        char *end;
        long id = strtol(argv[i], &end, 10);
        int len;
        const char *bytes = *end || end == argv[i] || id < 0 || id >= t.n_ids
                                ? NULL
                                : tokenizer_token(&t, (int)id, &len);
        if (!bytes) rc = fail("%s: not a token id of %s (0..%d)", argv[i], path, t.n_ids - 1);
        else utf8_stream_write(&stream, bytes, len, stdout);
    }
    utf8_stream_flush(&stream, stdout);
    tokenizer_free(&t);
    return exit_code(rc);
}

static const char *const sample_usage =
    "usage: mlkv sample DIR [--prompt TEXT | --prompt-ids IDS] [-n N] [options]\n"
    "Generates text: the prompt is prefilled in one pass, then one token per step,\n"
    "with a KV cache that holds only the owning layers' K/V (2 * kvL * kvH *\n"
    "head_size floats per token). Streams the text as it is generated, and stops at\n"
    "<|endoftext|>, at --stop, or after N tokens. Without a prompt it starts a new\n"
    "document (from <|endoftext|>).\n"
    "  --prompt TEXT       ASCII text, encoded with DIR/tokenizer.json (other text:\n"
    "                      python3 tokenize.py encode, then --prompt-ids)\n"
    "  --prompt-ids IDS    token ids, separated by commas or spaces\n"
    "                      (neither: start from <|endoftext|>)\n"
    "  -n N                tokens to generate at most (64)\n"
    "  --stop STRING       stop when the text ends with STRING (not printed)\n"
    "  --ignore-eos        go on past <|endoftext|>\n"
    "  --temperature T     0 = greedy (1.0)\n"
    "  --top-k K           sample among the K most likely tokens, 0 = all (0)\n"
    "  --top-p P           ... and among the fewest whose probability reaches P (1.0)\n"
    "  --seed S            sampling seed (42)\n"
    "  --batch B           samples generated together (1)\n"
    "  --tokenizer FILE    tokenizer.json (default DIR/tokenizer.json)\n"
    "  --threads N         OpenMP threads (all cores)\n";

/* The integers of a list separated by commas or spaces, each in lo..hi, at
 * most max of them: their count, or -1 (the message names flag and what). */
static int parse_int_list(const char *flag, const char *what, const char *text, int *out, int max,
                          int lo, int hi) {
    int n = 0;
    for (const char *p = text; *p;) {
        while (*p == ',' || *p == ' ') p++;
        if (!*p) break;
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < lo || v > hi || (*end && *end != ',' && *end != ' '))
            return fail("%s: %.20s is not %s (%d..%d)", flag, p, what, lo, hi);
        if (n == max) return fail("%s: more than %d numbers", flag, max);
        out[n++] = (int)v;
        p = end;
    }
    return n;
}

/* The first place where needle (m bytes) occurs in the last `tail` bytes of
 * s[0..n), or NULL: a stop string that the newest token completed. */
static char *find_in_tail(char *s, size_t n, size_t tail, const char *needle, size_t m) {
    for (size_t i = n > tail ? n - tail : 0; i + m <= n; i++)
        if (memcmp(s + i, needle, m) == 0) return s + i;
    return NULL;
}

/* `batch` continuations of one prompt, decoded together over a KV cache
 * (a row per sample), each ending at n_new tokens, at eos or at the stop
 * string. With a tokenizer each sample's text is kept, so that the stop
 * string is found across token boundaries; one sample streams to stdout as
 * it comes, holding back the bytes that might still begin the stop string
 * (without a tokenizer it prints ids). */
typedef struct {
    int batch, n_new, vocab;     /* vocab: ids that may be drawn */
    int eos;                     /* the id that ends a sample, or -1 */
    const char *stop;            /* the string that ends a sample, or NULL */
    const Tokenizer *tok;        /* NULL: no text */
    SamplingConfig sc;
    uint64_t seed;               /* sample b draws from seed + b * (golden ratio * 2^64) */
    /* buffers of the caller: a batch of ids [batch * P], sampling scratch
     * [vocab rows], generators [batch], and the results: tokens [batch][n_new]
     * and their counts, text [batch][text_cap] and its lengths */
    int *step;
    Candidate *scratch;
    uint64_t *rng;
    int **tokens, *length;
    char *text;
    size_t *text_len, text_cap;
    int steps;                   /* decoding steps taken */
    double prefill_seconds, decode_seconds;
} Samples;

/* The buffers of g (its sizes already set) for prompts of up to `chunk`
 * tokens and a vocabulary of vocab_size rows. 0, or -1 (free with
 * samples_free either way). */
static int samples_alloc(Samples *g, int chunk, int vocab_size) {
    size_t batch = (size_t)g->batch;
    if (!(g->step = alloc_zeroed(batch * chunk, sizeof(int), "the batch")) ||
        !(g->scratch = alloc_zeroed((size_t)vocab_size, sizeof(Candidate), "sampling")) ||
        !(g->rng = alloc_zeroed(batch, sizeof(uint64_t), "sampling")) ||
        !(g->tokens = alloc_zeroed(batch, sizeof(int *), "the samples")) ||
        !(g->length = alloc_zeroed(batch, sizeof(int), "the samples")) ||
        !(g->text_len = alloc_zeroed(batch, sizeof(size_t), "the samples")) ||
        (g->tok && !(g->text = alloc_zeroed(batch * g->text_cap, 1, "the samples"))))
        return -1;
    for (size_t b = 0; b < batch; b++)
        if (!(g->tokens[b] = alloc_zeroed((size_t)g->n_new, sizeof(int), "the samples"))) return -1;
    return 0;
}

static void samples_free(Samples *g) {
    for (int b = 0; g->tokens && b < g->batch; b++) free(g->tokens[b]);
    free(g->tokens);
    free(g->rng);
    free(g->step);
    free(g->scratch);
    free(g->length);
    free(g->text);
    free(g->text_len);
}

/* The prompt into ids (room of them): --prompt encoded (tok not NULL) or
 * --prompt-ids parsed; when that gives no token, a document's start,
 * <|endoftext|>. Returns the count, or -1. */
static int read_prompt(const char *prompt, const char *prompt_ids, const Tokenizer *tok,
                       const Config *c, int *ids, int room) {
    int n = 0;
    if (prompt) n = tokenizer_encode(tok, prompt, ids, room);
    else if (prompt_ids)
        n = parse_int_list("--prompt-ids", "a token id", prompt_ids, ids, room, 0,
                           c->vocab_size - 1);
    if (n != 0) return n;
    if (!tok || tok->eot_id < 0)
        return fail("no prompt and no <|endoftext|> to start from: give --prompt-ids");
    ids[0] = tok->eot_id;
    return 1;
}

static int generate(Model *m, KVCache *cache, const int *prompt, int P, Samples *g) {
    int batch = g->batch, running = batch, printed = 0, V = m->config.vocab_size;
    size_t stop_len = g->stop ? strlen(g->stop) : 0;
    Utf8Stream stream = {{0}, 0};
    double t0 = now_seconds();
    for (int b = 0; b < batch; b++)
        memcpy(g->step + (size_t)b * P, prompt, (size_t)P * sizeof(int));
    const float *logits = model_cached_forward(m, cache, g->step, P); /* prefill */
    if (!logits) return -1;
    double t1 = now_seconds();
    for (int b = 0; b < batch; b++) g->rng[b] = g->seed + 0x9E3779B97F4A7C15ull * (uint64_t)b;
    int rc = 0;
    for (g->steps = 0; rc == 0 && g->steps < g->n_new && running > 0; g->steps++) {
        for (int b = 0; b < batch; b++) {
            int id = sample_token(logits + (size_t)b * V, g->vocab, &g->sc, &g->rng[b], g->scratch),
                len;
            g->step[b] = id;
            if (g->length[b] < 0) continue; /* this sample has stopped; its row runs on unread */
            if (id == g->eos) { g->length[b] = -g->length[b] - 1; running--; continue; }
            g->tokens[b][g->length[b]++] = id;
            const char *bytes = g->tok ? tokenizer_token(g->tok, id, &len) : NULL;
            if (!bytes) {
                if (batch == 1) { printf("%s%d", g->steps ? " " : "", id); fflush(stdout); }
                continue;
            }
            char *t = g->text + (size_t)b * g->text_cap;
            if (g->text_len[b] + (size_t)len < g->text_cap)
                memcpy(t + g->text_len[b], bytes, (size_t)len), g->text_len[b] += (size_t)len;
            char *found = g->stop ? find_in_tail(t, g->text_len[b], stop_len + (size_t)len - 1,
                                                 g->stop, stop_len)
                                  : NULL;
            if (found) {
                g->text_len[b] = (size_t)(found - t);
                g->length[b] = -g->length[b] - 1;
                running--;
            }
            if (batch == 1) { /* stream what the stop string can no longer claim */
                size_t n = g->text_len[b];
                size_t safe = found || !g->stop ? n : n > stop_len - 1 ? n - (stop_len - 1) : 0;
                if (safe > (size_t)printed)
                    utf8_stream_write(&stream, t + printed, (int)(safe - (size_t)printed), stdout);
                printed = (int)(safe > (size_t)printed ? safe : (size_t)printed);
            }
        }
        if (g->steps + 1 < g->n_new && running > 0 &&
            !(logits = model_cached_forward(m, cache, g->step, 1)))
            rc = -1;
    }
    g->prefill_seconds = t1 - t0;
    g->decode_seconds = now_seconds() - t1;
    for (int b = 0; b < batch; b++)
        g->length[b] = g->length[b] < 0 ? -g->length[b] - 1 : g->length[b];
    if (rc == 0 && batch == 1 && g->tok && g->text_len[0] > (size_t)printed)
        utf8_stream_write(&stream, g->text + printed, (int)(g->text_len[0] - (size_t)printed),
                          stdout);
    utf8_stream_flush(&stream, stdout);
    return rc;
}

static int cmd_sample(int argc, char **argv) {
    const char *dir = NULL, *prompt = NULL, *prompt_ids = NULL, *tokenizer_path = NULL;
    const char *stop = NULL;
    int n_new = 64, batch = 1, threads = 0, ignore_eos = 0;
    uint64_t seed = 42;
    SamplingConfig sc = {1.0, 1.0, 0};
    Flag flags[] = {STRING_FLAG("--prompt", &prompt),
                    STRING_FLAG("--prompt-ids", &prompt_ids),
                    STRING_FLAG("--stop", &stop),
                    SWITCH_FLAG("--ignore-eos", &ignore_eos),
                    INT_FLAG("-n", &n_new, 1, 1 << 24),
                    NUMBER_FLAG("--temperature", &sc.temperature, 0, 1e6),
                    INT_FLAG("--top-k", &sc.top_k, 0, 1 << 30),
                    NUMBER_FLAG("--top-p", &sc.top_p, 1e-9, 1),
                    SEED_FLAG("--seed", &seed),
                    INT_FLAG("--batch", &batch, 1, 4096),
                    STRING_FLAG("--tokenizer", &tokenizer_path),
                    INT_FLAG("--threads", &threads, 1, 4096)};
    int parsed =
        parse_flags(argc, argv, flags, (int)(sizeof(flags) / sizeof(flags[0])), sample_usage, &dir);
    if (parsed != FLAGS_OK) return parsed;
    int rc = 0;
    if (!dir || (prompt && prompt_ids))
        return usage_error(sample_usage,
                           "sample: give DIR, and at most one of --prompt and --prompt-ids");
    if (stop && !*stop) return usage_error(sample_usage, "sample: --stop needs a non-empty string");
    use_threads(threads);
    Model m;
    Tokenizer tok;
    KVCache cache = {0};
    int have_tokenizer = 0, P = 0, *prompt_tokens = NULL;
    if (model_load(&m, dir) != 0) return exit_code(-1);
    const Config *c = &m.config;
    have_tokenizer = tokenizer_load(&tok, tokenizer_path ? tokenizer_path : dir) == 0;
    /* the load error says why, and how to give one */
    if (!have_tokenizer && (tokenizer_path || prompt || stop))
        rc = fail_in(tokenizer_path
                         ? "--tokenizer"
                         : "no tokenizer: give --tokenizer FILE (or put tokenizer.json in DIR)");
    int room = c->max_position_embeddings;
    prompt_tokens = alloc_zeroed((size_t)room + 1, sizeof(int), "the prompt");
    if (rc == 0 && !prompt_tokens) rc = -1;
    if (rc == 0) {
        P = read_prompt(prompt, prompt_ids, have_tokenizer ? &tok : NULL, c, prompt_tokens, room);
        rc = P < 0 ? -1 : 0;
    }
    if (rc == 0 && P + n_new > c->max_position_embeddings)
        rc = fail("%d prompt + %d new tokens exceed max_position_embeddings (%d)", P, n_new,
                  c->max_position_embeddings);
    int chunk = P > 0 ? P : 1; /* the whole prompt in one pass */
    /* Never an id the tokenizer lacks (Pythia pads its embedding to 50304
     * rows for 50277 tokens) */
    Samples g = {.batch = batch, .n_new = n_new, .sc = sc, .seed = seed, .stop = stop,
        .vocab = have_tokenizer && tok.n_ids < c->vocab_size ? tok.n_ids : c->vocab_size,
        .eos = have_tokenizer && !ignore_eos ? tok.eot_id : -1, .tok = have_tokenizer ? &tok : NULL,
        .text_cap = (size_t)n_new * 16 + 16};
    if (rc == 0) rc = kv_cache_init(&cache, &m, batch, P + n_new, chunk, 0);
    if (rc == 0) rc = samples_alloc(&g, chunk, c->vocab_size);
    if (rc == 0 && batch == 1 && have_tokenizer && prompt) { printf("%s", prompt); fflush(stdout); }
    if (rc == 0) rc = generate(&m, &cache, prompt_tokens, P, &g);
    Utf8Stream stream = {{0}, 0};
    for (int b = 0; rc == 0 && batch > 1 && b < batch; b++) { /* several samples: each one whole */
        printf("--- sample %d\n", b);
        if (have_tokenizer && prompt) printf("%s", prompt); /* each sample whole, as one alone */
        if (have_tokenizer)
            utf8_stream_write(&stream, g.text + (size_t)b * g.text_cap, (int)g.text_len[b], stdout);
        for (int i = 0; !have_tokenizer && i < g.length[b]; i++)
            printf("%s%d", i ? " " : "", g.tokens[b][i]);
        utf8_stream_flush(&stream, stdout);
        printf("\n");
    }
    char cache_text[32];
    if (rc == 0)
        fprintf(
            stderr,
            "\n[prefill %d x %d tokens: %.0f tok/s; decode %d x %d: %.1f tok/s; KV cache %s; %s]\n",
            batch, P, batch * P / fmax(g.prefill_seconds, 1e-9), batch, g.steps,
            batch * g.steps / fmax(g.decode_seconds, 1e-9),
            format_bytes(cache_text, sizeof(cache_text), (double)cache.cache_bytes),
            rotary_mode(c));
    samples_free(&g);
    free(prompt_tokens);
    kv_cache_free(&cache);
    if (have_tokenizer) tokenizer_free(&tok);
    model_free(&m);
    return exit_code(rc);
}

/* --- bench-kv: the reference's decode-memory measurement, done properly --- */

/* The reference's grid for Pythia-160M (L = 12, H = 12): name, kvL, kvH */
static const struct { const char *name; int kv_layers, kv_heads;
} reference_grid[] = {{"MHA-144", 12, 12}, {"GQA-48", 12, 4}, {"MLKV-48", 4, 12},
                      {"MQA-12", 12, 1},   {"MLKV-12", 4, 3}, {"MLKV-6", 6, 1},
                      {"MLKV-4", 4, 1},    {"MLKV-2", 2, 1},  {"MLKV-1", 1, 1}};
#define GRID_SIZE ((int)(sizeof(reference_grid) / sizeof(reference_grid[0])))

/* A configuration's name as the reference names them: its kind and the K/V
 * heads its cache holds (kvL * kvH): MHA-144, GQA-48, MQA-12, MLKV-2 ... */
static void config_name(char *out, size_t n, int L, int H, int kvL, int kvH) {
    const char *kind = kvL < L ? "MLKV" : kvH == H ? "MHA" : kvH == 1 ? "MQA" : "GQA";
    snprintf(out, n, "%s-%d", kind, kvL * kvH);
}

/* The reference's grid adapted to L layers of H heads: kvL capped at L, kvH
 * the largest divisor of H not above the grid's, each configuration once and
 * named for what it is. Returns the count. */
typedef struct { char name[32]; int kv_layers, kv_heads; } GridEntry;
static int adapted_grid(int L, int H, GridEntry *out) {
    int n = 0;
    for (int g = 0; g < GRID_SIZE; g++) {
        int kvL = reference_grid[g].kv_layers < L ? reference_grid[g].kv_layers : L,
            kvH = reference_grid[g].kv_heads;
        while (H % kvH != 0 || kvH > H) kvH--;
        int seen = 0;
        for (int i = 0; i < n; i++) seen |= out[i].kv_layers == kvL && out[i].kv_heads == kvH;
        if (seen) continue;
        out[n].kv_layers = kvL;
        out[n].kv_heads = kvH;
        config_name(out[n].name, sizeof(out[n].name), L, H, kvL, kvH);
        n++;
    }
    return n;
}

/* Resident memory now, in bytes (Linux /proc; elsewhere the peak from getrusage). */
static double resident_bytes(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = -1;
    while (f && fgets(line, sizeof(line), f))
        if (!strncmp(line, "VmRSS:", 6)) kb = atof(line + 6);
    if (f) fclose(f);
    if (kb < 0) {
        struct rusage u;
        getrusage(RUSAGE_SELF, &u);
        kb = (double)u.ru_maxrss;
    }
    return kb * 1024.0;
}

static double physical_memory_bytes(void) {
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && size > 0 ? (double)pages * (double)size : 4096.0 * 1048576.0;
}

/* What kv_cache_init will allocate for (B, max_T, chunk), last-position logits. */
static double kv_cache_plan_bytes(const Config *c, int B, int max_T, int chunk) {
    KVCache unused;
    BufferSpec specs[32] = {{0}};
    double floats = 0;
    int n = kv_cache_specs(&unused, c, B, max_T, chunk, 0, specs);
    for (int i = 0; i < n; i++) floats += (double)specs[i].floats;
    return 4.0 * floats;
}

static void print_theory(void) {
    static const struct { const char *name; int hidden, layers, heads;
    } sizes[] = {{"14m", 128, 6, 4},    {"31m", 256, 6, 8},     {"70m", 512, 6, 8},
                 {"160m", 768, 12, 12}, {"410m", 1024, 24, 16}, {"1b", 2048, 16, 8}};
    printf("KV cache in bytes, 2 * kvL * kvH * head_size * bytes per element. The grid is the\n"
           "reference's (Pythia-160M); for other sizes kvL is capped at L and kvH is the largest\n"
           "divisor of H not above the grid's, each configuration once, named for what it is.\n");
    printf("| Pythia | config | kvL x kvH | per token fp16 | per "
           "token fp32 | 2048 tokens fp16 | 2048 tokens fp32 |\n");
    printf("|---|---|---|---|---|---|---|\n");
    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
        GridEntry grid[GRID_SIZE];
        int n = adapted_grid(sizes[s].layers, sizes[s].heads, grid),
            hs = sizes[s].hidden / sizes[s].heads;
        for (int g = 0; g < n; g++) {
            long token = 2L * grid[g].kv_layers * grid[g].kv_heads * hs;
            printf("| %s | %s | %d x %d | %ld | %ld | %.2f MiB | %.2f MiB |\n", sizes[s].name,
                   grid[g].name, grid[g].kv_layers, grid[g].kv_heads, token * 2, token * 4,
                   token * 2 * 2048 / 1048576.0, token * 4 * 2048 / 1048576.0);
        }
    }
}

#define BENCH_MAX_REPEAT 100
typedef struct {
    int prefill, decode, threads;
    int repeat;         /* timed decoding runs, after a warm-up: the median is reported */
    const int *batches;
    int n_batches;
    double mem_limit;
    FILE *csv;
    int reference_csv;  /* the reference's measurements.csv columns */
    double background;  /* resident bytes before any model was loaded */
    double time_limit;  /* seconds per configuration: no larger batch is started after it */
    double *decode_rates, *memory_bytes; /* per batch size, when given (experiment) */
} BenchOptions;

/* The reference's decode-memory script's batch sizes (its measurements.csv) */
static const int reference_batches[] = {8,   16,  24,  32,  40,  48,  64,  80,  100,
                                        140, 220, 300, 380, 460, 620, 720, 940, 1100};

static const char bench_table_header[] =
    "| config | batch | KV cache MiB | formula MiB | weights + cache + scratch MiB | prefill tok/s "
    "| decode tok/s (median) | decode tok/s (range) |\n|---|---|---|---|---|---|---|---|\n";
static const char bench_csv_header[] =
    "config,kv_layers,kv_heads,batch,prefill,decode,kv_cache_bytes,kv_cache_formula_bytes,resident_"
    "bytes,prefill_tok_s,decode_tok_s,threads,decode_tok_s_min,decode_tok_s_max,repeats\n";

static int double_order(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* One configuration: growing batch sizes until the next one would pass the limit. */
static int bench_model(Model *m, const char *name, const BenchOptions *o) {
    const Config *c = &m->config;
    int T = o->prefill + o->decode, chunk = o->prefill < 256 ? o->prefill : 256;
    double params = (double)m->num_parameters * 4, loaded = resident_bytes(),
           started = now_seconds();
    for (int i = 0; i < o->n_batches; i++) {
        int B = o->batches[i];
        if (i > 0 && now_seconds() - started > o->time_limit) {
            printf("| %s | %d | stop: --time-limit %.0f s reached |\n", name, B, o->time_limit);
            break;
        }
        double need = params + kv_cache_plan_bytes(c, B, T, chunk);
        if (need > o->mem_limit) {
            printf("| %s | %d | stop: would need %.1f MiB, over --mem-limit %.1f MiB |\n", name, B,
                   need / 1048576.0, o->mem_limit / 1048576.0);
            if (o->reference_csv) fprintf(o->csv, "%s,%d,%d,,,,,,,True\n", name, B, o->decode);
            break;
        }
        KVCache cache;
        /* [B, chunk] inputs, then the B first inputs of decoding */
        int *tokens = alloc_zeroed((size_t)B * (chunk + 1), sizeof(int), "bench tokens");
        if (!tokens || kv_cache_init(&cache, m, B, T, chunk, 0) != 0) { free(tokens); return -1; }
        uint64_t rng = 1;
        double t0 = now_seconds();
        for (int done = 0; done < o->prefill; done += chunk) { /* random prompt tokens */
            int n = o->prefill - done < chunk ? o->prefill - done : chunk;
            for (int i = 0; i < B * n; i++)
                tokens[i] = (int)(rng_next(&rng) % (uint64_t)c->vocab_size);
            if (!model_cached_forward(m, &cache, tokens, n)) {
                kv_cache_free(&cache);
                free(tokens);
                return -1;
            }
        }
        double t1 = now_seconds(), rates[BENCH_MAX_REPEAT];
        /* decoding: a warm-up, then o->repeat timed runs, each from the prompt's end (the
         * cache cut back to it, the same first inputs): one short run on a shared machine
         * measures the machine's moment as much as the model */
        int *first = tokens + (size_t)B * chunk;
        memcpy(first, tokens, (size_t)B * sizeof(int));
        for (int run = -1; run < o->repeat; run++) {
            cache.length = o->prefill;
            memcpy(tokens, first, (size_t)B * sizeof(int));
            double started_run = now_seconds();
            for (int i = 0; i < o->decode; i++) {
                const float *logits = model_cached_forward(m, &cache, tokens, 1);
                if (!logits) { kv_cache_free(&cache); free(tokens); return -1; }
                for (int b = 0; b < B; b++) /* greedy: the next input is each sequence's argmax */
                    tokens[b] = argmax(logits + (size_t)b * c->vocab_size, c->vocab_size);
            }
            if (run >= 0) rates[run] = B * o->decode / fmax(now_seconds() - started_run, 1e-9);
        }
        qsort(rates, (size_t)o->repeat, sizeof(double), double_order);
        double rss = resident_bytes();
        double formula = (double)kv_cache_bytes(c, 4) * B * T;
        double prefill_rate = B * o->prefill / fmax(t1 - t0, 1e-9),
               decode_rate = o->repeat % 2 ? rates[o->repeat / 2]
                                           : (rates[o->repeat / 2 - 1] + rates[o->repeat / 2]) / 2,
               t2 = t1 + B * o->decode / decode_rate; /* prefill, then a median decoding run */
        if (o->decode_rates) o->decode_rates[i] = decode_rate;
        /* weights + cache + scratch */
        double memory = params + (double)cache.cache_bytes + (double)cache.scratch_bytes;
        if (o->memory_bytes) o->memory_bytes[i] = memory;
        printf("| %s | %d | %.2f | %.2f | %.1f | %.0f | %.1f | %.1f - %.1f |\n", name, B,
               cache.cache_bytes / 1048576.0, formula / 1048576.0, memory / 1048576.0, prefill_rate,
               decode_rate, rates[0], rates[o->repeat - 1]);
        fflush(stdout);
        /* MB as the reference reports them: MiB; its speed counts decode - 1 tokens */
        if (o->reference_csv)
            fprintf(o->csv, "%s,%d,%d,%.0f,%.0f,%.4f,%.4f,%.6f,%.6f,False\n", name, B, o->decode,
                    o->background / 1048576.0, (loaded - o->background) / 1048576.0,
                    (rss - loaded) / 1048576.0, cache.cache_bytes / 1048576.0, t2 - t0,
                    B * (o->decode - 1) / fmax(t2 - t0, 1e-9));
        else
            fprintf(o->csv, "%s,%d,%d,%d,%d,%d,%zu,%.0f,%.0f,%.2f,%.3f,%d,%.3f,%.3f,%d\n", name,
                    c->n_kv_layer, c->n_kv_head, B, o->prefill, o->decode, cache.cache_bytes,
                    formula, rss, prefill_rate, decode_rate, o->threads, rates[0],
                    rates[o->repeat - 1], o->repeat);
        fflush(o->csv);
        kv_cache_free(&cache);
        free(tokens);
    }
    return 0;
}

static const char *const bench_usage =
    "usage: mlkv bench-kv [DIR | --config CONFIG.json] [--grid] [options]\n"
    "       mlkv bench-kv --theory\n"
    "The reference's decode-memory measurement: for each configuration and growing\n"
    "batch sizes, prefill P random tokens (in passes of 256, so that activations do\n"
    "not dominate the memory measured), decode N more greedily, and report the KV\n"
    "cache (bytes allocated, and 2 * kvL * kvH * head_size * 4 * B * (P + N)), the\n"
    "memory of the configuration (weights + cache + scratch), prefill and decode\n"
    "tokens/s (decoding: after a warm-up run, the median and range of --repeat runs).\n"
    "A batch that would pass --mem-limit is not started. Table on stdout, one CSV\n"
    "row per run.\n"
    "  DIR              a model; with --grid every configuration is converted from it\n"
    "                   on the fly (it must be MHA)\n"
    "  --config FILE    a config.json: random weights (the grid's sizes as the converter's)\n"
    "  --grid           the reference's grid MHA-144 .. MLKV-1, adapted to the model's\n"
    "                   layers and heads as --theory shows (each named for what it is:\n"
    "                   MHA, GQA, MQA or MLKV and its total K/V heads); else the model's\n"
    "                   own configuration\n"
    "  --only NAMES     these configurations only, by exact name, e.g. MHA-144,MLKV-2\n"
    "  --prefill P      prompt tokens (2000, or what the window leaves after --decode)\n"
    "  --decode N       generated tokens (48, or a quarter of a small model's window)\n"
    "  --repeat N       timed decoding runs of N tokens each, after one warm-up run (3)\n"
    "  --max-batch B    largest batch size tried, doubling from 1 (1024)\n"
    "  --batches LIST   these batch sizes instead, e.g. the reference's\n"
    "                   8,16,24,32,40,48,64,80,100,140,220,300,380,460,620,720,940,1100\n"
    "  --mem-limit MiB  memory budget (80% of physical memory)\n"
    "  --time-limit S   no larger batch after S seconds on one configuration (60)\n"
    "  --csv FILE       CSV output, a row per run as it ends (NAME.bench-kv.csv here)\n"
    "  --csv-format F   mlkv (default): the columns of the table | reference: the\n"
    "                   reference's measurements.csv, appended to FILE, and its batch\n"
    "                   list unless --batches is given. Its columns here, on a CPU:\n"
    "                   model_name (grid name, or DIR), batch_size, sequence_length (the\n"
    "                   decoded tokens), background_memory_usage (resident MiB before any\n"
    "                   model was loaded), model_memory_usage (resident MiB the model's\n"
    "                   weights added), memory_usage (resident MiB prefill and decoding\n"
    "                   added: cache and activations), kv_cache_mem (KV cache MiB),\n"
    "                   inference_time (seconds, prefill and decode), inference_speed\n"
    "                   (batch * (decoded - 1) / inference_time, as the reference counts:\n"
    "                   the first new token comes from the prefill), is_oom (True: the\n"
    "                   batch would pass --mem-limit and was not run)\n"
    "  --theory         KV bytes per token and per 2048 tokens for every Pythia size\n"
    "  --threads N      OpenMP threads (all cores)\n";

/* --only: the configurations to run, by exact names separated by commas
 * (NULL: all of them). */
static int select_entries(const char *only, const GridEntry *entries, int n_entries,
                          int *run_entry) {
    for (int g = 0; g < n_entries; g++) run_entry[g] = !only;
    for (const char *p = only; p && *p;) {
        size_t len = strcspn(p, ",");
        int found = 0;
        for (int g = 0; g < n_entries; g++)
            if (strlen(entries[g].name) == len && !strncmp(entries[g].name, p, len))
                run_entry[g] = found = 1;
        if (!found) {
            StrBuf names = {0};
            for (int g = 0; g < n_entries; g++)
                sb_printf(&names, "%s%s", g ? ", " : "", entries[g].name);
            int rc = fail("--only: no configuration %.*s here (%s)", (int)len, p, names.s);
            free(names.s);
            return rc;
        }
        p += len + (p[len] == ',');
    }
    return 0;
}

/* The default CSV: NAME.bench-kv.csv in the current folder, NAME the model's
 * (model_name_of), never beside the model (an HF cache) */
static int default_bench_csv(char *out, const char *model_path) {
    char name[PATH_LEN];
    model_name_of(name, sizeof(name), model_path);
    return make_path(out, name, ".bench-kv.csv");
}

/* o->csv opened at path with its header: mlkv's columns in a new file, or the
 * reference's, appended as the reference does (the header only in a new file). */
static int open_bench_csv(BenchOptions *o, const char *path) {
    if (!(o->csv = fopen(path, o->reference_csv ? "a" : "w")))
        return fail("%s: cannot create: %s", path, strerror(errno));
    if (!o->reference_csv) fprintf(o->csv, "%s", bench_csv_header);
    else if (ftell(o->csv) == 0)
        fprintf(o->csv, "model_name,batch_size,sequence_length,background_memory_usage,"
                        "model_memory_usage,memory_usage,kv_cache_mem,inference_time,"
                        "inference_speed,is_oom\n");
    return 0;
}

static int cmd_bench_kv(int argc, char **argv) {
    const char *dir = NULL, *config_path = NULL, *only = NULL, *csv_path = NULL;
    int grid = 0, theory = 0, prefill = 0, decode = 0;
    double mem_mib = 0.8 * physical_memory_bytes() / 1048576.0;
    static const char *const csv_formats[] = {"mlkv", "reference", NULL};
    const char *batch_list = NULL;
    int batch_max = 1024, batches[64], n_batches = 0;
    BenchOptions o = {.background = resident_bytes(), .time_limit = 60, .repeat = 3};
    Flag flags[] = {STRING_FLAG("--config", &config_path),
                    INT_FLAG("--repeat", &o.repeat, 1, BENCH_MAX_REPEAT),
                    SWITCH_FLAG("--grid", &grid),
                    STRING_FLAG("--only", &only),
                    INT_FLAG("--prefill", &prefill, 1, 1 << 20),
                    INT_FLAG("--decode", &decode, 1, 1 << 20),
                    NUMBER_FLAG("--time-limit", &o.time_limit, 0, 1e9),
                    INT_FLAG("--max-batch", &batch_max, 1, 1 << 20),
                    NUMBER_FLAG("--mem-limit", &mem_mib, 1e-3, 1e9),
                    STRING_FLAG("--csv", &csv_path),
                    SWITCH_FLAG("--theory", &theory),
                    INT_FLAG("--threads", &o.threads, 1, 4096),
                    STRING_FLAG("--batches", &batch_list),
                    CHOICE_FLAG("--csv-format", &o.reference_csv, csv_formats)};
    int parsed =
        parse_flags(argc, argv, flags, (int)(sizeof(flags) / sizeof(flags[0])), bench_usage, &dir);
    if (parsed != FLAGS_OK) return parsed;
    int rc = 0;
    if (theory) { print_theory(); return 0; }
    if (!dir == !config_path)
        return usage_error(bench_usage, "bench-kv: give DIR or --config (one of them)");
    if (batch_list)
        n_batches =
            parse_int_list("--batches", "a batch size", batch_list, batches, 64, 1, 1 << 20);
    else if (o.reference_csv)
        for (; n_batches < (int)(sizeof(reference_batches) / sizeof(int)); n_batches++)
            batches[n_batches] = reference_batches[n_batches];
    else
        for (int B = 1; B <= batch_max; B *= 2) batches[n_batches++] = B;
    if (n_batches <= 0)
        return exit_code(n_batches < 0 ? -1 : fail("--batches: no batch size given"));
    o.batches = batches;
    o.n_batches = n_batches;
    use_threads(o.threads);
#ifdef _OPENMP
    o.threads = omp_get_max_threads();
#else
    o.threads = 1;
#endif
    o.mem_limit = mem_mib * 1048576.0;
    Model base;
    Config c;
    if (dir ? model_load(&base, dir) : config_load(&c, config_path, NULL)) return exit_code(-1);
    if (dir) c = base.config;
    /* the configurations: the grid adapted to this shape (--only picks by name), or the model as it
     * is */
    GridEntry entries[GRID_SIZE];
    int n_entries = grid ? adapted_grid(c.n_layer, c.n_head, entries) : 1,
        run_entry[GRID_SIZE] = {0};
    if (!grid) {
        entries[0] = (GridEntry){"", c.n_kv_layer, c.n_kv_head};
        config_name(entries[0].name, sizeof(entries[0].name), c.n_layer, c.n_head, c.n_kv_layer,
                    c.n_kv_head);
    }
    rc = select_entries(only, entries, n_entries, run_entry);
    /* small models: the prompt fits the window; the CSV lies beside the model (or config) */
    int window = c.max_position_embeddings;
    o.decode = decode ? decode : 48 < window / 2 ? 48 : window / 4 > 0 ? window / 4 : 1;
    o.prefill = prefill ? prefill : window - o.decode < 2000 ? window - o.decode : 2000;
    if (rc == 0 && (o.prefill < 1 || o.prefill + o.decode > c.max_position_embeddings))
        rc = fail("--prefill %d + --decode %d exceed the model's window of %d tokens", o.prefill,
                  o.decode, c.max_position_embeddings);
    char default_csv[PATH_LEN];
    if (rc == 0 && !csv_path) {
        csv_path = default_csv;
        rc = default_bench_csv(default_csv, dir ? dir : config_path);
    }
    if (rc == 0) rc = open_bench_csv(&o, csv_path);
    if (rc != 0) {
        if (dir) model_free(&base);
        return exit_code(rc);
    }
    printf("prefill %d, decode %d, %d threads, memory limit %.0f MiB\n", o.prefill, o.decode,
           o.threads, mem_mib);
    printf("%s", bench_table_header);
    for (int g = 0; rc == 0 && g < n_entries; g++) {
        if (!run_entry[g]) continue;
        const char *name = !grid && o.reference_csv && dir ? dir : entries[g].name;
        int kvL = entries[g].kv_layers, kvH = entries[g].kv_heads;
        Model m = {0}, *target = &m;
        ConvertOptions co = {.kv_heads = kvH, .kv_layers = kvL};
        if (dir && grid) rc = model_convert(&base, &m, &co);
        else if (dir) target = &base; /* the model as it is */
        else {
            Config gc = c;
            gc.n_kv_layer = kvL;
            gc.n_kv_head = kvH;
            if (grid)
                convert_sizes(&c, kvH, kvL, 0, &gc.intermediate_size, &gc.kv_intermediate_size);
            rc = model_init_random(&m, &gc, 1);
        }
        if (rc == 0) rc = bench_model(target, name, &o);
        model_free(&m);
    }
    fclose(o.csv);
    if (dir) model_free(&base);
    if (rc == 0) printf("wrote %s\n", csv_path);
    return exit_code(rc);
}

static const char *const init_usage =
    "usage: mlkv init --config CONFIG.json --out DIR "
    "[--tokenizer FILE|DIR] [--seed S] [--overwrite]\n"
    "Writes a freshly initialised model (weights normal(0, initializer_range), biases 0,\n"
    "LayerNorms 1 / 0) as an HF folder, for pretraining small models from scratch.\n"
    "  --tokenizer T    a tokenizer.json, or a folder whose tokenizer files the model\n"
    "                   carries (train, convert and sample then find them in DIR)\n"
    "  --seed S         weight initialisation (1234)\n"
    "  --overwrite      replace a model already in DIR\n";

static int cmd_init(int argc, char **argv) {
    const char *config_path = NULL, *out = NULL, *tokenizer = NULL;
    uint64_t seed = 1234;
    int overwrite = 0;
    Flag flags[] = {STRING_FLAG("--config", &config_path), STRING_FLAG("--out", &out),
                    SEED_FLAG("--seed", &seed), STRING_FLAG("--tokenizer", &tokenizer),
                    SWITCH_FLAG("--overwrite", &overwrite)};
    int parsed = parse_flags(argc, argv, flags, 5, init_usage, NULL);
    if (parsed != FLAGS_OK) return parsed;
    int rc = 0;
    if (!config_path || !out)
        return usage_error(init_usage, "init: --config and --out are required");
    Config c;
    Model m;
    if (config_load(&c, config_path, NULL) != 0 ||
        check_output_dir(out, NULL, overwrite, NULL) != 0 || model_init_random(&m, &c, seed) != 0)
        return exit_code(-1);
    /* a tokenizer travels with the model: a folder's tokenizer files, or one tokenizer.json
     * (checked first) */
    struct stat st;
    int tokenizer_dir = tokenizer && stat(tokenizer, &st) == 0 && S_ISDIR(st.st_mode);
    Tokenizer tok;
    if (tokenizer && tokenizer_load(&tok, tokenizer) != 0) rc = fail_in("--tokenizer");
    else if (tokenizer) tokenizer_free(&tok);
    if (rc == 0) rc = checkpoint_save(&m, out, NULL, tokenizer_dir ? tokenizer : NULL, 0);
    char path[PATH_LEN];
    if (rc == 0 && tokenizer && !tokenizer_dir)
        rc = make_path(path, out, "/tokenizer.json") == 0 ? copy_file(tokenizer, path) : -1;
    if (rc == 0) {
        print_model_summary(&m);
        printf("wrote %s%s\n", out, tokenizer ? " (with its tokenizer)" : "");
    }
    model_free(&m);
    return exit_code(rc);
}

static const char *const eval_usage =
    "usage: mlkv eval DIR --data TOKENS.bin [--seq T] [--batch B] [--max-tokens N]\n"
    "       mlkv eval DIR --task TASK.jsonl | --tasks TASKDIR [--limit N] [--out results.json]\n"
    "Measures a model. --data: the mean loss (nats, to 6 decimals), perplexity and bits\n"
    "per token of predicting every token of an llm.c token file from the ones before it,\n"
    "in windows of T predictions (a file of T + 1 tokens is one window). --task / --tasks:\n"
    "task files, scored zero-shot as lm-evaluation-harness scores them: acc and acc_norm\n"
    "for multiple choice, perplexity and acc for one choice (lambada), each with the\n"
    "harness's standard error. python3 tokenize.py tasks writes the reference's five\n"
    "(arc_easy, lambada_openai, sciq, piqa, boolq); a task of one's own is one line per\n"
    "document, {\"context\": \"Question: ...\\nAnswer:\", \"choices\": [\"ice\", \"steam\"],\n"
    "\"gold\": 0}, named after its file, tokenized here with the model's tokenizer.json\n"
    "(ASCII text; tokenize.py tasks --input FILE adds the ids of any text). Both may be given.\n"
    "  --data FILE       tokens to score\n"
    "  --seq T           tokens per window (min(2048, max_position_embeddings))\n"
    "  --batch B         windows per forward pass (1: a window of 2048 is already a large\n"
    "                    product, and the logits of every window are kept)\n"
    "  --max-tokens N    score at most N predictions (all)\n"
    "  --task FILE       a task file\n"
    "  --tasks DIR       every .jsonl task file in DIR, in name order, one table\n"
    "  --limit N         only the first N documents of each task (all)\n"
    "  --out FILE        the task results as lm-evaluation-harness's results.json\n"
    "  --tokenizer FILE  tokenizes task lines without ids (DIR/tokenizer.json)\n"
    "  --threads N       OpenMP threads (all cores)\n";

/* Appends a copy of path to a list of *n (room for *cap) */
static int add_path(char ***paths, int *n, int *cap, const char *path) {
    char **grown = grow(*paths, *n, cap, sizeof(char *));
    if (!grown) return fail("out of memory");
    *paths = grown;
    if (!(grown[*n] = strdup(path))) return fail("out of memory");
    (*n)++;
    return 0;
}

/* The task files of --task and --tasks DIR (*.jsonl, in name order); on
 * failure the caller frees the *n already listed */
static int task_paths(const char *task_path, const char *task_dir, char ***paths, int *n) {
    int cap = 0, rc = 0;
    *paths = NULL;
    *n = 0;
    if (task_dir) {
        DIR *d = opendir(task_dir);
        if (!d) return fail("%s: cannot open the folder: %s", task_dir, strerror(errno));
        for (struct dirent *e; rc == 0 && (e = readdir(d));) {
            size_t len = strlen(e->d_name);
            char path[PATH_LEN], name[PATH_LEN];
            if (len < 7 || strcmp(e->d_name + len - 6, ".jsonl") != 0) continue;
            rc = make_path(name, "/", e->d_name) == 0 && make_path(path, task_dir, name) == 0
                     ? add_path(paths, n, &cap, path)
                     : -1;
        }
        closedir(d);
        if (rc == 0 && *n == 0) rc = fail("%s: no .jsonl task files", task_dir);
        if (rc == 0) qsort(*paths, (size_t)*n, sizeof(char *), string_order);
    }
    return rc == 0 && task_path ? add_path(paths, n, &cap, task_path) : rc;
}

static int cmd_eval(int argc, char **argv) {
    const char *dir = NULL, *data = NULL, *task_path = NULL, *task_dir = NULL, *out = NULL,
               *tokenizer = NULL;
    int seq = 0, batch = 1, limit = 0, threads = 0;
    double max_tokens = 0;
    Flag flags[] = {STRING_FLAG("--data", &data),
                    INT_FLAG("--seq", &seq, 1, 1 << 20),
                    INT_FLAG("--batch", &batch, 1, 4096),
                    NUMBER_FLAG("--max-tokens", &max_tokens, 1, 1e15),
                    STRING_FLAG("--task", &task_path),
                    STRING_FLAG("--tasks", &task_dir),
                    INT_FLAG("--limit", &limit, 1, INT_MAX),
                    STRING_FLAG("--out", &out),
                    STRING_FLAG("--tokenizer", &tokenizer),
                    INT_FLAG("--threads", &threads, 1, 4096)};
    int parsed =
        parse_flags(argc, argv, flags, (int)(sizeof(flags) / sizeof(flags[0])), eval_usage, &dir);
    if (parsed != FLAGS_OK) return parsed;
    if (!dir || (!data && !task_path && !task_dir))
        return usage_error(eval_usage, "eval: DIR and --data, --task or --tasks are required");
    use_threads(threads);
    Model m;
    if (model_load(&m, dir) != 0) return exit_code(-1);
    const Config *c = &m.config;
    int rc = 0;
    printf("model %s: %zu parameters, K/V in %d layer%s x %d head%s; %s\n", dir, m.num_parameters,
           c->n_kv_layer, plural(c->n_kv_layer), c->n_kv_head, plural(c->n_kv_head),
           rotary_mode(c));
    if (data) {
        TokenFile f;
        int T = seq ? seq : default_seq_len(c);
        if (T > c->max_position_embeddings)
            rc = fail("--seq %d exceeds max_position_embeddings (%d)", T,
                      c->max_position_embeddings);
        if (rc == 0 && tokens_load(&f, data, c->vocab_size) != 0) rc = -1;
        else if (rc == 0) {
            if (f.n_tokens < 2) rc = fail("%s: %zu tokens: nothing to predict", data, f.n_tokens);
            if (rc == 0) rc = model_prepare(&m, batch, T, 0);
            size_t count = 0;
            double t0 = now_seconds(),
                   loss = rc == 0 ? token_file_loss(&m, &f, batch, T, (size_t)max_tokens, 1, &count)
                                  : 0;
            if (rc == 0)
                printf("%s: %zu predictions in windows of %d: loss %.6f | perplexity %.4f | "
                       "bits/token %.6f | %.1fs\n",
                       data, count, T, loss / count, exp(loss / count), loss / count / log(2.0),
                       now_seconds() - t0);
            tokens_free(&f);
        }
    }
    char **paths = NULL;
    int n_paths = 0;
    TaskResult *results = NULL;
    if (rc == 0 && (task_path || task_dir)) rc = task_paths(task_path, task_dir, &paths, &n_paths);
    if (rc == 0 && n_paths > 0 && !(results = calloc((size_t)n_paths, sizeof(TaskResult))))
        rc = fail("out of memory");
    for (int i = 0; rc == 0 && i < n_paths; i++) {
        double t0 = now_seconds();
        rc = evaluate_task_file(&m, paths[i], tokenizer ? tokenizer : dir, limit, &results[i],
                                NULL, NULL, 0);
        if (rc == 0)
            printf("%s: %d documents in %.1fs\n", results[i].task, results[i].n_docs,
                   now_seconds() - t0);
    }
    if (rc == 0 && n_paths > 0) {
        printf("| task | documents | metric | value | stderr |\n|---|---|---|---|---|\n");
        for (int i = 0; i < n_paths; i++)
            for (int k = 0; k < results[i].n_metrics; k++) {
                char se[32] = "N/A"; /* one document has no standard error */
                if (!isnan(results[i].metric[k].stderr_))
                    snprintf(se, sizeof(se), "%.4f", results[i].metric[k].stderr_);
                printf("| %s | %d | %s | %.4f | %s |\n", results[i].task, results[i].n_docs,
                       results[i].metric[k].name, results[i].metric[k].value, se);
            }
        if (out && (rc = write_results_json(out, results, n_paths, dir, limit)) == 0)
            printf("wrote %s\n", out);
    }
    for (int i = 0; i < n_paths; i++) free(paths[i]);
    free(paths);
    free(results);
    model_free(&m);
    return exit_code(rc);
}

/* --- Pictures: self-contained SVG, written by hand. A plot is a frame with
 * ticked axes (linear, or logarithmic in base 10) in which series are drawn
 * as lines or labelled dots; text is escaped for XML. */
typedef struct {
    StrBuf *svg;
    double x0, x1, y0, y1;              /* the data range shown */
    int log_x, log_y;
    double left, top, width, height;    /* the frame, in pixels */
    const double *x_ticks;              /* the x axis's ticks when given (n_x_ticks), */
    int n_x_ticks;                      /* else axis_ticks chooses */
} Plot;

static const char *const plot_colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                          "#8c564b", "#e377c2", "#7f7f7f", "#17becf", "#bcbd22"};
#define PLOT_COLORS ((int)(sizeof(plot_colors) / sizeof(plot_colors[0])))

static void svg_text(StrBuf *b, double x, double y, const char *anchor, int size,
                     const char *text) {
    sb_printf(b, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"%s\" font-size=\"%d\">", x, y, anchor,
              size);
    for (const char *p = text; *p; p++)
        sb_printf(b, "%s",
                  *p == '&'   ? "&amp;"
                  : *p == '<' ? "&lt;"
                  : *p == '>' ? "&gt;"
                              : (char[2]){*p, 0});
    sb_printf(b, "</text>\n");
}

static void svg_begin(StrBuf *b, int width, int height) {
    sb_printf(
        b,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" "
        "width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\" font-family=\"sans-serif\">\n<rect "
        "width=\"%d\" height=\"%d\" fill=\"white\"/>\n",
        width, height, width, height, width, height);
}

static double plot_x(const Plot *p, double x) {
    double f = p->log_x ? (log10(x) - log10(p->x0)) / (log10(p->x1) - log10(p->x0))
                        : (x - p->x0) / (p->x1 - p->x0);
    return p->left + f * p->width;
}

static double plot_y(const Plot *p, double y) {
    double f = p->log_y ? (log10(y) - log10(p->y0)) / (log10(p->y1) - log10(p->y0))
                        : (y - p->y0) / (p->y1 - p->y0);
    return p->top + (1.0 - f) * p->height;
}

/* Tick values of one axis. On a log axis: every power of ten and 2 and 5
 * times it (powers of ten alone over more than 4 decades); where that gives
 * fewer than 4 ticks, every 1 to 9 times a power of ten. Else, and on a log
 * axis spanning too little for two of those, 1, 2, 5 x a power of ten apart,
 * 4 to 8 ticks. */
static int axis_ticks(double lo, double hi, int log_axis, double *ticks, int room) {
    int n = 0;
    for (int every = 0; log_axis && every < 2; every++) {
        int wide = log10(hi / lo) > 4;
        n = 0;
        for (double decade = pow(10, floor(log10(lo))); decade <= hi && n < room; decade *= 10)
            for (int m = 1; m <= 9 && n < room; m++) {
                double t = decade * m;
                int shown = every ? 1 : wide ? m == 1 : m == 1 || m == 2 || m == 5;
                if (shown && t >= lo * (1 - 1e-9) && t <= hi * (1 + 1e-9)) ticks[n++] = t;
            }
        if (n >= 4 || (wide && n >= 2)) return n;
    }
    if (n >= 2) return n;
    n = 0;
    double raw = (hi - lo) / 8, unit = pow(10, floor(log10(raw))), step = unit;
    if (raw / unit > 5) step = 10 * unit;
    else if (raw / unit > 2) step = 5 * unit;
    else if (raw / unit > 1) step = 2 * unit;
    for (double t = ceil(lo / step) * step; t <= hi + step * 1e-9 && n < room; t += step)
        ticks[n++] = fabs(t) < step * 1e-9 ? 0 : t;
    return n;
}

/* Pads a data range [lo, hi] for drawing: 5% each side (a factor on a log axis) */
static void pad_range(double *lo, double *hi, int log_axis) {
    if (log_axis) {
        double f = *hi > *lo ? pow(*hi / *lo, 0.05) : 2.0;
        *lo /= f, *hi *= f;
        return;
    }
    double d = *hi > *lo ? 0.05 * (*hi - *lo) : fmax(fabs(*lo) * 0.1, 1e-3);
    *lo -= d, *hi += d;
}

static void plot_frame(Plot *p, StrBuf *svg, double left, double top, double width, double height,
                       const char *title, const char *x_label, const char *y_label) {
    p->svg = svg, p->left = left, p->top = top, p->width = width, p->height = height;
    double ticks[64];
    sb_printf(svg,
              "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" "
              "height=\"%.1f\" fill=\"none\" stroke=\"#444\"/>\n", left, top, width, height);
    svg_text(svg, left + width / 2, top - 12, "middle", 15, title);
    svg_text(svg, left + width / 2, top + height + 40, "middle", 13, x_label);
    sb_printf(svg, "<g transform=\"translate(%.1f %.1f) rotate(-90)\">", left - 52,
              top + height / 2);
    svg_text(svg, 0, 0, "middle", 13, y_label);
    sb_printf(svg, "</g>\n");
    for (int axis = 0; axis < 2; axis++) {
        int n = !axis && p->x_ticks ? p->n_x_ticks
                                    : axis_ticks(axis ? p->y0 : p->x0, axis ? p->y1 : p->x1,
                                                 axis ? p->log_y : p->log_x, ticks, 64);
        if (!axis && p->x_ticks) memcpy(ticks, p->x_ticks, sizeof(double) * n);
        for (int i = 0; i < n; i++) {
            char label[32];
            snprintf(label, sizeof(label), "%g", ticks[i]);
            double at = axis ? plot_y(p, ticks[i]) : plot_x(p, ticks[i]);
            if (axis) {
                sb_printf(
                    svg,
                    "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n",
                    left, at, left + width, at);
                svg_text(svg, left - 6, at + 4, "end", 11, label);
            } else {
                sb_printf(
                    svg,
                    "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", at,
                    top, at, top + height);
                svg_text(svg, at, top + height + 16, "middle", 11, label);
            }
        }
    }
}

/* A line through the points (x[i], y[i]) that are inside the range */
static void plot_line(Plot *p, const double *x, const double *y, int n, const char *color,
                      int dashed) {
    sb_printf(p->svg, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\"%s points=\"",
              color, dashed ? " stroke-dasharray=\"6 4\"" : "");
    for (int i = 0; i < n; i++)
        if (isfinite(x[i]) && isfinite(y[i]) && (!p->log_x || x[i] > 0) && (!p->log_y || y[i] > 0))
            sb_printf(p->svg, "%.1f,%.1f ", plot_x(p, x[i]), plot_y(p, y[i]));
    sb_printf(p->svg, "\"/>\n");
}

/* A dot, filled or hollow (a ring), labelled beside when label is given */
static void plot_dot(Plot *p, double x, double y, const char *color, int hollow,
                     const char *label) {
    double px = plot_x(p, x), py = plot_y(p, y);
    sb_printf(p->svg, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4.5\" fill=\"%s\" stroke=\"%s\" "
              "stroke-width=\"1.5\"/>\n", px, py, hollow ? "white" : color, color);
    if (label) svg_text(p->svg, px + 7, py - 7, "start", 11, label);
}

/* Entry i of a legend to the right of the frame, outside it (the picture
 * leaves PLOT_LEGEND_WIDTH pixels there): a line, dashed or not, or a dot,
 * filled or hollow */
#define PLOT_LEGEND_WIDTH 150
typedef enum { LEGEND_LINE, LEGEND_DASHED, LEGEND_DOT, LEGEND_RING } LegendMark;
static void plot_legend(Plot *p, int i, const char *color, LegendMark mark, const char *label) {
    double x = p->left + p->width + 14, y = p->top + 12 + 16 * i;
    if (mark == LEGEND_LINE || mark == LEGEND_DASHED)
        sb_printf(p->svg,
                  "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
                  "stroke-width=\"3\"%s/>\n", x, y - 4, x + 18, y - 4, color,
                  mark == LEGEND_DASHED ? " stroke-dasharray=\"6 4\"" : "");
    else
        sb_printf(p->svg, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4.5\" fill=\"%s\" stroke=\"%s\" "
                  "stroke-width=\"1.5\"/>\n", x + 9, y - 4, mark == LEGEND_RING ? "white" : color,
                  color);
    svg_text(p->svg, x + 24, y, "start", 11, label);
}

static int svg_end(StrBuf *svg, const char *path) {
    sb_printf(svg, "</svg>\n");
    int rc = write_text_file(path, svg->s);
    free(svg->s);
    *svg = (StrBuf){0};
    return rc;
}

/* --- experiment: the reference's comparison in one command. For every
 * configuration of a grid: convert the MHA model, evaluate it (validation
 * loss, task files), uptrain it with one recipe and one token budget,
 * evaluate it again, and measure decoding. RUN/NAME/stages.json records each
 * stage as it finishes, so a rerun skips what is done and an interrupted
 * uptraining continues from its checkpoint. Then RUN/results.csv,
 * RUN/results.md and the pictures. */
#define EXPERIMENT_MAX_TASKS 16
static const int experiment_batches[] = {1, 4, 16};
#define EXPERIMENT_BATCHES ((int)(sizeof(experiment_batches) / sizeof(experiment_batches[0])))

/* One configuration's results; NAN where its stage has not run */
typedef struct {
    GridEntry grid;
    char dir[PATH_LEN];                   /* RUN/NAME */
    double parameters, kv_bytes;          /* kv_bytes: KV cache per token, fp32 */
    double val[2];                        /* validation loss after conversion, after uptraining */
    double task[2][EXPERIMENT_MAX_TASKS]; /* each task file's accuracy, the same two times */
    double task_stderr[2][EXPERIMENT_MAX_TASKS]; /* and its standard error, as the harness's */
    double decode[EXPERIMENT_BATCHES];    /* decode tokens/s at experiment_batches */
    double memory[EXPERIMENT_BATCHES];    /* weights + KV cache + scratch, bytes */
    int trained;                          /* the uptraining ran to its last step */
} ExperimentRow;

/* The numbers stages.json holds: each key, where its numbers live, how many */
typedef struct { const char *key; double *x; int n; } RowField;
#define ROW_FIELDS 9
static void row_fields(ExperimentRow *r, int n_tasks, RowField *f) {
    RowField table[ROW_FIELDS] = {{"parameters", &r->parameters, 1},
                                  {"kv_bytes_per_token", &r->kv_bytes, 1},
                                  {"val_loss", r->val, 2},
                                  {"tasks_converted", r->task[0], n_tasks},
                                  {"tasks_uptrained", r->task[1], n_tasks},
                                  {"tasks_converted_stderr", r->task_stderr[0], n_tasks},
                                  {"tasks_uptrained_stderr", r->task_stderr[1], n_tasks},
                                  {"decode_tok_s", r->decode, EXPERIMENT_BATCHES},
                                  {"memory_bytes", r->memory, EXPERIMENT_BATCHES}};
    memcpy(f, table, sizeof(table));
}

/* stages.json, replaced whole (written beside, then renamed); a number not
 * measured yet is null */
static int row_save(ExperimentRow *r, int n_tasks) {
    char path[PATH_LEN], staging[PATH_LEN];
    if (make_path(path, r->dir, "/stages.json") != 0 ||
        make_path(staging, r->dir, "/stages.json.saving") != 0)
        return -1;
    RowField fields[ROW_FIELDS];
    row_fields(r, n_tasks, fields);
    StrBuf b = {0};
    sb_printf(&b, "{\n  \"config\": \"%s\", \"kv_layers\": %d, \"kv_heads\": %d, \"trained\": %d",
              r->grid.name, r->grid.kv_layers, r->grid.kv_heads, r->trained);
    for (int f = 0; f < ROW_FIELDS; f++) {
        sb_printf(&b, ",\n  \"%s\": [", fields[f].key);
        for (int i = 0; i < fields[f].n; i++) {
            sb_printf(&b, "%s", i ? ", " : "");
            if (isfinite(fields[f].x[i])) sb_number(&b, fields[f].x[i]);
            else sb_printf(&b, "null");
        }
        sb_printf(&b, "]");
    }
    sb_printf(&b, "\n}\n");
    int rc = write_text_file(staging, b.s);
    free(b.s);
    if (rc == 0 && rename(staging, path) != 0)
        rc = fail("%s: cannot rename to %s: %s", staging, path, strerror(errno));
    return rc;
}

/* What an earlier run of the experiment recorded for this configuration */
static int row_load(ExperimentRow *r, int n_tasks) {
    char path[PATH_LEN], *text = NULL;
    size_t len;
    RowField fields[ROW_FIELDS];
    row_fields(r, n_tasks, fields);
    for (int f = 0; f < ROW_FIELDS; f++)
        for (int i = 0; i < fields[f].n; i++) fields[f].x[i] = NAN; /* not measured yet */
    r->trained = 0;
    if (make_path(path, r->dir, "/stages.json") != 0) return -1;
    if (!file_exists(path)) return 0;
    Json j;
    if (read_file(path, &text, &len) != 0 || json_parse(text, len, path, &j) != 0) {
        free(text);
        return -1;
    }
    free(text);
    const Json *trained = json_get(&j, "trained"), *kv_layers = json_get(&j, "kv_layers"),
               *kv_heads = json_get(&j, "kv_heads");
    r->trained = trained && trained->type == JSON_NUMBER && trained->number == 1;
    if (kv_layers && kv_heads && kv_layers->type == JSON_NUMBER && kv_heads->type == JSON_NUMBER) {
        /* -1: nonsense */
        r->grid.kv_layers = kv_layers->number >= 1 && kv_layers->number <= MLKV_MAX_LAYERS
                                ? (int)kv_layers->number
                                : -1;
        r->grid.kv_heads = kv_heads->number >= 1 && kv_heads->number <= MLKV_MAX_HEADS
                               ? (int)kv_heads->number
                               : -1;
    }
    for (int f = 0; f < ROW_FIELDS; f++) {
        const Json *a = json_get(&j, fields[f].key); /* null stays NAN */
        for (int i = 0; a && a->type == JSON_ARRAY && i < fields[f].n && (size_t)i < a->length; i++)
            if (a->items[i].type == JSON_NUMBER) fields[f].x[i] = a->items[i].number;
    }
    json_free(&j);
    return 0;
}

typedef struct {
    TrainArgs recipe;        /* train's options: every configuration's uptraining */
    const char *run_dir, *task_dir;
    int task_limit, n_tasks;
    char **task_paths;
    char task_names[EXPERIMENT_MAX_TASKS][64];
    TokenFile val;
    double started;
    int stages_done, stages_total;
    int keep_all;            /* --keep all: the AdamW moments of finished uptrainings too */
} Experiment;

/* The stage line: which configuration, what it does, and the time left at
 * the average pace of the stages run so far */
static void experiment_progress(const Experiment *e, int index, int n, const char *name,
                                const char *what) {
    double elapsed = now_seconds() - e->started;
    char spent[32], left[32] = "?";
    format_duration(spent, sizeof(spent), elapsed);
    if (e->stages_done > 0)
        format_duration(left, sizeof(left),
                        elapsed / e->stages_done * (e->stages_total - e->stages_done));
    printf("== experiment [%d/%d] %s: %s | %s so far, about %s left\n", index + 1, n, name, what,
           spent, left);
}

/* Validation loss (the uptraining's validation budget: --val-batches batches
 * of --batch sequences, scored one sequence at a time so that the logits of
 * a 50k vocabulary stay small) and the task files */
static int experiment_evaluate(Experiment *e, const char *model_dir, double *val_loss,
                               double *task_scores, double *task_stderrs) {
    Model m;
    if (model_load(&m, model_dir) != 0) return -1;
    const TrainArgs *t = &e->recipe;
    int T = t->seq ? t->seq : default_seq_len(&m.config);
    int rc = model_prepare(&m, 1, T, 0);
    size_t count = 0;
    double loss = rc == 0 ? token_file_loss(&m, &e->val, 1, T,
                                            (size_t)t->val_batches * t->batch * T, 0, &count)
                          : 0;
    if (rc == 0) *val_loss = loss / (double)(count ? count : 1);
    for (int i = 0; rc == 0 && i < e->n_tasks; i++) {
        TaskResult r;
        rc = evaluate_task_file(&m, e->task_paths[i], e->recipe.model_dir, e->task_limit, &r,
                                NULL, NULL, 0);
        /* accuracy: every task has it (lambada: greedy) */
        for (int k = 0; rc == 0 && k < r.n_metrics; k++)
            if (!strcmp(r.metric[k].name, "acc")) {
                task_scores[i] = r.metric[k].value;
                task_stderrs[i] = r.metric[k].stderr_;
            }
    }
    if (rc == 0) {
        printf("   validation loss %.4f", *val_loss);
        for (int i = 0; i < e->n_tasks; i++) printf(" | %s %.4f", e->task_names[i], task_scores[i]);
        printf("\n");
    }
    model_free(&m);
    return rc;
}

/* Decoding after a prompt of half the window, at experiment_batches; the
 * table goes to the terminal and RUN/NAME/decode.csv */
static int experiment_decode(const char *model_dir, ExperimentRow *r, int threads) {
    Model m;
    char csv_path[PATH_LEN];
    if (model_load(&m, model_dir) != 0) return -1;
    if (make_path(csv_path, r->dir, "/decode.csv") != 0) { model_free(&m); return -1; }
    int window = m.config.max_position_embeddings;
    BenchOptions o = {.decode = window < 64 ? window / 4 : 16, .threads = threads, .repeat = 3,
        .batches = experiment_batches, .n_batches = EXPERIMENT_BATCHES,
        .mem_limit = 0.8 * physical_memory_bytes(), .time_limit = 1e9, .decode_rates = r->decode,
        .memory_bytes = r->memory};
    o.prefill = window / 2 < 512 ? window / 2 : 512;
    if (o.decode < 1) o.decode = 1;
    int rc = 0;
    if (!(o.csv = fopen(csv_path, "w")))
        rc = fail("%s: cannot create: %s", csv_path, strerror(errno));
    if (rc == 0) {
        fprintf(o.csv, "%s", bench_csv_header);
        printf("   prompt %d tokens, %d decoded\n%s", o.prefill, o.decode, bench_table_header);
        rc = bench_model(&m, r->grid.name, &o);
        if (fclose(o.csv) != 0 && rc == 0)
            rc = fail("%s: write failed: %s", csv_path, strerror(errno));
    }
    model_free(&m);
    return rc;
}

/* RUN/experiment.json: what the results depend on (the inputs and the
 * recipe; not --threads, --max-time or how often to log and save). A rerun
 * with other settings would mix two experiments in one table: refused. */
static int experiment_settings(const Experiment *e) {
    const TrainArgs *t = &e->recipe;
    char path[PATH_LEN];
    StrBuf b = {0};
    sb_printf(&b, "{\n  \"model\": ");
    json_write_string(&b, t->model_dir);
    sb_printf(&b, ",\n  \"train\": ");
    json_write_string(&b, t->train_path);
    sb_printf(&b, ",\n  \"val\": ");
    json_write_string(&b, t->val_path);
    sb_printf(&b, ",\n  \"tasks\": ");
    json_write_string(&b, e->task_dir ? e->task_dir : "");
    sb_printf(&b,
              ",\n  \"task_limit\": %d, \"val_batches\": %d,\n  \"recipe\": {\"batch\": %d, "
              "\"seq\": %d, \"grad_accum\": %d, \"steps\": %d, \"max_tokens\": %llu,\n    "
              "\"warmup_steps\": %d, \"schedule\": \"%s\", \"seed\": %llu, \"freeze_embeds\": "
              "%s, \"precision\": \"%s\"",
              e->task_limit, t->val_batches, t->batch, t->seq, t->grad_accum, t->steps,
              (unsigned long long)t->max_tokens, t->warmup_steps,
              schedule_names[t->opt.schedule], (unsigned long long)t->seed,
              t->freeze_embeds ? "true" : "false", precision_names[t->precision]);
    /* the real numbers, each the shortest decimal that reads back as itself */
    const char *const real_names[] = {"epochs", "lr", "warmup_ratio", "weight_decay", "clip",
                                      "beta1", "beta2", "eps"};
    const double reals[] = {t->epochs, t->opt.lr, t->warmup_ratio, t->opt.weight_decay,
                            t->opt.clip, t->opt.beta1, t->opt.beta2, t->opt.eps};
    for (int i = 0; i < 8; i++) {
        sb_printf(&b, i % 4 == 0 ? ",\n    \"%s\": " : ", \"%s\": ", real_names[i]);
        sb_number(&b, reals[i]);
    }
    sb_printf(&b, "}\n}\n");
    int rc = make_path(path, e->run_dir, "/experiment.json");
    char *old = NULL;
    size_t len;
    DIR *d = rc == 0 && !file_exists(path) ? opendir(e->run_dir) : NULL;
    /* a new run needs a new (or empty) folder */
    for (struct dirent *entry; d && rc == 0 && (entry = readdir(d));)
        if (strcmp(entry->d_name, ".") != 0 && strcmp(entry->d_name, ".."))
            rc = fail("%s holds %s but no experiment.json: not an "
                      "experiment's folder; choose a new --out",
                      e->run_dir, printable(entry->d_name));
    if (d) closedir(d);
    if (rc == 0 && file_exists(path)) {
        if (read_file(path, &old, &len) != 0) rc = -1;
        else if (len != b.len || memcmp(old, b.s, len) != 0)
            rc = fail("%s: this run was started with other settings (inputs or training recipe; "
                      "see the file): use a new --out, or the same settings to continue it",
                      path);
        free(old);
    } else if (rc == 0) {
        rc = write_text_file(path, b.s);
    }
    free(b.s);
    return rc;
}

/* The bytes of the files under path (a folder walked, links not followed) */
static double folder_bytes(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return 0;
    if (!S_ISDIR(st.st_mode)) return S_ISREG(st.st_mode) ? (double)st.st_size : 0;
    double total = 0;
    DIR *d = opendir(path);
    for (struct dirent *entry; d && (entry = readdir(d));) {
        char name[PATH_LEN], sub[PATH_LEN];
        if (strcmp(entry->d_name, ".") != 0 && strcmp(entry->d_name, "..") != 0 &&
            make_path(name, "/", entry->d_name) == 0 && make_path(sub, path, name) == 0)
            total += folder_bytes(sub);
    }
    if (d) closedir(d);
    return total;
}

/* The parameters of a configuration, from its parameter table alone */
static double config_parameters(const Config *c) {
    Model m;
    memset(&m, 0, sizeof(m));
    m.config = *c;
    double n = build_param_table(&m) == 0 ? (double)m.num_parameters : NAN;
    free(m.params);
    return n;
}

/* The disk an experiment of steps uptraining steps writes: per configuration
 * the converted model and the uptrained one (fp32 weights and the source's
 * tokenizer files: companion bytes), and while it uptrains the AdamW moments
 * (twice the weights) and, as a checkpoint is saved, a whole second one
 * beside it; its log; the tables and pictures. --keep final (the default)
 * drops the moments of a finished uptraining. done[0] / done[1]: when all is
 * done, keeping final / all; *peak: the most at one time. */
static void experiment_disk(const Config *source, const GridEntry *grid, int n, int steps,
                            double companion, int keep_all, double done[2], double *peak) {
    done[0] = done[1] = *peak = 64 * 1024.0 * (n + 1); /* stages, tables and pictures */
    for (int i = 0; i < n; i++) {
        ConvertOptions co = {.kv_heads = grid[i].kv_heads, .kv_layers = grid[i].kv_layers};
        Config c;
        if (converted_config(source, &co, &c) != 0) continue;
        double parameters = config_parameters(&c), model = 4 * parameters + companion,
               moments = 8 * parameters, log = 128.0 * steps;
        double training = done[keep_all] + 3 * model + 2 * moments + log;
        *peak = training > *peak ? training : *peak;
        done[0] += 2 * model + log;
        done[1] += 2 * model + moments + log;
    }
    *peak = done[keep_all] > *peak ? done[keep_all] : *peak;
}

/* What can be checked before the first stage, so that a refused start
 * writes nothing that blocks the corrected command: every configuration
 * converts, the uptraining's plan can learn on the training data
 * (plan_steps), the validation data holds a sequence, every task file loads. */
static int experiment_check(const Experiment *e, const Model *mha, const GridEntry *grid, int n) {
    const Config *c = &mha->config;
    for (int i = 0; i < n; i++) {
        ConvertOptions co = {.kv_heads = grid[i].kv_heads, .kv_layers = grid[i].kv_layers};
        Config converted;
        if (converted_config(c, &co, &converted) != 0) return fail_in(grid[i].name);
    }
    TrainArgs t = e->recipe;
    if (t.seq == 0) t.seq = default_seq_len(c);
    if (t.seq > c->max_position_embeddings)
        return fail("--seq %d exceeds the model's max_position_embeddings (%d)", t.seq,
                    c->max_position_embeddings);
    TokenFile train;
    DataLoader loader;
    if (tokens_load(&train, t.train_path, c->vocab_size) != 0) return -1;
    int rc = loader_init(&loader, &train, t.batch, t.seq, t.seed, 1) != 0 ? fail_in(t.train_path)
                                                                         : 0;
    if (rc == 0) {
        rc = plan_steps(&t, loader.n_seqs, 0);
        loader_free(&loader);
    }
    tokens_free(&train);
    if (rc == 0 && e->val.n_tokens < (size_t)t.seq + 1)
        rc = fail("%s: %zu tokens are fewer than one sequence of %d + 1", t.val_path,
                  e->val.n_tokens, t.seq);
    for (int i = 0; rc == 0 && i < e->n_tasks; i++) {
        Task task;
        if (task_load(&task, e->task_paths[i], c->vocab_size, e->task_limit, t.model_dir) != 0)
            rc = -1;
        else task_free(&task);
    }
    /* the disk it will need, against what the file system has free */
    double companion = 0, done[2], peak;
    for (int i = FIRST_COMPANION; checkpoint_files[i]; i++) {
        char name[PATH_LEN], path[PATH_LEN];
        if (make_path(name, "/", checkpoint_files[i]) == 0 &&
            make_path(path, t.model_dir, name) == 0)
            companion += folder_bytes(path);
    }
    experiment_disk(c, grid, n, t.steps, companion, e->keep_all, done, &peak);
    char parent[PATH_LEN], a[32], b[32], k[32], f[32];
    snprintf(parent, sizeof(parent), "%s", e->run_dir);
    if (!file_exists(parent)) { /* the folder it will be made in */
        char *slash = strrchr(parent, '/');
        if (slash && slash != parent) *slash = '\0';
        else snprintf(parent, sizeof(parent), "%s", slash ? "/" : ".");
    }
    struct statvfs fs;
    double free_bytes = statvfs(parent, &fs) == 0 ? (double)fs.f_bavail * fs.f_frsize : INFINITY,
           there = folder_bytes(e->run_dir);
    if (rc == 0)
        printf("experiment: disk: about %s when done (%s at most while it runs; --keep %s: %s); "
               "%s free\n", format_bytes(a, sizeof(a), done[e->keep_all]),
               format_bytes(b, sizeof(b), peak), e->keep_all ? "final" : "all",
               format_bytes(k, sizeof(k), done[!e->keep_all]),
               format_bytes(f, sizeof(f), free_bytes));
    if (rc == 0 && peak - there > free_bytes)
        rc = fail("%s: the experiment needs about %s more on disk, and %s is free there: free "
                  "some, or choose --out on a larger disk",
                  e->run_dir, format_bytes(a, sizeof(a), peak - there), f);
    return rc;
}

/* One configuration, stage by stage, each skipped when recorded as done.
 * Returns 0, or train's exit status when the uptraining stopped early. */
static int experiment_config(Experiment *e, const Model *mha, ExperimentRow *r, int index, int n) {
    char converted[PATH_LEN], uptrained[PATH_LEN], state[PATH_LEN];
    const char *name = r->grid.name;
    if (make_path(converted, r->dir, "/converted") != 0 ||
        make_path(uptrained, r->dir, "/uptrained") != 0 ||
        make_path(state, uptrained, "/optimizer.safetensors") != 0)
        return -1;
    if (mkdir(r->dir, 0755) != 0 && errno != EEXIST)
        return fail("%s: cannot create: %s", r->dir, strerror(errno));
    GridEntry wanted = r->grid;
    if (row_load(r, e->n_tasks) != 0) return -1;
    if (isfinite(r->parameters) &&
        (r->grid.kv_layers != wanted.kv_layers || r->grid.kv_heads != wanted.kv_heads))
        return fail("%s holds %s as %d K/V layers x %d heads, not %d x %d: name the configuration "
                    "differently, or use a new --out",
                    r->dir, name, r->grid.kv_layers, r->grid.kv_heads, wanted.kv_layers,
                    wanted.kv_heads);
    if (!isfinite(r->parameters) || !file_exists(converted)) {
        experiment_progress(e, index, n, name, "convert");
        Model m;
        ConvertOptions co = {.kv_heads = r->grid.kv_heads, .kv_layers = r->grid.kv_layers};
        if (model_convert(mha, &m, &co) != 0) return -1;
        int rc = checkpoint_save(&m, converted, NULL, e->recipe.model_dir, 0);
        r->parameters = (double)m.num_parameters;
        r->kv_bytes = (double)kv_cache_bytes(&m.config, 4);
        model_free(&m);
        if (rc != 0 || row_save(r, e->n_tasks) != 0) return -1;
    }
    e->stages_done++;
    if (!isfinite(r->val[0])) {
        experiment_progress(e, index, n, name, "evaluate after conversion");
        if (experiment_evaluate(e, converted, &r->val[0], r->task[0], r->task_stderr[0]) != 0 ||
            row_save(r, e->n_tasks) != 0)
            return -1;
    }
    e->stages_done++;
    if (!r->trained) {
        int resume = file_exists(state);
        experiment_progress(e, index, n, name, resume ? "continue uptraining" : "uptrain");
        TrainArgs t = e->recipe;
        t.model_dir = converted;
        t.out_dir = uptrained;
        t.resume = resume;
        t.how_to_continue = NULL; /* the experiment's own hint below */
        if (run_training(&t) != 0) return -1;
        if (t.finished < t.steps) { /* --max-time, or a signal: the checkpoint is saved */
            printf("experiment: %s stopped after step %d of %d: "
                   "run the same command again to continue\n", name, t.finished, t.steps);
            return t.stopped_by ? 128 + t.stopped_by : 0;
        }
        r->trained = 1;
        if (row_save(r, e->n_tasks) != 0) return -1;
    }
    /* --keep final: the moments of a finished uptraining are not needed again */
    if (!e->keep_all && unlink(state) != 0 && errno != ENOENT)
        return fail("%s: cannot remove: %s", state, strerror(errno));
    e->stages_done++;
    if (!isfinite(r->val[1])) {
        experiment_progress(e, index, n, name, "evaluate after uptraining");
        if (experiment_evaluate(e, uptrained, &r->val[1], r->task[1], r->task_stderr[1]) != 0 ||
            row_save(r, e->n_tasks) != 0)
            return -1;
    }
    e->stages_done++;
    if (!isfinite(r->decode[EXPERIMENT_BATCHES - 1])) {
        experiment_progress(e, index, n, name, "measure decoding");
        if (experiment_decode(uptrained, r, e->recipe.threads) != 0 || row_save(r, e->n_tasks) != 0)
            return -1;
    }
    e->stages_done++;
    return 0;
}

/* results.csv and results.md: one row per configuration */
static int experiment_tables(const Experiment *e, const ExperimentRow *rows, int n) {
    char path[PATH_LEN];
    StrBuf csv = {0}, md = {0};
    sb_printf(&csv, "config,kv_layers,kv_heads,total_kv_heads,parameters,kv_bytes_per_token,val_"
                    "loss_converted,val_loss_uptrained");
    sb_printf(&md, "| config | K/V layers x heads | total K/V heads | parameters | KV bytes/token "
                   "(fp32) | val loss converted | val loss uptrained |");
    for (int i = 0; i < e->n_tasks; i++) {
        const char *t = e->task_names[i];
        sb_printf(&csv, ",%s_acc_converted,%s_acc_uptrained,%s_acc_stderr_converted,"
                  "%s_acc_stderr_uptrained", t, t, t, t);
        sb_printf(&md, " %s acc converted ± s.e. | %s acc uptrained ± s.e. |", t, t);
    }
    for (int b = 0; b < EXPERIMENT_BATCHES; b++) {
        sb_printf(&csv, ",decode_tok_s_batch_%d", experiment_batches[b]);
        sb_printf(&md, " decode tok/s, batch %d |", experiment_batches[b]);
    }
    sb_printf(&csv, "\n");
    sb_printf(&md, "\n|---|---|---|---|---|---|---|");
    for (int i = 0; i < 2 * e->n_tasks + EXPERIMENT_BATCHES; i++) sb_printf(&md, "---|");
    sb_printf(&md, "\n");
    for (int r = 0; r < n; r++) {
        const ExperimentRow *x = &rows[r];
        sb_printf(&csv, "%s,%d,%d,%d,%.0f,%.0f,%.6f,%.6f", x->grid.name, x->grid.kv_layers,
                  x->grid.kv_heads, x->grid.kv_layers * x->grid.kv_heads, x->parameters,
                  x->kv_bytes, x->val[0], x->val[1]);
        sb_printf(&md, "| %s | %d x %d | %d | %.0f | %.0f | %.4f | %.4f |", x->grid.name,
                  x->grid.kv_layers, x->grid.kv_heads, x->grid.kv_layers * x->grid.kv_heads,
                  x->parameters, x->kv_bytes, x->val[0], x->val[1]);
        for (int i = 0; i < e->n_tasks; i++) {
            sb_printf(&csv, ",%.6f,%.6f,%.6f,%.6f", x->task[0][i], x->task[1][i],
                      x->task_stderr[0][i], x->task_stderr[1][i]);
            for (int stage = 0; stage < 2; stage++) { /* "0.6000 ± 0.1633" (an older run: no ±) */
                sb_printf(&md, " %.4f", x->task[stage][i]);
                if (isfinite(x->task_stderr[stage][i]))
                    sb_printf(&md, " ± %.4f", x->task_stderr[stage][i]);
                sb_printf(&md, " |");
            }
        }
        for (int b = 0; b < EXPERIMENT_BATCHES; b++) {
            sb_printf(&csv, ",%.2f", x->decode[b]);
            sb_printf(&md, " %.1f |", x->decode[b]);
        }
        sb_printf(&csv, "\n");
        sb_printf(&md, "\n");
    }
    int rc = make_path(path, e->run_dir, "/results.csv") == 0 ? write_text_file(path, csv.s) : -1;
    if (rc == 0)
        rc = make_path(path, e->run_dir, "/results.md") == 0 ? write_text_file(path, md.s) : -1;
    if (rc == 0) printf("\n%s", md.s);
    free(csv.s);
    free(md.s);
    return rc;
}

/* The training loss of RUN/NAME/uptrained.log.csv, as a rolling mean over
 * about a twentieth of the run (*window steps): n points into steps and
 * losses (caller frees), or -1 */
static int read_loss_curve(const char *dir, double **steps, double **losses, int *window) {
    char path[PATH_LEN], *text = NULL;
    size_t len;
    *steps = *losses = NULL;
    if (make_path(path, dir, "/uptrained.log.csv") != 0 || read_file(path, &text, &len) != 0)
        return -1;
    int lines = 1, n = 0;
    for (size_t i = 0; i < len; i++) lines += text[i] == '\n';
    double *raw = malloc(sizeof(double) * lines);
    *steps = malloc(sizeof(double) * lines);
    *losses = malloc(sizeof(double) * lines);
    if (!raw || !*steps || !*losses) {
        free(raw), free(text);
        return fail("out of memory");
    }
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        double step, loss;
        /* the header */
        if (sscanf(line, "%lf,%lf", &step, &loss) != 2 || !isfinite(loss)) continue;
        raw[n] = loss, (*steps)[n++] = step;
    }
    free(text);
    int w = n / 20 > 1 ? n / 20 : 1;
    double sum = 0;
    for (int i = 0; i < n; i++) {
        sum += raw[i] - (i >= w ? raw[i - w] : 0.0);
        (*losses)[i] = sum / (i + 1 < w ? i + 1 : w);
    }
    *window = w;
    free(raw);
    return n;
}

static double row_range(const ExperimentRow *rows, int n, size_t field, int b, double *hi) {
    double lo = INFINITY;
    *hi = -INFINITY;
    for (int r = 0; r < n; r++) {
        double x = ((const double *)((const char *)&rows[r] + field))[b];
        if (isfinite(x)) lo = fmin(lo, x), *hi = fmax(*hi, x);
    }
    return lo;
}

/* The pictures: validation loss against KV bytes per token (after
 * conversion and after uptraining), the training loss curves, decoding speed
 * and memory against the batch size, and, with task files, each task's
 * accuracy against KV bytes per token. Legends stand right of the plots. */
static int experiment_pictures(const Experiment *e, const ExperimentRow *rows, int n) {
    char path[PATH_LEN], title[128];
    StrBuf svg = {0};
    Plot p = {0};
    double hi, hi_converted;
    int by_kv[GRID_SIZE + 32]; /* the rows from the largest cache to the smallest */
    for (int r = 0; r < n; r++) by_kv[r] = r;
    for (int a = 1; a < n; a++)
        for (int b = a; b > 0 && rows[by_kv[b]].kv_bytes > rows[by_kv[b - 1]].kv_bytes; b--) {
            int t = by_kv[b];
            by_kv[b] = by_kv[b - 1], by_kv[b - 1] = t;
        }
    int largest = by_kv[0]; /* the largest cache (MHA in the grid): its level, dashed */
    /* 1. validation loss against the KV cache per token */
    p.x0 = row_range(rows, n, offsetof(ExperimentRow, kv_bytes), 0, &p.x1), p.log_x = 1;
    p.y0 = fmin(row_range(rows, n, offsetof(ExperimentRow, val), 1, &hi),
                row_range(rows, n, offsetof(ExperimentRow, val), 0, &hi_converted));
    p.y1 = fmax(hi, hi_converted);
    pad_range(&p.x0, &p.x1, 1);
    pad_range(&p.y0, &p.y1, 0);
    svg_begin(&svg, 720 + PLOT_LEGEND_WIDTH, 480);
    plot_frame(&p, &svg, 80, 40, 640, 370, "Validation loss against the KV cache",
               "KV cache bytes per token (fp32, log scale)", "validation loss");
    if (isfinite(rows[largest].val[1])) {
        double x[2] = {p.x0, p.x1}, y[2] = {rows[largest].val[1], rows[largest].val[1]};
        plot_line(&p, x, y, 2, "#999", 1);
    }
    for (int r = 0; r < n; r++) {
        if (isfinite(rows[r].val[0]))
            plot_dot(&p, rows[r].kv_bytes, rows[r].val[0], plot_colors[r % PLOT_COLORS], 1, NULL);
        if (isfinite(rows[r].val[1]))
            plot_dot(&p, rows[r].kv_bytes, rows[r].val[1], plot_colors[r % PLOT_COLORS], 0,
                     rows[r].grid.name);
    }
    plot_legend(&p, 0, "#444", LEGEND_DOT, "after uptraining");
    plot_legend(&p, 1, "#444", LEGEND_RING, "after conversion");
    snprintf(title, sizeof(title), "%s uptrained", rows[largest].grid.name);
    plot_legend(&p, 2, "#999", LEGEND_DASHED, title);
    int rc = make_path(path, e->run_dir, "/loss_vs_kv.svg") == 0 ? svg_end(&svg, path) : -1;
    /* 2. training loss curves */
    double *steps[GRID_SIZE + 32] = {0}, *losses[GRID_SIZE + 32] = {0};
    int points[GRID_SIZE + 32] = {0}, window = 1;
    p = (Plot){.x0 = INFINITY, .x1 = -INFINITY, .y0 = INFINITY, .y1 = -INFINITY, .log_y = 1};
    for (int r = 0; rc == 0 && r < n; r++) {
        points[r] = read_loss_curve(rows[r].dir, &steps[r], &losses[r], &window);
        for (int i = 0; i < points[r]; i++)
            p.x0 = fmin(p.x0, steps[r][i]), p.x1 = fmax(p.x1, steps[r][i]),
            p.y0 = fmin(p.y0, losses[r][i]), p.y1 = fmax(p.y1, losses[r][i]);
    }
    if (rc == 0 && p.x1 >= p.x0 && p.y0 > 0) {
        pad_range(&p.x0, &p.x1, 0);
        pad_range(&p.y0, &p.y1, 1);
        svg_begin(&svg, 720 + PLOT_LEGEND_WIDTH, 480);
        snprintf(title, sizeof(title),
                 "Training loss while uptraining (mean of the last %d step%s)", window,
                 plural(window));
        plot_frame(&p, &svg, 80, 40, 640, 370, title, "optimizer step",
                   "training loss (log scale)");
        for (int r = 0; r < n; r++) {
            plot_line(&p, steps[r], losses[r], points[r] > 0 ? points[r] : 0,
                      plot_colors[r % PLOT_COLORS], 0);
            plot_legend(&p, r, plot_colors[r % PLOT_COLORS], LEGEND_LINE, rows[r].grid.name);
        }
        rc = make_path(path, e->run_dir, "/loss_curves.svg") == 0 ? svg_end(&svg, path) : -1;
    }
    for (int r = 0; r < n; r++) free(steps[r]), free(losses[r]);
    /* 3. decoding: tokens/s and memory against the batch size, ticks at the batch sizes */
    double batches[EXPERIMENT_BATCHES];
    for (int b = 0; b < EXPERIMENT_BATCHES; b++) batches[b] = experiment_batches[b];
    svg_begin(&svg, 960 + PLOT_LEGEND_WIDTH, 480);
    for (int panel = 0; rc == 0 && panel < 2; panel++) {
        size_t field = panel ? offsetof(ExperimentRow, memory) : offsetof(ExperimentRow, decode);
        double unit = panel ? 1.0 / 1048576 : 1.0; /* memory in MiB */
        p = (Plot){.x0 = batches[0], .x1 = batches[EXPERIMENT_BATCHES - 1], .y0 = INFINITY,
                   .y1 = -INFINITY, .log_x = 1, .log_y = 1, .x_ticks = batches,
                   .n_x_ticks = EXPERIMENT_BATCHES};
        for (int b = 0; b < EXPERIMENT_BATCHES; b++) {
            double lo = row_range(rows, n, field, b, &hi) * unit;
            p.y0 = fmin(p.y0, lo), p.y1 = fmax(p.y1, hi * unit);
        }
        if (!(p.y0 > 0 && isfinite(p.y1))) p.y0 = 1, p.y1 = 10;
        pad_range(&p.x0, &p.x1, 1);
        pad_range(&p.y0, &p.y1, 1);
        plot_frame(&p, &svg, 80 + panel * 480, 40, 400, 370,
                   panel ? "Memory while decoding" : "Decoding speed (median of 3 runs)",
                   "batch size (sequences)",
                   panel ? "weights + KV cache + scratch, MiB" : "decoded tokens/s");
        for (int r = 0; r < n; r++) {
            double y[EXPERIMENT_BATCHES];
            for (int b = 0; b < EXPERIMENT_BATCHES; b++)
                y[b] = (panel ? rows[r].memory[b] : rows[r].decode[b]) * unit;
            plot_line(&p, batches, y, EXPERIMENT_BATCHES, plot_colors[r % PLOT_COLORS], 0);
            if (panel == 1)
                plot_legend(&p, r, plot_colors[r % PLOT_COLORS], LEGEND_LINE, rows[r].grid.name);
        }
    }
    if (rc == 0) rc = make_path(path, e->run_dir, "/decode.svg") == 0 ? svg_end(&svg, path) : -1;
    /* 4. each task's accuracy against the KV cache per token, the configurations joined from
     * the largest cache to the smallest: after uptraining solid, after conversion dashed */
    if (rc == 0 && e->n_tasks > 0) {
        p = (Plot){.y0 = 0, .y1 = 1, .log_x = 1};
        p.x0 = row_range(rows, n, offsetof(ExperimentRow, kv_bytes), 0, &p.x1);
        pad_range(&p.x0, &p.x1, 1);
        pad_range(&p.y0, &p.y1, 0);
        svg_begin(&svg, 720 + PLOT_LEGEND_WIDTH, 480);
        plot_frame(&p, &svg, 80, 40, 640, 370, "Task accuracy against the KV cache",
                   "KV cache bytes per token (fp32, log scale)", "accuracy");
        for (int t = 0; t < e->n_tasks; t++) {
            const char *color = plot_colors[t % PLOT_COLORS];
            for (int stage = 0; stage < 2; stage++) {
                double x[GRID_SIZE + 32], y[GRID_SIZE + 32];
                for (int k = 0; k < n; k++)
                    x[k] = rows[by_kv[k]].kv_bytes, y[k] = rows[by_kv[k]].task[stage][t];
                plot_line(&p, x, y, n, color, stage == 0);
                for (int k = 0; stage == 1 && k < n; k++)
                    if (isfinite(y[k])) plot_dot(&p, x[k], y[k], color, 0, NULL);
            }
            plot_legend(&p, t, color, LEGEND_LINE, e->task_names[t]);
        }
        plot_legend(&p, e->n_tasks, "#444", LEGEND_DASHED, "after conversion");
        rc = make_path(path, e->run_dir, "/tasks.svg") == 0 ? svg_end(&svg, path) : -1;
    }
    free(svg.s);
    if (rc == 0)
        printf("wrote %s/results.csv, results.md, loss_vs_kv.svg, loss_curves.svg, decode.svg%s\n",
               e->run_dir, e->n_tasks > 0 ? ", tasks.svg" : "");
    return rc;
}

/* --configs NAME=kvL:kvH,...: names that can be folder names */
static int parse_configs(const char *text, GridEntry *out, int room) {
    int n = 0;
    for (const char *p = text; *p;) {
        size_t len = strcspn(p, ",");
        char item[96];
        int kvL, kvH, used = 0;
        snprintf(item, sizeof(item), "%.*s", (int)(len < 95 ? len : 95), p);
        char *eq = strchr(item, '=');
        if (n >= room) return fail("--configs: more than %d configurations", room);
        if (!eq || eq == item || eq - item > 31 ||
            sscanf(eq + 1, "%d:%d%n", &kvL, &kvH, &used) != 2 || eq[1 + used] != '\0')
            return fail("--configs: \"%s\" is not NAME=KV_LAYERS:KV_HEADS (as MLKV-2=2:1)",
                        printable(item));
        *eq = '\0';
        for (const char *c = item; *c; c++)
            if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
                  (*c >= '0' && *c <= '9') || *c == '-' || *c == '_' || *c == '.'))
                return fail("--configs: the name \"%s\" may hold letters, digits, - _ and . only",
                            printable(item));
        /* at most 31 characters: checked above */
        snprintf(out[n].name, sizeof(out[n].name), "%.31s", item);
        out[n].kv_layers = kvL, out[n].kv_heads = kvH;
        n++;
        p += len + (p[len] == ',');
    }
    return n > 0 ? n : fail("--configs: no configuration given");
}

static const char *const experiment_usage =
    "usage: mlkv experiment --model DIR --train TRAIN.bin --val VAL.bin --out RUN\n"
    "                       [--grid paper | --configs "
    "NAME=kvL:kvH,...] [--tasks DIR] [train options]\n"
    "The reference's experiment in one command. For every configuration: convert the\n"
    "MHA model in DIR, evaluate it (validation loss over --val-batches batches of\n"
    "VAL.bin, and the accuracy on each task file of --tasks), uptrain it with the train\n"
    "options (one recipe and token budget for all), evaluate it again, and measure decoding\n"
    "(tokens/s and memory at batch sizes 1, 4 and 16). Writes RUN/NAME/ (converted and\n"
    "uptrained models, logs, stages.json, decode.csv), RUN/results.csv, RUN/results.md\n"
    "and the pictures RUN/loss_vs_kv.svg, RUN/loss_curves.svg, RUN/decode.svg and, with\n"
    "--tasks, RUN/tasks.svg.\n"
    "Run the same command again to continue: finished stages are skipped and an\n"
    "interrupted uptraining continues from its checkpoint.\n"
    "  --grid paper       the reference's nine configurations MHA-144 .. MLKV-1, adapted\n"
    "                     to the model's layers and heads (the default)\n"
    "  --configs LIST     instead: NAME=KV_LAYERS:KV_HEADS,... (e.g. MHA=4:4,MLKV-2=2:1)\n"
    "  --tasks DIR        task files (as mlkv eval reads them) to score each model on\n"
    "  --task-limit N     score the first N documents of each task file (all)\n"
    "  --keep final|all   final (default): a finished uptraining's AdamW moments (twice\n"
    "                     the model's size) are deleted, the models kept; all: kept too\n"
    "                     (to train a configuration on with mlkv train --resume)\n"
    "Before the first stage the whole plan is checked (every configuration, the steps,\n"
    "the data and task files) and the disk it needs is printed beside the free space.\n"
    "  train options      as mlkv train --help (--batch, --seq, --grad-accum, --steps,\n"
    "                     --epochs or --max-tokens, --lr, ..., --freeze-embeds, --max-time)\n";

static int cmd_experiment(int argc, char **argv) {
    Experiment e;
    memset(&e, 0, sizeof(e));
    train_defaults(&e.recipe);
    e.recipe.log_every = 10;
    int schedule, grid_choice = 0;
    const char *max_time = NULL, *configs = NULL;
    static const char *const grid_names[] = {"paper", NULL};
    Flag flags[TRAIN_FLAGS + 5];
    int n_flags = train_flag_table(&e.recipe, &schedule, &max_time, flags);
    flags[n_flags++] = (Flag)CHOICE_FLAG("--grid", &grid_choice, grid_names);
    flags[n_flags++] = (Flag)STRING_FLAG("--configs", &configs);
    flags[n_flags++] = (Flag)STRING_FLAG("--tasks", &e.task_dir);
    flags[n_flags++] = (Flag)INT_FLAG("--task-limit", &e.task_limit, 1, INT_MAX);
    static const char *const keep_names[] = {"final", "all", NULL};
    flags[n_flags++] = (Flag)CHOICE_FLAG("--keep", &e.keep_all, keep_names);
    int parsed = parse_flags(argc, argv, flags, n_flags, experiment_usage, NULL);
    if (parsed == FLAGS_OK)
        parsed = finish_train_flags(&e.recipe, schedule, max_time, experiment_usage);
    if (parsed != FLAGS_OK) return parsed;
    TrainArgs *t = &e.recipe;
    if (!t->model_dir || !t->train_path || !t->val_path || !t->out_dir)
        return usage_error(experiment_usage,
                           "experiment: --model, --train, --val and --out are required");
    if (t->resume || t->stop_after || t->overwrite)
        return usage_error(experiment_usage,
                           "experiment: --resume, --stop-after and --overwrite are train's: run "
                           "the same experiment command again to continue it");
    e.run_dir = t->out_dir;
    use_threads(t->threads);
    Model mha;
    GridEntry grid[GRID_SIZE + 32];
    char lock_path[PATH_LEN];
    if (model_load(&mha, t->model_dir) != 0) return exit_code(-1);
    const Config *c = &mha.config;
    int n = configs ? parse_configs(configs, grid, GRID_SIZE + 32)
                    : adapted_grid(c->n_layer, c->n_head, grid),
        rc = 0;
    if (n < 0) rc = -1;
    if (rc == 0) rc = task_paths(NULL, e.task_dir, &e.task_paths, &e.n_tasks);
    if (rc == 0 && e.n_tasks > EXPERIMENT_MAX_TASKS)
        rc = fail("%s: more than %d task files", e.task_dir, EXPERIMENT_MAX_TASKS);
    for (int i = 0; rc == 0 && i < e.n_tasks; i++)
        task_name_of(e.task_paths[i], e.task_names[i], sizeof(e.task_names[i]));
    if (rc == 0) rc = tokens_load(&e.val, t->val_path, c->vocab_size);
    /* all that can be known before the first stage, before anything is written */
    if (rc == 0) rc = experiment_check(&e, &mha, grid, n);
    if (rc == 0 && (mkdir(e.run_dir, 0755) != 0 && errno != EEXIST))
        rc = fail("%s: cannot create: %s", e.run_dir, strerror(errno));
    if (rc == 0) rc = lock_output(e.run_dir, lock_path);
    int locked = rc == 0;
    if (rc == 0) rc = experiment_settings(&e);
    ExperimentRow *rows = rc == 0 ? calloc((size_t)n, sizeof(ExperimentRow)) : NULL;
    if (rc == 0 && !rows) rc = fail("out of memory");
    if (rc == 0) {
        printf("experiment: %d configuration%s of %s into %s:", n, plural(n), t->model_dir,
               e.run_dir);
        for (int i = 0; i < n; i++)
            printf(" %s (%d x %d)", grid[i].name, grid[i].kv_layers, grid[i].kv_heads);
        printf("\n");
    }
    e.started = now_seconds();
    e.stages_total = 5 * n;
    for (int i = 0; rc == 0 && i < n; i++) {
        rows[i].grid = grid[i];
        char sub[PATH_LEN];
        rc = make_path(sub, "/", grid[i].name) == 0 && make_path(rows[i].dir, e.run_dir, sub) == 0
                 ? 0
                 : -1;
        if (rc == 0) rc = experiment_config(&e, &mha, &rows[i], i, n);
        if (rc == 0 && !rows[i].trained) break; /* stopped by --max-time: nothing more to do now */
    }
    int finished = rc == 0 && n > 0 && rows[n - 1].trained &&
                   isfinite(rows[n - 1].decode[EXPERIMENT_BATCHES - 1]);
    if (finished) rc = experiment_tables(&e, rows, n);
    if (finished && rc == 0) rc = experiment_pictures(&e, rows, n);
    if (rc == 0 && finished) {
        char spent[32], used[32];
        format_duration(spent, sizeof(spent), now_seconds() - e.started);
        printf("experiment: done in %s; %s holds %s\n", spent, e.run_dir,
               format_bytes(used, sizeof(used), folder_bytes(e.run_dir)));
    }
    if (locked) unlink(lock_path);
    for (int i = 0; i < e.n_tasks; i++) free(e.task_paths[i]);
    free(e.task_paths);
    free(rows);
    tokens_free(&e.val);
    model_free(&mha);
    return rc > 0 ? rc : exit_code(rc);
}

static const char *const demo_usage =
    "usage: mlkv demo [--out DIR] [--pretrain-steps N] [--uptrain-steps N] [--keep final|all]\n"
    "                 [--threads N]\n"
    "The MLKV experiment in miniature, no download. Writes a corpus of short documents\n"
    "that state six random facts (\"ann red cup .\") and then repeat them, so that the\n"
    "second half can only be predicted by attending back to the first, and 200 held-out\n"
    "recall probes (a document up to a repeated name; is the fact's color and thing\n"
    "predicted?); pretrains a 12-layer, 12-head Pythia-shaped MHA model on it; then runs\n"
    "mlkv experiment with the paper's nine configurations (MHA-144 .. MLKV-1): each is\n"
    "converted, evaluated, uptrained with the same recipe, evaluated again and timed.\n"
    "Prints the commands it runs and the table; writes everything under DIR (demo),\n"
    "the table and the pictures in DIR/experiment. Run it again to continue an\n"
    "interrupted demo (or to print the table of a finished one). --keep as experiment's:\n"
    "final (default) deletes each finished uptraining's AdamW moments, all keeps them.\n";

/* Runs one of mlkv's commands as a user would type it (argv[0] its name),
 * printing the line first. */
static int demo_run(int (*command)(int, char **), char **argv, int argc) {
    printf("\ndemo: ./mlkv");
    for (int i = 0; i < argc; i++) printf(" %s", argv[i]);
    printf("\n");
    return command(argc - 1, argv + 1);
}

/* DIR/tasks/recall.jsonl: probes in the format of python3 tokenize.py tasks,
 * scored as lambada is (greedy accuracy of the continuation): the context is
 * a fresh document up to a repeated name, the continuation its color and thing. */
static int demo_probes(const char *path, int n_docs, uint64_t seed) {
    StrBuf b = {0};
    uint64_t rng = seed;
    uint16_t doc[DEMO_DOC_MAX];
    int recalls[DEMO_FACTS];
    for (int d = 0; d < n_docs; d++) {
        demo_document(&rng, doc, recalls);
        /* the context: end of text, then doc[0 .. end) */
        int q = d % DEMO_FACTS, end = recalls[q] + 1;
        sb_printf(&b, "{\"task\": \"recall\", \"kind\": \"loglikelihood\", \"context\": \"");
        for (int i = 0; i < end; i++) sb_printf(&b, "%s%s", i ? " " : "", demo_words[doc[i]]);
        sb_printf(&b, "\", \"choices\": [\" %s %s\"], \"gold\": 0, \"context_ids\": [0",
                  demo_words[doc[end]], demo_words[doc[end + 1]]);
        for (int i = 0; i < end; i++) sb_printf(&b, ", %d", doc[i]);
        sb_printf(&b, "], \"continuation_ids\": [[%d, %d]]}\n", doc[end], doc[end + 1]);
    }
    int rc = b.s ? write_text_file(path, b.s) : fail("out of memory");
    free(b.s);
    return rc;
}

static int cmd_demo(int argc, char **argv) {
    const char *out = "demo";
    int pretrain_steps = 250, uptrain_steps = 40, threads = 0, keep_all = 0;
    static const char *const keep_names[] = {"final", "all", NULL};
    Flag flags[] = {STRING_FLAG("--out", &out),
                    INT_FLAG("--pretrain-steps", &pretrain_steps, 2, 1e9),
                    INT_FLAG("--uptrain-steps", &uptrain_steps, 2, 1e9),
                    INT_FLAG("--threads", &threads, 1, 4096),
                    CHOICE_FLAG("--keep", &keep_all, keep_names)};
    int parsed = parse_flags(argc, argv, flags, 5, demo_usage, NULL);
    if (parsed != FLAGS_OK) return parsed;
    char train_path[PATH_LEN], val_path[PATH_LEN], task_dir[PATH_LEN], probes[PATH_LEN],
        init_dir[PATH_LEN];
    char pretrained[PATH_LEN], state[PATH_LEN], run_dir[PATH_LEN];
    if (make_path(train_path, out, "/train.bin") || make_path(val_path, out, "/val.bin") ||
        make_path(task_dir, out, "/tasks") || make_path(probes, task_dir, "/recall.jsonl") ||
        make_path(init_dir, out, "/init") || make_path(pretrained, out, "/pretrained") ||
        make_path(state, pretrained, "/optimizer.safetensors") ||
        make_path(run_dir, out, "/experiment"))
        return exit_code(-1);
    /* Pythia's shape, scaled down: 12 layers of 12 heads, as Pythia-160M, so
     * that the paper's grid applies as it is; heads of 16 (measured: heads of
     * 8 learned the recall far more slowly). With 16-dim heads, Pythia's
     * rotary_pct 0.25 would leave 2 rotary frequencies, too little position
     * signal to find the first statement of a fact; the demo rotates whole heads. */
    Config c = {.vocab_size = 64, .hidden_size = 192, .n_layer = 12, .n_head = 12,
        .intermediate_size = 768, .max_position_embeddings = 128, .n_kv_head = 12, .n_kv_layer = 12,
        .rotary_pct = 1.0, .rotary_base = 10000, .layer_norm_eps = 1e-5, .initializer_range = 0.02,
        .parallel_residual = 1, .shared_key_rotary = 1};
    /* the disk: the corpus, the initial and the pretrained model with its moments (kept:
     * the pretraining continues from them), then the experiment's */
    GridEntry grid[GRID_SIZE + 32];
    double done[2], peak, weights = 4 * config_parameters(&c), own = 2.1e6 + 4 * weights;
    experiment_disk(&c, grid, adapted_grid(c.n_layer, c.n_head, grid), uptrain_steps, 0,
                    keep_all, done, &peak);
    char a[32], b[32];
    printf("demo: about %s on disk when done (%s at most while it runs)\n",
           format_bytes(a, sizeof(a), own + done[keep_all]),
           format_bytes(b, sizeof(b), own + fmax(peak, 4 * weights)));
    printf("demo: writing the corpus to %s (train 1M tokens, "
           "val 50k; %d words) and 200 recall probes to %s\n", out, DEMO_WORDS, probes);
    if (mkdir(out, 0755) != 0 && errno != EEXIST)
        return exit_code(fail("%s: cannot create: %s", out, strerror(errno)));
    if (mkdir(task_dir, 0755) != 0 && errno != EEXIST)
        return exit_code(fail("%s: cannot create: %s", task_dir, strerror(errno)));
    if (demo_corpus(train_path, 1000000, 1) != 0 || demo_corpus(val_path, 50000, 2) != 0 ||
        demo_probes(probes, 200, 3))
        return exit_code(-1);
    Model m; /* written on every run, as the corpus: the same bytes each time */
    if (model_init_random(&m, &c, 1234) != 0) return exit_code(-1);
    int rc = checkpoint_save(&m, init_dir, NULL, NULL, 0);
    print_model_summary(&m);
    model_free(&m);
    if (rc != 0) return exit_code(rc);
    double t0 = now_seconds();
    char steps[16], uptrain[16], threads_text[16], keep_text[8];
    snprintf(keep_text, sizeof(keep_text), "%s", keep_names[keep_all]);
    snprintf(steps, sizeof(steps), "%d", pretrain_steps);
    snprintf(uptrain, sizeof(uptrain), "%d", uptrain_steps);
    snprintf(threads_text, sizeof(threads_text), "%d", threads);
    /* 1. pretraining the MHA model: from scratch, or continuing an interrupted demo */
    char *train_argv[] = {"train",          file_exists(state) ? "--resume" : "--overwrite",
                          "--model",        init_dir,
                          "--train",        train_path,
                          "--val",          val_path,
                          "--out",          pretrained,
                          "--batch",        "16",
                          "--seq",          "128",
                          "--grad-accum",   "1",
                          "--steps",        steps,
                          "--lr",           "2e-3",
                          "--schedule",     "constant",
                          "--warmup-ratio", "0.02",
                          "--eval-every",   "50",
                          "--val-batches",  "5",
                          "--log-every",    "10",
                          "--save-every",   "50",
                          "--threads",      threads_text};
    /* --threads: last */
    int n_train = (int)(sizeof(train_argv) / sizeof(train_argv[0])) - (threads ? 0 : 2);
    rc = demo_run(cmd_train, train_argv, n_train);
    if (rc != 0) return rc;
    /* 2. the experiment: the same recipe, a shorter run, for every configuration */
    char *experiment_argv[] = {
        "experiment", "--model",      pretrained,  "--train",        train_path, "--val",
        val_path,     "--tasks",      task_dir,    "--out",          run_dir,    "--batch",
        "16",         "--seq",        "128",       "--grad-accum",   "1",        "--steps",
        uptrain,      "--lr",         "1e-3",      "--warmup-ratio", "0.1",      "--val-batches",
        "5",          "--eval-every", "0",         "--log-every",    "10",       "--save-every",
        "0",          "--keep",       keep_text,   "--threads",      threads_text};
    /* as above */
    int n_experiment =
        (int)(sizeof(experiment_argv) / sizeof(experiment_argv[0])) - (threads ? 0 : 2);
    rc = demo_run(cmd_experiment, experiment_argv, n_experiment);
    if (rc != 0) return rc;
    printf("demo: done in %.0fs; %s holds %s. A uniform guess over the %d "
           "words has loss %.3f; recall is the fraction of\n"
           "probes whose color and thing the model predicts (1 in 64 by chance).\n",
           now_seconds() - t0, out, format_bytes(a, sizeof(a), folder_bytes(out)), DEMO_WORDS,
           log((double)DEMO_WORDS));
    return 0;
}

static const char *const main_usage =
    "mlkv.c: Multi-Layer Key-Value sharing on GPT-NeoX (Pythia), trained on the CPU\n"
    "usage: mlkv <command> [options]   (mlkv <command> --help for its options)\n"
    "  init    write a randomly initialised model from a config.json\n"
    "  train   train or uptrain a model on llm.c token files\n"
    "  convert convert a pretrained MHA Pythia to GQA / MQA / MLKV\n"
    "  export  write an MHA model in the stock GPT-NeoX layout\n"
    "  sample  generate text with the small KV cache\n"
    "  eval    loss of a token file; zero-shot tasks as lm-evaluation-harness scores them\n"
    "  bench-kv  KV cache memory and decoding speed across the MLKV grid\n"
    "  experiment  the reference's experiment: convert, evaluate, uptrain, compare\n"
    "  encode  token ids of ASCII text (tokenize.py encodes any text)\n"
    "  decode  text of token ids\n"
    "  demo    the experiment in miniature: built-in corpus, a 12-layer model, the paper's grid\n";

int mlkv_main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0); /* whole lines as they come, also into a file or pipe */
    flush_subnormals();
    const char *kernels = getenv("MLKV_KERNELS"); /* another instruction set, to compare */
    if (kernels && *kernels && kernels_select(kernels) != 0)
        fprintf(stderr, "mlkv: warning: %s; running %s kernels\n", mlkv_error(), kernels_name());
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
        !strcmp(argv[1], "help")) {
        printf("%s", main_usage);
        return argc < 2 ? 2 : 0;
    }
    static const struct { const char *name; int (*run)(int, char **);
    } commands[] = {{"init", cmd_init},         {"train", cmd_train},
                    {"convert", cmd_convert},   {"export", cmd_export},
                    {"encode", cmd_encode},     {"decode", cmd_decode},
                    {"sample", cmd_sample},     {"eval", cmd_eval},
                    {"bench-kv", cmd_bench_kv}, {"experiment", cmd_experiment},
                    {"demo", cmd_demo}};
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (!strcmp(argv[1], commands[i].name)) {
            int rc = commands[i].run(argc - 2, argv + 2);
            /* what a command printed must have arrived (a full disk, a closed pipe) */
            if ((fflush(stdout) != 0 || ferror(stdout)) && (rc == 0 || rc >= 128)) {
                fprintf(stderr, "mlkv: error: standard output: write error (%s)\n",
                        strerror(errno));
                return 1;
            }
            return rc;
        }
    fprintf(stderr, "mlkv: unknown command %s\n%s", argv[1], main_usage);
    return 2;
}

#ifndef MLKV_NO_MAIN
int main(int argc, char **argv) {
#ifdef _OPENMP
    /* By default an OpenMP thread that waits at a barrier spins, which takes a
     * core from any other busy process and, when that process holds the other
     * core, leaves the team waiting on a preempted thread. Measured on 2 cores
     * with one busy process beside (yes > /dev/null), spinning against
     * waiting passively: sample 6.9 against 12.2 tokens/s (21.0 and 20.4
     * alone); training Pythia-160M at 8 x 256 167-190 against 220-227 tokens/s
     * (390-430 either way alone), Pythia-14M 40 steps 22.3-22.9 s against
     * 16.9-17.6 (alone 8.7-9.2 s against 9.8-10.7), and a longer spin before
     * sleeping (GOMP_SPINCOUNT=100000) collapsed to 94.7 s. So every command
     * waits passively unless the user chose a policy (OMP_WAIT_POLICY=active,
     * threads that never sleep, trained Pythia-14M 5-12% faster alone and
     * Pythia-160M at 1 x 2048 half as fast: 163-177 against 309-320). The
     * policy is read when the OpenMP runtime starts, before main, so mlkv
     * starts once more with it set. (/proc/self/exe is Linux's; elsewhere
     * execv fails and the run goes on as it is.) */
    if (argc > 1 && !getenv("OMP_WAIT_POLICY") && setenv("OMP_WAIT_POLICY", "passive", 1) == 0)
        execv("/proc/self/exe", argv);
#endif
    return mlkv_main(argc, argv);
}
#endif
