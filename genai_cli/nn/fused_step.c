/* One decoding step of the causal transformer for a few rows (batch 1 to 4), fp32, on a CPU: every block and the
 * head in one call.
 *
 * At batch 1 a step is ~60 tiny operations (a (1 x d) by (d x 3d) product is 50k multiply-adds), and eager PyTorch
 * pays a dispatch of a few microseconds for each: that, not arithmetic, bounds the characters per second. This
 * file does the same maths as genai_cli/nn/transformer.py's Block.step and the head of models/transformer.py's
 * stepper in plain loops, and is compiled on first use by genai_cli/nn/fused.py with the machine's C compiler
 * (-O3 -march=native: the vector width the CPU has). It reads the model's own weights and writes the key/value
 * cache that the eager code reads and writes too, so the two paths mix freely (a window's slide stays eager).
 *
 * Layouts are PyTorch's: an nn.Linear weight is (out, in) row-major; the cache of one block is (T, n, 3d), row
 * (t, r) the fused q|k|v of position t of text r. Sums run in a different order from ATen's kernels: results agree to float rounding.
 */
#include <math.h>
#include <stdint.h>

enum { LN1W, LN1B, WQKV, BQKV, WPROJ, BPROJ, LN2W, LN2B, W1, B1, W2, B2, PER_LAYER };

typedef struct {
    int64_t d, heads, hidden, layers, vocab;
    const float *tok, *pos, *lnfw, *lnfb, *wout, *bout;
    float eps_f;
    const float *const *w;  /* layers x PER_LAYER pointers, in the enum's order */
    const float *eps;        /* layers x 2: the two norms' eps */
    float *const *cache;     /* layers pointers to (T, 3d) */
    float *scratch;          /* 2 d + hidden + T floats */
} Model;

static void layer_norm(const float *x, const float *w, const float *b, float eps, int64_t n, float *out) {
    float mean = 0.f, var = 0.f;
#pragma omp simd reduction(+:mean)
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= (float)n;
#pragma omp simd reduction(+:var)
    for (int64_t i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    float r = 1.f / sqrtf(var / (float)n + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] - mean) * r * w[i] + b[i];
}

/* For each of n inputs x_r = x + r * xs: out_r[j] (+)= b[j] + W[j, :] . x_r for j < rows, out_r = out + r * os;
 * W (rows, cols) row-major. Four rows of W at a time, each brought in once for all n inputs and kept in L1 while
 * they are used: the weights are read once per step whatever n is. */
static void gemv(const float *w, const float *b, const float *x, int64_t xs, int64_t n, int64_t rows, int64_t cols,
                 float *out, int64_t os, int add) {
    int64_t j = 0;
    for (; j + 4 <= rows; j += 4) {
        const float *r0 = w + j * cols, *r1 = r0 + cols, *r2 = r1 + cols, *r3 = r2 + cols;
        for (int64_t r = 0; r < n; r++) {
            const float *xr = x + r * xs;
            float *o = out + r * os;
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+:a0, a1, a2, a3)
            for (int64_t i = 0; i < cols; i++) {
                a0 += r0[i] * xr[i];
                a1 += r1[i] * xr[i];
                a2 += r2[i] * xr[i];
                a3 += r3[i] * xr[i];
            }
            o[j] = (add ? o[j] : 0.f) + (b[j] + a0);
            o[j + 1] = (add ? o[j + 1] : 0.f) + (b[j + 1] + a1);
            o[j + 2] = (add ? o[j + 2] : 0.f) + (b[j + 2] + a2);
            o[j + 3] = (add ? o[j + 3] : 0.f) + (b[j + 3] + a3);
        }
    }
    for (; j < rows; j++) {
        const float *row = w + j * cols;
        for (int64_t r = 0; r < n; r++) {
            const float *xr = x + r * xs;
            float acc = 0.f;
#pragma omp simd reduction(+:acc)
            for (int64_t i = 0; i < cols; i++) acc += row[i] * xr[i];
            out[r * os + j] = (add ? out[r * os + j] : 0.f) + (b[j] + acc);
        }
    }
}

/* Position pos >= 1 of the window for n rows: row r's previous token is tokens[r * s0 + (pos - 1) * s1] (the
 * window's token ids, int64), against caches holding positions 0..pos-1 ((T, n, 3d): row r of position t at
 * (t n + r) 3d); writes the (n, vocab) logits and position pos's cache rows. Scratch: n (2 d + hidden) + T floats. */
void genai_step(const Model *m, const int64_t *tokens, int64_t s0, int64_t s1, int64_t n, int64_t pos,
                float *logits) {
    const int64_t d = m->d, hd = d / m->heads, three = 3 * d, hid = m->hidden;
    float *x = m->scratch, *h = x + n * d, *hidden = h + n * d, *scores = hidden + n * hid;
    for (int64_t r = 0; r < n; r++) {
        const float *te = m->tok + tokens[r * s0 + (pos - 1) * s1] * d, *pe = m->pos + pos * d;
        for (int64_t i = 0; i < d; i++) x[r * d + i] = te[i] + pe[i];
    }
    const float scale = 1.f / sqrtf((float)hd);
    for (int64_t l = 0; l < m->layers; l++) {
        const float *const *p = m->w + l * PER_LAYER;
        float *cache = m->cache[l], *slots = cache + pos * n * three;
        for (int64_t r = 0; r < n; r++) layer_norm(x + r * d, p[LN1W], p[LN1B], m->eps[2 * l], d, h + r * d);
        gemv(p[WQKV], p[BQKV], h, d, n, three, d, slots, three, 0);  /* q|k|v of this position, into its cache rows */
        /* one query per row and head over keys 0..pos: softmax(q k^T * scale) v, into h (n, d) */
        for (int64_t r = 0; r < n; r++) {
            for (int64_t head = 0; head < m->heads; head++) {
                const float *q = slots + r * three + head * hd;
                float top = -HUGE_VALF, total = 0.f;
                for (int64_t t = 0; t <= pos; t++) {
                    const float *k = cache + (t * n + r) * three + d + head * hd;
                    float s = 0.f;
#pragma omp simd reduction(+:s)
                    for (int64_t i = 0; i < hd; i++) s += q[i] * k[i];
                    scores[t] = s * scale;
                    if (scores[t] > top) top = scores[t];
                }
                for (int64_t t = 0; t <= pos; t++) {
                    scores[t] = expf(scores[t] - top);
                    total += scores[t];
                }
                float *y = h + r * d + head * hd;
                for (int64_t i = 0; i < hd; i++) y[i] = 0.f;
                for (int64_t t = 0; t <= pos; t++) {
                    const float *v = cache + (t * n + r) * three + 2 * d + head * hd;
                    const float a = scores[t] / total;
#pragma omp simd
                    for (int64_t i = 0; i < hd; i++) y[i] += a * v[i];
                }
            }
        }
        gemv(p[WPROJ], p[BPROJ], h, d, n, d, d, x, d, 1);  /* x += proj(y) */
        for (int64_t r = 0; r < n; r++) layer_norm(x + r * d, p[LN2W], p[LN2B], m->eps[2 * l + 1], d, h + r * d);
        gemv(p[W1], p[B1], h, d, n, hid, d, hidden, hid, 0);
        for (int64_t i = 0; i < n * hid; i++)  /* the exact GELU */
            hidden[i] = 0.5f * hidden[i] * (1.f + erff(hidden[i] * 0.7071067811865476f));
        gemv(p[W2], p[B2], hidden, hid, n, d, hid, x, d, 1);  /* x += mlp(...) */
    }
    for (int64_t r = 0; r < n; r++) layer_norm(x + r * d, m->lnfw, m->lnfb, m->eps_f, d, h + r * d);
    gemv(m->wout, m->bout, h, d, n, m->vocab, d, logits, m->vocab, 0);
}
