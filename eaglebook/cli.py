"""`eaglebook` on the command line: one sub-command per job, arguments from dataclasses.

    eaglebook prepare                      convert the embedded default model once
    eaglebook notebooks --run_dir runs/x   run the whole notebook suite headless

Bad input (a missing file, a broken JSONL line, a feature folder that is not one) ends a
command with one line naming the problem and a non-zero exit, never a traceback: every
error class of the package and a missing file are reported that way (`EAGLEBOOK_TRACEBACK=1`
shows the traceback as well).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


class UserError(RuntimeError):
    """Input a user can fix; the message names it (for a file's line: `path:line: what is wrong`)."""


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file that a command was given.

    Raises UserError naming `path:line` on a line that is not a JSON object, and on a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: not valid JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((n, rec))
    return out


def _is_user_error(exc: BaseException) -> bool:
    """The package's own error classes carry messages written for the user; so does a missing file."""
    return (isinstance(exc, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError))
            or type(exc).__module__.split(".")[0] == "eaglebook")


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
    notebooks_dir: str = field(default="", metadata={"help": "folder of NN-*.ipynb notebooks ('' = the suite's)"})


def _prepare(args: PrepareArgs) -> int:
    from .target import prepare_embedded

    path = prepare_embedded(args.target)
    print(f"{args.target} ready at {path}")
    return 0


def _notebooks(args: NotebooksArgs) -> int:
    from .runner import run_suite

    summary = run_suite(args.run_dir, profile=args.profile, only=args.only or None,
                        params_file=args.params_file or None, stop_on_error=args.stop_on_error,
                        **({"notebooks_dir": args.notebooks_dir} if args.notebooks_dir else {}))
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
                "eaglebook.regenerate", "eaglebook.recipe", "eaglebook.headline", "eaglebook.export"):
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
    from transformers import HfArgumentParser

    cls, fn = COMMANDS[argv[0]]
    (args,) = HfArgumentParser(cls, prog=f"eaglebook {argv[0]}").parse_args_into_dataclasses(argv[1:])
    try:
        return fn(args)
    except Exception as exc:
        if not _is_user_error(exc) or os.environ.get("EAGLEBOOK_TRACEBACK"):
            raise
        print(f"eaglebook {argv[0]}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Run the registry of the importable `eaglebook.cli`, the module stage modules register
    # their commands in (under `python -m`, this file is a separate `__main__` module).
    from eaglebook.cli import main as _main

    sys.exit(_main())
