/* The fused warped-RK4 solve of a learned pfODE and its discrete adjoint, for one REAL type;
 * and the same with the exact log-determinant (rk4_logdet_forward / rk4_logdet_backward).
 *
 * Included twice by _fused.c (float and double); see pyro_inflow/solvers/fused.py for the
 * layout of `ints` and `P`, which Python packs once per (flow, grid, dtype, direction).
 *
 * The network is a chain of values v_0 .. v_U (each a row of width nout_pad per point):
 *   v_0 = W_0 x + C_0(stage)
 *   v_u = W_u silu(v_{u-1}) + C_u(stage) [+ v_{res_u}]      u = 1 .. U
 * and the velocity is k = mult(stage) * v_U. Both library backbones (MLP, ResidualMLP) are
 * such chains, with every time feature and bias folded into C_u(stage).
 */

typedef REAL FN(vec) __attribute__((vector_size(VBYTES), aligned(sizeof(REAL))));
#define VL ((int)(VBYTES / sizeof(REAL)))

typedef struct {
    int64_t nin, nin_pad, nout, nout_pad, res, off_wt, off_w, off_c;
} FN(unit);

/* exp for the sigmoid: Cody-Waite range reduction and a polynomial; loops over it vectorize.
 * NaN stays NaN (comparisons, not fmin/fmax, do the clamping). */
static inline REAL FN(exp)(REAL x)
{
    const REAL hi = IS_F32 ? (REAL)88.3 : (REAL)708.0;
    x = x > hi ? hi : x;
    x = x < -hi ? -hi : x;
    /* round to nearest by the 1.5 * 2^mantissa trick (floor() would block vectorization) */
    REAL n = (x * (REAL)1.4426950408889634 + ROUNDER) - ROUNDER;
    REAL r = x - n * (REAL)0.693145751953125 - n * (REAL)1.428606820309417232e-6;
    REAL p;
    if (IS_F32) {
        p = (REAL)1.9875691500e-4;
        p = p * r + (REAL)1.3981999507e-3;
        p = p * r + (REAL)8.3334519073e-3;
        p = p * r + (REAL)4.1665795894e-2;
        p = p * r + (REAL)1.6666665459e-1;
        p = p * r + (REAL)5.0000001201e-1;
        p = p * r * r + r + (REAL)1.0;
    } else {
        p = (REAL)(1.0 / 479001600.0);
        p = p * r + (REAL)(1.0 / 39916800.0);
        p = p * r + (REAL)(1.0 / 3628800.0);
        p = p * r + (REAL)(1.0 / 362880.0);
        p = p * r + (REAL)(1.0 / 40320.0);
        p = p * r + (REAL)(1.0 / 5040.0);
        p = p * r + (REAL)(1.0 / 720.0);
        p = p * r + (REAL)(1.0 / 120.0);
        p = p * r + (REAL)(1.0 / 24.0);
        p = p * r + (REAL)(1.0 / 6.0);
        p = p * r + (REAL)0.5;
        p = p * r * r + r + (REAL)1.0;
    }
    /* 2^n in two factors, so n down to -2 hi / ln 2 stays normal-range */
    INT_T e = (INT_T)n;
    INT_T e1 = e >> 1, e2 = e - e1;
    union { UINT_T i; REAL f; } s1, s2;
    s1.i = (UINT_T)(e1 + EXP_BIAS) << MANT_BITS;
    s2.i = (UINT_T)(e2 + EXP_BIAS) << MANT_BITS;
    return p * s1.f * s2.f;
}

/* out[b, j] (+)= sum_{i < nin} a[b, i] wt[i, j] for j < nout_pad (a multiple of VL).
 * Blocks of points by vectors of outputs (8 by 2, 4 by 4, or 2 by 8 for one or two points)
 * stay in registers across i. */
#define GEMM_BLOCK(NB, NV)                                                                   \
    do {                                                                                     \
        FN(vec) acc[NB][NV];                                                                 \
        for (int bb = 0; bb < NB; bb++)                                                      \
            for (int v = 0; v < NV; v++)                                                     \
                acc[bb][v] = accumulate ? *(const FN(vec) *)(out + (b0 + bb) * ldo + j0 +  \
                                                             v * VL)                         \
                                        : (FN(vec)){0};                                      \
        for (int64_t i = 0; i < nin; i++) {                                                  \
            const REAL *w = wt + i * ldw + j0;                                               \
            FN(vec) wv[NV];                                                                  \
            for (int v = 0; v < NV; v++) wv[v] = *(const FN(vec) *)(w + v * VL);             \
            for (int bb = 0; bb < NB; bb++) {                                                \
                REAL s = a[(b0 + bb) * lda + i];                                             \
                for (int v = 0; v < NV; v++) acc[bb][v] += s * wv[v];                        \
            }                                                                                \
        }                                                                                    \
        for (int bb = 0; bb < NB; bb++)                                                      \
            for (int v = 0; v < NV; v++)                                                     \
                *(FN(vec) *)(out + (b0 + bb) * ldo + j0 + v * VL) = acc[bb][v];              \
    } while (0)

static void FN(gemm)(int64_t B, int64_t nin, int64_t nout_pad, const REAL *restrict a,
                     int64_t lda, const REAL *restrict wt, int64_t ldw, REAL *restrict out,
                     int64_t ldo, int accumulate)
{
    int64_t b0 = 0;
    for (; b0 + 8 <= B; b0 += 8) {  /* eight points: each weight row read once for all */
        int64_t j0 = 0;
        for (; j0 + 2 * VL <= nout_pad; j0 += 2 * VL) GEMM_BLOCK(8, 2);
        for (; j0 < nout_pad; j0 += VL) GEMM_BLOCK(8, 1);
    }
    for (; b0 < B; b0 += 4) {
        int64_t nb = B - b0 < 4 ? B - b0 : 4;
        int64_t j0 = 0;
        if (nb <= 2) {  /* few points: 8 vectors of outputs keep enough FMAs in flight */
            for (; j0 + 8 * VL <= nout_pad; j0 += 8 * VL) {
                if (nb == 2) GEMM_BLOCK(2, 8); else GEMM_BLOCK(1, 8);
            }
        }
        for (; j0 + 4 * VL <= nout_pad; j0 += 4 * VL) {
            switch (nb) {
            case 4: GEMM_BLOCK(4, 4); break;
            case 3: GEMM_BLOCK(3, 4); break;
            case 2: GEMM_BLOCK(2, 4); break;
            default: GEMM_BLOCK(1, 4); break;
            }
        }
        for (; j0 < nout_pad; j0 += VL) {
            switch (nb) {
            case 4: GEMM_BLOCK(4, 1); break;
            case 3: GEMM_BLOCK(3, 1); break;
            case 2: GEMM_BLOCK(2, 1); break;
            default: GEMM_BLOCK(1, 1); break;
            }
        }
    }
}

typedef struct {
    int64_t D, D_pad, U, N, off_mult, act;  /* act: sum of nout_pad over v_0 .. v_{U-1} */
    int64_t offs[MAX_UNITS];                /* where v_u starts in a B x act block, / B */
    const FN(unit) *units;                  /* U + 1 of them */
    const REAL *P;
    REAL h;
} FN(net);

static void FN(setup)(FN(net) *net, const int64_t *ints, const REAL *P)
{
    net->D = ints[0];
    net->D_pad = ints[1];
    net->U = ints[2] - 1;
    net->N = ints[3];
    net->off_mult = ints[4];
    net->units = (const FN(unit) *)(ints + 5);
    net->P = P;
    net->h = (REAL)1 / (REAL)net->N;
    net->act = 0;
    for (int64_t u = 0; u < net->U; u++) {
        net->offs[u] = net->act;
        net->act += net->units[u].nout_pad;
    }
}

/* k = velocity at x (B rows of D_pad) at `stage`. `vals` receives v_0 .. v_{U-1} (B x act,
 * unit-major: unit u's block at B offs[u]); with `dsv` (same layout), also silu'(v), which the
 * adjoint then reads instead of computing the sigmoid again; `a` and `out` are scratch
 * (B x max width). */
static void FN(eval)(const FN(net) *net, int64_t stage, int64_t B, const REAL *x, REAL *k,
                     REAL *vals, REAL *dsv, REAL *a, REAL *out)
{
    const FN(unit) *us = net->units;
    const REAL *P = net->P;
    for (int64_t u = 0; u <= net->U; u++) {
        const FN(unit) *un = us + u;
        int64_t w = un->nout_pad;
        REAL *dst = u < net->U ? vals + B * net->offs[u] : out;
        const REAL *c = P + un->off_c + stage * w;
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < w; j++) dst[b * w + j] = c[j];
        if (un->res >= 0) {
            const REAL *src = vals + B * net->offs[un->res];
            for (int64_t i = 0; i < B * w; i++) dst[i] += src[i];
        }
        if (u == 0) {
            FN(gemm)(B, un->nin, w, x, net->D_pad, P + un->off_wt, w, dst, w, 1);
        } else {
            int64_t pw = us[u - 1].nout_pad;
            const REAL *restrict pv = vals + B * net->offs[u - 1];
            REAL *restrict pa = a;
            if (dsv) {
                REAL *restrict pd = dsv + B * net->offs[u - 1];
                for (int64_t i = 0; i < B * pw; i++) {
                    REAL v = pv[i], s = (REAL)1 / ((REAL)1 + FN(exp)(-v));
                    pa[i] = v * s;
                    pd[i] = s * ((REAL)1 + v * ((REAL)1 - s));
                }
            } else {
                for (int64_t i = 0; i < B * pw; i++)
                    pa[i] = pv[i] / ((REAL)1 + FN(exp)(-pv[i]));
            }
            FN(gemm)(B, un->nin, w, a, pw, P + un->off_wt, w, dst, w, 1);
        }
    }
    const REAL *m = P + net->off_mult + stage * net->D_pad;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < net->D_pad; j++)
            k[b * net->D_pad + j] = m[j] * out[b * net->D_pad + j];
}

/* g_x (B x D_pad) = J(x)^T g_k for the evaluation whose silu'(v) are `ds` (eval's `dsv`).
 * `gv` is scratch (B x act), `gout` (B x D_pad) and `tmp` (B x max width) too. */
static void FN(vjp)(const FN(net) *net, int64_t stage, int64_t B, const REAL *ds,
                    const REAL *gk, REAL *gx, REAL *gv, REAL *gout, REAL *tmp)
{
    const FN(unit) *us = net->units;
    const REAL *P = net->P;
    int64_t U = net->U, Dp = net->D_pad;
    const REAL *m = P + net->off_mult + stage * Dp;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < Dp; j++) gout[b * Dp + j] = m[j] * gk[b * Dp + j];
    for (int64_t i = 0; i < B * net->act; i++) gv[i] = 0;
    const int64_t *offs = net->offs;
    for (int64_t u = U; u >= 1; u--) {
        const FN(unit) *un = us + u;
        int64_t w = un->nout_pad;
        const REAL *g = u == U ? gout : gv + B * offs[u];
        if (un->res >= 0) {
            REAL *dr = gv + B * offs[un->res];
            for (int64_t i = 0; i < B * w; i++) dr[i] += g[i];
        }
        int64_t pw = us[u - 1].nout_pad;
        /* tmp = W_u^T g: rows of W_u (nout x nin_pad) weighted by g */
        FN(gemm)(B, un->nout, pw, g, w, P + un->off_w, pw, tmp, pw, 0);
        const REAL *restrict d = ds + B * offs[u - 1];
        REAL *restrict dv = gv + B * offs[u - 1];
        const REAL *restrict tm = tmp;
        for (int64_t i = 0; i < B * pw; i++) dv[i] += tm[i] * d[i];
    }
    FN(gemm)(B, us[0].nout, Dp, gv, us[0].nout_pad, P + us[0].off_w, Dp, gx, Dp, 0);
}

static int64_t FN(maxwidth)(const FN(net) *net)
{
    int64_t m = net->D_pad;
    for (int64_t u = 0; u <= net->U; u++)
        if (net->units[u].nout_pad > m) m = net->units[u].nout_pad;
    return m;
}

/* The solve: y0 (B x D_pad) -> y1 (B x D_pad), err (B, RMS over the D coordinates of the
 * embedded error estimate). With `store` (4 N slots of B act: silu' of the network's values
 * at each stage), keeps what the adjoint needs; the values themselves stay in scratch.
 * Returns 0, or -1 when out of memory. */
int FN(rk4_forward)(const int64_t *ints, const REAL *P, int64_t B, const REAL *y0, REAL *y1,
                    REAL *err, REAL *store)
{
    FN(net) net;
    FN(setup)(&net, ints, P);
    int64_t Dp = net.D_pad, S = B * Dp, A = B * net.act, W = B * FN(maxwidth)(&net);
    REAL *buf = (REAL *)malloc(sizeof(REAL) * (8 * S + A + 2 * W));
    if (!buf) return -1;
    REAL *k1 = buf, *k2 = k1 + S, *k3 = k2 + S, *k4 = k3 + S, *k5 = k4 + S, *x = k5 + S;
    REAL *y = x + S, *e = y + S, *vals = e + S, *a = vals + A, *out = a + W;
    REAL h = net.h;
    for (int64_t i = 0; i < S; i++) { y[i] = y0[i]; e[i] = 0; }
#define DSLOT(q) (store ? store + (q) * A : NULL)
    FN(eval)(&net, 0, B, y, k1, vals, DSLOT(0), a, out);
    for (int64_t n = 0; n < net.N; n++) {
        int64_t s0 = 3 * n;
        for (int64_t i = 0; i < S; i++) x[i] = y[i] + (REAL)0.5 * h * k1[i];
        FN(eval)(&net, s0 + 1, B, x, k2, vals, DSLOT(4 * n + 1), a, out);
        for (int64_t i = 0; i < S; i++) x[i] = y[i] + (REAL)0.5 * h * k2[i];
        FN(eval)(&net, s0 + 1, B, x, k3, vals, DSLOT(4 * n + 2), a, out);
        for (int64_t i = 0; i < S; i++) x[i] = y[i] + h * k3[i];
        FN(eval)(&net, s0 + 2, B, x, k4, vals, DSLOT(4 * n + 3), a, out);
        for (int64_t i = 0; i < S; i++)
            y[i] = y[i] + (h / 6) * (k1[i] + 2 * k2[i] + 2 * k3[i] + k4[i]);
        int last = n + 1 == net.N;
        /* the end-point slope: the next step's k1, and the embedded estimate's fifth stage */
        FN(eval)(&net, s0 + 2, B, y, k5, vals, last ? NULL : DSLOT(4 * n + 4), a, out);
        for (int64_t i = 0; i < S; i++) {
            REAL d = k4[i] - k5[i];
            e[i] += (h / 6) * (d < 0 ? -d : d);
        }
        REAL *t = k1; k1 = k5; k5 = t;
    }
#undef DSLOT
    for (int64_t b = 0; b < B; b++) {
        REAL acc = 0;
        for (int64_t j = 0; j < net.D; j++) acc += e[b * Dp + j] * e[b * Dp + j];
        err[b] = (REAL)__builtin_sqrt((double)(acc / (REAL)net.D));
        for (int64_t j = 0; j < Dp; j++) y1[b * Dp + j] = y[b * Dp + j];
    }
    free(buf);
    return 0;
}

/* The discrete adjoint of rk4_forward: gy0 = (d y1 / d y0)^T gy1, exactly for the grid. */
int FN(rk4_backward)(const int64_t *ints, const REAL *P, int64_t B, const REAL *store,
                     const REAL *gy1, REAL *gy0)
{
    FN(net) net;
    FN(setup)(&net, ints, P);
    int64_t Dp = net.D_pad, S = B * Dp, A = B * net.act, W = B * FN(maxwidth)(&net);
    REAL *buf = (REAL *)malloc(sizeof(REAL) * (7 * S + A + W));
    if (!buf) return -1;
    REAL *yb = buf, *acc = yb + S, *kb1 = acc + S, *kb2 = kb1 + S, *kb3 = kb2 + S;
    REAL *u = kb3 + S, *gout = u + S, *gv = gout + S, *tmp = gv + A;
    REAL h = net.h;
    for (int64_t i = 0; i < S; i++) yb[i] = gy1[i];
    for (int64_t n = net.N - 1; n >= 0; n--) {
        int64_t s0 = 3 * n;
        const REAL *base = store + 4 * n * A;  /* silu' of stage 0's values */
        for (int64_t i = 0; i < S; i++) {
            acc[i] = yb[i];
            kb1[i] = (h / 6) * yb[i];
            kb2[i] = (h / 3) * yb[i];
            kb3[i] = (h / 3) * yb[i];
            u[i] = (h / 6) * yb[i];  /* kb4 */
        }
        /* k4 = f(y + h k3) */
        FN(vjp)(&net, s0 + 2, B, base + 3 * A, u, u, gv, gout, tmp);
        for (int64_t i = 0; i < S; i++) { acc[i] += u[i]; kb3[i] += h * u[i]; }
        /* k3 = f(y + h/2 k2) */
        FN(vjp)(&net, s0 + 1, B, base + 2 * A, kb3, u, gv, gout, tmp);
        for (int64_t i = 0; i < S; i++) { acc[i] += u[i]; kb2[i] += (REAL)0.5 * h * u[i]; }
        /* k2 = f(y + h/2 k1) */
        FN(vjp)(&net, s0 + 1, B, base + 1 * A, kb2, u, gv, gout, tmp);
        for (int64_t i = 0; i < S; i++) { acc[i] += u[i]; kb1[i] += (REAL)0.5 * h * u[i]; }
        /* k1 = f(y) */
        FN(vjp)(&net, s0, B, base, kb1, u, gv, gout, tmp);
        for (int64_t i = 0; i < S; i++) yb[i] = acc[i] + u[i];
    }
    for (int64_t i = 0; i < S; i++) gy0[i] = yb[i];
    free(buf);
    return 0;
}

/* ---- the log-determinant: the trace of dk/dx by forward-mode tangents, and its adjoint ----
 *
 * For each point and each of the D basis vectors e_i, the tangent of the chain
 *   t_0 = W_0 e_i,   t_u = W_u (silu'(v_{u-1}) t_{u-1}) [+ t_{res_u}]
 * gives column i of dv_U/dx, so tr(dk/dx) = sum_i mult_i t_U[i]. Tangents are rows
 * (b D + i) of a (B D) x width block, laid out like the values. */

static inline REAL FN(sig)(REAL v) { return (REAL)1 / ((REAL)1 + FN(exp)(-v)); }

/* tans (B D x act) <- tangents of the evaluation whose silu'(v) are `ds` (eval's `dsv`);
 * tr (B) <- trace. `ta` (B D x max width) and `tout` (B D x D_pad) are scratch. */
static void FN(tangent)(const FN(net) *net, int64_t stage, int64_t B, const REAL *ds,
                        REAL *tans, REAL *tr, REAL *ta, REAL *tout)
{
    const FN(unit) *us = net->units;
    const REAL *P = net->P;
    int64_t D = net->D, BD = B * D, Dp = net->D_pad;
    for (int64_t u = 0; u <= net->U; u++) {
        const FN(unit) *un = us + u;
        int64_t w = un->nout_pad;
        REAL *dst = u < net->U ? tans + BD * net->offs[u] : tout;
        if (u == 0) {  /* t_0 = W_0 e_i: row i of W_0^T, whatever the point */
            for (int64_t b = 0; b < B; b++)
                for (int64_t i = 0; i < D; i++)
                    for (int64_t j = 0; j < w; j++)
                        dst[(b * D + i) * w + j] = P[un->off_wt + i * w + j];
            continue;
        }
        if (un->res >= 0) {
            const REAL *src = tans + BD * net->offs[un->res];
            for (int64_t i = 0; i < BD * w; i++) dst[i] = src[i];
        }
        int64_t pw = us[u - 1].nout_pad;
        const REAL *restrict pd = ds + B * net->offs[u - 1];
        const REAL *restrict pt = tans + BD * net->offs[u - 1];
        REAL *restrict pa = ta;
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < D; i++)
                for (int64_t j = 0; j < pw; j++)
                    pa[(b * D + i) * pw + j] = pd[b * pw + j] * pt[(b * D + i) * pw + j];
        FN(gemm)(BD, un->nin, w, ta, pw, P + un->off_wt, w, dst, w, un->res >= 0);
    }
    const REAL *m = P + net->off_mult + stage * Dp;
    for (int64_t b = 0; b < B; b++) {
        REAL acc = 0;
        for (int64_t i = 0; i < D; i++) acc += m[i] * tout[(b * D + i) * Dp + i];
        tr[b] = acc;
    }
}

/* g_x (B x D_pad) = J^T g_k + tbar grad_x tr(dk/dx) for the evaluation whose values and
 * tangents are `vals`, `tans`. Scratch: gv (B x act), tgv (B D x act), gout (B x D_pad),
 * tgout (B D x D_pad), tmp (B x max width), ttmp (B D x max width). */
static void FN(vjp_tan)(const FN(net) *net, int64_t stage, int64_t B, const REAL *vals,
                        const REAL *tans, const REAL *gk, const REAL *tbar, REAL *gx,
                        REAL *gv, REAL *tgv, REAL *gout, REAL *tgout, REAL *tmp, REAL *ttmp)
{
    const FN(unit) *us = net->units;
    const REAL *P = net->P;
    int64_t U = net->U, Dp = net->D_pad, D = net->D, BD = B * D;
    const REAL *m = P + net->off_mult + stage * Dp;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < Dp; j++) gout[b * Dp + j] = m[j] * gk[b * Dp + j];
    for (int64_t i = 0; i < BD * Dp; i++) tgout[i] = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < D; i++) tgout[(b * D + i) * Dp + i] = tbar[b] * m[i];
    for (int64_t i = 0; i < B * net->act; i++) gv[i] = 0;
    for (int64_t i = 0; i < BD * net->act; i++) tgv[i] = 0;
    const int64_t *offs = net->offs;
    for (int64_t u = U; u >= 1; u--) {
        const FN(unit) *un = us + u;
        int64_t w = un->nout_pad;
        const REAL *g = u == U ? gout : gv + B * offs[u];
        const REAL *tg = u == U ? tgout : tgv + BD * offs[u];
        if (un->res >= 0) {
            REAL *dr = gv + B * offs[un->res];
            for (int64_t i = 0; i < B * w; i++) dr[i] += g[i];
            REAL *tdr = tgv + BD * offs[un->res];
            for (int64_t i = 0; i < BD * w; i++) tdr[i] += tg[i];
        }
        int64_t pw = us[u - 1].nout_pad;
        FN(gemm)(B, un->nout, pw, g, w, P + un->off_w, pw, tmp, pw, 0);
        FN(gemm)(BD, un->nout, pw, tg, w, P + un->off_w, pw, ttmp, pw, 0);
        const REAL *restrict v = vals + B * offs[u - 1];
        const REAL *restrict t = tans + BD * offs[u - 1];
        REAL *restrict dv = gv + B * offs[u - 1];
        REAL *restrict tdv = tgv + BD * offs[u - 1];
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < pw; j++) {
                REAL x = v[b * pw + j], s = FN(sig)(x), c = (REAL)1 - s;
                REAL ds = s * ((REAL)1 + x * c);                       /* silu'  */
                REAL dds = s * c * ((REAL)2 + x * ((REAL)1 - 2 * s));   /* silu'' */
                REAL sbar = 0;
                for (int64_t i = 0; i < D; i++) {
                    int64_t r = (b * D + i) * pw + j;
                    sbar += t[r] * ttmp[r];
                    tdv[r] += ds * ttmp[r];  /* t_0 is constant: unit 0's is not used */
                }
                dv[b * pw + j] += ds * tmp[b * pw + j] + dds * sbar;
            }
    }
    FN(gemm)(B, us[0].nout, Dp, gv, us[0].nout_pad, P + us[0].off_w, Dp, gx, Dp, 0);
}

/* rk4_forward with the log-determinant: also ld (B) = sum over steps of
 * h/6 (tr1 + 2 tr2 + 2 tr3 + tr4), the RK4 integral of tr(dk/dx) along the solve, and its
 * embedded estimate's error in `err` (RMS over D + 1 coordinates, as the PyTorch path's
 * augmented state). `store` (4 N slots of B act (1 + D): values, tangents) keeps what the
 * adjoint needs (it needs silu'' too, so it computes the sigmoid from the values; silu' stays
 * in scratch for the tangents). */
int FN(rk4_logdet_forward)(const int64_t *ints, const REAL *P, int64_t B, const REAL *y0,
                           REAL *y1, REAL *ld, REAL *err, REAL *store)
{
    FN(net) net;
    FN(setup)(&net, ints, P);
    int64_t D = net.D, Dp = net.D_pad, S = B * Dp, A = B * net.act, AT = A * D;
    int64_t mw = FN(maxwidth)(&net), W = B * mw;
    REAL *buf = (REAL *)malloc(sizeof(REAL) * (8 * S + 2 * A + AT + 2 * W + D * W
                                               + B * D * Dp + 6 * B));
    if (!buf) return -1;
    REAL *k1 = buf, *k2 = k1 + S, *k3 = k2 + S, *k4 = k3 + S, *k5 = k4 + S, *x = k5 + S;
    REAL *y = x + S, *e = y + S, *vals = e + S, *dsv = vals + A, *tans = dsv + A;
    REAL *a = tans + AT;
    REAL *out = a + W, *ta = out + W, *tout = ta + D * W, *tr1 = tout + B * D * Dp;
    REAL *tr2 = tr1 + B, *tr3 = tr2 + B, *tr4 = tr3 + B, *tr5 = tr4 + B, *el = tr5 + B;
    REAL h = net.h;
    for (int64_t i = 0; i < S; i++) { y[i] = y0[i]; e[i] = 0; }
    for (int64_t b = 0; b < B; b++) { ld[b] = 0; el[b] = 0; }
#define VSLOT(q) (store ? store + (q) * (A + AT) : vals)
#define TSLOT(q) (store ? store + (q) * (A + AT) + A : tans)
#define EVAL(stage, at, k, q, tr)                                                            \
    do {                                                                                     \
        FN(eval)(&net, stage, B, at, k, VSLOT(q), dsv, a, out);                              \
        FN(tangent)(&net, stage, B, dsv, TSLOT(q), tr, ta, tout);                            \
    } while (0)
    EVAL(0, y, k1, 0, tr1);
    for (int64_t n = 0; n < net.N; n++) {
        int64_t s0 = 3 * n;
        for (int64_t i = 0; i < S; i++) x[i] = y[i] + (REAL)0.5 * h * k1[i];
        EVAL(s0 + 1, x, k2, 4 * n + 1, tr2);
        for (int64_t i = 0; i < S; i++) x[i] = y[i] + (REAL)0.5 * h * k2[i];
        EVAL(s0 + 1, x, k3, 4 * n + 2, tr3);
        for (int64_t i = 0; i < S; i++) x[i] = y[i] + h * k3[i];
        EVAL(s0 + 2, x, k4, 4 * n + 3, tr4);
        for (int64_t i = 0; i < S; i++)
            y[i] = y[i] + (h / 6) * (k1[i] + 2 * k2[i] + 2 * k3[i] + k4[i]);
        for (int64_t b = 0; b < B; b++)
            ld[b] += (h / 6) * (tr1[b] + 2 * tr2[b] + 2 * tr3[b] + tr4[b]);
        /* the end-point slope: the next step's k1, and the embedded estimate's fifth stage */
        if (n + 1 == net.N) {
            FN(eval)(&net, s0 + 2, B, y, k5, vals, dsv, a, out);
            FN(tangent)(&net, s0 + 2, B, dsv, tans, tr5, ta, tout);
        } else {
            EVAL(s0 + 2, y, k5, 4 * n + 4, tr5);
        }
        for (int64_t i = 0; i < S; i++) {
            REAL d = k4[i] - k5[i];
            e[i] += (h / 6) * (d < 0 ? -d : d);
        }
        for (int64_t b = 0; b < B; b++) {
            REAL d = tr4[b] - tr5[b];
            el[b] += (h / 6) * (d < 0 ? -d : d);
        }
        REAL *t = k1; k1 = k5; k5 = t;
        t = tr1; tr1 = tr5; tr5 = t;
    }
#undef EVAL
#undef VSLOT
#undef TSLOT
    for (int64_t b = 0; b < B; b++) {
        REAL acc = el[b] * el[b];
        for (int64_t j = 0; j < D; j++) acc += e[b * Dp + j] * e[b * Dp + j];
        err[b] = (REAL)__builtin_sqrt((double)(acc / (REAL)(D + 1)));
        for (int64_t j = 0; j < Dp; j++) y1[b * Dp + j] = y[b * Dp + j];
    }
    free(buf);
    return 0;
}

/* The discrete adjoint of rk4_logdet_forward: gy0 = (dy1/dy0)^T gy1 + (dld/dy0)^T gld. */
int FN(rk4_logdet_backward)(const int64_t *ints, const REAL *P, int64_t B, const REAL *store,
                            const REAL *gy1, const REAL *gld, REAL *gy0)
{
    FN(net) net;
    FN(setup)(&net, ints, P);
    int64_t D = net.D, Dp = net.D_pad, S = B * Dp, A = B * net.act, AT = A * D;
    int64_t mw = FN(maxwidth)(&net), W = B * mw;
    REAL *buf = (REAL *)malloc(sizeof(REAL) * (7 * S + A + AT + W + D * W + B * D * Dp
                                               + 2 * B));
    if (!buf) return -1;
    REAL *yb = buf, *acc = yb + S, *kb1 = acc + S, *kb2 = kb1 + S, *kb3 = kb2 + S;
    REAL *u = kb3 + S, *gout = u + S, *gv = gout + S, *tgv = gv + A, *tmp = tgv + AT;
    REAL *ttmp = tmp + W, *tgout = ttmp + D * W, *tb1 = tgout + B * D * Dp, *tb2 = tb1 + B;
    REAL h = net.h;
    for (int64_t b = 0; b < B; b++) {
        tb1[b] = (h / 6) * gld[b];  /* the weights of tr1 and tr4 */
        tb2[b] = (h / 3) * gld[b];  /* of tr2 and tr3 */
    }
    for (int64_t i = 0; i < S; i++) yb[i] = gy1[i];
    for (int64_t n = net.N - 1; n >= 0; n--) {
        int64_t s0 = 3 * n;
        const REAL *base = store + 4 * n * (A + AT);
#define V(q) (base + (q) * (A + AT))
#define T(q) (base + (q) * (A + AT) + A)
        for (int64_t i = 0; i < S; i++) {
            acc[i] = yb[i];
            kb1[i] = (h / 6) * yb[i];
            kb2[i] = (h / 3) * yb[i];
            kb3[i] = (h / 3) * yb[i];
            u[i] = (h / 6) * yb[i];  /* kb4 */
        }
        FN(vjp_tan)(&net, s0 + 2, B, V(3), T(3), u, tb1, u, gv, tgv, gout, tgout, tmp, ttmp);
        for (int64_t i = 0; i < S; i++) { acc[i] += u[i]; kb3[i] += h * u[i]; }
        FN(vjp_tan)(&net, s0 + 1, B, V(2), T(2), kb3, tb2, u, gv, tgv, gout, tgout, tmp, ttmp);
        for (int64_t i = 0; i < S; i++) { acc[i] += u[i]; kb2[i] += (REAL)0.5 * h * u[i]; }
        FN(vjp_tan)(&net, s0 + 1, B, V(1), T(1), kb2, tb2, u, gv, tgv, gout, tgout, tmp, ttmp);
        for (int64_t i = 0; i < S; i++) { acc[i] += u[i]; kb1[i] += (REAL)0.5 * h * u[i]; }
        FN(vjp_tan)(&net, s0, B, V(0), T(0), kb1, tb1, u, gv, tgv, gout, tgout, tmp, ttmp);
        for (int64_t i = 0; i < S; i++) yb[i] = acc[i] + u[i];
#undef V
#undef T
    }
    for (int64_t i = 0; i < S; i++) gy0[i] = yb[i];
    free(buf);
    return 0;
}

#undef VL
