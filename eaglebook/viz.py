"""Plot helpers for the notebooks. Each returns a matplotlib Figure (headless-safe)."""
from __future__ import annotations

import matplotlib

matplotlib.use(matplotlib.get_backend() or "Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
