/*
 * mlkv.h - public interface of mlkv.c: GPT-NeoX (Pythia) with Multi-Layer
 * Key-Value sharing (MLKV), its forward and backward pass, AdamW, checkpoints
 * and the training loop, in plain C.
 *
 * Conventions: every function that can fail returns 0 on success and -1 on
 * failure, with a message naming the file or value in mlkv_error().
 * Tensors are flat row-major float arrays; shapes are given in comments as
 * [B, T, C] = batch, time (sequence position), channels.
 * In mlkv.c's order: the model first (configuration, parameters, the model
 * and its kernels, generation, optimization, the converter), then the
 * machinery (evaluation, JSON, safetensors, token files, the tokenizer, the
 * command line).
 */
#ifndef MLKV_H
#define MLKV_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define MLKV_MAX_LAYERS 256
#define MLKV_NAME_MAX 96

const char *mlkv_error(void);

/* ---------------------------------------------------------------------------
 * Model configuration (HF config.json of GPT-NeoX plus the two MLKV integers) */
typedef struct {
    int vocab_size, hidden_size, n_layer, n_head, intermediate_size;
    int max_position_embeddings;
    int n_kv_head;           /* num_key_value_heads: K/V heads in a layer that owns them */
    int n_kv_layer;          /* num_key_value_layers: how many layers own K/V projections */
    double rotary_pct, rotary_base, layer_norm_eps, initializer_range;
    int parallel_residual;   /* x + attn(ln1 x) + mlp(ln2 x); else sequential */
    int use_kv_mlp;          /* use_key_value_mlp: owners' K and V are two-layer MLPs */
    int kv_intermediate_size;/* their hidden width (kv_intermediate_size) */
    int has_kv_map;          /* kv_layer_of was given ("mlkv_kv_layer_map"), not placed */
    /* Which keys a layer that shares an owner's K reads. 1 (mlkv's default):
     * the rotated keys, as the owner does: one function in training, scoring
     * and cached decoding, which is what sharing K/V across layers means.
     * 0: the reference code's full-sequence behaviour (mlkv_shared_key_rotary:
     * false; also what a config with num_key_value_layers and without that key
     * gets, since the reference wrote it). The reference's owning layer hands
     * its K to the layers above it before rotary is applied to it, so in
     * training and evaluation those layers match rotated queries against
     * un-rotated keys, while its cached decoding gives them the owner's cached,
     * rotated past keys beside the current un-rotated one: training and
     * generation disagree.
     * mlkv's 0 keeps the full-sequence behaviour everywhere, decoding included, so
     * that the reference's checkpoints compute what they were trained to. */
    int shared_key_rotary;
    /* derived by config_finalize */
    int head_size, rotary_ndims;
    int kv_layer_of[MLKV_MAX_LAYERS];  /* the owning layer whose K/V layer l reads (<= l) */
    int kv_slot_of[MLKV_MAX_LAYERS];   /* index of that owner among the owners, 0..kvL-1 */
} Config;

/* Reads a GPT-NeoX config.json (classic or transformers-5 key names). When
 * extra is non-NULL it receives the keys mlkv does not interpret, as JSON
 * object members, to be written back unchanged (free it). */
int config_load(Config *c, const char *path, char **extra);
/* Validates and derives head_size, rotary_ndims and the owning-layer map. */
int config_finalize(Config *c, const char *what);
/* stock: write plain GPT-NeoX (no MLKV keys), for an MHA model in the fused layout. */
int config_save(const Config *c, const char *extra, int stock, const char *path);
/* The reference's placement: [0] + [int((i+1) * (L / kvL)) for i in range(kvL-1)] */
void kv_owner_layers(int n_layer, int n_kv_layer, int *owners);

/* ---------------------------------------------------------------------------
 * Parameters: one flat buffer, described by a table of named tensors */
typedef struct {
    char name[MLKV_NAME_MAX];   /* HF name, unfused: gpt_neox.layers.3.attention.key.weight */
    int ndim, shape[2];
    size_t offset, numel;       /* into the flat buffer, in floats */
    size_t slot;                /* byte offset of this tensor's pointer inside Weights */
    int decayed;                /* AdamW weight decay applies (not biases, not LayerNorms) */
} ParamInfo;

typedef struct {
    float *ln1_w, *ln1_b;       /* [C] input_layernorm */
    float *ln2_w, *ln2_b;       /* [C] post_attention_layernorm */
    float *q_w, *q_b;           /* [H*hs, C], [H*hs] */
    /* K and V exist only in owning layers (NULL elsewhere). Linear: k = k_w x + k_b,
     * k_w [kvH*hs, C]. KV-MLP: k = k_w gelu(k_mlp_w x + k_mlp_b) + k_b with
     * k_mlp_w [kvI, C] (attention.key.dense_in) and k_w [kvH*hs, kvI] (dense_out). */
    float *k_mlp_w, *k_mlp_b, *k_w, *k_b;
    float *v_mlp_w, *v_mlp_b, *v_w, *v_b;
    float *dense_w, *dense_b;   /* [C, C], [C] attention output projection */
    float *fc_w, *fc_b;         /* [I, C], [I] mlp.dense_h_to_4h */
    float *proj_w, *proj_b;     /* [C, I], [C] mlp.dense_4h_to_h */
} LayerWeights;

typedef struct {
    float *embed_in;            /* [V, C] */
    LayerWeights layer[MLKV_MAX_LAYERS];
    float *lnf_w, *lnf_b;       /* [C] final_layer_norm */
    float *embed_out;           /* [V, C] untied output head, no bias */
} Weights;

/* Activations kept from the forward pass for the backward pass, sized for (B, T). */
typedef struct {
    float *residual;   /* [L+1, B, T, C] input of each layer; [L] feeds the final LN */
    float *ln1;        /* [B, T, C] of the current layer (recomputed in the backward pass) */
    float *ln1_stats;  /* [L, B, T, 2] mean, 1/std */
    float *q;          /* [L, B, T, H*hs] rotated queries */
    float *k_pre;      /* [kvL, B, T, kvH*hs] owners' keys before rotary (NULL unless a
                          layer reads them: the reference-compatible rotary mode) */
    float *k_rot;      /* [kvL, B, T, kvH*hs] owners' keys after rotary */
    float *v;          /* [kvL, B, T, kvH*hs] owners' values */
    float *k_hidden_pre, *k_hidden; /* [kvL, B, T, kvI] KV-MLP hidden layer, before / after GELU */
    float *v_hidden_pre, *v_hidden;
    float *att_lse;    /* [L, B, H, T] log-sum-exp of each softmax row */
    float *att_panels; /* scratch: K, V, Q and dout of a layer packed for the attention kernels */
    float *att_out;    /* [L, B, T, C] softmax(q k^T) v, before the dense projection */
    float *resid_mid;  /* [L, B, T, C] x + attn (sequential residual only) */
    float *ln2;        /* [B, T, C] of the current layer (recomputed) */
    float *ln2_stats;  /* [L, B, T, 2] */
    float *fc_pre;     /* [L, B, T, I] before GELU */
    float *fc_act;     /* [B, T, I] after GELU, of the current layer (recomputed) */
    float *lnf;        /* [B, T, C] */
    float *lnf_stats;  /* [B, T, 2] */
    float *branch;     /* [B, T, C] output of the current attention or MLP branch */
    float *logits;     /* [head_rows, V]; the backward pass turns it into dlogits */
    float *losses;     /* [B, T] */
    float *logits_lse; /* [B, T] log-sum-exp of each row of logits */
} Activations;

/* Gradient scratch for the backward pass, sized for (B, T). */
typedef struct {
    float *d_residual; /* [B, T, C] gradient of the residual stream */
    float *d_ln1;      /* [B, T, C] */
    float *d_ln2;      /* [B, T, C] */
    float *d_att_out;  /* [B, T, C] */
    float *d_branch;   /* [B, T, C] gradient of a branch output (dense or mlp out) */
    float *d_q;        /* [B, T, H*hs] */
    float *d_k_pre;    /* [kvL, B, T, kvH*hs] from the layers reading un-rotated keys (or NULL) */
    float *d_k_rot;    /* [kvL, B, T, kvH*hs] from the layers reading rotated keys; summed over
                          every layer reading the owner, then rotated back in place */
    float *d_v;        /* [kvL, B, T, kvH*hs] */
    float *d_fc;       /* [B, T, I] */
    float *d_kv_hidden;/* [B, T, kvI] KV-MLP hidden gradient */
    float *att_delta;  /* [B, H, T] rowsum(d_out * out) of the attention backward */
} GradScratch;

typedef struct {
    Config config;
    int n_params;                      /* tensors */
    ParamInfo *params;                 /* [n_params] */
    size_t num_parameters;             /* floats */
    float *param_memory;  Weights w;   /* parameters */
    float *grad_memory;   Weights g;   /* their gradients (after model_prepare with grads) */
    float *adam_m, *adam_v;            /* AdamW moments (model_prepare with grads) */
    char *config_extra;                /* config.json keys kept as they were (see config_load) */
    int B, T;                          /* activation sizes of model_prepare */
    /* embed_in, embed_out: no gradient, no update (train --freeze-embeds) */
    int freeze_embeddings;
    int head_rows;                     /* rows of logits computed at once (B*T without gradients) */
    float *act_memory;    Activations a;
    float *scratch_memory; GradScratch d;
    float *rope_cos, *rope_sin;        /* [T, rotary_ndims/2] */
    int *inputs, *targets;             /* [B, T] of the last forward */
    size_t act_floats, scratch_floats; /* for --verbose */
} Model;

int model_init_random(Model *m, const Config *c, uint64_t seed);
/* Loads DIR/config.json and DIR/model.safetensors (or a sharded index); plain
 * Pythia folders with a fused query_key_value load too. F32, F16, BF16. */
int model_load(Model *m, const char *dir);
/* Allocates activations (and gradients and AdamW moments when with_grads) for
 * batches up to B x T. */
int model_prepare(Model *m, int B, int T, int with_grads);
void model_free(Model *m);
/* Prints the bytes of every buffer group (parameters, gradients, optimizer, activations). */
void model_print_memory(const Model *m);
/* Forward pass on inputs [B, T]; with targets [B, T] returns the mean
 * cross-entropy (else 0). Without targets all logits are left in m->a.logits
 * [B, T, V], which needs a model prepared without gradients (or B*T <=
 * head_rows); with targets they are computed head_rows rows at a time and
 * m->a.logits holds the last such chunk. NaN on error. */
float model_forward(Model *m, const int *inputs, const int *targets, int B, int T);
void model_zero_grad(Model *m);
/* Forward and backward pass: returns the mean loss and adds
 * d(loss_scale * mean loss) / d(parameters) to m->g. NaN on error. */
float model_forward_backward(Model *m, const int *inputs, const int *targets, int B, int T,
                             float loss_scale);
const ParamInfo *model_param(const Model *m, const char *name);

/* Subnormal numbers flushed to zero on this thread and the OpenMP threads
 * (x86 MXCSR FTZ and DAZ, AArch64 FPCR.FZ; elsewhere nothing): many CPUs
 * compute with subnormals slowly, and training makes them. mlkv_main calls it;
 * a program computing with this library calls it once first. */
void flush_subnormals(void);
/* The instruction set the fast kernels run in. A plain x86-64 build with gcc
 * or clang holds each kernel for AVX-512, AVX2+FMA and the baseline, and
 * picks the best this CPU has before main, or the one the environment
 * variable MLKV_KERNELS names; kernels_select("avx512" | "avx2" | "portable"
 * | "auto") switches (-1 with the reason where this CPU or build cannot).
 * Other builds run the one set they were compiled for. kernels_name: the set
 * in use, and how it was chosen, for messages. */
int kernels_select(const char *name);
const char *kernels_name(void);
/* The matrix product behind every Linear layer: C[M, N] (row-major) =
 * start + A[M, K] B[K, N], where A(i, k) = a[i * a_row + k * a_col],
 * B(k, j) = b[k * b_row + j * b_col], and start is C itself when accumulate,
 * else bias[N] in every row (zero when bias is NULL). Each element sums its
 * products in k order: results do not depend on the thread count or on M. */
void gemm(int M, int N, int K, const float *a, size_t a_row, size_t a_col, const float *b,
          size_t b_row, size_t b_col, float *c, int accumulate, const float *bias);
/* fp32 products (the default), or bf16 inputs with fp32 sums. With bf16 and
 * allow_fast, the AMX tile kernel runs where the CPU has AMX, else the
 * AVX512-BF16 one where it has that and the AVX-512 kernels run (chosen
 * here: call it after kernels_select), else a
 * portable one. Returns the bf16 kernel in use (BF16_PORTABLE for fp32);
 * bf16_kernel_name names one. */
typedef enum { PRECISION_FP32, PRECISION_BF16 } Precision;
typedef enum { BF16_PORTABLE, BF16_AMX, BF16_AVX512 } Bf16Kernel;
int gemm_set_precision(Precision precision, int allow_fast);
const char *bf16_kernel_name(int kernel);
/* The same product by its definition, summed in double: the tests' reference. */
void gemm_naive(int M, int N, int K, const float *a, size_t a_row, size_t a_col, const float *b,
                size_t b_row, size_t b_col, float *c, int accumulate, const float *bias);

/* Causal MLKV attention of one layer (query head h reads K/V head h / (H/kvH)):
 * q [B, T, H*hs], k, v [B, T, kvH*hs] -> out [B, T, H*hs], lse [B, H, T] (the
 * log-sum-exp of each softmax row). The backward pass overwrites dq and adds
 * into dk, dv; delta [B, H, T] is scratch. panels: scratch of
 * attention_panel_floats(shape, backward) floats (backward: 1 if
 * the same scratch serves attention_backward). */
typedef struct {
    int B, T;   /* sequences, tokens each */
    int H, kvH; /* query heads, K/V heads (each serves H / kvH query heads) */
    int hs;     /* numbers per head */
} AttentionShape;
size_t attention_panel_floats(AttentionShape s, int backward);
void attention_forward(float *out, float *lse, float *panels, const float *q, const float *k,
                       const float *v, AttentionShape s);
void attention_backward(float *dq, float *dk, float *dv, float *delta, float *panels,
                        const float *dout, const float *q, const float *k, const float *v,
                        const float *out, const float *lse, AttentionShape s);
/* The same by the textbook, keeping the probabilities att [B, H, T, T]
 * (summed in double): the tests' reference. */
void attention_forward_naive(float *out, float *lse, float *att, const float *q, const float *k,
                             const float *v, AttentionShape s);
void attention_backward_naive(float *dq, float *dk, float *dv, const float *dout, const float *att,
                              const float *q, const float *k, const float *v, AttentionShape s);

/* ---------------------------------------------------------------------------
 * Generation: a KV cache that holds the owning layers' K/V only,
 * 2 * kvL * kvH * head_size floats per token */
typedef struct {
    int B, max_T, length;      /* sequences, capacity in tokens, tokens cached so far */
    /* tokens per sequence one call may add; logits of every one or the last */
    int chunk, all_logits;
    float *k, *v;              /* [kvL, B, kvH, max_T, hs]: each (owner, sequence, head) reads its
                                  positions contiguously, and the layers sharing an owner read the
                                  same memory back to back */
    size_t cache_bytes, scratch_bytes;
    float *x, *ln, *stats, *q, *k_new, *v_new, *att, *branch, *mid, *fc_pre, *fc_act;
    float *kv_hidden_pre, *kv_hidden, *head_in, *logits; /* scratch for B x chunk rows */
    float *rope_cos, *rope_sin; /* [max_T, rotary_ndims/2] */
    float *memory;
} KVCache;
/* Keys are cached after rotary (or before it, for the reference-compatible
 * mode, where the owner rotates them as it reads). */
int kv_cache_init(KVCache *c, const Model *m, int B, int max_T, int chunk, int all_logits);
void kv_cache_free(KVCache *c);
/* Runs n <= chunk new tokens per sequence, tokens [B, n], at positions
 * length .. length+n-1: appends their K/V and returns the logits, [B, n, V]
 * with all_logits, else [B, V] of the last position (NULL on error). */
const float *model_cached_forward(Model *m, KVCache *c, const int *tokens, int n);
/* Sampling: greedy at temperature 0, else a draw (rng: a splitmix64 state)
 * from softmax(logits / temperature) kept to the top_k most likely tokens
 * (0: all) and to the fewest most likely whose probability reaches top_p (1:
 * all). scratch holds V candidates. Returns the token. */
typedef struct {
    double temperature, top_p;
    int top_k;
} SamplingConfig;
typedef struct {
    float p;
    int id;
} Candidate;
int sample_token(const float *logits, int V, const SamplingConfig *s, uint64_t *rng,
                 Candidate *scratch);

/* ---------------------------------------------------------------------------
 * Optimization: AdamW, clipping, learning-rate schedule */
typedef enum { SCHEDULE_COSINE, SCHEDULE_LINEAR, SCHEDULE_CONSTANT } ScheduleKind;
typedef struct {
    double lr, beta1, beta2, eps, weight_decay, clip;
    int warmup_steps, total_steps;
    ScheduleKind schedule;
} OptimConfig;

double lr_at_step(const OptimConfig *o, int step);   /* step counts from 0 */
/* Global L2 norm of the gradients; scales them by clip / (norm + 1e-6) when larger. */
double clip_gradients(Model *m, double clip);
/* One AdamW update (torch.optim.AdamW arithmetic); t counts from 1. */
void adamw_update(Model *m, const OptimConfig *o, double lr, int t);
/* One optimizer step: grad_accum micro-batches taken from tokens
 * [grad_accum, B, T+1], forward, backward, clip, AdamW. Returns the mean loss. */
float train_step(Model *m, const OptimConfig *o, const int *tokens, int grad_accum,
                 int step, double *grad_norm);

/* ---------------------------------------------------------------------------
 * The converter: an MHA Pythia to GQA / MQA / MLKV, as the reference code's
 * converter does it (github.com/zaydzuhri/pythia-mlkv) */
typedef enum { POOL_PAIRWISE, POOL_UNIFORM } PoolKind;   /* across layers */
typedef enum { GROW_COPY, GROW_ZERO, GROW_NONE } GrowKind; /* MLP growth */
typedef struct {
    int kv_heads, kv_layers;          /* kv_layers 0: taken from the map */
    int has_map, map[MLKV_MAX_LAYERS];/* explicit owning layer of each layer */
    int kv_mlp;                       /* the reference's KV-MLP variant */
    PoolKind pool;
    GrowKind grow;
    uint64_t seed;                    /* KV-MLP random initialisation */
    int reference_rotary;             /* 1: mlkv_shared_key_rotary false (see Config) */
} ConvertOptions;
/* The reference's parameter bookkeeping: the new intermediate_size and, for
 * KV-MLP, kv_intermediate_size, that keep the parameter count. */
void convert_sizes(const Config *mha, int kv_heads, int kv_layers, int kv_mlp, int *intermediate,
                   int *kv_intermediate);
int model_convert(const Model *mha, Model *out, const ConvertOptions *o);

/* ===========================================================================
 * The machinery around the model: evaluation, file formats, the command line
 * ======================================================================== */

/* ---------------------------------------------------------------------------
 * Evaluation: a task file (python3 tokenize.py tasks, or text), scored zero-shot as
 * lm-evaluation-harness scores it. A task's metrics: multiple choice acc,
 * acc_norm (when the task reports it); loglikelihood (lambada) perplexity,
 * acc. stderr_ is the harness's standard error (NaN for one document). */
typedef struct { const char *name; double value, stderr_; } Metric;
typedef struct { char task[64]; int n_docs, n_metrics; Metric metric[2]; } TaskResult;
/* Scores the first limit documents (0: all); tokenizer (a tokenizer.json or a
 * model folder holding one; NULL: none) tokenizes documents given as text
 * alone. lls and greedy, when not NULL, get each continuation's loglikelihood
 * and greedy flag in file order (room of them at most). */
int evaluate_task_file(Model *m, const char *path, const char *tokenizer, int limit,
                       TaskResult *out, double *lls, int *greedy, size_t room);

/* ---------------------------------------------------------------------------
 * JSON (config.json, safetensors headers, tokenizer.json) */
typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } JsonType;
typedef struct Json {
    JsonType type;
    double number;        /* JSON_NUMBER, and JSON_BOOL as 0 / 1 */
    char *string;         /* JSON_STRING: UTF-8, NUL-terminated */
    size_t length;        /* JSON_STRING: bytes; JSON_ARRAY / JSON_OBJECT: items */
    struct Json *items;   /* JSON_ARRAY / JSON_OBJECT values */
    char **keys;          /* JSON_OBJECT keys, parallel to items */
} Json;
/* `what` names the source (a file) in error messages. */
int json_parse(const char *text, size_t len, const char *what, Json *out);
const Json *json_get(const Json *object, const char *key);
void json_free(Json *j);

/* ---------------------------------------------------------------------------
 * safetensors: 8-byte little-endian header length N, N bytes of JSON, data */
typedef struct {
    char path[1024];
    FILE *f;
    Json header;            /* name -> {dtype, shape, data_offsets}, and __metadata__ */
    size_t data_start, file_size;
} SafeTensors;
/* Opens and validates every header entry against the file size. */
int st_open(SafeTensors *st, const char *path);
/* Opens a pytorch_model.bin (torch.save's zip of a pickled state dict) as
 * the same index, offsets counted from the file's start; nothing in the
 * pickle is executed: opcodes and functions outside a state dict's are refused. */
int torch_open(SafeTensors *st, const char *path);
void st_close(SafeTensors *st);
const Json *st_entry(const SafeTensors *st, const char *name);
/* Reads a tensor whose shape must be exactly shape[0..ndim), converting
 * F32 / F16 / BF16 to float, or I32 / I64 to int (whichever dst is non-NULL). */
int st_read(const SafeTensors *st, const char *name, int ndim, const int *shape, float *fdst,
            int *idst);
const char *st_metadata(const SafeTensors *st, const char *key);

typedef struct { char name[MLKV_NAME_MAX + 8]; int ndim, shape[2]; const float *data; } TensorOut;
/* Writes F32 tensors; metadata_json: a JSON object of strings, or NULL. */
int safetensors_write(const char *path, const TensorOut *tensors, int n, const char *metadata_json);
/* The parameter table laid over base (parameters, gradients, moments), names prefixed. */
typedef struct { const char *prefix; const float *base; } TensorGroup;
int model_write_safetensors(const Model *m, const TensorGroup *groups, int n_groups,
                            const char *path, const char *metadata_json);

/* ---------------------------------------------------------------------------
 * Token files: llm.c's format, 256 int32 header (20240520, 1, count), uint16 tokens */
typedef struct {
    uint16_t *tokens;
    size_t n_tokens;
} TokenFile;
int tokens_load(TokenFile *f, const char *path, int vocab_size);
int tokens_save(const char *path, const uint16_t *tokens, size_t n);
void tokens_free(TokenFile *f);

/* Shuffled sequences of T+1 tokens; order reshuffled each epoch from the seed. */
typedef struct {
    const TokenFile *file;
    int B, T;
    size_t n_seqs, next;
    int epoch, shuffle;
    uint64_t seed;
    size_t *order;
} DataLoader;
int loader_init(DataLoader *dl, const TokenFile *f, int B, int T, uint64_t seed, int shuffle);
void loader_seek(DataLoader *dl, int epoch, size_t next);
void loader_next(DataLoader *dl, int *rows);   /* fills [B, T+1] */
void loader_free(DataLoader *dl);

/* ---------------------------------------------------------------------------
 * Tokenizer: HF tokenizer.json of the byte-level BPE family (Pythia's) */
typedef struct { uint64_t key; int rank, merged; } MergeSlot; /* key: left id << 32 | right id */
typedef struct {
    int n_ids;                 /* ids 0 .. n_ids-1 (vocabulary and added tokens) */
    char **bytes;              /* [n_ids] what each token decodes to (NULL: no such id) */
    int *length;               /* [n_ids] */
    int byte_id[256];          /* the token of each single byte */
    MergeSlot *merges;         /* open-addressing table of [merge_capacity] */
    size_t merge_capacity;
    int n_added;
    char **added;              /* added tokens' text (<|endoftext|>, runs of spaces) */
    int *added_id, *added_normalized;
    int eot_id;                /* <|endoftext|>, or -1 */
} Tokenizer;
/* path: a tokenizer.json, or a model folder holding one. */
int tokenizer_load(Tokenizer *t, const char *path);
void tokenizer_free(Tokenizer *t);
/* The bytes of a token (not NUL-terminated), or NULL for an unknown id. */
const char *tokenizer_token(const Tokenizer *t, int id, int *length);
/* Encodes text exactly as HF tokenizers when it is ASCII (NFC and Unicode
 * classes need tables this file does not carry); other text is an error that
 * points to tokenize.py. Returns the number of ids (at most max_ids), or -1. */
int tokenizer_encode(const Tokenizer *t, const char *text, int *ids, int max_ids);
/* Writes decoded bytes as they come, holding back a UTF-8 character until all
 * its bytes have arrived (tokens often end inside one). */
typedef struct { unsigned char pending[4]; int n; } Utf8Stream;
void utf8_stream_write(Utf8Stream *s, const char *bytes, int n, FILE *out);
void utf8_stream_flush(Utf8Stream *s, FILE *out);

/* ---------------------------------------------------------------------------
 * Command line: mlkv <command> ...; returns the process exit code. */
int mlkv_main(int argc, char **argv);

#endif
