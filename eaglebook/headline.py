"""The headline benchmark: a report over `eaglebook bench`'s rows on MT-bench first turns (or
any prompts file), float32 and bfloat16, the EAGLE settings beside their peers.

    eaglebook headline --draft smollm2-135m-eagle3 --out runs/headline

For each dtype it runs `bench` once, in process (`<out>/bench-<dtype>.json`, resumable: a
killed run continues where it stopped): after a warm-up, for every prompt every lane runs once,
the lane order reversed on every other prompt (the plain greedy baseline, each EAGLE setting,
the merged drafter with `--ngram`, and with `--peers` transformers' `generate()` and its prompt
lookup). Threads are fixed for the whole run, so each speedup is a ratio measured side by side.
From those rows the report gives, per lane:

- speedup: the lane's output tok/s / the same dtype's baseline tok/s (sums over the same prompts);
- accept length: generated tokens / verification steps (the bonus token included);
- identical: outputs equal to the same dtype's greedy baseline, token for token; where one
  differs, the baseline's top-2 logit margin at the first divergence (docs/stages.md § 6:
  in float32 a divergence is allowed only where that margin is below 1e-4);
- the same figures without the prompts whose baseline output ran to the token limit or looped
  (a small model repeats itself, and repeats are easy to draft, which flatters accept length);
- the cost model's terms: speedup ~ accept_length * t_step / (t_verify + t_draft + t_other),
  t_step the baseline's time per token, t_draft all draft calls of one iteration.

`<out>/headline.json` holds the tables and `<out>/headline.png` the figure.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bench import BenchArgs, DraftSetting, Generation, run_benchmark
from .bench.tables import head_to_head, lanes_table


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
    """The headline benchmark: bench's lanes interleaved per prompt, float32 and bfloat16, as one report."""

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
    ngram: int = field(default=0, metadata={"help": "also the merged drafter on the first setting: this many "
                                                    "prompt-lookup tokens inside its EAGLE tree (0 = off)"})

    def bench_args(self, dtype: str) -> BenchArgs:
        """The one `eaglebook bench` run behind this dtype's rows."""
        for s in self.settings.split():
            Setting.parse(s)  # the headline's own error for a malformed setting
        return BenchArgs(suite=self.suite, prompts=self.prompts, limit=self.limit, backend="inprocess",
                         target=self.target, draft=self.draft, dtype=dtype, max_new_tokens=self.max_new_tokens,
                         sweep=self.settings, warmup=self.warmup, peers=self.peers, prompt_lookup=self.prompt_lookup,
                         ngram=self.ngram, threads=self.threads, concurrency="1",
                         json=str(Path(self.out) / f"bench-{dtype}.json"), resume=True)


def run_headline(args: HeadlineArgs, progress: bool = True) -> dict:
    """One `bench` run per dtype, then the report over their rows (saved, plotted, printed)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, runs = [], {}
    for dt in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        res = run_benchmark(args.bench_args(dt), progress=progress)
        rows += [{**r, "dtype": dt} for r in res["requests"]]
        runs[dt] = {"file": f"bench-{dt}.json", "seconds": res["seconds"], "hardware": res["hardware"],
                    "draft": res["server_info"].get(next((k for k in res["server_info"] if k.startswith("eagle")), ""))}
    result = summarize_headline(rows, {**asdict(args), "runs": runs})
    (out / "headline.json").write_text(json.dumps(result, indent=2))
    plot_headline(result, out / "headline.png")
    print(format_headline(result))
    return result


def lane_name(row: dict) -> str:
    """A bench row's lane as the headline names it: chain/tree by the setting, the peers in words."""
    mode, cfg = row["mode"], row.get("config") or ""
    if mode == "eagle":
        return f"{'chain' if '-k1-' in cfg else 'tree'} {cfg}"
    if mode == "prompt_lookup":
        return f"prompt lookup {cfg.removeprefix('pld')}"
    return {"generate": "transformers generate()"}.get(mode, mode)


def _round(x, nd: int = 3):
    return None if x is None else round(x, nd)


def _clean_prompts(base: list[Generation]) -> set[str]:
    """The prompts whose baseline answer neither ran to the token limit nor looped."""
    return {g.prompt_id for g in base if g.finish_reason != "length" and not g.looped}


def summarize_headline(rows: list[dict], config: dict | None = None) -> dict:
    """The tables from bench's request rows (each with its `dtype`): one row per (dtype, lane),
    per category, the cost model, and EAGLE against prompt lookup per category."""
    by_dtype = defaultdict(list)
    for r in rows:
        by_dtype[r["dtype"]].append(Generation.from_row(r))
    table, cats, cost, h2h = [], [], [], []
    for dt, gens in by_dtype.items():
        gens = [g for g in gens if g.concurrency == 1]
        h = head_to_head(gens)
        if h:
            h2h.append({"dtype": dt, **h})
        base = [g for g in gens if g.mode == "baseline"]
        plain = _clean_prompts(base)
        base_tok_s = {r["lane"]: r for r in lanes_table(gens)}.get("baseline", {}).get("tok_s")
        clean = {r["lane"]: r for r in lanes_table([g for g in gens if g.prompt_id in plain])}
        for lane in lanes_table(gens):
            if lane["mode"] == "baseline":
                continue
            own = [g for g in gens if g.mode == lane["mode"] and g.config == lane["config"]]
            name = lane_name(lane)
            c = clean.get(lane["lane"], {})
            table.append({
                "dtype": dt, "setting": name, "prompts": lane["requests"], "baseline_tok_s": _round(base_tok_s, 2),
                "eagle_tok_s": _round(lane["tok_s"], 2), "speedup": _round(lane["speedup"]),
                "accept_length": _round(lane["accept_length"]),
                "identical": lane["identical"] or 0, "checked": lane["checked"] or 0,
                "lossless_ok": lane["lossless_ok"] or 0,
                "divergence_margin_median": lane["divergence_margin_median"],
                "divergence_margin_min": lane["divergence_margin_min"],
                "baseline_limit_hits": sum(g.finish_reason == "length" for g in base),
                "baseline_looped": sum(bool(g.looped) for g in base),
                "clean_prompts": c.get("requests", 0), "clean_speedup": _round(c.get("speedup")),
                "clean_accept_length": _round(c.get("accept_length")),
            })
            for pc in lane["per_category"]:
                cats.append({"dtype": dt, "setting": name, "category": pc["category"], "prompts": pc["requests"],
                             "speedup": _round(pc["speedup"]), "accept_length": _round(pc["accept_length"])})
            if own and all(g.timing and g.verify_ct for g in own):
                cost.append(_cost_row(dt, name, base, own, lane))
    return {"config": config or {}, "table": table, "per_category": cats, "cost_model": cost,
            "eagle_vs_prompt_lookup": eagle_vs_prompt_lookup(cats), "head_to_head": h2h}


def _cost_row(dtype: str, name: str, base: list[Generation], own: list[Generation], lane: dict) -> dict:
    """The cost model's measured terms for one EAGLE lane (per iteration, weighted by iterations)."""
    steps = sum(g.verify_ct for g in own)
    w = lambda k: sum(g.timing[k] * g.verify_ct for g in own) / max(1, steps)  # noqa: E731
    t_step = 1e3 * sum(g.latency_s for g in base) / max(1, sum(g.completion_tokens for g in base))
    t_draft, t_verify, t_other = w("draft_ms"), w("verify_ms"), w("other_ms")
    al = _round(lane["accept_length"]) or 0.0
    return {"dtype": dtype, "setting": name, "accept_length": al, "t_step_ms": round(t_step, 2),
            "t_verify_ms": round(t_verify, 2), "t_draft_ms": round(t_draft, 2), "t_other_ms": round(t_other, 2),
            "predicted_speedup": round(al * t_step / (t_verify + t_draft + t_other), 3),
            "measured_speedup": _round(lane["speedup"]),
            "verify_over_step": round(t_verify / t_step, 2), "draft_over_step": round(t_draft / t_step, 2)}


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
    for h in result.get("head_to_head") or []:
        lines += ["", f"{h['dtype']}: prompt lookup (best size) faster than EAGLE (best lane) on {h['a_wins']} of "
                      f"{h['prompts']} prompts (" + ", ".join(f"{c['category']} {c['a_wins']}/{c['prompts']}"
                                                      for c in h["per_category"]) + ")"]
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
        ax.axhline(target, color="tab:red", ls="--", lw=1, label=f"project goal {target}")
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
