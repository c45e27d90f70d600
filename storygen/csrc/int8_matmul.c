/* y = (x q^T) * scale for a weight held as int8 with one scale per output row, for 1 to 16 rows
 * on a CPU with AVX-512 BF16: the int8 copies of storygen/int8.py (DualLinear), such as the
 * default model's output layer (49152 x 576, a Q8_0 layer in its GGUF).
 *
 * torch's kernel for weight-only int8 (aten._weight_int8pack_mm) pays at a row or two; at 16 rows
 * the bf16 matmul was faster, and it read the whole bf16 output layer (56 MB) every decode step,
 * about 6 ms of a 40 ms step on a 2-core CPU. Here each pair of int8 weights becomes bf16 once per
 * call (exactly: |q| <= 127 needs 7 bits) and is multiplied into every row with the bf16
 * dot-product instruction (vdpbf16ps, exact products into fp32 sums), as csrc/int4_matmul.c does
 * for 4-bit weights; each output's scale multiplies its sums at the end.
 *
 * Layout (all contiguous):
 *   x       (M, K) bf16, M <= 16 rows, K even
 *   packed  (N / 16, K / 2, 16, 2) int8: q[16 b + j][2 p + e] at [b][p][j][e]
 *   scale   (N) fp32
 *   y       (M, N) bf16
 */
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

/* 16 columns x 2 inputs of the weight, as bf16 pairs (low half: even k), from 32 int8. */
static inline __m512i weight_pairs(const int8_t *bytes) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)bytes)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(bytes + 16))));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); /* bf16 of bytes 0..15, then of 16..31: exact */
}

/* One block of 16 output columns for up to MR rows (MR a constant, so the sums stay in registers). */
#define DEFINE_BLOCK(MR)                                                                              \
    static void block_##MR(const uint32_t *x, int64_t M, int64_t K, const int8_t *packed,             \
                           const float *scale, uint16_t *y, int64_t N, int64_t b) {                   \
        __m512 acc[MR];                                                                               \
        for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();                                    \
        const int64_t pairs = K / 2;                                                                  \
        for (int64_t p = 0; p < pairs; ++p) {                                                         \
            const __m512i w = weight_pairs(packed + (b * pairs + p) * 32);                            \
            for (int m = 0; m < MR; ++m) {                                                            \
                const uint32_t xp = m < M ? x[m * pairs + p] : 0u;                                    \
                acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)w, (__m512bh)_mm512_set1_epi32((int)xp));  \
            }                                                                                         \
        }                                                                                             \
        const __m512 s = _mm512_loadu_ps(scale + b * 16);                                             \
        for (int m = 0; m < MR && m < M; ++m)                                                         \
            _mm256_storeu_si256((__m256i *)(y + m * N + b * 16),                                      \
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[m], s)));               \
    }

DEFINE_BLOCK(4)
DEFINE_BLOCK(8)
DEFINE_BLOCK(16)

int storygen_int8_matmul(const uint16_t *x, const int8_t *packed, const float *scale, uint16_t *y,
                         int64_t M, int64_t N, int64_t K, int nthreads) {
    if (M < 1 || M > 16 || N % 16 || K % 2) return 1;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
    for (int64_t b = 0; b < N / 16; ++b) {
        if (M <= 4)
            block_4((const uint32_t *)x, M, K, packed, scale, y, N, b);
        else if (M <= 8)
            block_8((const uint32_t *)x, M, K, packed, scale, y, N, b);
        else
            block_16((const uint32_t *)x, M, K, packed, scale, y, N, b);
    }
    return 0;
}

#else

int storygen_int8_matmul(const uint16_t *x, const int8_t *packed, const float *scale, uint16_t *y,
                         int64_t M, int64_t N, int64_t K, int nthreads) {
    (void)x; (void)packed; (void)scale; (void)y; (void)M; (void)N; (void)K; (void)nthreads;
    return 3; /* built for a CPU without AVX-512 BF16 */
}

#endif
