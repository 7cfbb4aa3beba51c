"""Pictures for the notebooks: matplotlib Figures and HTML strings, nothing that needs a
browser to exist (a headless papermill run still draws everything)."""
from __future__ import annotations

import html

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
    slider = w.IntSlider(value=0, min=0, max=max(len(dataset) - 1, 0), description="sample")
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


def plot_coverage(curves: dict, draft_vocab: int | None = None):
    """Share of trained tokens the draft vocab covers vs its size: {name: (sizes, coverage)}."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (sizes, cov) in curves.items():
        ax.plot(sizes, cov, marker="o", ms=3, label=name)
    if draft_vocab:
        ax.axvline(draft_vocab, color="grey", ls="--", lw=1)
        ax.text(draft_vocab, 0.02, f" draft_vocab={draft_vocab}", color="grey", fontsize=8)
    ax.set(xscale="log", ylim=(0, 1.02), xlabel="draft vocab size (top-k trained tokens)",
           ylabel="trained tokens covered", title="Draft-vocabulary coverage")
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
