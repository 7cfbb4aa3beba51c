"""`eaglebook` on the command line: one sub-command per job, arguments from dataclasses.

    eaglebook prepare                      convert the embedded default model once
    eaglebook notebooks --run-dir runs/x   run the whole notebook suite headless
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser


@dataclass
class PrepareArgs:
    """Convert (or verify) the embedded default target so later loads take seconds."""

    target: str = field(default="smollm2-135m", metadata={"help": "embedded model to prepare"})


@dataclass
class NotebooksArgs:
    """Run the numbered notebooks headless (papermill) into one run folder."""

    run_dir: str = field(default="runs/latest", metadata={"help": "folder for executed notebooks and results"})
    profile: str = field(default="cpu", metadata={"help": "cpu (embedded default), rtx3090, or full"})
    only: list[str] = field(default_factory=list, metadata={"help": "run only notebooks whose name starts so"})
    params_file: str = field(default="", metadata={"help": "YAML of per-notebook parameter overrides"})
    stop_on_error: bool = field(default=False, metadata={"help": "stop at the first failing notebook"})


def _prepare(args: PrepareArgs) -> int:
    from .target import prepare_embedded

    path = prepare_embedded(args.target)
    print(f"{args.target} ready at {path}")
    return 0


def _notebooks(args: NotebooksArgs) -> int:
    from .runner import run_suite

    summary = run_suite(args.run_dir, profile=args.profile, only=args.only or None,
                        params_file=args.params_file or None, stop_on_error=args.stop_on_error)
    return 0 if all(s["status"] == "ok" for s in summary["notebooks"].values()) else 1


COMMANDS = {
    "prepare": (PrepareArgs, _prepare),
    "notebooks": (NotebooksArgs, _notebooks),
}


def register(name: str, args_cls, fn) -> None:
    """Stage modules add their sub-commands here (e.g. `generate`, `bench`)."""
    COMMANDS[name] = (args_cls, fn)


def _load_stage_commands() -> None:
    # Each stage module that offers a command registers it when imported.
    import importlib

    for mod in ("eaglebook.decode", "eaglebook.bench", "eaglebook.hidden_states", "eaglebook.train",
                "eaglebook.regenerate", "eaglebook.recipe", "eaglebook.headline"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _load_stage_commands()
    if __name__ == "__main__":
        # `python -m eaglebook.cli`: stage modules registered into the importable eaglebook.cli
        import eaglebook.cli as _cli

        COMMANDS.update(_cli.COMMANDS)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: eaglebook {" + ",".join(COMMANDS) + "} [options]   (eaglebook CMD --help for options)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    cls, fn = COMMANDS[argv[0]]
    (args,) = HfArgumentParser(cls, prog=f"eaglebook {argv[0]}").parse_args_into_dataclasses(argv[1:])
    return fn(args)


if __name__ == "__main__":
    # Run the registry of the importable `eaglebook.cli`, the module stage modules register
    # their commands in (under `python -m`, this file is a separate `__main__` module).
    from eaglebook.cli import main as _main

    sys.exit(_main())
