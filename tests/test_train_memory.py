"""The RTX 3090 path: training reads only the target's embedding, lm_head and provenance (checked
against the full model), the planner's training-memory figure, and the 8-bit optimizer's dependency."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_llama_config
from eaglebook.draft import Eagle3Draft, count_parameters, draft_config_from_target
from eaglebook.hidden_states import LLAMA_3_1_8B
from eaglebook.target import TargetHead, checkpoint_fingerprint, load_target_head, target_info, weights_fingerprint
from eaglebook.train import draft_parameter_count, plan_training_memory, training_arguments


def test_target_head_of_the_embedded_default_equals_the_model(smollm2):
    model, tok = smollm2
    head, htok = load_target_head("smollm2-135m", dtype="float32", verbose=False)
    assert isinstance(head, TargetHead) and sum(p.numel() for p in head.parameters()) == 49152 * 576  # tied: one
    assert torch.equal(head.get_output_embeddings().weight, model.lm_head.weight)
    assert torch.equal(head.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert target_info(head, htok) == target_info(model, tok)  # fingerprint, template, shapes
    from eaglebook.target import resolve_target

    assert checkpoint_fingerprint(resolve_target("smollm2-135m")) == weights_fingerprint(model)  # from the files


@pytest.mark.parametrize("shard", [False, True], ids=["one-file", "sharded"])
def test_target_head_of_an_untied_checkpoint(tmp_path, smollm2_tokenizer, shard):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).eval()
    model.save_pretrained(tmp_path / "m", max_shard_size="2MB" if shard else "5GB")
    smollm2_tokenizer.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file() == shard
    head, _ = load_target_head(str(tmp_path / "m"), dtype="bfloat16", verbose=False)
    assert torch.equal(head.get_output_embeddings().weight, model.lm_head.weight.to(torch.bfloat16))
    assert not torch.equal(head.get_output_embeddings().weight, head.get_input_embeddings().weight)
    assert head.weights_fingerprint == weights_fingerprint(model)  # dtype-independent, read from the files


def test_trainable_parameter_formula_counts_a_real_llama_8b_head():
    cfg = draft_config_from_target(LlamaConfig(**{k: v for k, v in LLAMA_3_1_8B.items() if k != "name"}),
                                   draft_vocab_size=32000)
    with torch.device("meta"):
        head = Eagle3Draft(cfg)
    assert draft_parameter_count(LLAMA_3_1_8B, 32000) == count_parameters(head)["trainable"]


def test_llama_8b_training_fits_24gb_only_without_the_full_target():
    head = plan_training_memory(LLAMA_3_1_8B, gpu_gib=24, target_load="head")
    full = plan_training_memory(LLAMA_3_1_8B, gpu_gib=24, target_load="full")
    assert head["fits"] and not full["fits"]
    assert full["terms_gib"]["whole target (float32)"] > 24  # what `eaglebook train` used to load
    assert head["terms_gib"]["target embedding + lm_head"] == pytest.approx(2 * 128256 * 4096 * 2 / 2**30)
    torch_adam = plan_training_memory(LLAMA_3_1_8B, optim="adamw_torch")
    assert torch_adam["total_gib"] - head["total_gib"] == pytest.approx(6 * head["trainable_params"] / 2**30)
    assert head["arithmetic"][-1].endswith("fits")


def test_the_rtx3090_profile_optimizer_is_installed_or_refused_with_the_fix(tmp_path):
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match=r"eaglebook\[rtx3090\]"):
            training_arguments(str(tmp_path), "rtx3090", report_to=[])
        args, _, _ = training_arguments(str(tmp_path), "rtx3090", report_to=[], optim="adamw_torch")
        assert args.optim == "adamw_torch"
    else:
        args, _, _ = training_arguments(str(tmp_path), "rtx3090", report_to=[])
        assert "bnb" in args.optim
