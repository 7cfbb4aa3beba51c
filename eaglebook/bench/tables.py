"""Tables over many requests: one mode's metrics, baseline vs EAGLE per category, a settings sweep,
a concurrency sweep, and the terminal summary."""
from __future__ import annotations

import statistics

from .core import MODES, Generation, _mean, _r, _wall_key


def summarize_mode(gens: list[Generation], wall_s: float | None = None) -> dict:
    """Throughput, latency and accept length of one mode's requests.

    aggregate tok/s = all output tokens / wall time of the phase (requests may overlap);
    at concurrency 1 that is all tokens / the sum of latencies. accept_length =
    sum(completion tokens) / sum(verification steps), token-weighted as SGLang's benchmarks do.
    """
    if not gens:
        return {"requests": 0}
    tokens = sum(g.completion_tokens for g in gens)
    busy = sum(g.latency_s for g in gens)
    wall = wall_s if wall_s else busy
    verify = [g.verify_ct for g in gens]
    acc = tokens / sum(verify) if all(v for v in verify) else None
    return {
        "requests": len(gens),
        "output_tokens": tokens,
        "tok_s": _r(tokens / wall if wall > 0 else None),
        "tok_s_per_request": _r(_mean([g.tok_s for g in gens])),
        "tpot_ms": _r(_mean([g.tpot_s * 1e3 if g.tpot_s is not None else None for g in gens])),
        "ttft_ms": _r(_mean([g.ttft_s * 1e3 if g.ttft_s is not None else None for g in gens])),
        "accept_length": _r(acc),
        "hit_max_new_tokens": sum(1 for g in gens if g.finish_reason == "length"),
    }


def _speedup(base: list[Generation], eagle: list[Generation]) -> float | None:
    if not base or not eagle:
        return None
    tb = sum(g.completion_tokens for g in base) / sum(g.latency_s for g in base)
    te = sum(g.completion_tokens for g in eagle) / sum(g.latency_s for g in eagle)
    return _r(te / tb) if tb > 0 else None

# --------------------------------------------------------------------------------------
# Tables over many requests: one run, a settings sweep, a concurrency sweep
# --------------------------------------------------------------------------------------

def summarize(gens: list[Generation], config: str | None = None, walls: dict | None = None,
              concurrency: int | None = None) -> dict:
    """Baseline vs EAGLE (one draft setting): per mode, speedup on the paired prompts, per category.

    speedup = EAGLE output tok/s / baseline output tok/s over the prompts both modes finished.
    """
    walls = walls or {}
    if concurrency is None:
        concurrency = min((g.concurrency for g in gens), default=1)
    t0 = min((g.temperature for g in gens), default=0.0)  # a temperature sweep: the first (lowest) is the main run
    gens = [g for g in gens if g.concurrency == concurrency and g.temperature == t0]
    if config is None:
        cfgs = sorted({g.config for g in gens if g.mode == "eagle"})
        config = cfgs[0] if cfgs else ""
    by_mode = {"baseline": [g for g in gens if g.mode == "baseline"],
               "eagle": [g for g in gens if g.mode == "eagle" and g.config == config]}
    both = {(g.prompt_id, g.turn) for g in by_mode["baseline"]} & {(g.prompt_id, g.turn) for g in by_mode["eagle"]}
    out = {"config": config, "concurrency": concurrency}
    for m in MODES:
        wall = walls.get(_wall_key(m, "" if m == "baseline" else config, concurrency)) if concurrency > 1 else None
        out[m] = summarize_mode(by_mode[m], wall)
    paired = {m: [g for g in by_mode[m] if (g.prompt_id, g.turn) in both] for m in MODES}
    out["speedup"] = _speedup(paired["baseline"], paired["eagle"])
    out["paired_requests"] = len(both)
    cats = []
    for cat in sorted({g.category for g in paired["eagle"]}):
        b = [g for g in paired["baseline"] if g.category == cat]
        e = [g for g in paired["eagle"] if g.category == cat]
        sb, se = summarize_mode(b), summarize_mode(e)
        cats.append({"category": cat, "requests": len(e), "baseline_tok_s": sb.get("tok_s"),
                     "eagle_tok_s": se.get("tok_s"), "speedup": _speedup(b, e),
                     "accept_length": se.get("accept_length")})
    out["per_category"] = cats
    return out


def parse_label(label: str) -> dict:
    """`s5-k4-n8` -> {num_steps: 5, topk: 4, num_draft_tokens: 8} (empty for other labels)."""
    try:
        s, k, n = label.split("-")
        return {"num_steps": int(s[1:]), "topk": int(k[1:]), "num_draft_tokens": int(n[1:])}
    except (ValueError, IndexError):
        return {}


def sweep_table(gens: list[Generation]) -> list[dict]:
    """One row per EAGLE draft setting: accept_length, tok/s and speedup vs the same run's baseline."""
    rows = []
    for cfg in sorted({g.config for g in gens if g.mode == "eagle"}):
        s = summarize(gens, config=cfg)
        rows.append({"config": cfg, **parse_label(cfg), "accept_length": s["eagle"].get("accept_length"),
                     "eagle_tok_s": s["eagle"].get("tok_s"), "baseline_tok_s": s["baseline"].get("tok_s"),
                     "speedup": s["speedup"], "requests": s["eagle"].get("requests")})
    return rows


def concurrency_table(gens: list[Generation], walls: dict | None = None) -> list[dict]:
    """One row per (concurrency, mode): per-request tok/s and aggregate tok/s."""
    walls = walls or {}
    rows = []
    for c in sorted({g.concurrency for g in gens}):
        for m in MODES:
            sel = [g for g in gens if g.concurrency == c and g.mode == m]
            for cfg in sorted({g.config for g in sel}):
                part = [g for g in sel if g.config == cfg]
                s = summarize_mode(part, walls.get(_wall_key(m, cfg, c)) if c > 1 else None)
                rows.append({"concurrency": c, "mode": m, "config": cfg, "requests": s["requests"],
                             "tok_s_per_request": s["tok_s_per_request"], "tok_s": s["tok_s"],
                             "accept_length": s["accept_length"]})
    return rows

def lane_key(g: Generation) -> str:
    """A lane's name in the tables: `eagle s5-k4-n16`, `prompt_lookup pld10`, `baseline`, `generate`."""
    return f"{g.mode} {g.config}".strip()


def lanes_table(gens: list[Generation], temperature: float | None = None) -> list[dict]:
    """One row per lane at concurrency 1 (one temperature): tok/s, speedup over the one baseline on
    the prompts both finished, accept length where known, identity with greedy and the baseline's
    top-2 margins at first divergences, and the same per category."""
    gens = [g for g in gens if g.concurrency == 1]
    if temperature is None:
        temperature = min((g.temperature for g in gens), default=0.0)
    gens = [g for g in gens if g.temperature == temperature]
    base = [g for g in gens if g.mode == "baseline"]
    keys = list(dict.fromkeys(lane_key(g) for g in gens))
    rows = []
    for key in keys:
        own = [g for g in gens if lane_key(g) == key]
        pairs = {(g.prompt_id, g.turn) for g in own} & {(g.prompt_id, g.turn) for g in base}
        b = [g for g in base if (g.prompt_id, g.turn) in pairs]
        e = [g for g in own if (g.prompt_id, g.turn) in pairs]
        m = summarize_mode(own)
        checked = [g for g in own if g.identical is not None]
        div = [g.margin for g in checked if not g.identical and g.margin is not None]
        cats = []
        for cat in sorted({g.category for g in e}):
            bc, ec = [g for g in b if g.category == cat], [g for g in e if g.category == cat]
            cats.append({"category": cat, "requests": len(ec), "tok_s": summarize_mode(ec).get("tok_s"),
                         "speedup": _speedup(bc, ec), "accept_length": summarize_mode(ec).get("accept_length")})
        rows.append({"lane": key, "mode": own[0].mode, "config": own[0].config, "temperature": temperature,
                     "requests": m["requests"], "tok_s": m["tok_s"], "speedup": _speedup(b, e),
                     "accept_length": m["accept_length"], "hit_max_new_tokens": m["hit_max_new_tokens"],
                     "identical": sum(bool(g.identical) for g in checked) if checked else None,
                     "checked": len(checked) if checked else None,
                     "lossless_ok": sum(bool(g.identical) or (g.margin is not None and g.margin < 1e-4)
                                        for g in checked) if checked else None,
                     "divergence_margin_median": _r(statistics.median(div)) if div else None,
                     "divergence_margin_min": _r(min(div), 6) if div else None,
                     "per_category": cats})
    return rows


def temperature_table(gens: list[Generation]) -> list[dict]:
    """Per temperature, per lane: speedup over that temperature's baseline and accept length
    (acceptance falls as sampling spreads the target's choices)."""
    rows = []
    for t in sorted({g.temperature for g in gens if g.concurrency == 1}):
        for r in lanes_table(gens, t):
            rows.append({k: r[k] for k in ("temperature", "lane", "requests", "tok_s", "speedup", "accept_length")})
    return rows


def lane_kind(mode: str, config: str = "") -> str:
    """What a lane is when lanes are compared: "eagle" (EAGLE's tree alone), "merged" (the merged
    drafter: prompt-lookup tokens inside EAGLE's tree, a config ending in `+ngN`), else its mode
    ("prompt_lookup", "generate", "baseline")."""
    if mode == "eagle" and "+ng" in (config or ""):
        return "merged"
    return mode


KIND_LABELS = {"eagle": "EAGLE", "merged": "merged drafter", "prompt_lookup": "prompt lookup",
               "generate": "transformers generate()", "baseline": "baseline"}


def head_to_head(gens: list[Generation], a: str = "prompt_lookup", b: str = "eagle",
                 temperature: float | None = None) -> dict | None:
    """On how many prompts the best lane of kind `a` beat the best lane of kind `b` (tok/s per
    prompt, concurrency 1), overall and per category; None when either kind did not run.

    Kinds are `lane_kind`'s: "eagle" is EAGLE's tree alone, so the merged drafter ("merged"),
    which carries prompt lookup inside it, never stands in for EAGLE."""
    gens = [g for g in gens if g.concurrency == 1]
    if temperature is None:
        temperature = min((g.temperature for g in gens), default=0.0)
    best: dict = {}
    for g in gens:
        kind = lane_kind(g.mode, g.config)
        if g.temperature == temperature and kind in (a, b):
            k = (kind, g.prompt_id, g.turn)
            best[k] = max(best.get(k, 0.0), g.tok_s)
    prompts = {(pid, t, next(x.category for x in gens if x.prompt_id == pid)) for (m, pid, t) in best}
    both = [(pid, t, c) for pid, t, c in prompts if (a, pid, t) in best and (b, pid, t) in best]
    if not both:
        return None
    wins = [(c, best[(a, pid, t)] > best[(b, pid, t)]) for pid, t, c in both]
    cats = {}
    for c, w in wins:
        n, k = cats.get(c, (0, 0))
        cats[c] = (n + 1, k + w)
    return {"a": a, "b": b, "a_label": KIND_LABELS.get(a, a), "b_label": KIND_LABELS.get(b, b),
            "prompts": len(wins), "a_wins": sum(w for _, w in wins),
            "per_category": [{"category": c, "prompts": n, "a_wins": k} for c, (n, k) in sorted(cats.items())]}


def head_to_heads(gens: list[Generation], temperature: float | None = None) -> list[dict]:
    """Every comparison the lanes allow, each labelled: prompt lookup vs EAGLE alone, then the
    merged drafter vs EAGLE alone and vs prompt lookup."""
    pairs = (("prompt_lookup", "eagle"), ("merged", "eagle"), ("merged", "prompt_lookup"))
    return [h for a, b in pairs if (h := head_to_head(gens, a, b, temperature)) is not None]


def format_head_to_head(h: dict) -> str:
    """`prompt lookup faster than EAGLE (best lane of each, per prompt): 3/8 prompts`."""
    a, b = h.get("a_label", KIND_LABELS.get(h["a"], h["a"])), h.get("b_label", KIND_LABELS.get(h["b"], h["b"]))
    return f"{a} faster than {b} (best lane of each, per prompt): {h['a_wins']}/{h['prompts']} prompts"


def suite_name(config: dict) -> str:
    """What a run measured on: the suite, or the prompts file's name and the start of its sha256."""
    if config.get("prompts_file"):
        return f"{config['prompts_file']} (sha256 {str(config.get('prompts_sha256'))[:12]})"
    return str(config.get("suite"))


def format_summary(result: dict) -> str:
    """A few lines for the terminal and notebooks."""
    s = result["summary"]
    b, e = s.get("baseline", {}), s.get("eagle", {})
    acc = e.get("accept_length")
    lines = [f"{result['config'].get('backend')} · {suite_name(result['config'])} · {s.get('paired_requests')} paired "
             f"requests · {s.get('config') or 'server'}",
             f"  baseline   {b.get('tok_s')} tok/s"]
    if e.get("tok_s") is not None:  # a run of the n-gram lanes alone (llama.cpp's --num_steps 0) has no EAGLE lane
        lines += [f"  EAGLE      {e['tok_s']} tok/s   accept_length {acc if acc is not None else 'unavailable'}",
                  f"  speedup    {s.get('speedup')}x"]
    for row in result.get("settings") or []:
        lines.append(f"  {row['config']:>12}: accept_length {row['accept_length']}, {row['eagle_tok_s']} tok/s, "
                     f"speedup {row['speedup']}x")
    lanes = result.get("lanes") or []
    if len(lanes) > 2:
        lines.append("  lane                       tok/s   speedup  accept  identical")
        for r in lanes:
            ident = f"{r['identical']}/{r['checked']}" if r.get("checked") else "-"
            lines.append(f"  {r['lane']:<25} {r['tok_s']!s:>7} {r['speedup']!s:>8}x {r['accept_length'] or '-'!s:>7}  {ident}")
    for h in result.get("head_to_heads") or ([result["head_to_head"]] if result.get("head_to_head") else []):
        lines.append("  " + format_head_to_head(h))
    for r in result.get("temperatures") or []:
        lines.append(f"  T={r['temperature']:<4} {r['lane']:<25} speedup {r['speedup']}x, accept_length {r['accept_length']}")
    if result["config"].get("backend") == "llamacpp":
        from .core import BenchError
        from .llamacpp import format_cost_model, llamacpp_cost_model

        try:
            lines += format_cost_model(llamacpp_cost_model(result))
        except BenchError:  # no baseline timings (a run stopped early): nothing to fit
            pass
    if not result.get("complete", True):
        lines.append(f"  INCOMPLETE: {result.get('error')}")
    return "\n".join(lines)
