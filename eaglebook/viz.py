"""Figures for the notebooks. Every helper returns a matplotlib Figure (headless-safe)."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

TRAINABLE, FROZEN, TENSOR = "#cfe3ff", "#e3e3e3", "#ffffff"


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
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5)
        return (x, y, h)

    def arrow(a, b, text=None, style="-|>", color="#333333", rad=0.0):
        ax.annotate("", xy=(b[0], b[1] + b[2] / 2 + 0.05), xytext=(a[0], a[1] - a[2] / 2 - 0.05),
                    arrowprops=dict(arrowstyle=style, color=color, lw=1.2, connectionstyle=f"arc3,rad={rad}"))
        if text:
            ax.text((a[0] + b[0]) / 2 + 0.1, (a[1] + b[1]) / 2, text, fontsize=7.5, color="#555555")

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
    ax.text(9.4, 8.0, "residual", color="#1f5fbf", fontsize=7.5, rotation=90, va="center")
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


def plot_vocab_coverage(sizes, coverage, chosen: int | None = None):
    """Share of (held-out) assistant tokens whose id is in a draft_vocab of each size."""
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.plot(sizes, [100 * c for c in coverage], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("draft_vocab size (most frequent ids)")
    ax.set_ylabel("tokens covered (%)")
    if chosen is not None:
        ax.axvline(chosen, color="#f0a04b", ls="--", label=f"chosen: {chosen}")
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
