"""The wire protocol between the master and the workers: message kinds and their encoding.

Every message is one MPI message whose tag is its :class:`Kind` (never a task
or chunk id: MPI_TAG_UB may be as low as 32767).  The body is a pickle
(protocol 5).  Buffers of ``OOB_THRESHOLD`` bytes or more (numpy arrays) are
not copied into the pickle: they follow as separate messages tagged
``Kind.OOB``, and the body's first four bytes say how many follow.

Message bodies, by kind:

==========  ==================  ======================================================
kind        direction           body
==========  ==================  ======================================================
HELLO       worker -> master    ``(host, pid)``, once when the worker starts serving
TASK        master -> worker    ``(chunk_id, map_id, function_or_None, args)``; the
                                first chunk of a map to a rank carries the pickled
                                ``(function, star, pack, isolation, logs)``, later
                                ones ``None``
RESULT      worker -> master    ``(chunk_id, values, failures, durations, seconds, logs)``
HEARTBEAT   worker -> master    ``None``, every heartbeat period
FORGET      master -> worker    ``map_id``: drop its queued chunks and its function
STOP        master -> worker    ``None``: leave the serve loop
LOG         worker -> master    ``(levelno, logger name, message)``: a log record of the rank
                                (or of its evaluation process), for the job's log
LEVEL       master -> worker    ``levelno``: the rank's new log level
OOB         either              a raw buffer belonging to the preceding message
==========  ==================  ======================================================
"""

from __future__ import annotations

import pickle
from enum import IntEnum

OOB_THRESHOLD = 64 * 1024
_COUNT_BYTES = 4


class Kind(IntEnum):
    HELLO = 1
    TASK = 2
    RESULT = 3
    HEARTBEAT = 4
    FORGET = 5
    STOP = 6
    OOB = 7
    LOG = 8
    LEVEL = 9


def encode(obj) -> tuple[bytes, list]:
    """Pickle ``obj``; return the body and the large buffers that travel on their own."""
    oob = []

    def keep_small_inline(buf):
        raw = buf.raw()
        if raw.nbytes < OOB_THRESHOLD:
            return True
        oob.append(raw)
        return False

    body = pickle.dumps(obj, protocol=5, buffer_callback=keep_small_inline)
    return len(oob).to_bytes(_COUNT_BYTES, "little") + body, oob


def oob_count(body) -> int:
    """How many out-of-band buffers follow a message with this body."""
    return int.from_bytes(body[:_COUNT_BYTES], "little")


def decode(body, buffers):
    return pickle.loads(memoryview(body)[_COUNT_BYTES:], buffers=buffers)
