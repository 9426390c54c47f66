/* The native heartbeat thread (heartbeat.c): its methods in the module's table. */
#ifndef MPIMAP_HEARTBEAT_H
#define MPIMAP_HEARTBEAT_H
#define HEARTBEAT_METHODS
#endif
