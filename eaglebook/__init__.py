"""eaglebook: learn and do EAGLE speculative decoding, one notebook per stage."""
__version__ = "0.1.0"

from .device import setup  # noqa: E402
from .target import DEFAULT_TARGET, load_target, target_info  # noqa: E402
from . import runner  # noqa: E402,F401

__all__ = ["__version__", "setup", "DEFAULT_TARGET", "load_target", "target_info"]
