/* The native heartbeat (docs/design.rst "Heartbeats"): a pthread that sends the worker's HEARTBEAT message to the
 * master every period without ever taking the GIL, so a C call that holds the GIL for long does not make its rank
 * look dead.
 *
 * The extension does not link against MPI (one build serves every MPI): the Python side gives the addresses of
 * MPI_Isend, MPI_Test and MPI_Request_free in the libmpi mpi4py loaded, and the handles of the communicator and of
 * MPI_BYTE.  Handles are ints in MPICH and pointers in Open MPI: each is called through a function pointer of its
 * own type.  The Python side also bumps a counter (heartbeat_moved) while its interpreter runs; each beat sends one
 * of two bodies, saying whether the counter moved since the last beat (the master tells "alive but stuck").
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "heartbeat.h"

typedef int (*isend_int_fn)(const void *, int, int, int, int, int, int *);
typedef int (*isend_ptr_fn)(const void *, int, void *, int, int, void *, void **);
typedef int (*test_int_fn)(int *, int *, void *);
typedef int (*test_ptr_fn)(void **, int *, void *);
typedef int (*free_int_fn)(int *);
typedef int (*free_ptr_fn)(void **);

/* MPI_Status is 20 bytes in MPICH, 24 in Open MPI: room for any, rather than MPI_STATUS_IGNORE's value. */
#define STATUS_BYTES 256

typedef struct {
    pthread_mutex_t lock; /* guards stopping; the thread sleeps on `wake` */
    pthread_cond_t wake;
    pthread_t thread;
    int running, stopping;
    double period, drain;
    int pointers; /* handles are pointers (Open MPI), else ints (MPICH) */
    void *isend, *test, *request_free;
    uintptr_t comm, datatype;
    int dest, tag;
    char *body[2]; /* [0]: the Python side did not move since the last beat; [1]: it moved */
    int length[2];
    union {
        int i;
        void *p;
    } request;
    int pending; /* `request` is a send that has not completed: its body must stay */
    int kept;    /* the last send never completed: its bodies are never freed */
    uint64_t seen;
} heartbeat_t;

static heartbeat_t hb = {.lock = PTHREAD_MUTEX_INITIALIZER};
static uint64_t moved_count; /* bumped by the Python side, read by the thread (atomics) */

static int send_done(void)
{
    char status[STATUS_BYTES] __attribute__((aligned(16)));
    int flag = 0;
    int rc = hb.pointers ? ((test_ptr_fn)hb.test)(&hb.request.p, &flag, status)
                         : ((test_int_fn)hb.test)(&hb.request.i, &flag, status);
    if (rc == 0 && flag) /* MPI_SUCCESS is 0 in every MPI */
        hb.pending = 0;
    return !hb.pending;
}

static void beat(void)
{
    if (hb.pending && !send_done())
        return; /* the last beat has not left yet: the master will take that one */
    uint64_t count = __atomic_load_n(&moved_count, __ATOMIC_RELAXED);
    int moved = count != hb.seen;
    hb.seen = count;
    int rc = hb.pointers ? ((isend_ptr_fn)hb.isend)(hb.body[moved], hb.length[moved], (void *)hb.datatype, hb.dest,
                                                    hb.tag, (void *)hb.comm, &hb.request.p)
                         : ((isend_int_fn)hb.isend)(hb.body[moved], hb.length[moved], (int)hb.datatype, hb.dest,
                                                    hb.tag, (int)hb.comm, &hb.request.i);
    hb.pending = rc == 0;
}

static struct timespec after(double seconds)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double ns = (double)ts.tv_nsec + seconds * 1e9;
    ts.tv_sec += (time_t)(ns / 1e9);
    ts.tv_nsec = (long)(ns - 1e9 * (double)(time_t)(ns / 1e9));
    return ts;
}

static void *beat_main(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&hb.lock);
    while (!hb.stopping) {
        struct timespec until = after(hb.period);
        while (!hb.stopping && pthread_cond_timedwait(&hb.wake, &hb.lock, &until) != ETIMEDOUT) {}
        if (hb.stopping)
            break;
        pthread_mutex_unlock(&hb.lock);
        beat();
        pthread_mutex_lock(&hb.lock);
    }
    pthread_mutex_unlock(&hb.lock);
    /* The last beat must leave before its body is freed; if it does not within `drain`, it stays allocated. */
    struct timespec until = after(hb.drain), pause = {0, 1000000};
    while (hb.pending && !send_done()) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > until.tv_sec || (now.tv_sec == until.tv_sec && now.tv_nsec >= until.tv_nsec)) {
            if (hb.pointers)
                ((free_ptr_fn)hb.request_free)(&hb.request.p);
            else
                ((free_int_fn)hb.request_free)(&hb.request.i);
            hb.kept = 1;
            break;
        }
        nanosleep(&pause, NULL);
    }
    return NULL;
}

/* A forked child (isolation="process" or "fresh") has no heartbeat thread: fork copies only the calling thread. */
static void forget_in_child(void)
{
    pthread_mutex_init(&hb.lock, NULL); /* the thread may have held it at the fork */
    hb.running = 0;
}

static void release_bodies(void)
{
    for (int k = 0; k < 2; k++) {
        if (!hb.kept)
            free(hb.body[k]);
        hb.body[k] = NULL;
    }
    hb.kept = 0;
}

const char mpimap_heartbeat_start_doc[] =
    "heartbeat_start(isend, test, request_free, handle_size, comm, datatype, dest, tag, still, moved, period)\n\n"
    "Start the heartbeat thread: every `period` seconds it sends body `moved` (the counter of heartbeat_moved()\n"
    "changed since the last beat) or `still` with MPI_Isend(body, len, datatype, dest, tag, comm) and never takes\n"
    "the GIL.  isend, test, request_free: the addresses of MPI_Isend, MPI_Test, MPI_Request_free; handle_size:\n"
    "the size of an MPI handle (that of an int: MPICH; of a pointer: Open MPI); comm, datatype: handles.";

PyObject *mpimap_heartbeat_start(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long isend, test, request_free, comm, datatype;
    int handle_size, dest, tag;
    Py_buffer still, moved;
    double period;
    if (!PyArg_ParseTuple(args, "KKKiKKiiy*y*d", &isend, &test, &request_free, &handle_size, &comm, &datatype,
                          &dest, &tag, &still, &moved, &period))
        return NULL;
    const char *error = NULL;
    if (hb.running)
        error = "heartbeat_start: the heartbeat thread runs already";
    else if (handle_size != sizeof(int) && handle_size != sizeof(void *))
        error = "heartbeat_start: an MPI handle is neither an int nor a pointer";
    else if (!isend || !test || !request_free || !(period > 0) || still.len > INT32_MAX || moved.len > INT32_MAX)
        error = "heartbeat_start: bad arguments";
    if (error) {
        PyBuffer_Release(&still);
        PyBuffer_Release(&moved);
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    static int registered;
    if (!registered && pthread_atfork(NULL, NULL, forget_in_child) == 0)
        registered = 1;
    Py_buffer *bodies[2] = {&still, &moved};
    for (int k = 0; k < 2; k++) {
        hb.length[k] = (int)bodies[k]->len;
        hb.body[k] = malloc(bodies[k]->len ? bodies[k]->len : 1);
        if (hb.body[k])
            memcpy(hb.body[k], bodies[k]->buf, bodies[k]->len);
        PyBuffer_Release(bodies[k]);
    }
    if (!hb.body[0] || !hb.body[1]) {
        release_bodies();
        return PyErr_NoMemory();
    }
    hb.pointers = handle_size != sizeof(int);
    hb.isend = (void *)(uintptr_t)isend;
    hb.test = (void *)(uintptr_t)test;
    hb.request_free = (void *)(uintptr_t)request_free;
    hb.comm = (uintptr_t)comm;
    hb.datatype = (uintptr_t)datatype;
    hb.dest = dest;
    hb.tag = tag;
    hb.period = period;
    hb.stopping = hb.pending = 0;
    hb.seen = __atomic_load_n(&moved_count, __ATOMIC_RELAXED);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&hb.wake, &attr);
    pthread_condattr_destroy(&attr);
    int rc = pthread_create(&hb.thread, NULL, beat_main, NULL);
    if (rc != 0) {
        pthread_cond_destroy(&hb.wake);
        release_bodies();
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    hb.running = 1;
    Py_RETURN_NONE;
}

const char mpimap_heartbeat_stop_doc[] =
    "heartbeat_stop(drain) -> bool\n\n"
    "Stop the heartbeat thread and wait for it; its last beat gets `drain` seconds to leave.  True if every beat\n"
    "left (or no thread ran); False if the last one had not (its body is then never freed).";

PyObject *mpimap_heartbeat_stop(PyObject *self, PyObject *args)
{
    (void)self;
    double drain;
    if (!PyArg_ParseTuple(args, "d", &drain))
        return NULL;
    if (!hb.running)
        Py_RETURN_TRUE;
    pthread_mutex_lock(&hb.lock);
    hb.stopping = 1;
    hb.drain = drain;
    pthread_cond_signal(&hb.wake);
    pthread_mutex_unlock(&hb.lock);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(hb.thread, NULL);
    Py_END_ALLOW_THREADS
    pthread_cond_destroy(&hb.wake);
    hb.running = 0;
    int left = !hb.kept;
    release_bodies();
    return PyBool_FromLong(left);
}

const char mpimap_heartbeat_moved_doc[] =
    "heartbeat_moved()\n\nTell the heartbeat thread that the Python side runs (a counter: a few ns).";

PyObject *mpimap_heartbeat_moved(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    __atomic_fetch_add(&moved_count, 1, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

const char mpimap_heartbeat_running_doc[] =
    "heartbeat_running() -> bool\n\nWhether this process has a heartbeat thread (never a forked child).";

PyObject *mpimap_heartbeat_running(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(hb.running);
}
