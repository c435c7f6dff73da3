/*
 * The per-token steps around an exact integer product, each in one call.
 *
 * cogalora/int8.py computes the same thing with torch operations: about a dozen small kernel calls
 * per quantization and half a dozen per dequantization, each paying Python and dispatch overhead
 * that, on the few tokens of one sentence, costs more than the arithmetic. These two functions do
 * the same IEEE operations on the same values in the same order, one element at a time, so for
 * finite inputs their results are the same bits as the torch path (tests/test_int8_kernels.py checks
 * it; a row holding a NaN has no meaningful codes in either path, and they may differ): every step
 * is a single correctly rounded operation (compare, add, subtract, multiply, divide, round to
 * nearest even, convert), and nothing is contracted into a fused multiply-add (built with
 * -ffp-contract=off) or reassociated (no -ffast-math). The build (setup.py) is optional: without a
 * C compiler the torch path runs instead, with the same results.
 *
 * Loaded with ctypes (cogalora/int8_kernels.py): plain C, no Python or torch headers.
 */
#include <math.h>
#include <stdint.h>

/* Half the number of levels of a signed 8-bit integer, and the smallest scale (cogalora/int8.py). */
#define LEVELS 127.0
#define TINY 1e-30f

/* The digest of this file the build saw (setup.py): the loader checks it against the file beside it. */
#ifndef COGALORA_SOURCE_DIGEST
#define COGALORA_SOURCE_DIGEST "unknown"
#endif

const char *cogalora_source_digest(void) { return COGALORA_SOURCE_DIGEST; }

/* Independent running maxima and minima per row: the compiler turns them into vector registers. */
#define LANES 16

/* An AVX2 copy beside the portable one, picked when the library is loaded, on x86-64 Linux. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/*
 * Rows of x ([n, k] float32, row-major) as int8 codes: codes = round((x - mid) / scale), with
 * mid = (hi + lo) * 0.5 and scale = max((hi - lo) * (0.5 / 127), 1e-30) from the row's own range.
 */
VECTOR_CLONES
void cogalora_quantize_rows(const float *x, int64_t n, int64_t k, int8_t *codes, float *scale, float *mid) {
    const float half_step = (float)(0.5 / LEVELS);
    for (int64_t i = 0; i < n; i++) {
        const float *row = x + i * k;
        float hi_lane[LANES], lo_lane[LANES];
        for (int l = 0; l < LANES; l++) hi_lane[l] = lo_lane[l] = row[0];
        int64_t j = 0;
        for (; j + LANES <= k; j += LANES) {
            for (int l = 0; l < LANES; l++) {
                float v = row[j + l];
                hi_lane[l] = v > hi_lane[l] ? v : hi_lane[l];
                lo_lane[l] = v < lo_lane[l] ? v : lo_lane[l];
            }
        }
        float hi = hi_lane[0], lo = lo_lane[0];
        for (int l = 1; l < LANES; l++) {
            hi = hi_lane[l] > hi ? hi_lane[l] : hi;
            lo = lo_lane[l] < lo ? lo_lane[l] : lo;
        }
        for (; j < k; j++) {
            hi = row[j] > hi ? row[j] : hi;
            lo = row[j] < lo ? row[j] : lo;
        }
        float row_mid = (hi + lo) * 0.5f;
        float row_scale = (hi - lo) * half_step;
        if (row_scale < TINY) row_scale = TINY;
        mid[i] = row_mid;
        scale[i] = row_scale;
        int8_t *out = codes + i * k;
        for (j = 0; j < k; j++) out[j] = (int8_t)nearbyintf((row[j] - row_mid) / row_scale);
    }
}

/*
 * float32 [n, m] from int32 sums: out = ((acc * row_scale) * weight_scale + bias) + row_mid * weight_sum.
 * Row i takes row k of weight_scale and weight_sum ([weight_rows, m] each): k = weight_row[i] when
 * weight_row is given (each token its adapter's scales), else k = i * weight_step (weight_step 0: one
 * row for all, 1: one row per row). bias may be NULL. Returns 0, or -1 (out unfinished) when an index
 * of weight_row is outside [0, weight_rows): the caller then runs the torch path, which raises.
 */
VECTOR_CLONES
int cogalora_dequantize(const int32_t *acc, int64_t n, int64_t m, const float *row_scale, const float *row_mid,
                        const float *weight_scale, const float *weight_sum, int64_t weight_rows,
                        const int64_t *weight_row, int64_t weight_step, const float *bias, float *out) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t k = weight_row ? weight_row[i] : i * weight_step;
        if (k < 0 || k >= weight_rows) return -1;
        const int32_t *a = acc + i * m;
        const float *w_scale = weight_scale + k * m;
        const float *w_sum = weight_sum + k * m;
        const float s = row_scale[i], mid = row_mid[i];
        float *o = out + i * m;
        if (bias) {
            for (int64_t j = 0; j < m; j++) o[j] = ((float)a[j] * s * w_scale[j] + bias[j]) + mid * w_sum[j];
        } else {
            for (int64_t j = 0; j < m; j++) o[j] = ((float)a[j] * s * w_scale[j]) + mid * w_sum[j];
        }
    }
    return 0;
}
