/* sampler: logits -> next token, with vLLM V1's semantics for the OpenAI sampling fields.
 *
 * Workload: a vocabulary of ~129k, ~200 sequences per step, one call per sequence per step on
 * the engine thread (or on a few samplers in parallel). What the code assumes, and why:
 *
 * - Every filter keeps a prefix of one order. Sort the candidates by (processed logit desc, id
 *   asc): min_p keeps the values >= a threshold, top_k the values >= the k-th largest (ties
 *   kept, as vLLM's masked_fill does), top_p the shortest prefix holding enough mass, and the
 *   draw takes, among the kept tokens in id order, the first whose running mass exceeds
 *   u * total (id order, not probability order: see the draw in run() for why). So min_p and
 *   top_k are two value thresholds (applying both keeps the values above the larger one: the set
 *   vLLM gets applying them one after the other), and top_p is "the prefix whose running sum
 *   reaches a target".
 * - The vocabulary is never sorted, and neither is most of the nucleus. One pass computes the
 *   mass of the kept tokens in a histogram over bins of x (width 1/4, so weights within a bin
 *   differ by less than e^0.25; the last bin open-ended). Bins are ranges of x, so in (x desc)
 * order bin b's tokens come after all of bin b-1's: the running mass at the end of each bin is just
 *   a prefix sum of the histogram. The top_p target (top_p * total) therefore falls in a bin
 *   found without sorting anything, and only that one bin is collected (one pass) and sorted to
 *   walk the running sum to the exact token. A call costs O(V) plus the sort of one bin, whatever
 *   the entropy: a flat distribution spreads its tokens over many bins (only logits equal to
 *   within 1/4 * T crowd one bin: then it sorts them); the draw itself is one walk in id order
 *   up to the drawn token. (The running sums are the same masses added in another order than a
 *   sorted walk would; they differ by rounding only.)
 * - top_k's threshold, the k-th largest x, comes from a size-k min-heap filled during the
 *   temperature pass: one predictable compare per token, heap work only for the few that beat
 *   the current k-th (about k (1 + ln(V / k)) of them on logits in no particular order).
 * - Penalties need per-token counts of the history: scratch arrays that are zero between calls
 *   are counted up from the history and reset through the list of the distinct ids touched,
 *   so the cost is O(n_prompt + n_output), never O(vocab) per call.
 * - Randomness is counter-based: u = hash(seed, step). No state is carried per request, and the
 *   token drawn at step i depends on (seed, i, processed distribution) only, never on the batch.
 * - Precision: logits and x in f32 (vLLM samples in float32 too), each token's e^x computed once
 *   (exp_f32: expf, or within 2.1e-7 of it on SIMD tables), every sum in f64.
 *   tests/engine/test_sampler.c checks it against a double, full-sort reference.
 * - Nothing is allocated per call; the scratch (~37 bytes per token) belongs to the sampler. */
#include "engine/engine.h"
#include "kernels/kernels.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define NBINS 128           /* mass histogram over x in (-32, 0], the last bin open-ended */
#define BINS_PER_UNIT 4.0f  /* bin width 1/4 in x: weights within a bin differ by < e^0.25 */
#define INSERTION_CUTOFF 16 /* the sort finishes short ranges by insertion */

/* Tests set this to a small depth to force the heapsort fallback of the sort below (reached
 * otherwise only by crafted inputs); -1: the normal limit. Not part of the API. */
int ds_sampler__fallback_depth = -1;

typedef struct {
    float x; /* processed, temperature-scaled logit minus the max (<= 0) */
    int32_t id;
} cand;

struct ds_sampler {
    int32_t vocab;
    float *w;           /* (vocab) processed logits, then x = (w - max) * (1 / T) in place */
    float *ex;          /* (vocab) the weights e^x */
    int32_t *count;     /* (vocab) occurrences in the output; all 0 between calls */
    uint8_t *in_prompt; /* (vocab) 1 for prompt tokens; all 0 between calls */
    int32_t *touched;   /* (vocab) the distinct ids counted or marked in this call */
    float *heap;        /* (vocab) top_k's min-heap of the k largest x */
    cand *cand;         /* (vocab) one bin's kept tokens, x desc then id */
    double *cum;        /* (vocab) running mass at each of them */
    /* per call */
    float thr;                /* a token is kept by min_p and top_k iff x >= thr */
    double bin_mass[NBINS];   /* mass of the kept tokens per bin, summed in id order */
    double prefix[NBINS + 1]; /* prefix[b] = mass of bins [0, b) */
};

/* ---- parameters ---------------------------------------------------------------------------- */

ds_sampling_params ds_sampling_default_params(void) {
    ds_sampling_params p;
    memset(&p, 0, sizeof p);
    p.temperature = 1.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repetition_penalty = 1.0f;
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.0f;
    p.logit_bias = NULL;
    p.n_logit_bias = 0;
    p.min_tokens = 0;
    p.stop_ids = NULL;
    p.n_stop_ids = 0;
    p.seed = 0;
    p.logprobs = -1;
    return p;
}

/* Comparisons are written so that NaN fails them: !(v >= lo && v <= hi) refuses NaN. */
int ds_sampling_params_validate(const ds_sampling_params *p, int32_t vocab) {
    if (!p) return ds_err_set(DS_ERR_ARG, "sampling parameters are NULL");
    if (vocab <= 0) return ds_err_set(DS_ERR_ARG, "vocabulary size %d: must be > 0", (int)vocab);
    if (!(isfinite(p->temperature) && p->temperature >= 0))
        return ds_err_set(DS_ERR_ARG, "temperature = %g: must be a finite number >= 0",
                          (double)p->temperature);
    if (!(p->top_p > 0 && p->top_p <= 1))
        return ds_err_set(DS_ERR_ARG, "top_p = %g: must be in (0, 1]", (double)p->top_p);
    if (!(p->min_p >= 0 && p->min_p <= 1))
        return ds_err_set(DS_ERR_ARG, "min_p = %g: must be in [0, 1]", (double)p->min_p);
    if (!(isfinite(p->repetition_penalty) && p->repetition_penalty > 0))
        return ds_err_set(DS_ERR_ARG, "repetition_penalty = %g: must be a finite number > 0",
                          (double)p->repetition_penalty);
    if (!(p->frequency_penalty >= -2 && p->frequency_penalty <= 2))
        return ds_err_set(DS_ERR_ARG, "frequency_penalty = %g: must be in [-2, 2]",
                          (double)p->frequency_penalty);
    if (!(p->presence_penalty >= -2 && p->presence_penalty <= 2))
        return ds_err_set(DS_ERR_ARG, "presence_penalty = %g: must be in [-2, 2]",
                          (double)p->presence_penalty);
    if (p->n_logit_bias < 0)
        return ds_err_set(DS_ERR_ARG, "n_logit_bias = %d: must be >= 0", (int)p->n_logit_bias);
    if (p->n_logit_bias > 0 && !p->logit_bias)
        return ds_err_set(DS_ERR_ARG, "logit_bias is NULL but n_logit_bias = %d",
                          (int)p->n_logit_bias);
    for (int32_t i = 0; i < p->n_logit_bias; i++) {
        const ds_logit_bias *b = &p->logit_bias[i];
        if (b->token < 0 || b->token >= vocab)
            return ds_err_set(DS_ERR_ARG,
                              "logit_bias[%d].token = %d: outside the vocabulary [0, %d)", (int)i,
                              (int)b->token, (int)vocab);
        if (!(b->bias >= -DS_SAMPLER_MAX_BIAS && b->bias <= DS_SAMPLER_MAX_BIAS))
            return ds_err_set(DS_ERR_ARG,
                              "logit_bias[%d].bias = %g (token %d): must be in [-100, 100]", (int)i,
                              (double)b->bias, (int)b->token);
    }
    if (p->min_tokens < 0)
        return ds_err_set(DS_ERR_ARG, "min_tokens = %d: must be >= 0", (int)p->min_tokens);
    if (p->n_stop_ids < 0)
        return ds_err_set(DS_ERR_ARG, "n_stop_ids = %d: must be >= 0", (int)p->n_stop_ids);
    if (p->n_stop_ids > 0 && !p->stop_ids)
        return ds_err_set(DS_ERR_ARG, "stop_ids is NULL but n_stop_ids = %d", (int)p->n_stop_ids);
    for (int32_t i = 0; i < p->n_stop_ids; i++)
        if (p->stop_ids[i] < 0 || p->stop_ids[i] >= vocab)
            return ds_err_set(DS_ERR_ARG, "stop_ids[%d] = %d: outside the vocabulary [0, %d)",
                              (int)i, (int)p->stop_ids[i], (int)vocab);
    if (p->logprobs < -1 || p->logprobs > DS_SAMPLER_MAX_LOGPROBS)
        return ds_err_set(DS_ERR_ARG, "logprobs = %d: must be -1 (none) or in [0, %d]",
                          (int)p->logprobs, DS_SAMPLER_MAX_LOGPROBS);
    return DS_OK;
}

/* ---- randomness ------------------------------------------------------------------------------
 * The key is the seed through MurmurHash3's 64-bit finalizer (after an xor, since the finalizer
 * fixes 0); the draw is SplitMix64's output function at the key's Weyl-sequence position
 * step + 1. For one seed, steps map one-to-one onto 64-bit outputs; distinct seeds start at
 * unrelated positions of the 2^64 cycle. Both finalizers are bijections with full avalanche. */
static uint64_t fmix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static uint64_t splitmix64_out(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

double ds_sampler_uniform(uint64_t seed, uint64_t step) {
    uint64_t key = fmix64(seed ^ 0x2545f4914f6cdd1dULL);
    uint64_t h = splitmix64_out(key + (step + 1) * 0x9e3779b97f4a7c15ULL);
    return (double)(h >> 11) * 0x1.0p-53; /* 53 bits: every value exact, < 1 */
}

/* ---- open / close ---------------------------------------------------------------------------- */

int ds_sampler_open(int32_t vocab, ds_sampler **out) {
    if (!out) return ds_err_set(DS_ERR_ARG, "ds_sampler_open: out is NULL");
    *out = NULL;
    if (vocab <= 0)
        return ds_err_set(DS_ERR_ARG, "sampler vocabulary size %d: must be > 0", (int)vocab);
    ds_sampler *s = ds_alloc(sizeof *s);
    if (!s) return ds_err_set(DS_ERR_NOMEM, "out of memory for a sampler");
    size_t n = (size_t)vocab;
    s->vocab = vocab;
    s->w = ds_alloc(n * sizeof *s->w);
    s->ex = ds_alloc(n * sizeof *s->ex);
    s->count = ds_alloc(n * sizeof *s->count); /* ds_alloc zeroes: the between-calls state */
    s->in_prompt = ds_alloc(n * sizeof *s->in_prompt);
    s->touched = ds_alloc(n * sizeof *s->touched);
    s->heap = ds_alloc(n * sizeof *s->heap);
    s->cand = ds_alloc(n * sizeof *s->cand);
    s->cum = ds_alloc(n * sizeof *s->cum);
    if (!s->w || !s->ex || !s->count || !s->in_prompt || !s->touched || !s->heap || !s->cand ||
        !s->cum) {
        ds_sampler_close(s);
        return ds_err_set(DS_ERR_NOMEM, "out of memory for a sampler of %d tokens", (int)vocab);
    }
    *out = s;
    return DS_OK;
}

void ds_sampler_close(ds_sampler *s) {
    if (!s) return;
    ds_free(s->w);
    ds_free(s->ex);
    ds_free(s->count);
    ds_free(s->in_prompt);
    ds_free(s->touched);
    ds_free(s->heap);
    ds_free(s->cand);
    ds_free(s->cum);
    ds_free(s);
}

int32_t ds_sampler_vocab(const ds_sampler *s) {
    return s ? s->vocab : 0;
}

/* ---- small sorting tools (no allocation; keys are unique, so any correct sort agrees) ------- */

/* The nucleus order: x descending, then id ascending. */
static inline int cand_before(cand a, cand b) {
    return a.x > b.x || (a.x == b.x && a.id < b.id);
}

static inline void cand_swap(cand *a, cand *b) {
    cand t = *a;
    *a = *b;
    *b = t;
}

static void cand_sift(cand *a, int64_t root, int64_t n) {
    for (;;) {
        int64_t c = 2 * root + 1;
        if (c >= n) return;
        if (c + 1 < n && cand_before(a[c], a[c + 1])) c++; /* heap with the LAST element on top */
        if (!cand_before(a[root], a[c])) return;
        cand_swap(&a[c], &a[root]);
        root = c;
    }
}

/* Heapsort fallback of the introsort: O(n log n) whatever the input. */
static void cand_heapsort(cand *a, int64_t n) {
    for (int64_t i = n / 2 - 1; i >= 0; i--) cand_sift(a, i, n);
    for (int64_t end = n - 1; end > 0; end--) {
        cand_swap(&a[0], &a[end]);
        cand_sift(a, 0, end);
    }
}

/* Introsort in nucleus order: quicksort (median of three), insertion sort for short ranges,
 * heapsort once the recursion gets deeper than 2 log2 n. */
static void cand_sort_rec(cand *a, int64_t n, int depth) {
    while (n > INSERTION_CUTOFF) {
        if (depth-- == 0) {
            cand_heapsort(a, n);
            return;
        }
        int64_t mid = n / 2;
        /* order a[0], a[mid], a[n-1]; the median goes to a[mid] */
        if (cand_before(a[mid], a[0])) cand_swap(&a[mid], &a[0]);
        if (cand_before(a[n - 1], a[mid])) {
            cand_swap(&a[n - 1], &a[mid]);
            if (cand_before(a[mid], a[0])) cand_swap(&a[mid], &a[0]);
        }
        cand pivot = a[mid];
        int64_t i = 0, j = n - 1;
        for (;;) { /* Hoare partition; the sentinels a[0] and a[n-1] bound both scans */
            while (cand_before(a[i], pivot)) i++;
            while (cand_before(pivot, a[j])) j--;
            if (i >= j) break;
            cand_swap(&a[i++], &a[j--]);
        }
        /* [0, j] before-or-equal the pivot, [j + 1, n) after-or-equal: recurse on the smaller */
        int64_t left = j + 1;
        if (left < n - left) {
            cand_sort_rec(a, left, depth);
            a += left;
            n -= left;
        } else {
            cand_sort_rec(a + left, n - left, depth);
            n = left;
        }
    }
    for (int64_t i = 1; i < n; i++) {
        cand v = a[i];
        int64_t j = i;
        while (j > 0 && cand_before(v, a[j - 1])) {
            a[j] = a[j - 1];
            j--;
        }
        a[j] = v;
    }
}

static void cand_sort(cand *a, int64_t n) {
    int depth = 0;
    for (int64_t m = n; m > 1; m >>= 1) depth += 2;
    if (ds_sampler__fallback_depth >= 0) depth = ds_sampler__fallback_depth;
    cand_sort_rec(a, n, depth);
}

/* top_k's threshold: heap[0, k) is a min-heap of the k largest x seen so far (-inf-filled at
 * the start), so heap[0] ends as the k-th largest, or -inf when fewer than k are finite. A value
 * enters only when it beats heap[0]: on logits in no particular order that happens about
 * k (1 + ln(V / k)) times, so the pass costs one predictable compare per token. */
static void heap_replace_top(float *heap, int32_t k, float v) {
    int32_t i = 0;
    for (;;) {
        int32_t c = 2 * i + 1;
        if (c >= k) break;
        if (c + 1 < k && heap[c + 1] < heap[c]) c++;
        if (!(heap[c] < v)) break;
        heap[i] = heap[c];
        i = c;
    }
    heap[i] = v;
}

/* ---- the pipeline ---------------------------------------------------------------------------- */

/* Histogram bin of x <= 0: floor(-x * 4), the last bin open-ended (the ternary is one minss, no
 * branch; -inf gives the last bin). * 4 is exact, so bin_of(x) <= b  <=>  x > -(b + 1) / 4 and
 * bin_of(x) >= b  <=>  x <= -b / 4, which is how load_bin selects a bin without computing bins. */
static inline int bin_of(float x) {
    float d = -x * BINS_PER_UNIT;
    return (int)(d < (float)(NBINS - 1) ? d : (float)(NBINS - 1));
}

/* Checks the history ids that will be read. */
static int check_ids(const int32_t *ids, int64_t n, int32_t vocab, const char *what) {
    if (n > 0 && !ids)
        return ds_err_set(DS_ERR_ARG, "%s is NULL but has %lld tokens", what, (long long)n);
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= vocab)
            return ds_err_set(DS_ERR_RANGE, "%s[%lld] = %d: outside the vocabulary [0, %d)", what,
                              (long long)i, (int)ids[i], (int)vocab);
    return DS_OK;
}

/* Whether min_tokens holds the stop ids back at output step n_output. */
static int masks_stops(const ds_sampling_params *p, int64_t n_output) {
    return n_output < p->min_tokens && p->n_stop_ids > 0;
}

static int penalised(const ds_sampling_params *p) {
    return p->repetition_penalty != 1.0f || p->frequency_penalty != 0.0f ||
           p->presence_penalty != 0.0f;
}

int ds_sampling_plain_greedy(const ds_sampling_params *p, int64_t n_output) {
    return p->temperature < DS_SAMPLER_GREEDY_EPS && p->n_logit_bias == 0 &&
           !masks_stops(p, n_output) && !penalised(p) && p->logprobs < 0;
}

/* s->w = the raw logits with logit_bias, the min_tokens mask and the penalties applied (vLLM V1:
 * bias and min_tokens, then repetition, frequency, presence); *modified: whether any logit
 * changed. On error the scratch is left as it was (all zero). */
static int prepare(ds_sampler *s, const float *logits, const ds_sampling_params *p,
                   const int32_t *prompt, int64_t n_prompt, const int32_t *output, int64_t n_output,
                   int *modified) {
    if (!s) return ds_err_set(DS_ERR_ARG, "sampler is NULL");
    int rc = ds_sampling_params_validate(p, s->vocab);
    if (rc) return rc;
    if (!logits) return ds_err_set(DS_ERR_ARG, "logits are NULL");
    if (n_prompt < 0 || n_output < 0)
        return ds_err_set(DS_ERR_ARG,
                          "history lengths must be >= 0 (n_prompt = %lld, n_output = %lld)",
                          (long long)n_prompt, (long long)n_output);
    const int32_t V = s->vocab;
    const int rep = p->repetition_penalty != 1.0f;
    const int pen = penalised(p);
    if (pen) {
        if (n_output > INT32_MAX)
            return ds_err_set(DS_ERR_RANGE, "output of %lld tokens: penalties count up to %d",
                              (long long)n_output, INT32_MAX);
        if ((rc = check_ids(output, n_output, V, "output"))) return rc;
    }
    if (rep && (rc = check_ids(prompt, n_prompt, V, "prompt"))) return rc;

    /* copy, refusing NaN / +inf: flags in sixteen lanes of a fixed count, which gcc -O2
     * vectorises (its cheap cost model skips loops that need a tail), no branch per token */
    float *w = s->w;
    memcpy(w, logits, (size_t)V * sizeof *w);
    int bad = 0;
    int32_t i0 = 0;
    for (; i0 + 16 <= V; i0 += 16) {
        int lanes = 0;
        for (int l = 0; l < 16; l++) lanes |= !(logits[i0 + l] < INFINITY);
        bad |= lanes;
    }
    for (; i0 < V; i0++) bad |= !(logits[i0] < INFINITY);
    if (bad) {
        for (int32_t i = 0; i < V; i++)
            if (!(logits[i] < INFINITY))
                return ds_err_set(DS_ERR_RANGE, "logits[%d] = %g: logits must be finite or -inf",
                                  (int)i, (double)logits[i]);
    }
    *modified = 0;

    for (int32_t i = 0; i < p->n_logit_bias; i++)
        w[p->logit_bias[i].token] += p->logit_bias[i].bias;
    if (p->n_logit_bias > 0) *modified = 1;

    if (masks_stops(p, n_output)) {
        for (int32_t i = 0; i < p->n_stop_ids; i++) w[p->stop_ids[i]] = -INFINITY;
        *modified = 1;
    }

    if (pen) {
        /* count: each distinct id enters `touched` once */
        int32_t *cnt = s->count, *touched = s->touched;
        uint8_t *mark = s->in_prompt;
        int64_t nt = 0;
        for (int64_t i = 0; i < n_output; i++)
            if (cnt[output[i]]++ == 0) touched[nt++] = output[i];
        if (rep)
            for (int64_t i = 0; i < n_prompt; i++) {
                int32_t t = prompt[i];
                if (!mark[t]) {
                    mark[t] = 1;
                    if (cnt[t] == 0) touched[nt++] = t;
                }
            }
        const float rp = p->repetition_penalty, fp = p->frequency_penalty, pp = p->presence_penalty;
        for (int64_t j = 0; j < nt; j++) {
            int32_t t = touched[j];
            float v = w[t];
            if (rep) v = v > 0 ? v / rp : v * rp; /* every touched id is in the prompt or output */
            int32_t c = cnt[t];
            v -= fp * (float)c;
            v -= pp * (c > 0 ? 1.0f : 0.0f);
            w[t] = v;
            cnt[t] = 0; /* reset as we go: the scratch is all zero again */
            mark[t] = 0;
        }
        if (nt > 0) *modified = 1;
    }
    return DS_OK;
}

/* The first j in [lo, hi) with cum[j] >= target, or hi. cum is non-decreasing, so a binary
 * search. */
static int64_t cum_search(const double *cum, int64_t lo, int64_t hi, double target) {
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (cum[mid] >= target)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* Loads the kept tokens of bin b into cand[0, n) in nucleus order, with cum[j] = base + the mass
 * of cand[0..j]; returns n. One pass over the vocab and a sort of one bin. */
static int64_t load_bin(ds_sampler *s, int b, double base) {
    const float *x = s->w;
    const float top = -(float)b / BINS_PER_UNIT; /* x <= top: bin >= b */
    const float bottom = b == NBINS - 1 ? -INFINITY : -(float)(b + 1) / BINS_PER_UNIT;
    const float thr = s->thr; /* x >= thr: kept */
    cand *c = s->cand;
    int64_t n = 0;
    for (int32_t i = 0; i < s->vocab; i++) {
        float v = x[i];
        if (v > bottom && v <= top && v >= thr) c[n++] = (cand){v, i};
    }
    cand_sort(c, n);
    double acc = base;
    for (int64_t j = 0; j < n; j++) {
        acc += s->ex[c[j].id];
        s->cum[j] = acc;
    }
    return n;
}

/* The position, in (x desc, id asc) order over the kept tokens, of the first token whose
 * running mass reaches target: its bin is loaded into cand and the index within it returned,
 * the bin in *bin. The bins before it are never sorted: their masses come from the histogram.
 * When rounding leaves every token short of the target, the last one. */
static int64_t locate(ds_sampler *s, double target, int *bin) {
    int b = 0, last = 0;
    for (; b < NBINS; b++) {
        if (s->bin_mass[b] > 0) last = b;
        if (s->prefix[b + 1] >= target) break;
    }
    if (b == NBINS) b = last;
    int64_t n = load_bin(s, b, s->prefix[b]);
    DS_ASSERT(n > 0); /* a bin with mass holds tokens: bin_of and load_bin agree on every float */
    int64_t j = cum_search(s->cum, 0, n, target);
    *bin = b;
    return j < n ? j : n - 1;
}

/* Raw logprobs (vLLM V1's default): log-softmax of the logits as given. lse may be passed in
 * (NAN: compute it). Fills logprob, rank and the top n_top entries of r. */
static void raw_logprobs(ds_sampler *s, const float *logits, double lse, int n_top,
                         ds_sample_result *r) {
    const int32_t V = s->vocab;
    const float lt = logits[r->token];
    const int need_sum = isnan(lse);
    double sum = 0.0;
    if (need_sum) { /* e^(logit - max) into ex, free once the token is drawn */
        const ds_kernels *k = ds_kernels_get();
        const float mx = logits[k->argmax_f32(logits, (size_t)V)]; /* finite: a token was drawn */
        for (int32_t i = 0; i < V; i++) s->ex[i] = logits[i] - mx;
        k->exp_f32(s->ex, s->ex, (size_t)V);
        for (int32_t i = 0; i < V; i++) sum += s->ex[i];
        lse = (double)mx + log(sum);
    }
    int64_t rank = 0;
    int n = 0;
    ds_token_logprob *top = r->top; /* holds raw logits until the end */
    for (int32_t i = 0; i < V; i++) {
        float v = logits[i];
        rank += v >= lt;
        if (n_top > 0 && (n < n_top || v > top[n_top - 1].logprob)) {
            /* insert after the entries >= v: ids come in increasing order, so ties by id */
            int pos = n < n_top ? n : n_top - 1;
            while (pos > 0 && top[pos - 1].logprob < v) {
                top[pos] = top[pos - 1];
                pos--;
            }
            top[pos] = (ds_token_logprob){i, v};
            if (n < n_top) n++;
        }
    }
    r->logprob = (float)((double)lt - lse);
    r->rank = rank;
    r->n_top = n;
    for (int i = 0; i < n; i++) top[i].logprob = (float)((double)top[i].logprob - lse);
}

/* The whole pipeline: fills *res (sample) or probs (distribution), whichever is non-NULL. */
static int run(ds_sampler *s, const float *logits, const ds_sampling_params *p,
               const int32_t *prompt, int64_t n_prompt, const int32_t *output, int64_t n_output,
               ds_sample_result *res, double *probs) {
    int modified = 1;
    int rc = prepare(s, logits, p, prompt, n_prompt, output, n_output, &modified);
    if (rc) return rc;
    const int32_t V = s->vocab;
    float *w = s->w;

    /* max and argmax, ties to the lowest id */
    const int32_t am = (int32_t)ds_kernels_get()->argmax_f32(w, (size_t)V);
    const float m = am < 0 ? -INFINITY : w[am];
    if (am < 0) {
        if (masks_stops(p, n_output))
            return ds_err_set(DS_ERR_RANGE,
                              "no token can be sampled: every logit is -inf once min_tokens = %d "
                              "masks the %d stop ids (%lld tokens generated so far)",
                              (int)p->min_tokens, (int)p->n_stop_ids, (long long)n_output);
        return ds_err_set(DS_ERR_RANGE, "no token can be sampled: every logit is -inf");
    }

    if (p->temperature < DS_SAMPLER_GREEDY_EPS) { /* greedy */
        if (probs) {
            memset(probs, 0, (size_t)V * sizeof *probs);
            probs[am] = 1.0;
        }
        if (res) {
            res->token = am;
            if (p->logprobs >= 0) raw_logprobs(s, logits, NAN, p->logprobs, res);
        }
        return DS_OK;
    }

    /* temperature: x = (w - max) * (1 / T) in place (a multiply: within 3 roundings of vLLM's
     * division), so the max token has x = 0 and weight 1; sixteen lanes a step (vectorised, see
     * prepare), then top_k's k-th largest x */
    const float T = p->temperature, invT = 1.0f / T;
    const int32_t k = p->top_k > 0 && p->top_k < V ? p->top_k : 0;
    int32_t i0 = 0;
    for (; i0 + 16 <= V; i0 += 16)
        for (int l = 0; l < 16; l++) w[i0 + l] = (w[i0 + l] - m) * invT;
    for (; i0 < V; i0++) w[i0] = (w[i0] - m) * invT;
    float *heap = s->heap;
    for (int32_t j = 0; j < k; j++) heap[j] = -INFINITY;
    for (int32_t i = 0; k && i < V; i++)
        if (w[i] > heap[0]) heap_replace_top(heap, k, w[i]);

    /* min_p and top_k as one value threshold (finite, so -inf tokens are never kept) */
    float thr = -FLT_MAX;
    if (p->min_p > 0) { /* p_i >= min_p * p_max  <=>  x_i >= log(min_p) */
        double l = log((double)p->min_p);
        float f = (float)l;
        if ((double)f < l) f = nextafterf(f, INFINITY); /* smallest float >= l */
        if (f > thr) thr = f;
    }
    if (k && heap[0] > thr) thr = heap[0]; /* ties with the k-th are kept */

    /* every token's weight once, for the passes below (a SIMD kernel: scalar expf, three times
     * per token, was most of a 1.2 ms call over 129,280 logits) */
    const float *ex = s->ex;
    ds_kernels_get()->exp_f32(s->ex, w, (size_t)V);

    /* mass of the kept tokens per bin; Z as the sum of the bins, so every running sum below is
     * measured on one scale */
    memset(s->bin_mass, 0, sizeof s->bin_mass);
    for (int32_t i = 0; i < V; i++)
        if (w[i] >= thr) s->bin_mass[bin_of(w[i])] += ex[i];
    s->prefix[0] = 0.0;
    for (int b = 0; b < NBINS; b++) s->prefix[b + 1] = s->prefix[b] + s->bin_mass[b];
    s->thr = thr;
    const double Z = s->prefix[NBINS];

    /* top_p: kept = every token of the bins before bp + cand[0, jp] of bin bp; mass Zk */
    int bp = -1;
    int64_t jp = -1;
    double Zk = Z;
    if (p->top_p < 1.0f) {
        jp = locate(s, (double)p->top_p * Z, &bp);
        Zk = s->cum[jp];
    }

    if (probs) {
        if (bp >= 0) {
            const float above = -(float)bp / BINS_PER_UNIT; /* x > above: a bin before bp */
            for (int32_t i = 0; i < V; i++)
                probs[i] = w[i] > above && w[i] >= thr ? (double)ex[i] / Zk : 0.0;
            for (int64_t j = 0; j <= jp; j++) probs[s->cand[j].id] = (double)ex[s->cand[j].id] / Zk;
        } else {
            for (int32_t i = 0; i < V; i++) probs[i] = w[i] >= thr ? (double)ex[i] / Z : 0.0;
        }
    }
    if (res) {
        /* inverse CDF over the kept tokens in id order: the first whose running mass exceeds
         * u * (their total). Not in probability order: two nearly equal probabilities swap places
         * under the round-off of a different batch (another matmul path), and in a flat
         * distribution that reorders everything after them; in id order such round-off moves
         * the running sums by about itself, so the same seed draws the same token alone or
         * batched except when u lands within round-off of a boundary. Their total is Zk, the
         * same tokens' mass summed by bin: a pass in id order to sum them again cost more than
         * the walk, which stops at the drawn token. */
        const cand last = bp >= 0 ? s->cand[jp] : (cand){0, 0};
        double target = ds_sampler_uniform(p->seed, (uint64_t)n_output) * Zk, run_mass = 0;
        int32_t tok = am; /* the max token is always kept: the fallback if round-off runs out */
        for (int32_t i = 0; i < V; i++) {
            float x = w[i];
            int b = bin_of(x);
            int kept = x >= thr && (bp < 0 || b < bp ||
                                    (b == bp && (x > last.x || (x == last.x && i <= last.id))));
            if (!kept || ex[i] == 0) continue;
            tok = i;
            run_mass += ex[i];
            if (run_mass > target) break;
        }
        res->token = tok;
        if (p->logprobs >= 0) {
            /* untouched logits at T = 1 with nothing cut: Z already is the raw normalizer */
            double lse = (!modified && T == 1.0f && thr == -FLT_MAX) ? (double)m + log(Z) : NAN;
            raw_logprobs(s, logits, lse, p->logprobs, res);
        }
    }
    return DS_OK;
}

int ds_sampler_sample(ds_sampler *s, const float *logits, const ds_sampling_params *p,
                      const int32_t *prompt, int64_t n_prompt, const int32_t *output,
                      int64_t n_output, ds_sample_result *out) {
    if (!out) return ds_err_set(DS_ERR_ARG, "ds_sampler_sample: out is NULL");
    memset(out, 0, sizeof *out);
    out->token = -1;
    return run(s, logits, p, prompt, n_prompt, output, n_output, out, NULL);
}

int ds_sampler_probs(ds_sampler *s, const float *logits, const ds_sampling_params *p,
                     const int32_t *prompt, int64_t n_prompt, const int32_t *output,
                     int64_t n_output, double *probs) {
    if (!probs) return ds_err_set(DS_ERR_ARG, "ds_sampler_probs: probs is NULL");
    return run(s, logits, p, prompt, n_prompt, output, n_output, NULL, probs);
}
