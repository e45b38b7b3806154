/* Sampler: every processing step against a naive twin (full sort, dense counts; penalties in
 * float32 as vLLM does them, double after) on random logits and parameter combinations, comparing
 * the kept set, the probabilities and the token drawn for the same u; greedy ties; seeds and
 * reproducibility; chi-square checks of the generator and of the draw (fixed seeds: deterministic,
 * never flaky); raw logprobs against a double log-softmax; validation messages; the all-masked
 * case and a clean scratch after every error. */
#include "engine/engine.h"
#include "kernels/kernels.h"
#include "testutil.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern int ds_sampler__fallback_depth; /* sampler.c: a small depth forces the heapsort fallback */

/* ---- a deterministic test RNG (independent of the sampler's) -------------------------------- */
static uint64_t rng_state = 0x853c49e6748fea9bULL;
static uint64_t rng_next(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dULL;
}
static double rng_unif(void) {
    return (double)(rng_next() >> 11) * 0x1.0p-53;
}
static int64_t rng_int(int64_t n) {
    return (int64_t)(rng_next() % (uint64_t)n);
}

/* ---- the reference: straight from the definitions, in double -------------------------------- */
typedef struct {
    double x;
    int32_t id;
} ref_item;

static int ref_cmp(const void *a, const void *b) { /* x descending, then id ascending */
    const ref_item *p = a, *q = b;
    if (p->x != q->x) return p->x > q->x ? -1 : 1;
    return (p->id > q->id) - (p->id < q->id);
}

typedef struct {
    double *probs; /* (V) */
    int32_t drawn; /* token for u */
    int fragile;   /* some decision lies within rounding distance of its boundary */
} ref_out;

static void ref_sample(const float *logits, int32_t V, const ds_sampling_params *p,
                       const int32_t *prompt, int64_t np, const int32_t *output, int64_t no,
                       double u, ref_out *r) {
    double *w = malloc((size_t)V * sizeof *w);
    int *cnt = calloc((size_t)V, sizeof *cnt);
    char *inp = calloc((size_t)V, 1);
    ref_item *it = malloc((size_t)V * sizeof *it);
    /* bias, mask and penalties in float32, as vLLM's logits tensor does them; the rest in double */
    float *wf = malloc((size_t)V * sizeof *wf);
    for (int32_t i = 0; i < V; i++) wf[i] = logits[i];
    for (int32_t i = 0; i < p->n_logit_bias; i++)
        wf[p->logit_bias[i].token] += p->logit_bias[i].bias;
    if (no < p->min_tokens)
        for (int32_t i = 0; i < p->n_stop_ids; i++) wf[p->stop_ids[i]] = -INFINITY;
    for (int64_t i = 0; i < no; i++) cnt[output[i]]++;
    for (int64_t i = 0; i < np; i++) inp[prompt[i]] = 1;
    for (int32_t i = 0; i < V; i++) {
        if (cnt[i] || inp[i])
            wf[i] = wf[i] > 0 ? wf[i] / p->repetition_penalty : wf[i] * p->repetition_penalty;
        wf[i] -= p->frequency_penalty * (float)cnt[i];
        wf[i] -= p->presence_penalty * (cnt[i] > 0 ? 1.0f : 0.0f);
        w[i] = wf[i];
    }
    free(wf);
    double m = -INFINITY;
    int32_t am = 0;
    for (int32_t i = 0; i < V; i++) {
        if (w[i] > m) m = w[i], am = i;
    }
    r->fragile = 0;
    memset(r->probs, 0, (size_t)V * sizeof *r->probs);
    if (p->temperature < 1e-5f) {
        r->probs[am] = 1;
        r->drawn = am; /* w is the sampler's f32 values exactly: no fragility */
        goto done;
    }
    double T = p->temperature;
    /* The sampler's x = f32((w - max) * f32(1 / T)) is within 3 * 2^-24 |x| of this one, its
     * weights e^x within that plus an expf ulp. Decisions closer than a few times that to their
     * boundary are fragile: TOLX(x) for values, tol_m (relative to the kept mass) for sums. */
#define TOLX(x) (6e-7 * (1 + fabs(x)))
    const double tol_m = 2e-6;
    int64_t n = 0;
    for (int32_t i = 0; i < V; i++)
        if (w[i] > -INFINITY) it[n++] = (ref_item){(w[i] - m) / T, i};
    qsort(it, (size_t)n, sizeof *it, ref_cmp);
    /* vLLM V1: min_p on the full softmax, then top_k, then top_p on what is left */
    int64_t keep = n;
    if (p->min_p > 0) {
        double l = log(p->min_p);
        int64_t k = 0;
        while (k < n && it[k].x >= l) k++;
        for (int64_t j = 0; j < n; j++)
            if (fabs(it[j].x - l) < TOLX(l)) r->fragile = 1;
        keep = k;
    }
    if (p->top_k > 0 && p->top_k < keep) {
        double kth = it[p->top_k - 1].x;
        int64_t k = p->top_k;
        while (k < keep && it[k].x >= kth) k++;                    /* ties with the k-th are kept */
        if (k < keep && kth - it[k].x < TOLX(kth)) r->fragile = 1; /* float could tie them */
        keep = k;
    }
    double Z = 0;
    for (int64_t j = 0; j < keep; j++) Z += exp(it[j].x);
    if (p->top_p < 1) {
        double c = 0;
        int64_t k = 0;
        while (k < keep && c < p->top_p * Z) { /* keep while the mass before it is < p */
            if (fabs(c / Z - p->top_p) < tol_m) r->fragile = 1;
            c += exp(it[k].x);
            k++;
        }
        if (fabs(c / Z - p->top_p) < tol_m) r->fragile = 1;
        keep = k;
        Z = c;
    }
    /* distinct values closer than float rounding may tie in the sampler's f32 x (ordered by id
     * there, by value here): the order of the kept prefix is then ambiguous */
    for (int64_t j = 0; j + 1 < n && j <= keep; j++)
        if (it[j].x != it[j + 1].x && it[j].x - it[j + 1].x < TOLX(it[j + 1].x)) r->fragile = 1;
    /* the draw walks the kept tokens in id order */
    for (int64_t j = 0; j < keep; j++) r->probs[it[j].id] = exp(it[j].x) / Z;
    double target = u * Z, c = 0;
    r->drawn = -1;
    for (int32_t i = 0; i < V; i++) {
        double e = r->probs[i] * Z;
        if (e == 0) continue;
        if (fabs(c - target) < tol_m * Z) r->fragile = 1;
        if (c <= target && c + e > target && r->drawn < 0) r->drawn = i;
        c += e;
    }
    if (r->drawn < 0) r->drawn = it[0].id;
    if (fabs(c - target) < tol_m * Z) r->fragile = 1;
done:
    free(w);
    free(cnt);
    free(inp);
    free(it);
}

/* Double log-softmax of the raw logits. */
static void ref_logsoftmax(const float *logits, int32_t V, double *out) {
    double m = -INFINITY, s = 0;
    for (int32_t i = 0; i < V; i++)
        if (logits[i] > m) m = logits[i];
    for (int32_t i = 0; i < V; i++) s += exp(logits[i] - m);
    double lse = m + log(s);
    for (int32_t i = 0; i < V; i++) out[i] = logits[i] - lse;
}

/* ---- random cases ---------------------------------------------------------------------------- */
static void random_logits(float *l, int32_t V, int kind) {
    double s = kind == 0 ? 0.5 : kind == 1 ? 3 : kind == 2 ? 10 : 30;
    for (int32_t i = 0; i < V; i++) {
        switch (kind) {
        case 4:
            l[i] = (float)(rng_int(9) - 4);
            break; /* integers: many exact ties */
        case 5:
            l[i] = (float)(rng_unif() * 10 - 5);
            break;
        default:
            l[i] = (float)((rng_unif() * 2 - 1) * s);
            break;
        }
    }
    if (kind == 5) /* peaked: a few spikes */
        for (int k = 0; k < 3; k++) l[rng_int(V)] = (float)(12 + rng_unif() * 4);
    if (V > 4 && rng_int(3) == 0) /* the model masked a few tokens */
        for (int k = 0; k < V / 20 + 1; k++) l[rng_int(V - 1) + 1] = -INFINITY;
}

typedef struct {
    ds_sampling_params p;
    ds_logit_bias bias[6];
    int32_t stops[4];
    int32_t *prompt, *output;
    int64_t np, no;
} rcase;

static void random_case(rcase *c, int32_t V) {
    static const float temps[] = {0, 0.3f, 0.7f, 1, 1, 1.5f};
    static const float top_ps[] = {1, 1, 0.95f, 0.8f, 0.5f, 0.1f};
    static const float min_ps[] = {0, 0, 0.01f, 0.1f, 0.5f};
    static const float reps[] = {1, 1, 1.3f, 0.8f};
    static const float freqs[] = {0, 0, 0.5f, -0.4f, 2};
    static const float press[] = {0, 0, 1, -1};
    ds_sampling_params *p = &c->p;
    *p = ds_sampling_default_params();
    p->temperature = temps[rng_int(6)];
    int32_t ks[] = {0, 0, 1, 3, 40, V - 1, V, V + 10, -1};
    p->top_k = ks[rng_int(9)];
    p->top_p = top_ps[rng_int(6)];
    p->min_p = min_ps[rng_int(5)];
    p->repetition_penalty = reps[rng_int(4)];
    p->frequency_penalty = freqs[rng_int(5)];
    p->presence_penalty = press[rng_int(4)];
    p->n_logit_bias = (int32_t)rng_int(5);
    for (int i = 0; i < p->n_logit_bias; i++) {
        c->bias[i].token = (int32_t)rng_int(V);
        int k = (int)rng_int(4);
        c->bias[i].bias = k == 0 ? 100.0f : k == 1 ? -100.0f : (float)(rng_unif() * 20 - 10);
    }
    p->logit_bias = c->bias;
    /* history over a small id range, so ids repeat */
    int32_t span = V < 50 ? V : 50;
    c->np = rng_int(120);
    c->no = rng_int(60);
    c->prompt = malloc((size_t)(c->np + 1) * sizeof *c->prompt);
    c->output = malloc((size_t)(c->no + 1) * sizeof *c->output);
    for (int64_t i = 0; i < c->np; i++) c->prompt[i] = (int32_t)rng_int(span);
    for (int64_t i = 0; i < c->no; i++) c->output[i] = (int32_t)rng_int(span);
    p->n_stop_ids = (int32_t)rng_int(4);
    for (int i = 0; i < p->n_stop_ids; i++) c->stops[i] = (int32_t)rng_int(V);
    p->stop_ids = c->stops;
    int mt = (int)rng_int(3);
    p->min_tokens = mt == 0 ? 0 : mt == 1 ? (int32_t)c->no + 1 : (int32_t)c->no;
    p->seed = rng_next();
    p->logprobs = (int32_t)rng_int(22) - 1;
}

static void free_case(rcase *c) {
    free(c->prompt);
    free(c->output);
}

/* One case: probs and kept set, the drawn token, and the logprobs, against the reference. */
static int n_compared, n_fragile;
static void check_case(ds_sampler *s, int32_t V, const float *logits, rcase *c, const char *tag) {
    double *ps = malloc((size_t)V * sizeof *ps), *pr = malloc((size_t)V * sizeof *pr);
    double *ls = malloc((size_t)V * sizeof *ls);
    ds_sample_result res;
    int rc1 = ds_sampler_probs(s, logits, &c->p, c->prompt, c->np, c->output, c->no, ps);
    int rc2 = ds_sampler_sample(s, logits, &c->p, c->prompt, c->np, c->output, c->no, &res);
    /* a case may mask everything (min_tokens on stop ids + raw -inf): then both must say so */
    ref_out r = {pr, -1, 0};
    int all_masked = 1;
    {
        /* quick recomputation of "anything finite after masking" */
        for (int32_t i = 0; i < V && all_masked; i++) {
            if (!(logits[i] > -INFINITY)) continue;
            int stopped = 0;
            if (c->no < c->p.min_tokens)
                for (int k = 0; k < c->p.n_stop_ids; k++) stopped |= c->p.stop_ids[k] == i;
            if (!stopped) all_masked = 0;
        }
    }
    if (all_masked) {
        CHECK_MSG(rc1 == DS_ERR_RANGE && rc2 == DS_ERR_RANGE, "%s: all masked: rc %d %d", tag, rc1,
                  rc2);
        goto out;
    }
    CHECK_MSG(rc1 == DS_OK && rc2 == DS_OK, "%s: rc %d %d: %s", tag, rc1, rc2, ds_err_msg());
    if (rc1 || rc2) goto out;
    double u = ds_sampler_uniform(c->p.seed, (uint64_t)c->no);
    ref_sample(logits, V, &c->p, c->prompt, c->np, c->output, c->no, u, &r);
    /* whatever the fragility, the token must come from the sampler's own kept set */
    CHECK_MSG(res.token >= 0 && res.token < V && ps[res.token] > 0,
              "%s: drawn %d outside the kept set", tag, res.token);
    double sum = 0;
    for (int32_t i = 0; i < V; i++) sum += ps[i];
    CHECK_MSG(fabs(sum - 1) < 1e-9, "%s: probabilities sum to %.17g", tag, sum);
    n_compared++;
    if (r.fragile) {
        n_fragile++;
    } else {
        int bad_kept = 0, bad_prob = 0;
        double worst = 0;
        for (int32_t i = 0; i < V; i++) {
            if ((ps[i] > 0) != (pr[i] > 0) && !(pr[i] > 0 && pr[i] < 1e-30)) bad_kept++;
            double d = fabs(ps[i] - pr[i]);
            if (d > 1e-5 + 1e-3 * pr[i]) bad_prob++;
            if (d > worst) worst = d;
        }
        CHECK_MSG(bad_kept == 0, "%s: %d tokens differ in the kept set", tag, bad_kept);
        CHECK_MSG(bad_prob == 0, "%s: %d probabilities differ (worst %g)", tag, bad_prob, worst);
        CHECK_MSG(res.token == r.drawn, "%s: drew %d, reference %d (u %.17g)", tag, res.token,
                  r.drawn, u);
        if (bad_kept || bad_prob || res.token != r.drawn) /* the case, to reproduce it */
            fprintf(stderr,
                    "  T %g top_k %d top_p %g min_p %g rep %g freq %g pres %g n_bias %d "
                    "min_tokens %d n_stop %d n_prompt %lld n_output %lld\n",
                    (double)c->p.temperature, (int)c->p.top_k, (double)c->p.top_p,
                    (double)c->p.min_p, (double)c->p.repetition_penalty,
                    (double)c->p.frequency_penalty, (double)c->p.presence_penalty,
                    (int)c->p.n_logit_bias, (int)c->p.min_tokens, (int)c->p.n_stop_ids,
                    (long long)c->np, (long long)c->no);
    }
    /* raw logprobs: independent of all processing */
    if (c->p.logprobs >= 0) {
        ref_logsoftmax(logits, V, ls);
        CHECK_NEAR(res.logprob, ls[res.token], 1e-5);
        int64_t rank = 0;
        for (int32_t i = 0; i < V; i++) rank += logits[i] >= logits[res.token];
        CHECK(res.rank == rank);
        int want = c->p.logprobs < V ? c->p.logprobs : V;
        CHECK(res.n_top == want);
    } else {
        CHECK(res.n_top == 0 && res.rank == 0);
    }
out:
    free(ps);
    free(pr);
    free(ls);
}

static void test_against_reference(void) {
    static const int32_t vocabs[] = {1, 2, 7, 100, 1000, 5000};
    float *logits = malloc(5000 * sizeof *logits);
    ds_sampler *s[6];
    for (int v = 0; v < 6; v++) CHECK(ds_sampler_open(vocabs[v], &s[v]) == DS_OK);
    char tag[64];
    for (int n = 0; n < 4000; n++) {
        /* the last cases run the heapsort fallback after 0, 1 or 2 quicksort rounds */
        ds_sampler__fallback_depth = n >= 3400 ? n % 3 : -1;
        int v = (int)rng_int(6);
        int32_t V = vocabs[v];
        random_logits(logits, V, (int)rng_int(6));
        rcase c;
        random_case(&c, V);
        snprintf(tag, sizeof tag, "case %d (V %d)", n, (int)V);
        check_case(s[v], V, logits, &c, tag);
        free_case(&c);
    }
    ds_sampler__fallback_depth = -1;
    for (int v = 0; v < 6; v++) ds_sampler_close(s[v]);
    free(logits);

    /* the real vocabulary size, fewer cases */
    const int32_t V = 129280;
    ds_sampler *big;
    CHECK(ds_sampler_open(V, &big) == DS_OK);
    logits = malloc((size_t)V * sizeof *logits);
    for (int n = 0; n < 24; n++) {
        random_logits(logits, V, n % 6);
        rcase c;
        random_case(&c, V);
        if (n % 4 == 0) c.p.top_p = 1, c.p.top_k = 0, c.p.min_p = 0; /* nothing cut */
        snprintf(tag, sizeof tag, "big case %d", n);
        check_case(big, V, logits, &c, tag);
        free_case(&c);
    }
    ds_sampler_close(big);
    free(logits);
    /* the comparison must really have happened */
    CHECK_MSG(n_fragile * 10 < n_compared, "%d of %d cases too close to a boundary to compare",
              n_fragile, n_compared);
    printf("reference: %d cases compared, %d skipped as boundary cases\n", n_compared, n_fragile);
}

/* ---- greedy -----------------------------------------------------------------------------------
 */
static void test_greedy(void) {
    const int32_t V = 1000;
    ds_sampler *s;
    CHECK(ds_sampler_open(V, &s) == DS_OK);
    float *l = malloc(V * sizeof *l);
    for (int32_t i = 0; i < V; i++) l[i] = (float)(rng_unif() * 10);
    l[77] = 20;
    l[12] = 20; /* tie: the lower id wins */
    l[900] = 20;
    ds_sampling_params p = ds_sampling_default_params();
    p.temperature = 0;
    p.top_k = 3; /* ignored when greedy */
    p.top_p = 0.1f;
    ds_sample_result r;
    for (uint64_t seed = 0; seed < 5; seed++) {
        p.seed = seed * 0x9e3779b97f4a7c15ULL;
        CHECK(ds_sampler_sample(s, l, &p, NULL, 0, NULL, (int64_t)seed, &r) == DS_OK);
        CHECK_MSG(r.token == 12, "greedy picked %d, want 12", r.token);
    }
    p.temperature = 1e-6f; /* below vLLM's epsilon: greedy */
    CHECK(ds_sampler_sample(s, l, &p, NULL, 0, NULL, 3, &r) == DS_OK && r.token == 12);
    /* greedy over processed logits: a repetition penalty on 12 leaves 77 */
    int32_t out[] = {12};
    p.repetition_penalty = 2;
    CHECK(ds_sampler_sample(s, l, &p, NULL, 0, out, 1, &r) == DS_OK);
    CHECK_MSG(r.token == 77, "greedy with repetition penalty picked %d, want 77", r.token);
    /* ... and a logit bias can lift any token */
    ds_logit_bias b = {5, 30};
    p.repetition_penalty = 1;
    p.logit_bias = &b;
    p.n_logit_bias = 1;
    CHECK(ds_sampler_sample(s, l, &p, NULL, 0, NULL, 0, &r) == DS_OK && r.token == 5);
    /* every token tied */
    for (int32_t i = 0; i < V; i++) l[i] = -3;
    p = ds_sampling_default_params();
    p.temperature = 0;
    CHECK(ds_sampler_sample(s, l, &p, NULL, 0, NULL, 0, &r) == DS_OK && r.token == 0);
    /* top_k = 1 with ties keeps all tied tokens (vLLM), so the draw can pick any of them */
    for (int32_t i = 0; i < V; i++) l[i] = (float)(i % 10);
    p = ds_sampling_default_params();
    p.top_k = 1;
    double *probs = malloc(V * sizeof *probs);
    CHECK(ds_sampler_probs(s, l, &p, NULL, 0, NULL, 0, probs) == DS_OK);
    int kept = 0, wrong = 0;
    for (int32_t i = 0; i < V; i++) {
        kept += probs[i] > 0;
        if ((probs[i] > 0) != (i % 10 == 9) || (probs[i] > 0 && fabs(probs[i] - 0.01) > 1e-12))
            wrong++;
    }
    CHECK_MSG(kept == 100 && wrong == 0, "top_k=1 over ties kept %d tokens, %d wrong", kept, wrong);
    free(probs);
    free(l);
    ds_sampler_close(s);
}

/* ds_sampling_plain_greedy: random plain greedy params (seeds, top_k / top_p / min_p, a
 * min_tokens already reached or without stop ids, history) draw exactly the logits' argmax_f32
 * and report nothing else, over logits with ties and masked tokens; each thing the sampler would
 * do beyond that, alone, makes the params not plain. */
static void test_plain_greedy(void) {
    const int32_t V = 777;
    ds_sampler *s;
    CHECK(ds_sampler_open(V, &s) == DS_OK);
    float *l = malloc(V * sizeof *l);
    int bad = 0, not_plain = 0;
    for (int it = 0; it < 300; it++) {
        random_logits(l, V, it % 6);
        rcase c;
        random_case(&c, V);
        ds_sampling_params *p = &c.p;
        p->temperature = it % 2 ? 0 : 0.99f * DS_SAMPLER_GREEDY_EPS;
        p->n_logit_bias = 0;
        p->repetition_penalty = 1;
        p->frequency_penalty = p->presence_penalty = 0;
        p->logprobs = -1;
        if (p->min_tokens > c.no) p->n_stop_ids = 0;
        bad += !ds_sampling_plain_greedy(p, c.no);
        ds_sample_result r, want;
        memset(&want, 0, sizeof want);
        want.token = (int32_t)ds_kernels_get()->argmax_f32(l, (size_t)V);
        CHECK(ds_sampler_sample(s, l, p, c.prompt, c.np, c.output, c.no, &r) == DS_OK);
        bad += memcmp(&r, &want, sizeof r) != 0;
        for (int k = 0; k < 7; k++) {
            ds_sampling_params q = *p;
            static const ds_logit_bias zero = {0, 0.0f};
            switch (k) {
            case 0:
                q.temperature = DS_SAMPLER_GREEDY_EPS;
                break;
            case 1:
                q.logit_bias = &zero, q.n_logit_bias = 1;
                break;
            case 2:
                q.min_tokens = (int32_t)c.no + 1, q.n_stop_ids = 1;
                break;
            case 3:
                q.repetition_penalty = 1.01f;
                break;
            case 4:
                q.frequency_penalty = -0.1f;
                break;
            case 5:
                q.presence_penalty = 0.1f;
                break;
            default:
                q.logprobs = 0;
                break;
            }
            not_plain += !ds_sampling_plain_greedy(&q, c.no);
        }
        free_case(&c);
    }
    CHECK_MSG(bad == 0, "plain greedy: %d cases not plain or not the argmax alone", bad);
    CHECK_MSG(not_plain == 300 * 7, "plain greedy: %d of %d modified cases counted as modified",
              not_plain, 300 * 7);
    free(l);
    ds_sampler_close(s);
}

/* ---- seeds ------------------------------------------------------------------------------------
 */
/* Tokens of `steps` consecutive steps of one request (flat-ish logits, no history reads). */
static void run_request(ds_sampler *s, const float *l, uint64_t seed, int steps, int32_t *toks) {
    ds_sampling_params p = ds_sampling_default_params();
    p.seed = seed;
    ds_sample_result r;
    for (int i = 0; i < steps; i++) {
        int rc = ds_sampler_sample(s, l, &p, NULL, 0, NULL, i, &r);
        toks[i] = rc == DS_OK ? r.token : -1;
    }
}

static void test_seeds(void) {
    const int32_t V = 1000;
    enum { STEPS = 24, NSEEDS = 64 };
    ds_sampler *a, *b;
    CHECK(ds_sampler_open(V, &a) == DS_OK);
    CHECK(ds_sampler_open(V, &b) == DS_OK);
    float *l = malloc(V * sizeof *l), *other = malloc(V * sizeof *other);
    for (int32_t i = 0; i < V; i++) l[i] = (float)(rng_unif() * 2);

    /* same seed and step -> same token, whatever runs in between on the same sampler */
    int32_t alone[STEPS], mixed[STEPS];
    run_request(b, l, 42, STEPS, alone);
    ds_sampling_params p = ds_sampling_default_params();
    p.seed = 42;
    int32_t hist[STEPS];
    for (int i = 0; i < STEPS; i++) {
        /* another request with penalties, top_p and its own seed, between each step */
        ds_sampling_params q = ds_sampling_default_params();
        q.seed = rng_next();
        q.top_p = 0.7f;
        q.frequency_penalty = 1;
        q.repetition_penalty = 1.2f;
        for (int32_t k = 0; k < V; k++) other[k] = (float)(rng_unif() * 8);
        for (int k = 0; k < i; k++) hist[k] = (int32_t)rng_int(V);
        ds_sample_result r;
        CHECK(ds_sampler_sample(a, other, &q, hist, i, hist, i, &r) == DS_OK);
        CHECK(ds_sampler_sample(a, l, &p, NULL, 0, NULL, i, &r) == DS_OK);
        mixed[i] = r.token;
    }
    CHECK_MSG(memcmp(alone, mixed, sizeof alone) == 0,
              "a seeded request changed with its neighbours");
    /* a step's token does not depend on which steps ran before it */
    ds_sample_result r7;
    CHECK(ds_sampler_sample(b, l, &p, NULL, 0, NULL, 7, &r7) == DS_OK && r7.token == alone[7]);

    /* different seeds -> different sequences */
    static int32_t seqs[NSEEDS][STEPS];
    for (int k = 0; k < NSEEDS; k++) run_request(a, l, (uint64_t)k, STEPS, seqs[k]);
    int same = 0;
    for (int i = 0; i < NSEEDS; i++)
        for (int j = i + 1; j < NSEEDS; j++) same += memcmp(seqs[i], seqs[j], sizeof seqs[i]) == 0;
    CHECK_MSG(same == 0, "%d pairs of seeds gave the same sequence", same);
    /* a seed's stream is not another seed's shifted by a step (a plain Weyl-sequence generator,
     * state = seed + step * gamma, would make seed + gamma at step i equal seed at step i + 1) */
    int shifted = 0;
    for (uint64_t k = 0; k < 1000; k++) {
        uint64_t s0 = rng_next();
        shifted +=
            ds_sampler_uniform(s0 + 0x9e3779b97f4a7c15ULL, k) == ds_sampler_uniform(s0, k + 1);
        shifted += ds_sampler_uniform(s0 + 1, k) == ds_sampler_uniform(s0, k + 1);
    }
    CHECK_MSG(shifted == 0, "%d draws repeat another seed's stream one step later", shifted);

    /* the edge seeds work and differ; in particular the signed -1 and INT64_MIN of OpenAI */
    const uint64_t edge[] = {0, UINT64_MAX, (uint64_t)INT64_MAX, (uint64_t)INT64_MIN, 1};
    int32_t es[5][STEPS];
    for (int k = 0; k < 5; k++) {
        for (uint64_t st = 0; st < 1000; st++) {
            double u = ds_sampler_uniform(edge[k], st);
            if (!(u >= 0 && u < 1)) {
                CHECK_MSG(0, "uniform(%llu, %llu) = %g", (unsigned long long)edge[k],
                          (unsigned long long)st, u);
                break;
            }
        }
        run_request(a, l, edge[k], STEPS, es[k]);
        int32_t again[STEPS];
        run_request(b, l, edge[k], STEPS, again);
        CHECK(memcmp(es[k], again, sizeof again) == 0);
        for (int i = 0; i < STEPS; i++) CHECK(es[k][i] >= 0 && es[k][i] < V);
    }
    for (int i = 0; i < 5; i++)
        for (int j = i + 1; j < 5; j++)
            CHECK_MSG(memcmp(es[i], es[j], sizeof es[i]) != 0, "edge seeds %d and %d agree", i, j);
    CHECK(ds_sampler_uniform(UINT64_MAX, 0) != ds_sampler_uniform(0, 0));
    CHECK(ds_sampler_uniform((uint64_t)INT64_MIN, 0) != ds_sampler_uniform((uint64_t)INT64_MAX, 0));
    /* a pinned value: the generator is part of the reproducibility promise, so changing it must
     * be a deliberate act that updates these lines (and the release notes) */
    CHECK(ds_sampler_uniform(0, 0) == 0.9181397762738075);
    CHECK(ds_sampler_uniform(UINT64_MAX, 123456789) == 0.78186788424694831);
    CHECK(ds_sampler_uniform(42, 7) == 0.22644931005455626);
    free(l);
    free(other);
    ds_sampler_close(a);
    ds_sampler_close(b);
}

/* ---- statistics --------------------------------------------------------------------------------
 */
/* Chi-square critical value for df degrees of freedom at z standard deviations (Wilson-Hilferty);
 * z = 5 is a false-alarm rate of ~3e-7, and the seeds are fixed, so the outcome never changes. */
static double chi2_crit(int df, double z) {
    double a = 2.0 / (9.0 * df);
    double t = 1 - a + z * sqrt(a);
    return df * t * t * t;
}

static void test_uniform_stats(void) {
    enum { N = 200000, BINS = 100 };
    static int h[4][BINS];
    static int pairs[10][10];
    memset(h, 0, sizeof h);
    double prev = ds_sampler_uniform(0, 0);
    for (uint64_t i = 0; i < N; i++) {
        h[0][(int)(ds_sampler_uniform(i, 0) * BINS)]++;              /* consecutive seeds */
        h[1][(int)(ds_sampler_uniform(0, i) * BINS)]++;              /* consecutive steps */
        h[2][(int)(ds_sampler_uniform(i << 40, 3) * BINS)]++;        /* seeds in high bits */
        h[3][(int)(ds_sampler_uniform(UINT64_MAX - i, i) * BINS)]++; /* diagonal */
        double cur = ds_sampler_uniform(0, i + 1);
        pairs[(int)(prev * 10)][(int)(cur * 10)]++; /* successive draws of one request */
        prev = cur;
    }
    for (int k = 0; k < 4; k++) {
        double chi = 0, e = (double)N / BINS;
        for (int b = 0; b < BINS; b++) chi += (h[k][b] - e) * (h[k][b] - e) / e;
        CHECK_MSG(chi < chi2_crit(BINS - 1, 5), "uniform stream %d: chi2 %g", k, chi);
    }
    double chi = 0, e = (double)N / 100;
    for (int i = 0; i < 10; i++)
        for (int j = 0; j < 10; j++) chi += (pairs[i][j] - e) * (pairs[i][j] - e) / e;
    CHECK_MSG(chi < chi2_crit(99, 5), "successive pairs: chi2 %g", chi);
}

/* Empirical frequencies of the draw over many seeds against the reference probabilities. */
static void draw_stats(const char *tag, const float *l, int32_t V, ds_sampling_params p, int N) {
    ds_sampler *s;
    CHECK(ds_sampler_open(V, &s) == DS_OK);
    double *probs = malloc((size_t)V * sizeof *probs);
    int *cnt = calloc((size_t)V, sizeof *cnt);
    ref_out r = {probs, -1, 0};
    ref_sample(l, V, &p, NULL, 0, NULL, 0, 0.5, &r);
    ds_sample_result res;
    int outside = 0;
    for (int i = 0; i < N; i++) {
        p.seed = (uint64_t)i; /* many requests, one step each */
        if (ds_sampler_sample(s, l, &p, NULL, 0, NULL, i % 3, &res) != DS_OK) {
            outside++;
            continue;
        }
        cnt[res.token]++;
        outside += probs[res.token] == 0;
    }
    double chi = 0;
    int df = -1;
    for (int32_t i = 0; i < V; i++) {
        if (probs[i] == 0) continue;
        double e = probs[i] * N;
        chi += (cnt[i] - e) * (cnt[i] - e) / e;
        df++;
    }
    CHECK_MSG(outside == 0, "%s: %d draws outside the support", tag, outside);
    CHECK_MSG(df > 0 && chi < chi2_crit(df, 5), "%s: chi2 %g with %d df (limit %g)", tag, chi, df,
              chi2_crit(df, 5));
    free(probs);
    free(cnt);
    ds_sampler_close(s);
}

static void test_draw_stats(void) {
    /* probabilities between ~1% and ~30%: every expected count is large */
    const int32_t V = 12;
    float l[12];
    for (int i = 0; i < V; i++) l[i] = (float)(0.3 * i - 0.02 * i * i);
    ds_sampling_params p = ds_sampling_default_params();
    draw_stats("temperature 1", l, V, p, 60000);
    p.temperature = 0.7f;
    p.top_k = 8;
    draw_stats("temperature 0.7, top_k 8", l, V, p, 60000);
    p = ds_sampling_default_params();
    p.top_p = 0.6f;
    p.temperature = 1.3f;
    draw_stats("top_p 0.6", l, V, p, 60000);
    /* a wider vocabulary spread over a dozen histogram bins: the draw reaches deep into them */
    enum { W = 400 };
    static float wide[W];
    for (int i = 0; i < W; i++) wide[i] = (float)(i % 61) * 0.05f;
    p = ds_sampling_default_params();
    draw_stats("wide", wide, W, p, 60000);
}

/* ---- logprobs ---------------------------------------------------------------------------------
 */
static void test_logprobs(void) {
    const int32_t V = 129280;
    ds_sampler *s;
    CHECK(ds_sampler_open(V, &s) == DS_OK);
    float *l = malloc(V * sizeof *l);
    double *ref = malloc(V * sizeof *ref);
    for (int32_t i = 0; i < V; i++)
        l[i] = (float)((rng_unif() + rng_unif() + rng_unif() - 1.5) * 6);
    const int32_t tied[] = {500, 20, 7000, 3, 129279}; /* exact ties at the top */
    for (int k = 0; k < 5; k++) l[tied[k]] = 14;
    l[42] = 15;
    l[1000] = -INFINITY;
    ref_logsoftmax(l, V, ref);

    ds_sampling_params p = ds_sampling_default_params();
    p.logprobs = 20;
    p.seed = 7;
    ds_sample_result a, b;
    CHECK(ds_sampler_sample(s, l, &p, NULL, 0, NULL, 0, &a) == DS_OK);
    CHECK(a.n_top == 20);
    const int32_t order[] = {42, 3, 20, 500, 7000, 129279};
    for (int k = 0; k < 6; k++)
        CHECK_MSG(a.top[k].token == order[k], "top[%d] = %d", k, a.top[k].token);
    int bad_order = 0, bad_val = 0;
    for (int k = 0; k < a.n_top; k++) {
        if (k > 0 &&
            !(a.top[k - 1].logprob > a.top[k].logprob ||
              (a.top[k - 1].logprob == a.top[k].logprob && a.top[k - 1].token < a.top[k].token)))
            bad_order++;
        if (fabs(a.top[k].logprob - ref[a.top[k].token]) > 1e-5) bad_val++;
    }
    /* the 20th entry really is the 20th largest */
    int64_t above = 0;
    for (int32_t i = 0; i < V; i++) above += l[i] > l[a.top[19].token];
    CHECK(above <= 19);
    CHECK(bad_order == 0 && bad_val == 0);
    CHECK_NEAR(a.logprob, ref[a.token], 1e-5);
    int64_t rank = 0;
    for (int32_t i = 0; i < V; i++) rank += l[i] >= l[a.token];
    CHECK(a.rank == rank);

    /* raw: bias, penalties, temperature and truncation change the token, not the logprobs */
    ds_logit_bias bias[] = {{77, 100}};
    int32_t hist[] = {42, 3, 3, 20};
    p.logit_bias = bias;
    p.n_logit_bias = 1;
    p.temperature = 0.5f;
    p.top_k = 5;
    p.repetition_penalty = 1.5f;
    p.presence_penalty = 1;
    CHECK(ds_sampler_sample(s, l, &p, hist, 4, hist, 4, &b) == DS_OK);
    CHECK_MSG(b.token == 77, "biased token %d", b.token);
    CHECK(memcmp(a.top, b.top, sizeof a.top) == 0);
    CHECK_NEAR(b.logprob, ref[77], 1e-5);
    rank = 0;
    for (int32_t i = 0; i < V; i++) rank += l[i] >= l[77];
    CHECK(b.rank == rank);
    /* greedy returns them too */
    p = ds_sampling_default_params();
    p.temperature = 0;
    p.logprobs = 3;
    CHECK(ds_sampler_sample(s, l, &p, NULL, 0, NULL, 0, &b) == DS_OK);
    CHECK(b.token == 42 && b.rank == 1 && b.n_top == 3 && b.top[1].token == 3);
    CHECK_NEAR(b.logprob, ref[42], 1e-5);
    /* 0: the token's own logprob and rank, no list; -1: nothing */
    p.logprobs = 0;
    CHECK(ds_sampler_sample(s, l, &p, NULL, 0, NULL, 0, &b) == DS_OK);
    CHECK(b.n_top == 0 && b.rank == 1 && fabs(b.logprob - ref[42]) < 1e-5);
    p.logprobs = -1;
    CHECK(ds_sampler_sample(s, l, &p, NULL, 0, NULL, 0, &b) == DS_OK);
    CHECK(b.n_top == 0 && b.rank == 0 && b.logprob == 0);
    /* more logprobs than tokens */
    ds_sampler *tiny;
    CHECK(ds_sampler_open(3, &tiny) == DS_OK);
    float t3[] = {1, 2, 3};
    p.logprobs = 20;
    CHECK(ds_sampler_sample(tiny, t3, &p, NULL, 0, NULL, 0, &b) == DS_OK);
    CHECK(b.n_top == 3 && b.top[0].token == 2 && b.top[2].token == 0);
    ds_sampler_close(tiny);
    free(l);
    free(ref);
    ds_sampler_close(s);
}

/* ---- validation and errors ----------------------------------------------------------------- */
static void expect_bad(ds_sampler *s, const float *l, ds_sampling_params p, const char *field,
                       const char *value) {
    int rc = ds_sampling_params_validate(&p, ds_sampler_vocab(s));
    CHECK_MSG(rc == DS_ERR_ARG, "%s = %s accepted (rc %d)", field, value, rc);
    CHECK_ERR_CONTAINS(field);
    CHECK_ERR_CONTAINS(value);
    ds_sample_result r;
    CHECK(ds_sampler_sample(s, l, &p, NULL, 0, NULL, 0, &r) == DS_ERR_ARG);
}

static void test_validation(void) {
    const int32_t V = 100;
    ds_sampler *s;
    CHECK(ds_sampler_open(V, &s) == DS_OK);
    float l[100];
    for (int i = 0; i < V; i++) l[i] = (float)i / 10;
    ds_sampling_params d = ds_sampling_default_params(), p;
    CHECK(ds_sampling_params_validate(&d, V) == DS_OK);
    CHECK(d.temperature == 1 && d.top_p == 1 && d.top_k == 0 && d.min_p == 0 && d.logprobs == -1);
    CHECK(d.repetition_penalty == 1 && d.frequency_penalty == 0 && d.presence_penalty == 0);
#define BAD(field, val, str)                                                                       \
    do {                                                                                           \
        p = d;                                                                                     \
        p.field = val;                                                                             \
        expect_bad(s, l, p, #field, str);                                                          \
    } while (0)
    BAD(temperature, -1.0f, "-1");
    BAD(temperature, NAN, "nan");
    BAD(temperature, INFINITY, "inf");
    BAD(top_p, 0.0f, "0");
    BAD(top_p, 1.5f, "1.5");
    BAD(top_p, -0.5f, "-0.5");
    BAD(top_p, NAN, "nan");
    BAD(min_p, -0.1f, "-0.1");
    BAD(min_p, 1.25f, "1.25");
    BAD(min_p, NAN, "nan");
    BAD(repetition_penalty, 0.0f, "0");
    BAD(repetition_penalty, -1.0f, "-1");
    BAD(repetition_penalty, INFINITY, "inf");
    BAD(repetition_penalty, NAN, "nan");
    BAD(frequency_penalty, 2.5f, "2.5");
    BAD(frequency_penalty, -INFINITY, "-inf");
    BAD(frequency_penalty, NAN, "nan");
    BAD(presence_penalty, -3.0f, "-3");
    BAD(presence_penalty, NAN, "nan");
    BAD(min_tokens, -1, "-1");
    BAD(logprobs, 21, "21");
    BAD(logprobs, -2, "-2");
    BAD(n_logit_bias, -1, "-1");
    BAD(n_logit_bias, 2, "2"); /* with a NULL array */
    BAD(n_stop_ids, -4, "-4");
    BAD(n_stop_ids, 1, "1"); /* with a NULL array */
    ds_logit_bias b[2] = {{3, 1}, {100, 5}};
    p = d;
    p.logit_bias = b;
    p.n_logit_bias = 2;
    expect_bad(s, l, p, "logit_bias[1].token", "100");
    b[1].token = -7;
    expect_bad(s, l, p, "logit_bias[1].token", "-7");
    b[1] = (ds_logit_bias){4, 100.5f};
    expect_bad(s, l, p, "logit_bias[1].bias", "100.5");
    b[1].bias = NAN;
    expect_bad(s, l, p, "logit_bias[1].bias", "nan");
    b[1].bias = -100; /* the limits themselves are fine */
    b[0].bias = 100;
    CHECK(ds_sampling_params_validate(&p, V) == DS_OK);
    int32_t stops[] = {1, 100};
    p = d;
    p.stop_ids = stops;
    p.n_stop_ids = 2;
    expect_bad(s, l, p, "stop_ids[1]", "100");
    CHECK(ds_sampling_params_validate(NULL, V) == DS_ERR_ARG);
    CHECK(ds_sampling_params_validate(&d, 0) == DS_ERR_ARG);
    /* edge values that are valid */
    p = d;
    p.top_p = 1e-6f;
    p.min_p = 1;
    p.frequency_penalty = -2;
    p.presence_penalty = 2;
    p.temperature = 0;
    p.top_k = -5;
    p.logprobs = 20;
    CHECK(ds_sampling_params_validate(&p, V) == DS_OK);

    /* bad calls */
    ds_sample_result r;
    ds_sampler *none = (ds_sampler *)1;
    CHECK(ds_sampler_open(0, &none) == DS_ERR_ARG && none == NULL);
    CHECK(ds_sampler_open(-3, &none) == DS_ERR_ARG);
    CHECK(ds_sampler_sample(NULL, l, &d, NULL, 0, NULL, 0, &r) == DS_ERR_ARG);
    CHECK(ds_sampler_sample(s, NULL, &d, NULL, 0, NULL, 0, &r) == DS_ERR_ARG);
    CHECK(ds_sampler_sample(s, l, NULL, NULL, 0, NULL, 0, &r) == DS_ERR_ARG);
    CHECK(ds_sampler_sample(s, l, &d, NULL, 0, NULL, 0, NULL) == DS_ERR_ARG);
    CHECK(ds_sampler_sample(s, l, &d, NULL, 0, NULL, -1, &r) == DS_ERR_ARG);
    CHECK(ds_sampler_probs(s, l, &d, NULL, 0, NULL, 0, NULL) == DS_ERR_ARG);
    /* history ids are checked when read */
    int32_t hist[] = {5, 6, 100};
    p = d;
    p.frequency_penalty = 1;
    CHECK(ds_sampler_sample(s, l, &p, NULL, 0, hist, 3, &r) == DS_ERR_RANGE);
    CHECK_ERR_CONTAINS("output[2] = 100");
    p = d;
    p.repetition_penalty = 1.1f;
    CHECK(ds_sampler_sample(s, l, &p, hist, 3, NULL, 0, &r) == DS_ERR_RANGE);
    CHECK_ERR_CONTAINS("prompt[2] = 100");
    CHECK(ds_sampler_sample(s, l, &p, NULL, 5, NULL, 0, &r) == DS_ERR_ARG);
    /* ... and ignored when no penalty reads them */
    CHECK(ds_sampler_sample(s, l, &d, hist, 3, hist, 3, &r) == DS_OK);
    /* the model's logits */
    float bad[100];
    memcpy(bad, l, sizeof bad);
    bad[31] = NAN;
    CHECK(ds_sampler_sample(s, bad, &d, NULL, 0, NULL, 0, &r) == DS_ERR_RANGE);
    CHECK_ERR_CONTAINS("logits[31]");
    bad[31] = INFINITY;
    CHECK(ds_sampler_sample(s, bad, &d, NULL, 0, NULL, 0, &r) == DS_ERR_RANGE);
    CHECK_ERR_CONTAINS("logits[31]");
    bad[31] = l[31]; /* past the last whole 16 */
    bad[98] = NAN;
    CHECK(ds_sampler_sample(s, bad, &d, NULL, 0, NULL, 0, &r) == DS_ERR_RANGE);
    CHECK_ERR_CONTAINS("logits[98]");
    CHECK(ds_sampler_vocab(s) == V && ds_sampler_vocab(NULL) == 0);
    ds_sampler_close(s);
    ds_sampler_close(NULL);
}

/* Everything masked, and the scratch left clean after every error path. */
static void test_all_masked(void) {
    const int32_t V = 5;
    ds_sampler *s;
    CHECK(ds_sampler_open(V, &s) == DS_OK);
    float l[5] = {1, 2, 3, 4, 5};
    int32_t stops[] = {0, 1, 2, 3, 4};
    ds_sampling_params p = ds_sampling_default_params();
    p.stop_ids = stops;
    p.n_stop_ids = 5;
    p.min_tokens = 3;
    ds_sample_result r;
    for (int greedy = 0; greedy < 2; greedy++) {
        p.temperature = greedy ? 0.0f : 1.0f;
        CHECK(ds_sampler_sample(s, l, &p, NULL, 0, NULL, 2, &r) == DS_ERR_RANGE);
        CHECK_ERR_CONTAINS("min_tokens = 3");
        CHECK(r.token == -1);
        CHECK(ds_sampler_sample(s, l, &p, NULL, 0, NULL, 3, &r) == DS_OK); /* min reached */
    }
    /* raw -inf everywhere but on the stop tokens, which min_tokens masks */
    float m[5] = {-INFINITY, -INFINITY, 2, -INFINITY, -INFINITY};
    p.temperature = 1;
    p.n_stop_ids = 1;
    stops[0] = 2;
    CHECK(ds_sampler_sample(s, m, &p, NULL, 0, NULL, 0, &r) == DS_ERR_RANGE);
    p.min_tokens = 0;
    CHECK(ds_sampler_sample(s, m, &p, NULL, 0, NULL, 0, &r) == DS_OK && r.token == 2);
    for (int i = 0; i < 5; i++) m[i] = -INFINITY;
    CHECK(ds_sampler_sample(s, m, &p, NULL, 0, NULL, 0, &r) == DS_ERR_RANGE);
    CHECK_ERR_CONTAINS("every logit is -inf");
    /* logit_bias -100 everywhere is not a mask: a token is still drawn */
    ds_logit_bias b[5];
    for (int i = 0; i < 5; i++) b[i] = (ds_logit_bias){i, -100};
    p = ds_sampling_default_params();
    p.logit_bias = b;
    p.n_logit_bias = 5;
    CHECK(ds_sampler_sample(s, l, &p, NULL, 0, NULL, 0, &r) == DS_OK);
    ds_sampler_close(s);

    /* a penalised call after a failed one sees no leftover counts */
    const int32_t W = 300;
    ds_sampler *a, *fresh;
    CHECK(ds_sampler_open(W, &a) == DS_OK && ds_sampler_open(W, &fresh) == DS_OK);
    float *lw = malloc(W * sizeof *lw);
    for (int32_t i = 0; i < W; i++) lw[i] = (float)(rng_unif() * 4);
    int32_t hist[40];
    for (int i = 0; i < 40; i++) hist[i] = (int32_t)rng_int(20);
    p = ds_sampling_default_params();
    p.repetition_penalty = 1.7f;
    p.frequency_penalty = 0.7f;
    p.presence_penalty = 0.4f;
    p.seed = 99;
    CHECK(ds_sampler_sample(a, lw, &p, hist, 40, hist, 40, &r) == DS_OK); /* counts, resets */
    hist[39] = W; /* out of range: refused before anything is counted */
    CHECK(ds_sampler_sample(a, lw, &p, hist, 40, hist, 40, &r) == DS_ERR_RANGE);
    hist[39] = 3;
    double *pa = malloc(W * sizeof *pa), *pf = malloc(W * sizeof *pf);
    CHECK(ds_sampler_probs(a, lw, &p, hist, 10, hist + 10, 20, pa) == DS_OK);
    CHECK(ds_sampler_probs(fresh, lw, &p, hist, 10, hist + 10, 20, pf) == DS_OK);
    CHECK(memcmp(pa, pf, W * sizeof *pa) == 0);
    free(pa);
    free(pf);
    free(lw);
    ds_sampler_close(a);
    ds_sampler_close(fresh);
}

int main(void) {
    test_validation();
    test_greedy();
    test_plain_greedy();
    test_all_masked();
    test_seeds();
    test_uniform_stats();
    test_draw_stats();
    test_logprobs();
    test_against_reference();
    return ds_test_finish("test_sampler");
}
