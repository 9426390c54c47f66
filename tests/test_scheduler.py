"""The scheduler alone: no MPI, simulated time."""

import heapq
import random

import pytest

from mpimap.master import BUSY_NAP, MAX_NAP
from mpimap.scheduler import Scheduler


def simulate(workers: int, costs, *, prefetch=2, chunksize=None, latency=20e-6, overhead=10e-6, seed=0):
    """Event-driven simulation of a map: returns (makespan, points evaluated per index)."""
    sched = Scheduler(range(1, workers + 1), prefetch=prefetch)
    sched.add_map(0, len(costs), chunksize=chunksize)
    queues = {r: [] for r in range(1, workers + 1)}
    free_at = {r: 0.0 for r in queues}
    events = []  # (time, rank, chunk, seconds)
    seen = [0] * len(costs)
    now = 0.0

    def dispatch(now):
        for rank, chunk in sched.assign():
            start = max(free_at[rank], now + latency)
            seconds = sum(costs[chunk.start:chunk.stop]) + overhead
            free_at[rank] = start + seconds
            heapq.heappush(events, (free_at[rank] + latency, rank, chunk.chunk_id, seconds, chunk))

    dispatch(now)
    while events:
        now, rank, chunk_id, seconds, chunk = heapq.heappop(events)
        done = sched.complete(rank, chunk_id, seconds, now)
        assert done == chunk
        for i in range(chunk.start, chunk.stop):
            seen[i] += 1
        dispatch(now)
    assert sched.map_finished(0)
    return now, seen


def test_every_point_once_with_fixed_chunks():
    makespan, seen = simulate(3, [1e-3] * 1000, chunksize=7)
    assert seen == [1] * 1000


def test_auto_chunks_grow_for_cheap_points_and_stay_single_for_slow_ones():
    sched = Scheduler([1], prefetch=1)
    sched.add_map(0, 1_000_000)
    (_, first), = sched.assign()
    assert len(first) == 1  # nothing measured yet
    sched.complete(1, first.chunk_id, 1e-7, 0.0)
    (_, second), = sched.assign()
    assert len(second) > 1000  # microsecond points travel in big chunks

    slow = Scheduler([1], prefetch=1)
    slow.add_map(0, 1000)
    (_, c), = slow.assign()
    slow.complete(1, c.chunk_id, 0.5, 0.0)
    (_, c2), = slow.assign()
    assert len(c2) == 1  # half-second points go one by one


def chunk_sizes(ranks: int, points: int, cost: float, prefetch: int = 1, shares: bool = True) -> list[int]:
    """The sizes of the chunks of one map of ``points`` points of known ``cost``, as they are handed out."""
    sched = Scheduler(range(1, ranks + 1), prefetch=prefetch)
    sched.add_map(0, points, cost=cost, shares=shares)
    sizes = []
    while True:
        assigned = sched.assign()
        if not assigned:
            break
        for rank, chunk in assigned:
            sizes.append(len(chunk))
            sched.complete(rank, chunk.chunk_id, cost * len(chunk), 0.0)
    assert sum(sizes) == points
    return sizes


def test_tail_chunks_shrink():
    sizes = chunk_sizes(4, 10_000, 1e-5)  # 0.1 s of work: more than one chunk's (target_seconds)
    assert sizes[-1] == 1 and max(sizes) > 100


def test_a_map_of_less_than_one_chunks_work_goes_out_as_one_share_per_rank():
    # A fitter's generation: 20 cheap points, one message per rank (a guided tail would send 8 or more).
    assert chunk_sizes(2, 20, 1e-5, prefetch=2) == [10, 10]
    assert chunk_sizes(3, 20, 1e-5, prefetch=2) == [7, 7, 6]
    assert chunk_sizes(4, 10_000, 1e-6) == [2500] * 4
    assert chunk_sizes(4, 2, 1e-5) == [1, 1]
    assert chunk_sizes(2, 20, 0.01, prefetch=2)[-1] == 1  # 0.2 s of work: balanced by the guided tail
    # A batch of submit calls keeps the guided tail: calls still queued on the master can be cancelled.
    assert chunk_sizes(2, 20, 1e-5, prefetch=2, shares=False)[:4] == [5, 4, 3, 2]


def test_skewed_work_is_balanced():
    rng = random.Random(1)
    costs = [0.05 if rng.random() < 0.01 else 0.001 for _ in range(2000)]
    makespan, seen = simulate(2, costs)
    ideal = sum(costs) / 2
    assert seen == [1] * 2000
    assert makespan / ideal < 1.10
    static, _ = simulate(2, costs, chunksize=1000, prefetch=1)
    assert makespan < static


def test_priorities_first_then_fifo():
    sched = Scheduler([1], prefetch=1)
    sched.add_map(0, 2, chunksize=1)
    sched.add_map(1, 2, chunksize=1, priority=5)
    sched.add_map(2, 2, chunksize=1)
    order = []
    for _ in range(6):
        (rank, chunk), = sched.assign()
        order.append(chunk.map_id)
        sched.complete(rank, chunk.chunk_id, 0.001, 0.0)
    assert order == [1, 1, 0, 0, 2, 2]


def test_removed_map_frees_its_ranks_and_late_results_are_ignored():
    sched = Scheduler([1, 2], prefetch=2)
    sched.add_map(0, 100, chunksize=10)
    assigned = sched.assign()
    assert len(assigned) == 4
    holders = sched.remove_map(0)
    assert sorted(holders) == [1, 2]
    rank, chunk = assigned[0]
    assert sched.complete(rank, chunk.chunk_id, 0.01, 1.0) is None
    sched.add_map(1, 8, chunksize=2)
    assert len(sched.assign()) == 4  # every slot was given back


def test_lost_rank_work_is_requeued_and_finished_elsewhere():
    sched = Scheduler([1, 2], prefetch=2)
    sched.add_map(0, 40, chunksize=5)
    assigned = sched.assign()
    lost = [c for r, c in assigned if r == 1]
    requeued = sched.lose_rank(1)
    assert requeued == lost
    done = set()
    for rank, chunk in assigned:
        if rank == 2:
            sched.complete(rank, chunk.chunk_id, 0.01, 0.0)
            done.update(range(chunk.start, chunk.stop))
    while not sched.map_finished(0):
        for rank, chunk in sched.assign():
            assert rank == 2
            sched.complete(rank, chunk.chunk_id, 0.01, 0.0)
            assert not done & set(range(chunk.start, chunk.stop))
            done.update(range(chunk.start, chunk.stop))
    assert done == set(range(40))


def test_silent_ranks():
    sched = Scheduler([1, 2], now=0.0)
    sched.heard(1, 9.0)
    assert sched.silent_ranks(10.0, timeout=5.0) == [2]


@pytest.mark.parametrize("workers", [1_000, 100_000])
def test_simulated_large_pools_lose_nothing(workers):
    points = workers * 3
    makespan, seen = simulate(workers, [1e-3] * points)
    assert seen == [1] * points
    assert makespan < 3 * 1e-3 * 3  # about three points per worker, never serialised


def test_bad_arguments():
    with pytest.raises(ValueError):
        Scheduler([1], prefetch=0)
    with pytest.raises(ValueError):
        Scheduler([1]).add_map(0, 10, chunksize=0)


def test_empty_ranks_are_served_before_ranks_with_work_queued():
    """After a map ends out of order, the next map's first chunks still spread over all ranks."""
    sched = Scheduler([1, 2, 3], prefetch=2)
    sched.add_map(0, 6, chunksize=1)
    first = sched.assign()
    for rank, chunk in sorted(first, key=lambda rc: rc[0]):  # rank 1 finishes both its chunks first
        sched.complete(rank, chunk.chunk_id, 0.01, 0.0)
    sched.add_map(1, 30, chunksize=10)
    assert sorted(rank for rank, _ in sched.assign()) == [1, 2, 3]


def test_stragglers_are_copied_to_idle_ranks_and_the_first_result_wins():
    sched = Scheduler([1, 2], prefetch=1, straggler_min=0.1)
    sched.add_map(0, 2, chunksize=1, cost=0.01)
    (r1, c1), (r2, c2) = sched.assign(now=0.0)
    assert sched.complete(r2, c2.chunk_id, 0.01, now=0.01) == c2
    assert sched.assign(now=0.05) == []  # the other chunk is not late yet
    ((rank, copy),) = sched.assign(now=0.5)
    assert rank == r2 and (copy.start, copy.stop) == (c1.start, c1.stop) and copy.chunk_id != c1.chunk_id
    assert sched.complete(r2, copy.chunk_id, 0.01, now=0.51) == copy  # the copy finishes first and counts
    assert sched.map_finished(0)
    assert sched.complete(r1, c1.chunk_id, 5.0, now=5.0) is None  # the straggler's late result is ignored
    assert sched.idle


def test_slow_rank_does_not_set_the_makespan():
    """Simulation: one of 4 ranks is 20x slower; stragglers at the tail are re-issued."""
    sched = Scheduler(range(1, 5), prefetch=2)
    sched.add_map(0, 400)
    speed = {1: 20.0, 2: 1.0, 3: 1.0, 4: 1.0}
    events, now, seen = [], 0.0, set()
    free_at = dict.fromkeys(speed, 0.0)

    def dispatch():
        for rank, chunk in sched.assign(now):
            start = max(free_at[rank], now)
            free_at[rank] = start + 0.01 * len(chunk) * speed[rank]
            heapq.heappush(events, (free_at[rank], rank, chunk))

    dispatch()
    while events:
        now, rank, chunk = heapq.heappop(events)
        if sched.complete(rank, chunk.chunk_id, 0.01 * len(chunk) * speed[rank], now) is not None:
            assert not seen & set(range(chunk.start, chunk.stop))  # first result wins, no point twice
            seen |= set(range(chunk.start, chunk.stop))
        dispatch()
        if sched.map_finished(0):
            break
    assert seen == set(range(400))
    ideal = 400 * 0.01 / (3 + 1 / 20)
    assert now < 1.3 * ideal


def test_a_retried_point_goes_to_another_rank():
    sched = Scheduler([1, 2], prefetch=1)
    sched.add_map(0, 2, chunksize=1)
    (r1, c1), (r2, c2) = sched.assign()
    sched.complete(r1, c1.chunk_id, 0.01, 0.0)
    sched.retry(0, [c1.start], avoid=r1)
    assert sched.assign() == []  # r1 may not have it, r2 is busy
    sched.complete(r2, c2.chunk_id, 0.01, 0.0)
    ((rank, chunk),) = sched.assign()
    assert rank == r2 and chunk.start == c1.start


def drive(sched, now=1.0, rounds=20):
    """Assign and complete everything the scheduler hands out; return [(rank, chunk)] in order."""
    done = []
    for t in range(rounds):
        out = sched.assign(now + t)
        for rank, chunk in out:
            sched.complete(rank, chunk.chunk_id, 0.01, now + t)
        done += out
        if not out:
            break
    return done


def test_a_point_avoiding_a_rank_runs_there_once_the_others_are_lost():
    """Review finding 6: the point failed on rank 1, then rank 2 was lost; rank 1 must take it after all."""
    sched = Scheduler([1, 2])
    sched.add_map(0, 2)
    sched.assign(0.0)
    c1 = next(iter(sched.ranks[1].in_flight.values()))
    sched.complete(1, c1.chunk_id, 0.01, 0.1)
    sched.retry(0, [c1.start], avoid=1)
    sched.lose_rank(2)
    ran = drive(sched)
    assert sched.map_finished(0)
    assert sorted((c.start, r) for r, c in ran) == [(0, 1), (1, 1)]


def test_a_point_avoiding_a_rank_runs_there_once_the_others_are_retired():
    sched = Scheduler([1, 2, 3], prefetch=1)
    sched.add_map(0, 3, chunksize=1)
    first = dict(sched.assign(0.0))
    sched.complete(1, first[1].chunk_id, 0.01, 0.1)
    sched.retry(0, [first[1].start], avoid=1)
    assert sched.assign(0.2) == []  # ranks 2 and 3 are busy, rank 1 may not have it
    sched.lose_rank(2)  # retired (its host kept failing)
    sched.lose_rank(3)
    ran = drive(sched)
    assert sched.map_finished(0)
    assert {r for r, _ in ran} == {1}


def test_a_verification_run_avoiding_a_host_runs_there_once_every_other_host_is_gone():
    sched = Scheduler([1, 2, 3], prefetch=1)
    sched.add_map(0, 3, chunksize=1)
    first = dict(sched.assign(0.0))
    sched.complete(1, first[1].chunk_id, 0.01, 0.1)
    sched.retry(0, [first[1].start], avoid={1, 2})  # re-run off the host of ranks 1 and 2
    sched.lose_rank(3)
    ran = drive(sched)
    assert sched.map_finished(0)
    assert first[1].start in [c.start for _, c in ran]


def test_a_rank_avoided_by_a_high_priority_map_still_gets_lower_priority_work():
    sched = Scheduler([1, 2], prefetch=1)
    sched.add_map(0, 2, chunksize=1, priority=5)
    sched.add_map(1, 4, chunksize=1)
    first = dict(sched.assign(0.0))
    assert {c.map_id for c in first.values()} == {0}
    sched.complete(1, first[1].chunk_id, 0.01, 0.1)
    sched.retry(0, [first[1].start], avoid=1)  # only rank 2 may take it, and rank 2 is busy
    ((rank, chunk),) = sched.assign(0.2)
    assert rank == 1 and chunk.map_id == 1


def test_a_retried_point_on_a_lost_rank_still_avoids_the_rank_it_failed_on():
    """Suspected in the review: lose_rank requeued with no avoid set, so the point could go back to rank 1."""
    sched = Scheduler([1, 2, 3], prefetch=1, straggler_factor=None)
    sched.add_map(0, 3, chunksize=1)
    first = dict(sched.assign(0.0))
    sched.complete(1, first[1].chunk_id, 0.01, 0.1)
    sched.retry(0, [first[1].start], avoid=1)
    sched.complete(2, first[2].chunk_id, 0.01, 0.2)
    ((rank, chunk),) = sched.assign(0.3)
    assert rank == 2 and chunk.start == first[1].start
    sched.lose_rank(2)
    sched.complete(3, first[3].chunk_id, 0.01, 0.4)
    ((rank, chunk),) = sched.assign(0.5)  # ranks 1 and 3 are idle: the point must go to 3
    assert rank == 3 and chunk.start == first[1].start


def test_a_verification_run_on_a_lost_rank_stays_off_the_first_host():
    sched = Scheduler([1, 2, 3, 4], prefetch=1, straggler_factor=None)
    sched.add_map(0, 4, chunksize=1)
    first = dict(sched.assign(0.0))
    for r in (1, 2, 4):
        sched.complete(r, first[r].chunk_id, 0.01, 0.1)
    sched.retry(0, [first[1].start], avoid={1, 2})  # ranks 1 and 2 share the first host
    ((rank, chunk),) = sched.assign(0.2)
    assert rank == 4
    sched.lose_rank(4)
    sched.complete(3, first[3].chunk_id, 0.01, 0.3)
    ((rank, chunk),) = sched.assign(0.4)
    assert rank == 3 and chunk.start == first[1].start


def test_a_straggler_copy_never_goes_to_a_rank_the_point_avoids():
    sched = Scheduler([1, 2], prefetch=1, straggler_min=0.1)
    sched.add_map(0, 2, chunksize=1, cost=0.01)
    first = dict(sched.assign(0.0))
    sched.complete(1, first[1].chunk_id, 0.01, 0.01)
    sched.complete(2, first[2].chunk_id, 0.01, 0.01)
    sched.retry(0, [first[1].start], avoid=1)
    ((rank, chunk),) = sched.assign(0.02)
    assert rank == 2
    assert sched.assign(10.0) == []  # late, but rank 1 is the one to avoid: no copy there


def test_idle_once_every_map_has_ended():
    """As the master does: the result that ends a map is followed by remove_map, not by another assign."""
    sched = Scheduler([1], prefetch=1)
    sched.add_map(0, 1)
    ((rank, chunk),) = sched.assign(0.0)
    sched.complete(rank, chunk.chunk_id, 0.01, 0.1)
    assert sched.map_finished(0)
    sched.remove_map(0)
    assert sched.idle


def test_assign_survives_a_rank_listed_twice_for_room():
    """Found by the property tests: a rank passed over (the top map's points avoid it) and then served from a
    second place in the line for room was put back beyond the last line, and assign raised IndexError
    (the master thread died)."""
    Y, X, W, Z = range(4)  # map ids
    sched = Scheduler([1, 2], prefetch=2, straggler_factor=None)
    sched.add_map(Y, 1, chunksize=1, priority=9)
    sched.add_map(X, 3, chunksize=1, priority=5)
    first = sched.assign(0.0)
    assert [(r, c.map_id) for r, c in first] == [(1, Y), (2, X), (1, X), (2, X)]
    (x1,) = [c for r, c in first if r == 1 and c.map_id == X]
    x0 = first[1][1]
    sched.complete(1, x1.chunk_id, 0.01, 0.1)
    sched.complete(2, x0.chunk_id, 0.01, 0.1)
    sched.remove_map(Y)  # rank 1 now holds nothing and stands in two lines for room
    sched.add_map(W, 1)
    assert [r for r, _ in sched.assign(0.2)] == [1]
    sched.retry(X, [x1.start], avoid=1)
    sched.add_map(Z, 5, chunksize=1)
    out = sched.assign(0.3)
    assert sorted((r, c.map_id) for r, c in out) == [(1, Z), (2, X)]



def test_a_paused_scheduler_hands_out_nothing_but_takes_results_and_resumes_where_it_stopped():
    sched = Scheduler([1, 2], prefetch=2, straggler_min=0.0)
    sched.add_map(0, 20, chunksize=2)
    out = sched.assign(now=0.0)
    assert len(out) == 4  # two chunks for each of the two ranks
    sched.paused = True
    done = []
    rank, chunk = out.pop(0)
    assert sched.complete(rank, chunk.chunk_id, 0.1, now=1.0) == chunk  # in-flight work still completes
    done += range(chunk.start, chunk.stop)
    assert sched.assign(now=100.0) == []  # nothing new, not even copies of stragglers
    sched.paused = False
    now = 101.0
    while not sched.map_finished(0):
        out += sched.assign(now=now)
        rank, chunk = out.pop(0)
        assert sched.complete(rank, chunk.chunk_id, 0.1, now=now) == chunk
        done += range(chunk.start, chunk.stop)
        now += 1.0
    assert sorted(done) == list(range(20))


def test_a_parked_chunk_gives_back_its_slot_so_a_waiting_rank_gets_inner_work_first():
    """Nested maps: a task waiting for its inner map parks its chunk; the rank gets the inner map's chunks."""
    sched = Scheduler([1], prefetch=2)
    sched.add_map(0, 2, chunksize=1)  # the outer map: both chunks go to the only rank
    (_, outer0), (_, outer1) = sched.assign()
    sched.add_map(1, 3, chunksize=1, priority=1, nested=True)  # outer0's task asks for an inner map and waits
    assert sched.assign() == []  # without parking the rank is full: nobody would ever run the inner map
    sched.park(1, outer0.chunk_id)
    ((rank, inner),) = sched.assign()
    assert (rank, inner.map_id) == (1, 1)
    sched.park(1, outer1.chunk_id)  # every task of the rank waits: it still has room
    ((_, inner2),) = sched.assign()
    assert inner2.map_id == 1
    assert sched.ranks[1].held == 2 and len(sched.ranks[1].in_flight) == 4
    for chunk in (inner, inner2):
        sched.complete(1, chunk.chunk_id, 0.01, 0.0)
    ((_, inner3),) = sched.assign()
    sched.complete(1, inner3.chunk_id, 0.01, 0.0)
    assert sched.map_finished(1)
    sched.remove_map(1)
    assert sched.ranks[1].held == 0  # both stay parked until they come back: either may sit under the other
    assert sched.complete(1, outer0.chunk_id, 0.5, 1.0) == outer0
    assert sched.complete(1, outer1.chunk_id, 0.5, 1.0) == outer1  # a parked chunk completes like any other
    assert not sched.ranks[1].parked and sched.map_finished(0)


def test_a_parked_chunk_is_never_copied_as_a_straggler_and_a_lost_rank_drops_its_parked_chunks():
    sched = Scheduler([1, 2], prefetch=1, straggler_min=0.1)
    sched.add_map(0, 2, chunksize=1, cost=0.01)
    (r1, c1), (r2, c2) = sched.assign(now=0.0)
    sched.complete(r2, c2.chunk_id, 0.01, now=0.01)
    sched.park(r1, c1.chunk_id)  # its task waits for its nested maps: long, but not late
    assert all(rank != r2 for rank, _ in sched.assign(now=5.0))
    requeued = sched.lose_rank(r1)
    assert requeued == [c1] and not sched.ranks[r1].parked
    ((rank, again),) = sched.assign(now=5.1)
    assert rank == r2 and (again.start, again.stop) == (c1.start, c1.stop)


def test_a_paused_scheduler_still_hands_out_nested_maps_so_the_waiting_tasks_can_finish():
    sched = Scheduler([1, 2], prefetch=1, straggler_min=0.0)
    sched.add_map(0, 4, chunksize=1)
    (r1, outer), (r2, other) = sched.assign(now=0.0)
    sched.paused = True  # the walltime guard pauses, then waits until every chunk in flight is back
    sched.add_map(1, 2, chunksize=1, priority=1, nested=True)  # outer's task asks for a nested map and waits
    sched.park(r1, outer.chunk_id)
    ((rank, inner),) = sched.assign(now=1.0)
    assert (rank, inner.map_id) == (r1, 1)
    sched.complete(r2, other.chunk_id, 0.1, now=1.0)
    ((rank, inner2),) = sched.assign(now=2.0)
    assert (rank, inner2.map_id) == (r2, 1)  # a rank freed during the pause takes nested work, nothing else
    for rank, chunk in ((r1, inner), (r2, inner2)):
        sched.complete(rank, chunk.chunk_id, 0.1, now=3.0)
    sched.remove_map(1)
    assert sched.assign(now=100.0) == []  # the top-level map waits for the resume, no straggler copy either
    sched.complete(r1, outer.chunk_id, 3.0, now=100.0)
    assert not any(r.in_flight for r in sched.ranks.values())  # drained: the pause has taken effect
    sched.paused = False
    assert sorted(c.start for _, c in sched.assign(now=101.0)) == [2, 3]


def simulate_tree(ranks: int, depth: int, width: int, tops: int, seed: int, prefetch: int = 2) -> tuple[int, int]:
    """Nested maps as workers run them: each point at level d > 0 opens a map of ``width`` points at level
    d - 1 and waits; a waiting rank evaluates its queued chunks, newest map first, on top of its stack, and only
    the chunk on top of a stack can go on.  The master parks a chunk when its task opens a map; inner maps are
    known to be cheap, so they go out in equal shares (chunks of several points).  Returns the leaves counted and
    the deepest stack of chunks a rank had; fails on a deadlock (nothing can move while work is left)."""
    rng = random.Random(seed)
    sched = Scheduler(range(1, ranks + 1), prefetch=prefetch, straggler_factor=None)
    maps = {0: dict(level=depth, size=tops, done=0, leaves=0, priority=0)}
    sched.add_map(0, tops, chunksize=1)
    queues = {r: [] for r in sched.ranks}
    stacks = {r: [] for r in sched.ranks}  # frames: dict(chunk, point, waits: the map its point waits for)
    ids = iter(range(1, 10**6))
    deepest = 0

    def start_point(rank, frame):
        """Run the frame's points until one opens a nested map, or the chunk returns."""
        chunk = frame["chunk"]
        level = maps[chunk.map_id]["level"]
        while frame["point"] < chunk.stop:
            if level == 0:
                frame["leaves"] += 1
                frame["point"] += 1
                continue
            frame["waits"] = sub = next(ids)
            maps[sub] = dict(level=level - 1, size=width, done=0, leaves=0,
                             priority=maps[chunk.map_id]["priority"] + 1, parent=(rank, chunk.chunk_id))
            sched.add_map(sub, width, priority=maps[sub]["priority"], nested=True, cost=1e-3)
            sched.park(rank, chunk.chunk_id)
            return
        stacks[rank].remove(frame)
        sched.complete(rank, chunk.chunk_id, 0.01, 0.0)
        state = maps[chunk.map_id]
        state["done"] += len(chunk)
        state["leaves"] += frame["leaves"]
        if state["done"] == state["size"]:
            sched.remove_map(chunk.map_id)
            if "parent" in state:  # the master: its task runs again
                sched.resume(*state["parent"])

    def can_go_on(stack):
        return stack and maps[stack[-1]["waits"]]["done"] == maps[stack[-1]["waits"]]["size"]

    while maps[0]["done"] < tops:
        moved = False
        for rank, chunk in sched.assign():
            queues[rank].append(chunk)
            moved = True
        for rank in rng.sample(sorted(sched.ranks), ranks):
            stack, queue = stacks[rank], queues[rank]
            if can_go_on(stack):  # the top chunk's point has its nested results: its next point starts
                frame = stack[-1]
                frame["leaves"] += maps[frame["waits"]]["leaves"]
                frame["point"] += 1
                start_point(rank, frame)
            elif queue and rng.random() < 0.7:
                chunk = max(queue, key=lambda c: c.map_id) if stack else queue[0]
                queue.remove(chunk)
                stack.append(dict(chunk=chunk, point=chunk.start, waits=None, leaves=0))
                deepest = max(deepest, len(stack))
                start_point(rank, stack[-1])
            else:
                continue
            moved = True
        if not moved and not any(queues.values()) and not any(can_go_on(s) for s in stacks.values()):
            pytest.fail(f"deadlock: (rank, stack depth, chunks held) {[(r, len(stacks[r]), sched.ranks[r].held) for r in sched.ranks]}")
    return maps[0]["leaves"], deepest


@pytest.mark.parametrize("ranks, depth, width, tops", [(2, 3, 3, 4), (3, 3, 3, 5), (2, 2, 3, 6), (2, 4, 2, 3),
                                                      (3, 4, 2, 4), (1, 3, 2, 2)])
def test_nested_maps_never_deadlock_when_a_finished_task_sits_under_a_waiting_one(ranks, depth, width, tops):
    """Seen in CI (a 3-rank run of the nested example hung): a task whose inner map has ended may still sit
    under another waiting task on its rank's stack.  Had its chunk taken its prefetch slot again there, two
    such chunks per rank left no rank with room for the inner work of the tasks on top (2 to 8 of these
    300 runs per shape deadlocked that way)."""
    for seed in range(300):
        assert simulate_tree(ranks, depth, width, tops, seed)[0] == tops * width ** depth


@pytest.mark.parametrize("ranks, depth, width, tops", [(2, 1, 3, 30), (3, 1, 2, 30), (2, 2, 3, 20), (3, 3, 2, 10)])
def test_a_waiting_rank_does_not_pile_up_the_outer_maps_tasks(ranks, depth, width, tops):
    """Found by review: with parked chunks out of the prefetch count, a rank whose task waited got more outer tasks,
    started each on top of its stack, and each waited too: 56 of 60 outer tasks on one rank, RecursionError at 100.
    A rank whose tasks wait gets inner work only: its stack stays within a few chunks per level of nesting, however
    many outer tasks there are (without that rule: 8 chunks deep at 30 outer tasks, 13 at 150)."""
    deepest = [max(simulate_tree(ranks, depth, width, n, seed)[1] for seed in range(30)) for n in (tops, 5 * tops)]
    assert deepest[0] <= 6 * depth and deepest[1] <= deepest[0] + 3, deepest


# -- k-rank tasks (groups) ----------------------------------------------------------


def test_groups_form_from_the_lowest_idle_ranks_one_point_each():
    sched = Scheduler(range(1, 6))
    sched.add_map(0, 5, ranks_per_task=2)
    handed = sched.assign()
    assert [(rank, chunk.group, len(chunk)) for rank, chunk in handed] == \
        [(1, (1, 2), 1), (2, (1, 2), 1), (3, (3, 4), 1), (4, (3, 4), 1)]
    assert sched.assign() == []  # rank 5 alone cannot form a group; the members get nothing else


def test_a_k_rank_point_settles_on_its_last_report_or_its_first_failure():
    sched = Scheduler(range(1, 5))
    sched.add_map(0, 2, ranks_per_task=2)
    (_, a), _, (_, b), _ = sched.assign()
    assert sched.complete_member(1, a.chunk_id, 0.1, 0.0, failed=False) is None  # rank 2 is still in it
    assert sched.complete_member(2, a.chunk_id, 0.1, 0.0, failed=False) == a
    assert sched.complete_member(4, b.chunk_id, 0.1, 0.0, failed=True) == b  # settled at once
    assert sched.stuck_ranks() == [3]  # still inside the failed task: no work for it
    assert sched.complete_member(3, b.chunk_id, 0.1, 0.0, failed=False) is None  # late: ignored, rank 3 free
    assert sched.map_finished(0) and sched.stuck_ranks() == [] and sched.idle


def test_a_waiting_k_rank_map_reserves_ranks_and_is_not_starved_by_a_one_rank_map():
    sched = Scheduler(range(1, 4), prefetch=2)
    sched.add_map(0, 10_000, chunksize=1)  # a long one-rank map keeps every rank busy
    sched.assign()
    sched.add_map(1, 3, priority=1, ranks_per_task=2)  # more urgent, but no rank is idle
    sent = []
    now = 0.0
    for _ in range(20):  # ranks return chunks one at a time; the k-rank map must form its groups meanwhile
        now += 1.0
        chunk_id, rank, chunk = min((cid, r, c) for r, s in sched.ranks.items() for cid, c in s.in_flight.items())
        if chunk.group is None:
            sched.complete(rank, chunk_id, 0.01, now)
        else:
            sched.complete_member(rank, chunk_id, 0.01, now, failed=False)
        sent += sched.assign(now)
    assert sched.map_finished(1)
    assert sched.maps[0].unassigned > 0  # the one-rank map was still running: the k-rank map did not wait for it
    one_rank = [rank for rank, chunk in sent if chunk.group is None]
    assert set(one_rank) <= {1, 2, 3} and one_rank  # the rank left over kept serving the one-rank map


def test_too_wide_a_map_is_refused_and_found_again_after_a_loss():
    sched = Scheduler(range(1, 4))
    with pytest.raises(ValueError, match="ranks_per_task=4 asks for more worker ranks than the pool has"):
        sched.add_map(0, 3, ranks_per_task=4)
    sched.add_map(1, 3, ranks_per_task=3)
    assert sched.too_wide() == []
    sched.lose_rank(2)
    assert sched.too_wide() == [1]


def test_a_lost_member_requeues_its_point_once_and_a_timeout_settles_it():
    sched = Scheduler(range(1, 4))
    sched.add_map(0, 2, ranks_per_task=2)
    (_, a), _ = sched.assign(0.0)
    sched.lose_rank(1)
    assert sched.maps[0].unassigned == 2  # point 0 is back in the queue
    assert sched.complete_member(2, a.chunk_id, 0.1, 1.0, failed=False) is None  # rank 2 freed, no delivery
    handed = sched.assign(2.0)
    assert [(r, c.start) for r, c in handed] == [(2, 0), (3, 0)]  # the requeued point first
    chunk = handed[0][1]
    assert sched.overdue_groups(3.0, lambda map_id: 5.0) == []
    assert sched.overdue_groups(8.0, lambda map_id: 5.0) == [chunk]
    assert sched.stuck_ranks() == [2, 3]
    assert sched.assign(8.0) == []  # the stuck ranks get nothing


def simulate_mixed(workers: int, maps, seed: int = 0):
    """Event-driven simulation of one-rank and k-rank maps together; returns deliveries per (map, point)."""
    rng = random.Random(seed)
    sched = Scheduler(range(1, workers + 1))
    for map_id, (size, k, priority) in enumerate(maps):
        sched.add_map(map_id, size, ranks_per_task=k, priority=priority)
    seen = {(m, i): 0 for m, (size, _, _) in enumerate(maps) for i in range(size)}
    events, now = [], 0.0

    def dispatch(now):
        for rank, chunk in sched.assign(now):
            heapq.heappush(events, (now + rng.uniform(0.001, 0.1), rank, chunk.chunk_id, chunk))

    dispatch(now)
    while events:
        now, rank, chunk_id, chunk = heapq.heappop(events)
        if chunk.group is None:
            done = sched.complete(rank, chunk_id, 0.01, now)
        else:
            done = sched.complete_member(rank, chunk_id, 0.01, now, failed=False)
        if done is not None:
            for i in range(done.start, done.stop):
                seen[done.map_id, i] += 1
        dispatch(now)
    assert all(sched.map_finished(m) for m in range(len(maps)))
    return seen


@pytest.mark.parametrize("seed", range(5))
def test_mixed_one_rank_and_k_rank_maps_deliver_every_point_once(seed):
    seen = simulate_mixed(7, [(300, 1, 0), (40, 3, 0), (50, 2, 1), (200, 1, 2), (10, 7, 0)], seed)
    assert set(seen.values()) == {1}


def test_a_reserved_rank_whose_tasks_wait_for_nested_maps_runs_those_maps_and_then_the_k_rank_map():
    """A k-rank map reserves ranks whose tasks wait for nested maps: they must still run nested chunks (else
    neither their tasks nor the k-rank map ever end), and no other one-rank work until the k-rank map runs."""
    sched = Scheduler(range(1, 3), prefetch=2)
    sched.add_map(0, 10, chunksize=1)  # outer tasks, more than the ranks can hold
    (r1, a), (r2, b), *_ = sched.assign(0.0)
    sched.add_map(1, 2, ranks_per_task=2, priority=10)  # urgent, but no rank is idle: it reserves both
    for map_id, (rank, outer) in ((2, (r1, a)), (3, (r2, b))):  # each outer task opens a nested map and waits
        sched.add_map(map_id, 2, chunksize=1, priority=1, nested=True)
        sched.park(rank, outer.chunk_id)
    for rank, outer in ((r1, a), (r2, b)):  # the prefetched outer chunks (not parked) end
        for cid, chunk in list(sched.ranks[rank].in_flight.items()):
            if cid != outer.chunk_id:
                sched.complete(rank, cid, 0.1, 0.5)
    now, inner = 1.0, []
    while not (sched.map_finished(2) and sched.map_finished(3)):
        handed = sched.assign(now)
        assert handed, "deadlock: the waiting tasks' nested maps get no rank"
        assert all(sched.maps[c.map_id].nested for _, c in handed), "a reserved rank got other one-rank work"
        for rank, chunk in handed:
            inner.append(chunk.map_id)
            sched.complete(rank, chunk.chunk_id, 0.1, now)
        now += 1.0
    assert sorted(inner) == [2, 2, 3, 3]
    sched.complete(r1, a.chunk_id, 1.0, now)
    assert sched.assign(now) == []  # rank 1 is idle and reserved; rank 2 still runs its task: nothing for 1
    sched.complete(r2, b.chunk_id, 1.0, now)
    handed = sched.assign(now)
    assert [(r, c.map_id, c.group) for r, c in handed] == [(1, 1, (1, 2)), (2, 1, (1, 2))]  # not starved


def simulate_looks(workers: int, costs, *, lazy: bool, latency=50e-6):
    """A map whose master sees results only when it looks, as the real one does after a nap: at once again after
    a look that found results, else after max(a fifth of a chunk's time, 1 ms, at most 20 ms) or, if ``lazy``,
    after at least BUSY_NAP of the time until ``busy_until`` (at most MAX_NAP).  Returns (makespan, looks, the
    worker time lost waiting for work while the map had points not handed out)."""
    sched = Scheduler(range(1, workers + 1))
    sched.add_map(0, len(costs))
    free_at = {r: 0.0 for r in range(1, workers + 1)}
    arrivals = []  # (time the result reaches the master, rank, chunk, seconds)
    starved = 0.0
    now, looks, chunk_seconds = 0.0, 0, 0.0
    while not sched.map_finished(0):
        looks += 1
        came = False
        while arrivals and arrivals[0][0] <= now:
            _, rank, chunk, seconds = heapq.heappop(arrivals)
            assert sched.complete(rank, chunk.chunk_id, seconds, now) == chunk
            chunk_seconds += (seconds - chunk_seconds) / 8
            came = True
        pending = sched.maps[0].unassigned > 0
        for rank, chunk in sched.assign(now):
            start = max(free_at[rank], now + latency)
            if pending and free_at[rank] < now:
                starved += now - free_at[rank]  # the rank ran dry before the master looked
            seconds = sum(costs[chunk.start:chunk.stop])
            free_at[rank] = start + seconds
            heapq.heappush(arrivals, (free_at[rank] + latency, rank, chunk, seconds))
        if came:
            continue
        nap = min(20e-3, max(1e-3, chunk_seconds / 5))
        busy = sched.busy_until()
        if lazy and busy is not None:
            nap = max(nap, min(MAX_NAP, (busy - now) * BUSY_NAP))
        now += nap
    return now, looks, starved


@pytest.mark.parametrize("kind", ["long", "skewed", "uniform", "falling", "cliff"])
def test_a_master_that_looks_only_before_a_rank_may_run_dry_loses_no_time_and_looks_less(kind):
    """``busy_until`` lets the master nap until shortly before a rank may run out of queued work: no rank waits
    for work, the map ends as soon, and the master wakes far less often on long points.  Points suddenly far
    cheaper than any seen (a cliff) are the exception: a worker may then wait up to MAX_NAP at a time."""
    rng = random.Random(3)
    costs = {"long": [0.05] * 100,
             "skewed": [0.05 if rng.random() < 0.01 else 0.001 for _ in range(2000)],
             "uniform": [rng.uniform(0.5e-3, 1.5e-3) for _ in range(2000)],
             "falling": [2e-3 * (1 - i / 2500) for i in range(2000)],  # later points cheaper than any seen
             "cliff": [0.2] * 6 + [3e-3] * 300}[kind]
    eager, eager_looks, eager_starved = simulate_looks(2, costs, lazy=False)
    lazy, lazy_looks, starved = simulate_looks(2, costs, lazy=True)
    ideal = sum(costs) / 2
    if kind == "cliff":
        assert starved <= eager_starved + 2 * MAX_NAP, (starved, eager_starved)  # once per worker
        assert lazy <= eager + MAX_NAP, (lazy, eager)
        return
    assert starved <= eager_starved + 1e-3 * ideal, (kind, starved, eager_starved)  # the first chunks: one point
    assert lazy <= eager * 1.01, (kind, lazy, eager, ideal)
    assert lazy_looks < eager_looks * (0.5 if kind == "long" else 0.8), (kind, lazy_looks, eager_looks)


def test_busy_until_counts_from_sends_and_results_and_is_unknown_unmeasured_or_parked():
    sched = Scheduler([1, 2])
    sched.add_map(0, 10)
    assert sched.busy_until() is None  # nothing out
    out = sched.assign(1.0)
    assert out and sched.busy_until() is None  # out, but of a map never measured
    rank, chunk = out[0]
    sched.complete(rank, chunk.chunk_id, 0.5 * len(chunk), 2.0)  # 0.5 s a point; it ran from 1.0 to 1.5 at the soonest
    sched.assign(2.0)
    expected = []
    for r in sched.ranks.values():  # each chunk out starts once sent and once the one before it on its rank ended
        free = 1.5 if r.rank == rank else float("-inf")
        for c in r.in_flight.values():
            free = max(free, sched._sent[c.chunk_id]) + 0.5 * len(c)
        expected.append(free)
    assert sched.busy_until() == min(expected)
    sched.park(rank, next(iter(sched.ranks[rank].in_flight)))
    assert sched.busy_until() is None
    sched.resume(rank, next(iter(sched.ranks[rank].parked)))
    sched.ranks[rank].parked.clear()
    assert sched.busy_until() is None  # its map's tasks open nested maps: the next one may wait at any time
