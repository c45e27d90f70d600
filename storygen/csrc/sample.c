/* The costly half of sampling a token, on a CPU: the repetition penalty, the ending steer and the
 * top-k candidates of each row's logits, in one pass over the vocabulary.
 *
 * In torch (storygen/sampling.py) the penalty finds the seen tokens with nonzero() over the whole
 * (rows, vocab) mask and top-k scans the vocabulary again: for SmolLM2's 49,152 tokens about
 * 0.2 ms of a 5 ms decode step alone and 1 ms of a 25 ms step at 16 rows. Here each row is one pass:
 * the penalty and the steer are applied in place, a block of 16 logits is skipped when its largest
 * is no better than the worst candidate so far, and the few that are go into a heap. The rest of
 * sampling (temperature, top-p, the draw) works on the candidates only and stays in torch.
 *
 * The values are torch's bit for bit: the penalty divides or multiplies in fp32 as torch does, so
 * this file is built without fast-math's reciprocals. Candidates come best first; equal values in
 * order of token id, as argmax takes the first.
 */
#if defined(__clang__)
#pragma clang fp reassociate(off)
#pragma float_control(precise, on)
#elif defined(__GNUC__)
#pragma GCC optimize("no-fast-math")
#endif

#include <stdint.h>
#include <stdlib.h>

#define BLOCK 16

typedef struct {
    float value;
    int64_t id;
} candidate;

/* Whether a is worse than b: a lower value, or the same value and a later token. */
static inline int worse(candidate a, candidate b) {
    return a.value < b.value || (a.value == b.value && a.id > b.id);
}

/* A min-heap by `worse`: heap[0] is the worst candidate kept. */
static void sift_down(candidate *heap, int64_t n, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && worse(heap[l], heap[m])) m = l;
        if (r < n && worse(heap[r], heap[m])) m = r;
        if (m == i) return;
        candidate t = heap[i];
        heap[i] = heap[m];
        heap[m] = t;
        i = m;
    }
}

static int best_first(const void *a, const void *b) {
    candidate x = *(const candidate *)a, y = *(const candidate *)b;
    return worse(y, x) ? -1 : worse(x, y) ? 1 : 0;
}

static void one_row(float *x, const uint8_t *seen, float penalty, const int64_t *end_ids, int64_t n_end,
                    float end_bias, int64_t vocab, int64_t k, candidate *heap, float *values, int64_t *ids) {
    if (seen) {  /* CTRL's penalty, as sampling.py: positive logits shrink by it, negative ones grow */
        for (int64_t j = 0; j < vocab; j++) {
            float v = x[j];
            float p = v > 0 ? v / penalty : v * penalty;
            x[j] = seen[j] ? p : v;
        }
    }
    for (int64_t e = 0; e < n_end; e++) x[end_ids[e]] += end_bias;
    for (int64_t j = 0; j < k; j++) heap[j] = (candidate){x[j], j};
    for (int64_t i = k / 2 - 1; i >= 0; i--) sift_down(heap, k, i);
    int64_t j = k;
    for (; j < vocab && j % BLOCK; j++)
        if (x[j] > heap[0].value) { heap[0] = (candidate){x[j], j}; sift_down(heap, k, 0); }
    for (; j + BLOCK <= vocab; j += BLOCK) {
        float most = x[j];
        for (int t = 1; t < BLOCK; t++) most = x[j + t] > most ? x[j + t] : most;
        if (most <= heap[0].value) continue;  /* a later token of the same value is worse: never kept */
        for (int t = 0; t < BLOCK; t++)
            if (x[j + t] > heap[0].value) { heap[0] = (candidate){x[j + t], j + t}; sift_down(heap, k, 0); }
    }
    for (; j < vocab; j++)
        if (x[j] > heap[0].value) { heap[0] = (candidate){x[j], j}; sift_down(heap, k, 0); }
    qsort(heap, (size_t)k, sizeof(candidate), best_first);
    for (int64_t i = 0; i < k; i++) {
        values[i] = heap[i].value;
        ids[i] = heap[i].id;
    }
}

/* logits (rows, vocab) fp32, row stride `stride`, changed in place (penalty and steer); seen (rows, vocab)
 * bytes, nonzero where the row has the token, or NULL; penalty (rows,); end_ids (n_end,) with end_bias
 * (rows,), or n_end 0; values (rows, k) and ids (rows, k): each row's k best, best first. 0 on success. */
int storygen_sample_candidates(float *logits, const uint8_t *seen, const float *penalty, const int64_t *end_ids,
                               int64_t n_end, const float *end_bias, float *values, int64_t *ids, int64_t rows,
                               int64_t vocab, int64_t stride, int64_t k, int threads) {
    if (rows < 0 || vocab <= 0 || k <= 0 || k > vocab || (n_end && !end_bias)) return 1;
    for (int64_t e = 0; e < n_end; e++)
        if (end_ids[e] < 0 || end_ids[e] >= vocab) return 2;
    int failed = 0;
#pragma omp parallel num_threads(rows > 1 && threads > 1 ? (rows < threads ? (int)rows : threads) : 1)
    {
        candidate *heap = malloc((size_t)k * sizeof(candidate));
        if (!heap) {
#pragma omp atomic write
            failed = 3;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (!heap) continue;
            one_row(logits + r * stride, seen ? seen + r * vocab : NULL, penalty ? penalty[r] : 1.0f, end_ids, n_end,
                    n_end ? end_bias[r] : 0.0f, vocab, k, heap, values + r * k, ids + r * k);
        }
        free(heap);
    }
    return failed;
}
