"""The merged drafter: prompt-lookup (n-gram) candidates inside the EAGLE tree, one verification.

Lossless by the same tests as EAGLE alone: greedy float32 output identical to plain greedy
on real SmolLM2 prompts, and sampled tokens distributed as the target's (chi-square), with
the n-gram branch really accepted on the way.
"""
from __future__ import annotations

import pytest
import torch

from draft_fit import fit_draft
import math

from eaglebook.decode import (DecodeError, DraftTree, EagleDecoder, LookupRates, SamplingConfig, SpecConfig,
                              baseline_decode, check_lossless, merge_chain, ngram_continuation, processed_probs,
                              render_prompt_ids)
from eaglebook.draft import build_draft
from test_decode import SMOL_PROMPTS, _chi2_pvalue, peaked_tiny


def test_ngram_continuation_finds_the_earliest_repeat_of_the_longest_suffix():
    ctx = [1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3]
    assert ngram_continuation(ctx, 3) == [4, 9, 2]  # [1, 2, 3] first occurs at 0
    assert ngram_continuation([7, 2, 3, 1, 2, 3], 2, max_ngram=2) == [1, 2]  # the 2-gram [2, 3]
    assert ngram_continuation([1, 2, 3], 4) == []  # nothing repeats
    assert ngram_continuation([4, 4], 5, max_ngram=1, min_ngram=1) == [4]


def test_a_one_token_match_offers_no_lookup_branch():
    """Only the 1-gram [8] repeats: too weak a match, so the merged drafter offers nothing."""
    ctx = [7, 8, 5, 1, 8]
    assert ngram_continuation(ctx, 2) == []
    assert ngram_continuation(ctx, 2, min_ngram=1) == [5, 1]  # what a one-token lookup would have offered
    assert SpecConfig(ngram_tokens=3).ngram_min == 2
    with pytest.raises(DecodeError, match="ngram_min"):
        SpecConfig(ngram_tokens=3, ngram_max=1)


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
    t = merge_chain(_tree(), [11, 13, 20, 21], budget=6, log_rates=[math.log(0.9)] * 4)
    assert t.size == 6
    # 11 -> 13 are shared; 20, 21 hang below node 13; the weakest leaf (14, score -2) made room
    assert 14 not in t.tokens and t.tokens[-2:] == [20, 21]
    assert t.ngram == [False, False, False, False, True, True]
    assert t.scores[-1] == pytest.approx(-0.1 + 3 * math.log(0.9))  # 13's own -0.3 < the lookup's own -0.2
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


def _check_tree(t):
    for i, p in enumerate(t.parents):  # parents first; the mask is ancestor-or-self; scores never rise
        assert p < i
        assert t.mask[i].nonzero().flatten().tolist() == sorted(_ancestors(t, i))
        if p >= 0:
            assert t.scores[i] <= t.scores[p] and t.depths[i] == t.depths[p] + 1
    siblings = {}
    for i, p in enumerate(t.parents):
        siblings.setdefault(p, []).append(t.tokens[i])
    assert all(len(v) == len(set(v)) for v in siblings.values())


def test_a_lookup_branch_displaces_only_lower_scored_eagle_nodes():
    """Scores compete: tree leaves score -0.3 (13) and -2.0 (14); a lookup diverging at the
    root with rate r scores log r, then 2 log r, ..."""
    t = _tree()
    weak = merge_chain(t, [30, 31], budget=5, log_rates=[math.log(0.05)] * 2)  # -3.0: below every leaf
    assert weak.tokens == t.tokens and not any(weak.ngram or [])
    mid = merge_chain(t, [30, 31], budget=5, log_rates=[math.log(0.4)] * 2)  # -0.92, -1.83: beat 14 only
    assert mid.tokens == [10, 11, 12, 13, 30] and mid.ngram == [False] * 4 + [True]
    _check_tree(mid)
    strong = merge_chain(t, [30, 31], budget=5, log_rates=[math.log(0.95)] * 2)  # -0.05, -0.10: beat 13 and 12
    assert strong.tokens == [10, 11, 13, 30, 31] and strong.ngram == [False] * 3 + [True, True]
    _check_tree(strong)
    # topk=1: a chain; a lookup diverging at the root takes only what it outscores
    chain = DraftTree(tokens=[10, 11, 13, 15], parents=[-1, 0, 1, 2], depths=[0, 1, 2, 3], scores=[0.0, -0.1, -0.2, -1.5],
                      mask=torch.tril(torch.ones(4, 4, dtype=torch.bool)), prefix_len=3)
    m = merge_chain(chain, [30, 31, 32], budget=4, log_rates=[math.log(0.5)] * 3)  # -0.69, -1.39, -2.08
    assert m.tokens == [10, 11, 13, 30] and m.parents == [-1, 0, 1, 0]
    _check_tree(m)


def _ancestors(t, i):
    out = [i]
    while t.parents[out[-1]] >= 0:
        out.append(t.parents[out[-1]])
    return out


def test_merge_of_a_chain_the_tree_already_has_keeps_its_nodes_and_a_sure_chain_takes_the_budget():
    t = _tree()
    same = merge_chain(t, [12, 14], budget=5, log_rates=[math.log(0.9)] * 2)
    assert (same.tokens, same.parents, same.ngram) == (t.tokens, t.parents, t.ngram)
    assert same.scores[4] == pytest.approx(2 * math.log(0.9))  # shared: the better score, the lookup's
    sure = [math.log(0.999)] * 6
    cut = merge_chain(t, [30, 31, 32, 33, 34, 35], budget=5, log_rates=sure)  # 1 root + the 4 best: the chain
    assert cut.size == 5 and cut.tokens == [10, 30, 31, 32, 33] and all(cut.ngram[1:])
    with pytest.raises(DecodeError, match="ngram_tokens"):
        SpecConfig(ngram_tokens=-1)
    with pytest.raises(DecodeError, match="rates for 1 depths"):
        merge_chain(t, [30, 31], budget=5, log_rates=[0.0])
    assert SpecConfig(5, 4, 16, ngram_tokens=5).label == "s5-k4-n16+ng5"


def test_lookup_rates_learn_from_the_committed_tokens():
    r = LookupRates.fresh(3)
    assert r.rates() == [0.5, 0.5, 0.5]  # the prior
    r.update([5, 6, 7], [5, 6, 9, 4])  # depths 1, 2 accepted; 3 rejected
    assert (r.proposed, r.accepted) == ([1, 1, 1], [1, 1, 0])
    up, down = r.log_rates(), r.log_rates()
    assert up[0] > math.log(0.5) and up[1] > math.log(0.5) and down[2] < math.log(0.5)
    r.update([5, 6, 7], [8])  # rejected at depth 1: nothing is known of depths 2 and 3
    assert (r.proposed, r.accepted) == ([2, 1, 1], [1, 1, 0])
    assert r.log_rates()[0] < up[0] and r.log_rates()[1:] == up[1:]
    r.update([5, 6, 7], [5])  # accepted, but the step ended there (a stop): depth 2 unobserved
    assert (r.proposed, r.accepted) == ([3, 1, 1], [2, 1, 0])


def test_the_decoder_measures_lookup_acceptance_per_generation(smollm2):
    """Real SmolLM2 with an untrained head on a prompt it repeats: the lookup's rates rise above
    the prior as its tokens are accepted, each prefill starts from the prior again (the output
    depends on the prompt alone), and a repeated generation is identical."""
    target, tok = smollm2
    p = render_prompt_ids(tok, [{"role": "user", "content": "Repeat exactly: one two three four five six."}])
    dec = EagleDecoder(target, build_draft(target), SpecConfig(num_steps=2, topk=2, num_draft_tokens=5,
                                                               ngram_tokens=4), eos_ids=[2], tokenizer=tok)
    state = dec.prefill(p)
    assert state.lookup.rates() == LookupRates.fresh(4).rates()
    accepted = 0
    while not state.finished:
        accepted += dec.step(state).ngram_accepted
    # (the two counts differ by what a stop cuts off the last step's accepted path)
    assert accepted > 0 and sum(state.lookup.accepted) > 0
    assert state.lookup.rates()[0] > 0.5
    assert dec.prefill(p).lookup.proposed == [0, 0, 0, 0]
    a, b = dec.generate(p, 24, keep_trees=True), dec.generate(p, 24, keep_trees=True)
    assert a.token_ids == b.token_ids and [s.tree.tokens for s in a.steps] == [s.tree.tokens for s in b.steps]


@pytest.mark.parametrize("spec", [SpecConfig(num_steps=3, topk=4, num_draft_tokens=12, ngram_tokens=6, ngram_prior=0.99,
                                                 ngram_min=1),
                                  SpecConfig(num_steps=3, topk=1, ngram_tokens=3, ngram_prior=0.99)],
                         ids=["tree3x4n12+ng6", "chain3+ng3"])
def test_smollm2_merged_greedy_lossless(smollm2, spec):
    """Real SmolLM2 in float32 with the shipped head: identical to plain greedy, and the n-gram
    branch supplies accepted tokens that the EAGLE tree did not have (a lookup trusted from the
    start, so that mixed trees are verified from the first steps)."""
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
    dec = EagleDecoder(target, draft, SpecConfig(num_steps=2, topk=2, num_draft_tokens=5, ngram_tokens=3,
                                                 ngram_prior=0.99, ngram_min=1))  # a lookup trusted from the start
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
