/* mpimap_native.h: the signature of a native model that mpimap evaluates (docs/native.rst).
 *
 * One point of nx doubles in x, ny doubles out in y; ctx is the model's own data (the bytes given as
 * mpimap.native(..., context=...) on the worker, or NULL).  Return 0 for success; any other value fails
 * that point and is recorded as the point's error ("returned <code>").
 *
 * A function of this type must be safe to call from a thread other than the main one, and without
 * Python's GIL: mpimap calls it with the GIL released.  Export it with C linkage, e.g.
 *
 *     #include "mpimap_native.h"
 *     MPIMAP_EXPORT int chi2(const double *x, int64_t nx, double *y, int64_t ny, void *ctx) { ... }
 */
#ifndef MPIMAP_NATIVE_H
#define MPIMAP_NATIVE_H

#include <stdint.h>

#ifdef __cplusplus
#define MPIMAP_EXPORT extern "C" __attribute__((visibility("default")))
#else
#define MPIMAP_EXPORT __attribute__((visibility("default")))
#endif

typedef int (*mpimap_native_fn)(const double *x, int64_t nx, double *y, int64_t ny, void *ctx);

#endif
