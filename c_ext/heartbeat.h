/* The native heartbeat thread (heartbeat.c): its methods in the module's table. */
#ifndef MPIMAP_HEARTBEAT_H
#define MPIMAP_HEARTBEAT_H

PyObject *mpimap_heartbeat_start(PyObject *self, PyObject *args);
PyObject *mpimap_heartbeat_stop(PyObject *self, PyObject *args);
PyObject *mpimap_heartbeat_moved(PyObject *self, PyObject *unused);
PyObject *mpimap_heartbeat_running(PyObject *self, PyObject *unused);
extern const char mpimap_heartbeat_start_doc[], mpimap_heartbeat_stop_doc[], mpimap_heartbeat_moved_doc[],
    mpimap_heartbeat_running_doc[];

#define HEARTBEAT_METHODS \
    {"heartbeat_start", mpimap_heartbeat_start, METH_VARARGS, mpimap_heartbeat_start_doc}, \
    {"heartbeat_stop", mpimap_heartbeat_stop, METH_VARARGS, mpimap_heartbeat_stop_doc}, \
    {"heartbeat_moved", mpimap_heartbeat_moved, METH_NOARGS, mpimap_heartbeat_moved_doc}, \
    {"heartbeat_running", mpimap_heartbeat_running, METH_NOARGS, mpimap_heartbeat_running_doc},
#endif
