/* dsinfer serve MODEL_DIR: the OpenAI-compatible HTTP server (docs/server.md).
 *
 * Order of things: bind the port first (a taken port fails at once, and /health answers 503
 * while the weights load), then load the model, tokenizer and engine, then attach them (ready).
 * The main thread then only waits for SIGINT/SIGTERM (blocked in every thread, taken here with
 * sigtimedwait) and logs the throughput line every --log-stats-interval seconds. On the first
 * signal: stop accepting, let in-flight requests finish for up to --shutdown-timeout seconds (a
 * second signal cuts that short), then close the engine (what still runs is aborted and its
 * clients get an error event or a 503), close the server, exit 0.
 * Under mpirun (docs/deploy.md) only rank 0 gets this far; the other ranks follow its steps.
 * SIGUSR1, which mpirun forwards to every rank, is the graceful stop there, because mpirun
 * answers SIGINT/SIGTERM by ending every rank at once; a rank that fails makes the engine fail
 * what runs with 503s and this process exit 1. */
#include "cli/cli.h"
#include "dist/dist.h"
#include "server/server.h"
#include "tokenizer/tokenizer.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void usage(FILE *f) {
    fprintf(f,
            "usage: dsinfer serve MODEL_DIR [--host H] [--port P] [--served-model-name NAME...]\n"
            "                     [--api-key KEY] [engine flags] [options]\n\n"
            "OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models,\n"
            "/health, /version, /tokenize, /detokenize, /metrics (docs/server.md).\n\n"
            "  --host H                  address to bind (default 127.0.0.1; 0.0.0.0 for all)\n"
            "  --port P                  port (default 8000; 0 picks a free one, printed)\n"
            "  --served-model-name N...  model name(s) clients use (default: MODEL_DIR as given)\n"
            "  --api-key KEY             require \"Authorization: Bearer KEY\" on /v1/* (also\n"
            "                            from $VLLM_API_KEY)\n"
            "  --tensor-parallel-size N  ranks the model is split over: must equal mpirun's -np\n"
            "                            (default: the number of ranks; docs/deploy.md)\n"
            "  --dist-timeout S          with several ranks: seconds rank 0 waits for the others\n"
            "                            before it fails the requests and exits (default 300)\n"
            "  --trust-remote-code       accepted for vLLM compatibility; no effect\n"
            "  --threads N               model worker threads (default: all CPUs)\n"
            "  --mmap                    weights stay mapped from the files (4 KiB pages, read on\n"
            "                            first use) instead of loaded onto 2 MiB pages\n"
            "  --chat-template-format F  v3, r1 or r1-0528 (default: recognised from\n"
            "                            tokenizer_config.json)\n"
            "  --reasoning-parser P      deepseek_r1: <think> text goes to reasoning_content;\n"
            "                            none: never (default: on for R1 chat templates)\n"
            "  --generation-config G     auto: sampling defaults from generation_config.json\n"
            "                            (default); vllm: OpenAI's defaults\n"
            "  --max-queued-requests N   waiting sequences beyond --max-num-seqs before 503\n"
            "                            (default 1024; -1 unlimited)\n"
            "  --max-request-body-bytes B  larger bodies get 413 (default 8M)\n"
            "  --limit-concurrency N     open connections at most (default 1024)\n"
            "  --timeout-keep-alive S    idle connection timeout (default 5)\n"
            "  --request-read-timeout S  a request's headers and body must arrive within S\n"
            "                            seconds (default 30)\n"
            "  --shutdown-timeout S      on SIGINT/SIGTERM, let running requests finish for up\n"
            "                            to S seconds (default 30), then abort them\n"
            "  --disable-log-requests    no per-request log lines\n"
            "  --disable-log-stats       no periodic throughput lines\n"
            "  --log-stats-interval S    seconds between throughput lines (default 10)\n\n"
            "engine flags:\n" DS_CLI_ENGINE_HELP);
}

/* generation_config.json's sampling defaults (vLLM's --generation-config auto). */
static void generation_defaults(const char *dir, ds_oai_ctx *c) {
    char *path = ds_cli_path_join(dir, "generation_config.json");
    json_error_t je;
    json_t *g = path ? json_load_file(path, 0, &je) : NULL;
    free(path);
    if (!json_is_object(g)) {
        json_decref(g);
        return;
    }
    json_t *v;
    int any = 0;
    if (json_is_number(v = json_object_get(g, "temperature")) && json_number_value(v) >= 0)
        c->temperature = (float)json_number_value(v), any = 1;
    if (json_is_number(v = json_object_get(g, "top_p")) && json_number_value(v) > 0 &&
        json_number_value(v) <= 1)
        c->top_p = (float)json_number_value(v), any = 1;
    if (json_is_integer(v = json_object_get(g, "top_k")) && json_integer_value(v) >= 0 &&
        json_integer_value(v) < INT32_MAX)
        c->top_k = (int32_t)json_integer_value(v), any = 1;
    if (json_is_number(v = json_object_get(g, "min_p")) && json_number_value(v) >= 0 &&
        json_number_value(v) <= 1)
        c->min_p = (float)json_number_value(v), any = 1;
    if (json_is_number(v = json_object_get(g, "repetition_penalty")) && json_number_value(v) > 0)
        c->repetition_penalty = (float)json_number_value(v), any = 1;
    if (any)
        ds_info("default sampling parameters from generation_config.json: temperature %g, "
                "top_p %g, top_k %d, min_p %g, repetition_penalty %g (--generation-config vllm "
                "to ignore)",
                (double)c->temperature, (double)c->top_p, c->top_k, (double)c->min_p,
                (double)c->repetition_penalty);
    json_decref(g);
}

static int parse_int(const char *flag, const char *arg, long lo, long hi, long *out) {
    char *end;
    long v = strtol(arg, &end, 10);
    if (!*arg || *end || v < lo || v > hi) {
        fprintf(stderr, "dsinfer serve: %s '%s' must be an integer in [%ld, %ld]\n", flag, arg, lo,
                hi);
        return -1;
    }
    *out = v;
    return 0;
}

int ds_cmd_serve(int argc, char **argv) {
    enum {
        O_HOST = 1,
        O_PORT,
        O_NAME,
        O_KEY,
        O_TP,
        O_DIST_TIMEOUT,
        O_TRUST,
        O_THREADS,
        O_MMAP,
        O_CHATFMT,
        O_REASON,
        O_GENCFG,
        O_QUEUE,
        O_BODY,
        O_CONC,
        O_KEEPALIVE,
        O_READTO,
        O_SHUTDOWN,
        O_NOLOGREQ,
        O_NOLOGSTATS,
        O_LOGINT,
        O_MODEL,
        O_HELP
    };
    static const struct option opts[] = {{"host", required_argument, 0, O_HOST},
                                         {"port", required_argument, 0, O_PORT},
                                         {"served-model-name", required_argument, 0, O_NAME},
                                         {"api-key", required_argument, 0, O_KEY},
                                         {"tensor-parallel-size", required_argument, 0, O_TP},
                                         {"dist-timeout", required_argument, 0, O_DIST_TIMEOUT},
                                         {"trust-remote-code", no_argument, 0, O_TRUST},
                                         {"threads", required_argument, 0, O_THREADS},
                                         {"mmap", no_argument, 0, O_MMAP},
                                         {"chat-template-format", required_argument, 0, O_CHATFMT},
                                         {"reasoning-parser", required_argument, 0, O_REASON},
                                         {"generation-config", required_argument, 0, O_GENCFG},
                                         {"max-queued-requests", required_argument, 0, O_QUEUE},
                                         {"max-request-body-bytes", required_argument, 0, O_BODY},
                                         {"limit-concurrency", required_argument, 0, O_CONC},
                                         {"timeout-keep-alive", required_argument, 0, O_KEEPALIVE},
                                         {"request-read-timeout", required_argument, 0, O_READTO},
                                         {"shutdown-timeout", required_argument, 0, O_SHUTDOWN},
                                         {"disable-log-requests", no_argument, 0, O_NOLOGREQ},
                                         {"disable-log-stats", no_argument, 0, O_NOLOGSTATS},
                                         {"log-stats-interval", required_argument, 0, O_LOGINT},
                                         {"model", required_argument, 0, O_MODEL},
                                         DS_CLI_ENGINE_OPTIONS,
                                         {"help", no_argument, 0, O_HELP},
                                         {0, 0, 0, 0}};
    ds_server_params sp = ds_server_default_params();
    ds_engine_params ep = ds_engine_default_params();
    ds_model_params mp = ds_model_default_params();
    const char *model_dir = NULL, *chat_fmt = NULL, *reasoning = NULL, *gencfg = "auto";
    const char **names = calloc((size_t)argc + 1, sizeof *names);
    int n_names = 0, log_stats = 1;
    long shutdown_s = 30, log_interval = 10, v;
    sp.api_key = getenv("VLLM_API_KEY");
    if (!names) return 1;
    /* --served-model-name takes one or more words, as vLLM's (nargs="+"): the flag and the
     * words after it that are not flags are taken out of getopt's way first (the
     * --served-model-name=NAME form is left to getopt) */
    for (int i = 1; i < argc;) {
        if (strcmp(argv[i], "--served-model-name")) {
            i++;
            continue;
        }
        int k = i + 1;
        while (k < argc && argv[k][0] != '-') names[n_names++] = argv[k++];
        if (k == i + 1) {
            fprintf(stderr, "dsinfer serve: --served-model-name needs at least one name\n");
            return free(names), 2;
        }
        memmove(&argv[i], &argv[k], (size_t)(argc - k) * sizeof *argv);
        argc -= k - i;
    }
    int c, rc = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        int r = ds_cli_engine_flag(c, optarg, "serve", &ep);
        if (r < 0) return free(names), 2;
        if (r > 0) continue;
        switch (c) {
        case O_HOST:
            sp.host = optarg;
            break;
        case O_PORT:
            if (parse_int("--port", optarg, 0, 65535, &v)) return free(names), 2;
            sp.port = (int)v;
            break;
        case O_NAME:
            names[n_names++] = optarg;
            break;
        case O_KEY:
            sp.api_key = optarg;
            break;
        case O_TP:
            if (parse_int("--tensor-parallel-size", optarg, 1, 4096, &v)) return free(names), 2;
            if (v != ds_dist_size()) {
                fprintf(stderr,
                        "dsinfer serve: --tensor-parallel-size %ld, but %d rank%s running: "
                        "start one rank per share with mpirun -np %ld (or dsinfer launch; "
                        "docs/deploy.md)%s\n",
                        v, ds_dist_size(), ds_dist_size() == 1 ? " is" : "s are", v,
                        ds_dist_available() ? "" : "; this build has no MPI");
                return free(names), 2;
            }
            break;
        case O_DIST_TIMEOUT:
            if (parse_int("--dist-timeout", optarg, 0, 86400, &v)) return free(names), 2;
            ds_dist_set_timeout((double)v);
            break;
        case O_TRUST:
            break; /* vLLM compatibility; nothing remote is ever run */
        case O_THREADS:
            if (parse_int("--threads", optarg, 1, 1024, &v)) return free(names), 2;
            mp.n_threads = (int)v;
            break;
        case O_MMAP:
            mp.map_weights = 1;
            break;
        case O_CHATFMT:
            chat_fmt = optarg;
            break;
        case O_REASON:
            if (strcmp(optarg, "deepseek_r1") && strcmp(optarg, "none")) {
                fprintf(stderr, "dsinfer serve: --reasoning-parser '%s': deepseek_r1 or none\n",
                        optarg);
                return free(names), 2;
            }
            reasoning = optarg;
            break;
        case O_GENCFG:
            if (strcmp(optarg, "auto") && strcmp(optarg, "vllm")) {
                fprintf(stderr, "dsinfer serve: --generation-config '%s': auto or vllm\n", optarg);
                return free(names), 2;
            }
            gencfg = optarg;
            break;
        case O_QUEUE:
            if (parse_int("--max-queued-requests", optarg, -1, 1 << 30, &v)) return free(names), 2;
            sp.max_queued_requests = (int)v;
            break;
        case O_BODY: {
            uint64_t b;
            if (!ds_cli_parse_u64(optarg, &b, 1) || b < 1024 || b > ((uint64_t)1 << 34)) {
                fprintf(stderr,
                        "dsinfer serve: --max-request-body-bytes '%s' must be a size from 1K "
                        "to 16G\n",
                        optarg);
                return free(names), 2;
            }
            sp.max_body_bytes = (size_t)b;
            break;
        }
        case O_CONC:
            if (parse_int("--limit-concurrency", optarg, 1, 1 << 20, &v)) return free(names), 2;
            sp.max_connections = (int)v;
            break;
        case O_KEEPALIVE:
            if (parse_int("--timeout-keep-alive", optarg, 1, 86400, &v)) return free(names), 2;
            sp.timeout_keep_alive_s = (int)v;
            break;
        case O_READTO:
            if (parse_int("--request-read-timeout", optarg, 1, 86400, &v)) return free(names), 2;
            sp.request_read_timeout_s = (int)v;
            break;
        case O_SHUTDOWN:
            if (parse_int("--shutdown-timeout", optarg, 0, 86400, &shutdown_s))
                return free(names), 2;
            break;
        case O_NOLOGREQ:
            sp.log_requests = 0;
            break;
        case O_NOLOGSTATS:
            log_stats = 0;
            break;
        case O_LOGINT:
            if (parse_int("--log-stats-interval", optarg, 1, 86400, &log_interval))
                return free(names), 2;
            break;
        case O_MODEL:
            model_dir = optarg;
            break;
        case O_HELP:
            usage(stdout);
            return free(names), 0;
        default:
            usage(stderr);
            return free(names), 2;
        }
    }
    for (; optind < argc; optind++) {
        if (model_dir) {
            fprintf(stderr, "dsinfer serve: one MODEL_DIR, got '%s' and '%s'\n", model_dir,
                    argv[optind]);
            return free(names), 2;
        }
        model_dir = argv[optind];
    }
    if (!model_dir) {
        fprintf(stderr, "dsinfer serve: MODEL_DIR is required\n");
        usage(stderr);
        return free(names), 2;
    }
    if (n_names == 0) names[n_names++] = model_dir; /* vLLM: the path exactly as given */
    ds_chat_format forced_fmt = DS_CHAT_V3;
    if (chat_fmt && ds_chat_format_parse(chat_fmt, &forced_fmt)) {
        fprintf(stderr, "dsinfer serve: %s\n", ds_err_msg());
        return free(names), 2;
    }

    /* a weight file truncated under the server: failed requests, not a SIGBUS */
    if (ds_mapguard_install()) ds_warn("%s", ds_err_msg());
    if (ds_dist_rank() > 0) return free(names), ds_cli_follow("serve", model_dir, &mp);
    ds_cli_raise_fd_limit(sp.max_connections * 2L);

    /* signals: blocked in every thread (the server's and engine's inherit the mask) and taken
     * by this thread with sigtimedwait */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGUSR1); /* mpirun forwards it to every rank; the others ignore it */
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    sp.model_path = model_dir;
    sp.version = DSINFER_VERSION;
    sp.max_num_seqs = ep.max_num_seqs;
    ds_server *srv = NULL;
    ds_model *m = NULL;
    ds_tokenizer *tok = NULL;
    ds_engine *e = NULL;
    if (ds_server_open(&sp, &srv)) {
        fprintf(stderr, "dsinfer serve: %s\n", ds_err_msg());
        return free(names), 1;
    }
    ds_info("dsinfer %s: listening on http://%s%s%s:%d (loading %s)", DSINFER_VERSION,
            strchr(sp.host, ':') ? "[" : "", sp.host, strchr(sp.host, ':') ? "]" : "",
            ds_server_port(srv), model_dir);
    double t0 = ds_now();
    if ((rc = ds_model_open(model_dir, &mp, &m))) goto fail;
    if (ds_cli_file_exists(model_dir, "tokenizer.json") && (rc = ds_tok_open(model_dir, &tok)))
        goto fail;
    ep.tokenizer = tok;
    if ((rc = ds_engine_open(m, &ep, &e))) goto fail;
    ds_oai_ctx ctx = ds_oai_default_ctx();
    ctx.tok = tok;
    ctx.vocab = (int32_t)ds_model_config(m)->vocab_size;
    ctx.max_model_len = ds_engine_max_model_len(e);
    ctx.names = names;
    ctx.n_names = n_names;
    if (chat_fmt) {
        ctx.chat_format = (int)forced_fmt;
    } else if (tok && ds_tok_chat_template(tok)) {
        ds_chat_format f;
        if (ds_chat_detect(ds_tok_chat_template(tok), &f) == DS_OK)
            ctx.chat_format = (int)f;
        else
            ds_warn("%s: /v1/chat/completions will answer 400 (give --chat-template-format)",
                    ds_err_msg());
    }
    ctx.reasoning = reasoning
                        ? !strcmp(reasoning, "deepseek_r1")
                        : (ctx.chat_format == DS_CHAT_R1 || ctx.chat_format == DS_CHAT_R1_0528);
    if (!strcmp(gencfg, "auto")) generation_defaults(model_dir, &ctx);
    ds_server_attach(srv, e, &ctx);
    ds_info("ready in %.1fs: model '%s' (%s), max_model_len %d, chat template %s, reasoning "
            "parser %s%s",
            ds_now() - t0, names[0], tok ? "with tokenizer" : "no tokenizer: token ids only",
            ctx.max_model_len,
            ctx.chat_format >= 0 ? ds_chat_format_name((ds_chat_format)ctx.chat_format) : "none",
            ctx.reasoning ? "deepseek_r1" : "none",
            sp.api_key && sp.api_key[0] ? ", API key required" : "");

    /* serve until a signal */
    double next_log = ds_now() + (double)log_interval;
    int sig = 0, weights_changed = 0;
    for (;;) {
        struct timespec ts = {1, 0};
        sig = sigtimedwait(&sigs, NULL, &ts);
        if (sig == SIGINT || sig == SIGTERM || sig == SIGUSR1) break;
        if (ds_dist_broken()) break; /* a rank failed: the engine fails every request now */
        /* so does the engine, at its next step, when a weight file changed (each running
         * request gets that message, none "shutting down"); an idle server finds out here */
        if ((weights_changed = ds_model_check_files(m) != DS_OK)) {
            ds_log(DS_LOG_ERROR, "%s: exiting; restart the server to load the new weights",
                   ds_err_msg());
            break;
        }
        if (log_stats && ds_now() >= next_log) {
            ds_server_log_stats(srv, 0);
            next_log = ds_now() + (double)log_interval;
        }
    }
    /* Under mpirun SIGINT/SIGTERM means the job is ending (mpirun stops every rank when one
     * fails or it is itself stopped): the other ranks may be gone, so no step may wait long
     * for them. SIGUSR1 (dsinfer launch's graceful stop) leaves them running to the end. */
    if (ds_dist_size() > 1 && sig != SIGUSR1) ds_dist_set_timeout(2);
    ds_info("%s: shutting down: no new connections; waiting up to %lds for %lld running "
            "request(s)",
            ds_dist_broken()  ? "a rank failed"
            : weights_changed ? "the weights changed"
            : sig == SIGINT   ? "SIGINT"
            : sig == SIGUSR1  ? "SIGUSR1"
                              : "SIGTERM",
            shutdown_s, (long long)ds_server_in_flight(srv));
    ds_server_drain(srv);
    double deadline = ds_now() + (double)shutdown_s;
    while (ds_server_in_flight(srv) > 0 && ds_now() < deadline) {
        struct timespec ts = {0, 100 * 1000 * 1000};
        int s2 = sigtimedwait(&sigs, NULL, &ts);
        if (s2 == SIGINT || s2 == SIGTERM) {
            ds_info("second signal: aborting the running requests");
            break;
        }
    }
    if (log_stats) ds_server_log_stats(srv, 0); /* what happened since the last line */
    if (ds_server_in_flight(srv) > 0)
        ds_info("aborting %lld request(s) still running", (long long)ds_server_in_flight(srv));
    ds_server_detach(srv);
    ds_engine_close(e); /* aborts what still runs */
    /* the aborted requests' 503s and stream error events are written by their connection
     * threads: give them a moment before the daemon's stop cuts every socket, but not a client
     * that does not read */
    for (double until = ds_now() + 5; ds_server_in_flight(srv) > 0 && ds_now() < until;) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    ds_server_close(srv);
    ds_tok_close(tok);
    ds_model_close(m);
    free(names);
    if (ds_dist_broken()) {
        fprintf(stderr, "dsinfer serve: the ranks lost each other; exiting with status 1\n");
        return 1;
    }
    if (weights_changed) return 1;
    ds_info("shut down cleanly");
    return 0;
fail:
    fprintf(stderr, "dsinfer serve: %s\n", ds_err_msg());
    ds_server_close(srv);
    ds_engine_close(e);
    ds_tok_close(tok);
    ds_model_close(m);
    free(names);
    return 1;
}
