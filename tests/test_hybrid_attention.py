"""Hybrid-attention targets (sliding-window and full-attention layers interleaved, as in OLMo-3 and
Gemma-3): the default aux layers are outputs of full-attention layers, capture warns when asked
for a sliding-window layer's output, and the head pins the chosen layers in its exports; a loaded
head that pins none is decoded on the engines' default layers; and decoding stays lossless: the
verify pass gives the sliding-window layers windowed tree masks, so chain, tree, merged and sampled
decoding see exactly what a no-cache forward over the whole sequence sees."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Olmo3Config, Olmo3ForCausalLM
from transformers.masking_utils import sliding_window_causal_mask_function

from eaglebook import export as ex
from eaglebook import hidden_states as hs
from eaglebook.decode import (DecodeError, EagleDecoder, SpecConfig, baseline_decode, check_lossless,
                              tree_attention_mask, verify_mask_layout)
from eaglebook.draft import build_draft, build_eagle1_draft

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             sliding_window=8, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def olmo3_style():
    """16 layers, OLMo-3's pattern: three sliding-window layers, then one full-attention layer."""
    torch.manual_seed(0)
    return Olmo3ForCausalLM(Olmo3Config(num_hidden_layers=16, **SMALL)).eval().requires_grad_(False)


def gemma3_style():
    """24 layers, Gemma-3's pattern: five sliding-window layers, then one full-attention layer."""
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=24, head_dim=16, **SMALL)).eval().requires_grad_(False)


# (builder, SGLang ids of the full-attention layers below the last, expected choice in SGLang ids)
CASES = {"olmo3": (olmo3_style, [3, 7, 11], [3, 7, 11]), "gemma3": (gemma3_style, [5, 11, 17], [5, 11, 17])}


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_aux_layers_are_full_attention_outputs(name):
    build, full, want = CASES[name]
    model = build()
    types = hs.layer_types_of(model.config)
    n = model.config.num_hidden_layers
    assert [i for i in range(n - 1) if types[i] == "full_attention"] == full
    why = hs.explain_aux_layers(n, types)
    assert why["sglang"] == want and why["hf"] == [i + 1 for i in want]
    assert why["layer_types"] == ["full_attention"] * 3  # every captured state is a full-attention output
    assert why["engine_default_hf"] == list(hs.default_aux_layers(n)) != why["hf"]
    assert "sliding_attention" in why["reason"] and "full-attention" in why["reason"]
    # capture picks them by default and captures exactly those hidden states
    ids = torch.randint(3, 512, (2, 20))
    feats = hs.capture_batch(model, ids)
    oracle = hs.oracle_hidden_states(model, ids)
    torch.testing.assert_close(feats["aux_hidden"], torch.cat([oracle[j] for j in why["hf"]], -1), rtol=0, atol=0)
    torch.testing.assert_close(feats["final_hidden"], oracle[n], rtol=0, atol=0)


def test_nearest_full_attention_layer_rule():
    # OLMo-3-7B's shape: 32 layers, full attention every 4th; SGLang default [1, 15, 28]
    types = (["sliding_attention"] * 3 + ["full_attention"]) * 8
    assert hs.explain_aux_layers(32, types)["sglang"] == [3, 15, 27]  # 28 is 1 from 27, 3 from 31
    # a uniform model keeps EAGLE-3's default, and says so
    assert hs.explain_aux_layers(32, ["full_attention"] * 32)["hf"] == [2, 16, 29]
    assert hs.layer_types_of(Olmo3Config(num_hidden_layers=4, layer_types=["full_attention"] * 4)) is None
    with pytest.raises(ValueError, match="only 2 full-attention layers"):
        hs.explain_aux_layers(12, (["sliding_attention"] * 3 + ["full_attention"]) * 3)
    with pytest.raises(ValueError, match="layer_types has 3 entries"):
        hs.explain_aux_layers(8, ["full_attention"] * 3)


def test_capture_warns_on_a_sliding_window_layer():
    model = olmo3_style()
    with pytest.warns(UserWarning, match=r"HF \[2\] are outputs of sliding-window layers.*HF \[4, 8, 12\]"):
        hs.capture_batch(model, torch.randint(3, 512, (1, 6)), aux_layers=(2, 8, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the full-attention choice itself warns about nothing
        hs.capture_batch(model, torch.randint(3, 512, (1, 6)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_head_for_a_hybrid_target_pins_its_layers(name, tmp_path):
    build, _, want = CASES[name]
    model = build()
    head = build_draft(model)
    assert head.config.aux_layers == [i + 1 for i in want]
    rope = head.config.rope_parameters  # the full-attention layers' RoPE, not the per-type dict
    assert rope["rope_theta"] == model.config.rope_parameters["full_attention"]["rope_theta"]
    ex.export_eagle3(head, tmp_path / "h", model, ex.head_provenance(model))
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == want  # SGLang reads this
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in want]  # vLLM reads this
    assert ex.check_export(tmp_path / "h")["format"] == "eagle3"


# --------------------------------------------------------------------------------------
# Lossless decoding on a hybrid target: the verify pass windows the sliding-window layers
# --------------------------------------------------------------------------------------

PROMPT_LEN, NEW = 30, 24  # the prompt is far longer than the window (8)
SPECS = {"chain": SpecConfig.chain(4), "tree": SpecConfig(num_steps=4, topk=4, num_draft_tokens=16),
         "merged": SpecConfig(num_steps=4, topk=4, num_draft_tokens=16, ngram_tokens=5)}


@pytest.fixture(scope="module")
def targets():
    return {name: build() for name, (build, _, _) in CASES.items()}


def _prompt(seed=1, n=PROMPT_LEN):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n,), generator=g).tolist()


@torch.no_grad()
def full_recompute_greedy(model, prompt, n):
    """The reference: every token from a fresh forward over the whole sequence (no cache, so the
    model builds its own windowed masks)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_verify_mask_layout_follows_layer_types(targets):
    assert verify_mask_layout(targets["olmo3"].config) == {"full_attention": None, "sliding_attention": 8}
    assert verify_mask_layout(targets["gemma3"].config) == {"full_attention": None, "sliding_attention": 8}
    uniform = Olmo3Config(num_hidden_layers=4, layer_types=["full_attention"] * 4, sliding_window=8)
    assert verify_mask_layout(uniform) == {None: None}  # one plain tensor for every layer
    with pytest.raises(DecodeError, match="chunked_attention"):
        verify_mask_layout(Olmo3Config(num_hidden_layers=2, layer_types=["chunked_attention", "full_attention"]))


def test_sliding_tree_mask_is_transformers_window_rule():
    # a chain laid out as a tree: its mask must be exactly transformers' own sliding-window causal mask
    P, N, w = 13, 6, 8
    anc = torch.ones(N, N, dtype=torch.bool).tril()
    got = tree_attention_mask(anc, P, window=w, depths=list(range(N)))[0, 0]
    rule = sliding_window_causal_mask_function(w)
    want = rule(0, 0, torch.arange(P, P + N)[:, None], torch.arange(P + N)[None, :])  # query, key = cache positions
    assert torch.equal(got, want)
    assert torch.equal(tree_attention_mask(anc, P)[0, 0], torch.ones(N, P + N, dtype=torch.bool).tril(P))
    # a tree: siblings at the same depth have the same window; a depth-2 node sees its ancestors
    anc = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    m = tree_attention_mask(anc, P, window=w, depths=[0, 1, 1, 2])[0, 0]
    assert m[1, :P].nonzero().flatten().tolist() == list(range(P + 1 - w + 1, P))  # positions 7..12 from 14
    assert m[3, P:].tolist() == [True, True, False, True]
    additive = tree_attention_mask(anc, P, torch.float32, window=w, depths=[0, 1, 1, 2])
    assert torch.equal(additive[0, 0] == 0, m)


@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_hybrid_greedy_equals_full_recompute(targets, name, spec):
    model = targets[name]
    prompt = _prompt()
    ref = full_recompute_greedy(model, prompt, NEW)
    base = baseline_decode(model, prompt, NEW)
    assert base.token_ids == ref  # plain decoding windows the sliding layers too
    for head in (build_draft(model), build_eagle1_draft(model)):  # EAGLE-3 and EAGLE-1/2 heads
        out = EagleDecoder(model, head.eval(), SPECS[spec]).generate(prompt, NEW)
        assert out.token_ids == ref, check_lossless(base, out.token_ids)


@torch.no_grad()
def assert_node_logits_are_the_targets(model, res, atol=1e-4):
    """Every tree node's verify logits equal a no-cache forward over the committed prefix and the
    node's own path: the whole tree, not only the accepted path, sees what plain decoding sees."""
    committed = res.prompt_ids + res.token_ids
    checked = 0
    for step in res.steps:
        t = step.tree
        assert t.tokens[0] == committed[t.prefix_len]
        for i in range(t.size):
            path, j = [], i
            while j >= 0:
                path.append(t.tokens[j])
                j = t.parents[j]
            ids = torch.tensor([committed[:t.prefix_len] + path[::-1]])
            want = model(ids).logits[0, -1]
            torch.testing.assert_close(step.target_logits[i], want, rtol=0, atol=atol)
            checked += 1
    return checked


@pytest.mark.parametrize("spec", ["chain", "merged"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_hybrid_sampled_verify_logits_equal_full_recompute(targets, name, spec):
    model = targets[name]
    res = EagleDecoder(model, build_draft(model).eval(), SPECS[spec]).generate(
        _prompt(2), 16, temperature=1.0, top_p=0.95, seed=0, keep_trees=True)
    assert res.steps and assert_node_logits_are_the_targets(model, res) == sum(s.tree_size for s in res.steps)


def test_accepted_paths_keep_the_window(targets):
    # where the target repeats itself the lookup drafts it and runs of several tokens are accepted: the
    # compacted cache (prefix + accepted nodes) must be windowed again in the next verify pass
    model = targets["gemma3"]
    prompt = _prompt(3)
    ref = full_recompute_greedy(model, prompt, 40)
    res = EagleDecoder(model, build_draft(model).eval(), SPECS["merged"]).generate(prompt, 40, keep_trees=True)
    assert res.token_ids == ref
    assert max(res.accept_lengths) >= 3, res.accept_lengths
    assert_node_logits_are_the_targets(model, res)


# --------------------------------------------------------------------------------------
# A loaded head that pins no layers is decoded on the engines' default layers
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sidecar", [True, False])
def test_loaded_head_without_pinned_layers_reads_the_engine_default(targets, tmp_path, sidecar):
    model = targets["olmo3"]
    n = model.config.num_hidden_layers
    engines = list(hs.default_aux_layers(n))  # (2, N//2, N-3): what SGLang and vLLM feed an unpinned head
    assert engines != hs.choose_aux_layers(n, hs.layer_types_of(model.config))  # the hybrid choice differs
    head = build_draft(model, aux_layers=tuple(engines))  # a third-party head trained on the default layers
    ex.export_eagle3(head, tmp_path / "h", model, ex.head_provenance(model))
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert "eagle_aux_hidden_state_layer_ids" not in cfg  # nothing pinned: engines use their default
    if not sidecar:
        (tmp_path / "h" / "eaglebook.json").unlink()  # as a head from elsewhere comes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no sidecar: provenance unchecked (said by a warning)
        loaded = ex.load_draft(tmp_path / "h", target=model)
    assert ex.check_export(tmp_path / "h")["format"] == "eagle3"
    dec = EagleDecoder(model, loaded, SPECS["tree"])
    assert list(dec.aux_layers) == engines
    # a head eaglebook builds for this target pins the hybrid choice, and is decoded on it
    own = build_draft(model)
    assert list(EagleDecoder(model, own, SPECS["tree"]).aux_layers) == own.config.aux_layers != engines
