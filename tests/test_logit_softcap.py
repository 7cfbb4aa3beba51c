"""Targets that change their logits after lm_head (Gemma-2's final softcapping, Cohere's logit_scale,
Granite's logits_scaling): wherever eaglebook turns a hidden state into the target's logits itself
(the training teacher, an EAGLE-1/2 head's borrowed lm_head, decoding's verify pass) the result is the
model's own logits, so greedy and sampled decoding equal the reference and the teacher is the target's
distribution; a scaling field eaglebook does not know is refused, never guessed."""
from __future__ import annotations

import pytest
import torch
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                          GraniteForCausalLM, LlamaConfig, LlamaForCausalLM)

from eaglebook import hidden_states as hs
from eaglebook.decode import EagleDecoder, SamplingConfig, SpecConfig, baseline_decode, processed_probs
from eaglebook.draft import build_draft, build_eagle1_draft
from eaglebook.target import TargetError, logit_map, output_logits
from eaglebook.train import teacher_from_final
from test_hybrid_attention import assert_node_logits_are_the_targets, full_recompute_greedy

# a large init scale: logits of a few units, so a softcap of 2 reshapes the distribution
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3)


def gemma2_style():
    """8 layers alternating sliding-window (8) and full attention, Gemma-2's final softcapping (2.0
    here, 30 in Gemma-2) and attention softcapping (eager attention, as Gemma-2 needs)."""
    torch.manual_seed(0)
    cfg = Gemma2Config(num_hidden_layers=8, head_dim=16, sliding_window=8, final_logit_softcapping=2.0,
                       attn_logit_softcapping=50.0, **SMALL)
    cfg._attn_implementation = "eager"
    return Gemma2ForCausalLM(cfg).eval().requires_grad_(False)


def cohere_style():
    torch.manual_seed(0)
    return CohereForCausalLM(CohereConfig(num_hidden_layers=8, logit_scale=0.25, **SMALL)).eval().requires_grad_(False)


def granite_style():
    torch.manual_seed(0)
    return GraniteForCausalLM(GraniteConfig(num_hidden_layers=8, logits_scaling=4.0, **SMALL)).eval().requires_grad_(False)


BUILDERS = {"gemma2": gemma2_style, "cohere": cohere_style, "granite": granite_style}


@pytest.fixture(scope="module")
def gemma2():
    return gemma2_style()


def _prompt(seed=1, n=20):
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", sorted(BUILDERS))
@torch.no_grad()
def test_teacher_and_borrowed_head_give_the_models_logits(name):
    model = BUILDERS[name]()
    ids = torch.tensor([_prompt()])
    out = model(ids, output_hidden_states=True)
    final, want = out.hidden_states[-1], out.logits
    plain = model.get_output_embeddings()(final)
    assert (plain - want).abs().max() > 0.1  # lm_head alone is not this target's logits
    torch.testing.assert_close(output_logits(model, final), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(hs.teacher_logits(model, final), want, rtol=0, atol=1e-6)
    draft = build_draft(model)  # the training teacher: argmax and log-probs over the draft vocabulary
    top, logp = teacher_from_final(final, model.get_output_embeddings().weight, draft.draft_ids, draft.target_logits)
    assert torch.equal(top, want.argmax(-1))
    torch.testing.assert_close(logp, torch.log_softmax(want[..., draft.draft_ids].float(), -1), rtol=0, atol=1e-5)
    e1 = build_eagle1_draft(model)  # an EAGLE-1/2 head reads through the target's own head
    torch.testing.assert_close(e1.compute_logits(final), want, rtol=0, atol=1e-6)


def test_unknown_logit_scaling_is_refused():
    cfg = LlamaConfig(num_hidden_layers=8, **SMALL)
    cfg.lm_head_multiplier = 2.0  # Falcon-H1's field: a rule eaglebook does not replay
    with pytest.raises(TargetError, match="lm_head_multiplier=2.0"):
        logit_map(cfg)
    with pytest.raises(TargetError, match="teacher distribution would be wrong"):
        build_draft(LlamaForCausalLM(cfg))
    assert logit_map(LlamaConfig(num_hidden_layers=8, **SMALL))(torch.ones(3)).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("spec", [SpecConfig.chain(4), SpecConfig(num_steps=4, topk=4, num_draft_tokens=16),
                                  SpecConfig(num_steps=4, topk=4, num_draft_tokens=16, ngram_tokens=5)],
                         ids=["chain", "tree", "merged"])
def test_gemma2_greedy_equals_full_recompute(gemma2, spec):
    prompt = _prompt()
    ref = full_recompute_greedy(gemma2, prompt, 16)
    assert baseline_decode(gemma2, prompt, 16).token_ids == ref
    for head in (build_draft(gemma2), build_eagle1_draft(gemma2)):
        assert EagleDecoder(gemma2, head.eval(), spec).generate(prompt, 16).token_ids == ref


@torch.no_grad()
def test_gemma2_sampled_baseline_equals_reference_sampler(gemma2):
    # the same seed draws the same tokens from the same distributions: the model's own (capped) logits
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, seed=7)
    prompt = _prompt(2)
    g = torch.Generator().manual_seed(sampling.seed)
    ids = list(prompt)
    for _ in range(24):
        p = processed_probs(gemma2(torch.tensor([ids])).logits[0, -1], sampling)
        ids.append(int(torch.multinomial(p, 1, generator=g)))
    got = baseline_decode(gemma2, prompt, 24, temperature=1.0, top_p=0.95, seed=7).token_ids
    assert got == ids[len(prompt):]


@pytest.mark.parametrize("head", ["eagle3", "eagle1"])
def test_gemma2_sampled_verify_logits_equal_full_recompute(gemma2, head):
    draft = (build_draft if head == "eagle3" else build_eagle1_draft)(gemma2).eval()
    spec = SpecConfig(num_steps=3, topk=2, num_draft_tokens=6, ngram_tokens=2)
    res = EagleDecoder(gemma2, draft, spec).generate(_prompt(3), 12, temperature=1.0, seed=0, keep_trees=True)
    assert res.steps and assert_node_logits_are_the_targets(gemma2, res) == sum(s.tree_size for s in res.steps)
