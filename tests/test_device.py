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
