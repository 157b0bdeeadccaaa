/* quantkit's CPU kernels: the math of quantkit/reference.py, eight lanes at a time.
 *
 * Built at first use by quantkit/kernels/native.py with `cc -O3 -ffp-contract=off`: no FMA
 * contraction and no fast-math, so every fp32 operation rounds as torch's does (IEEE division,
 * one rounding per multiply). The tests hold q and scale to the torch reference bit for bit.
 *
 * Layout: w is [rows, k] row-major, bf16 / fp16 / fp32. A row is quantized in segments that share
 * one scale (the whole row, or b columns of an int8-block tile row). Per row the kernels write the
 * fp64 sums  sum w^2  and  sum (w - q*scale)^2,  q*scale being ComfyUI's fp32 dequantization. Each
 * row's sums are formed in a fixed order, so they do not depend on how rows are split over threads.
 */
#include <stdint.h>
#include <string.h>

enum { IN_F32 = 0, IN_BF16 = 1, IN_F16 = 2 };

#define W 8
/* Bytes ahead of the loads to prefetch: the quantizing loops do enough work per byte that the hardware
 * prefetcher alone leaves them waiting on memory (a 12288 x 3072 int8-tensor pass took 47 ms on one
 * core without, 19-21 ms with; dev box). */
#define PREFETCH 4096
#define ALWAYS static inline __attribute__((always_inline))
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint16_t vu16 __attribute__((vector_size(16)));
typedef double vd __attribute__((vector_size(64)));  /* eight fp64 lanes */
typedef int8_t vi8 __attribute__((vector_size(8)));
typedef uint8_t vu8 __attribute__((vector_size(8)));

static const size_t ELEM[3] = {4, 2, 2};

/* Lane-wise comparisons as masks (-1 true, 0 false), in pieces the target compares natively: GCC turns
 * a comparison of vectors wider than the target's into one scalar compare and branch per lane (an SSE2
 * or NEON build of the 32-byte vectors here: see cpu_blocks.c's note). */
#if defined(__AVX2__)
#define CMP_BYTES 32
#else
#define CMP_BYTES 16
#endif
#define CMP_N (32 / CMP_BYTES)
typedef int16_t vs16x __attribute__((vector_size(32)));
typedef uint16_t vu16x __attribute__((vector_size(32)));
typedef float vf_c __attribute__((vector_size(CMP_BYTES)));
typedef int32_t vi_c __attribute__((vector_size(CMP_BYTES)));
typedef uint32_t vu_c __attribute__((vector_size(CMP_BYTES)));
typedef int16_t vs_c __attribute__((vector_size(CMP_BYTES)));
typedef uint16_t vh_c __attribute__((vector_size(CMP_BYTES)));
#define CMP_FN(name, T, C, R, RC, op)                                        \
    ALWAYS R name(T a, T b) {                                                \
        union { T v; C c[CMP_N]; } x = {a}, y = {b};                         \
        union { R v; RC c[CMP_N]; } r;                                       \
        for (int i = 0; i < CMP_N; i++) r.c[i] = (RC)(x.c[i] op y.c[i]);     \
        return r.v;                                                          \
    }
CMP_FN(flt, vf, vf_c, vi, vi_c, <)
CMP_FN(fgt, vf, vf_c, vi, vi_c, >)
CMP_FN(ueq, vu, vu_c, vi, vi_c, ==)
CMP_FN(ugt, vu, vu_c, vi, vi_c, >)
CMP_FN(uge, vu, vu_c, vi, vi_c, >=)
CMP_FN(hgt, vu16x, vh_c, vs16x, vs_c, >)
#undef CMP_FN

static inline vf vsel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline vu usel(vi mask, vu a, vu b) { return (a & (vu)mask) | (b & ~(vu)mask); }

/* Eight elements as fp32 (exact for every input dtype). */
ALWAYS vf load8(const uint8_t *p, const int kind) {
    if (kind == IN_F32) { vf x; memcpy(&x, p, sizeof x); return x; }
    vu16 h; memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu);
    if (kind == IN_BF16) return (vf)(u << 16);
    /* fp16, in integer steps and one exact conversion, so no fp32 denormal is ever an operand (a
     * thread with flush-to-zero on gets the same values): normals re-biased (+112 on the exponent),
     * subnormals m * 2^-24 (a normal fp32), inf and NaN with the all-ones exponent */
    vu mag = u & 0x7fffu, e = mag & 0x7c00u;
    vu normal = (mag << 13) + (112u << 23);
    vu sub = (vu)(__builtin_convertvector((vi)mag, vf) * 0x1p-24f);
    vu special = (mag << 13) | 0x7f800000u;
    vu x = usel(ueq(e, (vu){0}), sub, usel(ueq(e, (vu){0} + 0x7c00u), special, normal));
    return (vf)(x | ((u & 0x8000u) << 16));
}

static inline float bits_to_amax(uint32_t m, int kind) {
    float f;
    if (kind == IN_BF16) { m <<= 16; memcpy(&f, &m, 4); return f; }
    if (kind == IN_F16) {  /* |w| bits of an fp16 value, converted as in load8 */
        uint32_t e = m & 0x7c00u, b = e == 0x7c00u ? (m << 13) | 0x7f800000u : (m << 13) + (112u << 23);
        if (e == 0) return (float)m * 0x1p-24f;
        memcpy(&f, &b, 4);
        return f;
    }
    memcpy(&f, &m, 4);
    return f;
}

/* Largest |w| over n consecutive elements starting at p, as ordered bits: |w|'s bit pattern read as
 * an unsigned integer orders like |w|, and NaN sorts above inf, so the max carries NaN through as
 * torch's amax does. Four accumulators keep the max chains independent. */
static inline vu16x max16(vu16x a, vu16x b) { vu16x m = (vu16x)hgt(a, b); return (a & m) | (b & ~m); }
static inline vu max32(vu a, vu b) { return usel(ugt(a, b), a, b); }

static uint32_t seg_amax_bits(const uint8_t *p, int kind, int64_t n) {
    uint32_t r = 0;
    int64_t j = 0;
    if (kind == IN_F32) {
        vu m[4] = {{0}};
        for (; j + 4 * W <= n; j += 4 * W) {
            __builtin_prefetch(p + j * 4 + PREFETCH);
            __builtin_prefetch(p + j * 4 + PREFETCH + 64);
            for (int u = 0; u < 4; u++) {
                vu a;
                memcpy(&a, p + (j + u * W) * 4, sizeof a);
                m[u] = max32(m[u], a & 0x7fffffffu);
            }
        }
        vu t = max32(max32(m[0], m[1]), max32(m[2], m[3]));
        for (int l = 0; l < W; l++) r = t[l] > r ? t[l] : r;
        for (; j < n; j++) {
            uint32_t a;
            memcpy(&a, p + j * 4, 4);
            a &= 0x7fffffffu;
            r = a > r ? a : r;
        }
        return r;
    }
    const int L16 = 16;
    vu16x m[4] = {{0}};
    for (; j + 4 * L16 <= n; j += 4 * L16) {
        __builtin_prefetch(p + j * 2 + PREFETCH);
        __builtin_prefetch(p + j * 2 + PREFETCH + 64);
        for (int u = 0; u < 4; u++) {
            vu16x a;
            memcpy(&a, p + (j + u * L16) * 2, sizeof a);
            m[u] = max16(m[u], a & (uint16_t)0x7fff);
        }
    }
    vu16x t = max16(max16(m[0], m[1]), max16(m[2], m[3]));
    for (int l = 0; l < L16; l++) r = t[l] > r ? t[l] : r;
    for (; j < n; j++) {
        uint16_t h;
        memcpy(&h, p + j * 2, 2);
        h &= 0x7fffu;
        r = h > r ? h : r;
    }
    return r;
}

/* Largest |w| of a b x b tile (row stride k), as ordered bits. 16-bit inputs with b a multiple of 16
 * take a column-wise max over the tile's rows first, so there is one horizontal max per tile. */
static uint32_t tile_amax_bits(const uint8_t *p, int kind, int64_t b, int64_t k) {
    uint32_t r = 0;
    if (kind == IN_F32 || b % 16 || b > 256) {
        for (int64_t i = 0; i < b; i++) {
            uint32_t a = seg_amax_bits(p + i * k * ELEM[kind], kind, b);
            r = a > r ? a : r;
        }
        return r;
    }
    vu16x m[16] = {{0}};
    const int64_t nv = b / 16;
    for (int64_t i = 0; i < b; i++)
        for (int64_t v = 0; v < nv; v++) {
            vu16x a;
            memcpy(&a, p + (i * k + v * 16) * 2, sizeof a);
            m[v] = max16(m[v], a & (uint16_t)0x7fff);
        }
    for (int64_t v = 1; v < nv; v++) m[0] = max16(m[0], m[v]);
    for (int l = 0; l < 16; l++) r = m[0][l] > r ? m[0][l] : r;
    return r;
}

/* Quantize eight fp32 values w by scale s: q bytes into *out, the fp32 dequantization into *deq. */
ALWAYS void quant8(vf w, vf s, vf hi, const int is_int, const int man_bits, const int bias, vu8 *out, vf *deq) {
    vf x = w / s;
    const vf lo = -hi;
    if (is_int) {
        /* round half to even: exact for |x| < 2^22; larger values clamp to +-qmax either way */
        const vf magic = (vf){0} + 12582912.0f;
        x = (x + magic) - magic;
        x = vsel(flt(x, lo), lo, x);
        x = vsel(fgt(x, hi), hi, x);
        *out = (vu8)__builtin_convertvector(__builtin_convertvector(x, vi), vi8);
        *deq = x * s;
        return;
    }
    x = vsel(flt(x, lo), lo, x);
    x = vsel(fgt(x, hi), hi, x);
    const int shift = 23 - man_bits;
    vu u = (vu)x;
    vu sign = u & 0x80000000u;
    vu a = u & 0x7fffffffu;
    /* normal: round the fp32 mantissa to man_bits bits, half to even (a carry bumps the exponent) */
    vu rn = (a + ((1u << (shift - 1)) - 1) + ((a >> shift) & 1u)) >> shift;
    /* subnormal: the value is m * 2^(1 - bias - man_bits); m = round_half_even(|x| * 2^(bias - 1 + man_bits)),
     * m == 2^man_bits being the smallest normal's code */
    const float sub = (float)(1u << (bias - 1 + man_bits));
    vu m = (vu)((vf)a * sub + 8388608.0f) - 0x4B000000u;
    vi normal = uge(a, (vu){0} + ((uint32_t)(128 - bias) << 23));
    vu code = usel(normal, rn - ((uint32_t)(127 - bias) << man_bits), m);
    *out = __builtin_convertvector(code | (sign >> 24), vu8);
    vf qv = vsel(normal, (vf)(rn << shift), __builtin_convertvector((vi)m, vf) * (1.0f / sub));
    *deq = (vf)((vu)qv | sign) * s;
}

/* Quantize n consecutive elements with one scale. The squares are summed in fp32 over runs of RUN
 * vectors, each run's sums then added in fp64. w - q*scale is exact in fp32 (the two lie within a
 * factor of two of each other, or q is 0), so a run's sums are within ~RUN x 2^-24 of exact. */
#define RUN 16
ALWAYS void seg_quant_t(const uint8_t *p, int64_t n, float scale, float qmax, uint8_t *q, vd *sig, vd *noise,
                        const int kind, const int is_int, const int man_bits, const int bias) {
    const size_t es = ELEM[kind];
    const vf s = (vf){0} + scale, hi = (vf){0} + qmax;
    vd ss = *sig, nn = *noise;  /* locals: q's bytes may alias anything */
    vu8 c;
    vf d;
    int64_t j = 0;
    while (j + W <= n) {
        vf s2 = {0}, n2 = {0};
        for (int i = 0; i < RUN && j + W <= n; i++, j += W) {
            __builtin_prefetch(p + j * es + PREFETCH);
            vf w = load8(p + j * es, kind);
            quant8(w, s, hi, is_int, man_bits, bias, &c, &d);
            memcpy(q + j, &c, W);
            vf e = w - d;
            s2 += w * w;
            n2 += e * e;
        }
        ss += __builtin_convertvector(s2, vd);
        nn += __builtin_convertvector(n2, vd);
    }
    if (j < n) {  /* the tail, zero-padded: zeros add nothing to either sum */
        uint8_t buf[W * 4] = {0};
        memcpy(buf, p + j * es, (size_t)(n - j) * es);
        vf w = load8(buf, kind);
        quant8(w, s, hi, is_int, man_bits, bias, &c, &d);
        memcpy(q + j, &c, (size_t)(n - j));
        vf e = w - d;
        ss += __builtin_convertvector(w * w, vd);
        nn += __builtin_convertvector(e * e, vd);
    }
    *sig = ss;
    *noise = nn;
}

/* One compiled loop per (input dtype, format): the constants fold into straight-line vector code. */
#define SEG(K) \
    if (is_int) seg_quant_t(p, n, scale, qmax, q, sig, noise, K, 1, 0, 0); \
    else if (man_bits == 3) seg_quant_t(p, n, scale, qmax, q, sig, noise, K, 0, 3, 7); \
    else seg_quant_t(p, n, scale, qmax, q, sig, noise, K, 0, 2, 15);

static void seg_quant(const uint8_t *p, int kind, int64_t n, float scale, float qmax, int is_int, int man_bits,
                      uint8_t *q, vd *sig, vd *noise) {
    if (kind == IN_BF16) { SEG(IN_BF16) }
    else if (kind == IN_F16) { SEG(IN_F16) }
    else { SEG(IN_F32) }
}

static double hsum(vd v) {
    double t = 0;
    for (int l = 0; l < W; l++) t += v[l];
    return t;
}

static inline float scale_of(float amax, float qmax) {
    return amax == 0.0f ? 1.0f : amax / qmax;  /* reference.scale_from_amax; NaN stays NaN */
}

/* Per-row amax of rows [r0, r1): out[r]. */
void qk_row_amax(const void *w, int kind, int64_t r0, int64_t r1, int64_t k, float *out) {
    const uint8_t *p = (const uint8_t *)w;
    for (int64_t r = r0; r < r1; r++) out[r] = bits_to_amax(seg_amax_bits(p + r * k * ELEM[kind], kind, k), kind);
}

/* Quantize rows [r0, r1) of w [rows, k]: int8 (is_int), else fp8 with man_bits 3 (e4m3fn, exponent
 * bias 7) or 2 (e5m2, bias 15).
 *   gran 0: one scale, scales[0], given.
 *   gran 1: a scale per row, computed here into scales[r].
 *   gran 2: a scale per b x b tile, computed here into scales[(r / b) * (k / b) + c]; r0, r1 and k are
 *           multiples of b.
 * q: rows x k bytes; sig, noise: fp64 sums per row. */
void qk_quantize(const void *w, int kind, int64_t r0, int64_t r1, int64_t k, int gran, int64_t b,
                 int is_int, int man_bits, float qmax, float *scales, uint8_t *q, double *sig, double *noise) {
    const uint8_t *p = (const uint8_t *)w;
    const size_t es = ELEM[kind];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = p + r * k * es;
        if (gran == 1) scales[r] = scale_of(bits_to_amax(seg_amax_bits(row, kind, k), kind), qmax);
        if (gran == 2 && r % b == 0) {
            const int64_t nb = k / b;
            float *ts = scales + (r / b) * nb;
            for (int64_t c = 0; c < nb; c++) {
                ts[c] = scale_of(bits_to_amax(tile_amax_bits(p + (r * k + c * b) * es, kind, b, k), kind), qmax);
            }
        }
        vd ss = {0}, nn = {0};
        if (gran == 2) {
            const float *ts = scales + (r / b) * (k / b);
            for (int64_t c = 0; c < k / b; c++)
                seg_quant(row + c * b * es, kind, b, ts[c], qmax, is_int, man_bits, q + r * k + c * b, &ss, &nn);
        } else {
            seg_quant(row, kind, k, gran == 0 ? scales[0] : scales[r], qmax, is_int, man_bits, q + r * k, &ss, &nn);
        }
        sig[r] = hsum(ss);
        noise[r] = hsum(nn);
    }
}

/* Learned rounding's trailing update (quantkit/learned.py trailing_update): for rows r0 .. r1-1,
 * w[r, c] -= e[r, i] * u[i, c] for i = 0 .. t-1 in that order, each product and difference rounded
 * once (no contraction), so the bytes are the torch loop's and the Triton chain's on any machine and
 * thread count. Columns go in runs of 64 held in registers while the chain runs; u's run (t x 64) is
 * reused by every row. */
#define CHAIN 64
void qk_rank1_chain(float *w, int64_t ldw, const float *e, int64_t lde, const float *u, int64_t ldu,
                    int64_t r0, int64_t r1, int64_t width, int64_t t) {
    for (int64_t c0 = 0; c0 < width; c0 += CHAIN) {
        const int64_t cn = width - c0 < CHAIN ? width - c0 : CHAIN;
        for (int64_t r = r0; r < r1; r++) {
            float *wr = w + r * ldw + c0;
            const float *er = e + r * lde;
            if (cn == CHAIN) {
                vf acc[CHAIN / W];
                memcpy(acc, wr, sizeof acc);
                for (int64_t i = 0; i < t; i++) {
                    const float ei = er[i];
                    const vf ev = {ei, ei, ei, ei, ei, ei, ei, ei};
                    const float *ui = u + i * ldu + c0;
                    for (int v = 0; v < CHAIN / W; v++) {
                        vf uv;
                        memcpy(&uv, ui + v * W, sizeof uv);
                        acc[v] = acc[v] - ev * uv;
                    }
                }
                memcpy(wr, acc, sizeof acc);
            } else {
                for (int64_t i = 0; i < t; i++) {
                    const float ei = er[i];
                    const float *ui = u + i * ldu + c0;
                    for (int64_t j = 0; j < cn; j++) wr[j] = wr[j] - ei * ui[j];
                }
            }
        }
    }
}
