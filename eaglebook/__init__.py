"""eaglebook: learn and do EAGLE speculative decoding, one notebook per stage."""
__version__ = "0.1.0"

import os as _os

# OpenMP threads that finish early spin-wait for the others before sleeping. libgomp's default spin
# (300,000 polls) is cheap on an idle machine and ruinous on a busy one: with one other busy process on
# 2 cores, every spinning thread steals the core its partner needs, and a hidden-state capture fell
# from ~2,100 to ~200 tokens/s. 10,000 polls keeps the quiet speed and loses far less under load than
# the default; OMP_WAIT_POLICY=PASSIVE (no spin) is kinder under load but a third slower when quiet.
# It must be set before torch loads libgomp, so it lives here; the user's own setting wins.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .device import setup  # noqa: E402
from .target import DEFAULT_TARGET, load_target, load_target_head, target_info  # noqa: E402
from . import runner  # noqa: E402,F401


def load_draft(name_or_path, target=None, tokenizer=None, dtype=None):
    """A draft head by shipped name ("smollm2-135m-eagle3") or folder, checked against `target`."""
    from .export import load_draft as _load

    return _load(name_or_path, target=target, tokenizer=tokenizer, dtype=dtype)

__all__ = ["__version__", "setup", "DEFAULT_TARGET", "load_target", "load_target_head", "target_info", "load_draft"]
