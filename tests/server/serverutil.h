/* Helpers of the end-to-end server tests: start the real `dsinfer serve` on a free loopback port
 * (--port 0; the port is read from its log), a minimal HTTP/1.1 client on raw sockets (so that
 * tests can also send what no HTTP library would: truncated bodies, slow headers, abrupt
 * disconnects), and curl through popen as a user would. Header-only: static functions. */
#ifndef DS_TEST_SERVERUTIL_H
#define DS_TEST_SERVERUTIL_H

#include "testutil.h"

#include <arpa/inet.h>
#include <strings.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* every helper is optional for a test that includes this file */
#define SRV_FN static __attribute__((unused))

typedef struct {
    pid_t pid;
    int port;
    char log[4096];
} srv_proc;

SRV_FN double srv_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

SRV_FN void srv_sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Reads a whole file (malloc'd, NUL-terminated); NULL when unreadable. */
SRV_FN char *srv_read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 14, n = 0, got;
    char *buf = malloc(cap);
    while (buf && (got = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += got;
        if (n + 1 == cap) {
            char *b = realloc(buf, cap *= 2);
            if (!b) break;
            buf = b;
        }
    }
    fclose(f);
    if (buf) buf[n] = 0;
    return buf;
}

/* ---- a minimal HTTP client ---- */

SRV_FN int srv_connect(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    struct timeval tv = {120, 0}; /* no test read may hang forever */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

SRV_FN int srv_send_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k <= 0) {
            if (k < 0 && errno == EINTR) continue;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* POSTs body to /v1/completions on a fresh connection (Connection: close) without reading the
 * answer: the socket, -1 when the server cannot be reached. */
SRV_FN int srv_send_completion(int port, const char *body) {
    int fd = srv_connect(port);
    if (fd < 0) return -1;
    char head[256];
    int hl = snprintf(head, sizeof head,
                      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      "Content-Length: %zu\r\n\r\n",
                      strlen(body));
    if (srv_send_all(fd, head, (size_t)hl) || srv_send_all(fd, body, strlen(body))) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Reads until EOF (or the receive timeout); malloc'd, NUL-terminated; *n its length. */
SRV_FN char *srv_read_all(int fd, size_t *n) {
    size_t cap = 1 << 14, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf) return NULL;
        if (len + 1 >= cap) {
            char *b = realloc(buf, cap *= 2);
            if (!b) {
                free(buf);
                return NULL;
            }
            buf = b;
        }
        ssize_t k = recv(fd, buf + len, cap - len - 1, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        len += (size_t)k;
    }
    buf[len] = 0;
    if (n) *n = len;
    return buf;
}

/* A parsed response. */
typedef struct {
    int status; /* 0: no response (connection closed or reset) */
    char *head; /* status line + headers */
    char *body; /* de-chunked */
    size_t body_len;
} srv_resp;

SRV_FN void srv_resp_free(srv_resp *r) {
    free(r->head);
    free(r->body);
    memset(r, 0, sizeof *r);
}

/* Case-insensitive header lookup in r->head; the value (copied into out) or NULL. */
SRV_FN const char *srv_header(const srv_resp *r, const char *name, char *out, size_t cap) {
    if (!r->head) return NULL;
    size_t nl = strlen(name);
    for (const char *p = strstr(r->head, "\r\n"); p && p[2]; p = strstr(p + 2, "\r\n")) {
        const char *h = p + 2;
        if (!strncasecmp(h, name, nl) && h[nl] == ':') {
            h += nl + 1;
            while (*h == ' ') h++;
            size_t k = 0;
            while (h[k] && h[k] != '\r' && k + 1 < cap) {
                out[k] = h[k];
                k++;
            }
            out[k] = 0;
            return out;
        }
    }
    return NULL;
}

/* Splits a raw HTTP response (one, read to EOF) into status, headers and (de-chunked) body. */
SRV_FN void srv_parse(char *raw, size_t n, srv_resp *r) {
    memset(r, 0, sizeof *r);
    if (!raw) return;
    char *end = strstr(raw, "\r\n\r\n");
    if (strncmp(raw, "HTTP/1.", 7) || !end) {
        free(raw);
        return;
    }
    r->status = atoi(raw + 9);
    size_t hl = (size_t)(end - raw);
    r->head = malloc(hl + 1);
    memcpy(r->head, raw, hl);
    r->head[hl] = 0;
    char *b = end + 4;
    size_t bl = n - (size_t)(b - raw);
    char te[64];
    if (srv_header(r, "Transfer-Encoding", te, sizeof te) && strstr(te, "chunked")) {
        char *out = malloc(bl + 1);
        size_t o = 0;
        char *p = b, *lim = b + bl;
        while (p < lim) {
            char *e;
            unsigned long sz = strtoul(p, &e, 16);
            char *crlf = strstr(p, "\r\n");
            if (!crlf || e == p) break;
            p = crlf + 2;
            if (sz == 0 || p + sz > lim) break;
            memcpy(out + o, p, sz);
            o += sz;
            p += sz + 2;
        }
        out[o] = 0;
        r->body = out;
        r->body_len = o;
    } else {
        r->body = malloc(bl + 1);
        memcpy(r->body, b, bl);
        r->body[bl] = 0;
        r->body_len = bl;
    }
    free(raw);
}

/* One request on a fresh connection ("Connection: close"); extra_headers may be NULL or lines
 * each ending in \r\n. */
SRV_FN srv_resp srv_http(int port, const char *method, const char *path, const char *extra_headers,
                         const char *body, size_t body_len) {
    srv_resp r;
    memset(&r, 0, sizeof r);
    int fd = srv_connect(port);
    if (fd < 0) return r;
    char head[2048];
    int hl = snprintf(head, sizeof head,
                      "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n"
                      "Content-Type: application/json\r\n%sContent-Length: %zu\r\n\r\n",
                      method, path, port, extra_headers ? extra_headers : "", body ? body_len : 0);
    if (srv_send_all(fd, head, (size_t)hl) == 0 && body) srv_send_all(fd, body, body_len);
    size_t n = 0;
    char *raw = srv_read_all(fd, &n);
    close(fd);
    srv_parse(raw, n, &r);
    return r;
}

SRV_FN srv_resp srv_post(int port, const char *path, const char *json) {
    return srv_http(port, "POST", path, NULL, json, strlen(json));
}

SRV_FN srv_resp srv_get(int port, const char *path) {
    return srv_http(port, "GET", path, NULL, NULL, 0);
}

/* The value of a Prometheus series line "name{...} value" (the first whose name matches); -1
 * when absent. */
SRV_FN double srv_metric(const char *text, const char *name) {
    size_t nl = strlen(name);
    for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        if (!strncmp(p, name, nl) && (p[nl] == '{' || p[nl] == ' ')) {
            const char *sp = strchr(p, '}');
            sp = sp ? sp + 1 : p + nl;
            return strtod(sp, NULL);
        }
    }
    return -1;
}

/* ---- the server process ---- */

/* Starts `dsinfer serve model --port 0 args...` (args NULL-terminated) with its stderr in a log
 * file, waits for its port and for /health 200 (up to 60 s). 0 on success. */
/* srv_start with another command before MODEL (NULL-terminated, found in PATH), e.g.
 * mpirun -np 2 DSINFER_BIN serve, or DSINFER_BIN launch --hosts ...; NULL: DSINFER_BIN serve. */
SRV_FN int srv_start_with(srv_proc *s, const char *const *prefix, const char *model,
                          const char *const *args) {
    memset(s, 0, sizeof *s);
    const char *tmp = getenv("TMPDIR");
    snprintf(s->log, sizeof s->log, "%s/dsinfer-serve-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    int lfd = mkstemp(s->log);
    if (lfd < 0) return -1;
    const char *argv[64];
    int k = 0;
    for (int i = 0; prefix && prefix[i] && k < 40; i++) argv[k++] = prefix[i];
    if (!prefix) {
        argv[k++] = DSINFER_BIN;
        argv[k++] = "serve";
    }
    argv[k++] = model;
    argv[k++] = "--port";
    argv[k++] = "0";
    for (int i = 0; args && args[i] && k < 62; i++) argv[k++] = args[i];
    argv[k] = NULL;
    s->pid = fork();
    if (s->pid < 0) return -1;
    if (s->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* a test that dies takes its server with it */
        dup2(lfd, 2);
        int nul = open("/dev/null", O_RDWR);
        if (nul >= 0) {
            dup2(nul, 0);
            dup2(nul, 1);
        }
        execvp(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(lfd);
    const double t0 = srv_now();
    while (srv_now() - t0 < 60) {
        int st;
        if (waitpid(s->pid, &st, WNOHANG) == s->pid) {
            char *log = srv_read_file(s->log);
            fprintf(stderr, "dsinfer serve exited early; log:\n%s\n", log ? log : "");
            free(log);
            s->pid = 0;
            return -1;
        }
        if (!s->port) {
            char *log = srv_read_file(s->log);
            const char *p = log ? strstr(log, "listening on http://127.0.0.1:") : NULL;
            if (p) s->port = atoi(p + strlen("listening on http://127.0.0.1:"));
            free(log);
        }
        if (s->port) {
            srv_resp r = srv_get(s->port, "/health");
            int ok = r.status == 200;
            srv_resp_free(&r);
            if (ok) return 0;
        }
        srv_sleep_ms(50);
    }
    return -1;
}

SRV_FN int srv_start(srv_proc *s, const char *model, const char *const *args) {
    return srv_start_with(s, NULL, model, args);
}

/* SIGTERM (or sig), then waits up to timeout_s; the exit status, -1 when it had to be killed
 * or died of a signal. */
SRV_FN int srv_stop_sig(srv_proc *s, int sig, double timeout_s) {
    if (s->pid <= 0) return -1;
    kill(s->pid, sig);
    const double t0 = srv_now();
    int st = 0;
    while (srv_now() - t0 < timeout_s) {
        if (waitpid(s->pid, &st, WNOHANG) == s->pid) {
            s->pid = 0;
            return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        }
        srv_sleep_ms(20);
    }
    kill(s->pid, SIGKILL);
    waitpid(s->pid, &st, 0);
    s->pid = 0;
    return -1;
}

SRV_FN int srv_stop(srv_proc *s) {
    return srv_stop_sig(s, SIGTERM, 60);
}

/* The server's log so far (malloc'd). */
SRV_FN char *srv_log(const srv_proc *s) {
    return srv_read_file(s->log);
}

#endif
