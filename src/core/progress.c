/* A one-line progress bar on stderr, redrawn at most 10 times a second; silent off a terminal so
 * logs and CI output stay clean. */
#include "core/core.h"

#include <unistd.h>

static void draw(ds_progress *pb, int final) {
    double now = ds_now();
    if (!final && now - pb->last_draw < 0.1) return;
    pb->last_draw = now;
    double frac = pb->total ? (double)pb->done / (double)pb->total : 1.0;
    if (frac > 1.0) frac = 1.0;
    char bar[31];
    int fill = (int)(frac * 30.0);
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = 0;
    fprintf(stderr, "\r%s [%s] %5.1f%% %6.1fs%s", pb->label, bar, 100.0 * frac, now - pb->t0,
            final ? "\n" : "");
    fflush(stderr);
}

void ds_progress_begin(ds_progress *pb, const char *label, uint64_t total) {
    pb->label = label;
    pb->total = total;
    pb->done = 0;
    pb->t0 = ds_now();
    pb->last_draw = 0;
    pb->active = isatty(STDERR_FILENO);
    if (pb->active) draw(pb, 0);
}

void ds_progress_add(ds_progress *pb, uint64_t n) {
    pb->done += n;
    if (pb->active) draw(pb, 0);
}

void ds_progress_end(ds_progress *pb) {
    if (pb->active) draw(pb, 1);
    pb->active = 0;
}
