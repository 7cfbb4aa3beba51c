"""Custom aux layers end to end on SmolLM2: capture -> `eaglebook train` -> export -> reload -> decode.
The layers recorded at capture reach the head's config, both exports' ids, its record, the decoder
and `check_export`; training refuses features captured at other layers than the head reads."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import smollm2_feature_store
from eaglebook import decode
from eaglebook import export as ex
from eaglebook.cli import main
from eaglebook.draft import DraftError, build_draft
from eaglebook.hidden_states import FeatureDataset

HF = [3, 12, 24]  # not EAGLE-3's default (2, 15, 27) for SmolLM2's 30 layers
SGLANG = [2, 11, 23]


@pytest.fixture(scope="module")
def custom_store(smollm2, tmp_path_factory):
    with pytest.warns(UserWarning, match="custom aux layers HF \\[3, 12, 24\\]"):
        return smollm2_feature_store(smollm2, tmp_path_factory.mktemp("custom") / "features", aux_layers=HF)


def test_custom_layers_flow_from_capture_to_decoding(smollm2, custom_store, tmp_path, capsys):
    model, tok = smollm2
    assert FeatureDataset(custom_store).aux_layers == {"hf": HF, "sglang": SGLANG, "default": False}
    rc = main(["train", "--features", str(custom_store), "--output_dir", str(tmp_path / "t"), "--max_steps", "2",
               "--batch_size", "2", "--ttt_steps", "2", "--draft_vocab_size", "512", "--report_to", ""])
    assert rc == 0
    head_dir = tmp_path / "t" / "draft"
    cfg = json.loads((head_dir / "config.json").read_text())
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == SGLANG  # SGLang's convention
    assert cfg["eagle_aux_hidden_state_layer_ids"] == HF  # vLLM's
    side = json.loads((head_dir / "eaglebook.json").read_text())
    assert side["aux_layers"] == {"hf": HF, "sglang": SGLANG, "default": False}
    assert ex.check_export(head_dir)["format"] == "eagle3"

    head = ex.load_draft(head_dir, target=model, tokenizer=tok)
    assert head.config.aux_layers == HF
    ex.export_speculators(head, tmp_path / "spec", model, ex.head_provenance(model, tok), verifier_name_or_path="v")
    assert json.loads((tmp_path / "spec" / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"] == HF
    assert ex.check_export(tmp_path / "spec")["format"] == "speculators"

    dec = decode.EagleDecoder(model, head.eval(), decode.SpecConfig(num_steps=3, topk=2, num_draft_tokens=6),
                              eos_ids=[2])
    assert dec.aux_layers == tuple(HF)
    # the decoder feeds the head the very features it trained on
    item = FeatureDataset(custom_store)[0]
    ids = item["input_ids"][None]
    _, feats = dec._target(ids, torch.arange(ids.shape[1])[None], decode.DynamicCache())
    # batched capture and a single-sequence forward sum in another order (oneDNN picks kernels by shape)
    torch.testing.assert_close(feats[0], item["aux_hidden"], rtol=1e-4, atol=1e-4)
    prompt = decode.render_prompt_ids(tok, [{"role": "user", "content": "Name three primes."}])
    assert decode.check_lossless(decode.baseline_decode(model, prompt, 16, [2]), dec.generate(prompt, 16).token_ids)["ok"]


def test_training_refuses_features_from_other_layers(smollm2, custom_store, tmp_path):
    from eaglebook.train import EagleTrainer, training_arguments

    model, _ = smollm2
    feats = FeatureDataset(custom_store)
    args, _, _ = training_arguments(str(tmp_path), "cpu", max_steps=1, report_to=[], bf16=False)
    with pytest.raises(DraftError, match=r"captured at aux layers HF \[3, 12, 24\], but the head reads HF \[2, 15, 27\]"):
        EagleTrainer(model=build_draft(model), args=args, train_dataset=torch.utils.data.Subset(feats, [0, 1]),
                     lm_head_weight=model.lm_head.weight)
    EagleTrainer(model=build_draft(model, aux_layers=tuple(HF)), args=args, train_dataset=feats,
                 lm_head_weight=model.lm_head.weight)  # the matching head is accepted


def test_check_export_finds_a_head_served_other_layers(smollm2, tmp_path):
    model, tok = smollm2
    head = build_draft(model, aux_layers=tuple(HF))
    ex.export_eagle3(head, tmp_path / "h", model, ex.head_provenance(model, tok))
    shutil.copytree(tmp_path / "h", tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    del cfg["eagle_config"], cfg["eagle_aux_hidden_state_layer_ids"]  # engines would use their default
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DraftError, match=r"records aux layers HF \[3, 12, 24\].*engines read HF \[2, 15, 27\]"):
        ex.check_export(tmp_path / "bad")
