"""The OpenMP spin setting eaglebook applies before torch loads, and the user's override."""
import os
import subprocess
import sys

import pytest

PROBE = "import eaglebook, os, torch; print(os.environ.get('GOMP_SPINCOUNT', '-'), torch.get_num_threads())"


def _probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    base.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=base, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[0]


def test_short_spin_is_set_before_torch_loads():
    assert _probe() == "10000"


@pytest.mark.parametrize("env,expected", [({"GOMP_SPINCOUNT": "50"}, "50"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "-")])
def test_the_users_openmp_setting_wins(env, expected):
    assert _probe(**env) == expected


THREADS_PROBE = "import eaglebook, torch; eaglebook.setup(); print(torch.get_num_threads())"


def _threads(**env):
    base = {k: v for k, v in os.environ.items() if k != "EAGLEBOOK_THREADS"}
    base.update(env)
    out = subprocess.run([sys.executable, "-c", THREADS_PROBE], env=base, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.fixture
def busy_neighbour():
    """Another process that keeps one core busy for as long as the test runs."""
    proc = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux /proc")
def test_a_busy_neighbour_is_seen_and_leaves_torch_its_core(busy_neighbour):
    from eaglebook.device import busy_tasks

    assert busy_neighbour.pid in busy_tasks()
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("needs 2 cores: with one, torch keeps its one thread")
    assert _threads() <= cores - 1  # the neighbour's core is not split into torch's ops


def test_eaglebook_threads_wins_over_the_busy_check(busy_neighbour):
    assert _threads(EAGLEBOOK_THREADS="3") == 3
