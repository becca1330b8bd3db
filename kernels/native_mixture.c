/* The native CPU backend of the mixture-of-LoRAs delta (merge-after), float32.
 *
 * Index legend: T = tokens, k = slots per token, E = adapters in the bank, R = max rank,
 * r_e = rank of adapter e, d_in / d_out = the module's dimensions.
 *
 *     out[t, :] += sum_j w[t, j] * B_e[:, :r_e] @ (A_e[:r_e] @ x[t, :]),   e = idx[t, j] >= 0
 *
 * One call does a whole module for every token: per (token, slot) r_e dot products of length
 * d_in (shrink), then r_e axpys of length d_out into the output row (expand), straight from the
 * bank's rows (no gathered copies, no [T, d_out] buffer). Each token's result depends on its
 * own row, decision and the bank only, in a fixed order: a token gives bitwise the same output
 * in any batch.
 *
 * Why C and not PyTorch ops: at decoding sizes (T*k <= a few dozen) the arithmetic is a few
 * hundred thousand multiply-adds, while the gather path's ~15 PyTorch calls per module cost
 * 3-5 us each in dispatch and allocation; this is one call. Compiled at first use with the
 * system's C compiler (kernels/native.py); `#pragma omp simd` lets the compiler vectorise the
 * reductions (-fopenmp-simd: no OpenMP runtime is linked).
 *
 * Layouts (strides in elements): x[t, i] at t*sxt + i; A[e, r, i] at e*sAe + r*sAr + i;
 * B[e, n, r] (the [d_out, r] factor) at e*sBe + n*sBn + r*sBr, fastest when sBn == 1 (the
 * runtime's bank stores B transposed); out[t, n] at t*sot + n.
 *
 * Returns 0, or 1 + the flat slot t*k + j of the first index outside [-1, E) (or of an adapter
 * whose rank exceeds QV_MAX_RANK); then nothing has been written.
 */
#include <stdint.h>

#define QV_MAX_RANK 1024

int64_t quiver_mixture_f32(
    const float *x, int64_t T, int64_t d_in, int64_t sxt,
    const int64_t *idx, const float *w, int64_t k,
    const float *A, int64_t sAe, int64_t sAr,
    const float *B, int64_t sBe, int64_t sBn, int64_t sBr,
    const int32_t *ranks, int64_t E,
    float *out, int64_t d_out, int64_t sot)
{
    float h[QV_MAX_RANK];
    for (int64_t p = 0; p < T * k; ++p) {  /* validate every slot before writing anything */
        const int64_t e = idx[p];
        if (e < -1 || e >= E || (e >= 0 && ranks[e] > QV_MAX_RANK))
            return 1 + p;
    }
    for (int64_t t = 0; t < T; ++t) {
        const float *xt = x + t * sxt;
        float *ot = out + t * sot;
        for (int64_t j = 0; j < k; ++j) {
            int64_t e = idx[t * k + j];
            if (e < 0)
                continue;  /* no adapter in this slot */
            const float wj = w[t * k + j];
            const int64_t r_e = ranks[e];
            for (int64_t r = 0; r < r_e; ++r) {  /* shrink: h = w * (A_e x_t) */
                const float *a = A + e * sAe + r * sAr;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t i = 0; i < d_in; ++i)
                    s += a[i] * xt[i];
                h[r] = s * wj;
            }
            /* expand: out_t += B_e h, a pass over the row per rank (contiguous when sBn == 1) */
            for (int64_t r = 0; r < r_e; ++r) {
                const float *b = B + e * sBe + r * sBr;
                const float hr = h[r];
                if (sBn == 1) {
#pragma omp simd
                    for (int64_t n = 0; n < d_out; ++n)
                        ot[n] += hr * b[n];
                } else {
#pragma omp simd
                    for (int64_t n = 0; n < d_out; ++n)
                        ot[n] += hr * b[n * sBn];
                }
            }
        }
    }
    return 0;
}
