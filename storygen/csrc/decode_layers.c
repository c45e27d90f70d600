/* A decode step's decoder layers in one call: the same kernels as the Python loop calls one by one.
 *
 * LeanDecoder's decode step (storygen/decoder.py) makes nine calls into this library per layer:
 * four matmuls, two norms, the rotary embedding, the MLP activation and the attention, with a KV
 * append in torch between them. Each is a few microseconds of C, but its Python side (a module
 * call, the arguments' pointers and strides, ctypes) costs 10-20 us: for a lone story on a 2-core
 * CPU that was ~6 of a ~19 ms step, a third. Here the loop over layers is in C and calls the same
 * functions in the same order on the same buffers, so the result is bit for bit the Python loop's.
 *
 * Per step, for B rows of one new token each (B <= 16, the matmul kernels' limit):
 *   x   (B, hidden) bf16  the residual stream after the embedding, updated in place
 *   h   (B, hidden) bf16  in: layer 0's input norm of x; out: the final norm (for the output layer)
 *   cos, sin (B, D) bf16  each row's rotary angles
 *   mask (B, T + 1) uint8 with row stride mask_stride, 1 where a row attends; NULL: everywhere
 *   kv  per layer 8 int64: the key and value buffers' addresses at row 0, head 0 and the view's
 *       first column, then their strides (row, head, position) in elements; the new position is
 *       written at column T of that view, and attention reads columns 0..T.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int storygen_int4_matmul(const uint16_t *x, const uint8_t *packed, const uint16_t *scale, const uint16_t *low, uint16_t *y,
                         int64_t M, int64_t N, int64_t K, int nthreads);
int storygen_int8_matmul(const uint16_t *x, const int8_t *packed, const float *scale, uint16_t *y,
                         int64_t M, int64_t N, int64_t K, int nthreads);
int storygen_decode_attention(int dtype, const void *q, const void *k, const void *v, const uint8_t *mask, void *out,
                              int64_t B, int64_t KV, int64_t G, int64_t T, int64_t D,
                              int64_t qs0, int64_t qs1, int64_t qs2, int64_t ks0, int64_t ks1, int64_t ks2,
                              int64_t vs0, int64_t vs1, int64_t vs2, int64_t ms0, int64_t ms1,
                              int64_t os0, int64_t os1, int64_t os2, int nthreads, float scale);
int storygen_add_rms_norm(uint16_t *x, const uint16_t *delta, const uint16_t *weight, uint16_t *out,
                          int64_t rows, int64_t cols, int64_t x_stride, int64_t delta_stride, int64_t out_stride,
                          float eps, int threads);
int storygen_silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inter, int64_t in_stride,
                      int64_t out_stride, int threads);
int storygen_rotary(uint16_t *x, const uint16_t *cos_, const uint16_t *sin_, int64_t rows, int64_t heads,
                    int64_t dim, int64_t row_stride, int threads);

/* A linear layer's quantized copy in our kernels' layout (kernels.Int4Matmul.pack, Int8Matmul.pack). */
typedef struct {
    int64_t kind; /* 4: int4 (weight, fp16 scale and low), 8: int8 (weight, fp32 scale) */
    int64_t out, in;
    const void *weight, *scale, *low;
} Linear;

/* One decoder layer: its two norms and four linear layers (q/k/v fused, gate/up fused). */
typedef struct {
    const uint16_t *norm_post, *norm_next; /* norm_next: the next layer's input norm, or the final norm */
    float eps_post, eps_next;
    Linear qkv, o, gate_up, down;
} Layer;

static int linear(const Linear *l, const uint16_t *x, uint16_t *y, int64_t rows, int threads) {
    if (l->kind == 4)
        return storygen_int4_matmul(x, (const uint8_t *)l->weight, (const uint16_t *)l->scale, (const uint16_t *)l->low,
                                    y, rows, l->out, l->in, threads);
    if (l->kind == 8)
        return storygen_int8_matmul(x, (const int8_t *)l->weight, (const float *)l->scale, y, rows, l->out, l->in,
                                    threads);
    return 1;
}

int storygen_decode_layers(const Layer *layers, int64_t L, uint16_t *x, uint16_t *h, const uint16_t *cos_,
                           const uint16_t *sin_, const uint8_t *mask, int64_t mask_stride, const int64_t *kv,
                           int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D, int64_t hidden, int64_t inter,
                           float scale, int threads) {
    if (B < 1 || B > 16 || H % KV || L < 1) return 1;
    const int64_t width = (H + 2 * KV) * D; /* a row of q, k and v side by side */
    uint16_t *qkv = malloc(sizeof(uint16_t) * (size_t)(B * width));
    uint16_t *attended = malloc(sizeof(uint16_t) * (size_t)(B * H * D));
    uint16_t *delta = malloc(sizeof(uint16_t) * (size_t)(B * hidden));
    uint16_t *gate_up = malloc(sizeof(uint16_t) * (size_t)(B * 2 * inter));
    uint16_t *act = malloc(sizeof(uint16_t) * (size_t)(B * inter));
    int failed = qkv == NULL || attended == NULL || delta == NULL || gate_up == NULL || act == NULL ? 2 : 0;
    for (int64_t i = 0; i < L && !failed; ++i) {
        const Layer *layer = layers + i;
        const int64_t *c = kv + 8 * i;
        uint16_t *k = (uint16_t *)(intptr_t)c[0], *v = (uint16_t *)(intptr_t)c[1];
        /* Attention: q, k and v at once, q and k rotated, k and v appended at column T, attend over 0..T. */
        failed = linear(&layer->qkv, h, qkv, B, threads);
        if (!failed) failed = storygen_rotary(qkv, cos_, sin_, B, H + KV, D, width, threads);
        if (failed) break;
        for (int64_t b = 0; b < B; ++b)
            for (int64_t j = 0; j < KV; ++j) {
                memcpy(k + b * c[2] + j * c[3] + T * c[4], qkv + b * width + (H + j) * D, sizeof(uint16_t) * (size_t)D);
                memcpy(v + b * c[5] + j * c[6] + T * c[7], qkv + b * width + (H + KV + j) * D,
                       sizeof(uint16_t) * (size_t)D);
            }
        const int64_t G = H / KV;
        failed = storygen_decode_attention(1, qkv, k, v, mask, attended, B, KV, G, T + 1, D, width, G * D, D,
                                           c[2], c[3], c[4], c[5], c[6], c[7], mask_stride, 1, H * D, G * D, D,
                                           threads, scale);
        if (!failed) failed = linear(&layer->o, attended, delta, B, threads);
        if (!failed)
            failed = storygen_add_rms_norm(x, delta, layer->norm_post, h, B, hidden, hidden, hidden, hidden,
                                           layer->eps_post, threads);
        /* The MLP, down(silu(gate(h)) * up(h)), then the next layer's (or the final) norm. */
        if (!failed) failed = linear(&layer->gate_up, h, gate_up, B, threads);
        if (!failed) failed = storygen_silu_mul(gate_up, act, B, inter, 2 * inter, inter, threads);
        if (!failed) failed = linear(&layer->down, act, delta, B, threads);
        if (!failed)
            failed = storygen_add_rms_norm(x, delta, layer->norm_next, h, B, hidden, hidden, hidden, hidden,
                                           layer->eps_next, threads);
    }
    free(qkv);
    free(attended);
    free(delta);
    free(gate_up);
    free(act);
    return failed;
}
