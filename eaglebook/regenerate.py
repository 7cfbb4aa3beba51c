"""Regeneration: replace the assistant turns of chat data with the target's own answers.

A draft learns to predict what *the target* says. ShareGPT's answers were written by
ChatGPT, so we keep the prompts and let the target answer them (greedy by default), either
the last turn only or every turn in sequence (each new question sees the target's earlier
answers). Two backends share one interface, `generate(prompts, max_new_tokens)`:

- `LocalBackend`: batched `transformers` generation with left padding (the CPU default).
- `ServerBackend`: any SGLang or OpenAI-compatible server (vLLM, SGLang), many requests in
  flight, retries. SGLang's native `/generate` takes and returns token ids; an OpenAI
  `/v1/completions` endpoint takes ids but returns text, so its answers are re-tokenized
  and every count disagreement with the server's `completion_tokens` is reported.

Runs are resumable: every finished chunk of rows is written to disk atomically, and a
restarted run skips the rows already done. The output is a `datasets.DatasetDict`
(train/holdout) saved to disk with provenance (target fingerprint, template hash, settings).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, load_from_disk

from . import data

DATASET_META = "eaglebook-dataset.json"


class RegenerationError(RuntimeError):
    """A regeneration run that cannot go on; the message says why."""


@dataclass
class Answer:
    ids: list[int]  # what the model produced, its end-of-turn token included when it emitted one
    finished: bool  # False: cut off by max_new_tokens
    retokenized: bool = False  # ids came from re-tokenizing text (server returned no ids)
    count_mismatch: bool = False  # re-tokenized length differs from the server's token count


@dataclass
class RegenSettings:
    mode: str = "last"  # "last": regenerate the final answer; "all": every answer, in sequence
    max_new_tokens: int = 256
    max_length: int = 2048  # prompt + answer; longer prompts are skipped
    temperature: float = 0.0  # 0 = greedy
    chunk_rows: int = 8  # rows per chunk written to disk
    holdout: float = 0.05
    seed: int = 0

    def check(self) -> None:
        if self.mode not in ("last", "all"):
            raise ValueError(f"mode must be 'last' or 'all', not {self.mode!r}")
        if self.max_new_tokens < 1 or self.max_length <= self.max_new_tokens:
            raise ValueError(f"need 1 <= max_new_tokens ({self.max_new_tokens}) < max_length ({self.max_length})")


def stop_ids(tokenizer, model=None) -> list[int]:
    """Ids that end an answer: the tokenizer's eos and the model's generation-config eos."""
    ids = [tokenizer.eos_token_id]
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += eos if isinstance(eos, (list, tuple)) else [eos]
    return sorted({int(i) for i in ids if i is not None})


def _cut(ids: list[int], stops: set[int]) -> Answer:
    """Generated ids up to and including the first stop id (padding after it dropped)."""
    for k, t in enumerate(ids):
        if t in stops:
            return Answer(ids[:k + 1], True)
    return Answer(list(ids), False)


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------

class LocalBackend:
    """Batched generation with `transformers` (left padding, greedy unless temperature > 0)."""

    name = "local"

    def __init__(self, model, tokenizer, batch_size: int = 8, temperature: float = 0.0):
        self.model, self.tokenizer, self.batch_size, self.temperature = model, tokenizer, batch_size, temperature
        self.stops = stop_ids(tokenizer, model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[Answer]:
        import torch

        out: list[Answer | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
        dev = self.model.device
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: every prompt ends at the same column
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                att[r, width - len(prompts[i]):] = 1
            with torch.no_grad():
                gen = self._decode(ids.to(dev), att.to(dev), max_new_tokens)
            for r, i in enumerate(idx):
                out[i] = _cut(gen[r], set(self.stops))
        return out

    def _decode(self, ids, att, max_new_tokens: int) -> list[list[int]]:
        """Greedy (or sampled) decoding of a left-padded batch that drops each row from the batch
        once it has emitted a stop id: `generate()` keeps computing finished rows until the
        longest answer ends, which wastes about half the work on chat answers of mixed length."""
        import torch
        from transformers import DynamicCache

        stops = torch.tensor(self.stops, device=ids.device)
        pos = (att.cumsum(-1) - 1).masked_fill(att == 0, 1)  # as generate() numbers left-padded rows
        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=att, position_ids=pos, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        rows = torch.arange(ids.shape[0], device=ids.device)  # batch row -> original row
        last = pos[:, -1]
        out: list[list[int]] = [[] for _ in range(ids.shape[0])]
        for step in range(max_new_tokens):
            if self.temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits.float() / self.temperature, -1), 1)[:, 0]
            else:
                nxt = logits.argmax(-1)
            for r, t in zip(rows.tolist(), nxt.tolist()):
                out[r].append(t)
            alive = ~torch.isin(nxt, stops)
            if step == max_new_tokens - 1 or not bool(alive.any()):
                break
            if not bool(alive.all()):
                keep = alive.nonzero().flatten()
                cache.batch_select_indices(keep)
                rows, att, last, nxt = rows[keep], att[keep], last[keep], nxt[keep]
            att = torch.cat([att, att.new_ones(att.shape[0], 1)], dim=1)
            last = last + 1
            logits = self.model(input_ids=nxt[:, None], attention_mask=att, position_ids=last[:, None],
                                past_key_values=cache, use_cache=True).logits[:, -1]
        return out


class ServerBackend:
    """An SGLang (`api="sglang"`, native /generate with token ids) or OpenAI-compatible
    (`api="openai"`, /v1/completions: ids in, text out) server, `concurrency` requests at once."""

    name = "server"

    def __init__(self, base_url: str, tokenizer, api: str = "sglang", model: str = "default",
                 stops: list[int] | None = None, concurrency: int = 32, retries: int = 5,
                 timeout: float = 600.0, temperature: float = 0.0, backoff: float = 0.5):
        if api not in ("sglang", "openai"):
            raise ValueError(f"api must be 'sglang' or 'openai', not {api!r}")
        self.base_url, self.tokenizer, self.api, self.model = base_url.rstrip("/"), tokenizer, api, model
        self.stops = stops or stop_ids(tokenizer)
        self.concurrency, self.retries, self.timeout = concurrency, retries, timeout
        self.temperature, self.backoff = temperature, backoff
        self.retried = 0  # requests that needed another try

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[Answer]:
        coro = self._generate_all(prompts, max_new_tokens)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        # Inside Jupyter an event loop is already running: use a loop of our own in a thread.
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coro).result()

    async def _generate_all(self, prompts, max_new_tokens):
        import httpx

        sem = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            client = None
            if self.api == "openai":
                from openai import AsyncOpenAI
                client = AsyncOpenAI(base_url=self.base_url + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                                     max_retries=0, http_client=http)

            async def one(p):
                async with sem:
                    return await self._with_retries(http, client, p, max_new_tokens)
            return list(await asyncio.gather(*(one(p) for p in prompts)))

    async def _with_retries(self, http, client, prompt, max_new_tokens) -> Answer:
        for attempt in range(self.retries + 1):
            try:
                if self.api == "sglang":
                    return await self._sglang(http, prompt, max_new_tokens)
                return await self._openai(client, prompt, max_new_tokens)
            except Exception as exc:  # network errors and 5xx alike: back off and try again
                if attempt == self.retries:
                    raise RegenerationError(f"{self.base_url}: request failed {attempt + 1} times: "
                                            f"{type(exc).__name__}: {exc}") from exc
                self.retried += 1
                await asyncio.sleep(self.backoff * 2 ** attempt * (0.5 + random.random()))

    async def _sglang(self, http, prompt, max_new_tokens) -> Answer:
        params = {"max_new_tokens": max_new_tokens, "temperature": self.temperature,
                  "stop_token_ids": self.stops, "skip_special_tokens": False}
        r = await http.post(self.base_url + "/generate", json={"input_ids": prompt, "sampling_params": params})
        r.raise_for_status()
        body = r.json()
        finish = (body.get("meta_info") or {}).get("finish_reason") or {}
        stopped = finish.get("type") == "stop"
        if body.get("output_ids") is None:  # an older server: text only
            return self._from_text(body["text"], stopped, finish.get("matched"),
                                   (body.get("meta_info") or {}).get("completion_tokens"))
        ids = [int(t) for t in body["output_ids"]]
        matched = finish.get("matched")
        if stopped and isinstance(matched, int) and (not ids or ids[-1] != matched):
            ids.append(matched)  # the server reports the stop token it matched but left out of the ids
        return Answer(ids, stopped and bool(ids) and ids[-1] in self.stops)

    async def _openai(self, client, prompt, max_new_tokens) -> Answer:
        res = await client.completions.create(
            model=self.model, prompt=prompt, max_tokens=max_new_tokens, temperature=self.temperature,
            extra_body={"stop_token_ids": self.stops, "skip_special_tokens": False})
        choice = res.choices[0]
        matched = getattr(choice, "stop_reason", None)  # vLLM names the stop token here
        count = res.usage.completion_tokens if res.usage else None
        return self._from_text(choice.text, choice.finish_reason == "stop", matched, count)

    def _from_text(self, text: str, stopped: bool, matched, count) -> Answer:
        """Re-tokenize a text answer. The server did stop on an end-of-turn token, so recording
        it is not inventing one; a length mismatch with the server's count is flagged."""
        for s in self.stops:  # some servers include the stop token's text
            tok_text = self.tokenizer.convert_ids_to_tokens(s)
            if stopped and text.endswith(tok_text):
                text, matched = text[:-len(tok_text)], s
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if stopped:
            ids.append(int(matched) if isinstance(matched, int) else self.stops[0])
        return Answer(ids, stopped, retokenized=True, count_mismatch=count is not None and count != len(ids))


# --------------------------------------------------------------------------------------
# The resumable driver
# --------------------------------------------------------------------------------------

def _targets(messages, mode: str) -> list[int]:
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return answers if mode == "all" else answers[-1:]


def _regenerate_chunk(rows, backend, tokenizer, s: RegenSettings, stops) -> tuple[list[dict], dict]:
    """Regenerate a chunk of rows, round by round (round k = each row's k-th target answer)."""
    state = [{"row": r, "msgs": [dict(m) for m in r["messages"]], "todo": _targets(r["messages"], s.mode),
              "produced": {}, "skip": None} for r in rows]
    stats = {"generated_tokens": 0, "requests": 0, "retokenized": 0, "count_mismatch": 0}
    for k in range(max(len(st["todo"]) for st in state)):
        active, prompts = [], []
        for st in state:
            if st["skip"] or k >= len(st["todo"]):
                continue
            t = st["todo"][k]
            prompt = data.render_prompt(tokenizer, st["msgs"][:t], answer_ids=st["produced"], end_of_turn=stops)
            if len(prompt) + s.max_new_tokens > s.max_length:
                if st["produced"]:  # keep the answers already made; the conversation ends before this turn
                    st["todo"] = st["todo"][:k]
                else:
                    st["skip"] = "prompt too long for max_length"
                continue
            active.append(st)
            prompts.append(prompt)
        if not active:
            continue
        for st, ans in zip(active, backend.generate(prompts, s.max_new_tokens)):
            t = st["todo"][k]
            st["produced"][t] = ans.ids
            body = ans.ids[:-1] if ans.finished else ans.ids
            st["msgs"][t] = {"role": "assistant", "content": tokenizer.decode(body, skip_special_tokens=False)}
            stats["generated_tokens"] += len(ans.ids)
            stats["requests"] += 1
            stats["retokenized"] += ans.retokenized
            stats["count_mismatch"] += ans.count_mismatch
            if not ans.finished:  # a cut-off answer ends the conversation
                st["todo"] = st["todo"][:k + 1]
    out = []
    for st in state:
        r = st["row"]
        if st["skip"]:
            out.append({"index": r["_index"], "id": r["id"], "skip": st["skip"]})
            continue
        last = st["todo"][-1]
        seq = data.tokenize_conversation(tokenizer, st["msgs"][:last + 1], answer_ids=st["produced"],
                                         trained_turns=set(st["todo"]), end_of_turn=stops)
        answers = [st["produced"][t] for t in st["todo"]]
        out.append({"index": r["_index"], "id": r["id"], "source": r.get("source", ""), **seq,
                    "length": len(seq["input_ids"]), "num_trained": sum(seq["loss_mask"]),
                    "answer_tokens": sum(len(a) for a in answers), "num_answers": len(answers),
                    "finished": all(a and a[-1] in stops for a in answers),
                    "answer_text": st["msgs"][last]["content"]})
    return out, stats


def _read_chunks(chunk_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(chunk_dir.glob("chunk-*.jsonl")):
        rows += [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
    return rows


def _write_chunk(chunk_dir: Path, rows: list[dict]) -> None:
    path = chunk_dir / f"chunk-{min(r['index'] for r in rows):07d}.jsonl"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)  # atomic: a killed run leaves whole chunks or none


def _check_resume(out_dir: Path, settings: dict, on_change: str = "raise") -> None:
    path = out_dir / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff and on_change == "restart":
            print(f"{out_dir} holds a run with other settings ({', '.join(diff)}): starting over")
            shutil.rmtree(out_dir)
            return _check_resume(out_dir, settings)
        if diff:
            raise RegenerationError(
                f"{out_dir} holds a run with other settings ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
                "use another output folder or delete it")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2, sort_keys=True))


def regenerate(conversations: Dataset, backend, tokenizer, out_dir: str | os.PathLike,
               settings: RegenSettings | None = None, provenance: dict | None = None,
               progress: bool = True, on_settings_change: str = "raise") -> tuple[DatasetDict, dict]:
    """Regenerate the answers of `conversations` (normalized rows: id, source, messages) with
    `backend`, persisting finished chunks in `out_dir/chunks`; a rerun resumes. A folder
    holding a run with other settings raises, or with on_settings_change="restart" is cleared.

    Returns the dataset ({"train", "holdout"}, also saved to `out_dir/dataset`) and a summary
    (counts, skips, throughput, provenance), also saved as `out_dir/eaglebook-dataset.json`.
    """
    from tqdm.auto import tqdm

    s = settings or RegenSettings()
    s.check()
    out_dir = Path(out_dir)
    stops = backend.stops
    provenance = dict(provenance or {})
    provenance.setdefault("template_hash", _template_hash(tokenizer))
    run_settings = {**asdict(s), "backend": backend.name, "stop_ids": stops, "num_rows": len(conversations),
                    **{k: provenance[k] for k in ("target", "weights_fingerprint", "template_hash") if k in provenance}}
    run_settings.pop("chunk_rows")  # chunking may change between a run and its resume
    _check_resume(out_dir, run_settings, on_settings_change)
    chunk_dir = out_dir / "chunks"
    chunk_dir.mkdir(exist_ok=True)
    done = {r["index"] for r in _read_chunks(chunk_dir)}
    todo = [i for i in range(len(conversations)) if i not in done]
    # Similar prompt lengths share a batch (less left padding); each row keeps its index, so the
    # order is free and a resumed run picks up the same remaining rows.
    chars = [sum(len(m["content"]) for m in msgs) for msgs in conversations["messages"]]  # one column read
    todo.sort(key=chars.__getitem__)
    resumed = len(done)
    if resumed:
        print(f"Resuming: {resumed} of {len(conversations)} rows already done in {chunk_dir}")
    stats = {"generated_tokens": 0, "requests": 0, "retokenized": 0, "count_mismatch": 0}
    t0 = time.time()
    bar = tqdm(total=len(todo), desc=f"regenerate ({backend.name})", unit="row", disable=not progress)
    for c in range(0, len(todo), s.chunk_rows):
        rows = [{**conversations[i], "_index": i} for i in todo[c:c + s.chunk_rows]]
        out, st = _regenerate_chunk(rows, backend, tokenizer, s, stops)
        _write_chunk(chunk_dir, out)
        for k in stats:
            stats[k] += st[k]
        bar.update(len(rows))
        bar.set_postfix(tok_s=f"{stats['generated_tokens'] / max(time.time() - t0, 1e-9):.1f}")
    bar.close()
    seconds = time.time() - t0
    return _finish(out_dir, conversations, s, run_settings, provenance, stats, seconds, resumed)


def _template_hash(tokenizer) -> str:
    from .target import template_hash
    return template_hash(tokenizer)


def _finish(out_dir, conversations, s, run_settings, provenance, stats, seconds, resumed):
    from . import __version__

    rows = sorted(_read_chunks(out_dir / "chunks"), key=lambda r: r["index"])
    indices = [r["index"] for r in rows]
    if indices != list(range(len(conversations))):
        raise RegenerationError(f"chunks in {out_dir} do not hold every row exactly once "
                                f"({len(indices)} rows, {len(set(indices))} distinct, {len(conversations)} expected)")
    skipped: dict[str, int] = {}
    for r in rows:
        if "skip" in r:
            skipped[r["skip"]] = skipped.get(r["skip"], 0) + 1
    kept = [{k: v for k, v in r.items() if k != "index"} for r in rows if "skip" not in r]
    ds = data.split_holdout(Dataset.from_list(kept), s.holdout, s.seed) if kept else DatasetDict(
        {"train": Dataset.from_list([]), "holdout": Dataset.from_list([])})
    # One shard per split: an empty split (a tiny run's hold-out) still loads back.
    ds.save_to_disk(str(out_dir / "dataset"), num_shards={k: 1 for k in ds})
    n_tok = sum(r["length"] for r in kept)
    n_train = sum(r["num_trained"] for r in kept)
    summary = {
        **provenance, "eaglebook_version": __version__, "settings": run_settings,
        "rows": len(rows), "kept": len(kept), "skipped": skipped, "resumed_rows": resumed,
        "train_rows": len(ds["train"]), "holdout_rows": len(ds["holdout"]),
        "holdout_ids": list(ds["holdout"]["id"]) if len(ds["holdout"]) else [],
        "tokens": n_tok, "trained_tokens": n_train, "trained_fraction": n_train / max(n_tok, 1),
        "finished_answers": sum(r["finished"] for r in kept),
        **{f"this_run_{k}": v for k, v in stats.items()}, "this_run_seconds": round(seconds, 2),
        "tokens_per_second": stats["generated_tokens"] / seconds if stats["generated_tokens"] and seconds > 0 else None,
    }
    (out_dir / DATASET_META).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return ds, summary


def load_regenerated(out_dir: str | os.PathLike, expect: dict | None = None) -> tuple[DatasetDict, dict]:
    """A regenerated dataset and its provenance; `expect` ({"template_hash": ..., ...}) names
    any field that does not match what the dataset was made with."""
    out_dir = Path(out_dir)
    meta_path = out_dir / DATASET_META
    if not meta_path.is_file():
        raise RegenerationError(f"{out_dir} holds no finished regeneration run (no {DATASET_META})")
    meta = json.loads(meta_path.read_text())
    bad = {k: (meta.get(k), v) for k, v in (expect or {}).items() if meta.get(k) != v}
    if bad:
        raise RegenerationError("dataset provenance mismatch: " + ", ".join(
            f"{k} is {a!r} in the dataset, {b!r} here" for k, (a, b) in bad.items()))
    return load_from_disk(str(out_dir / "dataset")), meta


# --------------------------------------------------------------------------------------
# Command line: eaglebook regenerate
# --------------------------------------------------------------------------------------

@dataclass
class RegenerateArgs:
    """Regenerate chat answers with the target (resumable: rerun the same command to continue)."""

    out: str = field(metadata={"help": "output folder (chunks, dataset, eaglebook-dataset.json)"})
    target: str = field(default="smollm2-135m", metadata={"help": "embedded name, local path or hub id"})
    data: str = field(default="sharegpt", metadata={"help": "'sharegpt' or a .json/.jsonl conversation file"})
    limit: int = field(default=64, metadata={"help": "conversations read from the data (before filtering)"})
    mode: str = field(default="last", metadata={"help": "last | all"})
    max_new_tokens: int = 256
    max_length: int = 2048
    batch_size: int = 8
    chunk_rows: int = 8
    holdout: float = 0.05
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16"})
    backend: str = field(default="local", metadata={"help": "local | sglang | openai"})
    url: str = field(default="", metadata={"help": "server base URL for sglang/openai backends"})
    concurrency: int = 32


def pick_rows(conversations: Dataset, tokenizer, n: int, max_prompt_tokens: int, mode: str = "last") -> Dataset:
    """The first `n` conversations whose prompts fit in `max_prompt_tokens` (for "last": the
    prompt of the final answer; for "all": the first prompt)."""
    keep = []
    for i, row in enumerate(conversations):
        t = _targets(row["messages"], mode)[0 if mode == "all" else -1]
        if len(data.render_prompt(tokenizer, row["messages"][:t])) <= max_prompt_tokens:
            keep.append(i)
            if len(keep) == n:
                break
    return conversations.select(keep)


def prepare_conversations(source: str = "sharegpt", limit: int | None = None):
    """Normalized conversations with benchmark prompts removed, and the report of what was dropped."""
    if source == "sharegpt":
        ds, rep = data.load_sharegpt(limit=limit)
    else:
        ds, rep = data.load_conversations(source, limit=limit)
    return data.drop_benchmark_prompts(ds, rep)


def _cli(args: RegenerateArgs) -> int:
    from .target import load_target, target_info

    conv, rep = prepare_conversations(args.data, args.limit)
    print(rep.table())
    if args.backend == "local":
        model, tok = load_target(args.target, dtype=args.dtype)
        backend = LocalBackend(model, tok, batch_size=args.batch_size)
        prov = target_info(model, tok)
    else:
        from transformers import AutoTokenizer
        from .target import resolve_target, template_hash
        tok = AutoTokenizer.from_pretrained(resolve_target(args.target))
        backend = ServerBackend(args.url, tok, api=args.backend, concurrency=args.concurrency)
        prov = {"target": args.target, "template_hash": template_hash(tok)}  # weights are the server's
    s = RegenSettings(mode=args.mode, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                      chunk_rows=args.chunk_rows, holdout=args.holdout)
    _, summary = regenerate(conv, backend, tok, args.out, s, prov)
    tps = summary["tokens_per_second"]
    print(f"{summary['kept']} rows ({summary['train_rows']} train, {summary['holdout_rows']} holdout), "
          f"trained fraction {summary['trained_fraction']:.3f}, "
          f"{'%.1f tok/s' % tps if tps else 'nothing generated this run'} -> {args.out}")
    return 0


from .cli import register  # noqa: E402

register("regenerate", RegenerateArgs, _cli)
