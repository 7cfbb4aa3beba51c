"""Prompt suites (MT-bench, HumanEval, the ShareGPT hold-out, a JSONL file) and the one render
function every backend sends its token ids through."""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .core import BenchError


# --------------------------------------------------------------------------------------
# Prompt suites
# --------------------------------------------------------------------------------------

SUITES = ("mt-bench", "humaneval", "sharegpt", "jsonl")


@dataclass
class Prompt:
    """One benchmark prompt: the user turns to send, in order (MT-bench has two)."""

    id: str
    category: str
    turns: list[str]
    system: str | None = None

    def messages(self, upto: int = 0, answers: list[str] | None = None) -> list[dict]:
        """The conversation up to user turn `upto` (0-based), with the model's own earlier answers."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for i in range(upto + 1):
            msgs.append({"role": "user", "content": self.turns[i]})
            if i < upto:
                msgs.append({"role": "assistant", "content": (answers or [])[i]})
        return msgs


def _sharegpt_holdout_path(run_dir: str | os.PathLike | None) -> Path | None:
    """Where notebook 01 persists its ShareGPT hold-out split (if it ran in this run folder)."""
    cands = []
    if run_dir:
        cands += [Path(run_dir) / "01-loss-masks" / "holdout.jsonl", Path(run_dir) / "01-loss-masks" / "sharegpt-holdout.jsonl"]
    try:  # the data module may name its own location; prefer it when it exists
        from .. import data as _data
        fn = getattr(_data, "sharegpt_holdout_path", None)
        if fn is not None:
            cands.insert(0, Path(fn(run_dir) if run_dir else fn()))
    except Exception:  # a missing or failing helper just means "look in the usual places"
        pass
    return next((p for p in cands if p.is_file()), None)


def _prompts_from_conversations(rows: Iterable[dict], source: str) -> list[Prompt]:
    """Rows with `messages` (normalized schema) become prompts: every user turn, answers dropped."""
    out = []
    for i, r in enumerate(rows):
        msgs = r["messages"]
        system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if users:
            out.append(Prompt(id=str(r.get("id", f"{source}-{i}")), category=str(r.get("category") or source),
                              turns=users, system=system))
    return out


def load_prompts_file(path: str | os.PathLike) -> list[Prompt]:
    """A user JSONL: one object per line with `prompt` (a string), `turns` (strings) or
    `messages` (chat); optional `id`, `category`, `system`."""
    from ..cli import read_jsonl  # the one JSONL reader: `path:line: not valid JSON (...)`

    path = Path(path)
    out = []
    for n, rec in read_jsonl(path, "prompts file"):
        if "messages" in rec:
            ps = _prompts_from_conversations([{**rec, "id": rec.get("id", f"{path.stem}-{n}")}], path.stem)
            if not ps:
                raise BenchError(f"{path}:{n}: `messages` has no user turn")
            p = ps[0]
        elif "turns" in rec or "prompt" in rec:
            turns = rec.get("turns") or [rec["prompt"]]
            if not all(isinstance(t, str) and t for t in turns):
                raise BenchError(f"{path}:{n}: `prompt`/`turns` must be non-empty strings")
            p = Prompt(id=str(rec.get("id", f"{path.stem}-{n}")), category="", turns=list(turns),
                       system=rec.get("system"))
        else:
            raise BenchError(f"{path}:{n}: needs `prompt`, `turns` or `messages`")
        p.category = str(rec.get("category") or path.stem)
        out.append(p)
    if not out:
        raise BenchError(f"prompts file {path} holds no prompts")
    return out


def load_suite(suite: str = "mt-bench", limit: int | None = None, prompts_file: str | None = None,
               run_dir: str | None = None) -> list[Prompt]:
    """The prompts of a suite, in a fixed order.

    mt-bench: 80 questions, 8 categories, two turns each (`turns` in the run decides how many
    are sent). MT-bench is ordered by category, so `limit` takes questions round-robin over
    categories, keeping a small run representative.
    humaneval: 164 problems wrapped in `eaglebook.data.HUMANEVAL_WRAPPER` (category "coding").
    sharegpt: the hold-out split notebook 01 persisted (never trained on).
    jsonl: `prompts_file` (see `load_prompts_file`).
    """
    from .. import data

    if prompts_file and suite in ("mt-bench", "jsonl"):
        suite = "jsonl"
    if suite == "mt-bench":
        ds = data.load_mtbench()
        prompts = [Prompt(id=r["id"], category=r["category"], turns=list(r["turns"])) for r in ds]
        prompts = _round_robin(prompts)
    elif suite == "humaneval":
        prompts = [Prompt(id=r["id"], category="coding", turns=[r["messages"][0]["content"]])
                   for r in data.load_humaneval()]
    elif suite == "sharegpt":
        path = _sharegpt_holdout_path(run_dir)
        if path is None:
            raise BenchError("the ShareGPT hold-out split was not found: run notebook 01 into this run_dir first "
                             "(it persists the split), or pass --prompts FILE")
        ds, _ = data.load_conversations(path, source="sharegpt-holdout")
        prompts = _prompts_from_conversations(ds, "sharegpt")
    elif suite == "jsonl":
        if not prompts_file:
            raise BenchError("suite 'jsonl' needs --prompts FILE")
        prompts = load_prompts_file(prompts_file)
    else:
        raise BenchError(f"unknown suite {suite!r}; choose one of {SUITES}")
    return prompts[:limit] if limit else prompts


def _round_robin(prompts: list[Prompt]) -> list[Prompt]:
    by_cat: dict[str, list[Prompt]] = defaultdict(list)
    for p in prompts:
        by_cat[p.category].append(p)
    out, queues = [], list(by_cat.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def render_ids(tokenizer, messages: list[dict], answer_ids: dict | None = None) -> list[int]:
    """Token ids of a conversation plus the generation prompt: THE one render function.

    Every backend sends these ids, so what the head was trained on is what it is served.
    This is the single swap point: it defers to `eaglebook.data.render_prompt`, which keeps earlier answers as the ids the model produced (`answer_ids`:
    {message index: ids}); only where that is absent does it fall back to the chat template.
    """
    from .. import data

    render = getattr(data, "render_prompt", None)
    if render is not None:
        ids = render(tokenizer, messages, answer_ids=answer_ids) if answer_ids else render(tokenizer, messages)
        return [int(i) for i in ids]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]
