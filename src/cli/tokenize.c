/* dsinfer tokenize / detokenize: text <-> ids with a model directory's tokenizer.json.
 *
 * tokenize has three modes:
 * - one input (--text T, else all of stdin as raw bytes): the ids, comma-separated, one line;
 *   BOS is prepended when tokenizer_config.json says add_bos_token=true, unless --no-bos;
 *   --add-bos forces it.
 * - --batch: every stdin line is the HEX encoding of one input's raw bytes (an empty line is
 *   the empty input); one output line of comma-separated ids per input (empty when none). No
 *   BOS unless --add-bos. This is the contract of the conformance test; keep it exactly.
 * - --bench FILE: encodes the file's bytes repeatedly for about 2 s on one thread, prints MB/s.
 * detokenize prints the lossy UTF-8 decoding of --ids, with no newline added. */
#include "cli/cli.h"
#include "core/core.h"
#include "tokenizer/tokenizer.h"

#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

static void usage_tok(FILE *f) {
    fprintf(f, "usage: dsinfer tokenize [--model DIR] [--text T] [--add-bos|--no-bos]\n"
               "       dsinfer tokenize [--model DIR] --batch [--add-bos]\n"
               "       dsinfer tokenize [--model DIR] --bench FILE\n"
               "  --model DIR   directory with tokenizer.json (or the file itself; default: the\n"
               "                demo model)\n"
               "  --text T      the text (default: all of stdin, as raw bytes)\n"
               "  --add-bos     prepend BOS; --no-bos: do not (default: tokenizer_config.json's\n"
               "                add_bos_token; in --batch mode the default is no BOS)\n"
               "  --batch       stdin lines are hex-encoded inputs; one line of ids per input\n"
               "  --bench FILE  encode FILE repeatedly for ~2 s (one thread) and print MB/s\n"
               "Prints comma-separated ids on stdout. Invalid UTF-8 is read as U+FFFD.\n");
}

static void usage_detok(FILE *f) {
    fprintf(f, "usage: dsinfer detokenize [--model DIR] (--ids 1,2,3 | --batch) [--skip-special]\n"
               "Prints the decoded text (invalid UTF-8 as U+FFFD), no newline added.\n"
               "  --batch  stdin lines of comma-separated ids; one line of hex bytes per input\n");
}

/* Reads all of f; *out malloc'd. */
static int read_all(FILE *f, ds_buf *out) {
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (ds_buf_append(out, chunk, n)) return DS_ERR_NOMEM;
    if (ferror(f)) return ds_err_set(DS_ERR_IO, "read error: %s", strerror(errno));
    if (!out->data && ds_buf_append(out, "", 0)) return DS_ERR_NOMEM;
    return DS_OK;
}

static void print_ids(FILE *f, const int32_t *ids, size_t n) {
    for (size_t i = 0; i < n; i++) fprintf(f, i ? ",%d" : "%d", (int)ids[i]);
    fputc('\n', f);
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int run_batch(const ds_tokenizer *t, int add_bos) {
    ds_buf in = {0}, bytes = {0};
    int rc = read_all(stdin, &in);
    size_t line_no = 0;
    for (size_t pos = 0; !rc && pos < in.len; line_no++) {
        const char *nl = memchr(in.data + pos, '\n', in.len - pos);
        size_t end = nl ? (size_t)(nl - in.data) : in.len, len = end - pos;
        if (len && in.data[pos + len - 1] == '\r') len--;
        bytes.len = 0;
        if (len % 2) {
            rc = ds_err_set(DS_ERR_ARG, "--batch line %zu: odd number of hex digits", line_no + 1);
            break;
        }
        for (size_t i = 0; i < len && !rc; i += 2) {
            int hi = hexval(in.data[pos + i]), lo = hexval(in.data[pos + i + 1]);
            if (hi < 0 || lo < 0) {
                rc = ds_err_set(DS_ERR_ARG, "--batch line %zu: '%c%c' is not hex", line_no + 1,
                                in.data[pos + i], in.data[pos + i + 1]);
                break;
            }
            char b = (char)(hi << 4 | lo);
            rc = ds_buf_append(&bytes, &b, 1);
        }
        if (rc) break;
        int32_t *ids;
        size_t n;
        if ((rc = ds_tok_encode(t, bytes.data ? bytes.data : "", bytes.len, add_bos, &ids, &n)))
            break;
        print_ids(stdout, ids, n);
        free(ids);
        pos = end + 1;
    }
    ds_buf_free(&in);
    ds_buf_free(&bytes);
    fflush(stdout);
    return rc;
}

static int run_bench(const ds_tokenizer *t, const char *file) {
    FILE *f = fopen(file, "rb");
    if (!f) return ds_err_set(DS_ERR_IO, "%s: %s", file, strerror(errno));
    ds_buf text = {0};
    int rc = read_all(f, &text);
    fclose(f);
    if (rc) return rc;
    size_t total = 0, n_tok = 0;
    int iters = 0;
    double t0 = ds_now(), el = 0;
    do {
        int32_t *ids;
        size_t n;
        if ((rc = ds_tok_encode(t, text.data, text.len, 0, &ids, &n))) break;
        free(ids);
        total += text.len;
        n_tok = n;
        iters++;
        el = ds_now() - t0;
    } while (el < 2.0);
    if (!rc)
        printf("%.2f MB/s  (%zu bytes -> %zu tokens, %d iterations in %.2f s, 1 thread)\n",
               total / el / 1e6, text.len, n_tok, iters, el);
    ds_buf_free(&text);
    return rc;
}

int ds_cmd_tokenize(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'}, {"text", required_argument, 0, 't'},
        {"add-bos", no_argument, 0, 'b'},     {"no-bos", no_argument, 0, 'B'},
        {"batch", no_argument, 0, 'x'},       {"bench", required_argument, 0, 'z'},
        {"help", no_argument, 0, 'h'},        {0, 0, 0, 0}};
    const char *model = ds_cli_default_model(), *text = NULL, *bench = NULL;
    int bos = -1, batch = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case 't':
            text = optarg;
            break;
        case 'b':
            bos = 1;
            break;
        case 'B':
            bos = 0;
            break;
        case 'x':
            batch = 1;
            break;
        case 'z':
            bench = optarg;
            break;
        case 'h':
            usage_tok(stdout);
            return 0;
        default:
            usage_tok(stderr);
            return 2;
        }
    }
    if (optind < argc || (batch && (text || bench)) || (bench && text)) {
        usage_tok(stderr);
        return 2;
    }
    ds_tokenizer *t;
    if (ds_tok_open(model, &t)) {
        fprintf(stderr, "dsinfer tokenize: %s\n", ds_err_msg());
        return 1;
    }
    int rc;
    if (batch) {
        rc = run_batch(t, bos == 1);
    } else if (bench) {
        rc = run_bench(t, bench);
    } else {
        ds_buf in = {0};
        rc = text ? ds_buf_append(&in, text, strlen(text)) : read_all(stdin, &in);
        int32_t *ids = NULL;
        size_t n = 0;
        if (!rc)
            rc = ds_tok_encode(t, in.data ? in.data : "", in.len, bos < 0 ? ds_tok_add_bos(t) : bos,
                               &ids, &n);
        if (!rc) print_ids(stdout, ids, n);
        free(ids);
        ds_buf_free(&in);
    }
    if (rc) fprintf(stderr, "dsinfer tokenize: %s\n", ds_err_msg());
    ds_tok_close(t);
    return rc ? 1 : 0;
}

/* detokenize --batch: stdin lines of comma-separated ids (an empty line is no ids); one line of
 * lowercase hex of the decoded (lossy UTF-8) bytes per input line. */
static int run_detok_batch(const ds_tokenizer *t, int skip) {
    ds_buf in = {0}, out = {0};
    int rc = read_all(stdin, &in);
    size_t line_no = 0;
    for (size_t pos = 0; !rc && pos < in.len; line_no++) {
        const char *nl = memchr(in.data + pos, '\n', in.len - pos);
        size_t end = nl ? (size_t)(nl - in.data) : in.len;
        char *line = strndup(in.data + pos, end - pos);
        if (!line) {
            rc = ds_err_set(DS_ERR_NOMEM, "out of memory");
            break;
        }
        int32_t *ids = NULL;
        int64_t n = 0;
        size_t blank = strspn(line, " \t\r");
        if (line[blank] && ds_cli_parse_ids(line, &ids, &n) != 0)
            rc = ds_err_wrap(DS_ERR_ARG, "--batch line %zu", line_no + 1);
        free(line);
        out.len = 0;
        if (!rc) rc = ds_tok_decode(t, ids, (size_t)n, skip, &out);
        if (rc && rc != DS_ERR_ARG) ds_err_wrap(rc, "--batch line %zu", line_no + 1);
        free(ids);
        for (size_t i = 0; !rc && i < out.len; i++) printf("%02x", (unsigned char)out.data[i]);
        if (!rc) putchar('\n');
        pos = end + 1;
    }
    ds_buf_free(&in);
    ds_buf_free(&out);
    fflush(stdout);
    return rc;
}

int ds_cmd_detokenize(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},  {"ids", required_argument, 0, 'i'},
        {"skip-special", no_argument, 0, 's'}, {"batch", no_argument, 0, 'b'},
        {"help", no_argument, 0, 'h'},         {0, 0, 0, 0}};
    const char *model = ds_cli_default_model(), *ids_arg = NULL;
    int skip = 0, batch = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case 'i':
            ids_arg = optarg;
            break;
        case 's':
            skip = 1;
            break;
        case 'b':
            batch = 1;
            break;
        case 'h':
            usage_detok(stdout);
            return 0;
        default:
            usage_detok(stderr);
            return 2;
        }
    }
    if (optind < argc || !ids_arg == !batch) {
        usage_detok(stderr);
        return 2;
    }
    if (batch) {
        ds_tokenizer *t;
        int rc = ds_tok_open(model, &t);
        if (!rc) rc = run_detok_batch(t, skip);
        if (rc) fprintf(stderr, "dsinfer detokenize: %s\n", ds_err_msg());
        ds_tok_close(t);
        return rc ? 1 : 0;
    }
    int32_t *ids;
    int64_t n;
    if (ds_cli_parse_ids(ids_arg, &ids, &n) != 0) {
        fprintf(stderr, "dsinfer detokenize: %s\n", ds_err_msg());
        return 2;
    }
    ds_tokenizer *t;
    if (ds_tok_open(model, &t)) {
        fprintf(stderr, "dsinfer detokenize: %s\n", ds_err_msg());
        free(ids);
        return 1;
    }
    ds_buf out = {0};
    int rc = ds_tok_decode(t, ids, (size_t)n, skip, &out);
    if (!rc && out.len) fwrite(out.data, 1, out.len, stdout);
    if (rc) fprintf(stderr, "dsinfer detokenize: %s\n", ds_err_msg());
    fflush(stdout);
    ds_buf_free(&out);
    ds_tok_close(t);
    free(ids);
    return rc ? 1 : 0;
}
