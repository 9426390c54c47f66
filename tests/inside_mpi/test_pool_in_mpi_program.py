"""Run by pytest-mpi under mpiexec (see tests/test_inside_mpi.py): code that lives inside an MPI program."""

import pytest

import mpimap
from jobfuncs import square


@pytest.mark.mpi(min_size=2)
def test_pool_over_comm_world():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    with mpimap.Pool(comm) as pool:
        if pool is not None:
            assert comm.Get_rank() == 0
            assert list(pool.map(square, range(2000))) == [x * x for x in range(2000)]
            assert pool.size == comm.Get_size() - 1
    # all ranks return and can keep communicating
    assert comm.allreduce(1) == comm.Get_size()


@pytest.mark.mpi(min_size=3)
def test_pools_on_split_communicators():
    """Two independent pools at once, one per half of the world (a one-rank half evaluates in-process)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    half = world.Split(color=world.Get_rank() % 2, key=world.Get_rank())
    with mpimap.Pool(half) as pool:
        if pool is not None:
            offset = world.Get_rank() % 2
            assert list(pool.map(square, range(offset, 500))) == [x * x for x in range(offset, 500)]
    half.Free()
    assert world.allreduce(1) == world.Get_size()


@pytest.mark.mpi(min_size=2)
def test_worker_ranks_get_a_pool_that_is_not_the_master():
    from mpi4py import MPI

    pool = mpimap.Pool(MPI.COMM_WORLD)
    if MPI.COMM_WORLD.Get_rank() == 0:
        assert pool.is_master
        assert pool.submit(square, 12).result() == 144
        pool.shutdown()
    else:
        assert not pool.is_master  # served until rank 0's shutdown, then returned
        with pytest.raises(RuntimeError, match="worker"):
            pool.submit(square, 1)
