/* Attention for one new token per row, on a CPU: the decode step's attention.
 *
 * torch's SDPA kernel for this shape (a few query rows per key/value head, a few hundred
 * positions) is bound by its per-block overhead, not by reading the cache: at 16 rows and
 * 200 positions, 30 layers of SmolLM2's bf16 cache (72 MB) took 12-15 ms on a 2-core CPU,
 * about 5 GB/s. This reads each key and value row once, converts it to fp32 and uses it for
 * every query head that shares it (grouped-query attention): 7-8 ms for the same.
 * storygen/kernels.py builds it on first use and checks it against SDPA.
 *
 * Layout (strides in elements, given per dimension but the last, which is contiguous everywhere):
 *   q    (B, KV, G, D)  G query heads per key/value head
 *   k, v (B, KV, T, D)  the cache, possibly a view into larger buffers
 *   mask (B, T)         1: attend, 0: padding; NULL: attend to all
 *   out  (B, KV, G, D)
 * dtype 0: float32, 1: bfloat16 (q, k, v and out alike).
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include <stdlib.h>

#define MAX_G 32
#define MASKED (-1e30f) /* a masked score: finite, so the kernel may be built with -ffast-math */
#define MAX_D 256

static inline void load_row(int dtype, const void *base, int64_t offset, int64_t D, float *restrict dst) {
    if (dtype == 1) {
        const uint16_t *src = (const uint16_t *)base + offset;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = bf16_to_f32(src[d]);
    } else {
        const float *src = (const float *)base + offset;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = src[d];
    }
}

int storygen_decode_attention(int dtype, const void *q, const void *k, const void *v, const uint8_t *mask, void *out,
                              int64_t B, int64_t KV, int64_t G, int64_t T, int64_t D,
                              int64_t qs0, int64_t qs1, int64_t qs2, int64_t ks0, int64_t ks1, int64_t ks2,
                              int64_t vs0, int64_t vs1, int64_t vs2, int64_t ms0, int64_t ms1,
                              int64_t os0, int64_t os1, int64_t os2, int nthreads, float scale) {
    if (G > MAX_G || D > MAX_D || G < 1 || D < 1 || T < 1) return 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(G * T)); /* (G, T) */
        float qf[MAX_G * MAX_D], acc[MAX_G * MAX_D], row[MAX_D];
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * KV; ++bh) {
            if (scores == NULL) continue;
            const int64_t b = bh / KV, h = bh % KV;
            const uint8_t *m = mask ? mask + b * ms0 : NULL;
            for (int64_t g = 0; g < G; ++g)
                load_row(dtype, q, b * qs0 + h * qs1 + g * qs2, D, qf + g * D);
            /* 1. Scores: each key row is read and converted once, for every query head of its group. */
            float top[MAX_G];
            for (int64_t g = 0; g < G; ++g) top[g] = MASKED;
            for (int64_t t = 0; t < T; ++t) {
                if (m && !m[t * ms1]) {
                    for (int64_t g = 0; g < G; ++g) scores[g * T + t] = MASKED;
                    continue;
                }
                load_row(dtype, k, b * ks0 + h * ks1 + t * ks2, D, row);
                for (int64_t g = 0; g < G; ++g) {
                    const float *qg = qf + g * D;
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int64_t d = 0; d < D; ++d) s += qg[d] * row[d];
                    s *= scale;
                    scores[g * T + t] = s;
                    if (s > top[g]) top[g] = s;
                }
            }
            /* 2. Softmax per query head; a fully masked row gives zeros, not NaN. */
            float total[MAX_G];
            for (int64_t g = 0; g < G; ++g) {
                float sum = 0.0f;
                float *sg = scores + g * T;
                for (int64_t t = 0; t < T; ++t) {
                    sg[t] = expf(sg[t] - top[g]); /* masked: exp(-1e30 - top) = 0 */
                    sum += sg[t];
                }
                total[g] = sum > 0.0f ? 1.0f / sum : 0.0f;
            }
            /* 3. Weighted sum of value rows, each read once. */
            for (int64_t i = 0; i < G * D; ++i) acc[i] = 0.0f;
            for (int64_t t = 0; t < T; ++t) {
                if (m && !m[t * ms1]) continue;
                load_row(dtype, v, b * vs0 + h * vs1 + t * vs2, D, row);
                for (int64_t g = 0; g < G; ++g) {
                    const float p = scores[g * T + t];
                    float *ag = acc + g * D;
#pragma omp simd
                    for (int64_t d = 0; d < D; ++d) ag[d] += p * row[d];
                }
            }
            for (int64_t g = 0; g < G; ++g) {
                const int64_t o = b * os0 + h * os1 + g * os2;
                const float *ag = acc + g * D;
                if (dtype == 1) {
                    uint16_t *dst = (uint16_t *)out + o;
                    for (int64_t d = 0; d < D; ++d) dst[d] = f32_to_bf16(ag[d] * total[g]);
                } else {
                    float *dst = (float *)out + o;
                    for (int64_t d = 0; d < D; ++d) dst[d] = ag[d] * total[g];
                }
            }
        }
        free(scores);
    }
    return failed ? 2 : 0;
}
