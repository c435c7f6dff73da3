/*
 * The per-token steps of the int8 forward, each in one call.
 *
 * cogalora/int8.py, cogalora/bank.py and cogalora/packing.py compute the same things with torch
 * operations: about a dozen small kernel calls per quantization, half a dozen per dequantization,
 * fifteen per adapter step and four per pooling, each paying Python and dispatch overhead that, on the
 * few tokens of one sentence, costs more than the arithmetic. These functions do the same IEEE
 * operations on the same values in the same order, one element at a time, so for finite inputs their
 * results are the same bits as the torch path (tests/test_int8_kernels.py checks it; a row holding a
 * NaN has no meaningful codes in either path, and they may differ): every floating-point step is a
 * single correctly rounded operation (compare, add, subtract, multiply, divide, round to nearest
 * even, convert), and nothing is contracted into a fused multiply-add (built with -ffp-contract=off)
 * or reassociated (no -ffast-math). Integer sums are exact in any order. The build (setup.py) is
 * optional: without a C compiler the torch path runs instead, with the same results.
 *
 * Loaded with ctypes (cogalora/int8_kernels.py): plain C, no Python or torch headers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

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

/*
 * AVX-512 (x86-64-v4) and AVX2 copies beside the portable one, the best the CPU runs picked when the
 * library is loaded, on x86-64 Linux. The same operations in each: only the vector width differs.
 */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/*
 * One row of k floats as int8 codes: codes = round((x - mid) / scale), with mid = (hi + lo) * 0.5 and
 * scale = max((hi - lo) * (0.5 / 127), 1e-30) from the row's own range.
 */
static inline void quantize_row(const float *row, int64_t k, int8_t *codes, float *scale, float *mid) {
    const float half_step = (float)(0.5 / LEVELS);
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
    *mid = row_mid;
    *scale = row_scale;
    for (j = 0; j < k; j++) codes[j] = (int8_t)nearbyintf((row[j] - row_mid) / row_scale);
}

/* Rows of x ([n, k] float32, row-major) as int8 codes, each row on its own (quantize_row). */
VECTOR_CLONES
void cogalora_quantize_rows(const float *x, int64_t n, int64_t k, int8_t *codes, float *scale, float *mid) {
    for (int64_t i = 0; i < n; i++) quantize_row(x + i * k, k, codes + i * k, scale + i, mid + i);
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

/*
 * Each batch row's mean token (the routers' input, cogalora/routing.py): out[r] = (0 + x[t1] + x[t2] + ...)
 * / length[r], the row's tokens added in token order into a zero row, as TokenLayout.row_sums does with
 * index_add_, then one division. Token i (of n) is row index[i] of x ([rows, d]; index NULL: row i)
 * and belongs to batch row owner[i]. out: [batch, d]. Returns 0, or -1 (out unfinished) when a token,
 * an owner or a length is out of range: the caller then runs the torch path.
 */
VECTOR_CLONES
int cogalora_row_means(const float *x, int64_t rows, int64_t d, const int64_t *index, const int64_t *owner, int64_t n,
                       const int64_t *length, int64_t batch, float *out) {
    for (int64_t i = 0; i < batch * d; i++) out[i] = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const int64_t t = index ? index[i] : i, r = owner[i];
        if (t < 0 || t >= rows || r < 0 || r >= batch) return -1;
        const float *xt = x + t * d;
        float *o = out + r * d;
        for (int64_t j = 0; j < d; j++) o[j] = o[j] + xt[j];
    }
    for (int64_t r = 0; r < batch; r++) {
        if (length[r] < 1) return -1;
        const float size = (float)length[r];
        float *o = out + r * d;
        for (int64_t j = 0; j < d; j++) o[j] = o[j] / size;
    }
    return 0;
}

/*
 * The adapter step of cogalora/bank.py (AdapterBank.add_delta_exact) in one call: for each token row t,
 * out[t] += B q(A x[t]) with the A and B of the token's adapter, where both products are exact int32
 * sums and every step around them is the torch path's, in its order:
 *   down = ((float)(A x) * x_scale[t]) * a_scale + x_mid[t] * a_sum       (dequantize, no bias)
 *   q = quantize_row(down)                                                   (codes, scale, mid)
 *   y = ((float)(B q) * q_scale) * b_scale + q_mid * ((float)colsum(B) * b_scale)
 *   out[t] = out[t] + y
 * x: int8 codes [rows, k] with x_scale, x_mid [rows]; tokens: the n rows to update (NULL: rows 0..n-1).
 * The bank: a [capacity, rank_stride, k] codes with a_scale, a_sum [capacity, rank_stride]; b, B's
 * codes transposed, [capacity, rank_stride, m], with b_scale [capacity, m]; the first rank components
 * are used (nested ranks). Token i uses bank row token_row[i], or row when token_row is NULL.
 * out: float32 [rows, m]. Integer sums are exact in any order, so the loops run in the order that
 * vectorizes. Returns 0; -1 (nothing written) when a token or a bank row is out of range; -2 when
 * scratch memory cannot be had. The caller then runs the torch path.
 */
VECTOR_CLONES
int cogalora_add_delta(const int8_t *x, const float *x_scale, const float *x_mid, int64_t rows, int64_t k,
                       const int64_t *tokens, int64_t n, const int64_t *token_row, int64_t row, int64_t capacity,
                       const int8_t *a, const float *a_scale, const float *a_sum, int64_t rank_stride, int64_t rank,
                       const int8_t *b, const float *b_scale, int64_t m, float *out) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t t = tokens ? tokens[i] : i, r = token_row ? token_row[i] : row;
        if (t < 0 || t >= rows || r < 0 || r >= capacity) return -1;
    }
    if (rank < 1 || rank > rank_stride) return -1;
    float *b_sum = malloc((size_t)m * sizeof(float));
    int32_t *up = malloc((size_t)m * sizeof(int32_t));
    float *down = malloc((size_t)rank * sizeof(float));
    int8_t *down_codes = malloc((size_t)rank);
    int status = (b_sum && up && down && down_codes) ? 0 : -2;
    int64_t summed = -1; /* the bank row whose column sums b_sum holds */
    for (int64_t i = 0; status == 0 && i < n; i++) {
        const int64_t t = tokens ? tokens[i] : i, r = token_row ? token_row[i] : row;
        const int8_t *a_r = a + r * rank_stride * k, *b_r = b + r * rank_stride * m;
        const float *a_scale_r = a_scale + r * rank_stride, *a_sum_r = a_sum + r * rank_stride;
        const float *b_scale_r = b_scale + r * m;
        if (r != summed) {
            for (int64_t o = 0; o < m; o++) up[o] = 0;
            for (int64_t j = 0; j < rank; j++)
                for (int64_t o = 0; o < m; o++) up[o] += b_r[j * m + o];
            for (int64_t o = 0; o < m; o++) b_sum[o] = (float)up[o] * b_scale_r[o];
            summed = r;
        }
        const int8_t *xt = x + t * k;
        const float s = x_scale[t], mid = x_mid[t];
        for (int64_t j = 0; j < rank; j++) {
            const int8_t *aj = a_r + j * k;
            int32_t acc = 0;
            for (int64_t kk = 0; kk < k; kk++) acc += (int16_t)xt[kk] * (int16_t)aj[kk];
            down[j] = ((float)acc * s) * a_scale_r[j] + mid * a_sum_r[j];
        }
        float q_scale, q_mid;
        quantize_row(down, rank, down_codes, &q_scale, &q_mid);
        for (int64_t o = 0; o < m; o++) up[o] = 0;
        int64_t j = 0;
        /* Two products of int8 codes fit an int16 (2 * 127 * 127 < 32767): pairs add in 16 bits. */
        for (; j + 1 < rank; j += 2) {
            const int16_t c0 = down_codes[j], c1 = down_codes[j + 1];
            const int8_t *b0 = b_r + j * m, *b1 = b0 + m;
            for (int64_t o = 0; o < m; o++) up[o] += (int16_t)(c0 * (int16_t)b0[o] + c1 * (int16_t)b1[o]);
        }
        for (; j < rank; j++) {
            const int16_t c = down_codes[j];
            const int8_t *bj = b_r + j * m;
            for (int64_t o = 0; o < m; o++) up[o] += c * (int16_t)bj[o];
        }
        float *ot = out + t * m;
        for (int64_t o = 0; o < m; o++) ot[o] = ot[o] + (((float)up[o] * q_scale) * b_scale_r[o] + q_mid * b_sum[o]);
    }
    free(b_sum);
    free(up);
    free(down);
    free(down_codes);
    return status;
}
