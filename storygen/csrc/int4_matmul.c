/* y = x w^T for a weight held as 4 bits per value, for decode steps of 5 to 16 rows on a CPU.
 *
 * torch's CPU kernel for weight-only int4 (aten._weight_int4pack_mm_for_cpu) dequantises the
 * weight for every row it multiplies, so at 16 rows it is bound by that arithmetic: 340 us
 * for a 3072 x 576 layer on a 2-core AVX-512 CPU, slower than the bf16 matmul. Here each
 * weight is dequantised once per call, to bf16, and multiplied into every row with
 * AVX-512 BF16's dot-product instruction (vdpbf16ps: 32 products a cycle into fp32 sums).
 * storygen/kernels.py builds it for the CPU it runs on (-march=native); where the CPU lacks
 * AVX-512 BF16 the function reports so and torch's kernel is used.
 *
 * Layout (all contiguous):
 *   x       (M, K) bf16, M <= 16 rows, K a multiple of 32
 *   packed  (N / 16, K / 2, 16) uint8: byte j of pair p of block b holds q[16 b + j][2 p] in its
 *           low nibble and q[16 b + j][2 p + 1] in its high nibble (values 0..15)
 *   scale, low (N / 16, K / 32, 16) fp32: w[n][k] = q[n][k] * scale + low, per group of 32 k
 *   y       (M, N) bf16
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

/* 16 columns x 2 inputs of the weight, dequantised and packed as bf16 pairs (low: even k). */
static inline __m512i weight_pairs(const uint8_t *bytes, __m512 scale, __m512 low) {
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
    const __m512 even = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15))), scale, low);
    const __m512 odd = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), scale, low);
    const __m512i e = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(even));
    const __m512i o = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(odd));
    return _mm512_or_si512(e, _mm512_slli_epi32(o, 16));
}

/* One block of 16 output columns for MR rows (MR a constant, so the sums stay in registers). */
#define DEFINE_BLOCK(MR)                                                                              \
    static void block_##MR(const uint32_t *x, int64_t M, int64_t K, const uint8_t *packed,          \
                           const float *scale, const float *low, uint16_t *y, int64_t N, int64_t b) { \
        __m512 acc[MR];                                                                               \
        const uint32_t *rows[MR];                                                                     \
        static const uint32_t zeros[1] = {0};                                                         \
        for (int m = 0; m < MR; ++m) {                                                                \
            acc[m] = _mm512_setzero_ps();                                                             \
            rows[m] = m < M ? x + m * (K / 2) : zeros;                                                \
        }                                                                                             \
        const int64_t pairs = K / 2;                                                                  \
        for (int64_t g = 0; g < K / 32; ++g) {                                                        \
            const __m512 s = _mm512_loadu_ps(scale + (b * (K / 32) + g) * 16);                        \
            const __m512 l = _mm512_loadu_ps(low + (b * (K / 32) + g) * 16);                          \
            for (int64_t p = g * 16; p < g * 16 + 16; ++p) {                                          \
                const __m512i w = weight_pairs(packed + (b * pairs + p) * 16, s, l);                  \
                for (int m = 0; m < MR; ++m) {                                                        \
                    const uint32_t xp = m < M ? rows[m][p] : 0u;                                      \
                    acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)w, (__m512bh)_mm512_set1_epi32((int)xp)); \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        for (int m = 0; m < MR && m < M; ++m)                                                         \
            _mm256_storeu_si256((__m256i *)(y + m * N + b * 16), (__m256i)_mm512_cvtneps_pbh(acc[m])); \
    }

DEFINE_BLOCK(8)
DEFINE_BLOCK(16)

int storygen_int4_matmul(const uint16_t *x, const uint8_t *packed, const float *scale, const float *low, uint16_t *y,
                         int64_t M, int64_t N, int64_t K, int nthreads) {
    if (M < 1 || M > 16 || N % 16 || K % 32) return 1;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
    for (int64_t b = 0; b < N / 16; ++b) {
        if (M <= 8)
            block_8((const uint32_t *)x, M, K, packed, scale, low, y, N, b);
        else
            block_16((const uint32_t *)x, M, K, packed, scale, low, y, N, b);
    }
    return 0;
}

#else

int storygen_int4_matmul(const uint16_t *x, const uint8_t *packed, const float *scale, const float *low, uint16_t *y,
                         int64_t M, int64_t N, int64_t K, int nthreads) {
    (void)x; (void)packed; (void)scale; (void)low; (void)y; (void)M; (void)N; (void)K; (void)nthreads;
    return 3; /* built for a CPU without AVX-512 BF16 */
}

#endif
