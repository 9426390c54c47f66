/* The plain C program the extension's loop is compared with: load the model, read the points (raw float64,
 * NPOINTS x 4), evaluate every point in one loop, print the seconds it took and a checksum.
 *     loop LIBRARY SYMBOL POINTS.bin NPOINTS */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "mpimap_native.h"

int main(int argc, char **argv)
{
    if (argc != 5) { fprintf(stderr, "usage: loop LIBRARY SYMBOL POINTS.bin NPOINTS\n"); return 2; }
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 2; }
    mpimap_native_fn fn = (mpimap_native_fn)dlsym(lib, argv[2]);
    if (!fn) { fprintf(stderr, "%s\n", dlerror()); return 2; }
    long n = atol(argv[4]);
    double *x = malloc(sizeof(double) * 4 * n), *y = malloc(sizeof(double) * n);
    int *codes = malloc(sizeof(int) * n);
    FILE *f = fopen(argv[3], "rb");
    if (!f || fread(x, sizeof(double) * 4, n, f) != (size_t)n) { fprintf(stderr, "cannot read points\n"); return 2; }
    fclose(f);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++)
        codes[i] = fn(x + 4 * i, 4, y + i, 1, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double sum = 0;
    for (long i = 0; i < n; i++) sum += codes[i] ? 0 : y[i];
    printf("%.9f %.17g\n", (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec), sum);
    return 0;
}
