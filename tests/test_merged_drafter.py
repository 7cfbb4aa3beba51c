"""The merged drafter: prompt-lookup (n-gram) candidates inside the EAGLE tree, one verification.

Lossless by the same tests as EAGLE alone: greedy float32 output identical to plain greedy
on real SmolLM2 prompts, and sampled tokens distributed as the target's (chi-square), with
the n-gram branch really accepted on the way.
"""
from __future__ import annotations

import pytest
import torch

from draft_fit import fit_draft
from eaglebook.decode import (DecodeError, DraftTree, EagleDecoder, SamplingConfig, SpecConfig, baseline_decode,
                              check_lossless, merge_chain, ngram_continuation, processed_probs, render_prompt_ids)
from eaglebook.draft import build_draft
from test_decode import SMOL_PROMPTS, _chi2_pvalue, peaked_tiny


def test_ngram_continuation_finds_the_earliest_repeat_of_the_longest_suffix():
    ctx = [1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3]
    assert ngram_continuation(ctx, 3) == [4, 9, 2]  # [1, 2, 3] first occurs at 0
    assert ngram_continuation([7, 8, 5, 1, 8], 2) == [5, 1]  # only the 1-gram [8] repeats
    assert ngram_continuation([1, 2, 3], 4) == []  # nothing repeats
    assert ngram_continuation([4, 4], 5, max_ngram=1) == [4]


def _tree():
    #        0 (root, token 10)
    #      /   \
    #   1:11   2:12
    #    |      |
    #   3:13   4:14
    parents = [-1, 0, 0, 1, 2]
    m = torch.zeros(5, 5, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            m[i] = m[p]
        m[i, i] = True
    return DraftTree(tokens=[10, 11, 12, 13, 14], parents=parents, depths=[0, 1, 1, 2, 2],
                     scores=[0.0, -0.1, -0.5, -0.3, -2.0], mask=m, prefix_len=7)


def test_merge_shares_nodes_drops_weakest_leaves_and_keeps_the_budget():
    t = merge_chain(_tree(), [11, 13, 20, 21], budget=6)
    assert t.size == 6
    # 11 -> 13 are shared; 20, 21 hang below node 13; the weakest leaf (14, score -2) made room
    assert 14 not in t.tokens and t.tokens[-2:] == [20, 21]
    assert t.ngram == [False, False, False, False, True, True]
    i20, i21 = t.tokens.index(20), t.tokens.index(21)
    assert t.tokens[t.parents[i20]] == 13 and t.parents[i21] == i20
    assert t.depths[i20] == 3 and t.depths[i21] == 4
    for i, p in enumerate(t.parents):  # parents first; the mask is ancestor-or-self
        assert p < i
        assert t.mask[i].nonzero().flatten().tolist() == sorted(_ancestors(t, i))
    siblings = {}
    for i, p in enumerate(t.parents):
        siblings.setdefault(p, []).append(t.tokens[i])
    assert all(len(v) == len(set(v)) for v in siblings.values())  # distinct siblings (sampling needs it)


def _ancestors(t, i):
    out = [i]
    while t.parents[out[-1]] >= 0:
        out.append(t.parents[out[-1]])
    return out


def test_merge_of_a_chain_the_tree_already_has_changes_nothing_and_a_full_tree_cuts_the_chain():
    t = _tree()
    assert merge_chain(t, [12, 14], budget=5) is t
    cut = merge_chain(t, [30, 31, 32, 33, 34, 35], budget=5)  # every leaf can go: 1 root + 4 chain nodes
    assert cut.size == 5 and cut.tokens == [10, 30, 31, 32, 33] and all(cut.ngram[1:])
    with pytest.raises(DecodeError, match="ngram_tokens"):
        SpecConfig(ngram_tokens=-1)
    assert SpecConfig(5, 4, 16, ngram_tokens=5).label == "s5-k4-n16+ng5"


@pytest.mark.parametrize("spec", [SpecConfig(num_steps=3, topk=4, num_draft_tokens=12, ngram_tokens=6),
                                  SpecConfig(num_steps=3, topk=1, ngram_tokens=3)], ids=["tree3x4n12+ng6", "chain3+ng3"])
def test_smollm2_merged_greedy_lossless(smollm2, spec):
    """Real SmolLM2 in float32 with the shipped head: identical to plain greedy, and the n-gram
    branch supplies accepted tokens that the EAGLE tree did not have."""
    from eaglebook.decode import resolve_head

    target, tok = smollm2
    head, _ = resolve_head(target)
    dec = EagleDecoder(target, head, spec, eos_ids=[2], tokenizer=tok)
    from_ngram = 0
    for msgs in SMOL_PROMPTS[:3]:
        p = render_prompt_ids(tok, msgs)
        b = baseline_decode(target, p, 40, eos_ids=[2])
        e = dec.generate(p, 40)
        assert check_lossless(b, e.token_ids)["ok"], (tok.decode(p), check_lossless(b, e.token_ids))
        assert all(s.tree_size <= spec.num_draft_tokens for s in e.steps)
        from_ngram += sum(s.ngram_accepted for s in e.steps)
    assert from_ngram > 0, "the prompt-lookup branch should win some verifications"


def test_merged_sampling_reproduces_target_distribution():
    """As for EAGLE alone: chi-square on the 2nd and 3rd tokens against the exact marginals,
    with a prompt that repeats itself so the prompt lookup proposes (and gets accepted)."""
    V = 48
    target = peaked_tiny(vocab=V, seed=3)
    sampling = dict(temperature=1.0)
    with torch.no_grad():  # a prompt the target likes to continue as it began: greedy, then repeated
        start = [5, 17]
        seq = start + baseline_decode(target, start, 4).token_ids
    prompt = seq + seq[:2]  # ... x y | x y: the lookup proposes what followed x y the first time
    with torch.no_grad():
        likely = torch.topk(target(torch.tensor([prompt])).logits[0, -1], 16).indices.tolist()
    seqs = [prompt + [x] + baseline_decode(target, prompt + [x], 4).token_ids for x in likely]
    draft = fit_draft(target, seqs, steps=150, ttt_steps=2)
    s = SamplingConfig(**sampling)
    L = len(prompt)
    with torch.no_grad():
        p1 = processed_probs(target(torch.tensor([prompt])).logits[0, -1], s)
        x1 = torch.arange(V)[:, None]
        p12 = p1[:, None] * processed_probs(target(torch.cat([torch.tensor([prompt]).expand(V, L), x1], 1)).logits[:, -1], s)
        pair = torch.stack(torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij"), -1).reshape(-1, 2)
        l3 = target(torch.cat([torch.tensor([prompt]).expand(V * V, L), pair], 1)).logits[:, -1]
        p3 = (p12.reshape(-1, 1) * processed_probs(l3, s)).sum(0)
        p2 = p12.sum(0)
    dec = EagleDecoder(target, draft, SpecConfig(num_steps=2, topk=2, num_draft_tokens=5, ngram_tokens=3))
    c2, c3 = torch.zeros(V), torch.zeros(V)
    from_ngram = 0
    for i in range(1200):
        out = dec.generate(prompt, 3, seed=i, **sampling)
        c2[out.token_ids[1]] += 1
        c3[out.token_ids[2]] += 1
        from_ngram += sum(st.ngram_accepted for st in out.steps)
    assert from_ngram > 0, "the prompt-lookup branch should get tokens accepted"
    assert _chi2_pvalue(c2, p2) > 1e-3 and _chi2_pvalue(c3, p3) > 1e-3


def test_merged_drafter_with_an_untrained_head_on_smollm2(smollm2):
    """An untrained head proposes little; the merged tree still verifies the lookup's tokens."""
    target, tok = smollm2
    p = render_prompt_ids(tok, [{"role": "user", "content": "Repeat exactly: one two three four five six."}])
    dec = EagleDecoder(target, build_draft(target), SpecConfig(num_steps=2, topk=2, num_draft_tokens=5,
                                                               ngram_tokens=4), eos_ids=[2], tokenizer=tok)
    b = baseline_decode(target, p, 16, eos_ids=[2])
    e = dec.generate(p, 16)
    assert check_lossless(b, e.token_ids)["ok"]
    assert sum(s.ngram_accepted for s in e.steps) > 0


def test_generate_cli_with_the_merged_drafter(tmp_path):
    """`eaglebook generate --ngram 3`: the shipped head's tree with prompt-lookup candidates,
    float32 greedy, checked token for token against plain decoding by the command itself."""
    import json

    from eaglebook.cli import main

    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"id": "copy", "prompt": "Repeat this list twice: red apple, green pear, "
                                                       "yellow banana, purple grape."}) + "\n")
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--prompts", str(src), "--output", str(out), "--max_new_tokens", "24", "--ngram", "3",
               "--num_steps", "3", "--topk", "2", "--num_draft_tokens", "6", "--baseline", "--threads", "1"])
    (row,) = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert rc == 0 and row["ok"] and row["spec"]["ngram_tokens"] == 3
    assert sum(row["accept_lengths"]) + 1 == len(row["token_ids"])
