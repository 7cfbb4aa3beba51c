"""Figures for the notebooks: every helper returns a matplotlib Figure (headless-safe)."""
from __future__ import annotations


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower().startswith("qt"):  # never open windows from a headless run
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------
# Notebook 06: benchmarks
# --------------------------------------------------------------------------------------

def plot_speedup_by_category(summary: dict, title: str = "EAGLE speedup per category"):
    """Bars of speedup (EAGLE tok/s / baseline tok/s) per prompt category, accept_length on top.

    `summary` is `result["summary"]` from `eaglebook.bench.run_benchmark`.
    """
    plt = _plt()
    rows = [r for r in summary.get("per_category", []) if r.get("speedup") is not None]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(rows) + 2), 3.4))
    cats = [r["category"] for r in rows] + ["all"]
    vals = [r["speedup"] for r in rows] + [summary.get("speedup") or 0.0]
    colors = ["tab:blue"] * len(rows) + ["tab:orange"]
    bars = ax.bar(cats, vals, color=colors)
    accs = [r.get("accept_length") for r in rows] + [summary.get("eagle", {}).get("accept_length")]
    for b, a in zip(bars, accs):
        if a is not None:
            ax.annotate(f"τ={a:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=8)
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set_ylabel("speedup (x)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def plot_throughput_vs_accept_length(settings: list[dict], baseline_tok_s: float | None = None,
                                     title: str = "Throughput vs accept length across draft settings"):
    """One point per draft setting (num_steps, topk, num_draft_tokens): EAGLE tok/s against
    accept_length, with the baseline's tok/s as a line. Points above the line pay off."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    pts = [r for r in settings if r.get("accept_length") is not None and r.get("eagle_tok_s") is not None]
    for r in pts:
        marker = "o" if r.get("topk", 2) != 1 else "s"
        ax.scatter(r["accept_length"], r["eagle_tok_s"], marker=marker, color="tab:blue")
        ax.annotate(r.get("config", ""), (r["accept_length"], r["eagle_tok_s"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    if baseline_tok_s is None and settings:
        base = [r.get("baseline_tok_s") for r in settings if r.get("baseline_tok_s")]
        baseline_tok_s = sum(base) / len(base) if base else None
    if baseline_tok_s:
        ax.axhline(baseline_tok_s, color="tab:red", ls="--", lw=1, label=f"baseline {baseline_tok_s:.1f} tok/s")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("accept_length (tokens per verification)")
    ax.set_ylabel("EAGLE output tok/s")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_concurrency(rows: list[dict], title: str = "Per-request throughput vs concurrency"):
    """Per-request tok/s (solid) and aggregate tok/s (dashed) against concurrency, for baseline
    and EAGLE; where EAGLE's per-request line meets the baseline's, speculation stops paying."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    colors = {"baseline": "tab:red", "eagle": "tab:blue"}
    for mode in ("baseline", "eagle"):
        for cfg in sorted({r.get("config", "") for r in rows if r["mode"] == mode}):
            sel = sorted((r for r in rows if r["mode"] == mode and r.get("config", "") == cfg),
                         key=lambda r: r["concurrency"])
            if not sel:
                continue
            xs = [r["concurrency"] for r in sel]
            label = mode if not cfg or mode == "baseline" else f"{mode} {cfg}"
            ax.plot(xs, [r["tok_s_per_request"] for r in sel], "o-", color=colors[mode], label=f"{label} per request")
            ax.plot(xs, [r["tok_s"] for r in sel], "x--", color=colors[mode], alpha=0.6, label=f"{label} aggregate")
    levels = sorted({r["concurrency"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tok/s")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
