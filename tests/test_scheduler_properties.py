"""Properties of the scheduler under random maps, faults and cancellations (Hypothesis stateful testing).

A model of the master drives the scheduler as ``master.py`` does: it hands out
what ``assign`` returns, completes chunks with random durations, retries failed
points away from their rank, re-runs a sample of points off their host
(verification), loses and retires ranks, and cancels maps.  It records which
points each counted result delivers.  After every step the invariants below
must hold; at the end all work is driven to completion and every map must end
with each of its points delivered exactly once.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mpimap.scheduler import Scheduler

MAX_ATTEMPTS = 3  # a point fails at most this many times before its failure is delivered as its result


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(workers=st.integers(1, 5), prefetch=st.integers(1, 3), hosts=st.integers(1, 3),
                stragglers=st.booleans())
    def start(self, workers, prefetch, hosts, stragglers):
        ranks = list(range(1, workers + 1))
        self.sched = Scheduler(ranks, prefetch=prefetch, straggler_factor=3.0 if stragglers else None,
                               straggler_min=0.5)
        self.host = {r: r % hosts for r in ranks}
        self.now = 0.0
        self.next_map = 0
        self.open: dict[int, int] = {}  # map_id -> size, for maps neither finished nor cancelled
        self.delivered: dict[int, Counter] = {}  # map_id -> how often each point was delivered
        self.attempts: dict[tuple, int] = {}  # (map_id, index) -> failed attempts
        self.verifying: set[tuple] = set()  # (map_id, index) re-running off its first host
        self.sent: dict[int, tuple] = {}  # chunk_id -> (rank, chunk): handed out, not yet completed
        self.ghosts: dict[int, tuple] = {}  # chunks whose result must be ignored: retired rank, cancelled map
        self.just_assigned = False

    # -- the master's side ------------------------------------------------------
    @rule(size=st.integers(0, 25), chunksize=st.none() | st.integers(1, 6), priority=st.integers(0, 2),
          cost=st.none() | st.sampled_from([1e-4, 0.01, 0.3]), nested=st.booleans())
    def add_map(self, size, chunksize, priority, cost, nested):
        map_id = self.next_map
        self.next_map += 1
        self.sched.add_map(map_id, size, chunksize=chunksize, priority=priority, cost=cost, nested=nested)
        self.open[map_id] = size
        self.delivered[map_id] = Counter()
        self.just_assigned = False
        if size == 0:  # the master ends an empty map at once
            assert self.sched.map_finished(map_id)
            self._end(map_id)

    @rule(dt=st.sampled_from([0.0, 0.01, 0.2, 2.0]))
    def assign(self, dt):
        self.now += dt
        for rank, chunk in self.sched.assign(self.now):
            assert not self.sched.ranks[rank].lost, "a chunk was given to a lost rank"
            assert chunk.map_id in self.open, "a chunk of a map that ended was handed out"
            assert chunk.avoid is None or rank not in chunk.avoid, "a chunk went to a rank it avoids"
            assert chunk.chunk_id not in self.sent
            assert not self.sched.paused or self.sched.maps[chunk.map_id].nested, "a paused scheduler handed out " \
                "a map that is not nested"
            self.sent[chunk.chunk_id] = (rank, chunk)
        self.just_assigned = True

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), seconds=st.floats(1e-6, 1.0), fail=st.integers(0, 3), verify=st.booleans())
    def complete(self, data, seconds, fail, verify):
        chunk_id = data.draw(st.sampled_from(sorted(self.sent)))
        self._complete(chunk_id, seconds, fail, verify)
        self.just_assigned = False

    @precondition(lambda self: self.ghosts)
    @rule(data=st.data())
    def late_result_is_ignored(self, data):
        """A retired rank's result, or one for a cancelled map, arrives after all."""
        chunk_id = data.draw(st.sampled_from(sorted(self.ghosts)))
        rank, _ = self.ghosts.pop(chunk_id)
        assert self.sched.complete(rank, chunk_id, 0.01, self.now) is None
        self.just_assigned = False

    @precondition(lambda self: self.sched.live > 1)  # the master never loses its last live rank
    @rule(data=st.data(), retire=st.booleans())
    def lose_rank(self, data, retire):
        live = [r for r, s in self.sched.ranks.items() if not s.lost]
        rank = data.draw(st.sampled_from(live))
        self.sched.lose_rank(rank)
        for chunk_id, (r, chunk) in list(self.sent.items()):
            if r == rank:
                del self.sent[chunk_id]
                if retire:  # a retired rank is alive and may still send its result
                    self.ghosts[chunk_id] = (r, chunk)
        self.just_assigned = False

    @rule()
    def pause_or_resume(self):
        self.sched.paused = not self.sched.paused
        self.just_assigned = False

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def park(self, data):
        """A task waits for its nested maps: its chunk gives back its prefetch slot."""
        chunk_id = data.draw(st.sampled_from(sorted(self.sent)))
        self.sched.park(self.sent[chunk_id][0], chunk_id)
        self.just_assigned = False

    @precondition(lambda self: any(waits for r in self.sched.ranks.values() for waits in r.parked.values()))
    @rule(data=st.data())
    def resume(self, data):
        """A task's nested maps have ended: its chunk runs again (takes a slot if on top of its rank's stack)."""
        rank, chunk_id = data.draw(st.sampled_from(sorted((r.rank, c) for r in self.sched.ranks.values()
                                                          for c, waits in r.parked.items() if waits)))
        self.sched.resume(rank, chunk_id)
        self.just_assigned = False

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def cancel(self, data):
        map_id = data.draw(st.sampled_from(sorted(self.open)))
        holders = set(self.sched.remove_map(map_id))
        held = {r for r, c in self.sent.values() if c.map_id == map_id}
        assert holders == held, "remove_map must name the ranks holding the map's chunks"
        for chunk_id, (r, chunk) in list(self.sent.items()):
            if chunk.map_id == map_id:
                self.ghosts[self.sent.pop(chunk_id)[1].chunk_id] = (r, chunk)
        self._forget(map_id)
        self.just_assigned = False

    def _complete(self, chunk_id, seconds, fail, verify):
        rank, chunk = self.sent.pop(chunk_id)
        done = self.sched.complete(rank, chunk_id, seconds, self.now)
        assert done == chunk, "a chunk in flight on a live rank, of an open map, must count"
        twin = [cid for cid, (_, c) in self.sent.items() if (c.map_id, c.start, c.stop) == (chunk.map_id, chunk.start, chunk.stop)]
        for cid in twin:  # a straggler's other copy: its result will be ignored, its slot is free already
            r, c = self.sent.pop(cid)
            assert cid not in self.sched.ranks[r].in_flight
        map_id = chunk.map_id
        if (map_id, chunk.start) in self.verifying and len(chunk) == 1:
            self.verifying.discard((map_id, chunk.start))  # a re-run to compare: not a delivery
        else:
            failed = []
            for index in range(chunk.start, chunk.stop):
                if len(failed) < fail and self.attempts.get((map_id, index), 0) < MAX_ATTEMPTS:
                    self.attempts[map_id, index] = self.attempts.get((map_id, index), 0) + 1
                    failed.append(index)
                    continue
                self.delivered[map_id][index] += 1
                assert self.delivered[map_id][index] == 1, f"point {index} of map {map_id} delivered twice"
            if failed:
                self.sched.retry(map_id, failed, avoid=rank)
            same_host = {r for r in self.sched.ranks if self.host[r] == self.host[rank]}
            if verify and len(same_host) < len(self.sched.ranks):
                index = next((i for i in range(chunk.start, chunk.stop) if i not in failed), None)
                if index is not None and (map_id, index) not in self.verifying:
                    self.verifying.add((map_id, index))
                    self.sched.retry(map_id, [index], avoid=same_host)
        if self.sched.map_finished(map_id):
            self._end(map_id)

    def _end(self, map_id):
        size = self.open[map_id]
        assert self.delivered[map_id] == Counter(range(size)), f"map {map_id} ended without every point once"
        assert not any(m == map_id for m, _ in self.verifying)
        self.sched.remove_map(map_id)
        self._forget(map_id)

    def _forget(self, map_id):
        del self.open[map_id]
        self.verifying = {(m, i) for m, i in self.verifying if m != map_id}

    # -- invariants ---------------------------------------------------------------
    @invariant()
    def no_chunk_on_a_lost_rank(self):
        for r in self.sched.ranks.values():
            assert not (r.lost and r.in_flight), f"rank {r.rank} is lost but holds chunks"

    @invariant()
    def in_flight_agrees(self):
        held = {cid: (r.rank, c) for r in self.sched.ranks.values() for cid, c in r.in_flight.items()}
        assert held == self.sent
        for map_id, state in self.sched.maps.items():
            assert state.in_flight == sum(1 for _, c in held.values() if c.map_id == map_id)
        assert self.sched.live == sum(not r.lost for r in self.sched.ranks.values())
        assert set(self.sched.maps) == set(self.open)

    @invariant()
    def parked_chunks_are_in_flight(self):
        for r in self.sched.ranks.values():
            assert set(r.parked) <= set(r.in_flight), f"rank {r.rank} parks chunks it does not hold"

    @invariant()
    def no_point_avoids_every_live_rank(self):
        live = {r for r, s in self.sched.ranks.items() if not s.lost}
        for state in self.sched.maps.values():
            for _, _, avoid in state.requeued:
                assert avoid is None or not live <= avoid, "a requeued point avoids every live rank"

    @invariant()
    def no_live_rank_with_room_is_starved(self):
        if not self.just_assigned:
            return  # only right after assign: the master calls it whenever something changed
        for r in self.sched.ranks.values():
            if r.lost or r.held >= self.sched.prefetch:
                continue
            for state in self.sched.maps.values():
                if (self.sched.paused or r.parked) and not state.nested:  # a waiting rank takes nested maps only
                    continue
                takeable = state.cursor < state.size or any(
                    avoid is None or r.rank not in avoid for _, _, avoid in state.requeued)
                assert not takeable, f"rank {r.rank} has room but gets nothing of map {state.map_id}"

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        # Drive everything to completion: no more faults.  Every map must end.
        self.sched.paused = False
        for _ in range(10_000):
            if not self.open:
                break
            self.now += 1.0
            self.assign(0.0)
            if not self.sent:
                break
            for chunk_id in sorted(self.sent):
                if chunk_id in self.sent:
                    self._complete(chunk_id, 0.01, 0, False)
        assert not self.open, f"maps {sorted(self.open)} never ended: {[vars(self.sched.maps[m]) for m in self.open]}"
        assert self.sched.idle


SchedulerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_scheduler_state_machine = SchedulerMachine.TestCase


def test_randomized_simulation_at_scale(seed=0):
    """10,000 simulated workers, random durations, failures and retries, lost and retired ranks, verification."""
    rng = random.Random(seed)
    workers = 10_000
    sched = Scheduler(range(1, workers + 1), prefetch=2, straggler_min=0.5)
    sizes = {m: rng.randrange(0, 30_000) for m in range(4)}
    for m, size in sizes.items():
        sched.add_map(m, size, chunksize=rng.choice([None, 1, 50]), priority=rng.randrange(2))
    delivered = {m: bytearray(size) for m, size in sizes.items()}
    sent, now, attempts = {}, 0.0, Counter()
    lost = set()
    for step in range(200):
        now += 0.05
        for rank, chunk in sched.assign(now):
            sent[chunk.chunk_id] = (rank, chunk)
        if step < 150 and rng.random() < 0.3:  # lose a handful of ranks along the way
            rank = rng.choice([r for r, _ in sent.values()] or [1])
            if rank not in lost and sched.live > 1:
                sched.lose_rank(rank)
                lost.add(rank)
                sent = {cid: rc for cid, rc in sent.items() if rc[0] != rank}
        for chunk_id in rng.sample(sorted(sent), k=len(sent) // 2) if step < 190 else sorted(sent):
            if chunk_id not in sent:
                continue
            rank, chunk = sent.pop(chunk_id)
            done = sched.complete(rank, chunk_id, rng.uniform(1e-4, 0.1) * len(chunk), now)
            if done is None:  # the other copy of a straggler came first
                continue
            bad = [i for i in range(chunk.start, chunk.stop) if attempts[chunk.map_id, i] < 1 and rng.random() < 0.01]
            for i in range(chunk.start, chunk.stop):
                if i in bad:
                    attempts[chunk.map_id, i] += 1
                else:
                    delivered[chunk.map_id][i] += 1
            if bad:
                sched.retry(chunk.map_id, bad, avoid=rank)
            if sched.map_finished(chunk.map_id):
                sched.remove_map(chunk.map_id)
        if sched.idle:
            break
    assert sched.idle and not sched.maps
    for m, counts in delivered.items():
        assert counts == bytearray([1]) * sizes[m], f"map {m}: a point was lost or delivered twice"


class GroupMachine(RuleBasedStateMachine):
    """One-rank and k-rank maps together, as the master drives them: members report one by one (a failure
    settles a point at once), k-rank points time out, ranks are lost, maps are cancelled; one-rank tasks open
    nested maps and wait for them (parked: such a task cannot end before its nested maps have)."""

    @initialize(workers=st.integers(2, 6), prefetch=st.integers(1, 3))
    def start(self, workers, prefetch):
        self.sched = Scheduler(list(range(1, workers + 1)), prefetch=prefetch, straggler_factor=None)
        self.now = 0.0
        self.next_map = 0
        self.open: dict[int, int] = {}  # map_id -> size
        self.delivered: dict[int, Counter] = {}
        self.attempts: Counter = Counter()
        self.sent: dict[int, tuple] = {}  # one-rank chunk_id -> (rank, chunk)
        self.tasks: dict[int, list] = {}  # k-rank chunk_id -> [chunk, members still to report, settled]
        self.waits: dict[int, int] = {}  # parked one-rank chunk_id -> the nested map its task waits for
        self.just_assigned = False

    @rule(size=st.integers(0, 12), k=st.sampled_from([1, 2, 2, 3]), priority=st.integers(0, 2))
    def add_map(self, size, k, priority):
        if k > self.sched.live:
            with pytest.raises(ValueError):
                self.sched.add_map(self.next_map, size, ranks_per_task=k)
            return
        map_id = self.next_map
        self.next_map += 1
        self.sched.add_map(map_id, size, priority=priority, ranks_per_task=k)
        self.open[map_id], self.delivered[map_id] = size, Counter()
        self.just_assigned = False
        if size == 0:
            self._end(map_id)

    @rule(dt=st.sampled_from([0.0, 0.3, 2.0]))
    def assign(self, dt):
        self.now += dt
        self.fed = set()  # ranks given one-rank chunks by this assign
        self.head_before = self._head()
        for rank, chunk in self.sched.assign(self.now):
            assert not self.sched.ranks[rank].lost and chunk.map_id in self.open
            if chunk.group is None:
                if not self.sched.maps[chunk.map_id].nested:  # a reserved rank whose task waits takes nested ones
                    self.fed.add(rank)
                assert all(rank not in members for _, members, _ in self.tasks.values()), \
                    "a rank inside a k-rank task got other work"
                self.sent[chunk.chunk_id] = (rank, chunk)
                continue
            assert len(chunk) == 1 and len(chunk.group) == self.sched.maps[chunk.map_id].ranks_per_task
            task = self.tasks.setdefault(chunk.chunk_id, [chunk, set(), False])
            assert rank in chunk.group and rank not in task[1]
            assert not self.sched.ranks[rank].in_flight.keys() - {chunk.chunk_id}, "a member holds other work"
            task[1].add(rank)
        self.just_assigned = True

    def _can_end(self):
        """The one-rank chunks whose tasks may end: those not waiting for an open nested map."""
        return sorted(c for c in self.sent if self.waits.get(c) not in self.open)

    @precondition(lambda self: self._can_end())
    @rule(data=st.data(), fail=st.booleans())
    def complete(self, data, fail):
        chunk_id = data.draw(st.sampled_from(self._can_end()))
        self._complete(chunk_id, fail)
        self.just_assigned = False

    def _complete(self, chunk_id, fail):
        rank, chunk = self.sent.pop(chunk_id)
        self.waits.pop(chunk_id, None)
        assert self.sched.complete(rank, chunk_id, 0.01, self.now) == chunk
        self._settled(chunk, fail, rank)

    @precondition(lambda self: any(c not in self.waits for c in self.sent))
    @rule(data=st.data(), size=st.integers(1, 5), priority=st.integers(0, 3))
    def nest(self, data, size, priority):
        """A one-rank task opens a nested map and waits for it."""
        chunk_id = data.draw(st.sampled_from(sorted(c for c in self.sent if c not in self.waits)))
        map_id = self.next_map
        self.next_map += 1
        self.sched.add_map(map_id, size, priority=priority, nested=True)
        self.open[map_id], self.delivered[map_id] = size, Counter()
        self.sched.park(self.sent[chunk_id][0], chunk_id)
        self.waits[chunk_id] = map_id
        self.just_assigned = False

    @precondition(lambda self: any(members for _, members, _ in self.tasks.values()))
    @rule(data=st.data(), fail=st.booleans())
    def member_reports(self, data, fail):
        chunk_id = data.draw(st.sampled_from(sorted(c for c, (_, m, _) in self.tasks.items() if m)))
        chunk, members, settled = self.tasks[chunk_id]
        rank = data.draw(st.sampled_from(sorted(members)))
        members.discard(rank)
        done = self.sched.complete_member(rank, chunk_id, 0.01, self.now, fail)
        expected = not settled and chunk.map_id in self.open and (fail or not members)
        assert (done == chunk) if expected else done is None
        if not settled and (fail or not members):
            self.tasks[chunk_id][2] = True
        if expected:
            self._settled(chunk, fail, rank)
        if not members:
            del self.tasks[chunk_id]
        self.just_assigned = False

    @rule(dt=st.sampled_from([0.5, 2.0]))
    def timeouts(self, dt):
        self.now += dt
        for chunk in self.sched.overdue_groups(self.now, lambda map_id: 1.0):
            task = self.tasks[chunk.chunk_id]
            assert not task[2] and chunk.map_id in self.open
            task[2] = True
            assert set(self.sched.stuck_ranks()) >= task[1] - {r for r, s in self.sched.ranks.items() if s.lost}
            self._settled(chunk, True, chunk.group[0])
        self.just_assigned = False

    @precondition(lambda self: self.sched.live > 1)
    @rule(data=st.data())
    def lose_rank(self, data):
        rank = data.draw(st.sampled_from([r for r, s in self.sched.ranks.items() if not s.lost]))
        self.sched.lose_rank(rank)
        self.sent = {c: (r, chunk) for c, (r, chunk) in self.sent.items() if r != rank}
        self.waits = {c: m for c, m in self.waits.items() if c in self.sent}
        for chunk_id, task in list(self.tasks.items()):
            if rank in task[1]:
                task[1].discard(rank)
                task[2] = True  # requeued (if not settled before): not a delivery
                if not task[1]:
                    del self.tasks[chunk_id]
        for map_id in self.sched.too_wide():  # the master fails them
            self.sched.remove_map(map_id)
            del self.open[map_id]
        self.just_assigned = False

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def cancel(self, data):
        map_id = data.draw(st.sampled_from(sorted(self.open)))
        self.sched.remove_map(map_id)
        self.sent = {c: (r, chunk) for c, (r, chunk) in self.sent.items() if chunk.map_id != map_id}
        self.waits = {c: m for c, m in self.waits.items() if c in self.sent}
        del self.open[map_id]  # its k-rank tasks stay on their members until they report
        self.just_assigned = False

    def _settled(self, chunk, fail, rank):
        map_id = chunk.map_id
        for index in range(chunk.start, chunk.stop):
            if fail and self.attempts[map_id, index] < MAX_ATTEMPTS:
                self.attempts[map_id, index] += 1
                self.sched.retry(map_id, [index], avoid=rank)
                continue
            self.delivered[map_id][index] += 1
            assert self.delivered[map_id][index] == 1, f"point {index} of map {map_id} delivered twice"
        if self.sched.map_finished(map_id):
            self._end(map_id)

    def _end(self, map_id):
        assert self.delivered[map_id] == Counter(range(self.open[map_id]))
        self.sched.remove_map(map_id)
        del self.open[map_id]

    @invariant()
    def books_agree(self):
        if not hasattr(self, "sched"):
            return
        held = {(r.rank, cid) for r in self.sched.ranks.values() for cid in r.in_flight}
        model = {(r, c) for c, (r, _) in self.sent.items()} | {(r, c) for c, (_, m, _) in self.tasks.items() for r in m}
        assert held == model
        parked = {(r.rank, cid) for r in self.sched.ranks.values() for cid in r.parked}
        assert parked == {(self.sent[c][0], c) for c in self.waits}
        for map_id, state in self.sched.maps.items():
            live_tasks = sum(1 for chunk, _, settled in self.tasks.values() if chunk.map_id == map_id and not settled)
            assert state.in_flight == live_tasks + sum(1 for _, c in self.sent.values() if c.map_id == map_id)

    def _head(self):
        """The first map by priority with points to hand out, or None."""
        waiting = sorted((-s.priority, s.order, s.map_id) for s in self.sched.maps.values() if s.unassigned)
        return self.sched.maps[waiting[0][2]] if waiting else None

    @invariant()
    def a_waiting_k_rank_map_at_the_head_never_waits_with_k_idle_ranks(self):
        if not getattr(self, "just_assigned", False):
            return
        head = self._head()
        if head is None or head.ranks_per_task == 1:
            return
        idle = [r for r, s in self.sched.ranks.items() if not s.lost and not s.in_flight]
        assert len(idle) < head.ranks_per_task, "a k-rank map starves beside idle ranks"
        # It waits for k ranks outside k-rank tasks: those get no one-rank work meanwhile (no starvation).
        outside = {r for r, s in self.sched.ranks.items() if not s.lost and r not in self.sched._members}
        if len(outside) >= head.ranks_per_task and head is self.head_before:
            assert len(outside - self.fed) >= head.ranks_per_task, "one-rank maps took the ranks a k-rank map waits for"

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        for _ in range(10_000):  # no more faults: every member reports, every map must end
            if not self.open and not self.tasks:
                break
            self.assign(0.0)
            for chunk_id in self._can_end():
                self._complete(chunk_id, False)
            for chunk_id, (chunk, members, settled) in list(self.tasks.items()):
                for rank in sorted(members):
                    members.discard(rank)
                    done = self.sched.complete_member(rank, chunk_id, 0.01, self.now, False)
                    if done is not None:
                        self.tasks[chunk_id][2] = True
                        self._settled(chunk, False, rank)
                del self.tasks[chunk_id]
        assert not self.open, f"maps {sorted(self.open)} never ended"
        assert self.sched.idle and not self.sched.stuck_ranks()


GroupMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=50, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_group_state_machine = GroupMachine.TestCase
