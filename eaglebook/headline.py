"""The headline benchmark: MT-bench first turns, float32 and bfloat16, chain and tree, one process.

    eaglebook headline --draft smollm2-135m-eagle3 --out runs/headline

For every prompt (after a warm-up) every lane runs once, the lane order reversed on every
other prompt: per dtype the plain greedy baseline, then each EAGLE setting. Threads are fixed
for the whole run, so each speedup is a ratio measured side by side. Per row it reports:

- speedup: EAGLE output tok/s / the same dtype's baseline tok/s (sums over the same prompts);
- accept length: generated tokens / verification steps (the bonus token included);
- identical: outputs equal to the same dtype's greedy baseline, token for token; where one
  differs, the baseline's top-2 logit margin at the first divergence (docs/contracts.md § 6:
  in float32 a divergence is allowed only where that margin is below 1e-4);
- the same figures without the prompts whose baseline output ran to the token limit or looped
  (a small model repeats itself, and repeats are easy to draft, which flatters accept length);
- the cost model's terms: speedup ~ accept_length * t_step / (t_verify + t_draft + t_other),
  t_step the baseline's time per token, t_draft all draft calls of one iteration.

Rows go to `<out>/requests.jsonl` as they finish (a killed run resumes where it stopped);
`<out>/headline.json` holds the tables and `<out>/headline.png` the figure.
"""
from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from types import SimpleNamespace

from .bench import DraftSetting, Generation
from .bench.command import parse_prompt_lookup as bench_lanes_pl
from .bench.lanes import transformers_generate_fn
from .bench.tables import _speedup, summarize_mode


def looped(ids: list[int], n: int = 10, times: int = 3) -> bool:
    """True when some n-gram occurs `times` times or more: the output repeats itself."""
    counts = Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    return bool(counts) and max(counts.values()) >= times


class Setting(DraftSetting):
    """bench's draft setting (SGLang's meanings, validated, a chain's size fixed), labelled chain or tree."""

    @property
    def label(self) -> str:
        return f"{'chain' if self.topk == 1 else 'tree'} {super().label}"

    @classmethod
    def parse(cls, text: str) -> "Setting":
        try:
            s, k, n = (int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"a draft setting is 'num_steps,topk,num_draft_tokens' (e.g. 5,1,6), not {text!r}")
        return cls(s, k, n)


@dataclass
class HeadlineArgs:
    """The headline benchmark: baseline and EAGLE interleaved per prompt, float32 and bfloat16."""

    out: str = field(default="runs/headline", metadata={"help": "results folder (resumable)"})
    target: str = field(default="smollm2-135m", metadata={"help": "target model"})
    draft: str = field(default="smollm2-135m-eagle3", metadata={"help": "draft head: folder or shipped name"})
    suite: str = field(default="mt-bench", metadata={"help": "prompt suite (eaglebook.bench.load_suite)"})
    prompts: str = field(default="", metadata={"help": "a prompts JSONL instead of the suite (e.g. the recipe's "
                                                       "unseen-prompts.jsonl)"})
    limit: int = field(default=0, metadata={"help": "first N prompts (0 = all 80; round-robin over categories)"})
    max_new_tokens: int = field(default=256, metadata={"help": "generation limit"})
    dtypes: str = field(default="float32,bfloat16", metadata={"help": "comma-separated target dtypes"})
    settings: str = field(default="5,1,6 6,4,24", metadata={"help": "draft settings 'steps,topk,tokens', space-separated"})
    threads: int = field(default=2, metadata={"help": "torch threads, fixed for the whole run"})
    warmup: int = field(default=2, metadata={"help": "warm-up prompts per lane (not recorded)"})
    peers: bool = field(default=True, metadata={"help": "also transformers' generate() and its prompt lookup, "
                                                        "in the same interleaved run (--no_peers: off)"})
    prompt_lookup: str = field(default="3 10", metadata={"help": "peers: prompt_lookup_num_tokens values"})
    ngram: int = field(default=0, metadata={"help": "also the merged drafter per setting: this many prompt-lookup "
                                                    "tokens inside the EAGLE tree (0 = off)"})


def _lanes(args: HeadlineArgs):
    """(dtype, label, run(ids, max_new_tokens) -> (result, row)) for every lane, baselines first per dtype."""
    from . import decode
    from .target import end_of_turn_ids, load_target

    settings = [Setting.parse(s) for s in args.settings.split()]
    lanes, info = [], {}
    for dt in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        model, tok = load_target(args.target, dtype=dt, threads=args.threads)
        eos = end_of_turn_ids(tok, model.generation_config)
        head = decode.load_head(model, args.draft)
        info[dt] = {"draft": args.draft or "untrained", "draft_vocab": head.config.draft_vocab_size,
                    "aux_layers": list(getattr(head.config, "aux_layers", None) or [])}

        def base(ids, n, model=model, eos=eos):
            r = decode.baseline_decode(model, ids, n, eos)
            return r, {"tokens": len(r.token_ids), "seconds": r.seconds, "stop": r.stop_reason}

        lanes.append((dt, "baseline", base))
        for s in settings:
            dec = decode.EagleDecoder(model, head, decode.SpecConfig(s.num_steps, s.topk, s.num_draft_tokens),
                                      eos_ids=eos)

            def eagle(ids, n, dec=dec):
                r = dec.generate(ids, n)
                return r, {"tokens": len(r.token_ids), "seconds": r.seconds, "stop": r.stop_reason,
                           "verify_steps": r.num_verify_steps, "prefill_ms": r.prefill_ms, **r.timing()}

            lanes.append((dt, s.label, eagle))
            if args.ngram:
                merged = decode.EagleDecoder(model, head, decode.SpecConfig(s.num_steps, s.topk, s.num_draft_tokens,
                                                                            ngram_tokens=args.ngram), eos_ids=eos)
                lanes.append((dt, f"{s.label}+ng{args.ngram}", lambda ids, n, dec=merged: eagle(ids, n, dec)))
        if args.peers:
            for k in [None, *bench_lanes_pl(args.prompt_lookup)]:
                fn = transformers_generate_fn(model, tok, eos, k, 0.0, 1.0, lambda: {"seed": 0})

                def peer(ids, n, fn=fn):
                    out = fn(ids, n)
                    r = SimpleNamespace(token_ids=out["output_ids"])
                    row = {"tokens": out["completion_tokens"], "seconds": out["latency_s"],
                           "stop": "max_new_tokens" if out["finish_reason"] == "length" else "eos"}
                    if out["verify_ct"]:
                        row["verify_steps"] = out["verify_ct"]
                    return r, row

                lanes.append((dt, "transformers generate()" if k is None else f"prompt lookup {k}", peer))
    return lanes, tok, info


def run_headline(args: HeadlineArgs, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from . import bench, decode

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "requests.jsonl"
    done = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()] if log.is_file() else []
    have = {(r["prompt_id"], r["dtype"], r["lane"]) for r in done}
    prompts = bench.load_suite(args.suite, args.limit or None, prompts_file=args.prompts or None)
    lanes, tok, info = _lanes(args)
    ids_of = {p.id: bench.render_ids(tok, p.messages(0)) for p in prompts}
    if args.warmup:
        for p in prompts[: args.warmup]:
            for _, _, run in lanes:
                run(ids_of[p.id], 32)
    with log.open("a") as f:
        for i, p in enumerate(tqdm(prompts, desc="headline", disable=not progress)):
            base_runs = {}
            order = lanes if i % 2 == 0 else lanes[::-1]
            results = {}
            for dt, label, run in order:
                if (p.id, dt, label) in have:
                    continue
                results[(dt, label)] = run(ids_of[p.id], args.max_new_tokens)
            for dt, label, _ in lanes:  # write baselines first: EAGLE rows are checked against them
                if (dt, label) not in results:
                    continue
                r, row = results[(dt, label)]
                row.update(prompt_id=p.id, category=p.category, dtype=dt, lane=label,
                           prompt_tokens=len(ids_of[p.id]), looped=looped(r.token_ids), output_ids=r.token_ids)
                if label == "baseline":
                    base_runs[dt] = r
                    row["margins"] = r.margins
                else:
                    b = base_runs.get(dt) or _baseline_from_log(done, p.id, dt)
                    row.update(decode.check_lossless(b, r.token_ids) if b is not None else {})
                f.write(json.dumps(row) + "\n")
                f.flush()
                done.append(row)
    result = summarize_headline(done, {**asdict(args), "draft_info": info})
    (out / "headline.json").write_text(json.dumps(result, indent=2))
    plot_headline(result, out / "headline.png")
    print(format_headline(result))
    return result


def _baseline_from_log(rows: list[dict], prompt_id: str, dtype: str):
    from .decode import BaselineResult

    for r in rows:
        if r["prompt_id"] == prompt_id and r["dtype"] == dtype and r["lane"] == "baseline":
            return BaselineResult(prompt_ids=[], token_ids=r["output_ids"], margins=r["margins"],
                                  stop_reason=r["stop"], seconds=r["seconds"])
    return None


def as_generation(row: dict) -> Generation:
    """A headline row as bench's one-request record, so both commands share one set of statistics."""
    return Generation(prompt_id=row["prompt_id"], category=row["category"], turn=0,
                      mode="baseline" if row["lane"] == "baseline" else "eagle", prompt_tokens=row.get("prompt_tokens", 0),
                      completion_tokens=row["tokens"], latency_s=row["seconds"], verify_ct=row.get("verify_steps"),
                      finish_reason="length" if row["stop"] == "max_new_tokens" else "stop", config=row["lane"])


def _row_stats(base: list[dict], eagle: list[dict]) -> dict:
    """Speedup and accept length of a lane against `base` over the prompts both have (bench's
    `summarize_mode` and `_speedup` on the same records)."""
    ids = {r["prompt_id"] for r in base} & {r["prompt_id"] for r in eagle}
    b = [as_generation(r) for r in base if r["prompt_id"] in ids]
    e = [as_generation(r) for r in eagle if r["prompt_id"] in ids]
    if not e:
        return {"prompts": 0}
    sb, se = summarize_mode(b), summarize_mode(e)
    acc = se["accept_length"]
    return {"prompts": len(e), "baseline_tok_s": round(sb["tok_s"], 2), "eagle_tok_s": round(se["tok_s"], 2),
            "speedup": round(_speedup(b, e), 3), "accept_length": round(acc, 3) if acc is not None else None}


def summarize_headline(rows: list[dict], config: dict | None = None) -> dict:
    """The tables: one row per (dtype, EAGLE setting), per category, and the cost model."""
    by = defaultdict(list)
    for r in rows:
        by[(r["dtype"], r["lane"])].append(r)
    table, cats, cost = [], [], []
    for (dt, lane), eagle in by.items():
        if lane == "baseline":
            continue
        base = by[(dt, "baseline")]
        plain = {r["prompt_id"] for r in base if r["stop"] != "max_new_tokens" and not r["looped"]}
        limit_hits = sum(r["stop"] == "max_new_tokens" for r in base)
        loops = sum(r["looped"] for r in base)
        checked = [r for r in eagle if "identical" in r]
        div = [r["margin"] for r in checked if not r["identical"] and r["margin"] is not None]
        all_ = _row_stats(base, eagle)
        clean = _row_stats([r for r in base if r["prompt_id"] in plain], [r for r in eagle if r["prompt_id"] in plain])
        table.append({
            "dtype": dt, "setting": lane, **all_,
            "identical": sum(r["identical"] for r in checked), "checked": len(checked),
            "lossless_ok": sum(bool(r.get("ok")) for r in checked),
            "divergence_margin_median": round(statistics.median(div), 4) if div else None,
            "divergence_margin_min": round(min(div), 6) if div else None,
            "baseline_limit_hits": limit_hits, "baseline_looped": loops,
            "clean_prompts": clean.get("prompts", 0), "clean_speedup": clean.get("speedup"),
            "clean_accept_length": clean.get("accept_length"),
        })
        for cat in sorted({r["category"] for r in eagle}):
            s = _row_stats([r for r in base if r["category"] == cat], [r for r in eagle if r["category"] == cat])
            cats.append({"dtype": dt, "setting": lane, "category": cat, **s})
        if "draft_ms" not in eagle[0]:
            continue  # a peer: no draft/verify split to model
        steps = sum(r["verify_steps"] for r in eagle)
        w = lambda k: sum(r[k] * r["verify_steps"] for r in eagle) / max(1, steps)  # noqa: E731
        t_step = 1e3 * sum(r["seconds"] for r in base) / max(1, sum(r["tokens"] for r in base))
        t_draft, t_verify, t_other = w("draft_ms"), w("verify_ms"), w("other_ms")
        al = all_.get("accept_length") or 0.0
        cost.append({"dtype": dt, "setting": lane, "accept_length": al, "t_step_ms": round(t_step, 2),
                     "t_verify_ms": round(t_verify, 2), "t_draft_ms": round(t_draft, 2), "t_other_ms": round(t_other, 2),
                     "predicted_speedup": round(al * t_step / (t_verify + t_draft + t_other), 3),
                     "measured_speedup": all_.get("speedup"),
                     "verify_over_step": round(t_verify / t_step, 2), "draft_over_step": round(t_draft / t_step, 2)})
    return {"config": config or {}, "table": table, "per_category": cats, "cost_model": cost,
            "eagle_vs_prompt_lookup": eagle_vs_prompt_lookup(cats)}


def eagle_vs_prompt_lookup(cats: list[dict]) -> list[dict]:
    """Per dtype and category: the best EAGLE lane against the best prompt-lookup lane."""
    out = []
    for dt, cat in sorted({(c["dtype"], c["category"]) for c in cats}):
        rows = [c for c in cats if c["dtype"] == dt and c["category"] == cat and c.get("speedup")]
        eagle = [c for c in rows if c["setting"].startswith(("chain", "tree"))]
        pld = [c for c in rows if c["setting"].startswith("prompt lookup")]
        if not eagle or not pld:
            continue
        e, p = max(eagle, key=lambda c: c["speedup"]), max(pld, key=lambda c: c["speedup"])
        out.append({"dtype": dt, "category": cat, "prompts": e["prompts"], "eagle": e["setting"],
                    "eagle_speedup": e["speedup"], "eagle_accept_length": e["accept_length"],
                    "prompt_lookup": p["setting"], "prompt_lookup_speedup": p["speedup"],
                    "prompt_lookup_accept_length": p["accept_length"],
                    "winner": "EAGLE" if e["speedup"] >= p["speedup"] else "prompt lookup"})
    return out


def _x(v) -> str:
    return "n/a" if v is None else f"{v}x"


def format_headline(result: dict) -> str:
    """The tables as Markdown: the rows, the cost model, and per category for the fastest bf16 row."""
    lines = ["| dtype | setting | speedup | accept length | identical to greedy | baseline hit limit / looped "
             "| clean speedup | clean accept length | tok/s baseline -> EAGLE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["table"]:
        lines.append(f"| {r['dtype']} | {r['setting']} | {r.get('speedup')}x | {r.get('accept_length')} | "
                     f"{r['identical']}/{r['checked']} | {r['baseline_limit_hits']} / {r['baseline_looped']} | "
                     f"{_x(r['clean_speedup'])} ({r['clean_prompts']} prompts) | {r['clean_accept_length']} | "
                     f"{r.get('baseline_tok_s')} -> {r.get('eagle_tok_s')} |")
    lines += ["", "Cost model: speedup ~ accept_length x t_step / (t_verify + t_draft + t_other), times per "
              "iteration (t_step: one baseline token)", "",
              "| dtype | setting | t_step ms | t_verify ms | t_draft ms | t_other ms | predicted | measured |",
              "|---|---|---|---|---|---|---|---|"]
    for c in result["cost_model"]:
        lines.append(f"| {c['dtype']} | {c['setting']} | {c['t_step_ms']} | {c['t_verify_ms']} | {c['t_draft_ms']} | "
                     f"{c['t_other_ms']} | {c['predicted_speedup']}x | {c['measured_speedup']}x |")
    vs = result.get("eagle_vs_prompt_lookup") or []
    if vs:
        lines += ["", "EAGLE (best setting) vs prompt lookup (best size), per category:", "",
                  "| dtype | category | prompts | EAGLE speedup (accept) | prompt lookup speedup (accept) | faster |",
                  "|---|---|---|---|---|---|"]
        for v in vs:
            lines.append(f"| {v['dtype']} | {v['category']} | {v['prompts']} | {v['eagle_speedup']}x "
                         f"({v['eagle_accept_length']}) | {v['prompt_lookup_speedup']}x "
                         f"({v['prompt_lookup_accept_length']}) | {v['winner']} |")
    bf = [r for r in result["table"] if r["dtype"] == "bfloat16" and r.get("speedup")]
    if bf:
        best = max(bf, key=lambda r: r["speedup"])
        lines += ["", f"Per category, bfloat16 {best['setting']}:", "",
                  "| category | prompts | speedup | accept length |", "|---|---|---|---|"]
        for c in result["per_category"]:
            if c["dtype"] == "bfloat16" and c["setting"] == best["setting"]:
                lines.append(f"| {c['category']} | {c['prompts']} | {c.get('speedup')}x | {c.get('accept_length')} |")
    return "\n".join(lines)


def plot_headline(result: dict, path=None):
    """Speedup and accept length per row (all prompts, and without looped / cut-off outputs)."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = result["table"]
    names = [f"{r['dtype']}\n{r['setting']}" for r in rows]
    x = range(len(rows))
    wide = len(rows) > 5  # peer lanes and merged settings: long labels, turned so they do not overlap
    fig, axes = plt.subplots(1, 2, figsize=(max(11, 1.5 * len(rows) + 2), 4.8 if wide else 4))
    for ax, key, clean, title, target in ((axes[0], "speedup", "clean_speedup", "speedup over greedy (x)", 2.0),
                                          (axes[1], "accept_length", "clean_accept_length",
                                           "accept length (tokens / verification)", 3.5)):
        ax.bar([i - 0.2 for i in x], [r.get(key) or 0 for r in rows], 0.4, label="all prompts")
        ax.bar([i + 0.2 for i in x], [r.get(clean) or 0 for r in rows], 0.4, label="no loops / cut-offs")
        ax.axhline(1.0 if key == "speedup" else 1.0, color="grey", lw=0.8)
        ax.axhline(target, color="tab:red", ls="--", lw=1, label=f"target {target}")
        ax.set_xticks(list(x), names, fontsize=8, rotation=35 if wide else 0, ha="right" if wide else "center")
        ax.set_title(title)
        ax.legend(fontsize=8)
    n = rows[0].get("prompts") if rows else 0
    fig.suptitle(f"EAGLE-3 on {result['config'].get('target', '')}, {result['config'].get('suite', '')} "
                 f"({n} prompts, {result['config'].get('max_new_tokens')} new tokens, "
                 f"{result['config'].get('threads')} CPU threads)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def _cli(args: HeadlineArgs) -> int:
    run_headline(args)
    return 0


def _register() -> None:
    from .cli import register

    register("headline", HeadlineArgs, _cli)


_register()
