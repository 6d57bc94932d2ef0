/* One decoding step of the causal transformer at batch 1, fp32, on a CPU: every block and the head in one call.
 *
 * At batch 1 a step is ~60 tiny operations (a (1 x d) by (d x 3d) product is 50k multiply-adds), and eager PyTorch
 * pays a dispatch of a few microseconds for each: that, not arithmetic, bounds the characters per second. This
 * file does the same maths as genai_cli/nn/transformer.py's Block.step and the head of models/transformer.py's
 * stepper in plain loops, and is compiled on first use by genai_cli/nn/fused.py with the machine's C compiler
 * (-O3 -march=native: the vector width the CPU has). It reads the model's own weights and writes the key/value
 * cache that the eager code reads and writes too, so the two paths mix freely (a window's slide stays eager).
 *
 * Layouts are PyTorch's: an nn.Linear weight is (out, in) row-major; the cache of one block is (T, 3d), row t the
 * fused q|k|v of position t. Sums run in a different order from ATen's kernels: results agree to float rounding.
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

/* out[j] (+)= b[j] + W[j, :] . x for j < rows: W (rows, cols) row-major. Four rows at a time share each load of x. */
static void gemv(const float *w, const float *b, const float *x, int64_t rows, int64_t cols, float *out, int add) {
    int64_t j = 0;
    for (; j + 4 <= rows; j += 4) {
        const float *r0 = w + j * cols, *r1 = r0 + cols, *r2 = r1 + cols, *r3 = r2 + cols;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+:a0, a1, a2, a3)
        for (int64_t i = 0; i < cols; i++) {
            a0 += r0[i] * x[i];
            a1 += r1[i] * x[i];
            a2 += r2[i] * x[i];
            a3 += r3[i] * x[i];
        }
        out[j] = (add ? out[j] : 0.f) + (b[j] + a0);
        out[j + 1] = (add ? out[j + 1] : 0.f) + (b[j + 1] + a1);
        out[j + 2] = (add ? out[j + 2] : 0.f) + (b[j + 2] + a2);
        out[j + 3] = (add ? out[j + 3] : 0.f) + (b[j + 3] + a3);
    }
    for (; j < rows; j++) {
        const float *row = w + j * cols;
        float acc = 0.f;
#pragma omp simd reduction(+:acc)
        for (int64_t i = 0; i < cols; i++) acc += row[i] * x[i];
        out[j] = (add ? out[j] : 0.f) + (b[j] + acc);
    }
}


/* Position pos >= 1 of the window, whose previous token is tokens[(pos - 1) * stride] (the window's token ids,
 * int64), against caches holding positions 0..pos-1; writes the (vocab,) logits and position pos's cache rows. */
void genai_step(const Model *m, const int64_t *tokens, int64_t stride, int64_t pos, float *logits) {
    const int64_t previous = tokens[(pos - 1) * stride];
    const int64_t d = m->d, hd = d / m->heads, three = 3 * d;
    float *x = m->scratch, *h = x + d, *hidden = h + d, *scores = hidden + m->hidden;
    const float *te = m->tok + previous * d, *pe = m->pos + pos * d;
    for (int64_t i = 0; i < d; i++) x[i] = te[i] + pe[i];
    const float scale = 1.f / sqrtf((float)hd);
    for (int64_t l = 0; l < m->layers; l++) {
        const float *const *p = m->w + l * PER_LAYER;
        float *cache = m->cache[l], *slot = cache + pos * three;
        layer_norm(x, p[LN1W], p[LN1B], m->eps[2 * l], d, h);
        gemv(p[WQKV], p[BQKV], h, three, d, slot, 0);  /* q|k|v of this position, into its cache row */
        /* one query per head over keys 0..pos: softmax(q k^T * scale) v, into h (d) */
        for (int64_t head = 0; head < m->heads; head++) {
            const float *q = slot + head * hd;
            float top = -HUGE_VALF, total = 0.f;
            for (int64_t t = 0; t <= pos; t++) {
                const float *k = cache + t * three + d + head * hd;
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
            float *y = h + head * hd;
            for (int64_t i = 0; i < hd; i++) y[i] = 0.f;
            for (int64_t t = 0; t <= pos; t++) {
                const float *v = cache + t * three + 2 * d + head * hd;
                const float a = scores[t] / total;
#pragma omp simd
                for (int64_t i = 0; i < hd; i++) y[i] += a * v[i];
            }
        }
        gemv(p[WPROJ], p[BPROJ], h, d, d, x, 1);  /* x += proj(y) */
        layer_norm(x, p[LN2W], p[LN2B], m->eps[2 * l + 1], d, h);
        gemv(p[W1], p[B1], h, m->hidden, d, hidden, 0);
        for (int64_t i = 0; i < m->hidden; i++) hidden[i] = 0.5f * hidden[i] * (1.f + erff(hidden[i] * 0.7071067811865476f));  /* exact GELU */
        gemv(p[W2], p[B2], hidden, d, m->hidden, x, 1);  /* x += mlp(...) */
    }
    layer_norm(x, m->lnfw, m->lnfb, m->eps_f, d, h);
    gemv(m->wout, m->bout, h, m->vocab, d, logits, 0);
}
