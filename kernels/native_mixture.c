/* The native CPU backend of the mixture-of-LoRAs delta (merge-after), float32, of the sparse
 * softmax of the linear routing gate that decides it (quiver_topk_softmax_f32), and of that
 * decision screened by an int8 pass or a bfloat16 GEMM for large gates (quiver_screened_gate_f32,
 * at the end).
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

/* One token and module: the top-k softmax over n values (vals[i] is column cols[i], ascending, or
 * column i when cols == NULL), skipping the columns pm marks absent; into it / wt: [k]. */
static void qv_topk_row(const float *vals, const int64_t *cols, int64_t n, const uint8_t *pm, int64_t absolute,
                        int64_t k, float temperature, int64_t *it, float *wt)
{
    float topv[QV_MAX_K];
    int64_t topi[QV_MAX_K];
    int64_t cnt = 0;
    for (int64_t i = 0; i < n; ++i) {  /* insertion into the sorted top-k */
        const int64_t e = cols ? cols[i] : i;
        if (pm && !pm[e])
            continue;
        const float v = absolute ? fabsf(vals[i]) : vals[i];
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

int64_t quiver_topk_softmax_f32(
    const float *sim, int64_t T, int64_t ssim, int64_t M, int64_t E, const uint8_t *present,
    int64_t absolute, int64_t k, float temperature, int64_t *idx, float *w)
{
    if (k > QV_MAX_K || k < 1)
        return 1;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t t = 0; t < T; ++t)
            qv_topk_row(sim + t * ssim + m * E, 0, E, present ? present + m * E : 0, absolute, k, temperature,
                        idx + (m * T + t) * k, w + (m * T + t) * k);
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

/* The decisions idx / w [M, T, k] (router positions) mapped to bank slots in place, every module
 * checked, then mixed: the part of quiver_gate_mixture_f32 after its top-k softmax. */
static int64_t qv_map_and_mix(const float *x, int64_t T, int64_t d_in, int64_t sxt, int64_t *idx, const float *w,
                              int64_t M, int64_t k, const int64_t *slots, const int64_t *desc, float *const *outs)
{
    const int64_t P = T * k;
    for (int64_t m = 0; m < M; ++m) {
        const int64_t *d = desc + m * QV_DESC;
        const int32_t *ranks = (const int32_t *)(intptr_t)d[7];
        for (int64_t p = 0; p < P; ++p) {
            int64_t *ip = idx + m * P + p;
            if (*ip >= 0 && slots)
                *ip = slots[*ip];
            if (*ip < -1 || *ip >= d[8] || (*ip >= 0 && ranks[*ip] > QV_MAX_RANK))
                return 1 + m * P + p;
        }
    }
    for (int64_t m = 0; m < M; ++m) {
        const int64_t *d = desc + m * QV_DESC;
        const int64_t rc = quiver_mixture_f32(
            x, T, d_in, sxt, idx + m * P, w + m * P, k,
            (const float *)(intptr_t)d[0], d[1], d[2],
            (const float *)(intptr_t)d[3], d[4], d[5], d[6],
            (const int32_t *)(intptr_t)d[7], d[8], outs[m], d[9], d[9]);
        if (rc)
            return rc < 0 ? rc : 1 + m * P + rc - 1;
    }
    return 0;
}

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
    int64_t rc = -1;
    if (idx && w) {
        quiver_topk_softmax_f32(sim, T, ssim, M, E, present, absolute, k, temperature, idx, w);
        rc = qv_map_and_mix(x, T, d_in, sxt, idx, w, M, k, slots, desc, outs);
    }
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

/* A linear gate's decision screened by a bfloat16 GEMM: what quiver_topk_softmax_f32 decides from
 * the float32 logits x_t · w_n, computing in float32 only the columns that can be among a
 * token's top k.
 *
 * At prefill sizes Arrow's logits GEMM over E = 256 adapters is a tenth of a SmolLM2 forward in
 * float32 arithmetic; on CPUs with bfloat16 matrix units (AMX) a bfloat16 GEMM does it several
 * times faster. What keeps the decision exact is a bound. With l_n the bfloat16 row, x~_t the
 * bfloat16 x_t, a_tn the GEMM's bfloat16 output, the caller's per-row
 *
 *     err_n  >= ||w_n - l_n|| + g_d ||l_n||        (g_d = d u / (1 - d u), u = 2^-24)
 *     norm_n >= (1 + g_d) ||l_n||
 *
 * (PyTorch's bfloat16 GEMM accumulates in float32, which a test checks: g_d ||x~_t|| ||l_n||
 * bounds that rounding, and ||x~_t|| <= ||x_t|| + dx_t), dx_t = ||x_t - x~_t|| (quiver_to_bf16)
 * and rel the output's relative rounding, with B the largest over the module's present columns of
 *
 *     b_tn = ||x_t|| err_n + ||x_t - x~_t|| norm_n + rel |a_tn|  >=  |x_t · w_n - a_tn|
 *
 * (Cauchy-Schwarz; Arrow's rows are unit vectors, so the b_tn hardly differ), and s = |.| when
 * absolute: k columns have a float32 logit >= K - B, K the k-th largest s(a_tn), and every column
 * with s(a_tn) < K - 2B has one below it. The others (the candidates) are computed from the
 * float32 rows, as any float32 dot product, and the top-k softmax is taken over them: the
 * columns and weights quiver_topk_softmax_f32 picks from the full float32 logits, up to the
 * rounding of those dot products. A token whose bound is not finite takes every column.
 *
 * Decoding steps have the opposite problem: a step of one token reads every prototype once, so
 * its gates are a stream over their bytes (153 MB per step at E = 256 on SmolLM2-135M). There
 * the first pass is an int8 copy with one scale per QV_I8_GROUP elements (qv_i8_logits): l_n is
 * the float32 row those scaled values are, a_tn = x_t · l_n accumulated in float32, x_t is not
 * rounded, and the same threshold applies with b_tn = ||x_t|| err_n (dx_t = 0, rel = 0).
 */
#include <float.h>
#include <string.h>

static inline float qv_bf16(uint16_t h)
{
    const uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define QV_VW 16
typedef __m512 qv_vec;
#define QV_ZERO() _mm512_setzero_ps()
#define QV_LOADF(p) _mm512_loadu_ps(p)
#define QV_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define QV_SUM(v) _mm512_reduce_add_ps(v)
#define QV_SET1(f) _mm512_set1_ps(f)
#define QV_ADD(a, b) _mm512_add_ps(a, b)
#define QV_MUL(a, b) _mm512_mul_ps(a, b)
#define QV_MAXV(a, b) _mm512_max_ps(a, b)
#define QV_MINV(a, b) _mm512_min_ps(a, b)
#define QV_ABS(a) _mm512_abs_ps(a)
#define QV_STORE(p, v) _mm512_storeu_ps(p, v)
#define QV_NOT_BELOW(a, b) ((uint64_t)_mm512_cmp_ps_mask(a, b, _CMP_NLT_UQ)) /* lane bits: !(a < b) */
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QV_VW 8
typedef __m256 qv_vec;
#define QV_ZERO() _mm256_setzero_ps()
#define QV_LOADF(p) _mm256_loadu_ps(p)
#define QV_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float QV_SUM(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define QV_SET1(f) _mm256_set1_ps(f)
#define QV_ADD(a, b) _mm256_add_ps(a, b)
#define QV_MUL(a, b) _mm256_mul_ps(a, b)
#define QV_MAXV(a, b) _mm256_max_ps(a, b)
#define QV_MINV(a, b) _mm256_min_ps(a, b)
#define QV_ABS(a) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a)
#define QV_STORE(p, v) _mm256_storeu_ps(p, v)
#define QV_NOT_BELOW(a, b) ((uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_NLT_UQ)))
#endif

static inline float qv_dot(const float *w, const float *xt, int64_t d)
{
    int64_t i = 0;
    float s = 0.0f;
#ifdef QV_VW
    qv_vec a0 = QV_ZERO(), a1 = QV_ZERO(), a2 = QV_ZERO(), a3 = QV_ZERO(); /* four chains: FMA latency */
    for (; i + 4 * QV_VW <= d; i += 4 * QV_VW) {
        a0 = QV_FMA(QV_LOADF(w + i), QV_LOADF(xt + i), a0);
        a1 = QV_FMA(QV_LOADF(w + i + QV_VW), QV_LOADF(xt + i + QV_VW), a1);
        a2 = QV_FMA(QV_LOADF(w + i + 2 * QV_VW), QV_LOADF(xt + i + 2 * QV_VW), a2);
        a3 = QV_FMA(QV_LOADF(w + i + 3 * QV_VW), QV_LOADF(xt + i + 3 * QV_VW), a3);
    }
    for (; i + QV_VW <= d; i += QV_VW)
        a0 = QV_FMA(QV_LOADF(w + i), QV_LOADF(xt + i), a0);
    s = QV_SUM(QV_ADD(QV_ADD(a0, a1), QV_ADD(a2, a3)));
#endif
    for (; i < d; ++i)
        s += w[i] * xt[i];
    return s;
}

/* x_t rounded to bfloat16 (round to nearest even, as PyTorch rounds) into xl, and dx_t =
 * ||x_t - xl_t|| (summed in double, returned in float32; its reader adds a margin): the input of
 * a bfloat16 GEMM and the exact size of its rounding, for the bound of quiver_screened_gate_f32.
 * A token that is not finite gets a dx that is not finite (its reader then takes every column). */
void quiver_to_bf16(const float *x, int64_t T, int64_t d, int64_t sxt, uint16_t *xl, float *dx)
{
    for (int64_t t = 0; t < T; ++t) {
        const float *xt = x + t * sxt;
        uint16_t *lt = xl + t * d;
        double ss = 0.0; /* in double: no overflow or underflow of the squares */
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < d; ++i) {
            uint32_t b;
            memcpy(&b, xt + i, sizeof b);
            const uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
            lt[i] = (uint16_t)r;
            const double diff = (double)xt[i] - (double)qv_bf16((uint16_t)r);
            ss += diff * diff;
        }
        dx[t] = (float)sqrt(ss);
    }
}

#ifdef QV_VW
#define QV_VTOPK 8 /* the vector threshold keeps k lane-wise maxima; larger k take the scalar loop */
#endif

/* v into the k largest values seen so far (topv, descending; *cnt of them). */
static inline void qv_keep_top(float *topv, int64_t *cnt, int64_t k, float v)
{
    if (*cnt == k && !(v > topv[k - 1]))
        return;
    int64_t pos = *cnt < k ? (*cnt)++ : k - 1;
    while (pos > 0 && topv[pos - 1] < v) {
        topv[pos] = topv[pos - 1];
        --pos;
    }
    topv[pos] = v;
}

/* The threshold K - 2B of one token and module (-inf: every present column is a candidate). */
static float qv_threshold(const float *at, int64_t E, const uint8_t *pm, int64_t absolute, int64_t k,
                          float xb, float emax, float nmax, float rel, float dxt)
{
    float topv[QV_MAX_K], amax = 0.0f;
    int64_t cnt = 0, e = 0;
#ifdef QV_VW
    if (!pm && k <= QV_VTOPK && E >= QV_VW) { /* lane-wise k largest (a compare-exchange chain), merged below */
        qv_vec top[QV_VTOPK], am = QV_SET1(0.0f);
        for (int64_t j = 0; j < k; ++j)
            top[j] = QV_SET1(-INFINITY);
        if (k <= 2) { /* the usual top-k, in registers */
            qv_vec t0 = top[0], t1 = top[k - 1];
            for (; e + QV_VW <= E; e += QV_VW) {
                const qv_vec a = QV_LOADF(at + e), aa = QV_ABS(a), v = absolute ? aa : a;
                am = QV_MAXV(am, aa);
                if (k == 2)
                    t1 = QV_MAXV(t1, QV_MINV(t0, v));
                t0 = QV_MAXV(t0, v);
            }
            top[k - 1] = t1; /* k = 1: t1 is no column */
            top[0] = t0;
        }
        for (; e + QV_VW <= E; e += QV_VW) {
            const qv_vec a = QV_LOADF(at + e), aa = QV_ABS(a);
            qv_vec v = absolute ? aa : a;
            am = QV_MAXV(am, aa);
            for (int64_t j = 0; j < k; ++j) {
                const qv_vec hi = QV_MAXV(top[j], v);
                v = QV_MINV(top[j], v);
                top[j] = hi;
            }
        }
        float lanes[QV_VTOPK * QV_VW], aml[QV_VW];
        QV_STORE(aml, am);
        for (int64_t i = 0; i < QV_VW; ++i)
            amax = fmaxf(amax, aml[i]);
        for (int64_t j = 0; j < k; ++j)
            QV_STORE(lanes + j * QV_VW, top[j]);
        for (int64_t i = 0; i < k * QV_VW; ++i)
            qv_keep_top(topv, &cnt, k, lanes[i]);
        if (!(topv[k - 1] > -INFINITY))
            cnt = 0, e = 0; /* fewer than k finite lane values (-inf lanes are no columns): count again below */
    }
#endif
    for (; e < E; ++e) { /* the k largest s(a) over the present columns, and max |a| */
        if (pm && !pm[e])
            continue;
        amax = fmaxf(amax, fabsf(at[e]));
        qv_keep_top(topv, &cnt, k, absolute ? fabsf(at[e]) : at[e]);
    }
    const float B = xb * emax + dxt * nmax + rel * amax;
    if (cnt < k || !isfinite(B) || !isfinite(topv[k - 1]))
        return -INFINITY;
    return topv[k - 1] - 2.0f * B - 4.0f * FLT_EPSILON * (fabsf(topv[k - 1]) + 2.0f * B);
}

/* The candidates of one token and module (present, s(a) not below thr), in ascending column
 * order, with their float32 logits: cv / ci. Returns their count. */
static int64_t qv_candidates(const float *at, int64_t E, const uint8_t *pm, int64_t absolute, float thr,
                             const float *xt, const float *rows, int64_t d, float *cv, int64_t *ci)
{
    int64_t n = 0, e = 0;
#ifdef QV_VW
    if (!pm) {
        const qv_vec tv = QV_SET1(thr);
        for (; e + QV_VW <= E; e += QV_VW) {
            uint64_t bits = QV_NOT_BELOW(absolute ? QV_ABS(QV_LOADF(at + e)) : QV_LOADF(at + e), tv);
            while (bits) {
                ci[n++] = e + __builtin_ctzll(bits);
                bits &= bits - 1;
            }
        }
    }
#endif
    for (; e < E; ++e) {
        if (pm && !pm[e])
            continue;
        const float v = absolute ? fabsf(at[e]) : at[e];
        if (!(v < thr))
            ci[n++] = e;
    }
    for (int64_t j = 0; j < n; ++j) /* the rows' lines requested together: in a decoding step they are cold */
        for (int64_t i = 0; i < d; i += 16)
            __builtin_prefetch(rows + ci[j] * d + i);
    for (int64_t j = 0; j < n; ++j)
        cv[j] = qv_dot(rows + ci[j] * d, xt, d);
    return n;
}

#ifdef QV_VW
#if QV_VW == 16
#define QV_LOADI8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#else
#define QV_LOADI8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#endif
#endif
#define QV_I8_TB 8     /* tokens per block of the int8 screen: each row of q is read once per block */
#define QV_I8_GROUP 16 /* elements per scale of the int8 screen */

/* s + sum over i in [from, d) of x[i] l_n[i], one product and sum at a time: the part of an int8
 * row's logit that no vector covers (all of it without a vector unit). */
static inline float qv_i8_tail(const int8_t *qn, const float *sn, const float *x, int64_t from, int64_t d, float s)
{
    for (int64_t i = from; i < d; ++i) {
        const float l = (float)qn[i] * sn[i / QV_I8_GROUP];
        s += l * x[i];
    }
    return s;
}

/* The int8 screen's logits of tb <= QV_I8_TB tokens (x, row stride sxt) over N rows of d:
 * out[j * N + n] = sum_i x[j, i] l[n, i], float32 products and sums, where
 * l[n, i] = float32(q[n, i] * qs[n, i / QV_I8_GROUP]) (qs: [N, G], G = ceil(d / QV_I8_GROUP)),
 * the values the caller's bound is computed for. One token reads 4 rows at a time and
 * prefetches the next 4 (a decoding step: this loop runs at the memory's speed, over about a
 * third of the float32 rows' bytes); a block of tokens reads each row once for all of them. */
static void qv_i8_logits(const float *x, int64_t tb, int64_t d, int64_t sxt, const int8_t *q, const float *qs,
                         int64_t N, float *out)
{
    const int64_t G = (d + QV_I8_GROUP - 1) / QV_I8_GROUP;
    int64_t n = 0;
#ifdef QV_VW
    if (tb == 1) {
        for (; n + 4 <= N; n += 4) {
            const int8_t *q0 = q + n * d;
            const float *s0 = qs + n * G;
            if (n + 8 <= N)
                for (int64_t p = 0; p < 4 * d; p += 64)
                    __builtin_prefetch(q0 + 4 * d + p);
            qv_vec a0 = QV_ZERO(), a1 = QV_ZERO(), a2 = QV_ZERO(), a3 = QV_ZERO();
            int64_t i = 0;
            for (; i + QV_VW <= d; i += QV_VW) {
                const qv_vec xv = QV_LOADF(x + i);
                const int64_t g = i / QV_I8_GROUP;
                a0 = QV_FMA(QV_MUL(QV_LOADI8(q0 + i), QV_SET1(s0[g])), xv, a0);
                a1 = QV_FMA(QV_MUL(QV_LOADI8(q0 + d + i), QV_SET1(s0[G + g])), xv, a1);
                a2 = QV_FMA(QV_MUL(QV_LOADI8(q0 + 2 * d + i), QV_SET1(s0[2 * G + g])), xv, a2);
                a3 = QV_FMA(QV_MUL(QV_LOADI8(q0 + 3 * d + i), QV_SET1(s0[3 * G + g])), xv, a3);
            }
            const float s[4] = {QV_SUM(a0), QV_SUM(a1), QV_SUM(a2), QV_SUM(a3)};
            for (int64_t j = 0; j < 4; ++j)
                out[n + j] = qv_i8_tail(q0 + j * d, s0 + j * G, x, i, d, s[j]);
        }
    } else {
        const float *xs[QV_I8_TB]; /* a short block repeats its last token (computed, not stored) */
        for (int64_t j = 0; j < QV_I8_TB; ++j)
            xs[j] = x + (j < tb ? j : tb - 1) * sxt;
        for (; n < N; ++n) {
            const int8_t *qn = q + n * d;
            const float *sn = qs + n * G;
            if (n + 2 < N)
                for (int64_t p = 0; p < d; p += 64)
                    __builtin_prefetch(qn + 2 * d + p);
            qv_vec a[QV_I8_TB];
            for (int64_t j = 0; j < QV_I8_TB; ++j)
                a[j] = QV_ZERO();
            int64_t i = 0;
            for (; i + QV_VW <= d; i += QV_VW) {
                const qv_vec wv = QV_MUL(QV_LOADI8(qn + i), QV_SET1(sn[i / QV_I8_GROUP]));
                for (int64_t j = 0; j < QV_I8_TB; ++j)
                    a[j] = QV_FMA(wv, QV_LOADF(xs[j] + i), a[j]);
            }
            for (int64_t j = 0; j < tb; ++j)
                out[j * N + n] = qv_i8_tail(qn, sn, xs[j], i, d, QV_SUM(a[j]));
        }
    }
#endif
    for (; n < N; ++n) /* no vector unit (the runtime then leaves this screen off), and the last rows */
        for (int64_t j = 0; j < tb; ++j)
            out[j * N + n] = qv_i8_tail(q + n * d, qs + n * G, x + j * sxt, 0, d, 0.0f);
}

/* The elements per scale of the int8 screen (the caller builds its scales to match). */
int64_t quiver_i8_group(void)
{
    return QV_I8_GROUP;
}

/* Whether this build has the vector paths the screens rely on for speed (QV_VW lanes; 0: none). */
int64_t quiver_vector_width(void)
{
#ifdef QV_VW
    return QV_VW;
#else
    return 0;
#endif
}

/* The screened decision, into idx / w [M, T, k] (router positions, as quiver_topk_softmax_f32),
 * from one of two first passes (exactly one given):
 * - low_sim: [T, N] bfloat16 with row stride slow, the GEMM of quiver_to_bf16's x~ and the
 *   bfloat16 rows, with its dx and rel;
 * - q: [N, d] int8 with scales qs per QV_I8_GROUP elements (qv_i8_logits): the logits of the
 *   float32 rows l_n the scaled int8 values are, computed here; x is not rounded (dx = NULL), so
 *   b_tn = ||x_t|| err_n with err_n >= ||w_n - l_n|| + g_d ||l_n|| (rel may be 0).
 * rows: [N, d] float32; err, norm: [N] (norm may be NULL when dx is); N = M * E.
 * *exact += the candidates computed in float32. Returns 0, -1 when a buffer cannot be allocated,
 * -2 when k is outside [1, QV_MAX_K], -3 when not exactly one first pass is given (in these
 * cases nothing has been written). */
int64_t quiver_screened_gate_f32(
    const float *x, int64_t T, int64_t d, int64_t sxt, const uint16_t *low_sim, int64_t slow, const int8_t *q,
    const float *qs, const float *rows, const float *err, const float *norm, const float *dx, float rel, int64_t M,
    int64_t E, const uint8_t *present, int64_t absolute, int64_t k, float temperature, int64_t *idx, float *w,
    int64_t *exact)
{
    if (k > QV_MAX_K || k < 1)
        return -2;
    if (!low_sim == !q)
        return -3;
    const int64_t N = M * E, TB = q ? QV_I8_TB : 1;
    float *at = malloc((size_t)(TB * N + E + 2 * M) * sizeof(float)); /* a block's logits, then cv, emax, nmax */
    int64_t *ci = malloc((size_t)(E + 1) * sizeof(int64_t));
    if (!at || !ci) {
        free(at);
        free(ci);
        return -1;
    }
    float *cv = at + TB * N, *emax = cv + E, *nmax = emax + M;
    for (int64_t m = 0; m < M; ++m) { /* B's per-row parts: the largest over the present columns */
        const uint8_t *pm = present ? present + m * E : 0;
        emax[m] = nmax[m] = 0.0f;
        for (int64_t e = 0; e < E; ++e)
            if (!pm || pm[e]) {
                emax[m] = fmaxf(emax[m], err[m * E + e]);
                nmax[m] = norm ? fmaxf(nmax[m], norm[m * E + e]) : 0.0f;
            }
    }
    int64_t count = 0;
    for (int64_t t0 = 0; t0 < T; t0 += TB) {
        const int64_t tb = T - t0 < TB ? T - t0 : TB;
        if (q)
            qv_i8_logits(x + t0 * sxt, tb, d, sxt, q, qs, N, at);
        for (int64_t t = t0; t < t0 + tb; ++t) {
            const float *xt = x + t * sxt;
            float *a = at + (t - t0) * N;
            if (!q) {
                const uint16_t *lt = low_sim + t * slow;
                for (int64_t n = 0; n < N; ++n)
                    a[n] = qv_bf16(lt[n]);
            }
            double ss = 0.0; /* in double: no overflow or underflow of the squares */
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < d; ++i)
                ss += (double)xt[i] * xt[i];
            const float xb = (float)sqrt(ss) * 1.0001f; /* the norm's own rounding, with room */
            const float dxt = dx ? dx[t] * 1.0001f : 0.0f;
            for (int64_t m = 0; m < M; ++m) {
                const uint8_t *pm = present ? present + m * E : 0;
                const float thr = qv_threshold(a + m * E, E, pm, absolute, k, xb, emax[m], nmax[m], rel, dxt);
                const int64_t n = qv_candidates(a + m * E, E, pm, absolute, thr, xt, rows + m * E * d, d, cv, ci);
                qv_topk_row(cv, ci, n, 0, absolute, k, temperature, idx + (m * T + t) * k, w + (m * T + t) * k);
                count += n;
            }
        }
    }
    free(at);
    free(ci);
    if (exact)
        *exact += count;
    return 0;
}

/* quiver_screened_gate_f32 and the mixture it decides, in one call: quiver_gate_mixture_f32 with
 * the screened decision in place of the top-k softmax of given logits. Returns as
 * quiver_gate_mixture_f32. */
int64_t quiver_screened_gate_mixture_f32(
    const float *x, int64_t T, int64_t d_in, int64_t sxt, const uint16_t *low_sim, int64_t slow,
    const int8_t *q, const float *qs, const float *rows, const float *err, const float *norm, const float *dx,
    float rel, int64_t M, int64_t E, const uint8_t *present, int64_t absolute, int64_t k, float temperature,
    const int64_t *slots, const int64_t *desc, float *const *outs, int64_t *exact)
{
    if (k > QV_MAX_K || k < 1)
        return -2;
    const int64_t P = T * k;
    int64_t *idx = malloc((size_t)(M * P > 0 ? M * P : 1) * sizeof(int64_t));
    float *w = malloc((size_t)(M * P > 0 ? M * P : 1) * sizeof(float));
    int64_t rc = -1;
    if (idx && w) {
        rc = quiver_screened_gate_f32(x, T, d_in, sxt, low_sim, slow, q, qs, rows, err, norm, dx, rel, M, E,
                                      present, absolute, k, temperature, idx, w, exact);
        if (!rc)
            rc = qv_map_and_mix(x, T, d_in, sxt, idx, w, M, k, slots, desc, outs);
    }
    free(idx);
    free(w);
    return rc;
}
