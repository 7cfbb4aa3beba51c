"""The headline benchmark: a report over `eaglebook bench`'s rows on MT-bench first turns (or
any prompts file), float32 and bfloat16, the EAGLE settings beside their peers.

    eaglebook headline --draft smollm2-135m-eagle3 --out runs/headline

For each dtype it runs `bench` once, in process (`<out>/bench-<dtype>.json`, resumable: a
killed run continues where it stopped, as long as the target's weights, every weight of the head
and the eaglebook version are the ones the file measured; otherwise, or with `--no_resume`, it
measures again from the start): after a warm-up, for every prompt every lane runs once,
the lane order reversed on every other prompt (the plain greedy baseline, each EAGLE setting,
the merged drafter with `--ngram`, and with `--peers` transformers' `generate()` and its prompt
lookup). Threads are fixed for the whole run, so each speedup is a ratio measured side by side.
From those rows the report gives, per lane:

- speedup: the lane's output tok/s / the same dtype's baseline tok/s (sums over the same prompts);
- accept length: generated tokens / verification steps (the bonus token included);
- identical: outputs equal to the same dtype's greedy baseline, token for token; where one
  differs, the baseline's top-2 logit margin at the first divergence (docs/stages.md § 6:
  in float32 a divergence is allowed only where that margin is below 1e-4);
- the same figures without the prompts where the baseline's output or the lane's own ran to the
  token limit or looped (a small model repeats itself, and repeats are easy to draft, which
  flatters accept length; in bfloat16 a lane's output can loop where the baseline's does not);
- head to head, per prompt and per category: EAGLE alone (its trees and chains) against prompt
  lookup, and the merged drafter (mode "eagle", a setting ending in `+ngN`) against each of them;
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
from .bench.tables import head_to_heads, lane_kind, lanes_table, suite_name


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
    ngram_max: int = field(default=3, metadata={"help": "the longest context suffix prompt lookup matches (the merged "
                                                        "drafter's and transformers' max_matching_ngram_size alike)"})
    no_resume: bool = field(default=False, metadata={"help": "measure every row again (default: continue the "
                                                             "results in --out when they measured the same target "
                                                             "and head weights with the same eaglebook version)"})

    def bench_args(self, dtype: str) -> BenchArgs:
        """The one `eaglebook bench` run behind this dtype's rows."""
        for s in self.settings.split():
            Setting.parse(s)  # the headline's own error for a malformed setting
        return BenchArgs(suite=self.suite, prompts=self.prompts, limit=self.limit, backend="inprocess",
                         target=self.target, draft=self.draft, dtype=dtype, max_new_tokens=self.max_new_tokens,
                         sweep=self.settings, warmup=self.warmup, peers=self.peers, prompt_lookup=self.prompt_lookup,
                         ngram=self.ngram, ngram_max=self.ngram_max, threads=self.threads, concurrency="1",
                         json=str(Path(self.out) / f"bench-{dtype}.json"), resume=not self.no_resume)


def run_headline(args: HeadlineArgs, progress: bool = True) -> dict:
    """One `bench` run per dtype, then the report over their rows (saved, plotted, printed)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, runs, measured = [], {}, {}
    for dt in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        # a file that measured another head (retrained into the same folder), target or version starts over
        res = run_benchmark(args.bench_args(dt), progress=progress, restart_stale=True)
        rows += [{**r, "dtype": dt} for r in res["requests"]]
        c = res["config"]
        runs[dt] = {"file": f"bench-{dt}.json", "seconds": res["seconds"], "hardware": res["hardware"],
                    "draft": res["server_info"].get(next((k for k in res["server_info"] if k.startswith("eagle")), "")),
                    **{k: c.get(k) for k in ("draft_fingerprint", "target_fingerprint", "eaglebook_version")}}
        measured = {k: c[k] for k in ("suite", "prompts_file", "prompts_sha256") if k in c}
    result = summarize_headline(rows, {**asdict(args), **measured, "runs": runs})
    (out / "headline.json").write_text(json.dumps(result, indent=2))
    plot_headline(result, out / "headline.png")
    print(format_headline(result))
    return result


def lane_name(row: dict) -> str:
    """A bench row's lane as the headline names it: chain/tree by the setting, the merged drafter
    as "merged", the peers in words (`pld10-m3`: "prompt lookup 10 (match 3)")."""
    mode, cfg = row["mode"], row.get("config") or ""
    if mode == "eagle":
        shape = f"{'chain' if '-k1-' in cfg else 'tree'} {cfg}"
        return f"merged {shape}" if lane_kind(mode, cfg) == "merged" else shape
    if mode == "prompt_lookup":
        size, _, match = cfg.removeprefix("pld").partition("-m")
        return f"prompt lookup {size}" + (f" (match {match})" if match else "")
    return {"generate": "transformers generate()"}.get(mode, mode)


def setting_kind(name: str) -> str:
    """A headline setting's kind (`lane_kind`'s words) from its name."""
    if name.startswith(("chain", "tree")):
        return "eagle"
    if name.startswith("merged"):
        return "merged"
    if name.startswith("prompt lookup"):
        return "prompt_lookup"
    return name


def _round(x, nd: int = 3):
    return None if x is None else round(x, nd)


def _clean(gens: list[Generation]) -> set[tuple[str, int]]:
    """The (prompt, turn)s whose answer here neither ran to the token limit nor looped."""
    return {(g.prompt_id, g.turn) for g in gens if g.finish_reason != "length" and not g.looped}


def summarize_headline(rows: list[dict], config: dict | None = None) -> dict:
    """The tables from bench's request rows (each with its `dtype`): one row per (dtype, lane),
    per category, the cost model, and head to head (EAGLE alone, prompt lookup, the merged
    drafter) per prompt and per category."""
    by_dtype = defaultdict(list)
    for r in rows:
        by_dtype[r["dtype"]].append(Generation.from_row(r))
    table, cats, cost, h2h = [], [], [], []
    for dt, gens in by_dtype.items():
        gens = [g for g in gens if g.concurrency == 1]
        h2h += [{"dtype": dt, **h} for h in head_to_heads(gens)]
        base = [g for g in gens if g.mode == "baseline"]
        base_clean = _clean(base)
        base_tok_s = {r["lane"]: r for r in lanes_table(gens)}.get("baseline", {}).get("tok_s")
        for lane in lanes_table(gens):
            if lane["mode"] == "baseline":
                continue
            own = [g for g in gens if g.mode == lane["mode"] and g.config == lane["config"]]
            # clean: neither the baseline's answer nor this lane's own ran to the limit or looped
            keep = base_clean & _clean(own)
            c = next(iter(r for r in lanes_table([g for g in base + own if (g.prompt_id, g.turn) in keep])
                          if r["lane"] == lane["lane"]), {})
            name = lane_name(lane)
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
                "limit_hits": sum(g.finish_reason == "length" for g in own),
                "looped": sum(bool(g.looped) for g in own),
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
    """Per dtype and category: the best lane of EAGLE alone against the best prompt-lookup lane
    (`winner`), and where the merged drafter ran, its best lane against both
    (`merged_vs_eagle`, `merged_vs_prompt_lookup`). Each names its lanes."""
    out = []
    for dt, cat in sorted({(c["dtype"], c["category"]) for c in cats}):
        rows = [c for c in cats if c["dtype"] == dt and c["category"] == cat and c.get("speedup")]
        best = {}
        for kind in ("eagle", "prompt_lookup", "merged"):
            own = [c for c in rows if setting_kind(c["setting"]) == kind]
            if own:
                best[kind] = max(own, key=lambda c: c["speedup"])
        if "eagle" not in best or "prompt_lookup" not in best:
            continue
        e, p = best["eagle"], best["prompt_lookup"]
        row = {"dtype": dt, "category": cat, "prompts": e["prompts"], "eagle": e["setting"],
               "eagle_speedup": e["speedup"], "eagle_accept_length": e["accept_length"],
               "prompt_lookup": p["setting"], "prompt_lookup_speedup": p["speedup"],
               "prompt_lookup_accept_length": p["accept_length"],
               "winner": "EAGLE" if e["speedup"] >= p["speedup"] else "prompt lookup"}
        if "merged" in best:
            m = best["merged"]
            row.update({"merged": m["setting"], "merged_speedup": m["speedup"],
                        "merged_accept_length": m["accept_length"],
                        "merged_vs_eagle": "merged drafter" if m["speedup"] >= e["speedup"] else "EAGLE",
                        "merged_vs_prompt_lookup": "merged drafter" if m["speedup"] >= p["speedup"]
                        else "prompt lookup"})
        out.append(row)
    return out


def _x(v) -> str:
    return "n/a" if v is None else f"{v}x"


def format_headline(result: dict) -> str:
    """The tables as Markdown: the rows, the cost model, and per category for the fastest bf16 row."""
    lines = ["| dtype | setting | speedup | accept length | identical to greedy | hit limit / looped (baseline; "
             "lane) | clean speedup | clean accept length | tok/s baseline -> lane |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["table"]:
        lines.append(f"| {r['dtype']} | {r['setting']} | {r.get('speedup')}x | {r.get('accept_length')} | "
                     f"{r['identical']}/{r['checked']} | {r['baseline_limit_hits']} / {r['baseline_looped']}; "
                     + (f"{r['limit_hits']} / {r['looped']}" if "limit_hits" in r else "n/a (older run)") + " | "
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
        merged = any("merged" in v for v in vs)
        lines += ["", "EAGLE alone (best setting) vs prompt lookup (best size)"
                  + (", and the merged drafter against both" if merged else "") + ", per category:", "",
                  "| dtype | category | prompts | EAGLE speedup (accept) | prompt lookup speedup (accept) | faster |"
                  + (" merged drafter speedup (accept) | merged vs EAGLE | merged vs prompt lookup |" if merged else ""),
                  "|---|---|---|---|---|---|" + ("---|---|---|" if merged else "")]
        for v in vs:
            line = (f"| {v['dtype']} | {v['category']} | {v['prompts']} | {v['eagle_speedup']}x "
                    f"({v['eagle_accept_length']}) | {v['prompt_lookup_speedup']}x "
                    f"({v['prompt_lookup_accept_length']}) | {v['winner']} |")
            if merged:
                line += (f" {_x(v.get('merged_speedup'))} ({v.get('merged_accept_length')}) | "
                         f"{v.get('merged_vs_eagle', '-')} | {v.get('merged_vs_prompt_lookup', '-')} |")
            lines.append(line)
    for h in result.get("head_to_head") or []:
        a, b = h.get("a_label", "prompt lookup"), h.get("b_label", "EAGLE")
        lines += ["", f"{h['dtype']}: {a} (best lane) faster than {b} (best lane) on {h['a_wins']} of "
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
    fig.suptitle(f"EAGLE-3 on {result['config'].get('target', '')}, {suite_name(result['config'])} "
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
