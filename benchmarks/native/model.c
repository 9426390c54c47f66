/* The benchmark's native models (mpimap_native.h signature), over one fixed data set of 100 points.
 *   poly    chi-square of a cubic a + b t + c t^2 + d t^3 (4 parameters): ~40 ns, a cheap model
 *   gauss   chi-square of a Gaussian a exp(-(t - mu)^2 / 2 s^2) + bg (4 parameters): ~100 exp, ~0.5 us
 * poly_py and gauss_py in bench_native.py are the same models in Python (numpy), for the end-to-end run. */
#include <math.h>
#include <stdint.h>

#include "mpimap_native.h"

#define NDATA 100
static double t[NDATA], d[NDATA];
static int ready;

static void data(void)
{
    for (int i = 0; i < NDATA; i++) {
        t[i] = -1.0 + 2.0 * i / (NDATA - 1);
        d[i] = 0.5 + t[i] - 0.3 * t[i] * t[i] + 0.01 * ((i * 37) % 11 - 5);
    }
    ready = 1;
}

MPIMAP_EXPORT int poly(const double *x, int64_t nx, double *y, int64_t ny, void *ctx)
{
    if (!ready) data();
    double a = x[0], b = x[1], c = x[2], e = x[3], sum = 0;
    for (int i = 0; i < NDATA; i++) {
        double r = a + t[i] * (b + t[i] * (c + t[i] * e)) - d[i];
        sum += r * r;
    }
    y[0] = sum;
    return 0;
}

MPIMAP_EXPORT int gauss(const double *x, int64_t nx, double *y, int64_t ny, void *ctx)
{
    if (!ready) data();
    double a = x[0], mu = x[1], s = x[2], bg = x[3], sum = 0, w = -0.5 / (s * s);
    if (s <= 0) return 3;
    for (int i = 0; i < NDATA; i++) {
        double u = t[i] - mu, r = a * exp(w * u * u) + bg - d[i];
        sum += r * r;
    }
    y[0] = sum;
    return 0;
}
