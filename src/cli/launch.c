/* dsinfer launch --hosts h1,h2[,h3] MODEL_DIR [serve flags]: the mpirun command line of a
 * multi-node `dsinfer serve` (docs/deploy.md), printed, then run.
 *
 * One rank per host named (each name is one slot; mpirun fills them in order, so rank 0 runs on
 * the first), each free to use all of its node's cores (--bind-to none: the rank's own thread
 * pool spreads over them; ranks sharing a node split its cores). The same dsinfer binary and
 * MODEL_DIR path must exist on every host; mpirun starts the remote ranks over ssh.
 * mpirun ends every rank at once on SIGINT/SIGTERM, so launch turns those into SIGUSR1, which
 * mpirun forwards and serve takes as its graceful stop (finish what runs, then exit); a second
 * signal goes to mpirun unchanged. OpenMPI's grace between its SIGTERM and SIGKILL is raised to
 * 5 s so that rank 0, when another rank fails, has time to answer its clients with 503s. */
#include "cli/cli.h"

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void usage(FILE *f) {
    fprintf(f, "usage: dsinfer launch --hosts H1,H2[,...] [--iface IF] [--mpirun PATH]\n"
               "                      [--dry-run] MODEL_DIR [serve flags]\n\n"
               "Runs `dsinfer serve MODEL_DIR --tensor-parallel-size N` over N hosts with mpirun\n"
               "(one rank per host; rank 0, on the first host, serves HTTP). docs/deploy.md.\n\n"
               "  --hosts H1,H2,...  the hosts, rank 0 first (a host named twice runs two ranks)\n"
               "  --iface IF         network interface (or CIDR) for MPI's traffic and control\n"
               "                     (btl_tcp_if_include / oob_tcp_if_include)\n"
               "  --mpirun PATH      the mpirun to run (default: mpirun from PATH)\n"
               "  --dry-run          print the command and exit\n"
               "Every other argument is passed to dsinfer serve.\n");
}

static volatile sig_atomic_t signals_seen;
static volatile pid_t child;

static void forward(int sig) {
    (void)sig;
    if (child > 0) kill(child, signals_seen++ ? SIGTERM : SIGUSR1);
}

/* Shell-quoted for printing, so the printed line can be pasted as is. */
static void print_arg(const char *a) {
    int plain = *a != 0;
    for (const char *p = a; *p; p++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:,@%+", *p))
            plain = 0;
    if (plain) {
        fputs(a, stdout);
        return;
    }
    putchar('\'');
    for (const char *p = a; *p; p++) *p == '\'' ? fputs("'\\''", stdout) : putchar(*p);
    putchar('\'');
}

int ds_cmd_launch(int argc, char **argv) {
    const char *hosts = NULL, *iface = NULL, *mpirun = "mpirun";
    int dry = 0, i = 1;
    for (; i < argc; i++) { /* own flags first; the first other argument starts serve's */
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--dry-run")) {
            dry = 1;
        } else if ((!strcmp(a, "--hosts") || !strcmp(a, "--iface") || !strcmp(a, "--mpirun")) &&
                   i + 1 < argc) {
            const char **dst = a[2] == 'h' ? &hosts : a[2] == 'i' ? &iface : &mpirun;
            *dst = argv[++i];
        } else if (!strncmp(a, "--hosts=", 8)) {
            hosts = a + 8;
        } else {
            break;
        }
    }
    if (!hosts || !*hosts || i >= argc || argv[i][0] == '-') {
        fprintf(stderr, "dsinfer launch: %s\n",
                !hosts || !*hosts ? "--hosts is required" : "MODEL_DIR is required");
        usage(stderr);
        return 2;
    }
    int n = 1;
    for (const char *p = hosts; *p; p++) n += *p == ',';
    for (int k = i + 1; k < argc; k++)
        if (!strcmp(argv[k], "--tensor-parallel-size") ||
            !strncmp(argv[k], "--tensor-parallel-size=", 23)) {
            fprintf(stderr, "dsinfer launch: --tensor-parallel-size comes from --hosts (%d)\n", n);
            return 2;
        }
    char self[PATH_MAX], np[16];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len <= 0) {
        fprintf(stderr, "dsinfer launch: cannot find this program's path: %s\n", strerror(errno));
        return 1;
    }
    self[len] = 0;
    snprintf(np, sizeof np, "%d", n);
    const char **av = calloc((size_t)argc + 40, sizeof *av);
    if (!av) return 1;
    int k = 0;
    av[k++] = mpirun;
    if (geteuid() == 0) av[k++] = "--allow-run-as-root"; /* docs/deploy.md: running as root */
    av[k++] = "-np", av[k++] = np;
    av[k++] = "--host", av[k++] = hosts;
    av[k++] = "--bind-to", av[k++] = "none";
    av[k++] = "--mca", av[k++] = "odls_base_sigkill_timeout", av[k++] = "5";
    if (iface) {
        av[k++] = "--mca", av[k++] = "btl_tcp_if_include", av[k++] = iface;
        av[k++] = "--mca", av[k++] = "oob_tcp_if_include", av[k++] = iface;
    }
    av[k++] = self, av[k++] = "serve", av[k++] = argv[i];
    av[k++] = "--tensor-parallel-size", av[k++] = np;
    for (int j = i + 1; j < argc; j++) av[k++] = argv[j];
    av[k] = NULL;
    for (int j = 0; j < k; j++) {
        if (j) putchar(' ');
        print_arg(av[j]);
    }
    putchar('\n');
    fflush(stdout);
    if (dry) return free(av), 0;

    struct sigaction sa = {0};
    sa.sa_handler = forward;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        execvp(av[0], (char *const *)av);
        fprintf(stderr, "dsinfer launch: cannot run %s: %s (apt-get install openmpi-bin)\n", av[0],
                strerror(errno));
        _exit(127);
    }
    free(av);
    if (pid < 0) {
        fprintf(stderr, "dsinfer launch: fork: %s\n", strerror(errno));
        return 1;
    }
    child = pid;
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}
