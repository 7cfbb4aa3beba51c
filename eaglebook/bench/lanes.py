"""The in-process backend: lanes on eaglebook's decode engine (baseline and EAGLE settings)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

from .clients import InProcessClient
from .core import DraftSetting
from .protocol import Lane


# --------------------------------------------------------------------------------------
# The in-process backend on eaglebook's decode engine
# --------------------------------------------------------------------------------------

_FINISH = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length"}


def make_inprocess_lanes(target, tokenizer, draft, settings: list[DraftSetting]) -> list[Lane]:
    """The plain greedy baseline and one EAGLE lane per draft setting, on `eaglebook.decode`.

    Both go through the same target forward function, cache class, attention and dtype, so
    the speedup compares like with like. verify_ct = verification steps of the
    engine; accept_length = generated tokens / that, as everywhere.
    """
    from .. import decode
    from ..target import end_of_turn_ids

    eos = end_of_turn_ids(tokenizer, getattr(target, "generation_config", None))
    common = {"target": getattr(target, "name_or_path", None), "dtype": str(next(target.parameters()).dtype),
              "device": str(next(target.parameters()).device), "engine": "eaglebook.decode"}

    def base_fn(ids, n):
        r = decode.baseline_decode(target, ids, n, eos, tokenizer=tokenizer)
        return {"completion_tokens": len(r.token_ids), "latency_s": r.seconds, "verify_ct": None,
                "finish_reason": _FINISH.get(r.stop_reason, r.stop_reason), "text": r.text,
                "output_ids": list(r.token_ids)}

    lanes = [Lane("baseline", InProcessClient("in-process baseline", base_fn, {**common, "mode": "baseline"}))]
    for s in settings:
        dec = decode.EagleDecoder(target, draft, decode.SpecConfig(s.num_steps, s.topk, s.num_draft_tokens),
                                  eos_ids=eos, tokenizer=tokenizer)

        def eagle_fn(ids, n, dec=dec):
            r = dec.generate(ids, n)
            return {"completion_tokens": len(r.token_ids), "latency_s": r.seconds,
                    "verify_ct": max(1, r.num_verify_steps), "finish_reason": _FINISH.get(r.stop_reason, r.stop_reason),
                    "text": r.text, "output_ids": list(r.token_ids)}

        info = {**common, "mode": "eagle", **asdict(s)}
        lanes.append(Lane("eagle", InProcessClient(f"in-process EAGLE {s.label}", eagle_fn, info), s.label))
    return lanes


class _Threaded:
    """Serves `concurrency` > 1 in-process: requests arrive together and queue for the engine.

    The reference engine decodes one sequence at a time and hooks the shared target, so
    requests take turns (one lock per target). Latency is measured from arrival, queueing
    included, as a server measures it: per-request tok/s falls with concurrency while the
    aggregate stays flat. That is what a batch-1 engine gives N users; a batching server
    (SGLang) is where the real crossover shows.
    """

    def __init__(self, inner: InProcessClient, lock):
        self.inner, self.name, self.server, self.lock = inner, inner.name, None, lock

    async def generate(self, ids, n):
        t0 = time.perf_counter()

        def work():
            with self.lock:
                return self.inner._gen(list(ids), int(n))
        out = await asyncio.to_thread(work)
        out["latency_s"] = time.perf_counter() - t0
        return out

    async def server_info(self):
        return await self.inner.server_info()


def resolve_draft(spec: str, target, tokenizer=None):
    """The draft head for the in-process engine: a path or shipped name, else the default head
 when it ships, else an untrained head (accept_length ~1; says so)."""
    from .. import decode

    if spec:
        return decode.load_head(target, spec)
    for name in ("smollm2-135m-eagle3",):
        try:
            return decode.load_head(target, name)
        except Exception:  # not shipped yet in this checkout
            pass
    print("No draft head given and no default head found: using an UNTRAINED head "
          "(output unchanged, accept_length near 1, so no speedup). Pass --draft PATH.")
    return decode.load_head(target, None)
