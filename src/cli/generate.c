/* dsinfer generate: greedy decoding of one prompt.
 *
 * The prompt is token ids used exactly as given (--prompt-ids), text tokenized with the model's
 * tokenizer (--prompt; BOS as tokenizer_config.json's add_bos_token says), or one user turn
 * rendered with the model's DeepSeek chat format (--chat; the template writes the BOS itself).
 * The result goes to stdout and nothing else does: the generated ids, comma-separated (the
 * default for --prompt-ids), or the generated text streamed as it is decoded (the default for
 * --prompt / --chat; special tokens skipped, as vLLM's skip_special_tokens does). */
#include "cli/cli.h"
#include "dist/dist.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

#include <getopt.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
    fprintf(
        f,
        "usage: dsinfer generate [--model DIR] (--prompt-ids IDS | --prompt TEXT | --chat TEXT)\n"
        "                        [--system TEXT] [--chat-template-format v3|r1|r1-0528]\n"
        "                        [--output ids|text] [--max-tokens N] [--threads N] "
        "[--ignore-eos] [--mmap]\n"
        "       dsinfer generate [--model DIR] --batch-file FILE [engine flags]\n"
        "  --model DIR        checkpoint directory (default: the built-in demo model)\n"
        "  --prompt-ids IDS   prompt token ids, e.g. 0,671,4787 (used exactly; no BOS added)\n"
        "  --prompt TEXT      prompt text (BOS added when tokenizer_config.json says so)\n"
        "  --chat TEXT        one user message, rendered with the model's chat template\n"
        "  --system TEXT      a system prompt for --chat\n"
        "  --chat-template-format F  use format F instead of detecting tokenizer_config's\n"
        "  --output ids|text  what to print (default: ids for --prompt-ids, else text)\n"
        "  --max-tokens N     tokens to generate (default 16)\n"
        "  --threads N        worker threads (default: all CPUs)\n"
        "  --mmap             weights stay mapped from the files (4 KiB pages, read on\n"
        "                     first use) instead of loaded onto 2 MiB pages\n"
        "  --ignore-eos       keep generating past the end-of-sequence token\n"
        "  --batch-file FILE  one JSON request per line (prompt | prompt_ids | messages, and\n"
        "                     OpenAI sampling fields) run through the serving engine at once;\n"
        "                     one JSON result per line on stdout (docs/engine.md)\n"
        "engine flags (--batch-file):\n" DS_CLI_ENGINE_HELP
        "Prints only the result on stdout; logs go to stderr.\n");
}

typedef struct {
    const char *model_dir, *ids, *prompt, *chat, *system, *chat_format, *batch_file;
    int text_out; /* -1 until chosen */
    long max_tokens;
    int ignore_eos;
    ds_model_params mp;
    ds_engine_params ep;
} gen_opts;

/* The greedy token: the logits' argmax_f32, refused when its logit is not finite (a NaN or +inf
 * from the weights, or every logit -inf) with the engine's sampler's words. */
static int greedy(const float *x, int64_t n, int32_t *out) {
    const int64_t i = ds_kernels_get()->argmax_f32(x, (size_t)n);
    if (i < 0) return ds_err_set(DS_ERR_RANGE, "no token can be sampled: every logit is -inf");
    if (!isfinite(x[i]))
        return ds_err_set(DS_ERR_RANGE, "logits[%lld] = %g: logits must be finite or -inf",
                          (long long)i, (double)x[i]);
    *out = (int32_t)i;
    return DS_OK;
}

/* Renders --chat (and --system) with the model's chat format into text. */
static int render_chat(const gen_opts *o, const ds_tokenizer *t, ds_buf *text) {
    ds_chat_format f;
    int rc = o->chat_format ? ds_chat_format_parse(o->chat_format, &f)
                            : ds_chat_detect(ds_tok_chat_template(t), &f);
    if (rc) return rc;
    json_t *msgs = json_array();
    if (o->system)
        json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "system", "content", o->system));
    json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "user", "content", o->chat));
    rc = ds_chat_render(f, ds_tok_bos_token(t), msgs, 1, text);
    json_decref(msgs);
    return rc;
}

/* The prompt ids for whichever of --prompt-ids / --prompt / --chat was given. */
static int prompt_ids(const gen_opts *o, const ds_tokenizer *t, int32_t **ids, int64_t *n) {
    if (o->ids) return ds_cli_parse_ids(o->ids, ids, n) ? DS_ERR_ARG : DS_OK;
    ds_buf text = {0};
    int add_bos = 0, rc = DS_OK;
    if (o->chat)
        rc = render_chat(o, t, &text);
    else {
        rc = ds_buf_append(&text, o->prompt, strlen(o->prompt));
        add_bos = ds_tok_add_bos(t);
    }
    size_t cnt = 0;
    if (!rc) rc = ds_tok_encode(t, text.data ? text.data : "", text.len, add_bos, ids, &cnt);
    ds_buf_free(&text);
    *n = (int64_t)cnt;
    if (!rc && cnt == 0) rc = ds_err_set(DS_ERR_ARG, "the prompt is empty");
    return rc;
}

/* Writes one generated token to stdout as an id or as decoded text. */
static int emit(const gen_opts *o, ds_detok *d, long index, int32_t tok) {
    if (!o->text_out) {
        printf("%s%d", index ? "," : "", tok);
    } else {
        ds_buf piece = {0};
        int rc = ds_detok_push(d, tok, &piece);
        /* Model rows beyond the tokenizer (ids 128815.. in DeepSeek-V3) have no text: HF's
         * decode drops them too. */
        if (rc == DS_ERR_RANGE) rc = DS_OK;
        if (rc) return rc;
        if (piece.len) fwrite(piece.data, 1, piece.len, stdout);
        ds_buf_free(&piece);
    }
    fflush(stdout);
    return DS_OK;
}

static int run(const gen_opts *o) {
    ds_model *m = NULL;
    ds_tokenizer *tok = NULL;
    ds_kv_cache *kv = NULL;
    float *logits = NULL;
    int32_t *ids = NULL;
    int64_t n_ids = 0;
    ds_detok detok;
    int rc = DS_OK;
    if (ds_dist_rank() > 0) return ds_cli_follow("generate", o->model_dir, &o->mp);
    if (o->prompt || o->chat || o->text_out) rc = ds_tok_open(o->model_dir, &tok);
    if (!rc) rc = prompt_ids(o, tok, &ids, &n_ids);
    double t0 = ds_now();
    if (!rc) rc = ds_model_open(o->model_dir, &o->mp, &m);
    if (rc) goto out;
    const ds_config *cfg = ds_model_config(m);
    ds_info("loaded %s in %.2fs (%d threads), prompt %lld tokens", o->model_dir, ds_now() - t0,
            ds_pool_size(ds_model_pool(m)), (long long)n_ids);
    if (n_ids + o->max_tokens > cfg->max_position_embeddings) {
        rc = ds_err_set(DS_ERR_RANGE,
                        "prompt (%lld tokens) + --max-tokens (%ld) exceeds the model's "
                        "max_position_embeddings (%lld)",
                        (long long)n_ids, o->max_tokens, (long long)cfg->max_position_embeddings);
        goto out;
    }
    if ((rc = ds_kv_open(cfg, n_ids + o->max_tokens, &kv))) goto out;
    if (!(logits = malloc((size_t)cfg->vocab_size * sizeof *logits))) {
        rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (tok) ds_detok_init(&detok, tok, 1);
    double t1 = ds_now();
    if ((rc = ds_model_forward(m, kv, ids, n_ids, 0, logits, 0))) goto out;
    double t2 = ds_now();
    long produced = 0;
    for (; produced < o->max_tokens; produced++) {
        int32_t next;
        if ((rc = greedy(logits, cfg->vocab_size, &next))) goto out;
        int is_eos = 0;
        for (int i = 0; i < cfg->n_eos; i++) is_eos |= next == cfg->eos_token_ids[i];
        if (is_eos && !o->ignore_eos) {
            ds_info("stopped at end-of-sequence token %d", next);
            break;
        }
        if ((rc = emit(o, &detok, produced, next))) goto out;
        if (produced + 1 < o->max_tokens &&
            (rc = ds_model_forward(m, kv, &next, 1, n_ids + produced, logits, 0)))
            goto out;
    }
    if (o->text_out) {
        ds_buf tail = {0};
        if (!(rc = ds_detok_finish(&detok, &tail)) && tail.len)
            fwrite(tail.data, 1, tail.len, stdout);
        ds_buf_free(&tail);
    }
    printf("\n");
    double t3 = ds_now();
    ds_info("prefill %lld tokens in %.3fs (%.1f tok/s); decode %ld tokens in %.3fs (%.1f tok/s)",
            (long long)n_ids, t2 - t1, (double)n_ids / (t2 - t1), produced, t3 - t2,
            produced > 1 ? (double)(produced - 1) / (t3 - t2) : 0.0);
out:
    if (rc) fprintf(stderr, "dsinfer generate: %s\n", ds_err_msg());
    free(logits);
    free(ids);
    ds_kv_close(kv);
    ds_model_close(m);
    ds_tok_close(tok);
    return rc ? 1 : 0;
}

int ds_cmd_generate(int argc, char **argv) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"prompt-ids", required_argument, 0, 'p'},
                                         {"prompt", required_argument, 0, 'P'},
                                         {"chat", required_argument, 0, 'c'},
                                         {"system", required_argument, 0, 's'},
                                         {"chat-template-format", required_argument, 0, 'f'},
                                         {"output", required_argument, 0, 'o'},
                                         {"max-tokens", required_argument, 0, 'n'},
                                         {"threads", required_argument, 0, 't'},
                                         {"mmap", no_argument, 0, 'M'},
                                         {"ignore-eos", no_argument, 0, 'e'},
                                         {"batch-file", required_argument, 0, 'b'},
                                         DS_CLI_ENGINE_OPTIONS,
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    gen_opts o = {.model_dir = ds_cli_default_model(),
                  .text_out = -1,
                  .max_tokens = 16,
                  .mp = ds_model_default_params(),
                  .ep = ds_engine_default_params()};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        char *end = NULL;
        switch (c) {
        case 'm':
            o.model_dir = optarg;
            break;
        case 'p':
            o.ids = optarg;
            break;
        case 'P':
            o.prompt = optarg;
            break;
        case 'c':
            o.chat = optarg;
            break;
        case 's':
            o.system = optarg;
            break;
        case 'f':
            o.chat_format = optarg;
            break;
        case 'o':
            if (strcmp(optarg, "ids") && strcmp(optarg, "text")) {
                fprintf(stderr, "dsinfer generate: --output must be ids or text\n");
                return 2;
            }
            o.text_out = !strcmp(optarg, "text");
            break;
        case 'n':
            o.max_tokens = strtol(optarg, &end, 10);
            if (*end || o.max_tokens < 1 || o.max_tokens > 1000000) {
                fprintf(stderr, "dsinfer generate: --max-tokens '%s' must be 1..1000000\n", optarg);
                return 2;
            }
            break;
        case 't':
            o.mp.n_threads = (int)strtol(optarg, &end, 10);
            if (*end || o.mp.n_threads < 1 || o.mp.n_threads > 1024) {
                fprintf(stderr, "dsinfer generate: --threads '%s' must be 1..1024\n", optarg);
                return 2;
            }
            break;
        case 'M':
            o.mp.map_weights = 1;
            break;
        case 'e':
            o.ignore_eos = 1;
            break;
        case 'b':
            o.batch_file = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default: {
            int r = ds_cli_engine_flag(c, optarg, "generate", &o.ep);
            if (r == 1) break;
            if (r == 0) usage(stderr);
            return 2;
        }
        }
    }
    if (o.batch_file) {
        if (optind < argc || o.ids || o.prompt || o.chat || o.system) {
            fprintf(stderr, "dsinfer generate: --batch-file takes the prompts from the file\n");
            usage(stderr);
            return 2;
        }
        return ds_cli_generate_batch(o.model_dir, o.batch_file, o.text_out != 0, &o.mp, &o.ep);
    }
    int sources = !!o.ids + !!o.prompt + !!o.chat;
    if (optind < argc || sources != 1 || (o.system && !o.chat)) {
        if (sources != 1)
            fprintf(stderr,
                    "dsinfer generate: give exactly one of --prompt-ids, --prompt, --chat\n");
        else if (o.system)
            fprintf(stderr, "dsinfer generate: --system needs --chat\n");
        usage(stderr);
        return 2;
    }
    if (o.text_out < 0) o.text_out = !o.ids;
    return run(&o);
}
