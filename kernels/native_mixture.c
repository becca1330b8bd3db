/* The native CPU backend of the mixture-of-LoRAs delta (merge-after), float32, and of the
 * sparse softmax of the linear routing gate that decides it (quiver_topk_softmax_f32, at the end).
 *
 * Index legend: T = tokens, k = slots per token, E = adapters in the bank, R = max rank,
 * r_e = rank of adapter e, d_in / d_out = the module's dimensions.
 *
 *     out[t, :] += sum_j w[t, j] * B_e[:, :r_e] @ (A_e[:r_e] @ x[t, :]),   e = idx[t, j] >= 0
 *
 * One call does a whole module for every token, straight from the bank's rows (no gathered
 * copies, no [T, d_out] buffer): per (token, slot) r_e dot products of length d_in (shrink),
 * then r_e axpys of length d_out into the output row (expand). The slots are visited adapter by
 * adapter (a counting sort of the T*k slots by adapter, stable): an adapter's A and B rows are
 * read into cache once and used by all its tokens, which is what makes large calls (prefill,
 * thousands of slots over hundreds of adapters) fast. A token's slots are thus added in the
 * order (adapter, slot) whatever else is in the call, with the same arithmetic (one
 * non-inlined function per slot): a token gives bitwise the same output in any batch.
 *
 * Why C and not PyTorch ops: at decoding sizes (T*k <= a few dozen) the arithmetic is a few
 * hundred thousand multiply-adds, while the gather path's ~15 PyTorch calls per module cost
 * 3-5 us each in dispatch and allocation; this is one call. At prefill sizes the grouped path's
 * Python loop over adapters (two skinny GEMMs each, a few rows per adapter when E is large)
 * costs more than these cache-friendly dot products. Compiled at first use with the system's C
 * compiler (kernels/native.py); `#pragma omp simd` lets the compiler vectorise the reductions
 * (-fopenmp-simd: no OpenMP runtime is linked).
 *
 * Layouts (strides in elements): x[t, i] at t*sxt + i; A[e, r, i] at e*sAe + r*sAr + i;
 * B[e, n, r] (the [d_out, r] factor) at e*sBe + n*sBn + r*sBr, fastest when sBn == 1 (the
 * runtime's bank stores B transposed); out[t, n] at t*sot + n.
 *
 * Returns 0; 1 + the flat slot t*k + j of the first index outside [-1, E) (or of an adapter
 * whose rank exceeds QV_MAX_RANK); or -1 when the sort's buffers cannot be allocated. In both
 * error cases nothing has been written.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define QV_MAX_RANK 1024

/* out_t += w * B_e (A_e x_t), one slot. */
static void __attribute__((noinline)) qv_slot(
    const float *xt, float *ot, int64_t d_in, int64_t d_out, const float *Ae, int64_t sAr,
    const float *Be, int64_t sBn, int64_t sBr, int64_t r_e, float wj)
{
    float h[QV_MAX_RANK];
    for (int64_t r = 0; r < r_e; ++r) {  /* shrink: h = w * (A_e x_t) */
        const float *a = Ae + r * sAr;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < d_in; ++i)
            s += a[i] * xt[i];
        h[r] = s * wj;
    }
    for (int64_t r = 0; r < r_e; ++r) {  /* expand: a pass over the row per rank */
        const float *b = Be + r * sBr;
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

int64_t quiver_mixture_f32(
    const float *x, int64_t T, int64_t d_in, int64_t sxt,
    const int64_t *idx, const float *w, int64_t k,
    const float *A, int64_t sAe, int64_t sAr,
    const float *B, int64_t sBe, int64_t sBn, int64_t sBr,
    const int32_t *ranks, int64_t E,
    float *out, int64_t d_out, int64_t sot)
{
    const int64_t P = T * k;
    for (int64_t p = 0; p < P; ++p) {  /* validate every slot before writing anything */
        const int64_t e = idx[p];
        if (e < -1 || e >= E || (e >= 0 && ranks[e] > QV_MAX_RANK))
            return 1 + p;
    }
    int64_t *start = calloc((size_t)E + 1, sizeof(int64_t)); /* bucket bounds by adapter */
    int64_t *order = malloc((size_t)(P > 0 ? P : 1) * sizeof(int64_t));
    if (!start || !order) {
        free(start);
        free(order);
        return -1;
    }
    for (int64_t p = 0; p < P; ++p)
        if (idx[p] >= 0)
            ++start[idx[p] + 1];
    for (int64_t e = 0; e < E; ++e)
        start[e + 1] += start[e];
    for (int64_t p = 0; p < P; ++p)  /* stable: within an adapter, slots in (token, j) order */
        if (idx[p] >= 0)
            order[start[idx[p]]++] = p;
    /* now start[e] is the end of adapter e's bucket (and the beginning of e + 1's) */
    for (int64_t e = 0, q = 0; e < E; ++e) {
        const float *Ae = A + e * sAe, *Be = B + e * sBe;
        for (; q < start[e]; ++q) {
            const int64_t p = order[q], t = p / k;
            qv_slot(x + t * sxt, out + t * sot, d_in, d_out, Ae, sAr, Be, sBn, sBr, ranks[e], w[p]);
        }
    }
    free(start);
    free(order);
    return 0;
}

/* The sparse softmax of a linear router's gate (Arrow: absolute logits), for M modules that
 * read the same input; the semantics of routing.base.LinearGate.route after its GEMM:
 *
 *     s[m, t, e] = |sim[t, m*E + e]|  (absolute != 0)   or   sim[t, m*E + e]
 *     S          = the k largest s[m, t, e] over the present e, in descending order
 *                  (equal values: the lower index first)
 *     w[m, t, j] = exp((s_j - s_0) / temperature) / sum_j' exp((s_j' - s_0) / temperature)
 *
 * sim: [T, M*E] with row stride ssim (the logits GEMM stays PyTorch's: BLAS beats a hand loop
 * there, while this replaces the abs / mask / topk / softmax / index chain of small ops).
 * Slots beyond the present adapters get index -1 and weight 0. Outputs idx / w: [M, T, k].
 *
 * Returns 0, or 1 when k is outside [1, QV_MAX_K] (then nothing has been written).
 */
#define QV_MAX_K 64

int64_t quiver_topk_softmax_f32(
    const float *sim, int64_t T, int64_t ssim, int64_t M, int64_t E, const uint8_t *present,
    int64_t absolute, int64_t k, float temperature, int64_t *idx, float *w)
{
    if (k > QV_MAX_K || k < 1)
        return 1;
    float topv[QV_MAX_K];
    int64_t topi[QV_MAX_K];
    for (int64_t m = 0; m < M; ++m) {
        const uint8_t *pm = present ? present + m * E : 0;
        for (int64_t t = 0; t < T; ++t) {
            const float *st = sim + t * ssim + m * E;
            int64_t cnt = 0;
            for (int64_t e = 0; e < E; ++e) {  /* insertion into the sorted top-k */
                if (pm && !pm[e])
                    continue;
                const float v = absolute ? fabsf(st[e]) : st[e];
                if (cnt == k && !(v > topv[k - 1]))
                    continue;
                int64_t pos = cnt < k ? cnt++ : k - 1;
                while (pos > 0 && topv[pos - 1] < v) {
                    topv[pos] = topv[pos - 1];
                    topi[pos] = topi[pos - 1];
                    --pos;
                }
                topv[pos] = v;
                topi[pos] = e;
            }
            int64_t *it = idx + (m * T + t) * k;
            float *wt = w + (m * T + t) * k;
            float sum = 0.0f;
            for (int64_t j = 0; j < cnt; ++j) {
                wt[j] = expf((topv[j] - topv[0]) / temperature);
                sum += wt[j];
            }
            for (int64_t j = 0; j < k; ++j) {
                it[j] = j < cnt ? topi[j] : -1;
                wt[j] = j < cnt ? wt[j] / sum : 0.0f;
            }
        }
    }
    return 0;
}

/* A linear gate and the mixture it decides, for M sibling modules that read one input x (q/k/v,
 * gate/up; M = 1 for a module alone), in one call: the gate's sparse softmax as
 * quiver_topk_softmax_f32 computes it, the router's positions mapped to bank slots
 * (slot = slots[e]; slots == NULL: the identity), then quiver_mixture_f32 into each module's
 * output outs[m] (rows of d_out contiguous floats, row stride d_out). What it saves is calls:
 * at decoding sizes the arithmetic of a module is a few microseconds and each call from Python
 * costs more, so one call per group replaces a gate call and M mixture calls.
 *
 * desc: [M, QV_DESC] int64 per module: A, sAe, sAr, B, sBe, sBn, sBr, ranks (addresses as
 * integers; strides in elements, as quiver_mixture_f32 takes them), E_bank (the bank's slots),
 * d_out. The decisions live in buffers of this call.
 *
 * Returns 0; -2 when k is outside [1, QV_MAX_K]; -1 when a buffer cannot be allocated;
 * 1 + m*T*k + p for the first slot p of module m whose bank slot is outside [-1, E_bank) or
 * whose adapter's rank exceeds QV_MAX_RANK. In the -2 and index cases nothing has been written
 * to any output (every module is checked before the first is computed).
 */
#define QV_DESC 10

int64_t quiver_gate_mixture_f32(
    const float *x, int64_t T, int64_t d_in, int64_t sxt,
    const float *sim, int64_t ssim, int64_t M, int64_t E, const uint8_t *present,
    int64_t absolute, int64_t k, float temperature, const int64_t *slots,
    const int64_t *desc, float *const *outs)
{
    if (k > QV_MAX_K || k < 1)
        return -2;
    const int64_t P = T * k;
    int64_t *idx = malloc((size_t)(M * P > 0 ? M * P : 1) * sizeof(int64_t)); /* the decisions [M, T, k] */
    float *w = malloc((size_t)(M * P > 0 ? M * P : 1) * sizeof(float));
    int64_t rc = 0;
    if (!idx || !w) {
        rc = -1;
        goto done;
    }
    quiver_topk_softmax_f32(sim, T, ssim, M, E, present, absolute, k, temperature, idx, w);
    for (int64_t m = 0; m < M && !rc; ++m) {
        const int64_t *d = desc + m * QV_DESC;
        const int32_t *ranks = (const int32_t *)(intptr_t)d[7];
        for (int64_t p = 0; p < P; ++p) {
            int64_t *ip = idx + m * P + p;
            if (*ip >= 0 && slots)
                *ip = slots[*ip];
            if (*ip < -1 || *ip >= d[8] || (*ip >= 0 && ranks[*ip] > QV_MAX_RANK)) {
                rc = 1 + m * P + p;
                break;
            }
        }
    }
    for (int64_t m = 0; m < M && !rc; ++m) {
        const int64_t *d = desc + m * QV_DESC;
        rc = quiver_mixture_f32(
            x, T, d_in, sxt, idx + m * P, w + m * P, k,
            (const float *)(intptr_t)d[0], d[1], d[2],
            (const float *)(intptr_t)d[3], d[4], d[5], d[6],
            (const int32_t *)(intptr_t)d[7], d[8], outs[m], d[9], d[9]);
        if (rc > 0)
            rc = 1 + m * P + rc - 1;
    }
done:
    free(idx);
    free(w);
    return rc;
}

/* Decisions (idx / w: [T, k] per module, bank slots; module m's at idx + m*smod, so smod = 0
 * shares one decision among all modules and smod = T*k gives each its own) mixed into M sibling
 * modules' outputs in one call: quiver_mixture_f32 per module. For routers whose decision is
 * the same at every module (fixed weights, retrieval, ArrowVote: smod = 0), and for a step's
 * decisions assembled from several routers (smod = T*k). desc and outs as for
 * quiver_gate_mixture_f32. Returns 0; -1 when a sort buffer cannot be allocated; 1 + m*T*k + p
 * for the first bad slot p of module m (every module is checked before the first is computed:
 * then nothing has been written).
 */
int64_t quiver_mixture_siblings_f32(
    const float *x, int64_t T, int64_t d_in, int64_t sxt,
    const int64_t *idx, const float *w, int64_t k, int64_t smod, int64_t M, const int64_t *desc,
    float *const *outs)
{
    const int64_t P = T * k;
    for (int64_t m = 0; m < M; ++m) {
        const int64_t *d = desc + m * QV_DESC, *im = idx + m * smod;
        const int32_t *ranks = (const int32_t *)(intptr_t)d[7];
        for (int64_t p = 0; p < P; ++p)
            if (im[p] < -1 || im[p] >= d[8] || (im[p] >= 0 && ranks[im[p]] > QV_MAX_RANK))
                return 1 + m * P + p;
    }
    for (int64_t m = 0; m < M; ++m) {
        const int64_t *d = desc + m * QV_DESC;
        const int64_t rc = quiver_mixture_f32(
            x, T, d_in, sxt, idx + m * smod, w + m * smod, k,
            (const float *)(intptr_t)d[0], d[1], d[2],
            (const float *)(intptr_t)d[3], d[4], d[5], d[6],
            (const int32_t *)(intptr_t)d[7], d[8], outs[m], d[9], d[9]);
        if (rc)
            return rc < 0 ? rc : 1 + m * P + rc - 1;
    }
    return 0;
}
