/* quantkit's CPU kernels for the formats with a rotation or block scales: int8-convrot, mxfp8, nvfp4.
 *
 * The math of src/quantkit/formats/{int8_convrot,mxfp8,nvfp4}.py (their torch quantize is the spec),
 * one pass over each row. Built like cpu_quant.c (-O3 -ffp-contract=off, no fast-math), so every fp32
 * operation rounds as torch's does; tests hold the bytes to the torch reference. Rows are independent;
 * native.py splits them over threads. Each row's error sums are formed in a fixed order.
 *
 * w is [rows, k] row-major, bf16 / fp16 / fp32 (kind 1 / 2 / 0).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { IN_F32 = 0, IN_BF16 = 1, IN_F16 = 2 };
static const size_t ELEM[3] = {4, 2, 2};

#define ALWAYS static inline __attribute__((always_inline))
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
typedef uint16_t vh16 __attribute__((vector_size(32)));
typedef double vd8 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef uint8_t vq8 __attribute__((vector_size(8)));

/* Lane-wise comparisons of 16-lane vectors, as masks (-1 true, 0 false), in pieces of the widest
 * vectors the target compares natively: GCC (12 at least) turns a comparison of vectors wider than the
 * target's into one scalar compare and branch per lane (AVX2: 64-byte vectors are two registers),
 * about 20x slower here; pieces of the target's width stay vector compares. */
#if defined(__AVX512F__)
#define CMP_BYTES 64
#elif defined(__AVX2__)
#define CMP_BYTES 32
#else
#define CMP_BYTES 16
#endif
#define CMP_N (64 / CMP_BYTES)
#define PW (CMP_BYTES / 4)  /* 32-bit lanes a piece */
typedef float vf_c __attribute__((vector_size(CMP_BYTES)));
typedef int32_t vi_c __attribute__((vector_size(CMP_BYTES)));
typedef uint32_t vu_c __attribute__((vector_size(CMP_BYTES)));
typedef uint16_t vh_c __attribute__((vector_size(CMP_BYTES / 2)));
typedef union { v16 v; vf_c c[CMP_N]; } f_pieces;
typedef union { vi16 v; vi_c c[CMP_N]; } i_pieces;
typedef union { vu16 v; vu_c c[CMP_N]; } u_pieces;
#define CMP_FN(name, T, P, op)                                              \
    ALWAYS vi16 name(T a, T b) {                                            \
        P x = {a}, y = {b};                                                 \
        i_pieces r;                                                         \
        for (int i = 0; i < CMP_N; i++) r.c[i] = (vi_c)(x.c[i] op y.c[i]);  \
        return r.v;                                                         \
    }
CMP_FN(flt, v16, f_pieces, <)
CMP_FN(fle, v16, f_pieces, <=)
CMP_FN(fgt, v16, f_pieces, >)
CMP_FN(ilt, vi16, i_pieces, <)
CMP_FN(ugt, vu16, u_pieces, >)
CMP_FN(uge, vu16, u_pieces, >=)
#undef CMP_FN
/* a with lane j taken from lane j ^ x (x a constant below 16), piece by piece: the bits of x below PW
 * permute inside each piece, the others swap whole pieces (any 32-bit lane type) */
#if PW == 16
#define XL(x) 0 ^ (x), 1 ^ (x), 2 ^ (x), 3 ^ (x), 4 ^ (x), 5 ^ (x), 6 ^ (x), 7 ^ (x), 8 ^ (x), 9 ^ (x), \
              10 ^ (x), 11 ^ (x), 12 ^ (x), 13 ^ (x), 14 ^ (x), 15 ^ (x)
#elif PW == 8
#define XL(x) 0 ^ (x), 1 ^ (x), 2 ^ (x), 3 ^ (x), 4 ^ (x), 5 ^ (x), 6 ^ (x), 7 ^ (x)
#else
#define XL(x) 0 ^ (x), 1 ^ (x), 2 ^ (x), 3 ^ (x)
#endif
#define LANES_XOR(a, x)                                                                           \
    __extension__({                                                                               \
        union { __typeof__(a) v; vf_c c[CMP_N]; } i_ = {(a)}, o_;                                 \
        for (int p_ = 0; p_ < CMP_N; p_++)                                                        \
            o_.c[p_] = __builtin_shufflevector(i_.c[p_ ^ ((x) / PW)], i_.c[p_ ^ ((x) / PW)], XL((x) % PW)); \
        o_.v;                                                                                     \
    })
ALWAYS v16 fs(float x) { return (v16){0} + x; }     /* x in every lane */
ALWAYS vi16 is(int32_t x) { return (vi16){0} + x; }
ALWAYS vu16 us(uint32_t x) { return (vu16){0} + x; }

ALWAYS v16 vsel(vi16 m, v16 a, v16 b) { return (v16)(((vi16)a & m) | ((vi16)b & ~m)); }
ALWAYS vu16 usel(vi16 m, vu16 a, vu16 b) { return (a & (vu16)m) | (b & ~(vu16)m); }

/* One element as fp32 (exact for each input dtype; fp16 in integer steps, as cpu_quant.c). */
static inline float load1(const uint8_t *p, int64_t i, int kind) {
    float f;
    uint32_t u;
    if (kind == IN_F32) { memcpy(&f, p + 4 * i, 4); return f; }
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    if (kind == IN_BF16) { u = (uint32_t)h << 16; memcpy(&f, &u, 4); return f; }
    uint32_t mag = h & 0x7fffu, e = mag & 0x7c00u;
    if (e == 0) { f = (float)mag * 0x1p-24f; memcpy(&u, &f, 4); }
    else if (e == 0x7c00u) u = (mag << 13) | 0x7f800000u;
    else u = (mag << 13) + (112u << 23);
    u |= (uint32_t)(h & 0x8000u) << 16;
    memcpy(&f, &u, 4);
    return f;
}

/* 16 elements from column c0 of a row of k, zero past the end. */
ALWAYS v16 load16(const uint8_t *row, int64_t c0, int64_t k, int kind) {
    v16 x;
    if (c0 + 16 <= k && kind == IN_F32) { memcpy(&x, row + 4 * c0, 64); return x; }
    if (c0 + 16 <= k && kind == IN_BF16) {
        vh16 h;
        memcpy(&h, row + 2 * c0, 32);
        return (v16)(__builtin_convertvector(h, vu16) << 16);
    }
    for (int i = 0; i < 16; i++) x[i] = c0 + i < k ? load1(row, c0 + i, kind) : 0.0f;
    return x;
}

ALWAYS vu16 umax16(vu16 a, vu16 b) { return usel(ugt(a, b), a, b); }

ALWAYS uint32_t amax_bits16(v16 x) {  /* largest |x| as ordered bits (NaN above inf), by halving */
    vu16 a = (vu16)x & 0x7fffffffu;
    a = umax16(a, LANES_XOR(a, 8));
    a = umax16(a, LANES_XOR(a, 4));
    a = umax16(a, LANES_XOR(a, 2));
    a = umax16(a, LANES_XOR(a, 1));
    return a[0];
}

/* the low and high 8 lanes of a vector, in registers (a store and two half-width loads of it would
 * stall on store forwarding) */
typedef union { v16 v; v8 h[2]; } halves;
ALWAYS v8 lo8(v16 x) { halves u = {x}; return u.h[0]; }
ALWAYS v8 hi8(v16 x) { halves u = {x}; return u.h[1]; }

/* sum of squares of 16 fp32 lanes into an fp64 accumulator of 8 lanes (exact squares in fp64) */
ALWAYS vd8 acc_sq(vd8 acc, v16 x) {
    vd8 a = __builtin_convertvector(lo8(x), vd8), b = __builtin_convertvector(hi8(x), vd8);
    return acc + (a * a + b * b);
}

/* fp32 sums of squares over a run of at most RUN vectors, then added into fp64 (as cpu_quant.c: the
 * error sums are only reported, within ~RUN x 2^-24 relative of exact, in a fixed order per row) */
#define RUN 16
ALWAYS vd8 flush16(vd8 acc, v16 s) {
    return acc + (__builtin_convertvector(lo8(s), vd8) + __builtin_convertvector(hi8(s), vd8));
}

ALWAYS double hsum8(vd8 v) {
    double t = 0;
    for (int l = 0; l < 8; l++) t += v[l];
    return t;
}

typedef uint8_t vb16 __attribute__((vector_size(16)));

ALWAYS float bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
ALWAYS uint32_t f_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* ---------------------------------------------------------------- per-block amax */

/* amax of each 16-column block of rows [r0, r1) (nb blocks a row, the last zero-padded): out[r * nb + j]. */
void qk_block16_amax(const void *w, int kind, int64_t r0, int64_t r1, int64_t k, int64_t nb, float *out) {
    const uint8_t *p = (const uint8_t *)w;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = p + r * k * ELEM[kind];
        for (int64_t j = 0; j < nb; j++) out[r * nb + j] = bits_f(amax_bits16(load16(row, 16 * j, k, kind)));
    }
}

/* ---------------------------------------------------------------- mxfp8 */

/* E4M3 of 16 fp32 values x (|x| <= 448 after the clamp), round to nearest even: codes, and the fp32 values. */
ALWAYS vu16 e4m3(v16 x, v16 *val) {
    const int shift = 20, bias = 7, man = 3;
    vu16 u = (vu16)x;
    vu16 sign = u & 0x80000000u;
    vu16 a = u & 0x7fffffffu;
    vu16 rn = (a + ((1u << (shift - 1)) - 1) + ((a >> shift) & 1u)) >> shift;
    const float sub = (float)(1u << (bias - 1 + man));
    vu16 m = (vu16)((v16)a * sub + 8388608.0f) - 0x4B000000u;
    vi16 normal = uge(a, us((uint32_t)(128 - bias) << 23));
    vu16 code = usel(normal, rn - ((uint32_t)(127 - bias) << man), m);
    v16 qv = vsel(normal, (v16)(rn << shift), __builtin_convertvector((vi16)m, v16) * (1.0f / sub));
    *val = (v16)((vu16)qv | sign);
    return code | (sign >> 24);
}

/* Rows [r0, r1) of w in blocks of 32: E8M0 exponent bytes e[r * nb + j] (nb = kp / 32) and the E4M3
 * bytes q[r * kp + c] (kp = nb * 32; padding columns 0); sig/noise: fp64 sums of w^2 and of the fp32
 * dequantization error per row. */
ALWAYS void qk_mxfp8_t(const void *w, const int kind, int64_t r0, int64_t r1, int64_t k, int64_t nb, uint8_t *e, uint8_t *q,
              double *sig, double *noise, uint8_t *ok) {
    const uint8_t *p = (const uint8_t *)w;
    const int64_t kp = nb * 32;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = p + r * k * ELEM[kind];
        vd8 ss = {0}, nn = {0};
        v16 s2 = {0}, n2 = {0};
        uint32_t rowmax = 0;
        for (int64_t j = 0; j < nb; j++) {
            if (j % RUN == 0 && j) { ss = flush16(ss, s2); nn = flush16(nn, n2); s2 = (v16){0}; n2 = (v16){0}; }
            v16 x0 = load16(row, 32 * j, k, kind), x1 = load16(row, 32 * j + 16, k, kind);
            vu16 m = umax16((vu16)x0 & 0x7fffffffu, (vu16)x1 & 0x7fffffffu);
            uint32_t ab = amax_bits16((v16)m);
            rowmax = ab > rowmax ? ab : rowmax;
            float amax = bits_f(ab);
            uint32_t ex = 0;
            float s = 1.0f, inv = 1.0f;
            if (amax != 0.0f) {
                uint32_t b = f_bits(amax / 448.0f);
                int32_t f = (int32_t)((b >> 23) & 0xff) + ((b & 0x7fffffu) != 0);
                ex = (uint32_t)(f < 1 ? 1 : (f > 254 ? 254 : f));
                s = bits_f(ex << 23);
                /* 1/s = 2^(127-ex) exactly (a subnormal 2^-127 for ex = 254): x * inv rounds the same
                 * real number x / s as the division does */
                inv = ex == 254 ? 0x1p-127f : bits_f((254u - ex) << 23);
            }
            e[r * nb + j] = (uint8_t)ex;
            for (int h = 0; h < 2; h++) {
                v16 x = h ? x1 : x0, v;
                v16 y = x * inv;
                y = vsel(flt(y, fs(-448.0f)), (v16){0} - 448.0f, y);
                y = vsel(fgt(y, fs(448.0f)), (v16){0} + 448.0f, y);
                vu16 c = e4m3(y, &v);
                v16 d = x - v * s;
                vb16 cb = __builtin_convertvector(c, vb16);
                memcpy(q + r * kp + 32 * j + 16 * h, &cb, 16);
                s2 += x * x;
                n2 += d * d;
            }
        }
        ss = flush16(ss, s2);
        nn = flush16(nn, n2);
        sig[r] = hsum8(ss);
        noise[r] = hsum8(nn);
        ok[r] = rowmax < 0x7f800000u;
    }
}

void qk_mxfp8(const void *w, int kind, int64_t r0, int64_t r1, int64_t k, int64_t nb, uint8_t *e, uint8_t *q,
              double *sig, double *noise, uint8_t *ok) {
    if (kind == IN_BF16) qk_mxfp8_t(w, IN_BF16, r0, r1, k, nb, e, q, sig, noise, ok);
    else if (kind == IN_F16) qk_mxfp8_t(w, IN_F16, r0, r1, k, nb, e, q, sig, noise, ok);
    else qk_mxfp8_t(w, IN_F32, r0, r1, k, nb, e, q, sig, noise, ok);
}

/* ---------------------------------------------------------------- nvfp4 */

/* The number of offsets in formats/nvfp4.py's SEARCH_OFFSETS: the width of the fixed search
 * (nv_search_fixed, and nv_group's 16 blocks at a time); any other count takes the general nv_search,
 * same bytes, slower (tests/test_new_formats.py checks the two agree). At most 9: sum9's width. */
#define NV_NOFF 7
_Static_assert(NV_NOFF >= 1 && NV_NOFF <= 9, "sum9 adds at most 9 candidates side by side");
int qk_nvfp4_fixed_offsets(void) { return NV_NOFF; }

/* Squared error of one 16-block stored with scale total (fp64, the pairwise tree of
 * formats/_common.tree_sum_fp64), and its E2M1 values. */
ALWAYS double nv_block(v16 x, float total, v16 *vout) {
    v16 v;
    if (total == 0.0f) {
        v = (v16){0};
    } else {
        v16 y = x / total;
        y = vsel(flt(y, fs(-6.0f)), (v16){0} - 6.0f, y);
        y = vsel(fgt(y, fs(6.0f)), (v16){0} + 6.0f, y);
        vu16 sign = (vu16)y & 0x80000000u;
        v16 a = (v16)((vu16)y & 0x7fffffffu);
        const float M = 12582912.0f;  /* 1.5 * 2^23: (t + M) - M rounds t (< 2^22) half to even */
        /* steps of .5 below 2, 1 below 4, 2 up to 6: round(a * m) / m with m = 2, 1, 1/2 (the
         * multiplies by powers of two are exact, so this is round_values' arithmetic) */
        vi16 lt2 = flt(a, fs(2.0f)), lt4 = flt(a, fs(4.0f));
        v16 m = vsel(lt2, (v16){0} + 2.0f, vsel(lt4, (v16){0} + 1.0f, (v16){0} + 0.5f));
        v16 mi = vsel(lt2, (v16){0} + 0.5f, vsel(lt4, (v16){0} + 1.0f, (v16){0} + 2.0f));
        v = ((a * m + M) - M) * mi;
        v = (v16)((vu16)v | sign);
    }
    v16 d = x - v * total;
    /* the tree: element i + 8 onto i, then + 4, + 2, + 1 */
    vd8 a = __builtin_convertvector(lo8(d), vd8), b = __builtin_convertvector(hi8(d), vd8);
    vd8 s8 = a * a + b * b;
    vd8 t = s8 + __builtin_shufflevector(s8, s8, 4, 5, 6, 7, 0, 1, 2, 3);  /* lane i < 4: s8[i] + s8[i + 4] */
    vd8 u = t + __builtin_shufflevector(t, t, 2, 3, 0, 1, 6, 7, 4, 5);     /* lane i < 2: t[i] + t[i + 2] */
    vd8 z = u + __builtin_shufflevector(u, u, 1, 0, 3, 2, 5, 4, 7, 6);     /* lane 0: u[0] + u[1] */
    *vout = v;
    return z[0];
}

/* Sum of 16 fp32 lanes, any fixed order (only a filter: see nv_search). */
ALWAYS float hsum16f(v16 a) {
    a = a + LANES_XOR(a, 8);
    a = a + LANES_XOR(a, 4);
    a = a + LANES_XOR(a, 2);
    a = a + LANES_XOR(a, 1);
    return a[0];
}

/* The E4M3 code of a fp32 0 <= b <= 448, round to nearest even (torch's cast): normals by rounding the
 * bits, subnormals (below 2^-6, steps of 2^-9) by b * 2^9 rounded to an integer. */
ALWAYS uint32_t e4m3_code(float b) {
    uint32_t a = f_bits(b);
    if (a >= (uint32_t)(127 - 6) << 23) {
        uint32_t rn = (a + ((1u << 19) - 1) + ((a >> 20) & 1u)) >> 20;
        return rn - ((uint32_t)(127 - 7) << 3);
    }
    return f_bits(b * 512.0f + 8388608.0f) - 0x4B000000u;
}

/* fp32 squared errors of one block under candidate scale total (> 0, its reciprocal rc normal), with
 * y = x * rc in place of the spec's x / total, and the E2M1 rounding as |y| (at most 6) plus 2^22,
 * 2^23 or 2^24 (below 2, below 4, up to 6): steps of .5, 1, 2 half to even, the spec's
 * round(|y| * m) / m. rc = fl(1 / total) puts |y| within 3 ulp of the spec's quotient, so the two
 * round to the same value except where |y| lies that close to a rounding boundary (0.25, 0.75, 1.25,
 * 1.75, 2.5, 3.5, 5); there they are the two grid values around it, nearly equally far: that element's
 * squared error differs by under 4 * 3 ulp * |y| / (half step) <= 84 ulp of itself (|y| / (half step)
 * <= 7), so the block's. See nv_search for what that bound buys. */
ALWAYS v16 nv_sq32(v16 x, float total, float rc) {
    v16 y = x * rc;
    vu16 sign = (vu16)y & 0x80000000u;
    v16 a = (v16)((vu16)y & 0x7fffffffu);
    a = vsel(fgt(a, fs(6.0f)), (v16){0} + 6.0f, a);
    v16 mg = vsel(flt(a, fs(2.0f)), (v16){0} + 0x1p22f, vsel(flt(a, fs(4.0f)), (v16){0} + 0x1p23f, (v16){0} + 0x1p24f));
    v16 v = (v16)((vu16)((a + mg) - mg) | sign);
    v16 d = x - v * total;
    return d * d;
}

/* The winner of the scale search of one block (x, kitchen code c0 != 0) over codes cand[0..n) (the
 * offsets applied and clamped), as the spec picks it: the first candidate of smallest fp64 error
 * (nv_block, whose sum S of the spec's exact squares it rounds by under 4 ulp of fp64). The fp32
 * errors e32 of nv_sq32 are a filter: within 100 ulp (fp32) relative of S (84 from the rounding above,
 * 5 from fp32 squares and the 4 adds) plus an absolute 2^-146 (squares that underflow). A candidate
 * whose e32 exceeds the smallest e32 by more than the band (relative 2^-12, absolute 2^-130) thus has
 * S over (1 + 2^-13) times the smallest one's, so a larger fp64 error: it cannot win. The candidates
 * left in the band (one, unless near a tie) are decided by their fp64 errors in order with strict <.
 * A scale whose reciprocal is not normal (rc[c] = 0: a weight near fp32's ends) sends every candidate
 * to the exact decision; so does an inf e32 (a square past fp32), as it puts every one in the band.
 * tot[c] = g * lut[c], rc[c] its reciprocal. Returns the winner's index, its fp64 error in *be and its
 * E2M1 values in *bv. */
ALWAYS int nv_search(v16 x, const float *tot, const float *rc, const int32_t *cand, int n, double *be, v16 *bv) {
    float e32[16];
    float emin = __builtin_inff();
    int exact = 0;
    for (int o = 0; o < n; o++) {
        int32_t c = cand[o];
        exact |= rc[c] == 0.0f;
        float e = hsum16f(nv_sq32(x, tot[c], rc[c]));
        e32[o] = e;
        emin = e < emin ? e : emin;
    }
    float band = exact ? __builtin_inff() : emin * (1.0f + 0x1p-12f) + 0x1p-130f;
    uint32_t in = 0;  /* the candidates in the band, by bit (branch-free: which one wins is data) */
    for (int o = 0; o < n; o++) in |= (uint32_t)(e32[o] <= band) << o;
    if ((in & (in - 1)) == 0) {  /* one candidate (the smallest e32): the winner */
        int win = __builtin_ctz(in);
        *be = nv_block(x, tot[cand[win]], bv);
        return win;
    }
    int win = -1;
    double best = 0;
    v16 v;
    for (int o = 0; o < n; o++) {
        if (!(in >> o & 1u)) continue;
        double er = nv_block(x, tot[cand[o]], &v);
        if (win < 0 || er < best) { best = er; win = o; *bv = v; }
    }
    *be = best;
    return win;
}

/* Lane j of the result: the sum of the 16 lanes of s[j] (j < 9; lanes 9.. 0), by a transposed tree
 * (halves of two vectors side by side, added; four levels). */
ALWAYS v16 sum9(const v16 *s) {
    const v16 z = {0};
#define LO8(a, b) __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
#define HI8(a, b) __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31)
#define LO4(a, b) __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
#define HI4(a, b) __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31)
#define LO2(a, b) __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
#define HI2(a, b) __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31)
#define EV(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
#define OD(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)
    v16 a0 = LO8(s[0], s[1]) + HI8(s[0], s[1]), a1 = LO8(s[2], s[3]) + HI8(s[2], s[3]);
    v16 a2 = LO8(s[4], s[5]) + HI8(s[4], s[5]), a3 = LO8(s[6], s[7]) + HI8(s[6], s[7]);
    v16 a4 = LO8(s[8], z) + HI8(s[8], z);
    v16 b0 = LO4(a0, a1) + HI4(a0, a1), b1 = LO4(a2, a3) + HI4(a2, a3), b2 = LO4(a4, z) + HI4(a4, z);
    v16 c0 = LO2(b0, b1) + HI2(b0, b1), c1 = LO2(b2, z) + HI2(b2, z);
    return EV(c0, c1) + OD(c0, c1);
#undef LO8
#undef HI8
#undef LO4
#undef HI4
#undef LO2
#undef HI2
#undef EV
#undef OD
}

ALWAYS float vmin16(v16 a) {
    a = vsel(flt(a, LANES_XOR(a, 8)), a, LANES_XOR(a, 8));
    a = vsel(flt(a, LANES_XOR(a, 4)), a, LANES_XOR(a, 4));
    a = vsel(flt(a, LANES_XOR(a, 2)), a, LANES_XOR(a, 2));
    a = vsel(flt(a, LANES_XOR(a, 1)), a, LANES_XOR(a, 1));
    return a[0];
}

/* The bits j (j < 16) where a[j] <= b. */
ALWAYS uint32_t le_bits(v16 a, float b) {
    vi16 m = fle(a, fs(b));
    uint32_t out = 0;
    for (int l = 0; l < 16; l++) out |= (uint32_t)(m[l] & 1) << l;
    return out;
}

/* nv_search for the NV_NOFF offsets of the spec, the candidates' sums side by side. */
ALWAYS int nv_search_fixed(v16 x, const float *tot, const float *rc, const int32_t *cand, double *be, v16 *bv) {
    v16 s[9] = {{0}};
    int exact = 0;
    for (int o = 0; o < NV_NOFF; o++) {
        int32_t c = cand[o];
        exact |= rc[c] == 0.0f;
        s[o] = nv_sq32(x, tot[c], rc[c]);
    }
    v16 e = sum9(s);
    const vi16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    e = vsel(ilt(lane, is(NV_NOFF)), e, (v16){0} + __builtin_inff());
    float emin = vmin16(e);
    float band = exact ? __builtin_inff() : emin * (1.0f + 0x1p-12f) + 0x1p-130f;
    uint32_t in = le_bits(e, band) & ((1u << NV_NOFF) - 1u);
    if ((in & (in - 1)) == 0) {
        int win = __builtin_ctz(in);
        *be = nv_block(x, tot[cand[win]], bv);
        return win;
    }
    int win = -1;
    double best = 0;
    v16 v;
    for (int o = 0; o < NV_NOFF; o++) {
        if (!(in >> o & 1u)) continue;
        double er = nv_block(x, tot[cand[o]], &v);
        if (win < 0 || er < best) { best = er; win = o; *bv = v; }
    }
    *be = best;
    return win;
}

/* The 8 packed bytes of one block's E2M1 values v (even column in the high nibble). */
ALWAYS void nv_pack(v16 v, uint8_t *out) {
    vu16 sign = (vu16)v & 0x80000000u;
    v16 a = (v16)((vu16)v & 0x7fffffffu);
    v16 cf = vsel(flt(a, fs(2.0f)), a * 2.0f, vsel(flt(a, fs(4.0f)), a + 2.0f, a * 0.5f + 4.0f));
    vu16 code = (vu16)__builtin_convertvector(cf, vi16) | (sign >> 28);
    vu8 even = __builtin_shufflevector(code, code, 0, 2, 4, 6, 8, 10, 12, 14);
    vu8 odd = __builtin_shufflevector(code, code, 1, 3, 5, 7, 9, 11, 13, 15);
    vq8 packed = __builtin_convertvector((even << 4) | odd, vq8);
    memcpy(out, &packed, 8);
}

/* One block x with kitchen scale code c0: the winning scale code, its fp64 error *be and E2M1 values *bv. */
ALWAYS int32_t nv_one(v16 x, int32_t c0, const float *tot, const float *rc, const int32_t *off, int n_off,
                      double *be, v16 *bv) {
    if (c0 == 0) {
        *be = nv_block(x, 0.0f, bv);
        return 0;
    }
    int32_t cand[16];
    for (int o = 0; o < n_off; o++) {
        int32_t c = c0 + off[o];
        cand[o] = c < 1 ? 1 : (c > 0x7e ? 0x7e : c);
    }
    return cand[n_off == NV_NOFF ? nv_search_fixed(x, tot, rc, cand, be, bv) : nv_search(x, tot, rc, cand, n_off, be, bv)];
}

/* ---- the same search 16 blocks at a time: lane b of each vector is block b of a group of 16 whole
 * blocks, so the candidates' error sums, the band test and the winner's values are vertical
 * operations (no horizontal sums per block). Same filter as nv_search_fixed (its bound holds: the fp32 sum
 * below is 4 runs of 4 then a pair of pairs, 6 roundings deep with the square, not 5; 90 ulp of the
 * 100), computed on |x| (the error is even in x); a lane whose band holds more than one candidate, or
 * whose search is exact (a reciprocal not normal) or zero (c0 = 0), is redone by nv_one. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define NV_GROUPS 1
/* m[i][j] <-> m[j][i], in log2(16) stages: stage s swaps, between vectors v and v | s, the lanes in
 * which bit s differs. A stage inside one piece of the native width (W lanes) is a two-input shuffle
 * of each piece pair (lane j of the first takes the second's lane j - s where bit s of j is set, the
 * second's lane j takes the first's j + s where it is clear); a stage across pieces only swaps whole
 * pieces. Shuffles of vectors wider than the target's are one scalar move per lane in GCC. */
#if PW == 16
#define TA1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define TB1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
#define TA2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define TB2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define TA4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define TB4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define TA8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define TB8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#elif PW == 8
#define TA1 0, 8, 2, 10, 4, 12, 6, 14
#define TB1 1, 9, 3, 11, 5, 13, 7, 15
#define TA2 0, 1, 8, 9, 4, 5, 12, 13
#define TB2 2, 3, 10, 11, 6, 7, 14, 15
#define TA4 0, 1, 2, 3, 8, 9, 10, 11
#define TB4 4, 5, 6, 7, 12, 13, 14, 15
#else
#define TA1 0, 4, 2, 6
#define TB1 1, 5, 3, 7
#define TA2 0, 1, 4, 5
#define TB2 2, 3, 6, 7
#endif
#define NV_T(s, A, B)                                                         \
    for (int v = 0; v < 16; v++) {                                            \
        if (v & (s)) continue;                                                \
        for (int p = 0; p < CMP_N; p++) {                                     \
            vf_c lo = t[v].c[p], hi = t[v | (s)].c[p];                        \
            t[v].c[p] = __builtin_shufflevector(lo, hi, A);                   \
            t[v | (s)].c[p] = __builtin_shufflevector(lo, hi, B);             \
        }                                                                     \
    }
#define NV_SWAP(s)                                                            \
    for (int v = 0; v < 16; v++) {                                            \
        if (v & (s)) continue;                                                \
        for (int p = 0; p < CMP_N; p++) {                                     \
            if (p & ((s) / PW)) continue;                                     \
            vf_c x = t[v].c[p | ((s) / PW)];                                  \
            t[v].c[p | ((s) / PW)] = t[v | (s)].c[p];                         \
            t[v | (s)].c[p] = x;                                              \
        }                                                                     \
    }
ALWAYS void transpose16(f_pieces *t) {
    NV_T(1, TA1, TB1)
    NV_T(2, TA2, TB2)
#if PW >= 8
    NV_T(4, TA4, TB4)
#else
    NV_SWAP(4)
#endif
#if PW == 16
    NV_T(8, TA8, TB8)
#else
    NV_SWAP(8)
#endif
}
#undef NV_T
#undef NV_SWAP


/* The candidates' fp32 error sums e32[o] of every lane (the filter; tv: the scale totals, cv: the codes),
 * *emin their smallest; returns the lanes whose search must be exact (a reciprocal not normal). amaxf:
 * each lane's largest |x|. Built with fused multiply-adds where the target has them: a fused operation
 * rounds once, so the sums are at least as close to the exact ones as the bound of nv_group assumes.
 * One native-width piece p of the lanes (plain vector operators): the 16 element vectors and the
 * accumulators of a piece fit the registers. */
ALWAYS vf_c fsel_c(vi_c m, vf_c a, vf_c b) { return (vf_c)(((vi_c)a & m) | ((vi_c)b & ~m)); }
ALWAYS vi_c isel_c(vi_c m, vi_c a, vi_c b) { return (a & m) | (b & ~m); }
ALWAYS int all_zero_c(vi_c m) {
    uint64_t u[CMP_BYTES / 8], t = 0;
    memcpy(u, &m, CMP_BYTES);
    for (int i = 0; i < CMP_BYTES / 8; i++) t |= u[i];
    return t == 0;
}
/* one element's squared error into accumulator acc (clamp: |x| r may exceed 7, so clamp it at 6 first;
 * below 7 it rounds to at most 6 on the grid's step of 2 there, as the clamped value would) */
#define NV_SQ(e, acc, clamp)                                                               \
    {                                                                                      \
        vf_c a_ = ax[e].c[p] * r;                                                          \
        if (clamp) a_ = fsel_c((vi_c)(a_ > 6.0f), six, a_);                                \
        vf_c p2_ = fsel_c((vi_c)(a_ < 2.0f), m22, fsel_c((vi_c)(a_ < 4.0f), m23, m24));    \
        vf_c v_ = (a_ + p2_) - p2_;                                                        \
        vf_c d_ = ax[e].c[p] - v_ * t;                                                     \
        acc = acc + d_ * d_;                                                               \
    }
#define NV_SUM(clamp)                                                                      \
    for (int e = 0; e < 16; e += 4) {                                                      \
        NV_SQ(e, s0, clamp) NV_SQ(e + 1, s1, clamp) NV_SQ(e + 2, s2, clamp) NV_SQ(e + 3, s3, clamp) \
    }
__attribute__((noinline, optimize("fp-contract=fast")))
static vi_c nv_filter(const f_pieces *ax, int p, vf_c amaxf, vi_c c0, float g, const int32_t *off, vf_c *e32,
                      vf_c *tv, vi_c *cv, vf_c *emin_out) {
    const vf_c six = (vf_c){0} + 6.0f;
    const vf_c m22 = (vf_c){0} + 0x1p22f, m23 = (vf_c){0} + 0x1p23f, m24 = (vf_c){0} + 0x1p24f;
    vi_c redo = {0};
    vf_c emin = (vf_c){0} + __builtin_inff();
    for (int o = 0; o < NV_NOFF; o++) {
        vi_c c = c0 + off[o];
        c = isel_c(c < 1, (vi_c){0} + 1, c);
        c = isel_c(c > 0x7e, (vi_c){0} + 0x7e, c);
        /* the E4M3 value of code c: normal from its bits, subnormal c * 2^-9 */
        vf_c val = fsel_c(c >= 8, (vf_c)((vu_c)(c << 20) + ((uint32_t)(127 - 7) << 23)),
                          __builtin_convertvector(c, vf_c) * 0x1p-9f);
        vf_c t = g * val;
        vi_c ok = (t >= 0x1p-100f) & (t <= 0x1p100f);
        redo |= ~ok;
        vf_c r = fsel_c(ok, 1.0f / t, (vf_c){0} + 1.0f);
        vf_c s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        if (all_zero_c((vi_c)(amaxf * r >= 7.0f))) {  /* every lane's |x| r below 7 */
            NV_SUM(0)
        } else {
            NV_SUM(1)
        }
        vf_c es = (s0 + s1) + (s2 + s3);
        e32[o] = es;
        tv[o] = t;
        cv[o] = c;
        emin = fsel_c((vi_c)(es < emin), es, emin);
    }
    *emin_out = emin;
    return redo;
}
#undef NV_SUM
#undef NV_SQ

/* The magic constant that rounds 0 <= a < 8 to E2M1's grid as (a + p2) - p2: 2^22, 2^23, 2^24 below 2,
 * below 4, above (steps .5, 1, 2, half to even), and the E2M1 magnitude code (0..7) of that rounding
 * from s = a + p2: s's bits above p2's count the steps, offset by 0, 2, 4 codes for p2 = 2^22, 2^23, 2^24. */
ALWAYS vf_c e2m1_magic(vf_c a) {
    return fsel_c((vi_c)(a < 2.0f), (vf_c){0} + 0x1p22f,
                  fsel_c((vi_c)(a < 4.0f), (vf_c){0} + 0x1p23f, (vf_c){0} + 0x1p24f));
}
ALWAYS vu_c e2m1_code(vf_c s, vf_c p2) {
    return ((vu_c)s - (vu_c)p2) + (((vu_c)p2 - 0x4A800000u) >> 22);
}
ALWAYS vu_c usel_c(vi_c m, vu_c a, vu_c b) { return (a & (vu_c)m) | (b & ~(vu_c)m); }

/* The 16 blocks from column c0 (all inside the row), one piece at a time: whole-vector stores of a
 * 16-lane vector are slow where it is wider than the target's (GCC moves it through general registers). */
ALWAYS void load_pieces(f_pieces *d, const uint8_t *row, int64_t c0, int64_t k, int kind) {
    if (kind == IN_F32) {
        for (int p = 0; p < CMP_N; p++) memcpy(&d->c[p], row + 4 * (c0 + p * PW), CMP_BYTES);
    } else if (kind == IN_BF16) {
        for (int p = 0; p < CMP_N; p++) {
            vh_c h;
            memcpy(&h, row + 2 * (c0 + p * PW), CMP_BYTES / 2);
            d->c[p] = (vf_c)(__builtin_convertvector(h, vu_c) << 16);
        }
    } else {
        d->v = load16(row, c0, k, kind);
    }
}

/* the two halves of the interleave of pieces a, b (lanes a0 b0 a1 b1 ...) */
#if PW == 16
#define IL_A 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23
#define IL_B 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
#elif PW == 8
#define IL_A 0, 8, 1, 9, 2, 10, 3, 11
#define IL_B 4, 12, 5, 13, 6, 14, 7, 15
#else
#define IL_A 0, 4, 1, 5
#define IL_B 2, 6, 3, 7
#endif

/* Blocks j0..j0+15 of a row (all inside k): scale codes into bestp[0..16), packed bytes into
 * qp[0..128), w^2 into *ss (an fp32 run of 16 vectors) and the winners' errors into *nv (their fp32 filter
 * sums) or, for a block searched again, *nn (fp64). */
ALWAYS void nv_group(const uint8_t *row, int64_t j0, int64_t k, int kind, float g, const float *tot,
                     const float *rc, const int32_t *off, vd8 *ss, vd8 *nv, double *nn, uint8_t *bestp, uint8_t *qp) {
    f_pieces xb[16], m[16], ax[16], s2 = {{0}};
    for (int b = 0; b < 16; b++) {
        load_pieces(&xb[b], row, 16 * (j0 + b), k, kind);
        for (int p = 0; p < CMP_N; p++) {
            s2.c[p] += xb[b].c[p] * xb[b].c[p];  /* an fp32 run of 16, into fp64 below (flush16, as mxfp8's) */
            m[b].c[p] = xb[b].c[p];
        }
    }
    *ss = flush16(*ss, s2.v);
    transpose16(m);  /* m[e]: element e of every block */
    /* then lane by lane (block by block), one piece of lanes at a time */
    u_pieces cd[16];
    i_pieces c0s, cws, redos;
    f_pieces ews;
    for (int p = 0; p < CMP_N; p++) {
        vu_c amax = {0};
        for (int e = 0; e < 16; e++) {
            vu_c a = (vu_c)m[e].c[p] & 0x7fffffffu;
            ax[e].c[p] = (vf_c)a;
            amax = usel_c((vi_c)(amax > a), amax, a);
        }
        vf_c bs = ((vf_c)amax / 6.0f) / g;
        bs = fsel_c((vi_c)(bs > 448.0f), (vf_c){0} + 448.0f, bs);
        /* e4m3_code, lane-wise */
        vu_c ab = (vu_c)bs;
        vu_c rn = ((ab + ((1u << 19) - 1) + ((ab >> 20) & 1u)) >> 20) - ((uint32_t)(127 - 7) << 3);
        vu_c sub = (vu_c)(bs * 512.0f + 8388608.0f) - 0x4B000000u;
        vi_c c0 = (vi_c)usel_c((vi_c)(ab >= ((uint32_t)(127 - 6) << 23)), rn, sub);
        vi_c redo = (vi_c)(c0 == 0);
        vf_c e32[NV_NOFF], tv[NV_NOFF], emin;
        vi_c cv[NV_NOFF];
        redo |= nv_filter(ax, p, (vf_c)amax, c0, g, off, e32, tv, cv, &emin);
        vf_c band = emin * (1.0f + 0x1p-12f) + 0x1p-130f;
        vi_c count = {0}, cw = {0};
        vf_c tw = (vf_c){0} + 1.0f, ew = {0};
        for (int o = 0; o < NV_NOFF; o++) {
            vi_c in = (vi_c)(e32[o] <= band);
            count -= in;
            cw = isel_c(in, cv[o], cw);
            tw = fsel_c(in, tv[o], tw);
            ew = fsel_c(in, e32[o], ew);
        }
        redo |= (vi_c)(count != 1);
        tw = fsel_c(redo, (vf_c){0} + 1.0f, tw);
        /* the winner's E2M1 values, as nv_block: x / total, E2M1 round. x * (1 / total) stands in for
         * the quotient (within 3 ulp of it: under 2^-19 for values up to 8) unless a value lies that
         * close to a rounding boundary (half a step from its grid value); then that element vector of
         * the piece (about one in 18 of them) is redone with the division. The block's reported error
         * is the winner's fp32 filter sum (within 100 ulp of the exact one). Codes: E2M1 magnitude
         * 0..7 | sign 8 (the sign of x, as of x / total); bytes: block b's byte i = code[2i] << 4 |
         * code[2i + 1]. */
        vf_c rw = 1.0f / tw;
        for (int e = 0; e < 16; e++) {
            vu_c sign = ((vu_c)m[e].c[p] & 0x80000000u) >> 28;
            vf_c a = (vf_c)((vu_c)m[e].c[p] & 0x7fffffffu) * rw;
            a = fsel_c((vi_c)(a > 6.0f), (vf_c){0} + 6.0f, a);
            vf_c p2 = e2m1_magic(a), sm = a + p2;
            vf_c gap = (vf_c)((vu_c)(a - (sm - p2)) & 0x7fffffffu);
            vi_c nr = (vi_c)(gap >= p2 * 0x1p-24f - 0x1p-19f) & ~redo;
            if (all_zero_c(nr)) {
                cd[e].c[p] = e2m1_code(sm, p2) | sign;
            } else {
                a = (vf_c)((vu_c)(m[e].c[p] / tw) & 0x7fffffffu);
                a = fsel_c((vi_c)(a > 6.0f), (vf_c){0} + 6.0f, a);
                p2 = e2m1_magic(a);
                cd[e].c[p] = e2m1_code(a + p2, p2) | sign;
            }
        }
        c0s.c[p] = c0;
        cws.c[p] = cw;
        redos.c[p] = redo;
        ews.c[p] = fsel_c(redo, (vf_c){0}, ew);  /* the filtered blocks' errors; the redone ones in *nn */
    }
    /* block b's 8 bytes at qp + 8 b: its bytes 0..3 in lane b of lo, 4..7 in lane b of hi */
    int any_redo = 0;
    for (int p = 0; p < CMP_N; p++) {
        vu_c by[8];
        for (int i = 0; i < 8; i++) by[i] = (cd[2 * i].c[p] << 4) | cd[2 * i + 1].c[p];
        vu_c lo = by[0] | (by[1] << 8) | (by[2] << 16) | (by[3] << 24);
        vu_c hi = by[4] | (by[5] << 8) | (by[6] << 16) | (by[7] << 24);
        vu_c o1 = __builtin_shufflevector(lo, hi, IL_A), o2 = __builtin_shufflevector(lo, hi, IL_B);
        memcpy(qp + 8 * PW * p, &o1, CMP_BYTES);
        memcpy(qp + 8 * PW * p + CMP_BYTES, &o2, CMP_BYTES);
        any_redo |= !all_zero_c(redos.c[p]);
    }
    for (int b = 0; b < 16; b++) bestp[b] = (uint8_t)cws.v[b];  /* a local buffer: the caller scatters it */
    *nv = flush16(*nv, ews.v);
    if (any_redo)
        for (int b = 0; b < 16; b++) {
            if (!redos.v[b]) continue;
            v16 bv;
            double be;
            bestp[b] = (uint8_t)nv_one(xb[b].v, c0s.v[b], tot, rc, off, NV_NOFF, &be, &bv);
            nv_pack(bv, qp + 8 * b);
            *nn += be;
        }
}
#undef IL_A
#undef IL_B
#undef TA1
#undef TB1
#undef TA2
#undef TB2
#ifdef TA4
#undef TA4
#undef TB4
#endif
#ifdef TA8
#undef TA8
#undef TB8
#endif
#endif

/* Rows [r0, r1) in blocks of 16 (nb a row, kp = 16 nb): the block amax, the kitchen-rounded E4M3 scale
 * code c0 = e4m3(min((amax / 6) / g, 448)) and the scale search from it over the code offsets
 * off[0..n_off) (off[0] = 0), scale values from lut (the 127 positive E4M3 values by code),
 * g = weight_scale_2. Writes the winning scale code of block (r, j) into best at its place in the
 * cuBLAS blocked layout of formats/_blocked.py (tiles of 128 rows x 4 blocks, tiles4 tiles a tile row:
 * roundup(nb, 4) / 4; entry (r_hi * 32 + r_lo, c) of a tile at 16 r_lo + 4 r_hi + c), the packed E2M1
 * bytes q[r * kp / 2 + c / 2] (even column high), and per row fp64 sums of w^2 and of the winner's
 * squared errors. */
ALWAYS void qk_nvfp4_t(const void *w, const int kind, int64_t r0, int64_t r1, int64_t k, int64_t nb, float g,
              const float *lut, const int32_t *off, int n_off, uint8_t *best, int64_t tiles4,
              uint8_t *q, double *sig, double *noise) {
    const uint8_t *p = (const uint8_t *)w;
    const int64_t half = nb * 8;
    float tot[128], rc[128];
    for (int c = 0; c < 127; c++) {
        tot[c] = g * lut[c];
        rc[c] = tot[c] >= 0x1p-100f && tot[c] <= 0x1p100f ? 1.0f / tot[c] : 0.0f;
    }
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = p + r * k * ELEM[kind];
        vd8 ss = {0}, nv = {0};
        double nn = 0;
        int64_t j = 0;
        uint8_t *brow = best + (r >> 7) * tiles4 * 512 + 16 * (r & 31) + 4 * ((r >> 5) & 3);
#ifdef NV_GROUPS
        if (n_off == NV_NOFF)
            for (; 16 * (j + 16) <= k; j += 16) {
                uint8_t codes[16];
                nv_group(row, j, k, kind, g, tot, rc, off, &ss, &nv, &nn, codes, q + r * half + 8 * j);
                for (int t = 0; t < 4; t++) memcpy(brow + ((j >> 2) + t) * 512, codes + 4 * t, 4);
            }
#endif
        for (; j < nb; j++) {
            v16 x = load16(row, 16 * j, k, kind), bv;
            float amax = bits_f(amax_bits16(x));
            float b = (amax / 6.0f) / g;
            b = b > 448.0f ? 448.0f : b;
            double be;
            int32_t bc = nv_one(x, (int32_t)e4m3_code(b), tot, rc, off, n_off, &be, &bv);
            brow[(j >> 2) * 512 + (j & 3)] = (uint8_t)bc;
            nv_pack(bv, q + r * half + 8 * j);
            ss = acc_sq(ss, x);
            nn += be;
        }
        sig[r] = hsum8(ss);
        noise[r] = hsum8(nv) + nn;
    }
}

/* next = NULL: rows [r0, r1). Else rows [r0, r1) in slices of chunk rows, each taken by the caller
 * that reaches it first (*next: the rows handed out so far, shared by every thread of one call, so a
 * thread that other work slows down takes fewer; rows are independent, so the split changes nothing). */
void qk_nvfp4(const void *w, int kind, int64_t r0, int64_t r1, int64_t k, int64_t nb, float g,
              const float *lut, const int32_t *off, int n_off, uint8_t *best, int64_t tiles4,
              uint8_t *q, double *sig, double *noise, int64_t *next, int64_t chunk) {
    for (;;) {
        int64_t a = r0, b = r1;
        if (next) {
            a = r0 + __atomic_fetch_add(next, chunk, __ATOMIC_RELAXED);
            if (a >= r1) return;
            b = a + chunk < r1 ? a + chunk : r1;
        }
        if (kind == IN_BF16) qk_nvfp4_t(w, IN_BF16, a, b, k, nb, g, lut, off, n_off, best, tiles4, q, sig, noise);
        else if (kind == IN_F16) qk_nvfp4_t(w, IN_F16, a, b, k, nb, g, lut, off, n_off, best, tiles4, q, sig, noise);
        else qk_nvfp4_t(w, IN_F32, a, b, k, nb, g, lut, off, n_off, best, tiles4, q, sig, noise);
        if (!next) return;
    }
}

/* Largest |w| of each row of rows [r0, r1) as ordered bits (NaN above inf): out[r]. */
void qk_absmax_bits(const void *w, int kind, int64_t r0, int64_t r1, int64_t k, uint32_t *out) {
    const uint8_t *p = (const uint8_t *)w;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = p + r * k * ELEM[kind];
        vu16 m = {0};
        int64_t c = 0;
        if (kind == IN_BF16) {  /* the bf16 bits themselves, 32 at a time: |x| orders as its high half */
            typedef uint16_t vh32 __attribute__((vector_size(64)));
            typedef int16_t vs32 __attribute__((vector_size(64)));
            vh32 mh = {0};
            for (; c + 32 <= k; c += 32) {
                vh32 h;
                memcpy(&h, row + 2 * c, 64);
                h &= 0x7fff;
                vs32 gt = (vs32)(h > mh);
                mh = (h & (vh32)gt) | (mh & ~(vh32)gt);
            }
            vh16 lo, hi;
            memcpy(&lo, &mh, 32);
            memcpy(&hi, (const char *)&mh + 32, 32);
            m = umax16(__builtin_convertvector(lo, vu16) << 16, __builtin_convertvector(hi, vu16) << 16);
        }
        for (; c < k; c += 16) m = umax16(m, (vu16)load16(row, c, k, kind) & 0x7fffffffu);
        out[r] = amax_bits16((v16)m);
    }
}

/* ---------------------------------------------------------------- int8-convrot */

/* Rows [r0, r1): each row upcast to fp32, rotated along K in groups of G = 4^d by the butterfly of
 * formats/_hadamard.rotate (stages from the lowest digit up; s = (a + b) + (c + e), outputs s - 2e,
 * s - 2c, s - 2b, s - 2a; then times 2^-d), per-row scale amax / 127 (1 for a zero row) into
 * scale[r], q = clamp(round_half_even(x / scale), -127, 127). sig: fp64 sum of the row's w^2; noise:
 * of its rotated error (the rotation is orthogonal: the same up to fp32 rounding). ok[r] = 0 where
 * the row holds NaN/Inf. */
ALWAYS void qk_convrot_t(const void *w, const int kind, int64_t r0, int64_t r1, int64_t k, int64_t G, int d, int8_t *q,
                float *scale, double *sig, double *noise, uint8_t *ok) {
    const uint8_t *p = (const uint8_t *)w;
    float *x = (float *)malloc((size_t)k * sizeof(float));
    if (!x) { for (int64_t r = r0; r < r1; r++) ok[r] = 2; return; }
    const float norm = bits_f((uint32_t)(127 - d) << 23);  /* 2^-d */
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = p + r * k * ELEM[kind];
        vd8 ss = {0}, nn = {0};
        uint32_t inb = 0;
        for (int64_t c = 0; c < k; c += 16) {  /* k is a multiple of G >= 16 */
            v16 v = load16(row, c, k, kind);
            ss = acc_sq(ss, v);
            uint32_t a = amax_bits16(v);
            inb = a > inb ? a : inb;
            /* the stages of strides 1 and 4 inside these 16 lanes: p = pair sums, s = (a + b) + (c + e)
             * on every lane of a 4-group (IEEE addition commutes, so each lane holds the same s), then
             * s - 2 * (the lane mirrored in its group) */
            v16 pr = v + LANES_XOR(v, 1);
            v16 sm = pr + LANES_XOR(pr, 2);
            v = sm - 2.0f * LANES_XOR(v, 3);
            if (G >= 16) {
                pr = v + LANES_XOR(v, 4);
                sm = pr + LANES_XOR(pr, 8);
                v = sm - 2.0f * LANES_XOR(v, 12);
            }
            memcpy(x + c, &v, 64);
        }
        ok[r] = inb < 0x7f800000u;
        for (int64_t st = 16; st < G; st *= 4) {
            for (int64_t base = 0; base < k; base += 4 * st) {
                float *y = x + base;
                for (int64_t lo = 0; lo < st; lo++) {
                    float a = y[lo], b = y[lo + st], c = y[lo + 2 * st], e = y[lo + 3 * st];
                    float s = (a + b) + (c + e);
                    y[lo] = s - 2.0f * e;
                    y[lo + st] = s - 2.0f * c;
                    y[lo + 2 * st] = s - 2.0f * b;
                    y[lo + 3 * st] = s - 2.0f * a;
                }
            }
        }
        uint32_t ab = 0;
        for (int64_t c = 0; c < k; c += 16) {
            v16 v;
            memcpy(&v, x + c, 64);
            v = v * norm;
            memcpy(x + c, &v, 64);
            uint32_t a = amax_bits16(v);
            ab = a > ab ? a : ab;
        }
        float amax = bits_f(ab);
        float s = amax == 0.0f ? 1.0f : amax / 127.0f;
        scale[r] = s;
        v16 n2 = {0};
        for (int64_t c = 0; c < k; c += 16) {
            v16 v, t;
            if (c % (16 * RUN) == 0 && c) { nn = flush16(nn, n2); n2 = (v16){0}; }
            memcpy(&v, x + c, 64);
            t = v / s;
            t = (t + 12582912.0f) - 12582912.0f;
            t = vsel(flt(t, fs(-127.0f)), (v16){0} - 127.0f, t);
            t = vsel(fgt(t, fs(127.0f)), (v16){0} + 127.0f, t);
            vb16 qb = (vb16)__builtin_convertvector(__builtin_convertvector(t, vi16), vb16);
            memcpy(q + r * k + c, &qb, 16);
            v16 d = v - t * s;
            n2 += d * d;
        }
        nn = flush16(nn, n2);
        sig[r] = hsum8(ss);
        noise[r] = hsum8(nn);
    }
    free(x);
}

void qk_convrot(const void *w, int kind, int64_t r0, int64_t r1, int64_t k, int64_t G, int d, int8_t *q,
                float *scale, double *sig, double *noise, uint8_t *ok) {
    if (kind == IN_BF16) qk_convrot_t(w, IN_BF16, r0, r1, k, G, d, q, scale, sig, noise, ok);
    else if (kind == IN_F16) qk_convrot_t(w, IN_F16, r0, r1, k, G, d, q, scale, sig, noise, ok);
    else qk_convrot_t(w, IN_F32, r0, r1, k, G, d, q, scale, sig, noise, ok);
}
