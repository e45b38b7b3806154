/* dsinfer bench: a serving benchmark client for any OpenAI-compatible endpoint (docs/bench.md).
 *
 * The options are those of vLLM's benchmark_serving.py and of the benchmark_parallel.py that
 * DeepSeek deployments use (--parallel-num, --epochs, --prompt-tokens, --output-tokens); the
 * figures and the result JSON are vLLM's. This file parses options, finds the model name and
 * builds the prompts; src/bench/ does the rest. */
#include "bench/bench.h"
#include "cli/cli.h"

#include <curl/curl.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void usage(FILE *f) {
    fprintf(f,
            "usage: dsinfer bench [--backend openai|openai-chat] [--host H] [--port P]\n"
            "                     [--base-url URL] [--model NAME] [--tokenizer DIR]\n"
            "                     [--parallel-num N] [--num-prompts N | --epochs E]\n"
            "                     [--request-rate R] [--prompt-tokens N] [--output-tokens N]\n"
            "                     [--dataset random|FILE.jsonl] [--seed S] [--api-key KEY]\n"
            "                     [--timeout S] [--result-json FILE]\n"
            "\n"
            "Streams requests to an OpenAI-compatible server and reports what vLLM's\n"
            "benchmark reports: throughputs, TTFT / TPOT / ITL / E2EL (mean, median, p90,\n"
            "p99), failures by reason (docs/bench.md).\n"
            "\n"
            "  --backend B         openai: /v1/completions (default);\n"
            "                      openai-chat: /v1/chat/completions\n"
            "  --host H, --port P  the server (default 127.0.0.1:8000)\n"
            "  --base-url URL      instead of host and port, e.g. http://10.0.0.5:8000\n"
            "  --endpoint PATH     default /v1/completions or /v1/chat/completions\n"
            "  --model NAME        the model name sent (default: the first of GET /v1/models)\n"
            "  --tokenizer DIR     tokenizer.json (+ tokenizer_config.json): prompts of exact\n"
            "                      length, output tokens the server does not report (default:\n"
            "                      the DeepSeek-V3 tokenizer scripts/setup.sh fetched)\n"
            "  --parallel-num N    requests in flight at most (vLLM's --max-concurrency); with\n"
            "                      --request-rate inf, N clients in a closed loop (default 1;\n"
            "                      with a --request-rate: no limit; 0: no limit)\n"
            "  --num-prompts N     requests in all (default --epochs x --parallel-num, or\n"
            "                      1000 without a limit)\n"
            "  --epochs E          rounds of --parallel-num requests (default 1)\n"
            "  --request-rate R    requests/s, Poisson arrivals (default inf: all at once)\n"
            "  --prompt-tokens N   tokens of each random prompt as the server counts them\n"
            "                      (BOS and chat template included; default 256)\n"
            "  --output-tokens N   max_tokens of each request, with ignore_eos (default 256)\n"
            "  --no-ignore-eos     do not send ignore_eos (servers that refuse it)\n"
            "  --dataset D         random (default), or a JSONL file with {\"prompt\": ...} or\n"
            "                      {\"messages\": [...]} per line and an optional \"max_tokens\"\n"
            "  --seed S            random prompts and arrival times (default 0)\n"
            "  --api-key KEY       sent as a bearer token (default: $OPENAI_API_KEY)\n"
            "  --timeout S         seconds per request (default 21600)\n"
            "  --result-json FILE  every figure and every request's figures, as JSON\n"
            "\n"
            "Exit status: 0 when every request succeeded; 1 when any failed (the summary is\n"
            "printed all the same) or the run could not start; 2 for a usage error.\n");
}

static volatile sig_atomic_t interrupted;
static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}

static int parse_long(const char *flag, const char *v, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) {
        fprintf(stderr, "dsinfer bench: %s '%s' must be an integer in %ld..%ld\n", flag, v, lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

static int parse_double(const char *flag, const char *v, double *out) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end || !(x > 0)) {
        fprintf(stderr, "dsinfer bench: %s '%s' must be a positive number\n", flag, v);
        return -1;
    }
    *out = x;
    return 0;
}

typedef struct {
    ds_buf b;
} sink;

static size_t to_buf(char *p, size_t s, size_t n, void *ud) {
    sink *k = ud;
    if (k->b.len + s * n > (8u << 20) || ds_buf_append(&k->b, p, s * n)) return 0;
    return s * n;
}

/* GET base/v1/models -> data[0].id (malloc'd) or NULL with a message. */
static char *first_model(const char *base, const char *api_key, double timeout_s) {
    char *url = NULL, *auth = NULL, *id = NULL;
    sink k = {{0}};
    struct curl_slist *h = NULL;
    CURL *c = curl_easy_init();
    if (!c || asprintf(&url, "%s/v1/models", base) < 0) {
        url = NULL;
        ds_err_set(DS_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (api_key) {
        if (asprintf(&auth, "Authorization: Bearer %s", api_key) < 0) auth = NULL;
        if (auth) h = curl_slist_append(NULL, auth);
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    }
    char eb[CURL_ERROR_SIZE] = "";
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, to_buf);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &k);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, eb);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)fmin(timeout_s, 60) * 1000L);
    CURLcode rc = curl_easy_perform(c);
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    if (rc != CURLE_OK) {
        ds_err_set(DS_ERR_IO, "GET %s: %s", url, eb[0] ? eb : curl_easy_strerror(rc));
        goto out;
    }
    if (status != 200) {
        ds_err_set(DS_ERR_IO, "GET %s: HTTP %ld", url, status);
        goto out;
    }
    json_t *o = json_loadb(k.b.data ? k.b.data : "", k.b.len, 0, NULL);
    const char *s =
        json_string_value(json_object_get(json_array_get(json_object_get(o, "data"), 0), "id"));
    if (s) id = strdup(s);
    if (!s) ds_err_set(DS_ERR_FORMAT, "GET %s: no data[0].id in the answer", url);
    json_decref(o);
out:
    if (c) curl_easy_cleanup(c);
    curl_slist_free_all(h);
    free(auth);
    free(url);
    ds_buf_free(&k.b);
    return id;
}

int ds_cmd_bench(int argc, char **argv) {
    enum {
        O_BACKEND = 0x100,
        O_HOST,
        O_PORT,
        O_BASE,
        O_ENDPOINT,
        O_MODEL,
        O_TOK,
        O_PAR,
        O_NUM,
        O_EPOCHS,
        O_RATE,
        O_PT,
        O_OT,
        O_DATASET,
        O_SEED,
        O_KEY,
        O_TIMEOUT,
        O_JSON,
        O_NO_EOS
    };
    static const struct option opts[] = {{"backend", required_argument, 0, O_BACKEND},
                                         {"host", required_argument, 0, O_HOST},
                                         {"port", required_argument, 0, O_PORT},
                                         {"base-url", required_argument, 0, O_BASE},
                                         {"endpoint", required_argument, 0, O_ENDPOINT},
                                         {"model", required_argument, 0, O_MODEL},
                                         {"served-model-name", required_argument, 0, O_MODEL},
                                         {"tokenizer", required_argument, 0, O_TOK},
                                         {"parallel-num", required_argument, 0, O_PAR},
                                         {"max-concurrency", required_argument, 0, O_PAR},
                                         {"num-prompts", required_argument, 0, O_NUM},
                                         {"epochs", required_argument, 0, O_EPOCHS},
                                         {"request-rate", required_argument, 0, O_RATE},
                                         {"prompt-tokens", required_argument, 0, O_PT},
                                         {"output-tokens", required_argument, 0, O_OT},
                                         {"dataset", required_argument, 0, O_DATASET},
                                         {"seed", required_argument, 0, O_SEED},
                                         {"api-key", required_argument, 0, O_KEY},
                                         {"timeout", required_argument, 0, O_TIMEOUT},
                                         {"result-json", required_argument, 0, O_JSON},
                                         {"no-ignore-eos", no_argument, 0, O_NO_EOS},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    ds_bench_params p = ds_bench_default_params();
    const char *host = "127.0.0.1", *base_arg = NULL, *endpoint = NULL, *model_arg = NULL;
    const char *tok_dir = ds_cli_default_tokenizer_dir(), *dataset = "random", *json_path = NULL;
    const char *api_key = getenv("OPENAI_API_KEY");
    long port = 8000, par = -1, num = -1, epochs = -1, pt = 256, ot = 256, seed = 0;
    double rate = INFINITY;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case O_BACKEND:
            if (!strcmp(optarg, "openai"))
                p.backend = DS_BENCH_COMPLETIONS;
            else if (!strcmp(optarg, "openai-chat"))
                p.backend = DS_BENCH_CHAT;
            else {
                fprintf(stderr, "dsinfer bench: --backend '%s' must be openai or openai-chat\n",
                        optarg);
                bad = 1;
            }
            break;
        case O_HOST:
            host = optarg;
            break;
        case O_PORT:
            bad = parse_long("--port", optarg, 1, 65535, &port);
            break;
        case O_BASE:
            base_arg = optarg;
            break;
        case O_ENDPOINT:
            endpoint = optarg;
            break;
        case O_MODEL:
            model_arg = optarg;
            break;
        case O_TOK:
            tok_dir = optarg;
            break;
        case O_PAR:
            bad = parse_long("--parallel-num", optarg, 0, 1000000, &par);
            break;
        case O_NUM:
            bad = parse_long("--num-prompts", optarg, 1, 100000000, &num);
            break;
        case O_EPOCHS:
            bad = parse_long("--epochs", optarg, 1, 1000000, &epochs);
            break;
        case O_RATE:
            bad = parse_double("--request-rate", optarg, &rate);
            break;
        case O_PT:
            bad = parse_long("--prompt-tokens", optarg, 1, 1 << 24, &pt);
            break;
        case O_OT:
            bad = parse_long("--output-tokens", optarg, 1, 1 << 24, &ot);
            break;
        case O_DATASET:
            dataset = optarg;
            break;
        case O_SEED:
            bad = parse_long("--seed", optarg, 0, 0x7fffffffL, &seed);
            break;
        case O_KEY:
            api_key = optarg;
            break;
        case O_TIMEOUT:
            bad = parse_double("--timeout", optarg, &p.timeout_s);
            break;
        case O_JSON:
            json_path = optarg;
            break;
        case O_NO_EOS:
            p.ignore_eos = 0;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        if (bad) return 2;
    }
    if (optind < argc) {
        fprintf(stderr, "dsinfer bench: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (num > 0 && epochs > 0) {
        fprintf(stderr, "dsinfer bench: give --num-prompts or --epochs, not both\n");
        return 2;
    }
    const int open_loop = isfinite(rate);
    if (par < 0) par = open_loop ? 0 : 1;
    if (epochs > 0 && par == 0) {
        fprintf(stderr, "dsinfer bench: --epochs counts rounds of --parallel-num requests; "
                        "give --parallel-num N (N > 0) or --num-prompts\n");
        return 2;
    }
    if (num < 0) num = par > 0 ? par * (epochs > 0 ? epochs : 1) : 1000;
    if (num > 100000000) {
        fprintf(stderr, "dsinfer bench: --epochs x --parallel-num is more than 1e8 requests\n");
        return 2;
    }
    p.max_concurrency = (int32_t)par;
    p.request_rate = rate;
    p.seed = (uint64_t)seed;
    p.api_key = api_key && *api_key ? api_key : NULL;
    p.progress = 1;

    /* the endpoint URL */
    char *base = NULL, *url = NULL, *model = NULL;
    if (base_arg)
        base = strdup(base_arg);
    else if (asprintf(&base, strchr(host, ':') ? "http://[%s]:%ld" : "http://%s:%ld", host, port) <
             0)
        base = NULL;
    if (!base) return 1;
    for (size_t l = strlen(base); l && base[l - 1] == '/'; l--) base[l - 1] = 0;
    if (!endpoint)
        endpoint = p.backend == DS_BENCH_CHAT ? "/v1/chat/completions" : "/v1/completions";
    if (asprintf(&url, "%s%s", base, endpoint) < 0) url = NULL;

    ds_tokenizer *tok = NULL;
    ds_bench_tok bt = {0};
    ds_bench_prompt *prompts = NULL;
    ds_bench_result *res = NULL;
    ds_bench_run_info info = {0};
    ds_bench_summary sum = {0};
    json_t *config = NULL;
    int status = 1, curl_up = 0;
    if (!url) goto out;
    if (curl_global_init(CURL_GLOBAL_DEFAULT)) {
        ds_err_set(DS_ERR_IO, "curl_global_init failed");
        goto out;
    }
    curl_up = 1;
    if (model_arg) {
        model = strdup(model_arg);
    } else if (!(model = first_model(base, p.api_key, p.timeout_s))) {
        ds_err_wrap(DS_ERR_IO, "cannot ask the server for its model name (give --model)");
        goto out;
    }
    if (!model) goto out;
    if (ds_tok_open(tok_dir, &tok)) {
        ds_err_wrap(DS_ERR_IO, "--tokenizer %s", tok_dir);
        goto out;
    }
    if (ds_bench_tok_init(&bt, tok)) goto out;
    p.model = model;
    p.url = url;
    p.tok = tok;
    const int random = !strcmp(dataset, "random");
    if (random
            ? ds_bench_random_prompts(&bt, p.backend, (int32_t)num, (int32_t)pt, (int32_t)ot,
                                      p.seed, &prompts)
            : ds_bench_file_prompts(&bt, p.backend, dataset, (int32_t)num, (int32_t)ot, &prompts))
        goto out;
    res = calloc((size_t)num, sizeof *res);
    if (!res) {
        ds_err_set(DS_ERR_NOMEM, "out of memory");
        goto out;
    }
    ds_cli_raise_fd_limit(par > 0 ? par : num);
    fprintf(stderr, "bench: %ld requests to %s (model %s), ", num, url, model);
    if (random)
        fprintf(stderr, "%ld prompt tokens, ", pt);
    else
        fprintf(stderr, "prompts from %s, ", dataset);
    fprintf(stderr, "%ld output tokens%s; ", ot, p.ignore_eos ? " (ignore_eos)" : "");
    if (open_loop) fprintf(stderr, "Poisson arrivals at %g req/s, ", rate);
    if (par > 0)
        fprintf(stderr, "at most %ld in flight%s\n", par, open_loop ? "" : " (closed loop)");
    else
        fprintf(stderr, "no concurrency limit\n");

    struct sigaction sa, old_int;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigaction(SIGINT, &sa, &old_int);
    signal(SIGPIPE, SIG_IGN);
    p.interrupt = &interrupted;
    int rc = ds_bench_run(&p, prompts, (int32_t)num, res, &info);
    sigaction(SIGINT, &old_int, NULL);
    if (rc) goto out;
    if (ds_bench_summarize(res, (int32_t)num, &info, p.max_concurrency, rate, &sum)) goto out;
    ds_bench_print(stdout, &sum);
    fflush(stdout);
    status = sum.failed ? 1 : 0;

    if (json_path) {
        char date[32];
        time_t now = time(NULL);
        struct tm tmv;
        strftime(date, sizeof date, "%Y%m%d-%H%M%S", localtime_r(&now, &tmv));
        config = json_pack("{s:s,s:s,s:s,s:s,s:s,s:s,s:i,s:s,s:i,s:b,s:i}", "date", date, "backend",
                           p.backend == DS_BENCH_CHAT ? "openai-chat" : "openai", "model_id", model,
                           "tokenizer_id", tok_dir, "base_url", base, "endpoint", endpoint,
                           "num_prompts", (int)num, "dataset", dataset, "output_tokens", (int)ot,
                           "ignore_eos", p.ignore_eos, "seed", (int)seed);
        if (config && random) json_object_set_new(config, "prompt_tokens", json_integer(pt));
        if (config && par > 0) json_object_set_new(config, "parallel_num", json_integer(par));
        if (config && epochs > 0) json_object_set_new(config, "epochs", json_integer(epochs));
        json_t *j = ds_bench_json(&sum, res, (int32_t)num, config);
        if (!j || json_dump_file(j, json_path, JSON_INDENT(1)) != 0) {
            fprintf(stderr, "dsinfer bench: cannot write %s: %s\n", json_path,
                    j ? strerror(errno) : "out of memory");
            status = 1;
        }
        json_decref(j);
    }
out:
    if (status && ds_err_msg()[0] && !sum.total)
        fprintf(stderr, "dsinfer bench: %s\n", ds_err_msg());
    if (interrupted) fprintf(stderr, "dsinfer bench: interrupted\n");
    json_decref(config);
    ds_bench_summary_free(&sum);
    ds_bench_run_info_free(&info);
    if (res)
        for (long i = 0; i < num; i++) ds_bench_result_free(&res[i]);
    free(res);
    ds_bench_prompts_free(prompts, (int32_t)num);
    ds_bench_tok_free(&bt);
    ds_tok_close(tok);
    free(model);
    free(url);
    free(base);
    if (curl_up) curl_global_cleanup();
    return status;
}
