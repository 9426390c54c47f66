"""Launches the pytest-mpi suite in tests/inside_mpi under a real ``mpiexec -n 3``."""


from conftest import TESTS, mpiexec


def test_pytest_mpi_suite_passes_on_every_rank():
    proc = mpiexec(3, "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider", f"{TESTS}/inside_mpi",
                   "--rootdir", TESTS, check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("3 passed") == 3, proc.stdout[-3000:]  # one report per rank
