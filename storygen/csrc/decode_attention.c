/* Attention for one new token per row, on a CPU: the decode step's attention.
 *
 * torch's SDPA kernel for this shape (a few query rows per key/value head, a few hundred
 * positions) is bound by its per-block overhead, not by reading the cache: at 16 rows and
 * 200 positions, 30 layers of SmolLM2's bf16 cache (72 MB) took 12-15 ms on a 2-core CPU,
 * about 5 GB/s. This reads each key and value row once, converts it to fp32 and uses it for
 * every query head that shares it (grouped-query attention): 7-8 ms for the same. Where the CPU
 * has AVX-512 BF16, bf16 scores take 16 keys at a time with vdpbf16ps and one shuffle tree for
 * their 16 sums, and the values' weighted sums stay in registers: 4.8 ms (benchmarks/kernels_bench.py).
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

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FAST_BF16 1

/* The lane sums of 16 vectors, in order: lane j of the result is the sum of v[j]'s 16 lanes.
 * 15 shuffles and 15 adds for 16 sums, where one horizontal sum each took ~8 instructions. */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 w[8], z[4], s[2];
    for (int i = 0; i < 8; ++i) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) /* per 128-bit lane: the lane's sums of v[4i..4i+3] */
        z[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; ++i) /* 128-bit lanes 0+1 and 2+3 of z[2i], then of z[2i+1] */
        s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s[0], s[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s[0], s[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Which of the 16 positions from t0 a row attends to (none past T). */
static inline __mmask16 live16(const uint8_t *m, int64_t ms1, int64_t t0, int64_t T) {
    const int64_t n = T - t0 < 16 ? T - t0 : 16;
    __mmask16 live = (__mmask16)((1u << n) - 1u);
    if (m == NULL) return live;
    if (ms1 == 1 && n == 16) return _mm_test_epi8_mask(_mm_loadu_si128((const __m128i *)(m + t0)), _mm_set1_epi8(-1));
    __mmask16 bits = 0;
    for (int64_t j = 0; j < n; ++j) bits |= (__mmask16)((m[(t0 + j) * ms1] != 0) << j);
    return bits;
}

/* Step 1 in bf16, D a multiple of 32: scores (G, T) of one key/value head, 16 keys at a time, and
 * each query head's top score. A key row times a query row is D / 32 vdpbf16ps (bf16 products are
 * exact in fp32), and the block's 16 dot products are summed by one sum16. */
static void scores_bf16(const uint16_t *q, int64_t qs2, const uint16_t *k, int64_t ks2, const uint8_t *m, int64_t ms1,
                        int64_t G, int64_t T, int64_t D, float scale, float *scores, float *top) {
    const int64_t C = D / 32;
    const __m512 masked = _mm512_set1_ps(MASKED), scaled = _mm512_set1_ps(scale);
    for (int64_t g = 0; g < G; ++g) top[g] = MASKED;
    for (int64_t t0 = 0; t0 < T; t0 += 16) {
        const int64_t n = T - t0 < 16 ? T - t0 : 16;
        const __mmask16 live = live16(m, ms1, t0, T), stored = (__mmask16)((1u << n) - 1u);
        if (live == 0) {
            for (int64_t g = 0; g < G; ++g) _mm512_mask_storeu_ps(scores + g * T + t0, stored, masked);
            continue;
        }
        for (int64_t g = 0; g < G; ++g) {
            const uint16_t *qg = q + g * qs2;
            __m512 acc[16];
            for (int j = 0; j < 16; ++j) {
                const uint16_t *row = k + (t0 + (j < n ? j : 0)) * ks2; /* past T: row t0 again, masked below */
                acc[j] = _mm512_setzero_ps();
                for (int64_t c = 0; c < C; ++c)
                    acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(qg + 32 * c),
                                              (__m512bh)_mm512_loadu_si512(row + 32 * c));
            }
            const __m512 sc = _mm512_mask_blend_ps(live, masked, _mm512_mul_ps(sum16(acc), scaled));
            _mm512_mask_storeu_ps(scores + g * T + t0, stored, sc);
            const float most = _mm512_mask_reduce_max_ps(stored, sc);
            if (most > top[g]) top[g] = most;
        }
    }
}

/* Step 3 in bf16 for a head dimension of NC * 16: acc (G, D) = probabilities (G, T) times the value
 * rows, in registers, up to 16 / NC query heads at a time; each value row is read and widened once
 * per such group of heads. */
static inline __attribute__((always_inline)) void weigh_values_bf16(
        const int NC, const uint16_t *v, int64_t vs2, const uint8_t *m, int64_t ms1, int64_t G, int64_t T,
        const float *p, float *acc) {
    const int GB = 16 / NC;
    for (int64_t g0 = 0; g0 < G; g0 += GB) {
        const int64_t gn = G - g0 < GB ? G - g0 : GB;
        __m512 a[16];
        for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
        for (int64_t t = 0; t < T; ++t) {
            if (m && !m[t * ms1]) continue;
            const uint16_t *row = v + t * vs2;
            __m512 vr[8];
            for (int c = 0; c < NC; ++c)
                vr[c] = _mm512_castsi512_ps(
                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + 16 * c))), 16));
            for (int g = 0; g < GB; ++g) {
                if (g >= gn) break;
                const __m512 pg = _mm512_set1_ps(p[(g0 + g) * T + t]);
                for (int c = 0; c < NC; ++c) a[g * NC + c] = _mm512_fmadd_ps(pg, vr[c], a[g * NC + c]);
            }
        }
        for (int g = 0; g < gn; ++g)
            for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + (g0 + g) * NC * 16 + 16 * c, a[g * NC + c]);
    }
}
#endif

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

/* Step 1, any dtype or D: scores (G, T) of one key/value head and each query head's top score. Each
 * key row is read and converted once, for every query head of its group. */
static void scores_any(int dtype, const void *q, int64_t qo, int64_t qs2, const void *k, int64_t ko, int64_t ks2,
                       const uint8_t *m, int64_t ms1, int64_t G, int64_t T, int64_t D, float scale, float *scores,
                       float *top) {
    float qf[MAX_G * MAX_D], row[MAX_D];
    for (int64_t g = 0; g < G; ++g) {
        load_row(dtype, q, qo + g * qs2, D, qf + g * D);
        top[g] = MASKED;
    }
    for (int64_t t = 0; t < T; ++t) {
        if (m && !m[t * ms1]) {
            for (int64_t g = 0; g < G; ++g) scores[g * T + t] = MASKED;
            continue;
        }
        load_row(dtype, k, ko + t * ks2, D, row);
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
}

/* Step 3, any dtype or D: acc (G, D) = probabilities (G, T) times the value rows, each read once. */
static void weigh_values_any(int dtype, const void *v, int64_t vo, int64_t vs2, const uint8_t *m, int64_t ms1,
                             int64_t G, int64_t T, int64_t D, const float *p, float *acc) {
    float row[MAX_D];
    for (int64_t i = 0; i < G * D; ++i) acc[i] = 0.0f;
    for (int64_t t = 0; t < T; ++t) {
        if (m && !m[t * ms1]) continue;
        load_row(dtype, v, vo + t * vs2, D, row);
        for (int64_t g = 0; g < G; ++g) {
            const float pg = p[g * T + t];
            float *ag = acc + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] += pg * row[d];
        }
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
        float acc[MAX_G * MAX_D];
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * KV; ++bh) {
            if (scores == NULL) continue;
            const int64_t b = bh / KV, h = bh % KV;
            const uint8_t *m = mask ? mask + b * ms0 : NULL;
            /* 1. Scores. */
            float top[MAX_G];
#ifdef FAST_BF16
            if (dtype == 1 && D % 32 == 0)
                scores_bf16((const uint16_t *)q + b * qs0 + h * qs1, qs2, (const uint16_t *)k + b * ks0 + h * ks1, ks2,
                            m, ms1, G, T, D, scale, scores, top);
            else
#endif
                scores_any(dtype, q, b * qs0 + h * qs1, qs2, k, b * ks0 + h * ks1, ks2, m, ms1, G, T, D, scale, scores,
                           top);
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
#ifdef FAST_BF16
            if (dtype == 1 && D == 64)
                weigh_values_bf16(4, (const uint16_t *)v + b * vs0 + h * vs1, vs2, m, ms1, G, T, scores, acc);
            else if (dtype == 1 && D == 128)
                weigh_values_bf16(8, (const uint16_t *)v + b * vs0 + h * vs1, vs2, m, ms1, G, T, scores, acc);
            else
#endif
                weigh_values_any(dtype, v, b * vs0 + h * vs1, vs2, m, ms1, G, T, D, scores, acc);
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
