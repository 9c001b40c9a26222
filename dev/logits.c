/*
 * dev/logits.c - writes a model's logits for given token ids, so dev scripts
 * can compare the C forward pass with PyTorch. Build from the repository root:
 *     cc -O2 -fopenmp -DMLKV_NO_MAIN -I. -o logits dev/logits.c mlkv.c -lm
 * usage: logits MODEL_DIR IDS.bin B T OUT.bin
 *   IDS.bin: B*T little-endian int32 token ids; OUT.bin: B*T*V float32 logits
 */
#include <stdio.h>
#include <stdlib.h>

#include "mlkv.h"

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s MODEL_DIR IDS.bin B T OUT.bin\n", argv[0]);
        return 2;
    }
    int B = atoi(argv[3]), T = atoi(argv[4]);
    Model m;
    if (model_load(&m, argv[1]) != 0 || model_prepare(&m, B, T, 0) != 0) {
        fprintf(stderr, "logits: %s\n", mlkv_error());
        return 1;
    }
    int *ids = malloc(sizeof(int) * B * T);
    FILE *f = fopen(argv[2], "rb");
    if (!f || fread(ids, sizeof(int), (size_t)B * T, f) != (size_t)B * T) {
        fprintf(stderr, "logits: cannot read %d ids from %s\n", B * T, argv[2]);
        return 1;
    }
    fclose(f);
    model_forward(&m, ids, NULL, B, T);
    f = fopen(argv[5], "wb");
    size_t n = (size_t)B * T * m.config.vocab_size;
    if (!f || fwrite(m.a.logits, sizeof(float), n, f) != n || fclose(f) != 0) {
        fprintf(stderr, "logits: cannot write %s\n", argv[5]);
        return 1;
    }
    free(ids);
    model_free(&m);
    return 0;
}
