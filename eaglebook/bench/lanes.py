"""The in-process backend: lanes on eaglebook's decode engine (baseline, EAGLE settings, the merged
drafter) and its peers on transformers' own `generate()` (greedy, prompt lookup)."""
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


def make_inprocess_lanes(target, tokenizer, draft, settings: list[DraftSetting], peers: bool = False,
                         prompt_lookup: tuple[int, ...] = (3, 10), ngram: int = 0, temperature: float = 0.0,
                         top_p: float = 1.0, seed: int = 0) -> list[Lane]:
    """The lanes of one in-process run, all on the same target, dtype and threads:

    - "baseline": eaglebook's plain one-token-per-forward decoding (the one baseline);
    - "eagle": one lane per draft setting; with `ngram` > 0 also the merged drafter on the
      first setting (prompt-lookup candidates inside the EAGLE tree, same num_draft_tokens);
    - with `peers`: "generate", transformers' own `generate()`, and "prompt_lookup", its
      prompt-lookup decoding, one lane per `prompt_lookup_num_tokens` value.

    The baseline and EAGLE share the target forward function, cache class and attention, so
    their speedup compares like with like; the peers run transformers' own loop, which is
    the point: they are what a user would otherwise run. verify_ct = target forwards after
    the prefill; accept_length = generated tokens / that, as everywhere. With `temperature`
    > 0 every lane samples (softmax(logits / T), then top-p); request i uses seed `seed + i`.
    """
    from .. import decode
    from ..target import end_of_turn_ids

    eos = end_of_turn_ids(tokenizer, getattr(target, "generation_config", None))
    common = {"target": getattr(target, "name_or_path", None), "dtype": str(next(target.parameters()).dtype),
              "device": str(next(target.parameters()).device), "engine": "eaglebook.decode"}
    calls = [seed]

    def sampling() -> dict:
        calls[0] += 1
        return {"temperature": temperature, "top_p": top_p, "seed": calls[0] - 1}

    def base_fn(ids, n):
        r = decode.baseline_decode(target, ids, n, eos, tokenizer=tokenizer, **sampling())
        return {"completion_tokens": len(r.token_ids), "latency_s": r.seconds, "verify_ct": None,
                "finish_reason": _FINISH.get(r.stop_reason, r.stop_reason), "text": r.text,
                "output_ids": list(r.token_ids), "margins": r.margins}

    lanes = [Lane("baseline", InProcessClient("in-process baseline", base_fn, {**common, "mode": "baseline"}),
                  temperature=temperature)]
    specs = [decode.SpecConfig(s.num_steps, s.topk, s.num_draft_tokens) for s in settings]
    if ngram and settings:  # the merged drafter, on the main (first) setting
        s = settings[0]
        specs.append(decode.SpecConfig(s.num_steps, s.topk, s.num_draft_tokens, ngram_tokens=ngram))
    for spec in specs:
        dec = decode.EagleDecoder(target, draft, spec, eos_ids=eos, tokenizer=tokenizer)

        def eagle_fn(ids, n, dec=dec):
            r = dec.generate(ids, n, **sampling())
            return {"completion_tokens": len(r.token_ids), "latency_s": r.seconds,
                    "verify_ct": max(1, r.num_verify_steps), "finish_reason": _FINISH.get(r.stop_reason, r.stop_reason),
                    "text": r.text, "output_ids": list(r.token_ids),
                    "timing": {**{k: round(v, 3) for k, v in r.timing().items()}, "prefill_ms": round(r.prefill_ms, 3)}}

        cfg = getattr(draft, "config", None)
        info = {**common, "mode": "eagle", **asdict(spec), "draft_vocab": getattr(cfg, "draft_vocab_size", None),
                "aux_layers": list(getattr(cfg, "aux_layers", None) or [])}
        lanes.append(Lane("eagle", InProcessClient(f"in-process EAGLE {spec.label}", eagle_fn, info), spec.label,
                          temperature))
    if peers:
        for k in [None, *prompt_lookup]:
            fn = transformers_generate_fn(target, tokenizer, eos, k, temperature, top_p, sampling)
            mode, label = ("generate", "") if k is None else ("prompt_lookup", f"pld{k}")
            info = {**common, "engine": "transformers generate()", "mode": mode, "prompt_lookup_num_tokens": k}
            lanes.append(Lane(mode, InProcessClient(f"transformers {mode} {label}".strip(), fn, info), label,
                              temperature))
    return lanes


def transformers_generate_fn(target, tokenizer, eos: list[int], prompt_lookup: int | None, temperature: float,
                             top_p: float, sampling):
    """`generate(ids, n) -> dict` on transformers' own `model.generate()`: greedy or sampled, and
    with `prompt_lookup` its prompt-lookup decoding (n-gram drafts from the context, checked by
    one target forward per draft). Stops where eaglebook's lanes stop (the same end-of-turn
    ids, the stopping token kept, `max_new_tokens`); target forwards are counted by a hook."""
    import torch
    from transformers import GenerationConfig

    forwards = [0]

    def count(module, args, kwargs, out):
        forwards[0] += 1

    def fn(ids, n):
        s = sampling()
        cfg = GenerationConfig(max_new_tokens=n, eos_token_id=list(eos), pad_token_id=eos[0],
                               do_sample=temperature > 0, prompt_lookup_num_tokens=prompt_lookup)
        if temperature > 0:
            cfg.temperature, cfg.top_p, cfg.top_k = temperature, top_p, 0
            torch.manual_seed(s["seed"])
        x = torch.tensor([ids], device=next(target.parameters()).device)
        forwards[0] = 0
        handle = target.register_forward_hook(count, with_kwargs=True)
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = target.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
            secs = time.perf_counter() - t0
        finally:
            handle.remove()
        new = out[0, len(ids):].tolist()
        stop = "stop" if new and new[-1] in eos else "length"
        return {"completion_tokens": len(new), "latency_s": secs,
                "verify_ct": max(1, forwards[0] - 1) if prompt_lookup else None, "finish_reason": stop,
                "text": tokenizer.decode(new, skip_special_tokens=True), "output_ids": new}

    return fn


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
