"""Scheduling decisions of the master: plain Python, no MPI, no I/O, no threads.

The scheduler knows which maps have points left, which chunks are in flight on
which rank, how much work each rank has queued, when each rank was last heard
from, and how long a point of each map takes.  The master loop asks it what to
send next (:meth:`Scheduler.assign`) and tells it what came back
(:meth:`Scheduler.complete`).  Because it does nothing else it can be unit
tested and simulated at scales no test machine can run.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Chunk:
    """A contiguous range ``[start, stop)`` of one map's points, sent to one rank.

    ``avoid`` names the ranks these points must stay off while another rank
    is live (a retried point's rank, a verified point's host); it travels
    with the chunk so that a copy, or a requeue after a lost rank, keeps it.
    """

    chunk_id: int
    map_id: int
    start: int
    stop: int
    avoid: frozenset | None = None
    group: tuple | None = None  # the ranks of a k-rank task, lowest first (it holds one point); None: one rank

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class MapState:
    """What the scheduler knows about one map: the points not yet handed out and their cost."""

    map_id: int
    size: int
    chunksize: int | None
    priority: int
    order: int
    cursor: int = 0  # first point never handed out
    requeued: deque = field(default_factory=deque)  # (start, stop, ranks to avoid or None): to hand out again
    requeued_points: int = 0  # how many points ``requeued`` holds
    in_flight: int = 0  # chunks out on ranks
    done_points: int = 0
    cost: float | None = None  # seconds per point, moving average over completed chunks
    fastest: float | None = None  # seconds per point of its fastest chunk so far
    share: int | None = None  # points per chunk of a map that is less than one chunk's worth of work (0: it is not)
    nested: bool = False  # opened by a task in flight: served during a pause too, so that task can finish
    nests: bool = False  # a task of this map has opened a nested map (its tasks may wait for the master)
    ranks_per_task: int = 1  # k > 1: each point runs on k ranks at once (a group)

    @property
    def unassigned(self) -> int:
        return self.size - self.cursor + self.requeued_points

    @property
    def finished(self) -> bool:
        return self.done_points >= self.size


@dataclass
class GroupTask:
    """A k-rank task in flight: its chunk sits on every member; it is decided once, members free as they report."""

    chunk: Chunk
    sent: float
    waiting: set  # members that have not reported yet
    decided: bool = False  # its point is settled (all reported, a member failed, timed out, a member lost)


@dataclass
class RankState:
    """A worker rank as the scheduler sees it."""

    rank: int
    in_flight: dict = field(default_factory=dict)  # chunk_id -> Chunk, in the order sent
    last_heard: float = 0.0
    chunks_done: int = 0
    points_done: int = 0
    busy_seconds: float = 0.0
    last_result: float = 0.0  # when its last chunk came back
    done_until: float = float("-inf")  # its last chunk back ended no earlier than this (see busy_until)
    lost: bool = False  # out of service: silent (lost) or retired for failing
    # chunk_id -> whether its task waits now, for the chunks in flight whose task has opened nested maps, in the
    # order they first did: the order of the rank's stack (a task starts only while those below it wait)
    parked: dict = field(default_factory=dict)

    @property
    def held(self) -> int:
        """Chunks that take a prefetch slot: those in flight, less the parked ones (their task waits and serves,
        or sits under a task that does), but the top of the stack if its nested maps have ended (it runs)."""
        held = len(self.in_flight) - len(self.parked)
        return held + 1 if self.parked and not self.parked[next(reversed(self.parked))] else held


class Scheduler:
    """Dynamic self-scheduling with prefetch, cost-based chunk sizes and a guided tail.

    * Every live rank keeps up to ``prefetch`` chunks queued, so it never waits
      for a round trip to the master.
    * Without an explicit chunksize, a chunk holds about ``target_seconds`` of
      work, judged from the measured cost per point of the same map (a map's
      first chunks hold one point each, until a measurement arrives).
    * Near the end of a map no chunk holds more than the remaining points
      divided by ``tail_factor`` times the number of ranks, so the last chunks
      are small and the tail stays balanced.
    * Maps with a higher priority are served first; equal priorities in the
      order they were added.
    """

    def __init__(self, ranks, *, prefetch: int = 2, target_seconds: float = 0.05,
                 max_chunk: int = 65536, tail_factor: int = 2, straggler_factor: float | None = 3.0,
                 straggler_min: float = 0.2, now: float = 0.0):
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self.prefetch = prefetch
        self.target_seconds = target_seconds
        self.max_chunk = max_chunk
        self.tail_factor = tail_factor
        self.straggler_factor = straggler_factor
        self.straggler_min = straggler_min
        self._sent: dict[int, float] = {}  # chunk_id -> when it was handed out
        self._twins: dict[int, tuple] = {}  # chunk_id -> (its copy's chunk_id, the rank holding the copy)
        self._last_scan = float("-inf")
        self.ranks = {r: RankState(r, last_heard=now) for r in ranks}
        self.live = len(self.ranks)
        self.maps: dict[int, MapState] = {}
        self._queue: list = []  # heap of (-priority, order, map_id) for maps with unassigned points
        self._order = itertools.count()
        self._chunk_ids = itertools.count()
        # Ranks with room, by how many chunks they hold: _room[k] lists ranks holding k chunks, so an
        # empty rank is always served before one with work queued.  Entries go stale when a rank's
        # count changes; _pop_room skips those.
        self._room = [deque() for _ in range(prefetch)]
        self._room[0].extend(self.ranks)
        self.paused = False  # hand out only nested maps (no copies of stragglers); in-flight chunks still complete
        self.groups: dict[int, GroupTask] = {}  # chunk_id -> a k-rank task whose members have not all reported
        self._members: dict[int, int] = {}  # rank -> chunk_id of the k-rank task it holds: it gets nothing else
        self._reserved: set = set()  # ranks a waiting k-rank map waits for: no one-rank chunks meanwhile
        self._wide: set = set()  # map_ids of k-rank maps

    # -- maps ------------------------------------------------------------------
    def add_map(self, map_id: int, size: int, *, chunksize: int | None = None,
                priority: int = 0, cost: float | None = None, nested: bool = False, shares: bool = True,
                ranks_per_task: int = 1) -> None:
        """Queue a map of ``size`` points; ``cost`` seeds the seconds-per-point estimate; ``nested``: a task's map.

        ``shares=False``: even a map of less than one chunk's work goes out in
        guided-tail chunks (a batch of submit calls: a call still queued can be cancelled).
        With ``ranks_per_task`` k > 1 each point runs on k ranks at once (see :meth:`_assign_groups`); a map
        asking for more ranks than are live raises ValueError.
        """
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be a positive integer")
        if ranks_per_task > self.live:
            raise ValueError(too_wide_message(ranks_per_task, self.live))
        state = MapState(map_id, size, chunksize, priority, next(self._order), cost=cost, nested=nested,
                         share=None if shares else 0, ranks_per_task=ranks_per_task)
        self.maps[map_id] = state
        if ranks_per_task > 1:
            self._wide.add(map_id)
        if size:
            heapq.heappush(self._queue, (-priority, state.order, map_id))

    def remove_map(self, map_id: int) -> list[int]:
        """Forget a map (finished or cancelled); return the ranks that still hold chunks of it."""
        self.maps.pop(map_id, None)
        self._wide.discard(map_id)
        holders = []
        for rank in self.ranks.values():
            # A k-rank task stays on its members until each reports: they may be inside it still.
            stale = [cid for cid, c in rank.in_flight.items() if c.map_id == map_id and c.group is None]
            for cid in stale:
                del rank.in_flight[cid]
                rank.parked.pop(cid, None)
                self._sent.pop(cid, None)
                self._twins.pop(cid, None)
            if stale:
                holders.append(rank.rank)
                self._push_room(rank.rank)
        return holders

    def map_finished(self, map_id: int) -> bool:
        state = self.maps.get(map_id)
        return state is None or state.finished

    # -- dispatch --------------------------------------------------------------
    def assign(self, now: float = 0.0) -> list[tuple[int, Chunk]]:
        """Hand out chunks to every rank that has room, while there is work; then copies of stragglers.

        While :attr:`paused`, only chunks of nested maps (the tasks in flight
        that wait for them must finish): other chunks in flight finish, and what
        is queued (retries and requeued points too) waits for the resume.
        """
        if self.paused and not any(state.nested and state.unassigned for state in self.maps.values()):
            return []
        out = self._assign_groups(now) if self._wide or self._reserved else []
        handed, passed = len(out), []
        while self._queue:
            rank = self._pop_room()
            if rank is None:
                break
            reserved = rank in self._reserved
            if reserved and not self.ranks[rank].parked:
                passed.append(rank)
                continue
            # A rank with tasks that wait for nested maps (parked chunks) takes chunks of nested maps only: they let
            # its tasks end, and it can always run them itself.  Were it given other work, it would start that on
            # top of a waiting task, and every new task would wait too: a rank could pile up a map's tasks (and
            # Python frames) without bound while the others idle.  A reserved rank likewise: it becomes idle for
            # the k-rank map.
            chunk = self._next_chunk(rank, nested_only=self.paused or reserved or bool(self.ranks[rank].parked))
            if chunk is None:
                passed.append(rank)
                continue
            self._give(rank, chunk, now)
            out.append((rank, chunk))
        for rank in reversed(passed):  # they keep their place in line
            self._room[self.ranks[rank].held].appendleft(rank)
        if self._wide and len(out) > handed:  # one-rank maps ahead of k-rank maps may have run out: look again
            out += self._assign_groups(now)
        # Looking for stragglers scans every chunk in flight: at most every straggler_min / 4 seconds.
        # No copies while a k-rank map reserves ranks: the idle ranks are the ones it waits for.
        if (self.straggler_factor is not None and self._room[0] and not self._reserved and not self.paused
                and now - self._last_scan > self.straggler_min / 4):
            self._last_scan = now
            out += self._reissue(now)
        return out

    def _give(self, rank: int, chunk: Chunk, now: float) -> None:
        self.ranks[rank].in_flight[chunk.chunk_id] = chunk
        self.maps[chunk.map_id].in_flight += 1
        self._sent[chunk.chunk_id] = now
        self._push_room(rank)

    def _reissue(self, now: float) -> list[tuple[int, Chunk]]:
        """Give idle ranks copies of chunks that run far longer than expected elsewhere (first result wins)."""
        out = []
        while True:
            rank = self._pop_room()
            if rank is None:
                return out
            if self.ranks[rank].held or self.ranks[rank].parked:  # not idle: only idle ranks take copies
                self._room[self.ranks[rank].held].appendleft(rank)
                return out
            straggler = self._straggler(rank, now)
            if straggler is None:
                self._room[0].appendleft(rank)
                return out
            copy = Chunk(next(self._chunk_ids), straggler.map_id, straggler.start, straggler.stop, straggler.avoid)
            self._twins[straggler.chunk_id] = (copy.chunk_id, rank)
            self._twins[copy.chunk_id] = (straggler.chunk_id, self._holder(straggler.chunk_id))
            self._give(rank, copy, now)
            out.append((rank, copy))

    def _straggler(self, rank: int, now: float) -> Chunk | None:
        """The longest-running chunk on another rank, of a map with nothing left to hand out, if it is late."""
        best, best_age = None, 0.0
        for other in self.ranks.values():
            if other.rank == rank or other.lost:
                continue
            for chunk in other.in_flight.values():
                state = self.maps.get(chunk.map_id)
                if chunk.group is not None:  # k-rank tasks are never copied
                    continue
                if state is None or state.cost is None or state.unassigned or chunk.chunk_id in self._twins \
                        or chunk.chunk_id in other.parked:  # a parked task is slow because it waits: no copy
                    continue
                if chunk.avoid is not None and rank in chunk.avoid:
                    continue
                age = now - self._sent[chunk.chunk_id]
                if age > max(self.straggler_min, self.straggler_factor * state.cost * len(chunk)) and age > best_age:
                    best, best_age = chunk, age
        return best

    def busy_until(self) -> float | None:
        """When the first rank holding chunks may have finished them all, at the soonest (the clock of ``now``).

        Until then every rank has work, so the master need not look for
        results.  A rank's chunks run one after another, none before it was
        sent or before the rank's last chunk back ended (itself no earlier than
        its own start and evaluation time), each taken to last at least as long
        as its map's fastest chunk per point so far: a guess, wrong when points
        suddenly get far cheaper (the master's naps are capped for that).
        None when that cannot be told: no chunk is out, or one is of a map not
        measured yet, a k-rank task, or of a map whose tasks open nested maps
        or that one opened (such a task waits for the master to serve its map).
        """
        earliest = None
        for rstate in self.ranks.values():
            if rstate.lost or not rstate.in_flight:
                continue
            if rstate.parked:
                return None
            free = rstate.done_until
            for chunk in rstate.in_flight.values():
                state = self.maps.get(chunk.map_id)
                sent = self._sent.get(chunk.chunk_id)
                if chunk.group is not None or state is None or state.fastest is None or sent is None \
                        or state.nested or state.nests:
                    return None
                free = max(free, sent) + len(chunk) * state.fastest
            earliest = free if earliest is None else min(earliest, free)
        return earliest

    def _holder(self, chunk_id: int) -> int:
        return next(r.rank for r in self.ranks.values() if chunk_id in r.in_flight)

    def _pop_room(self) -> int | None:
        """The rank that should get the next chunk: one holding the fewest, longest waiting first."""
        for held, ranks in enumerate(self._room):
            while ranks:
                rank = ranks.popleft()
                rstate = self.ranks[rank]
                if not rstate.lost and rstate.held == held and rank not in self._members:
                    return rank
        return None

    def _push_room(self, rank: int) -> None:
        rstate = self.ranks[rank]
        held = rstate.held
        if not rstate.lost and held < self.prefetch and rank not in self._members:
            self._room[held].append(rank)

    def _next_chunk(self, rank: int, nested_only: bool = False) -> Chunk | None:
        """The next chunk for ``rank``, from the first map by priority that has a point it may take.

        A map whose only points left avoid ``rank`` is passed over, so that
        rank still serves the maps below it.  ``nested_only``: only maps opened by tasks in flight.
        """
        passed = []
        try:
            while self._queue:
                state = self.maps.get(self._queue[0][2])
                if state is None or state.unassigned == 0:
                    heapq.heappop(self._queue)
                    continue
                if state.ranks_per_task > 1 or (nested_only and not state.nested):  # k-rank: _assign_groups
                    passed.append(heapq.heappop(self._queue))
                    continue
                chunk = self._take(state, rank)
                if chunk is not None:
                    return chunk
                passed.append(heapq.heappop(self._queue))
            return None
        finally:
            for entry in passed:
                heapq.heappush(self._queue, entry)

    def _take(self, state: MapState, rank: int) -> Chunk | None:
        """The next chunk of one map for ``rank``: requeued points first (not those avoiding it), then new ones."""
        for k, (start, stop, avoid) in enumerate(state.requeued):
            if avoid is None or rank not in avoid:
                size = min(stop - start, self.chunk_size(state))
                del state.requeued[k]
                if start + size < stop:
                    state.requeued.insert(k, (start + size, stop, avoid))
                state.requeued_points -= size
                return Chunk(next(self._chunk_ids), state.map_id, start, start + size, avoid)
        if state.cursor == state.size:
            return None  # only points avoiding this rank are left: another rank takes them
        start = state.cursor
        size = min(state.size - start, self.chunk_size(state))
        state.cursor += size
        return Chunk(next(self._chunk_ids), state.map_id, start, start + size)

    def _requeue(self, state: MapState, start: int, stop: int, avoid) -> None:
        """Put ``[start, stop)`` back in its map's queue, to go to a live rank outside ``avoid``."""
        state.requeued.append((start, stop, self._live_outside(avoid)))
        state.requeued_points += stop - start

    def _live_outside(self, avoid):
        """``avoid``, or None once it holds every live rank: a point avoiding all of them would never run."""
        if not avoid or sum(1 for r in avoid if r in self.ranks and not self.ranks[r].lost) >= self.live:
            return None
        return avoid

    def chunk_size(self, state: MapState) -> int:
        """How many points the next chunk of ``state`` should hold."""
        if state.chunksize is not None:
            return state.chunksize
        if state.cost is None:
            return 1
        by_cost = int(self.target_seconds / max(state.cost, 1e-9))
        if state.share is None and state.cursor == 0:
            # A whole map of less than one chunk's work (a fitter's generation of cheap points) goes out as one
            # equal share per rank: a guided tail would cost more in messages than it could balance.
            state.share = math.ceil(state.size / max(1, self.live)) if state.size <= by_cost else 0
        if state.share:
            return state.share
        by_tail = math.ceil(state.unassigned / (self.tail_factor * max(1, self.live)))
        return max(1, min(by_cost, by_tail, self.max_chunk))

    # -- results and liveness ----------------------------------------------------
    def complete(self, rank: int, chunk_id: int, seconds: float, now: float) -> Chunk | None:
        """Record a finished chunk; return it, or None if it is unknown (cancelled map, lost rank)."""
        rstate = self.ranks[rank]
        rstate.last_heard = rstate.last_result = now
        chunk = rstate.in_flight.pop(chunk_id, None)
        rstate.parked.pop(chunk_id, None)
        sent = self._sent.pop(chunk_id, None)
        if chunk is None:
            return None
        rstate.done_until = max(rstate.done_until, sent if sent is not None else now - seconds) + seconds
        self._push_room(rank)
        twin = self._twins.pop(chunk_id, None)
        if twin is not None:  # the first of two copies: the other one's result will be ignored
            twin_id, twin_rank = twin
            self._twins.pop(twin_id, None)
            self._sent.pop(twin_id, None)
            self.ranks[twin_rank].parked.pop(twin_id, None)
            if self.ranks[twin_rank].in_flight.pop(twin_id, None) is not None:
                self._push_room(twin_rank)
                if chunk.map_id in self.maps:
                    self.maps[chunk.map_id].in_flight -= 1
        rstate.chunks_done += 1
        rstate.points_done += len(chunk)
        rstate.busy_seconds += seconds
        state = self.maps.get(chunk.map_id)
        if state is None:
            return None
        state.in_flight -= 1
        state.done_points += len(chunk)
        self._measure(state, len(chunk), seconds)
        return chunk

    @staticmethod
    def _measure(state: MapState, points: int, seconds: float) -> None:
        """Fold a chunk's time into its map's cost per point."""
        per_point = seconds / points
        state.fastest = per_point if state.fastest is None else min(state.fastest, per_point)
        # Weight a measurement by its share of the map, so one tiny chunk cannot swing a big estimate.
        weight = 1.0 if state.cost is None else max(0.25, min(1.0, points / max(1, state.done_points)))
        state.cost = per_point if state.cost is None else (1 - weight) * state.cost + weight * per_point

    def retry(self, map_id: int, indices, avoid=None) -> None:
        """Hand these points of a map out again, to a rank not in ``avoid`` (a rank or a set) while there is one."""
        state = self.maps.get(map_id)
        if state is None:
            return
        avoid = frozenset([avoid] if isinstance(avoid, int) else avoid or ())
        for index in indices:
            state.done_points -= 1
            self._requeue(state, index, index + 1, avoid)
        heapq.heappush(self._queue, (-state.priority, state.order, map_id))

    def park(self, rank: int, chunk_id: int) -> None:
        """The task of a chunk in flight waits for nested maps: the rank evaluates other chunks meanwhile (inner
        ones first), so the chunk gives back its prefetch slot (see :attr:`RankState.held`).  Even when every
        task waits, or sits under a waiting one on its rank's stack, every rank has room: no depth of nesting
        deadlocks."""
        rstate = self.ranks[rank]
        if chunk_id in rstate.in_flight and not rstate.parked.get(chunk_id):
            state = self.maps.get(rstate.in_flight[chunk_id].map_id)
            if state is not None:
                state.nests = True
            rstate.parked[chunk_id] = True  # a chunk parked before keeps its place in the stack
            self._push_room(rank)

    def resume(self, rank: int, chunk_id: int) -> None:
        """The nested maps a parked chunk's task waited for have ended: on top of the rank's stack it runs again
        and takes a slot; under another task it waits for that one to return, and takes none."""
        rstate = self.ranks[rank]
        if rstate.parked.get(chunk_id):
            rstate.parked[chunk_id] = False
            self._push_room(rank)  # its room entry now stands at the new count, if it still has room

    def heard(self, rank: int, now: float) -> None:
        self.ranks[rank].last_heard = now

    def silent_ranks(self, now: float, timeout: float) -> list[int]:
        """Live ranks not heard from for longer than ``timeout`` seconds."""
        return [r.rank for r in self.ranks.values() if not r.lost and now - r.last_heard > timeout]

    def stalled_ranks(self, now: float, timeout: float) -> list[int]:
        """Live ranks that hold work but have returned nothing for longer than ``timeout`` seconds."""
        return [r.rank for r in self.ranks.values()
                if not r.lost and r.in_flight and now - max(r.last_result, min(self._sent.get(c, now)
                                                                                for c in r.in_flight)) > timeout]

    def lose_rank(self, rank: int) -> list[Chunk]:
        """Take a rank out of service (lost or retired); its in-flight chunks go back to their maps' queues.

        Points that avoid ranks keep avoiding them, until every live rank is
        one to avoid: then any rank may take them.
        """
        rstate = self.ranks[rank]
        if not rstate.lost:
            self.live -= 1
            rstate.lost = True
            for state in self.maps.values():
                if any(avoid is not None for _, _, avoid in state.requeued):
                    state.requeued = deque((start, stop, self._live_outside(avoid))
                                           for start, stop, avoid in state.requeued)
        chunks = list(rstate.in_flight.values())
        rstate.in_flight.clear()
        rstate.parked.clear()
        for chunk in chunks:
            if chunk.group is not None:
                self._lose_member(rank, chunk)
                continue
            state = self.maps.get(chunk.map_id)
            twin = self._twins.pop(chunk.chunk_id, None)
            if state is None:
                continue
            state.in_flight -= 1
            if twin is not None:  # its copy elsewhere will deliver
                self._twins.pop(twin[0], None)
                continue
            self._requeue(state, chunk.start, chunk.stop, chunk.avoid)
            heapq.heappush(self._queue, (-state.priority, state.order, state.map_id))
        return chunks

    # -- k-rank tasks (groups) -----------------------------------------------------
    def _assign_groups(self, now: float) -> list[tuple[int, Chunk]]:
        """Form groups of idle ranks for the k-rank maps, in priority order; one pair (rank, chunk) per member.

        A group is the k lowest idle ranks (so the same rank sets come back and their communicators are
        reused).  A k-rank map that cannot form a group reserves the ranks it waits for: the idle ones, then
        those with the least work queued.  Reserved ranks get no one-rank chunks until k of them are idle, so
        one-rank maps below a k-rank map never starve it; one-rank maps above it keep every rank.  The one
        exception: a reserved rank whose tasks wait for nested maps (parked chunks) takes chunks of nested maps,
        which its tasks need to end (else neither they nor the k-rank map would ever run).
        """
        self._reserved = set()
        out = []
        free = sorted(r for r, s in self.ranks.items() if not s.lost and not s.in_flight)
        for _, _, map_id in sorted(self._queue):
            state = self.maps.get(map_id)
            if state is None or not state.unassigned or (self.paused and not state.nested):
                continue
            if state.ranks_per_task == 1:
                break  # a one-rank map with points comes first: the k-rank maps below it wait
            k = state.ranks_per_task
            while state.unassigned and len(free) >= k:
                group, free = tuple(free[:k]), free[k:]
                chunk = self._take_group(state, group)
                for rank in group:
                    self._members[rank] = chunk.chunk_id
                    self.ranks[rank].in_flight[chunk.chunk_id] = chunk
                state.in_flight += 1
                self._sent[chunk.chunk_id] = now
                self.groups[chunk.chunk_id] = GroupTask(chunk, now, set(group))
                out += [(rank, chunk) for rank in group]
            if state.unassigned:
                busy = sorted((len(s.in_flight), r) for r, s in self.ranks.items()
                              if not s.lost and s.in_flight and r not in self._members and r not in self._reserved)
                need = k - len(free)
                if need <= len(busy):
                    self._reserved.update(free)
                    self._reserved.update(r for _, r in busy[:need])
                    free = []
        return out

    def _take_group(self, state: MapState, group: tuple) -> Chunk:
        """The next point of a k-rank map, as a chunk for ``group``: requeued points first (their ranks to
        avoid are not kept: any k ranks may run it)."""
        if state.requeued:
            start, stop, avoid = state.requeued.popleft()
            if start + 1 < stop:
                state.requeued.appendleft((start + 1, stop, avoid))
            state.requeued_points -= 1
        else:
            start = state.cursor
            state.cursor += 1
        return Chunk(next(self._chunk_ids), state.map_id, start, start + 1, None, group)

    def complete_member(self, rank: int, chunk_id: int, seconds: float, now: float, failed: bool) -> Chunk | None:
        """A member of a k-rank task reported; return the chunk if this report settles its point.

        The point is settled by the first member that reports a failure, or by
        the last member to report; the member itself is free at once.
        """
        rstate = self.ranks[rank]
        rstate.last_heard = rstate.last_result = now
        task = self.groups.get(chunk_id)
        if task is None or rank not in task.waiting:
            return None
        rstate.in_flight.pop(chunk_id, None)
        self._members.pop(rank, None)
        task.waiting.discard(rank)
        self._push_room(rank)
        rstate.chunks_done += 1
        rstate.points_done += 1
        rstate.busy_seconds += seconds
        if not task.waiting:
            del self.groups[chunk_id]
            self._sent.pop(chunk_id, None)
        if task.decided or (task.waiting and not failed):
            return None
        return self._decide(task, seconds)

    def _decide(self, task: GroupTask, seconds: float | None = None) -> Chunk | None:
        """Settle a k-rank task's point (once); None if its map is gone."""
        task.decided = True
        state = self.maps.get(task.chunk.map_id)
        if state is None:
            return None
        state.in_flight -= 1
        state.done_points += 1
        if seconds is not None:
            self._measure(state, 1, seconds)
        return task.chunk

    def overdue_groups(self, now: float, timeout_of) -> list[Chunk]:
        """Settle and return the k-rank tasks running longer than ``timeout_of(map_id)`` seconds (None: no limit).

        Their members stay reserved until each reports (MPI cannot interrupt them): :meth:`stuck_ranks`.
        """
        out = []
        for task in list(self.groups.values()):
            timeout = None if task.decided else timeout_of(task.chunk.map_id)
            if timeout is not None and now - task.sent > timeout:
                chunk = self._decide(task)
                if chunk is not None:
                    out.append(chunk)
        return out

    def _lose_member(self, rank: int, chunk: Chunk) -> None:
        """A member of a k-rank task is out of service: its point goes back to the queue (once)."""
        self._members.pop(rank, None)
        task = self.groups.get(chunk.chunk_id)
        if task is None:
            return
        task.waiting.discard(rank)
        if not task.waiting:
            del self.groups[chunk.chunk_id]
            self._sent.pop(chunk.chunk_id, None)
        if task.decided:
            return
        task.decided = True
        state = self.maps.get(chunk.map_id)
        if state is not None:
            state.in_flight -= 1
            self._requeue(state, chunk.start, chunk.stop, None)
            heapq.heappush(self._queue, (-state.priority, state.order, state.map_id))

    def stuck_ranks(self) -> list[int]:
        """Live ranks still inside a k-rank task whose point was settled without them (failed elsewhere,
        timed out): probably blocked in a collective call; they get no work until they report."""
        groups = self.groups
        # A copy taken at once: status() asks from the caller's thread while the master thread changes it.
        return sorted(r for r, cid in list(self._members.items())
                      if not self.ranks[r].lost and getattr(groups.get(cid), "decided", False))

    def too_wide(self) -> list[int]:
        """The k-rank maps that ask for more ranks than are live (after losses): they can never run."""
        return [m for m in self._wide if m in self.maps and self.maps[m].ranks_per_task > self.live]

    @property
    def idle(self) -> bool:
        """True when no map has points to hand out and nothing is in flight."""
        return (not any(state.unassigned for state in self.maps.values())
                and not any(r.in_flight for r in self.ranks.values()))


def too_wide_message(k: int, live: int) -> str:
    """Why a k-rank map cannot run on ``live`` worker ranks, and what to do."""
    return (f"ranks_per_task={k} asks for more worker ranks than the pool has ({live} live): use "
            f"ranks_per_task <= {live}, or start more ranks (mpiexec -n {k + 1} or more)")
