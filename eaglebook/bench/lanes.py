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
                         top_p: float = 1.0, seed: int = 0, ngram_max: int = 3) -> list[Lane]:
    """The lanes of one in-process run, all on the same target, dtype and threads:

    - "baseline": eaglebook's plain one-token-per-forward decoding (the one baseline);
    - "eagle": one lane per draft setting; with `ngram` > 0 also the merged drafter on the
      first setting (prompt-lookup candidates inside the EAGLE tree, same num_draft_tokens);
    - with `peers`: "generate", transformers' own `generate()`, and "prompt_lookup", its
      prompt-lookup decoding, one lane per `prompt_lookup_num_tokens` value.

    Both prompt lookups match context suffixes of up to `ngram_max` tokens (the merged
    drafter's `ngram_max`, transformers' `max_matching_ngram_size`), recorded in the lanes'
    info and in the prompt-lookup label (`pld10-m3`); the merged drafter needs a match of at
    least `SpecConfig.ngram_min` (2) tokens, transformers' takes a single one.

    The baseline and EAGLE share the target forward function, cache class and attention, so
    their speedup compares like with like; the peers run transformers' own loop, which is
    the point: they are what a user would otherwise run. verify_ct = target forwards that
    verify drafts; accept_length = generated tokens / that, as everywhere. With `temperature`
    > 0 every lane samples (softmax(logits / T), then top-p) with the seed the protocol
    derives per request (`Lane.request_seed`: run seed, prompt, turn, lane).
    """
    from .. import decode
    from ..target import end_of_turn_ids

    eos = end_of_turn_ids(tokenizer, getattr(target, "generation_config", None))
    common = {"target": getattr(target, "name_or_path", None), "dtype": str(next(target.parameters()).dtype),
              "device": str(next(target.parameters()).device), "engine": "eaglebook.decode"}

    def sampling(seed: int | None) -> dict:
        return {"temperature": temperature, "top_p": top_p, "seed": seed}

    def base_fn(ids, n, seed=None):
        r = decode.baseline_decode(target, ids, n, eos, tokenizer=tokenizer, **sampling(seed))
        return {"completion_tokens": len(r.token_ids), "latency_s": r.seconds, "verify_ct": None,
                "finish_reason": _FINISH.get(r.stop_reason, r.stop_reason), "text": r.text,
                "output_ids": list(r.token_ids), "margins": r.margins}

    lanes = [Lane("baseline", InProcessClient("in-process baseline", base_fn, {**common, "mode": "baseline"}),
                  temperature=temperature, seed=seed)]
    specs = [decode.SpecConfig(s.num_steps, s.topk, s.num_draft_tokens) for s in settings]
    if ngram and settings:  # the merged drafter, on the main (first) setting
        s = settings[0]
        specs.append(decode.SpecConfig(s.num_steps, s.topk, s.num_draft_tokens, ngram_tokens=ngram,
                                       ngram_max=ngram_max))
    for spec in specs:
        dec = decode.EagleDecoder(target, draft, spec, eos_ids=eos, tokenizer=tokenizer)

        def eagle_fn(ids, n, seed=None, dec=dec):
            r = dec.generate(ids, n, **sampling(seed))
            return {"completion_tokens": len(r.token_ids), "latency_s": r.seconds,
                    "verify_ct": max(1, r.num_verify_steps), "finish_reason": _FINISH.get(r.stop_reason, r.stop_reason),
                    "text": r.text, "output_ids": list(r.token_ids),
                    "timing": {**{k: round(v, 3) for k, v in r.timing().items()}, "prefill_ms": round(r.prefill_ms, 3)}}

        cfg = getattr(draft, "config", None)
        info = {**common, "mode": "eagle", **asdict(spec), "draft_vocab": getattr(cfg, "draft_vocab_size", None),
                "aux_layers": list(getattr(cfg, "aux_layers", None) or [])}
        lanes.append(Lane("eagle", InProcessClient(f"in-process EAGLE {spec.label}", eagle_fn, info), spec.label,
                          temperature, seed))
    if peers:
        for k in [None, *prompt_lookup]:
            fn, pinned = transformers_generate_fn(target, tokenizer, eos, k, temperature, top_p, ngram_max)
            mode, label = ("generate", "") if k is None else ("prompt_lookup", prompt_lookup_label(k, ngram_max))
            info = {**common, "engine": "transformers generate()", "mode": mode, "prompt_lookup_num_tokens": k,
                    "generation_config": pinned}
            lanes.append(Lane(mode, InProcessClient(f"transformers {mode} {label}".strip(), fn, info), label,
                              temperature, seed))
    return lanes


def prompt_lookup_label(num_tokens: int, ngram_max: int) -> str:
    """A prompt-lookup lane's config: `pld10-m3` = up to 10 tokens after a matched suffix of up to 3."""
    return f"pld{num_tokens}-m{ngram_max}"


def neutral_generation_config(max_new_tokens: int, eos: list[int], temperature: float, top_p: float,
                              prompt_lookup: int | None = None, ngram_max: int = 3):
    """A `GenerationConfig` that samples the target's own distribution (softmax(logits / T), then
    top-p, as eaglebook's lanes do), or decodes greedily at T = 0, and nothing else.

    Every field that shapes the distribution is set to its neutral value, because
    `generate()` fills the fields a config leaves unset from `target.generation_config`,
    which a hub target's `generation_config.json` fills with its own advice (Llama-3.1's:
    sampling at temperature 0.6, top-p 0.9); the fields whose neutral value is "unset"
    (min_p, bad_words_ids, ...) are kept out by `transformers_generate_fn`, which runs
    `generate()` with a neutral `target.generation_config`. `min_new_tokens=0` overrides any
    `min_length` (setting both makes transformers warn on every call).
    """
    from transformers import GenerationConfig

    # sampling only (transformers applies these "warpers" only when it samples): T, then top-p
    warpers = dict(temperature=temperature, top_k=0, top_p=top_p, typical_p=1.0, epsilon_cutoff=0.0,
                   eta_cutoff=0.0) if temperature > 0 else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=list(eos), pad_token_id=eos[0],
        do_sample=temperature > 0, num_beams=1, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, renormalize_logits=False, prompt_lookup_num_tokens=prompt_lookup,
        max_matching_ngram_size=ngram_max if prompt_lookup else None, **warpers)


def transformers_generate_fn(target, tokenizer, eos: list[int], prompt_lookup: int | None, temperature: float,
                             top_p: float, ngram_max: int = 3):
    """(`generate(ids, n, seed) -> dict`, the pinned sampling fields) on transformers' own
    `model.generate()`: greedy or sampled, and with `prompt_lookup` its prompt-lookup decoding
    (up to `prompt_lookup` tokens that followed the context's last n-gram, n <= `ngram_max`,
    checked by one target forward). Stops where eaglebook's lanes stop (the same end-of-turn
    ids, the stopping token kept, `max_new_tokens`); target forwards are counted by a hook.

    transformers' assisted loop has no separate prefill: its first forward takes the prompt
    and the first draft together and verifies that draft, and every later forward verifies
    one. So verify_ct = all forwards, each yielding the tokens it accepted plus one of its own.
    """
    import torch
    from transformers import GenerationConfig

    forwards = [0]
    pinned = {k: v for k, v in neutral_generation_config(1, eos, temperature, top_p, prompt_lookup, ngram_max)
              .to_diff_dict().items() if k not in ("max_new_tokens", "eos_token_id", "pad_token_id", "transformers_version")}
    pinned["target_generation_config"] = "ignored (a neutral one stands in while generate() runs)"

    def count(module, args, kwargs, out):
        forwards[0] += 1

    def fn(ids, n, seed=None):
        cfg = neutral_generation_config(n, eos, temperature, top_p, prompt_lookup, ngram_max)
        if temperature > 0:
            torch.manual_seed(seed if seed is not None else 0)
        x = torch.tensor([ids], device=next(target.parameters()).device)
        forwards[0] = 0
        handle = target.register_forward_hook(count, with_kwargs=True)
        own = target.generation_config
        target.generation_config = GenerationConfig()  # nothing of the hub's advice fills our unset fields
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = target.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
            secs = time.perf_counter() - t0
        finally:
            target.generation_config = own
            handle.remove()
        new = out[0, len(ids):].tolist()
        stop = "stop" if new and new[-1] in eos else "length"
        return {"completion_tokens": len(new), "latency_s": secs,
                "verify_ct": max(1, forwards[0]) if prompt_lookup else None, "finish_reason": stop,
                "text": tokenizer.decode(new, skip_special_tokens=True), "output_ids": new}

    return fn, pinned


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

    async def generate(self, ids, n, seed=None):
        t0 = time.perf_counter()

        def work():
            with self.lock:
                return self.inner._gen(list(ids), int(n), seed)
        out = await asyncio.to_thread(work)
        out["latency_s"] = time.perf_counter() - t0
        return out

    async def server_info(self):
        return await self.inner.server_info()


def inprocess_identity(target, draft) -> dict:
    """What an in-process run measured, as a results file records it (a resumed run must find
    the same): the target's weights fingerprint and a hash of every weight of the head (a head
    retrained into the same folder is another head)."""
    from ..target import weights_fingerprint

    return {"target_fingerprint": weights_fingerprint(target),
            "draft_fingerprint": weights_fingerprint(draft, sample=1 << 62)}  # every value, not a sample


def resolve_draft(spec: str, target, tokenizer=None):
    """The draft head for the in-process engine: a path or shipped name, else the default head
    when it ships, else an untrained head (accept_length ~1; says so), initialized from a fixed
    seed so that runs with it measure the same head."""
    import torch

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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return decode.load_head(target, None)
