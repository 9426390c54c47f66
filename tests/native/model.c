/* Native models for the tests and the benchmark: a Gaussian chi-square and functions that misbehave. */
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "mpimap_native.h"

#define NDATA 100

/* The data a 4-parameter Gaussian (amplitude, centre, width, background) is fitted to: fixed, made up. */
static double data_x[NDATA], data_y[NDATA];
static int data_ready;

static void make_data(void)
{
    for (int i = 0; i < NDATA; i++) {
        data_x[i] = -5.0 + 10.0 * i / (NDATA - 1);
        data_y[i] = 3.0 * exp(-0.5 * (data_x[i] - 0.5) * (data_x[i] - 0.5) / 1.44) + 0.2 + 0.01 * ((i * 37) % 11 - 5);
    }
    data_ready = 1;
}

/* chi2(amplitude, centre, width, background) -> chi2; a width <= 0 fails with code 3. */
MPIMAP_EXPORT int chi2(const double *x, int64_t nx, double *y, int64_t ny, void *ctx)
{
    if (nx != 4 || ny < 1)
        return 2;
    if (!data_ready)
        make_data();
    double a = x[0], mu = x[1], s = x[2], b = x[3];
    if (s <= 0)
        return 3;
    double sum = 0, w = -0.5 / (s * s);
    for (int i = 0; i < NDATA; i++) {
        double d = data_x[i] - mu, r = a * exp(w * d * d) + b - data_y[i];
        sum += r * r;
    }
    y[0] = sum;
    return 0;
}

/* y = (sum of x, product of x, nx, the first context double or -1): outputs 4. */
MPIMAP_EXPORT int stats(const double *x, int64_t nx, double *y, int64_t ny, void *ctx)
{
    double s = 0, p = 1;
    for (int64_t i = 0; i < nx; i++) {
        s += x[i];
        p *= x[i];
    }
    y[0] = s;
    if (ny > 1) y[1] = p;
    if (ny > 2) y[2] = (double)nx;
    if (ny > 3) {
        double c = -1;
        if (ctx) memcpy(&c, ctx, sizeof c);
        y[3] = c;
    }
    return 0;
}

/* y = x[0]^2, but x[0] == 13 crashes (SIGSEGV), x[0] == 7 loops for ever, x[0] < 0 returns -x[0]. */
MPIMAP_EXPORT int misbehave(const double *x, int64_t nx, double *y, int64_t ny, void *ctx)
{
    if (x[0] == 13) raise(SIGSEGV);
    if (x[0] == 7) for (;;) pause();
    if (x[0] < 0) return (int)-x[0];
    y[0] = x[0] * x[0];
    return 0;
}

/* y = x[0] after sleeping x[0] seconds (none at all for 0). */
MPIMAP_EXPORT int nap(const double *x, int64_t nx, double *y, int64_t ny, void *ctx)
{
    struct timespec ts = {(time_t)x[0], (long)((x[0] - (time_t)x[0]) * 1e9)};
    while (x[0] > 0 && nanosleep(&ts, &ts) != 0) {}
    y[0] = x[0];
    return 0;
}

/* Sleeps x[0] seconds: called through ctypes.PyDLL, it holds the GIL all that time. */
MPIMAP_EXPORT void hold(double seconds)
{
    struct timespec ts = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    while (nanosleep(&ts, &ts) != 0) {}
}

int not_exported_but_data = 5;
