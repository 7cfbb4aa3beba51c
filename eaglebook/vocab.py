"""EAGLE-3's reduced draft vocabulary: which target tokens the draft can propose.

The draft's `lm_head` scores only `draft_vocab` tokens: the ones the target actually says
most often in the training answers (counted over TRAINED tokens only: prompts are never
predicted by the draft). Two maps connect the vocabularies, in the convention SGLang, vLLM
and SpecForge read:

    d2t: int64 [draft_vocab]    target_id = draft_id + d2t[draft_id]
    t2d: bool  [target_vocab]   True where the target token is in the draft vocab

The kept ids are sorted, so `nonzero(t2d) == d2t + arange(draft_vocab)`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class VocabError(ValueError):
    """A draft vocabulary that cannot be built or does not fit; the message says why."""


def trained_token_counts(dataset, target_vocab: int) -> torch.Tensor:
    """How often each target token is trained (loss_mask == 1) in a tokenized dataset."""
    counts = torch.zeros(target_vocab, dtype=torch.int64)
    for ids, mask in zip(dataset["input_ids"], dataset["loss_mask"]):
        t = torch.tensor(ids, dtype=torch.int64)[torch.tensor(mask, dtype=torch.bool)]
        if len(t) and int(t.max()) >= target_vocab:
            raise VocabError(f"token id {int(t.max())} is outside the target vocab ({target_vocab})")
        counts += torch.bincount(t, minlength=target_vocab)
    return counts


def select_draft_ids(counts: torch.Tensor, draft_vocab: int, always_keep=()) -> torch.Tensor:
    """The `draft_vocab` target ids to keep, sorted: `always_keep` (end-of-turn, eos) first, then
    the most frequent trained tokens (ties to the lower id), then, when the data has fewer
    distinct tokens, unused ids from 0 upward as padding (the engines need exactly draft_vocab)."""
    target_vocab = len(counts)
    if not 0 < draft_vocab <= target_vocab:
        raise VocabError(f"draft_vocab must be in 1..{target_vocab} (the target vocab), not {draft_vocab}")
    keep = list(dict.fromkeys(int(i) for i in always_keep))
    if len(keep) > draft_vocab:
        raise VocabError(f"{len(keep)} always-kept ids do not fit in draft_vocab={draft_vocab}")
    chosen = set(keep)
    # A stable sort on -count keeps lower ids first among equal counts.
    for i in torch.argsort(-counts, stable=True).tolist():
        if len(chosen) == draft_vocab or counts[i] == 0:
            break
        chosen.add(i)
    pad = (i for i in range(target_vocab) if i not in chosen)
    while len(chosen) < draft_vocab:
        chosen.add(next(pad))
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def build_vocab_map(counts: torch.Tensor, draft_vocab: int, always_keep=()) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t, t2d) for the top-`draft_vocab` trained tokens; see the module docstring."""
    ids = select_draft_ids(counts, draft_vocab, always_keep)
    d2t = ids - torch.arange(draft_vocab, dtype=torch.int64)
    t2d = torch.zeros(len(counts), dtype=torch.bool)
    t2d[ids] = True
    return d2t, t2d


def draft_to_target(d2t: torch.Tensor) -> torch.Tensor:
    """The target id of every draft id."""
    return d2t + torch.arange(len(d2t), dtype=d2t.dtype, device=d2t.device)


def check_vocab_map(d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """Raise VocabError unless d2t/t2d follow the convention the serving engines read."""
    if d2t.dtype != torch.int64 or t2d.dtype != torch.bool:
        raise VocabError(f"d2t must be int64 and t2d bool, got {d2t.dtype} and {t2d.dtype}")
    ids = draft_to_target(d2t)
    if int(t2d.sum()) != len(d2t):
        raise VocabError(f"t2d marks {int(t2d.sum())} tokens but d2t has {len(d2t)}")
    if not torch.equal(torch.nonzero(t2d).flatten(), ids):
        raise VocabError("nonzero(t2d) != d2t + arange(draft_vocab): ids unsorted or maps disagree")


def coverage(counts: torch.Tensor, t2d: torch.Tensor) -> float:
    """Share of trained tokens that the draft vocab contains."""
    total = int(counts.sum())
    return float(counts[t2d].sum()) / total if total else float("nan")


def coverage_curve(counts: torch.Tensor, sizes=None, rank_by: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
    """Share of the tokens in `counts` covered by the k most frequent tokens, for each k in `sizes`.

    By default the ranking comes from `counts` itself (in-sample: it reaches 1.0 once k covers every
    distinct token). With `rank_by` (e.g. the training split's counts) the top k are chosen there and
    measured on `counts` (e.g. a held-out split): what a draft vocab built from training data covers."""
    total = int(counts.sum())
    if total == 0:
        raise VocabError("no trained tokens to count (is loss_mask all zeros?)")
    if rank_by is not None and rank_by.shape != counts.shape:
        raise VocabError(f"rank_by has {tuple(rank_by.shape)} entries, counts {tuple(counts.shape)}")
    order = torch.argsort(-(counts if rank_by is None else rank_by), stable=True)
    cum = torch.cumsum(counts[order], 0)
    if sizes is None:
        sizes = [2 ** p for p in range(4, 30) if 2 ** p < len(counts)] + [len(counts)]
    return list(sizes), [float(cum[min(k, len(cum)) - 1]) / total for k in sizes]


def save_vocab_map(path: str | os.PathLike, d2t: torch.Tensor, t2d: torch.Tensor, meta: dict | None = None,
                   counts: torch.Tensor | None = None) -> Path:
    """Write d2t/t2d as safetensors (the key names SGLang and vLLM load) with provenance, and
    optionally the token counts the map was chosen from (`load_vocab_counts` reads them back, so a
    later stage can draw the coverage of exactly this map)."""
    from safetensors.torch import save_file

    check_vocab_map(d2t, t2d)
    tensors = {"d2t": d2t.contiguous(), "t2d": t2d.contiguous()}
    if counts is not None:
        if counts.shape != t2d.shape:
            raise VocabError(f"counts has {tuple(counts.shape)} entries, t2d {tuple(t2d.shape)}: "
                             "count over the same target vocabulary")
        tensors["counts"] = counts.to(torch.int64).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"eaglebook": json.dumps(meta or {}, sort_keys=True)})
    return path


def load_vocab_map(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
        meta = json.loads((f.metadata() or {}).get("eaglebook", "{}"))
    check_vocab_map(d2t, t2d)
    return d2t, t2d, meta


def load_vocab_counts(path: str | os.PathLike) -> torch.Tensor | None:
    """The token counts a saved map was chosen from, or None when it was saved without them."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("counts") if "counts" in f.keys() else None
