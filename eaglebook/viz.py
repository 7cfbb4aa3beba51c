"""Figures for the notebooks. Every helper returns a matplotlib Figure (headless-safe)."""
from __future__ import annotations

import html

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

TRAINABLE, FROZEN, TENSOR = "#cfe3ff", "#e3e3e3", "#ffffff"

# One look for every figure of the suite: fonts readable at 100% zoom, one dpi on screen and on disk,
# saved figures cropped to their content. Applied when the notebooks import this module.
FIGURE_STYLE = {"figure.dpi": 100, "savefig.dpi": 110, "savefig.bbox": "tight", "font.size": 10,
                "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
                "legend.fontsize": 9, "figure.titlesize": 11}
plt.rcParams.update(FIGURE_STYLE)


# --------------------------------------------------------------------------------------
# Notebook 01: loss masks and data
# --------------------------------------------------------------------------------------

TRAINED_BG = "#b7e4c7"  # green: the draft learns to predict this token
CONTEXT_BG = "#eceff1"  # grey: context only (system/user text, headers, scaffolding)


def _show_token(piece: str) -> str:
    # Make whitespace visible so token boundaries are unambiguous.
    return html.escape(piece.replace(" ", "\u00b7").replace("\n", "\u21b5\n").replace("\t", "\u2192"))


def mask_html(tokenizer, input_ids, loss_mask, max_tokens: int | None = 400, title: str = "") -> str:
    """The loss mask as coloured tokens: one bordered box per token, green where trained."""
    n = len(input_ids) if max_tokens is None else min(len(input_ids), max_tokens)
    pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in input_ids[:n]]
    boxes = []
    for t, m, p in zip(input_ids[:n], loss_mask[:n], pieces):
        bg = TRAINED_BG if m else CONTEXT_BG
        boxes.append(f'<span title="id {t}, mask {m}" style="background:{bg};border:1px solid #90a4ae;'
                     f'border-radius:3px;margin:1px;padding:0 2px;white-space:pre-wrap">{_show_token(p)}</span>')
    more = f"<div><i>... {len(input_ids) - n} more tokens</i></div>" if n < len(input_ids) else ""
    legend = (f'<div style="margin-bottom:4px"><span style="background:{TRAINED_BG};padding:0 4px">trained '
              f'(loss_mask=1): {sum(loss_mask)}</span> <span style="background:{CONTEXT_BG};padding:0 4px">'
              f'context (loss_mask=0): {len(loss_mask) - sum(loss_mask)}</span></div>')
    head = f"<h4>{html.escape(title)}</h4>" if title else ""
    return (f'<div style="font-family:monospace;font-size:12px;line-height:1.9">{head}{legend}'
            f'{"".join(boxes)}{more}</div>')


def sample_browser(dataset, tokenizer, max_tokens: int = 400):
    """An ipywidgets slider over samples, drawn over a static first sample (which is what a
    headless run keeps). Returns the widget, or None when ipywidgets is missing."""
    from IPython.display import HTML, display

    def render(i: int) -> str:
        row = dataset[i]
        return mask_html(tokenizer, row["input_ids"], row["loss_mask"], max_tokens,
                         title=f"sample {i}: {row.get('id', '')} ({len(row['input_ids'])} tokens)")

    display(HTML(render(0)))
    try:
        import ipywidgets as w
    except ImportError:
        return None
    out = w.HTML(render(0))
    slider = w.IntSlider(value=0, min=0, max=max(len(dataset) - 1, 0), description="sample",
                         continuous_update=False)  # redraw once the slider is let go, not while it moves
    slider.observe(lambda change: setattr(out, "value", render(change["new"])), names="value")
    return w.VBox([slider, out])


def plot_lengths(datasets: dict, bins: int = 30):
    """Histograms of sequence length and of the trained fraction per sample, one series per
    dataset (e.g. {"ShareGPT answers": ds1, "regenerated": ds2})."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, ds in datasets.items():
        lengths = [len(x) for x in ds["input_ids"]]
        frac = [sum(m) / max(len(m), 1) for m in ds["loss_mask"]]
        a.hist(lengths, bins=bins, alpha=0.6, label=name)
        b.hist(frac, bins=bins, range=(0, 1), alpha=0.6, label=name)
    a.set(xlabel="tokens per sample", ylabel="samples", title="Sequence length")
    b.set(xlabel="trained tokens / all tokens", title="Trained fraction per sample")
    a.legend()
    fig.tight_layout()
    return fig


def plot_coverage(curves: dict, draft_vocab: int | None = None, reference: tuple = (),
                  title: str = "Draft-vocabulary coverage"):
    """Share of tokens the draft vocab covers vs its size: {name: (sizes, coverage)}, e.g. the
    trained tokens it was chosen from and a held-out split's answers. Curves named in `reference`
    (an in-sample curve, say) are drawn dotted grey: for comparison, not the measurement."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, (sizes, cov) in curves.items():
        if name in reference:
            ax.plot(sizes, cov, ls=":", color="grey", label=name)
        else:
            ax.plot(sizes, cov, marker="o", ms=3, label=name)
    if draft_vocab:
        ax.axvline(draft_vocab, color="grey", ls="--", lw=1)
        ax.text(draft_vocab, 0.02, f" draft_vocab={draft_vocab}", color="grey", fontsize=9)
    ax.set(xscale="log", ylim=(0, 1.02), xlabel="draft vocab size (top-k counted tokens)",
           ylabel="tokens covered", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_skips(report, ax=None):
    """Skipped records by reason (a NormalizeReport) as horizontal bars."""
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, max(1.8, 0.8 + 0.35 * len(report.skipped))))
    items = report.skipped.most_common()
    ax.barh([r for r, _ in items][::-1], [n for _, n in items][::-1], color="#e57373")
    ax.set(xlabel="records", title=f"{report.source}: {report.n_skipped} of {report.read} skipped")
    if fig is not None:
        fig.tight_layout()
    return fig or ax.figure


# --------------------------------------------------------------------------------------
# The suite: the pipeline the notebooks walk (notebook 00 and the README)
# --------------------------------------------------------------------------------------

PIPELINE_STAGES = {  # notebook number: (short title, what it does)
    "00": ("setup", "the target model,\nspeculative decoding"),
    "01": ("data", "loss masks, the target's\nown answers, draft vocab"),
    "02": ("hidden states", "low/mid/high + final\nfeatures, stored"),
    "03": ("draft head", "one decoder layer\nover the features"),
    "04": ("TTT training", "the head learns to\nguess the target"),
    "05": ("tree decoding", "draft, verify, accept:\nthe target's own tokens"),
    "06": ("benchmarks", "accept length, speedup;\nSGLang / vLLM"),
}
PIPELINE_STEPS = {  # what each notebook hands the next one (drawn on the arrow after it)
    "00": "target", "01": "dataset +\nd2t/t2d", "02": "features", "03": "untrained\nhead",
    "04": "trained\nhead", "05": "engine", "06": "numbers",
}


PIPELINE_OUTPUTS = {  # what each notebook leaves in run_dir for the next one, relative to its own folder
    "00": ("results.json",),
    "01": ("regenerated", "vocab_map.safetensors"),
    "02": ("features/index.json",),
    "03": ("draft/config.json",),
    "04": ("draft/config.json",),
    "05": ("results.json",),
    "06": ("results.json",),
}
DONE_COLOR, MISSING_COLOR = "#2a9d8f", "#9e9e9e"


def pipeline_status(run_dir, notebooks: list | None = None) -> dict[str, bool]:
    """Which stages' outputs are on disk in `run_dir`: {"01": True, ...}. A stage counts as done
    when every file of `PIPELINE_OUTPUTS` is in its folder `{run_dir}/{NN-slug}/`."""
    from pathlib import Path

    from .runner import notebook_paths

    run_dir = Path(run_dir)
    status = {}
    for p in notebooks or notebook_paths():
        num = p.stem[:2]
        status[num] = all((run_dir / p.stem / f).exists() for f in PIPELINE_OUTPUTS.get(num, ("results.json",)))
    return status


def plot_pipeline(notebooks: list | None = None, highlight: str | None = None, run_dir=None):
    """The suite as a pipeline: one box per numbered notebook (its number on its own, a short title,
    what it does) and, on each arrow, what it hands the next one. `highlight` ("00".."06") marks
    the notebook the reader is in. With `run_dir`, each box also says whether that stage's
    outputs are on disk there (a later notebook reads them, or builds small ones itself)."""
    from .runner import notebook_paths

    paths = notebooks or notebook_paths()
    nums = [p.stem[:2] for p in paths]
    status = pipeline_status(run_dir, paths) if run_dir is not None else None
    n = len(nums)
    fig, ax = plt.subplots(figsize=(2.3 * n, 2.9 if status else 2.5))
    w, h, gap = 1.6, 1.4, 0.8
    for i, num in enumerate(nums):
        name, what = PIPELINE_STAGES.get(num, ("", ""))
        x = i * (w + gap)
        here = highlight is not None and num == str(highlight)[:2]
        ax.add_patch(FancyBboxPatch((x, 0), w, h, boxstyle="round,pad=0.04",
                                    facecolor="#ffd6a5" if here else TRAINABLE,
                                    edgecolor="#e76f51" if here else "#4a6fa5", lw=2.2 if here else 1.2))
        ax.text(x + w / 2, h - 0.2, num, ha="center", va="center", fontsize=12, weight="bold")
        ax.text(x + w / 2, h - 0.48, name, ha="center", va="center", fontsize=10, weight="bold")
        ax.text(x + w / 2, 0.36, what, ha="center", va="center", fontsize=8, color="#333333")
        if status is not None:
            done = status[num]
            ax.text(x + w / 2, -0.3, "\u2713 on disk" if done else "\u25cb not yet", ha="center", va="center",
                    fontsize=9, color=DONE_COLOR if done else MISSING_COLOR, weight="bold" if done else "normal",
                    gid=f"status-{num}")
        if i < n - 1:
            ax.annotate("", xy=(x + w + gap - 0.03, h / 2), xytext=(x + w + 0.03, h / 2),
                        arrowprops=dict(arrowstyle="-|>", color="#555555", lw=1.3))
            ax.text(x + w + gap / 2, h / 2 + 0.1, PIPELINE_STEPS.get(num, ""), ha="center", va="bottom",
                    fontsize=8, color="#555555", style="italic")
    ax.set_xlim(-0.15, n * (w + gap) - gap + 0.15)
    ax.set_ylim(-0.55 if status else -0.2, h + 0.2)
    ax.axis("off")
    title = "eaglebook: one notebook per stage, each reads what the one before wrote into run_dir"
    if highlight:
        title += "  (you are here: orange)"
    if status is not None:
        title += f"\n{run_dir}: {sum(status.values())} of {n} stages on disk"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# Notebook 03: the draft head
# --------------------------------------------------------------------------------------

def draw_eagle3_head(config, draft_vocab_size: int | None = None):
    """The EAGLE-3 head as a block diagram, every box labelled with its shape for `config`
    (a draft config from `draft_config_from_target`). Blue: trained; grey: the target's, frozen."""
    H, I = config.hidden_size, config.intermediate_size
    Ht = getattr(config, "target_hidden_size", H)
    Vd = draft_vocab_size or getattr(config, "draft_vocab_size", config.vocab_size)
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    fig, ax = plt.subplots(figsize=(10, 8))
    ax.set_xlim(0.3, 10)
    ax.set_ylim(0.4, 12.8)
    ax.axis("off")

    def box(x, y, text, color, w=3.0, h=0.8):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05",
                                    fc=color, ec="#333333", lw=1))
        ax.text(x, y, text, ha="center", va="center", fontsize=9)
        return (x, y, h)

    def arrow(a, b, text=None, style="-|>", color="#333333", rad=0.0):
        ax.annotate("", xy=(b[0], b[1] + b[2] / 2 + 0.05), xytext=(a[0], a[1] - a[2] / 2 - 0.05),
                    arrowprops=dict(arrowstyle=style, color=color, lw=1.2, connectionstyle=f"arc3,rad={rad}"))
        if text:
            ax.text((a[0] + b[0]) / 2 + 0.1, (a[1] + b[1]) / 2, text, fontsize=8.5, color="#555555")

    feats = box(7.0, 12.3, f"target features low | mid | high\n[T, 3×{Ht}]", TENSOR, w=3.6)
    ids = box(2.6, 12.3, "next tokens x(t+1)\n[T]", TENSOR, w=2.6)
    fc = box(7.0, 10.9, f"fc  {3 * Ht} → {H}  (no bias)", TRAINABLE)
    emb = box(2.6, 10.9, f"embed_tokens  [{config.vocab_size}, {H}]\n(the target's, frozen)", FROZEN, w=3.4)
    hn = box(7.0, 9.5, f"hidden_norm  [{H}]", TRAINABLE)
    ln = box(2.6, 9.5, f"input_layernorm  [{H}]", TRAINABLE)
    cat = box(4.8, 8.1, f"cat(embedding, feature)  [T, {2 * H}]", TENSOR, w=4.0)
    att = box(4.8, 6.7, f"self_attn: q {2 * H}→{q}, k/v {2 * H}→{kv}\no {q}→{H}  (RoPE, causal, KV cache)",
              TRAINABLE, w=4.6, h=0.9)
    add1 = box(4.8, 5.3, "+ residual (the fc output / previous h)", TENSOR, w=4.0)
    mlp = box(4.8, 3.9, f"post_attention_layernorm, MLP {H}→{I}→{H}, + residual", TRAINABLE, w=5.0)
    out = box(4.8, 2.5, f"h  [T, {H}]  (pre-norm)", TENSOR)
    head = box(2.6, 1.0, f"norm, lm_head  {H} → {Vd}\nlogits over draft_vocab (d2t → target ids)", TRAINABLE,
               w=4.0, h=0.9)
    nxt = box(7.6, 1.0, "the next draft step's feature\n(replaces fc's output; skips fc)", TENSOR, w=3.6, h=0.9)
    arrow(feats, fc)
    arrow(ids, emb)
    arrow(fc, hn)
    arrow(emb, ln)
    arrow(hn, cat)
    arrow(ln, cat)
    arrow(cat, att)
    arrow(att, add1)
    arrow(add1, mlp)
    arrow(mlp, out)
    arrow(out, head)
    arrow(out, nxt)
    # the residual skips the norms and attention: it is the fc output itself
    ax.plot([8.55, 9.3, 9.3], [10.9, 10.9, 5.3], color="#1f5fbf", lw=1.2, ls="--")
    ax.annotate("", xy=(6.85, 5.3), xytext=(9.3, 5.3),
                arrowprops=dict(arrowstyle="-|>", color="#1f5fbf", lw=1.2, ls="--"))
    ax.text(9.4, 8.0, "residual", color="#1f5fbf", fontsize=8.5, rotation=90, va="center")
    ax.set_title("EAGLE-3 draft head: one decoder layer over cat(embedding, fused target features)", fontsize=10)
    return fig


def plot_parameter_budget(rows: dict[str, dict[str, int]], target_params: dict[str, int]):
    """Stacked bars: each head's trainable parameters (fc, decoder layer, norm, lm_head) as a
    percentage of its target's parameters. `rows[name]` comes from `count_parameters`."""
    parts = [("fc", "fc"), ("midlayer", "decoder layer"), ("norm", "norm"), ("lm_head", "lm_head")]
    colors = ["#8fb8ff", "#3d7be0", "#999999", "#f0a04b"]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.7 * len(rows)))
    names = list(rows)
    for i, name in enumerate(names):
        left = 0.0
        for (key, label), c in zip(parts, colors):
            pct = 100.0 * rows[name].get(key, 0) / target_params[name]
            ax.barh(i, pct, left=left, color=c, label=label if i == 0 else None)
            left += pct
        ax.text(left + 0.3, i, f"{left:.1f}%", va="center", fontsize=9)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("trainable draft parameters, % of the target's")
    ax.legend(loc="lower right", fontsize=8, ncol=4)
    ax.set_xlim(0, max(ax.get_xlim()[1], 5) * 1.12)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# 04 · TTT training
# --------------------------------------------------------------------------------------

def plot_ttt_mask(T: int = 8, steps: int = 3):
    """The TTT attention mask: queries of step k (rows) over the keys of steps 0..k (columns)."""
    import matplotlib.pyplot as plt

    from .train import ttt_mask

    fig, axes = plt.subplots(1, steps, figsize=(3.2 * steps, 3.0), gridspec_kw={"width_ratios": list(range(1, steps + 1))})
    for k, ax in enumerate(axes if steps > 1 else [axes]):
        m = ttt_mask(T, k)[0, 0].float().numpy()
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1.3, aspect="equal", interpolation="nearest")
        for s in range(1, k + 1):
            ax.axvline(s * T - 0.5, color="black", lw=1)
        ax.set_title(f"step {k}: keys of steps 0..{k}", fontsize=9)
        ax.set_xlabel("key (step, position)")
        ax.set_xticks([s * T + T / 2 - 0.5 for s in range(k + 1)], [f"step {s}" for s in range(k + 1)], fontsize=8)
        ax.set_yticks(range(T))
        if k == 0:
            ax.set_ylabel("query position t")
    fig.suptitle("Each query sees the true prefix (causal) and its own chain (diagonal)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_training_curves(log_csv, ttt_steps: int):
    """Loss (left) and accuracy per TTT position (right) over training, from the Trainer's CSV log."""
    import csv

    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(log_csv)))
    train = [r for r in rows if r.get("loss")]
    evals = [r for r in rows if r.get("eval_acc_0")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.plot([int(r["step"]) for r in train], [float(r["loss"]) for r in train], label="train loss (weighted sum)")
    if evals:
        a.plot([int(r["step"]) for r in evals], [float(r["eval_loss"]) for r in evals], "o-", label="held-out loss")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.legend()
    cmap = plt.get_cmap("viridis")
    src, key = (evals, "eval_acc_") if len(evals) > 1 else (train, "train_acc_")
    for k in range(ttt_steps):
        pts = [(int(r["step"]), float(r[f"{key}{k}"])) for r in src if r.get(f"{key}{k}")]
        if pts:
            b.plot(*zip(*pts), color=cmap(k / max(1, ttt_steps - 1)), label=f"position {k}")
    b.set_xlabel("step")
    b.set_ylabel("top-1 accuracy" + (" (held out)" if src is evals else " (train batches)"))
    b.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_step_accuracy(runs: dict[str, dict], ttt_steps: int, prefix: str = "eval_"):
    """Bars of accuracy and conditional accuracy per TTT position, one colour per run."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
    w = 0.8 / max(1, len(runs))
    x = np.arange(ttt_steps)
    for i, (name, m) in enumerate(runs.items()):
        for ax, key in zip(axes, ("acc_", "cond_acc_")):
            ax.bar(x + i * w, [m[f"{prefix}{key}{k}"] for k in range(ttt_steps)], w,
                   label=f"{name} (tau_sim {m[f'{prefix}tau_sim']:.2f})")
    for ax, title in zip(axes, ("accuracy per position", "conditional accuracy (previous steps right)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("TTT position k")
        ax.set_xticks(x + w * (len(runs) - 1) / 2, [str(k) for k in range(ttt_steps)])
    axes[0].set_ylabel("top-1 agreement with the target")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# Notebook 06: benchmarks
# --------------------------------------------------------------------------------------

def plot_speedup_by_category(summary: dict, title: str = "EAGLE speedup per category"):
    """Bars of speedup (EAGLE tok/s / baseline tok/s) per prompt category, accept_length on top.

    `summary` is `result["summary"]` from `eaglebook.bench.run_benchmark`.
    """
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


def plot_lanes(lanes: list[dict], title: str = "EAGLE beside its peers, same prompts, one run"):
    """Left: speedup of every lane over the one baseline (accept length on the bar where known).
    Right: per category, the best lane of EAGLE alone against the best prompt-lookup lane.

    `lanes` is `result["lanes"]` from `eaglebook.bench.run_benchmark` (in-process, with peers).
    """
    rows = [r for r in lanes if r["mode"] != "baseline" and r.get("speedup") is not None]
    colors = {"eagle": "tab:blue", "generate": "tab:gray", "prompt_lookup": "tab:green"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1.3]})
    bars = a1.barh([r["lane"] for r in rows], [r["speedup"] for r in rows],
                   color=[colors.get(r["mode"], "tab:purple") for r in rows])
    for b, r in zip(bars, rows):
        if r.get("accept_length"):
            a1.annotate(f" τ={r['accept_length']:.2f}", (b.get_width(), b.get_y() + b.get_height() / 2),
                        va="center", fontsize=8)
    a1.axvline(1.0, color="gray", ls="--", lw=1)
    a1.invert_yaxis()
    a1.set_xlabel("speedup over eaglebook's greedy baseline (x)")
    a1.set_title(title, fontsize=10)

    from .bench.tables import lane_kind

    def best(kind):  # "eagle" is EAGLE's tree alone: the merged drafter (`+ngN`) is not EAGLE here
        cands = [r for r in rows if lane_kind(r["mode"], r.get("config", "")) == kind]
        return max(cands, key=lambda r: r["speedup"]) if cands else None

    e, pl = best("eagle"), best("prompt_lookup")
    if e and pl:
        cats = [c["category"] for c in e["per_category"]]
        pe = {c["category"]: c["speedup"] or 0 for c in e["per_category"]}
        pp = {c["category"]: c["speedup"] or 0 for c in pl["per_category"]}
        x = range(len(cats))
        a2.bar([i - 0.2 for i in x], [pe[c] for c in cats], 0.4, label=e["lane"], color="tab:blue")
        a2.bar([i + 0.2 for i in x], [pp.get(c, 0) for c in cats], 0.4, label=pl["lane"], color="tab:green")
        a2.set_xticks(list(x), cats, rotation=30, fontsize=8)
        a2.axhline(1.0, color="gray", ls="--", lw=1)
        a2.set_ylabel("speedup (x)")
        a2.set_title("per category: best EAGLE (alone) vs best prompt lookup", fontsize=10)
        a2.legend(fontsize=8)
    else:
        a2.set_axis_off()
    fig.tight_layout()
    return fig


def plot_throughput_vs_accept_length(settings: list[dict], baseline_tok_s: float | None = None,
                                     title: str = "Throughput vs accept length across draft settings"):
    """One point per draft setting (num_steps, topk, num_draft_tokens): EAGLE tok/s against
    accept_length, with the baseline's tok/s as a line. Points above the line pay off."""
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


# --------------------------------------------------------------------------------------
# Notebook 05: tree decoding
# --------------------------------------------------------------------------------------

def _token_label(tokenizer, tid: int, width: int = 10) -> str:
    if tokenizer is None:
        return str(tid)
    text = tokenizer.decode([tid]).replace("\n", "\\n")
    return (text if len(text) <= width else text[: width - 1] + "…") or repr(text)


def _tree_layout(parents: list[int], depths: list[int]) -> dict[int, tuple[float, float]]:
    """x = depth; y = leaves spread evenly, inner nodes centred over their children."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        if p >= 0:
            children.setdefault(p, []).append(i)
    pos: dict[int, tuple[float, float]] = {}
    next_leaf = [0.0]

    def place(i):
        kids = children.get(i, [])
        if not kids:
            y = next_leaf[0]
            next_leaf[0] += 1.0
        else:
            y = sum(place(c) for c in kids) / len(kids)
        pos[i] = (float(depths[i]), -y)
        return y

    place(0)
    return pos


def draw_draft_tree(tree, tokenizer=None, accepted_nodes=None, bonus_token: int | None = None,
                    title: str | None = None, figsize=None):
    """The draft tree of one step: node = token and its draft probability given its parent
    (cumulative in brackets); the accepted path is highlighted, the bonus token drawn after it."""
    import math

    import networkx as nx

    acc = set(accepted_nodes or [])
    g = nx.DiGraph()
    labels, colors = {}, []
    for i, t in enumerate(tree.tokens):
        g.add_node(i)
        if tree.parents[i] >= 0:
            g.add_edge(tree.parents[i], i)
        if i == 0:
            labels[i] = f"root\n{_token_label(tokenizer, t)}"
        else:
            cond = math.exp(tree.scores[i] - tree.scores[tree.parents[i]])
            labels[i] = f"{_token_label(tokenizer, t)}\n{cond:.2g} ({math.exp(tree.scores[i]):.2g})"
    pos = _tree_layout(tree.parents, tree.depths)
    if bonus_token is not None and accepted_nodes:
        last = accepted_nodes[-1]
        b = len(tree.tokens)
        g.add_node(b)
        g.add_edge(last, b)
        labels[b] = f"bonus\n{_token_label(tokenizer, bonus_token)}"
        # one column right of the last accepted node, below everything so it overlaps nothing
        pos[b] = (pos[last][0] + 1, min(y for _, y in pos.values()) - 1)
    for i in g.nodes:
        colors.append("#f4a261" if i == len(tree.tokens) else "#2a9d8f" if i in acc else "#e9ecef")
    depth = max(tree.depths) + 2
    leaves = max(1, sum(1 for i in range(len(tree.tokens)) if i not in set(tree.parents)))
    fig, ax = plt.subplots(figsize=figsize or (2.2 * depth + 1, 0.75 * leaves + 1.5))
    path_edges = [(a, b) for a, b in zip(accepted_nodes or [], (accepted_nodes or [])[1:])]
    if bonus_token is not None and accepted_nodes:
        path_edges.append((accepted_nodes[-1], len(tree.tokens)))
    nx.draw_networkx_edges(g, pos, ax=ax, edge_color="#adb5bd", arrows=False)
    nx.draw_networkx_edges(g, pos, edgelist=path_edges, ax=ax, edge_color="#2a9d8f", width=3, arrows=False)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, node_size=1500, edgecolors="#495057")
    nx.draw_networkx_labels(g, pos, labels=labels, ax=ax, font_size=7)
    ax.set_title(title or f"draft tree: {len(tree.tokens)} nodes; accepted path in green, bonus in orange")
    ax.set_xlabel("depth")
    ax.axis("off")
    fig.tight_layout()
    return fig


def plot_tree_mask(tree, tokenizer=None, title: str | None = None):
    """The tree attention mask (tree part): row = query node, column = key node it may see.
    Every node also sees the whole prefix, which is not drawn."""
    m = tree.mask.cpu().numpy()
    n = m.shape[0]
    fig, ax = plt.subplots(figsize=(0.32 * n + 2, 0.32 * n + 1.5))
    ax.imshow(m, cmap="Greens", vmin=0, vmax=1.3)
    labels = [f"{i}:{_token_label(tokenizer, t, 8)}" for i, t in enumerate(tree.tokens)]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("key node")
    ax.set_ylabel("query node")
    ax.set_title(title or "tree attention mask (prefix columns omitted: all visible)")
    fig.tight_layout()
    return fig


def plot_accept_lengths(accept_lengths, max_length: int | None = None, title: str | None = None):
    """Histogram of tokens gained per verification step (accepted drafts + bonus)."""
    import numpy as np

    a = np.asarray(list(accept_lengths))
    top = int(max_length or (a.max() if a.size else 1))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(a, bins=np.arange(0.5, top + 1.5, 1.0), color="#2a9d8f", edgecolor="white")
    if a.size:
        ax.axvline(a.mean(), color="#e76f51", linestyle="--", label=f"mean {a.mean():.2f}")
        ax.legend()
    ax.set_xlabel("tokens per verification step (accept_length)")
    ax.set_ylabel("steps")
    ax.set_xticks(range(1, top + 1))
    ax.set_title(title or "accept lengths")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# Notebook 00: one generation, coloured by verification step
# --------------------------------------------------------------------------------------

STEP_COLORS = ["#a8dadc", "#ffd6a5", "#caffbf", "#bdb2ff", "#ffadad", "#fdffb6", "#9bf6ff", "#ffc6ff"]
PREFILL_COLOR = "#dee2e6"


def plot_accepted_tokens(tokenizer, result, max_tokens: int = 120, width: float = 10.0, title: str | None = None):
    """One generation, token by token, coloured by the verification step that produced it.

    `result` is an `EagleDecoder.generate` result. The first token comes from the prefill (grey);
    every later run of one colour is one target forward pass: the draft tokens it accepted, then
    its bonus token (dashed edge). Long runs of one colour are where the draft guessed well."""
    from matplotlib.patches import Patch

    origin = [("prefill", 0, False)]  # (label, step index, is_bonus) per generated token
    for s, st in enumerate(result.steps):
        k = len(st.new_tokens)
        bonus_at = len(st.accepted_nodes) - 1  # accepted drafts come first, the bonus after them
        origin += [(f"step {s + 1}", s + 1, j == bonus_at) for j in range(k)]
    ids = list(result.token_ids)[:max_tokens]
    origin = origin[:len(ids)]
    pieces = [_show_raw(tokenizer.decode([t])) for t in ids]
    fig = plt.figure(figsize=(width, 1.0))
    renderer = fig.canvas.get_renderer()
    dpi_w = fig.dpi * width
    x, line, boxes = 0.0, 0, []
    pad = 6.0  # pixels between boxes
    for piece, (label, step, bonus) in zip(pieces, origin):
        t = fig.text(0, 0, piece, fontsize=9, family="monospace")
        wpx = t.get_window_extent(renderer).width
        t.remove()
        if x + wpx + pad > dpi_w - 10 and x > 0:
            x, line = 0.0, line + 1
        boxes.append((x, line, piece, step, bonus))
        x += wpx + pad
    lines = line + 1
    height = 0.9 + 0.32 * lines
    fig.set_size_inches(width, height)
    ax = fig.add_axes([0, 0.35 / height, 1, 1 - 0.8 / height])
    ax.set_xlim(0, dpi_w)
    ax.set_ylim(lines, -0.2)
    ax.axis("off")
    for x, line, piece, step, bonus in boxes:
        color = PREFILL_COLOR if step == 0 else STEP_COLORS[(step - 1) % len(STEP_COLORS)]
        ax.text(x + 5, line + 0.45, piece, fontsize=9, family="monospace", va="center",
                bbox=dict(boxstyle="round,pad=0.2", facecolor=color,
                          edgecolor="#333333" if bonus else color, linestyle="--" if bonus else "-", lw=1.0))
    n_steps = len(result.steps)
    shown = f" (first {len(ids)} of {len(result.token_ids)} tokens)" if len(ids) < len(result.token_ids) else ""
    fig.suptitle(title or f"{len(result.token_ids)} tokens in {n_steps} verification steps: accept length "
                 f"{result.accept_length:.2f}{shown}", fontsize=10, y=1 - 0.12 / height, va="top")
    fig.legend(handles=[Patch(facecolor=PREFILL_COLOR, label="from the prefill"),
                        Patch(facecolor=STEP_COLORS[0], label="one colour = one verification step"),
                        Patch(facecolor="white", edgecolor="#333333", linestyle="--", label="bonus token")],
               loc="lower center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    return fig


def _show_raw(piece: str) -> str:
    # Visible whitespace, as in mask_html, but plain text for matplotlib (no HTML escaping; $ would start math).
    return piece.replace(" ", "\u00b7").replace("\n", "\u21b5").replace("\t", "\u2192").replace("$", r"\$") or "\u2205"


# --------------------------------------------------------------------------------------
# Notebook 02: hidden states
# --------------------------------------------------------------------------------------

def plot_aux_layer_choice(rows: dict):
    """One row per model: its layers as squares (blue: full attention, grey: sliding window) and the
    three captured aux states ringed in red. `rows[name]` = (num_layers, layer_types or None,
    chosen SGLang ids), e.g. from `hidden_states.explain_aux_layers`."""
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.65 * len(rows)))
    for y, (name, (n, types, chosen)) in enumerate(rows.items()):
        kinds = types or ["full_attention"] * n
        ax.scatter(range(n), [y] * n, c=["C0" if k == "full_attention" else "C7" for k in kinds], marker="s", s=25)
        ax.scatter(chosen, [y] * len(chosen), facecolors="none", edgecolors="C3", s=140, linewidths=2)
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("layer i (SGLang id i: the captured state is its output = HF index i+1)")
    ax.set_title("aux layers (red rings) on full-attention (blue) and sliding-window (grey) layers")
    fig.tight_layout()
    return fig


def plot_capture_throughput(timing: dict, title: str = ""):
    """Tokens/s of the base forward, the full forward with logits and capture, from
    `hidden_states.time_capture_vs_forward`."""
    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    keys = ["base_forward_tok_s", "full_forward_tok_s", "capture_tok_s"]
    ax.barh(["base forward", "model(...) with logits", "capture"], [timing[k] for k in keys], color=["C0", "C7", "C2"])
    ax.set_xlabel("tokens / s")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_layer_norms(norms, cos, first, aux_layers):
    """Left: the L2 norm of every hidden_states[j] (mean over tokens, the first token apart).
    Right: the mean cosine similarity between layers. `norms` [N+1, tokens], `cos` [N+1, N+1],
    `first` a bool mask over tokens marking each sequence's first token."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(norms[:, ~first].mean(1), label="mean over tokens (first token excluded)")
    a1.plot(norms[:, first].mean(1), label="first token of each sequence")
    for j in aux_layers:
        a1.axvline(j, color="C2", ls=":")
    a1.set(yscale="log", xlabel="HF index j (hidden_states[j])", ylabel="L2 norm",
           title="norm per layer (dotted: aux layers)")
    a1.legend()
    im = a2.imshow(cos, cmap="viridis", vmin=0, vmax=1)
    a2.set(title="mean cosine similarity between layers", xlabel="j", ylabel="i")
    fig.colorbar(im, ax=a2)
    fig.tight_layout()
    return fig


def plot_storage_error(rows: dict, blocks: list, title: str = "What storage loses, against a float32 reference"):
    """Grouped bars (log scale) of relative L2 error per feature block, one bar per row of `rows`
    ({name: [error per block]}); rows named "computed ..." are drawn grey."""
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(rows)
    for i, (name, e) in enumerate(rows.items()):
        ax.bar([b + i * width for b in range(len(blocks))], [max(v, 1e-12) for v in e], width, label=name,
               color="C7" if name.startswith("computed") else f"C{i}")
    ax.set_xticks([b + 0.4 - width / 2 for b in range(len(blocks))], blocks)
    ax.set(yscale="log", ylabel="relative L2 error vs float32", title=title)
    ax.legend(ncol=min(5, len(rows)), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_disk_cost(curves: dict, xlabel: str, reference: tuple | None = None):
    """Feature-store size against dataset size, log-log: {name: (conversations, GB)}; `reference`
    = (GB, label) draws a dotted line at a published figure."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for name, (xs, gb) in curves.items():
        ax.plot(xs, gb, marker="o", label=name)
    if reference:
        ax.axhline(reference[0], color="k", ls=":", lw=1)
        ax.text(min(min(xs) for xs, _ in curves.values()), reference[0] * 1.08, reference[1], fontsize=9)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="disk (GB)", title="feature store size vs dataset size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# Notebooks 04-06: survivors, sampling, the draft setting for a head, spread of speedups
# --------------------------------------------------------------------------------------

def plot_conditional_accuracy(runs: dict[str, dict], title: str | None = None):
    """Conditional accuracy per TTT position with the number of positions it is measured on.

    `runs` maps a name to {"cond": [c_0, ...], "survivors": [n_0, ...]}: c_k is measured only
    over the n_k positions where steps 0..k-1 were all right, so a late c_k over a handful of
    survivors is a noisy estimate, not a head that got better at step k."""
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    w = 0.8 / max(1, len(runs))
    for i, (name, r) in enumerate(runs.items()):
        x = np.arange(len(r["cond"])) + i * w
        bars = a.bar(x, r["cond"], w, label=name)
        for xi, c, n in zip(x, r["cond"], r["survivors"]):
            a.annotate(f"{int(n)}", (xi, c), ha="center", va="bottom", fontsize=7)
        b.plot(np.arange(len(r["survivors"])), r["survivors"], "o-", color=bars.patches[0].get_facecolor(),
               label=name)
    k = max(len(r["cond"]) for r in runs.values())
    a.set_xticks(np.arange(k) + w * (len(runs) - 1) / 2, [str(i) for i in range(k)])
    a.set_xlabel("TTT position k (bar label: positions measured)")
    a.set_ylabel("conditional accuracy")
    a.legend(fontsize=8)
    b.set_yscale("log")
    b.set_xticks(range(k))
    b.set_xlabel("TTT position k")
    b.set_ylabel("positions with steps 0..k-1 right")
    b.legend(fontsize=8)
    fig.suptitle(title or "Conditional accuracy, and how many positions it is measured on", fontsize=11)
    fig.tight_layout()
    return fig


def plot_sampling_check(p, observed: dict[str, list[int]], tokens: list[int], labels: list[str],
                        children: list[int] = (), title: str | None = None):
    """Bars of the target's probability p over `tokens` (plus 'other') beside the empirical
    frequencies of each sampler in `observed` (name -> list of emitted token ids); the draft's
    children are marked with a star."""
    import numpy as np

    p = np.asarray(p, dtype=float)
    shown = list(tokens)
    x = np.arange(len(shown) + 1)
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(x) + 2), 3.6))
    series = {"target p": np.append(p[shown], max(0.0, 1 - p[shown].sum()))}
    for name, seen in observed.items():
        seen = np.asarray(seen)
        freq = [(seen == t).mean() for t in shown]
        series[f"{name} ({len(seen)} draws)"] = np.append(freq, 1 - sum(freq))
    w = 0.8 / len(series)
    for i, (name, v) in enumerate(series.items()):
        ax.bar(x + i * w, v, w, label=name, color="#adb5bd" if i == 0 else None)
    star = set(children)
    ax.set_xticks(x + w * (len(series) - 1) / 2,
                  [("*" if t in star else "") + lab for t, lab in zip(shown, labels)] + ["other"],
                  rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("probability / frequency")
    ax.legend(fontsize=8)
    ax.set_title(title or "Emitted token: sampled by the tree rule vs the target's distribution (* = drafted child)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_setting_prediction(rows: list[dict], title: str | None = None):
    """Predicted speedup per draft setting (bars) with the measured speedups where a setting was run
    (dots: the run's total; small ticks: each prompt's own ratio). Each row: setting, predicted,
    optionally measured and per_prompt."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 3.6))
    x = np.arange(len(rows))
    ax.bar(x, [r["predicted"] for r in rows], 0.6, color="#cfe3ff", edgecolor="#4a7bb7", label="predicted")
    labelled = False
    for i, r in enumerate(rows):
        if r.get("per_prompt"):
            ax.scatter([i] * len(r["per_prompt"]), r["per_prompt"], marker="_", s=120, color="grey",
                       label=None if labelled else "measured, per prompt")
        if r.get("measured") is not None:
            ax.scatter([i], [r["measured"]], color="tab:red", zorder=3,
                       label=None if labelled else "measured, all prompts")
            labelled = True
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(x, [r["setting"] for r in rows], fontsize=8, rotation=20, ha="right")
    ax.set_ylabel("speedup over greedy (x)")
    ax.set_title(title or "Cost-model prediction per draft setting, and what was measured", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_speedup_spread(per_prompt: dict[str, list[float]], title: str | None = None):
    """One row per configuration: every prompt's own speedup (dots), their median (bar) and the
    1.0x line, so a reader sees the spread behind a single headline number."""
    import numpy as np

    names = list(per_prompt)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.4))
    for i, name in enumerate(names):
        v = np.asarray(per_prompt[name], dtype=float)
        if not v.size:
            continue
        jitter = np.linspace(-0.15, 0.15, v.size) if v.size > 1 else np.zeros(1)
        ax.scatter(v, i + jitter, s=18, alpha=0.7, color="tab:blue")
        ax.plot([np.median(v)] * 2, [i - 0.3, i + 0.3], color="tab:red", lw=2)
        ax.annotate(f"median {np.median(v):.2f}x, {v.min():.2f}-{v.max():.2f}x", (v.max(), i),
                    textcoords="offset points", xytext=(6, -3), fontsize=8)
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("speedup over greedy, per prompt (x)")
    ax.set_title(title or "Per-prompt speedups (red: median)", fontsize=10)
    ax.margins(x=0.25)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# Notebook 06: the head in serving engines
# --------------------------------------------------------------------------------------

def engine_cost_rows(engine: str, result: dict, eagle_mode: str = "eagle") -> list[dict]:
    """One row per EAGLE lane of a `bench` result: the greedy step (ms per token of the run's own
    baseline) against one EAGLE cycle (ms per target pass = accept_length / tok/s), and the cycle in
    greedy steps: the lane beats greedy where its accept length exceeds that (speedup = accept_length
    / cycle_in_steps)."""
    lanes = result.get("lanes") or []
    base = next((r for r in lanes if r["mode"] == "baseline"), None)
    if base is None or not base.get("tok_s"):
        return []
    step = 1000.0 / base["tok_s"]
    rows = []
    for r in lanes:
        if r["mode"] != eagle_mode or not r.get("tok_s") or not r.get("accept_length"):
            continue
        cycle = 1000.0 * r["accept_length"] / r["tok_s"]
        rows.append({"engine": engine, "lane": r["config"], "greedy_ms": round(step, 2), "cycle_ms": round(cycle, 2),
                     "cycle_in_steps": round(cycle / step, 2), "accept_length": r["accept_length"],
                     "speedup": r.get("speedup")})
    return rows


def plot_engine_costs(rows: list[dict], title: str | None = None):
    """Per engine and EAGLE lane: one draft-and-verify cycle measured in greedy steps (bar) beside the
    accept length (dot). EAGLE pays where the dot sits above the bar: speedup = accept_length / cycle."""
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(rows) + 2), 3.8))
    x = range(len(rows))
    ax.bar(x, [r["cycle_in_steps"] for r in rows], color="C7", label="one EAGLE cycle, in greedy steps")
    ax.scatter(x, [r["accept_length"] for r in rows], color="C2", zorder=3, s=60, label="tokens per cycle (accept length)")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['speedup']:.2f}x" if r.get("speedup") else "", (i, max(r["cycle_in_steps"], r["accept_length"])),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=9)
    ax.set_xticks(list(x), [f"{r['engine']}\n{r['lane']}" for r in rows], fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_ylabel("greedy steps / tokens")
    ax.set_title(title or "Where EAGLE pays: tokens per cycle above the cycle's cost (label: measured speedup)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
