/* mpimap._native: the optional C extension (docs/native.rst, docs/design.rst "The C extension").
 *
 * run_chunk() evaluates a native model (mpimap_native.h) over a slice of a chunk's points with the GIL
 * released, writing straight into the result arrays.  It returns between points when its time slice is
 * up, so the Python side can take messages (a cancel, a stop), report a batch, or recycle its process.
 * The heartbeat thread lives in heartbeat.c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "mpimap_native.h"
#include "heartbeat.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* the clock of time.monotonic() and time.perf_counter() on Linux */
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The ticker: a thread of this process that advances `ticks` every TICK_SECONDS.  An untimed loop reads
 * `ticks` between points (one load) instead of the clock (~20 ns, a third of a cheap model), and still ends
 * its slice within one point of time even when slow points follow fast ones.  Started on first use in each
 * process (a forked child has no thread of its parent's); always with the GIL held, so never twice at once. */
#define TICK_SECONDS 0.005
static int64_t ticks;
static pid_t ticker_pid;

static void *tick_forever(void *unused)
{
    struct timespec period = {0, (long)(TICK_SECONDS * 1e9)};
    for (;;) {
        nanosleep(&period, NULL);
        __atomic_add_fetch(&ticks, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

static int start_ticker(void)
{
    if (ticker_pid == getpid())
        return 0;
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int failed = pthread_create(&thread, &attr, tick_forever, NULL);
    pthread_attr_destroy(&attr);
    if (failed) {
        PyErr_SetString(PyExc_RuntimeError, "run_chunk: cannot start the ticker thread");
        return -1;
    }
    ticker_pid = getpid();
    return 0;
}

/* The slot a child process shares with its rank (isolation.py, _Slot): which point runs, since when.
 * A seqlock: seq is odd while the slot is rewritten. */
typedef struct {
    int64_t seq;
    int64_t position;
    double started;
} slot_t;

static void write_slot(slot_t *slot, int64_t position, double started)
{
    int64_t seq = __atomic_load_n(&slot->seq, __ATOMIC_RELAXED) | 1;
    __atomic_store_n(&slot->seq, seq, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&slot->position, position, __ATOMIC_RELAXED);
    __atomic_store_n((int64_t *)&slot->started, *(int64_t *)&started, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->seq, seq + 1, __ATOMIC_RELEASE);
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize, Py_ssize_t items,
                      const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->len < itemsize * items) {
        PyErr_Format(PyExc_ValueError, "run_chunk: %s holds %zd bytes, needs %zd", name, view->len,
                     itemsize * items);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(run_chunk_doc,
"run_chunk(fn, ctx, x, nx, y, ny, codes, durations, positions, start, stop, seconds, slot) -> int\n\n"
"Evaluate points start..stop-1 of x (rows of nx doubles) into y (rows of ny), the return codes into codes\n"
"(int32), each point's seconds into durations (float64; None: not timed).  Returns the index of the next\n"
"point: stop, or earlier once `seconds` have passed (checked between points).\n"
"slot: the address of the child's slot (0: none), given positions[i] (int64) of the point that runs.");

static PyObject *run_chunk(PyObject *self, PyObject *args)
{
    unsigned long long fn_addr, ctx_addr, slot_addr;
    PyObject *x_obj, *y_obj, *codes_obj, *durations_obj, *positions_obj;
    Py_ssize_t nx, ny, start, stop;
    double seconds;
    if (!PyArg_ParseTuple(args, "KKOnOnOOOnndK", &fn_addr, &ctx_addr, &x_obj, &nx, &y_obj, &ny, &codes_obj,
                          &durations_obj, &positions_obj, &start, &stop, &seconds, &slot_addr))
        return NULL;
    if (fn_addr == 0 || nx < 0 || ny < 0 || start < 0 || stop < start) {
        PyErr_SetString(PyExc_ValueError, "run_chunk: bad arguments");
        return NULL;
    }
    if (durations_obj == Py_None && slot_addr == 0 && start_ticker() < 0)
        return NULL;
    Py_buffer xv, yv, cv, dv = {0}, pv = {0};
    int timed = durations_obj != Py_None, placed = positions_obj != Py_None;
    if (get_buffer(x_obj, &xv, 0, sizeof(double) * nx, stop, "x") < 0)
        return NULL;
    if (get_buffer(y_obj, &yv, 1, sizeof(double) * ny, stop, "y") < 0)
        goto fail_x;
    if (get_buffer(codes_obj, &cv, 1, sizeof(int32_t), stop, "codes") < 0)
        goto fail_y;
    if (timed && get_buffer(durations_obj, &dv, 1, sizeof(double), stop, "durations") < 0)
        goto fail_c;
    if (placed && get_buffer(positions_obj, &pv, 0, sizeof(int64_t), stop, "positions") < 0)
        goto fail_d;

    mpimap_native_fn fn = (mpimap_native_fn)(uintptr_t)fn_addr;
    void *ctx = (void *)(uintptr_t)ctx_addr;
    const double *x = xv.buf;
    double *y = yv.buf, *durations = dv.buf;
    int32_t *codes = cv.buf;
    const int64_t *positions = pv.buf;
    slot_t *slot = (slot_t *)(uintptr_t)slot_addr;
    Py_ssize_t i = start;

    Py_BEGIN_ALLOW_THREADS
    double deadline = now() + seconds;
    /* Untimed: the slice ends once the ticker has advanced by it (at least one tick). */
    int64_t first_tick = __atomic_load_n(&ticks, __ATOMIC_RELAXED);
    int64_t slice_ticks = seconds >= 1e15 ? INT64_MAX : (int64_t)(seconds / TICK_SECONDS) + 1;
    while (i < stop) {
        if (slot || timed) {
            double started = now();
            if (slot)
                write_slot(slot, placed ? positions[i] : (int64_t)i, started);
            codes[i] = fn(x + i * nx, (int64_t)nx, y + i * ny, (int64_t)ny, ctx);
            double ended = now();
            if (timed)
                durations[i] = ended - started;
            i++;
            if (ended >= deadline)
                break;
        } else {
            codes[i] = fn(x + i * nx, (int64_t)nx, y + i * ny, (int64_t)ny, ctx);
            i++;
            if (__atomic_load_n(&ticks, __ATOMIC_RELAXED) - first_tick >= slice_ticks)
                break;
        }
    }
    Py_END_ALLOW_THREADS

    if (placed)
        PyBuffer_Release(&pv);
    if (timed)
        PyBuffer_Release(&dv);
    PyBuffer_Release(&cv);
    PyBuffer_Release(&yv);
    PyBuffer_Release(&xv);
    return PyLong_FromSsize_t(i);

fail_d:
    if (timed)
        PyBuffer_Release(&dv);
fail_c:
    PyBuffer_Release(&cv);
fail_y:
    PyBuffer_Release(&yv);
fail_x:
    PyBuffer_Release(&xv);
    return NULL;
}

static PyMethodDef methods[] = {
    {"run_chunk", run_chunk, METH_VARARGS, run_chunk_doc},
    HEARTBEAT_METHODS
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "mpimap._native",
    "mpimap's optional C extension: the native evaluation loop and the native heartbeat thread.", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModule_Create(&module);
}
