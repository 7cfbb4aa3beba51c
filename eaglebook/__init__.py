"""eaglebook: learn and do EAGLE speculative decoding, one notebook per stage."""
__version__ = "0.1.0"

from .device import setup  # noqa: E402
from .target import DEFAULT_TARGET, load_target, load_target_head, target_info  # noqa: E402
from . import runner  # noqa: E402,F401


def load_draft(name_or_path, target=None, tokenizer=None, dtype=None):
    """A draft head by shipped name ("smollm2-135m-eagle3") or folder, checked against `target`."""
    from .export import load_draft as _load

    return _load(name_or_path, target=target, tokenizer=tokenizer, dtype=dtype)

__all__ = ["__version__", "setup", "DEFAULT_TARGET", "load_target", "load_target_head", "target_info", "load_draft"]
