"""The measuring protocol: lanes, warm-up, prompts interleaved across lanes (order alternated per
prompt), concurrency phases, and a recorder that keeps partial results on disk."""
from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass

from .core import BenchError, Generation, ServerError, _wall_key, hardware_info, looped, save_results
from .suites import Prompt, render_ids
from .tables import (concurrency_table, head_to_head, head_to_heads, lanes_table, suite_name, summarize,
                     sweep_table, temperature_table)


# --------------------------------------------------------------------------------------
# Running prompts through clients: warm-up, interleaving, concurrency, partial results
# --------------------------------------------------------------------------------------

@dataclass
class Lane:
    """One thing being measured: a mode, a draft-setting label, and the client that serves it."""

    mode: str
    client: object
    config: str = ""
    temperature: float = 0.0
    seed: int = 0  # sampling: the run's seed, from which each request's own is derived

    def request_seed(self, prompt_id: str, turn: int) -> int:
        """The seed of one sampled request: a hash of (run seed, prompt id, turn, lane), so a
        request draws the same samples whatever ran before it (other lanes, the warm-up, the
        prompts a resumed run skips)."""
        import hashlib

        key = f"{self.seed}|{prompt_id}|{turn}|{self.mode} {self.config}|{self.temperature}"
        return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


class Recorder:
    """Collects every finished request and (re)writes the result files as it goes.

    If a run dies, what finished is already on disk, with `complete: false` and the error.
    """

    # Arguments that may differ between a run and its resumption (where files go, the warm-up),
    # and what a backend records from the arguments once the run has started (SGLang's command lines).
    RESUME_FREE = ("json", "log_dir", "warmup", "resume", "sglang_commands")
    # What was measured, beyond the arguments: a head retrained into the same folder, another
    # target under the same name or another eaglebook gives other numbers.
    IDENTITY = {"draft_fingerprint": "draft head weights", "target_fingerprint": "target weights",
                "eaglebook_version": "eaglebook version"}

    def __init__(self, config: dict, json_path: str | os.PathLike | None = None, save_every: int = 1,
                 resume: bool = False, restart_stale: bool = False):
        self.config, self.json_path, self.save_every = config, json_path, save_every
        self.gens: list[Generation] = []
        self.walls: dict[str, float] = defaultdict(float)
        self.server_info: dict[str, dict] = {}
        self.error: str | None = None
        self.hardware = hardware_info()
        self.t0 = time.time()
        if resume:
            self._resume(restart_stale)

    def _resume(self, restart_stale: bool = False) -> None:
        """Take the concurrency-1 requests of the results file back (same arguments, the same
        target and head weights, eaglebook version and prompts only), so `run_interleaved`
        generates only the prompts some lane has not finished. With `restart_stale`, a file that
        measured other weights or another version is measured again from the start instead."""
        import json
        from pathlib import Path

        if not self.json_path or not Path(self.json_path).is_file():
            return
        try:
            old = json.loads(Path(self.json_path).read_text())
        except json.JSONDecodeError as exc:
            raise BenchError(f"cannot resume from {self.json_path}: not valid JSON ({exc}); delete it to start over")
        before = {k: v for k, v in old.get("config", {}).items() if k not in self.RESUME_FREE}
        now = {k: v for k, v in self.config.items() if k not in self.RESUME_FREE}
        stale = [f"{what} {before.get(k) or 'not recorded'}, now {now.get(k)}" for k, what in self.IDENTITY.items()
                 if k in now and before.get(k) != now.get(k)]
        if stale:
            if restart_stale:
                print(f"{self.json_path} measured something else ({'; '.join(stale)}): measuring again from the start")
                return
            raise BenchError(f"cannot resume from {self.json_path}: it measured something else ({'; '.join(stale)}); "
                             "pass another --json or delete it to start over")
        if before.get("prompts_sha256") != now.get("prompts_sha256"):
            raise BenchError(f"cannot resume from {self.json_path}: it measured {suite_name(before)}, this run gives "
                             f"{suite_name(now)}: another file, or the same one changed; pass another --json or "
                             "delete it to start over")
        diff = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if diff:
            raise BenchError(f"cannot resume from {self.json_path}: it was run with other arguments ({', '.join(diff)}); "
                             "pass another --json or delete it to start over")
        self.gens = [Generation.from_row(r) for r in old.get("requests", []) if r.get("concurrency", 1) == 1]
        for g in self.gens:
            self.walls[_wall_key(g.mode, g.config, 1)] += g.latency_s
        if self.gens:
            print(f"resuming {self.json_path}: {len(self.gens)} requests already measured")

    def finished(self, lanes: list["Lane"], prompt_id: str, turns: int) -> bool:
        """Every lane has every turn of this prompt (a resumed run skips it)."""
        have = {(g.mode, g.config, g.temperature, g.turn) for g in self.gens if g.prompt_id == prompt_id
                and g.concurrency == 1}
        return all((ln.mode, ln.config, ln.temperature, t) in have for ln in lanes for t in range(turns))

    def drop(self, lanes: list["Lane"], prompt_id: str) -> None:
        """Forget this prompt's requests on these lanes (a prompt half done when a run stopped)."""
        keys = {(ln.mode, ln.config, ln.temperature) for ln in lanes}
        keep = []
        for g in self.gens:
            if g.prompt_id == prompt_id and g.concurrency == 1 and (g.mode, g.config, g.temperature) in keys:
                self.walls[_wall_key(g.mode, g.config, 1)] -= g.latency_s
            else:
                keep.append(g)
        self.gens = keep

    def add(self, g: Generation) -> None:
        self.gens.append(g)
        if self.json_path and len(self.gens) % self.save_every == 0:
            self.save()

    def result(self) -> dict:
        eagle_cfgs = sorted({g.config for g in self.gens if g.mode == "eagle"})
        main = self.config.get("main_config") if self.config.get("main_config") in eagle_cfgs else None
        main = main or (eagle_cfgs[0] if eagle_cfgs else None)
        return {
            "complete": self.error is None, "error": self.error,
            "config": self.config, "hardware": self.hardware, "server_info": self.server_info,
            "seconds": round(time.time() - self.t0, 1),
            "summary": summarize(self.gens, config=main, walls=self.walls),
            "settings": sweep_table(self.gens) if len(eagle_cfgs) > 1 else [],
            "concurrency": concurrency_table(self.gens, self.walls),
            "lanes": lanes_table(self.gens),
            "head_to_head": head_to_head(self.gens),  # prompt lookup vs EAGLE alone
            "head_to_heads": head_to_heads(self.gens),  # and the merged drafter vs each, labelled
            "temperatures": temperature_table(self.gens) if len({g.temperature for g in self.gens}) > 1 else [],
            "requests": [g.row() for g in self.gens],
        }

    def save(self) -> dict:
        res = self.result()
        if self.json_path:
            save_results(res, self.json_path)
        return res


def _turns_of(p: Prompt, turns: int) -> int:
    return min(len(p.turns), max(1, turns))


def _build_ids(tokenizer, p: Prompt, turn: int, answers: dict) -> list[int]:
    """The ids of turn `turn`; later turns carry the model's own earlier answers, as ids."""
    prev = answers.get(p.id, [])
    msgs = p.messages(turn, [g.text for g in prev])
    from ..target import end_of_turn_ids

    eot = set(end_of_turn_ids(tokenizer))
    answer_ids = {}
    offset = 1 if p.system else 0
    for i, g in enumerate(prev[:turn]):
        # An answer cut off by max_new_tokens has no end-of-turn of its own: it goes in as
        # text and the template closes the turn, as a server would render it.
        if g.output_ids and g.output_ids[-1] in eot:
            answer_ids[offset + 2 * i + 1] = g.output_ids
    return render_ids(tokenizer, msgs, answer_ids or None)


async def _one(lane: Lane, p: Prompt, turn: int, ids: list[int], max_new_tokens: int, concurrency: int,
               where: str) -> Generation:
    # Only in-process lanes sample (the command refuses sampling elsewhere): they take a seed.
    kw = {"seed": lane.request_seed(p.id, turn)} if lane.temperature > 0 else {}
    try:
        out = await lane.client.generate(ids, max_new_tokens, **kw)
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise
    except Exception as exc:
        raise _explain(lane, exc, where) from exc
    return Generation(prompt_id=p.id, category=p.category, turn=turn, mode=lane.mode,
                      prompt_tokens=int(out.get("prompt_tokens") or len(ids)),
                      completion_tokens=int(out["completion_tokens"]), latency_s=float(out["latency_s"]),
                      ttft_s=out.get("ttft_s"), verify_ct=out.get("verify_ct"), finish_reason=out.get("finish_reason"),
                      concurrency=concurrency, config=lane.config, text=out.get("text", ""),
                      output_ids=out.get("output_ids"), temperature=lane.temperature, margins=out.get("margins"),
                      looped=looped(out["output_ids"]) if out.get("output_ids") is not None else None,
                      timing=out.get("timing"))


def mark_identity(ref: Generation, gens: list[Generation], tol: float = 1e-4) -> None:
    """Greedy only: is each output the reference's (the baseline's), token for token? Where not,
    record the first divergence and the baseline's top-2 margin there (a tie below `tol` is
    float rounding, not a bug; see `decode.check_lossless`)."""
    from types import SimpleNamespace

    from ..decode import check_lossless

    if ref.temperature or ref.output_ids is None:
        return
    base = SimpleNamespace(token_ids=ref.output_ids, margins=ref.margins or [])
    for g in gens:
        if g is ref or g.output_ids is None:
            continue
        v = check_lossless(base, g.output_ids, tol)
        g.identical, g.first_divergence, g.margin = v["identical"], v["first_divergence"], v["margin"]


def _explain(lane: Lane, exc: BaseException, where: str) -> BenchError:
    """Turn a failed request into an error that says which server, which prompt, and why."""
    name = getattr(lane.client, "name", lane.mode)
    srv = getattr(lane.client, "server", None)
    msg = f"{name} failed at {where}: {type(exc).__name__}: {exc}"
    if srv is not None:
        code = srv.poll()
        timed_out = type(exc).__name__ in ("ReadTimeout", "WriteTimeout", "ConnectTimeout", "PoolTimeout")
        if code is None and srv.proc is not None and not timed_out:
            # A dropped connection is often a server on its way down: give it a moment to say so.
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = srv.proc.wait(timeout=3)
        if code is not None:
            msg = f"{name} died (exit code {code}) at {where}.\n{srv.log_tail()}"
    try:
        import httpx
        if isinstance(exc, httpx.TimeoutException):
            msg = f"{name} did not answer within {getattr(lane.client, 'timeout', '?')} s at {where} (request timed out)"
    except ImportError:
        pass
    return ServerError(msg)


async def warm_up(lanes: list[Lane], prompts: list[Prompt], tokenizer, n: int, max_new_tokens: int = 32) -> None:
    """Run `n` short requests per lane first, so no lane pays for first-call costs in the numbers."""
    for p in prompts[:n]:
        ids = render_ids(tokenizer, p.messages(0))
        for lane in lanes:
            await _one(lane, p, 0, ids, min(max_new_tokens, 32), 1, f"warm-up prompt {p.id}")


async def run_interleaved(lanes: list[Lane], prompts: list[Prompt], tokenizer, rec: Recorder, max_new_tokens: int,
                          turns: int = 1, progress: bool = True) -> None:
    """Concurrency 1: for each prompt (and turn), every lane in turn, the order alternating per
    prompt, so slow drift of the machine (thermal, other load) hits all lanes alike."""
    from tqdm.auto import tqdm

    answers: dict[str, list[Generation]] = defaultdict(list)
    ref = next((ln for ln in lanes if ln.mode == "baseline"), lanes[0])  # whose answers later turns build on
    for i, p in enumerate(tqdm(prompts, desc="prompts", disable=not progress, mininterval=1.0)):
        if rec.finished(lanes, p.id, _turns_of(p, turns)):
            continue  # measured before this run was resumed
        rec.drop(lanes, p.id)
        for t in range(_turns_of(p, turns)):
            ids = _build_ids(tokenizer, p, t, answers)
            order = lanes if i % 2 == 0 else lanes[::-1]
            done = {}
            for lane in order:
                g = await _one(lane, p, t, ids, max_new_tokens, 1,
                               f"prompt {p.id} turn {t + 1} ({i + 1}/{len(prompts)})")
                done[id(lane)] = g
                rec.walls[_wall_key(lane.mode, lane.config, 1)] += g.latency_s
                if lane is ref:
                    answers[p.id].append(g)
            mark_identity(done[id(ref)], list(done.values()))
            for lane in lanes:  # recorded in lane order, once every lane has answered
                rec.add(done[id(lane)])


async def run_phase(lane: Lane, prompts: list[Prompt], tokenizer, rec: Recorder, max_new_tokens: int,
                    turns: int = 1, concurrency: int = 1, answers: dict | None = None, progress: bool = True) -> dict:
    """All prompts through one lane with up to `concurrency` requests in flight.

    Later turns build on `answers` (the baseline's, when given) else on this lane's own.
    Returns this lane's answers. Wall time per phase goes to `rec.walls` (aggregate tok/s).
    """
    from tqdm.auto import tqdm

    own: dict[str, list[Generation]] = defaultdict(list)
    base = answers if answers is not None else own
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=sum(_turns_of(p, turns) for p in prompts), desc=f"{lane.mode} {lane.config} c={concurrency}",
               disable=not progress, mininterval=1.0)

    async def one(i, p, t):
        async with sem:
            ids = _build_ids(tokenizer, p, t, base)
            g = await _one(lane, p, t, ids, max_new_tokens, concurrency,
                           f"prompt {p.id} turn {t + 1} ({i + 1}/{len(prompts)}, concurrency {concurrency})")
            rec.add(g)
            own[p.id].append(g)
            bar.update(1)

    t0 = time.perf_counter()
    try:
        for t in range(max(_turns_of(p, turns) for p in prompts)):
            async with asyncio.TaskGroup() as tg:  # the first failure cancels the requests in flight
                for i, p in enumerate(prompts):
                    if t < _turns_of(p, turns):
                        tg.create_task(one(i, p, t))
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    finally:
        bar.close()
        rec.walls[_wall_key(lane.mode, lane.config, concurrency)] += time.perf_counter() - t0
    return own
