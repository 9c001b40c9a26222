/* libFuzzer targets for every file format mlkv.c reads (make fuzz, make
 * fuzz-smoke). Built once per target with -DFUZZ_TARGET=<name>; each writes the
 * input to a file, as a user's file would arrive, and loads it. Anything the
 * sanitizers (AddressSanitizer, UndefinedBehaviorSanitizer) or the fuzzer
 * (a crash, a leak, a hang) object to is a bug; a clean error is a pass.
 * mlkv.c is included, not linked, so that the optimizer-state reader (a
 * static function of the training loop) can be called as --resume calls it. */
#define MLKV_NO_MAIN
#include "mlkv.c"
static char path[64];

static void write_input(const uint8_t *data, size_t size) {
    if (!path[0]) snprintf(path, sizeof(path), "/tmp/mlkv-fuzz-%d", (int)getpid());
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    fwrite(data, 1, size, f);
    fclose(f);
}

#if FUZZ_TARGET >= 7
/* A tiny random model, the same in every run: a vocabulary of 300 for the
 * task files' token ids; 16 (and a smaller optimizer state) for target 8 */
#define TINY_VOCAB (FUZZ_TARGET == 7 ? 300 : 16)
static Model *tiny_model(void) {
    static Model m;
    static int ready;
    if (!ready) {
        Config c = {.vocab_size = TINY_VOCAB, .hidden_size = 16, .n_layer = 2, .n_head = 2, .intermediate_size = 16,
                    .max_position_embeddings = 32, .n_kv_head = 1, .n_kv_layer = 1, .rotary_pct = 0.5,
                    .rotary_base = 10000, .layer_norm_eps = 1e-5, .initializer_range = 0.5, .parallel_residual = 1,
                    .shared_key_rotary = 1};
        if (model_init_random(&m, &c, 1) != 0 || model_prepare(&m, 1, 8, 1) != 0) abort();
        ready = 1;
    }
    return &m;
}

#endif

#if FUZZ_TARGET == 8
/* The settings of the run that optimizer.safetensors must match */
static const TrainArgs tiny_run = {.batch = 1, .seq = 8, .grad_accum = 1, .steps = 20, .opt = {.total_steps = 20},
                                   .seed = 1337};
#define TINY_RUN_TOKENS 1000
static char state_dir[80], state_file[128]; /* the input goes here, where --resume looks */
#endif

#if FUZZ_TARGET == 3 || FUZZ_TARGET == 4
/* every tensor of a header read as floats, when small */
static void read_all(const SafeTensors *st) {
    for (size_t i = 0; i < st->header.length; i++) {
        const Json *shape = json_get(&st->header.items[i], "shape");
        if (!shape || shape->length > 4) continue;
        int dims[4], n = (int)shape->length;
        size_t numel = 1;
        for (int d = 0; d < n; d++) numel *= (size_t)(dims[d] = (int)shape->items[d].number);
        if (numel > (1u << 20)) continue;
        float *x = malloc((numel + 1) * sizeof(float));
        st_read(st, st->header.keys[i], n, dims, x, NULL);
        free(x);
    }
}

#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    write_input(data, size);
#if FUZZ_TARGET == 1 /* json */
    Json j;
    if (json_parse((const char *)data, size, "fuzz", &j) == 0) json_free(&j);
#elif FUZZ_TARGET == 2 /* config */
    Config c;
    char *extra = NULL;
    if (config_load(&c, path, &extra) == 0) free(extra);
#elif FUZZ_TARGET == 3 /* safetensors */
    SafeTensors st;
    if (st_open(&st, path) == 0) { read_all(&st); st_close(&st); }
#elif FUZZ_TARGET == 4 /* pytorch_model.bin */
    SafeTensors st;
    if (torch_open(&st, path) == 0) { read_all(&st); st_close(&st); }
#elif FUZZ_TARGET == 5 /* tokenizer.json */
    Tokenizer t;
    if (tokenizer_load(&t, path) == 0) {
        int ids[256];
        tokenizer_encode(&t, "Hello  world, it's 2024!\n<|endoftext|> x", ids, 256);
        tokenizer_free(&t);
    }
#elif FUZZ_TARGET == 6 /* token files */
    TokenFile tf;
    if (tokens_load(&tf, path, 300) == 0) tokens_free(&tf);
#elif FUZZ_TARGET == 7 /* task files, scored by a tiny random model */
    TaskResult r;
    evaluate_task_file(tiny_model(), path, "dev/fixtures/tokenizer/bytes-tokenizer.json", 50, &r, NULL,
                       NULL, 0);
#elif FUZZ_TARGET == 8 /* optimizer.safetensors, as train --resume reads it */
    if (!state_dir[0]) {
        snprintf(state_dir, sizeof(state_dir), "%s.d", path);
        snprintf(state_file, sizeof(state_file), "%s/optimizer.safetensors", state_dir);
        if (mkdir(state_dir, 0755) != 0 && errno != EEXIST) abort();
    }
    if (rename(path, state_file) != 0) abort();
    int step, epoch;
    size_t next;
    optimizer_load(tiny_model(), state_dir, &tiny_run, TINY_RUN_TOKENS, &step, &epoch, &next);
#else
#error "FUZZ_TARGET: 1 json, 2 config, 3 safetensors, 4 torch, 5 tokenizer, 6 tokens, 7 tasks, 8 optimizer"
#endif
    return 0;
}

#ifdef FUZZ_STANDALONE
/* make fuzz-smoke: the same target without libFuzzer, over the files named
 * on the command line (the seed corpus), so any compiler with the sanitizers
 * replays it */
int main(int argc, char **argv) {
#if FUZZ_TARGET == 8
    /* --write-seed FILE: a valid optimizer state of the tiny run, the seed corpus */
    if (argc == 3 && strcmp(argv[1], "--write-seed") == 0) {
        Model *m = tiny_model();
        for (size_t i = 0; i < m->num_parameters; i++) m->adam_m[i] = 1e-3f * (float)(i % 7), m->adam_v[i] = 1e-6f;
        TensorGroup moments[2] = {{"m.", m->adam_m}, {"v.", m->adam_v}};
        DataLoader at = {.epoch = 1, .next = 96};
        StrBuf meta = {0};
        optimizer_metadata(&meta, &tiny_run, 12, &at, TINY_RUN_TOKENS);
        int rc = model_write_safetensors(m, moments, 2, argv[2], meta.s);
        free(meta.s);
        return rc != 0;
    }
#endif
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) { perror(argv[i]); return 1; }
        fseek(f, 0, SEEK_END);
        long n = ftell(f);
        fseek(f, 0, SEEK_SET);
        uint8_t *data = malloc((size_t)n + 1);
        if (!data || fread(data, 1, (size_t)n, f) != (size_t)n) { fclose(f); return 1; }
        fclose(f);
        LLVMFuzzerTestOneInput(data, (size_t)n);
        free(data);
    }
    unlink(path);
#if FUZZ_TARGET == 8
    if (state_dir[0]) unlink(state_file), rmdir(state_dir);
#endif
    return 0;
}
#endif
