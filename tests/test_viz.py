"""Visualisation helpers return real Figures and HTML with one box per token."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from eaglebook import data, viz, vocab  # noqa: E402


def test_mask_html_marks_every_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    out = data.tokenize_conversation(tok, [{"role": "user", "content": "a <b> & c"},
                                           {"role": "assistant", "content": "ok"}])
    page = viz.mask_html(tok, out["input_ids"], out["loss_mask"])
    assert page.count("<span title=") == len(out["input_ids"])
    assert page.count(viz.TRAINED_BG) == sum(out["loss_mask"]) + 1  # + the legend
    assert "<b>" not in page and "&lt;" in page and "&amp;" in page  # user text is escaped
    assert "\u00b7" in page and "\u21b5" in page  # spaces and newlines are visible
    short = viz.mask_html(tok, out["input_ids"], out["loss_mask"], max_tokens=5)
    assert short.count("<span title=") == 5 and f"{len(out['input_ids']) - 5} more tokens" in short


def test_plots_are_figures(smollm2_tokenizer):
    ds, rep = data.load_sharegpt(limit=10)
    tds, _ = data.tokenize_dataset(ds, smollm2_tokenizer, max_length=512, progress=False)
    fig = viz.plot_lengths({"sharegpt": tds})
    assert len(fig.axes) == 2 and fig.axes[0].patches
    c = vocab.trained_token_counts(tds, len(smollm2_tokenizer))
    fig = viz.plot_coverage({"train": vocab.coverage_curve(c)}, draft_vocab=2048)
    assert fig.axes[0].lines
    rep.skip("demo reason")
    assert viz.plot_skips(rep).axes[0].patches
