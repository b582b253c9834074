/* The whole forward pass of a Llama-architecture decoder in one call, over weights in GGUF's
 * block formats: Q4_1 (per 32 inputs a step d and a minimum m, w = d * q + m, q in 0..15) and
 * Q8_0 (per 32 inputs a scale d, w = d * q, q in -127..127), with activations quantized per 32
 * values to int8 (Q8, as llama.cpp computes these formats).
 *
 * Why here and not in torch: a one-token step of a 135M model is ~900 small tensor operations
 * in torch, and their dispatch cost as much as the products themselves; one C call has none.
 *
 * Exactness: every token is computed with the same instruction sequence whatever the other
 * tokens of the call (products row by row, attention query by query over exactly the keys it
 * sees), so a token's logits are the same bits alone, in a (K+1)-token verify, or beside other
 * sequences' rows. Greedy speculation then equals target-only decoding bit for bit.
 *
 * Vector paths: AVX2 + FMA (maddubs: unsigned x signed bytes), else portable C; the library is
 * compiled on the machine that runs it (-march=native), see specdec/native/__init__.py. It is one
 * file of about 500 lines on purpose, with threads.c beside it (the pool that splits each product's
 * outputs over a service's threads): a single compiler call builds both at first use, with no build
 * system; its parts run top-down from helpers to specdec_forward. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPECDEC_AVX2 1
#endif

#define QK 32

enum { Q4_1 = 0, Q8_0 = 1 };

typedef struct {
    int32_t rows, cols, kind, pad;
    const uint8_t *q; /* [rows, cols / 32, 16 (Q4_1: element i low nibble, i + 16 high) or 32 bytes] */
    const float *d;   /* [rows, cols / 32] */
    const float *m;   /* [rows, cols / 32], Q4_1 only */
} qmatrix;

typedef struct {
    const float *input_norm, *post_norm; /* [hidden] */
    const float *qkv_bias;                /* [(heads + 2 kv_heads) * head_dim] or NULL */
    qmatrix qkv, out, gate_up, down;
} layer_t;

typedef struct {
    int32_t hidden, heads, kv_heads, head_dim, inter, n_layers;
    float eps, rope_scale;
    const float *inv_freq;   /* [head_dim / 2] */
    const float *embedding;  /* [vocab, hidden] */
    const float *final_norm; /* [hidden] */
    qmatrix head;
    const layer_t *layers;
} model_t;

/* Activations of m rows quantized per block of 32: q, the scale d and d * sum(q). */
typedef struct {
    int8_t *q;
    float *d, *s;
} qrows;

const char *specdec_native_isa(void) {
#ifdef SPECDEC_AVX2
    return "avx2";
#else
    return "portable";
#endif
}

#ifdef SPECDEC_AVX2
static inline float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* e^x, x clamped to [-87, 88]: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r,
 * 2^n through the exponent bits; relative error ~2e-7. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

static void quantize_rows(const float *x, int m, int k, qrows out) {
    int nb = k / QK;
    for (int r = 0; r < m; r++) {
        for (int b = 0; b < nb; b++) {
            const float *xb = x + (size_t)r * k + b * QK;
            int8_t *q = out.q + ((size_t)r * nb + b) * QK;
            int sum = 0;
#ifdef SPECDEC_AVX2
            /* the same numbers as the loop below: max is exact in any order, and cvtps rounds half
             * to even as nearbyintf does */
            const __m256 sign = _mm256_set1_ps(-0.f);
            __m256 v[4], top = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xb + 8 * i), top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v[i]));
            __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
            t = _mm_max_ps(t, _mm_movehl_ps(t, t));
            float amax = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
            float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
            __m256 scale = _mm256_set1_ps(id);
            __m256i n[4];
            for (int i = 0; i < 4; i++) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], scale));
            __m256i total = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
            /* packs work within 128-bit lanes: the permute puts the 32 bytes back in order */
            __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
            _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
            float amax = 0.f;
            for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
            float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
            for (int i = 0; i < QK; i++) {
                int v = (int)nearbyintf(xb[i] * id);
                q[i] = (int8_t)v;
                sum += v;
            }
#endif
            out.d[(size_t)r * nb + b] = d;
            out.s[(size_t)r * nb + b] = d * (float)sum;
        }
    }
}

static float dot(const float *a, const float *b, int n) {
#ifdef SPECDEC_AVX2
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = hsum8(acc);
#else
    float sum = 0.f;
    int i = 0;
#endif
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

#ifdef SPECDEC_AVX2
static inline __attribute__((always_inline)) __m256i load_weights(const qmatrix *w, const int kind, size_t block) {
    if (kind == Q4_1) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(w->q + block * 16));
        return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
    }
    return _mm256_loadu_si256((const __m256i *)(w->q + block * 32));
}

/* Outputs n .. n + O - 1 (O <= 2) of w against up to 4 activation rows (O and R constant after
 * inlining: the accumulators stay in registers; x is loaded once for both outputs). */
static inline __attribute__((always_inline)) void dot_rows_o(const qmatrix *w, const int kind, int n, const int O, const int R, const qrows x, int r0,
                                                           float *y, int ldy) {
    const int nb = w->cols / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][4];
    for (int o = 0; o < O; o++)
        for (int t = 0; t < R; t++) acc[o][t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i wq[2], wabs[2];
        __m256 scale[2];
        for (int o = 0; o < O; o++) {
            wq[o] = load_weights(w, kind, (size_t)(n + o) * nb + b);
            wabs[o] = kind == Q4_1 ? wq[o] : _mm256_sign_epi8(wq[o], wq[o]);
            scale[o] = _mm256_broadcast_ss(w->d + (size_t)(n + o) * nb + b);
        }
        for (int t = 0; t < R; t++) {
            size_t xb = (size_t)(r0 + t) * nb + b;
            __m256i xq = _mm256_loadu_si256((const __m256i *)(x.q + xb * QK));
            __m256 dx = _mm256_broadcast_ss(x.d + xb);
            for (int o = 0; o < O; o++) {
                __m256i xs = kind == Q8_0 ? _mm256_sign_epi8(xq, wq[o]) : xq;
                __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[o], xs), ones);
                acc[o][t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), scale[o]), dx, acc[o][t]);
            }
        }
    }
    for (int o = 0; o < O; o++)
        for (int t = 0; t < R; t++) {
            float mins = kind == Q4_1 ? dot(w->m + (size_t)(n + o) * nb, x.s + (size_t)(r0 + t) * nb, nb) : 0.f;
            y[(size_t)(r0 + t) * ldy + n + o] = hsum8(acc[o][t]) + mins;
        }
}
#else
static inline void dot_rows_o(const qmatrix *w, const int kind, int n0, const int O, const int R, const qrows x, int r0, float *y,
                              int ldy) {
    const int nb = w->cols / QK;
    for (int n = n0; n < n0 + O; n++)
    for (int t = 0; t < R; t++) {
        float acc = 0.f;
        for (int b = 0; b < nb; b++) {
            size_t xb = (size_t)(r0 + t) * nb + b, wb = (size_t)n * nb + b;
            int sum = 0;
            for (int i = 0; i < QK; i++) {
                int wq = kind == Q4_1 ? (i < 16 ? w->q[wb * 16 + i] & 15 : w->q[wb * 16 + i - 16] >> 4)
                                         : (int8_t)w->q[wb * 32 + i];
                sum += wq * x.q[xb * QK + i];
            }
            acc += (float)sum * (w->d[wb] * x.d[xb]);
        }
        float mins = kind == Q4_1 ? dot(w->m + (size_t)n * nb, x.s + (size_t)(r0 + t) * nb, nb) : 0.f;
        y[(size_t)(r0 + t) * ldy + n] = acc + mins;
    }
}
#endif

/* y [m, w.rows] = x [m, w.cols] . w^T, x given quantized. Outputs go in pairs and rows in tiles of
 * 4 (the weights of a pair are read once per tile); each (output, row)'s arithmetic is the same in
 * any pair and tile, so a row's result never depends on the other rows. */
/* Outputs n .. n + O - 1 against every row, in tiles of 4 rows (O, kind constant after inlining). */
static inline __attribute__((always_inline)) void outputs_rows(const qmatrix *w, const int kind, int n, const int O, int m, const qrows x,
                                                               float *y) {
    int r0 = 0;
    for (; r0 + 4 <= m; r0 += 4) dot_rows_o(w, kind, n, O, 4, x, r0, y, w->rows);
    switch (m - r0) {
    case 3: dot_rows_o(w, kind, n, O, 3, x, r0, y, w->rows); break;
    case 2: dot_rows_o(w, kind, n, O, 2, x, r0, y, w->rows); break;
    case 1: dot_rows_o(w, kind, n, O, 1, x, r0, y, w->rows); break;
    }
}

static inline __attribute__((always_inline)) void gemm_kind(const qmatrix *w, const int kind, int m, const qrows x, float *y, int n0, int n1) {
    int n = n0;
    for (; n + 2 <= n1; n += 2) outputs_rows(w, kind, n, 2, m, x, y);
    if (n < n1) outputs_rows(w, kind, n, 1, m, x, y);
}

typedef struct {
    const qmatrix *w;
    int m;
    qrows x;
    float *y;
} gemm_job;

/* Part `part` of `parts` of a product: a contiguous range of its outputs (threads.c runs the parts
 * on the pool's threads). An output's arithmetic does not depend on the range it falls in, so the
 * result is the same bits for any number of threads. */
static void gemm_part(void *arg, int part, int parts) {
    const gemm_job *job = arg;
    const int rows = job->w->rows, per = 2 * (((rows + 1) / 2 + parts - 1) / parts);
    const int n0 = per * part, n1 = per * (part + 1) < rows ? per * (part + 1) : rows;
    if (n0 >= n1) return;
    if (job->w->kind == Q4_1)
        gemm_kind(job->w, Q4_1, job->m, job->x, job->y, n0, n1);
    else
        gemm_kind(job->w, Q8_0, job->m, job->x, job->y, n0, n1);
}

typedef void (*part_fn)(void *arg, int part, int parts);
void pool_run(part_fn fn, void *arg); /* threads.c */

static void gemm(const qmatrix *w, int m, const qrows x, float *y) {
    gemm_job job = {w, m, x, y};
    pool_run(gemm_part, &job);
}

static void rms_norm(const float *x, const float *weight, int m, int k, float eps, float *out) {
    for (int r = 0; r < m; r++) {
        const float *xr = x + (size_t)r * k;
        float *o = out + (size_t)r * k;
        float scale = 1.f / sqrtf(dot(xr, xr, k) / (float)k + eps);
        int i = 0;
#ifdef SPECDEC_AVX2
        for (__m256 s8 = _mm256_set1_ps(scale); i + 8 <= k; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), s8), _mm256_loadu_ps(weight + i)));
#endif
        for (; i < k; i++) o[i] = xr[i] * scale * weight[i];
    }
}

/* out [n] = silu(gate) * up */
static void silu_mul(const float *gate, const float *up, int n, float *out) {
    int i = 0;
#ifdef SPECDEC_AVX2
    const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 sig = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, sign))));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(sig, _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) out[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
}

/* cos and sin of each rotary frequency at `position`, scaled: table [head_dim / 2][2]. */
static void rope_table(int head_dim, int position, const float *inv_freq, float rope_scale, float *table) {
    for (int i = 0; i < head_dim / 2; i++) {
        float angle = (float)position * inv_freq[i];
        table[2 * i] = cosf(angle) * rope_scale;
        table[2 * i + 1] = sinf(angle) * rope_scale;
    }
}

/* Rotary embedding of one head vector (Hugging Face's rotate-half convention). */
static void rope(float *x, int head_dim, const float *table) {
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        float c = table[2 * i], s = table[2 * i + 1], a = x[i], b = x[i + half];
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}


/* scores [n] <- e^(scores - max); returns their sum. */
static float softmax_numerators(float *scores, int n) {
    float top = -INFINITY, total = 0.f;
    for (int t = 0; t < n; t++) top = fmaxf(top, scores[t]);
    int t = 0;
#ifdef SPECDEC_AVX2
    __m256 sum = _mm256_setzero_ps(), max8 = _mm256_set1_ps(top);
    for (; t + 8 <= n; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), max8));
        _mm256_storeu_ps(scores + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    total = hsum8(sum);
#endif
    for (; t < n; t++) total += (scores[t] = expf(scores[t] - top));
    return total;
}

/* out [d] = scale * sum over t < n of p[t] * values[t] (rows of d), accumulated in registers. */
static void weighted_sum(const float *p, const float *values, int n, int d, float scale, float *out) {
    int c = 0;
#ifdef SPECDEC_AVX2
    for (; c + 32 <= d; c += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int t = 0; t < n; t++) {
            const float *v = values + (size_t)t * d + c;
            __m256 w = _mm256_set1_ps(p[t]);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v), w, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 8), w, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 16), w, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 24), w, a3);
        }
        __m256 s = _mm256_set1_ps(scale);
        _mm256_storeu_ps(out + c, _mm256_mul_ps(a0, s));
        _mm256_storeu_ps(out + c + 8, _mm256_mul_ps(a1, s));
        _mm256_storeu_ps(out + c + 16, _mm256_mul_ps(a2, s));
        _mm256_storeu_ps(out + c + 24, _mm256_mul_ps(a3, s));
    }
#endif
    for (; c < d; c++) {
        float a = 0.f;
        for (int t = 0; t < n; t++) a += p[t] * values[(size_t)t * d + c];
        out[c] = a * scale;
    }
}

/* scores [n] = scale * (q . keys[t]) for the n keys (rows of d). Eight keys at a time, their dot
 * products reduced together; a tail of fewer than eight repeats a valid key and keeps its own, so
 * every score is summed in the same order. */
static void query_scores(const float *q, const float *keys, int n, int d, float scale, float *scores) {
#ifdef SPECDEC_AVX2
    if (d % 8 == 0) {
        for (int t0 = 0; t0 < n; t0 += 8) {
            __m256 a[8];
            const float *k[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps(), k[i] = keys + (size_t)(t0 + i < n ? t0 + i : t0) * d;
            for (int c = 0; c < d; c += 8) {
                __m256 qc = _mm256_loadu_ps(q + c);
                for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[i] + c), a[i]);
            }
            __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
            __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
            float out[8];
            _mm256_storeu_ps(out, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
            for (int i = 0; i < 8 && t0 + i < n; i++) scores[t0 + i] = out[i];
        }
        return;
    }
#endif
    for (int t = 0; t < n; t++) scores[t] = dot(q, keys + (size_t)t * d, d) * scale;
}

/* A token's keys and values (kv: its qkv row past the queries) into one layer's cache at `position`. */
static void store_kv(const model_t *mo, const float *kv, float *K, float *V, int capacity, int position) {
    const int d = mo->head_dim, kv_size = mo->kv_heads * d;
    for (int g = 0; g < mo->kv_heads; g++) {
        memcpy(K + ((size_t)g * capacity + position) * d, kv + g * d, sizeof(float) * d);
        memcpy(V + ((size_t)g * capacity + position) * d, kv + kv_size + g * d, sizeof(float) * d);
    }
}

/* One query (all heads) over the first `seen` keys and values of one layer's cache. */
static void attend(const model_t *mo, const float *q, const float *keys, const float *values, int capacity, int seen,
                   float *scores, float *out) {
    const int d = mo->head_dim, group = mo->heads / mo->kv_heads;
    const float scale = 1.f / sqrtf((float)d);
    for (int h = 0; h < mo->heads; h++) {
        const float *qh = q + h * d;
        const float *kh = keys + (size_t)(h / group) * capacity * d, *vh = values + (size_t)(h / group) * capacity * d;
        query_scores(qh, kh, seen, d, scale, scores);
        float total = softmax_numerators(scores, seen);
        weighted_sum(scores, vh, seen, d, 1.f / total, out + h * d);
    }
}

static qrows qrows_alloc(int m, int k) {
    qrows r;
    r.q = malloc((size_t)m * k);
    r.d = malloc(sizeof(float) * (size_t)m * (k / QK));
    r.s = malloc(sizeof(float) * (size_t)m * (k / QK));
    return r;
}

static void qrows_free(qrows r) {
    free(r.q), free(r.d), free(r.s);
}

static void gemm_float(const qmatrix *w, int m, const float *x, qrows scratch, float *y) {
    quantize_rows(x, m, w->cols, scratch);
    gemm(w, m, scratch, y);
}

/* Appends new tokens to every sequence of a batch and scores them.
 *   rows sequences; row i has new_tokens[i] tokens after past[i] cached ones (tokens packed, N in all);
 *   keys/values[i * n_layers + l]: row i's layer-l cache [kv_heads, capacity[i], head_dim], room for
 *     past[i] + new_tokens[i] positions (the new keys and values are written there);
 *   logits [n_logit_rows, head.rows] for the packed token indices logit_rows;
 *   features [N, hidden * n_features]: the outputs of decoder layers feature_layers (0-based), side
 *     by side, or NULL;
 *   parents: NULL (every row a chain), or per packed token the index of its parent within its row,
 *     -1 for a row's first token (specdec/trees.py). A token then sits at position past + depth and
 *     attends to the cache and its ancestors: their keys and values are copied to past, past + 1, ..
 *     before it attends (the very call a chain makes over the same keys), and the row's keys and
 *     values end in token order at past, past + 1, .. as a chain's.
 * Returns 0, or -1 when memory runs out. */
int specdec_forward(const model_t *mo, int rows, const int32_t *new_tokens, const int32_t *past, const int32_t *tokens,
                    float *const *keys, float *const *values, const int32_t *capacity, int n_logit_rows,
                    const int32_t *logit_rows, float *logits, int n_features, const int32_t *feature_layers,
                    float *features, const int32_t *parents) {
    const int H = mo->hidden, d = mo->head_dim, q_size = mo->heads * d, kv_size = mo->kv_heads * d;
    const int qkv_size = q_size + 2 * kv_size;
    int N = 0, longest = 0;
    for (int i = 0; i < rows; i++) {
        N += new_tokens[i];
        if (past[i] + new_tokens[i] > longest) longest = past[i] + new_tokens[i];
    }
    int widest = mo->inter > H ? mo->inter : H;
    float *x = malloc(sizeof(float) * (size_t)N * H), *normed = malloc(sizeof(float) * (size_t)N * H);
    float *h = malloc(sizeof(float) * (size_t)N * (qkv_size > 2 * mo->inter ? qkv_size : 2 * mo->inter));
    float *attended = malloc(sizeof(float) * (size_t)N * q_size), *act = malloc(sizeof(float) * (size_t)N * mo->inter);
    float *y = malloc(sizeof(float) * (size_t)N * H), *scores = malloc(sizeof(float) * (size_t)(longest + 1));
    float *rotary = malloc(sizeof(float) * (size_t)N * d);
    int32_t *depth = malloc(sizeof(int32_t) * (size_t)(N ? N : 1));
    qrows scratch = qrows_alloc(N > n_logit_rows ? N : n_logit_rows, widest > q_size ? widest : q_size);
    int failed = !x || !normed || !h || !attended || !act || !y || !scores || !rotary || !scratch.q || !scratch.d || !scratch.s || !depth;
    if (failed) goto done;

    for (int t = 0; t < N; t++) memcpy(x + (size_t)t * H, mo->embedding + (size_t)tokens[t] * H, sizeof(float) * H);
    for (int i = 0, t = 0; i < rows; i++)
        for (int j = 0; j < new_tokens[i]; j++, t++) {
            depth[t] = !parents ? j : parents[t] < 0 ? 0 : depth[t - j + parents[t]] + 1;
            rope_table(d, past[i] + depth[t], mo->inv_freq, mo->rope_scale, rotary + (size_t)t * d);
        }
    for (int l = 0; l < mo->n_layers; l++) {
        const layer_t *L = mo->layers + l;
        rms_norm(x, L->input_norm, N, H, mo->eps, normed);
        gemm_float(&L->qkv, N, normed, scratch, h);
        int t = 0;
        for (int i = 0; i < rows; i++) {
            float *K = keys[(size_t)i * mo->n_layers + l], *V = values[(size_t)i * mo->n_layers + l];
            const int first = t;
            for (int j = 0; j < new_tokens[i]; j++, t++) {
                float *ht = h + (size_t)t * qkv_size;
                if (L->qkv_bias)
                    for (int c = 0; c < qkv_size; c++) ht[c] += L->qkv_bias[c];
                for (int head = 0; head < mo->heads + mo->kv_heads; head++)
                    rope(ht + head * d, d, rotary + (size_t)t * d);
                /* this token's keys and values, then (in a tree) its ancestors' before it: every key
                 * it sees sits at past .. past + depth */
                for (int a = j; a >= 0; a = parents ? parents[first + a] : -1)
                    store_kv(mo, h + (size_t)(first + a) * qkv_size + q_size, K, V, capacity[i], past[i] + depth[first + a]);
                attend(mo, ht, K, V, capacity[i], past[i] + depth[t] + 1, scores, attended + (size_t)t * q_size);
            }
            if (parents) /* the row in token order, as a chain leaves it */
                for (int j = 0; j < new_tokens[i]; j++)
                    store_kv(mo, h + (size_t)(first + j) * qkv_size + q_size, K, V, capacity[i], past[i] + j);
        }
        gemm_float(&L->out, N, attended, scratch, y);
        for (size_t c = 0; c < (size_t)N * H; c++) x[c] += y[c];
        rms_norm(x, L->post_norm, N, H, mo->eps, normed);
        gemm_float(&L->gate_up, N, normed, scratch, h);
        for (int r = 0; r < N; r++) {
            const float *gate = h + (size_t)r * 2 * mo->inter;
            silu_mul(gate, gate + mo->inter, mo->inter, act + (size_t)r * mo->inter);
        }
        gemm_float(&L->down, N, act, scratch, y);
        for (size_t c = 0; c < (size_t)N * H; c++) x[c] += y[c];
        for (int f = 0; f < n_features; f++)
            if (feature_layers[f] == l)
                for (int r = 0; r < N; r++)
                    memcpy(features + ((size_t)r * n_features + f) * H, x + (size_t)r * H, sizeof(float) * H);
    }
    for (int r = 0; r < n_logit_rows; r++) memcpy(y + (size_t)r * H, x + (size_t)logit_rows[r] * H, sizeof(float) * H);
    rms_norm(y, mo->final_norm, n_logit_rows, H, mo->eps, normed);
    gemm_float(&mo->head, n_logit_rows, normed, scratch, logits);
done:
    free(x), free(normed), free(h), free(attended), free(act), free(y), free(scores), free(rotary), free(depth);
    qrows_free(scratch);
    return failed ? -1 : 0;
}

/* y [m, w.rows] = x [m, w.cols] . w^T: one product alone (tests, and timing against torch). */
int specdec_gemm(const qmatrix *w, int m, const float *x, float *y) {
    qrows scratch = qrows_alloc(m, w->cols);
    if (!scratch.q || !scratch.d || !scratch.s) {
        qrows_free(scratch);
        return -1;
    }
    gemm_float(w, m, x, scratch, y);
    qrows_free(scratch);
    return 0;
}
