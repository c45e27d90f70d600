/* y = x w^T for a weight held as 4 bits per value, for decode steps and short prefills on a CPU.
 *
 * torch's CPU kernel for weight-only int4 (aten._weight_int4pack_mm_for_cpu) dequantises the
 * weight for every row it multiplies, so at 16 rows it is bound by that arithmetic: 340 us
 * for a 3072 x 576 layer on a 2-core AVX-512 CPU, slower than the bf16 matmul. Here each
 * weight's 4-bit value is turned into bf16 once per call and multiplied into every row with
 * AVX-512 BF16's dot-product instruction (vdpbf16ps, into fp32 sums); the scale and minimum of
 * each group of 32 are applied to those sums. The turning is two instructions per 32 weights:
 * a 16-bit word holding 0x4300 | n is the bf16 of 128 + n, so a shift and one bit-select of a
 * packed word give the bf16 of 128 + q, and the 128 is taken off through each group's minimum.
 * storygen/kernels.py builds it for the CPU it runs on (-march=native); where the CPU lacks
 * AVX-512 BF16 the function reports so and torch's kernel is used.
 *
 * Layout (all contiguous):
 *   x       (M, K) bf16, K a multiple of 32; rows in blocks of up to 16, each block of 16 outputs
 *           taking every block of rows while its weights are in cache (Int4Linear uses it up to 32 rows)
 *   packed  (N / 16, K / 8, 16, 2) uint16: for block b of 16 outputs and chunk t of 8 inputs, word
 *           (c, e) holds q[16 b + c][8 t + 2 k + e] in bits 4k..4k+3, k = 0..3 (values 0..15): one
 *           64-byte load, shifted by 4k, gives column c's input pair 4t + k in dword c
 *   scale, low (N / 16, K / 32, 16) fp16: w[n][k] = q[n][k] * scale + low, per group of 32 k. fp16,
 *           not fp32: half the bytes (13 MB less for the default model; no speed change measured), and
 *           it holds a scale or minimum to 2^-11 of itself, 8x finer than the bf16 rounding of the
 *           weights they rebuild (Int4Linear keeps torch's kernel for a grid past fp16's range)
 *   y       (M, N) bf16
 */
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

/* Input pair 4t + k of 16 columns as bf16 pairs of 128 + q (low half: even input), from chunk t. */
static inline __m512i weight_pairs(__m512i chunk, int k) {
    return _mm512_ternarylogic_epi32(_mm512_srli_epi16(chunk, (unsigned)(4 * k)), _mm512_set1_epi16(0x000F),
                                     _mm512_set1_epi16(0x4300), 0xEA); /* (a & b) | c */
}

/* One block of 16 output columns for MR rows (MR a constant, so the sums stay in registers).
 * Within a group of 32 inputs the weight is q * scale + low = (128 + q) * scale + (low - 128 * scale),
 * so a row's dot product over the group is scale * (x . (128 + q)) + (low - 128 scale) * sum(x):
 * x . (128 + q) from the bf16 dot-product instruction (128 + q and its products with bf16 are exact
 * in fp32; the sums lose ~4 bits of fp32's 24 to the 128, far below the bf16 output's rounding), and
 * sum(x) per row and group computed once per call (xsum). IL partial sums per row take alternate input
 * pairs: with one or two rows, one sum per row would be a chain of 16 dependent dot products per group,
 * each waiting for the last (a lone story's step was bound by that latency). */
#define DEFINE_BLOCK(MR, IL)                                                                          \
    static void block_##MR(const uint32_t *x, const float *xsum, int64_t M, int64_t K,                \
                           const uint8_t *packed, const uint16_t *scale, const uint16_t *low, uint16_t *y, \
                           int64_t N, int64_t b) {                                                    \
        __m512 acc[MR], part[MR][IL];                                                                 \
        for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();                                    \
        const int64_t pairs = K / 2, groups = K / 32;                                                 \
        const __m512i *chunks = (const __m512i *)(packed + b * pairs * 16);                           \
        for (int64_t g = 0; g < groups; ++g) {                                                        \
            for (int m = 0; m < MR; ++m)                                                              \
                for (int i = 0; i < IL; ++i) part[m][i] = _mm512_setzero_ps();                        \
            for (int64_t t = 4 * g; t < 4 * g + 4; ++t) {                                             \
                const __m512i chunk = _mm512_loadu_si512(chunks + t);                                 \
                for (int k = 0; k < 4; ++k) {                                                         \
                    const __m512i w = weight_pairs(chunk, k);                                         \
                    for (int m = 0; m < MR; ++m) {                                                    \
                        const uint32_t xp = m < M ? x[m * pairs + 4 * t + k] : 0u;                    \
                        part[m][k % IL] = _mm512_dpbf16_ps(part[m][k % IL], (__m512bh)w,              \
                                                           (__m512bh)_mm512_set1_epi32((int)xp));     \
                    }                                                                                 \
                }                                                                                     \
            }                                                                                         \
            const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + (b * groups + g) * 16))); \
            const __m512 l = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), s,                              \
                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(low + (b * groups + g) * 16)))); \
            for (int m = 0; m < MR; ++m) {                                                            \
                __m512 sum = part[m][0];                                                              \
                if (IL == 4)                                                                          \
                    sum = _mm512_add_ps(_mm512_add_ps(part[m][0], part[m][1 % IL]),                   \
                                        _mm512_add_ps(part[m][2 % IL], part[m][3 % IL]));             \
                else if (IL == 2)                                                                     \
                    sum = _mm512_add_ps(part[m][0], part[m][1 % IL]);                                 \
                acc[m] = _mm512_fmadd_ps(sum, s, acc[m]);                                             \
                acc[m] = _mm512_fmadd_ps(l, _mm512_set1_ps(m < M ? xsum[m * groups + g] : 0.0f), acc[m]); \
            }                                                                                         \
        }                                                                                             \
        for (int m = 0; m < MR && m < M; ++m)                                                         \
            _mm256_storeu_si256((__m256i *)(y + m * N + b * 16), (__m256i)_mm512_cvtneps_pbh(acc[m])); \
    }

DEFINE_BLOCK(1, 4)
DEFINE_BLOCK(2, 2)
DEFINE_BLOCK(4, 1)
DEFINE_BLOCK(8, 1)
DEFINE_BLOCK(16, 1)

int storygen_int4_matmul(const uint16_t *x, const uint8_t *packed, const uint16_t *scale, const uint16_t *low, uint16_t *y,
                         int64_t M, int64_t N, int64_t K, int nthreads) {
    if (M < 1 || N % 16 || K % 32) return 1;
    const int64_t groups = K / 32;
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(M * groups)); /* (M, K / 32): each row's sum per group */
    if (xsum == NULL) return 2;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < groups; ++g) {
            const __m512 lo = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(x + m * K + g * 32)));
            const __m512 hi = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(x + m * K + g * 32 + 16)));
            xsum[m * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
        }
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
    for (int64_t b = 0; b < N / 16; ++b)
        for (int64_t m0 = 0; m0 < M; m0 += 16) {
            const int64_t rows = M - m0 < 16 ? M - m0 : 16;
            const uint32_t *xr = (const uint32_t *)(x + m0 * K);
            const float *sr = xsum + m0 * groups;
            uint16_t *yr = y + m0 * N;
            if (rows == 1)
                block_1(xr, sr, rows, K, packed, scale, low, yr, N, b);
            else if (rows == 2)
                block_2(xr, sr, rows, K, packed, scale, low, yr, N, b);
            else if (rows <= 4)
                block_4(xr, sr, rows, K, packed, scale, low, yr, N, b);
            else if (rows <= 8)
                block_8(xr, sr, rows, K, packed, scale, low, yr, N, b);
            else
                block_16(xr, sr, rows, K, packed, scale, low, yr, N, b);
        }
    free(xsum);
    return 0;
}

#else

int storygen_int4_matmul(const uint16_t *x, const uint8_t *packed, const uint16_t *scale, const uint16_t *low, uint16_t *y,
                         int64_t M, int64_t N, int64_t K, int nthreads) {
    (void)x; (void)packed; (void)scale; (void)low; (void)y; (void)M; (void)N; (void)K; (void)nthreads;
    return 3; /* built for a CPU without AVX-512 BF16 */
}

#endif
