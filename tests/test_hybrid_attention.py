"""Hybrid-attention targets (sliding-window and full-attention layers interleaved, as in OLMo-3 and
Gemma-3): the default aux layers are outputs of full-attention layers, capture warns when asked
for a sliding-window layer's output, and the head pins the chosen layers in its exports."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Olmo3Config, Olmo3ForCausalLM

from eaglebook import export as ex
from eaglebook import hidden_states as hs
from eaglebook.draft import build_draft

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
    import warnings

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
