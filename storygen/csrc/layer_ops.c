/* The small bf16 operations around a Llama layer's matmuls, each in one pass, on a CPU.
 *
 * In torch each of these is several operators: LlamaRMSNorm is an upcast, a square, a mean, an
 * rsqrt, two products and a downcast; the rotary embedding is two products, a negation, a
 * concatenation and a sum; the MLP's silu(gate) * up is two. Each operator is one more pass over
 * the data and one more dispatch: at one to sixteen rows, dispatch is most of their cost (about
 * 15 ops a layer, 5 ms of a 16-row decode step of SmolLM2-135M on a 2-core CPU), and over a
 * prompt's rows they are a quarter of a prefill. Here each is one call and one pass.
 *
 * Each reproduces torch's bf16 arithmetic step by step: fp32 inside an operation, rounded to
 * bf16 (to nearest, ties to even) wherever torch's result is a bf16 tensor, so results agree
 * with storygen/decoder.py's torch path bit for bit but for the last bit of an fp32 reduction
 * or exp (checked in tests/test_kernels.py).
 *
 * Rows are given by a row stride in elements; each row's elements are contiguous. Threads split
 * the rows where there is enough work to be worth waking them (MIN_WORK_PER_THREAD).
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

/* Elements a thread must have before the rows are split: waking a second thread costs more than a
 * decode step's few thousand elements take (a 16-row step was 1-3 ms slower split). */
#define MIN_WORK_PER_THREAD 65536

static inline int threads_for(int64_t rows, int64_t cols, int threads) {
    int64_t most = rows * cols / MIN_WORK_PER_THREAD;
    if (most > rows) most = rows;
    if (most < 1) return 1;
    return most < threads ? (int)most : threads;
}

/* x (rows, cols), updated in place when delta is given: x = bf16(x + delta), the residual stream.
 * out (rows, cols) = bf16(weight * bf16(x * rsqrt(mean(x^2) + eps))), as LlamaRMSNorm computes it. */
int storygen_add_rms_norm(uint16_t *x, const uint16_t *delta, const uint16_t *weight, uint16_t *out,
                          int64_t rows, int64_t cols, int64_t x_stride, int64_t delta_stride, int64_t out_stride,
                          float eps, int threads) {
    if (rows < 0 || cols <= 0) return 1;
#pragma omp parallel for num_threads(threads_for(rows, cols, threads)) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        uint16_t *xr = x + r * x_stride;
        uint16_t *o = out + r * out_stride;
        float sum = 0.0f;
        if (delta != 0) {
            const uint16_t *dr = delta + r * delta_stride;
#pragma omp simd reduction(+ : sum)
            for (int64_t c = 0; c < cols; ++c) {
                uint16_t h = f32_to_bf16(bf16_to_f32(xr[c]) + bf16_to_f32(dr[c]));
                xr[c] = h;
                float v = bf16_to_f32(h);
                sum += v * v;
            }
        } else {
#pragma omp simd reduction(+ : sum)
            for (int64_t c = 0; c < cols; ++c) {
                float v = bf16_to_f32(xr[c]);
                sum += v * v;
            }
        }
        float inv = 1.0f / sqrtf(sum / (float)cols + eps);
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
            float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[c]) * inv));
            o[c] = f32_to_bf16(bf16_to_f32(weight[c]) * normed);
        }
    }
    return 0;
}

/* gate_up (rows, 2 * inter): each row's gate then its up. out (rows, inter) = bf16(bf16(silu(gate)) * up). */
int storygen_silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inter, int64_t in_stride,
                      int64_t out_stride, int threads) {
    if (rows < 0 || inter <= 0) return 1;
#pragma omp parallel for num_threads(threads_for(rows, 2 * inter, threads)) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *g = gate_up + r * in_stride;
        const uint16_t *u = g + inter;
        uint16_t *o = out + r * out_stride;
#pragma omp simd
        for (int64_t i = 0; i < inter; ++i) {
            float v = bf16_to_f32(g[i]);
            float s = bf16_to_f32(f32_to_bf16(v / (1.0f + expf(-v))));
            o[i] = f32_to_bf16(s * bf16_to_f32(u[i]));
        }
    }
    return 0;
}

/* The rotary embedding, in place, on the first `heads` heads of each row (queries then keys):
 * x (rows, heads, dim) with a row stride; cos, sin (rows, dim), contiguous.
 * x = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), rotate_half(x) = (-x[half:], x[:half]). */
int storygen_rotary(uint16_t *x, const uint16_t *cos_, const uint16_t *sin_, int64_t rows, int64_t heads,
                    int64_t dim, int64_t row_stride, int threads) {
    if (rows < 0 || heads <= 0 || dim <= 0 || dim % 2 || dim > 1024) return 1;
    const int64_t half = dim / 2;
#pragma omp parallel for num_threads(threads_for(rows, heads * dim, threads)) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *c = cos_ + r * dim;
        const uint16_t *s = sin_ + r * dim;
        for (int64_t h = 0; h < heads; ++h) {
            uint16_t *v = x + r * row_stride + h * dim;
            float lo[512], hi[512];
#pragma omp simd
            for (int64_t d = 0; d < half; ++d) {
                lo[d] = bf16_to_f32(v[d]);
                hi[d] = bf16_to_f32(v[d + half]);
            }
#pragma omp simd
            for (int64_t d = 0; d < half; ++d) {
                float a = bf16_to_f32(f32_to_bf16(lo[d] * bf16_to_f32(c[d])));
                float b = bf16_to_f32(f32_to_bf16(-hi[d] * bf16_to_f32(s[d])));
                v[d] = f32_to_bf16(a + b);
                float a2 = bf16_to_f32(f32_to_bf16(hi[d] * bf16_to_f32(c[d + half])));
                float b2 = bf16_to_f32(f32_to_bf16(lo[d] * bf16_to_f32(s[d + half])));
                v[d + half] = f32_to_bf16(a2 + b2);
            }
        }
    }
    return 0;
}
