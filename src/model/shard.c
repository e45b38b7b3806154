/* The model split across MPI ranks: which rows each rank holds, the collectives the forward
 * pass needs, and the step handed from rank 0 to the others.
 *
 * Every matrix is split by rows, so each rank's share of a weight file is one contiguous
 * range that it maps and touches alone, in any stored format (an FP8 128x128 or int4 group
 * scale grid is shared, read at row0 + r). Where the usual tensor-parallel split cuts a matrix
 * by its input columns and allreduces partial sums (o_proj, down_proj), dsinfer instead gathers
 * the input (the heads' outputs, the MLP's intermediate activations) and splits the outputs, so
 * every output element is one dot product computed exactly as on one rank: the split changes
 * no number. The routed experts' weighted outputs are summed in expert order by passing the
 * partial sum from rank to rank (experts are split in order), for the same reason. The price is
 * some more bytes on the wire per layer than one allreduce; docs/deploy.md measures it.
 *
 * The step: rank 0 broadcasts a fixed header (what follows, the KV cache's geometry and id)
 * and then the batch's arrays; ranks > 0 wait for the next header as long as the server is idle
 * and run each step on a cache of the same geometry, so their caches hold what rank 0's does. */
#include "dist/dist.h"
#include "model/model_internal.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

ds_span ds_shard_span(int64_t total, int rank, int size) {
    size_t lo, hi;
    ds_split_range((size_t)total, rank, size, &lo, &hi);
    return (ds_span){(int64_t)lo, (int64_t)hi};
}

int ds_shard_init(ds_model *m) {
    const ds_config *c = &m->cfg;
    int r = ds_dist_rank(), n = ds_dist_size();
    if (c->n_heads < n)
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "%d ranks but the model has %lld attention heads: every rank needs at "
                          "least one",
                          n, (long long)c->n_heads);
    if (c->n_routed_experts > 0 && c->n_routed_experts < n)
        return ds_err_set(DS_ERR_UNSUPPORTED,
                          "%d ranks but the model has %lld routed experts: every rank needs at "
                          "least one",
                          n, (long long)c->n_routed_experts);
    m->shard = (ds_shard){
        .rank = r,
        .size = n,
        .heads = ds_shard_span(c->n_heads, r, n),
        .experts = ds_shard_span(c->n_routed_experts, r, n),
        .vocab = ds_shard_span(c->vocab_size, r, n),
        .hidden = ds_shard_span(c->hidden_size, r, n),
        .dense_inter = ds_shard_span(c->intermediate_size, r, n),
        .shared_inter = ds_shard_span(c->moe_intermediate_size * c->n_shared_experts, r, n),
    };
    return DS_OK;
}

float *ds_shard_buf(float **buf, size_t *cap, size_t n) {
    if (n > *cap) {
        ds_free(*buf);
        *buf = ds_alloc(n * sizeof(float));
        *cap = *buf ? n : 0;
        if (!*buf) ds_err_set(DS_ERR_NOMEM, "out of memory: %zu MiB of activations", n >> 18);
    }
    return *buf;
}

/* counts[r] = rows x (rank r's units) x width; NULL when out of memory. */
static int *piece_counts(const ds_model *m, int64_t rows, int64_t units, int64_t width) {
    int *counts = malloc((size_t)m->shard.size * sizeof(int));
    if (!counts) {
        ds_err_set(DS_ERR_NOMEM, "out of memory (gather)");
        return NULL;
    }
    for (int r = 0; r < m->shard.size; r++) {
        ds_span s = ds_shard_span(units, r, m->shard.size);
        counts[r] = (int)(rows * (s.hi - s.lo) * width);
    }
    return counts;
}

/* The gathered [rank][rows][piece] layout to [rows][all pieces]. */
static void interleave(const ds_model *m, const float *g, int64_t rows, int64_t units,
                       int64_t width, float *full) {
    const float *src = g;
    for (int r = 0; r < m->shard.size; r++) {
        ds_span s = ds_shard_span(units, r, m->shard.size);
        int64_t w = (s.hi - s.lo) * width, off = s.lo * width;
        for (int64_t t = 0; t < rows; t++, src += w)
            memcpy(full + t * units * width + off, src, (size_t)w * sizeof(float));
    }
}

int ds_shard_gather_cols(ds_model *m, const float *mine, int64_t rows, int64_t units, int64_t width,
                         float *full) {
    int *counts = piece_counts(m, rows, units, width);
    float *g = counts
                   ? ds_shard_buf(&m->gathered, &m->gathered_floats, (size_t)(rows * units * width))
                   : NULL;
    int rc = g ? ds_dist_allgatherv_f32(mine, g, counts) : DS_ERR_NOMEM;
    if (!rc) interleave(m, g, rows, units, width, full);
    free(counts);
    return rc;
}

int ds_shard_gather_cols_root(ds_model *m, const float *mine, int64_t rows, int64_t units,
                              float *full) {
    int *counts = piece_counts(m, rows, units, 1);
    float *g = !counts ? NULL
               : m->shard.rank != 0
                   ? m->gathered /* unused off the root */
                   : ds_shard_buf(&m->gathered, &m->gathered_floats, (size_t)(rows * units));
    int rc =
        counts && (g || m->shard.rank) ? ds_dist_gatherv_f32(mine, g, counts, 0) : DS_ERR_NOMEM;
    if (!rc && m->shard.rank == 0) interleave(m, g, rows, units, 1, full);
    free(counts);
    return rc;
}

/* ---- the step ---- */

enum { STEP_RUN = 1, STEP_STOP = 2 };

typedef struct {
    int32_t kind, n_tokens, n_seqs, max_blocks, n_logits, kv_dtype;
    int64_t kv_id, kv_blocks, kv_block_size;
} step_header;

/* tokens, positions, seq, block tables, logits indices: one int32 array in that order */
static size_t payload_ints(const step_header *h) {
    return 3 * (size_t)h->n_tokens + (size_t)h->n_seqs * (size_t)h->max_blocks +
           (size_t)h->n_logits;
}

int ds_shard_send_step(const ds_kv_cache *kv, const ds_batch *b) {
    step_header h = {STEP_RUN,  b->n_tokens,     b->n_seqs,    b->max_blocks, b->n_logits,
                     kv->dtype, (int64_t)kv->id, kv->n_blocks, kv->block_size};
    size_t n = payload_ints(&h);
    int32_t *p = malloc(n * sizeof(int32_t));
    if (!p) return ds_err_set(DS_ERR_NOMEM, "out of memory (step of %d tokens)", b->n_tokens);
    int32_t *q = p;
    size_t nt = (size_t)b->n_tokens, nb = (size_t)b->n_seqs * (size_t)b->max_blocks;
    memcpy(q, b->tokens, nt * sizeof *q), q += nt;
    memcpy(q, b->positions, nt * sizeof *q), q += nt;
    memcpy(q, b->seq, nt * sizeof *q), q += nt;
    memcpy(q, b->block_tables, nb * sizeof *q), q += nb;
    memcpy(q, b->logits_idx, (size_t)b->n_logits * sizeof *q);
    int rc = ds_dist_bcast(&h, sizeof h, 0, 0);
    if (!rc) rc = ds_dist_bcast(p, n * sizeof(int32_t), 0, 0);
    free(p);
    return rc;
}

void ds_shard_send_stop(ds_model *m) {
    if (m->shard.size < 2 || m->shard.rank != 0 || ds_dist_broken()) return;
    step_header h = {.kind = STEP_STOP};
    if (ds_dist_bcast(&h, sizeof h, 0, 0))
        ds_warn("could not tell the other ranks to stop: %s", ds_err_msg());
}

int ds_model_follow(ds_model *m) {
    if (m->shard.rank == 0) return ds_err_set(DS_ERR_ARG, "rank 0 leads; it does not follow");
    ds_kv_cache *kv = NULL;
    int64_t kv_id = 0;
    int32_t *p = NULL;
    int rc;
    for (;;) {
        step_header h;
        if ((rc = ds_dist_bcast(&h, sizeof h, 0, 1))) break;
        if (h.kind == STEP_STOP) break;
        if (h.kind != STEP_RUN || h.n_tokens < 1 || h.n_seqs < 1 || h.max_blocks < 1 ||
            h.n_logits < 0) {
            rc = ds_err_set(DS_ERR_FORMAT, "rank %d: malformed step from rank 0", m->shard.rank);
            break;
        }
        int32_t *np = realloc(p, payload_ints(&h) * sizeof(int32_t));
        if (!np) {
            rc = ds_err_set(DS_ERR_NOMEM, "out of memory (step of %d tokens)", h.n_tokens);
            break;
        }
        p = np;
        if ((rc = ds_dist_bcast(p, payload_ints(&h) * sizeof(int32_t), 0, 0))) break;
        if (h.kv_id != kv_id) {
            /* rank 0 opened another cache; going back to an older one would silently read a
             * cache this rank no longer holds */
            if (h.kv_id < kv_id) {
                rc = ds_err_set(DS_ERR_ARG, "rank 0 returned to an earlier KV cache");
                break;
            }
            ds_kv_close(kv);
            kv = NULL;
            if ((rc = ds_kv_open_paged(&m->cfg, h.kv_blocks, h.kv_block_size,
                                       (ds_kv_dtype)h.kv_dtype, &kv)))
                break;
            kv_id = h.kv_id;
        }
        size_t nt = (size_t)h.n_tokens;
        ds_batch b = {h.n_tokens, p,          p + nt,
                      p + 2 * nt, h.n_seqs,   h.max_blocks,
                      p + 3 * nt, h.n_logits, p + 3 * nt + (size_t)h.n_seqs * (size_t)h.max_blocks};
        if ((rc = ds_model_forward_batch(m, kv, &b, NULL, NULL))) break;
        /* this rank's copy of the weights changed: leave, rank 0 then fails the requests */
        if ((rc = ds_model_check_files(m))) break;
    }
    if (rc) rc = ds_err_wrap(rc, "rank %d", m->shard.rank);
    ds_kv_close(kv);
    free(p);
    return rc;
}

/* ---- memory ---- */

/* Reads one byte per page of w's rows (volatile: the reads are the point); returns its bytes. */
static uint64_t touch_mat(const ds_mat *w) {
    if (w->rows <= 0) return 0;
    uint64_t row =
        w->int4 ? (uint64_t)(w->cols + 1) / 2 : (uint64_t)w->cols * ds_dtype_size(w->dtype);
    const volatile unsigned char *c = w->data;
    for (uint64_t i = 0; i < row * (uint64_t)w->rows; i += 4096) (void)c[i];
    return ds_mat_bytes(w);
}

static uint64_t touch_mlp(const ds_mlp *p) {
    return touch_mat(&p->gate) + touch_mat(&p->up) + touch_mat(&p->down);
}

void ds_shard_prefault(ds_model *m) {
    const ds_config *c = &m->cfg;
    uint64_t mine = touch_mat(&m->embed);
    if (m->lm_head.data != m->embed.data) mine += touch_mat(&m->lm_head);
    for (int64_t l = 0; l < c->n_layers; l++) {
        const ds_layer *L = &m->layers[l];
        mine += touch_mat(&L->q_a) + touch_mat(&L->q_b) + touch_mat(&L->kv_a) +
                touch_mat(&L->kv_b) + touch_mat(&L->o);
        if (!L->moe) {
            mine += touch_mlp(&L->dense);
            continue;
        }
        mine += touch_mat(&L->router) + touch_mlp(&L->shared);
        for (int64_t e = m->shard.experts.lo; e < m->shard.experts.hi; e++)
            mine += touch_mlp(&L->experts[e]);
    }
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
        fclose(f);
    }
    char host[64] = "?";
    gethostname(host, sizeof host - 1);
    ds_info("rank %d/%d on %s (pid %d): heads %lld-%lld, experts %lld-%lld, vocabulary %lld-%lld: "
            "%.3f GiB of weights, resident %.3f GiB",
            m->shard.rank, m->shard.size, host, (int)getpid(), (long long)m->shard.heads.lo,
            (long long)m->shard.heads.hi - 1, (long long)m->shard.experts.lo,
            (long long)m->shard.experts.hi - 1, (long long)m->shard.vocab.lo,
            (long long)m->shard.vocab.hi - 1, (double)mine / (1 << 30),
            (double)resident * (double)sysconf(_SC_PAGESIZE) / (1 << 30));
}
