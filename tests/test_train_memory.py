"""The RTX 3090 path: training reads only the target's embedding, lm_head and provenance (checked
against the full model), the planner's training-memory figure (each activation term against what the
unroll really saves, the peak against the CPU allocator's, the total against a measured Llama-3.1-8B
run), and the 8-bit optimizer's dependency."""
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
    assert head["arithmetic"][-1].endswith(f"fits, {24 - head['total_gib']:.2f} GiB to spare")


# Training peaks measured on one H200 at the Llama-3.1-8B shape with the rtx3090 profile (batch 1 x 2048
# tokens, 7 TTT steps, draft vocab 32000, bf16 autocast): an external record the planner must stay near.
MEASURED_LLAMA_8B_GIB = {"adamw_bnb_8bit": 21.85, "adamw_torch": 24.20}


@pytest.mark.parametrize("optim", sorted(MEASURED_LLAMA_8B_GIB))
def test_planner_total_is_near_the_measured_llama_8b_peak(optim):
    plan = plan_training_memory(LLAMA_3_1_8B, optim=optim)
    assert plan["total_gib"] == pytest.approx(MEASURED_LLAMA_8B_GIB[optim], rel=0.03)
    assert plan["headroom_gib"] == pytest.approx(24 - plan["total_gib"])


def test_the_rtx3090_profile_optimizer_is_installed_or_refused_with_the_fix(tmp_path):
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match=r"eaglebook\[rtx3090\]"):
            training_arguments(str(tmp_path), "rtx3090", report_to=[])
        args, _, _ = training_arguments(str(tmp_path), "rtx3090", report_to=[], optim="adamw_torch")
        assert args.optim == "adamw_torch"
    else:
        args, _, _ = training_arguments(str(tmp_path), "rtx3090", report_to=[])
        assert "bnb" in args.optim


# A small head with a Llama-like shape: every dimension distinct, so a saved tensor's shape says what it is.
SMALL = dict(vocab_size=1000, hidden_size=96, intermediate_size=176, num_attention_heads=4, num_key_value_heads=1,
             head_dim=16, num_hidden_layers=8, max_position_embeddings=4096, tie_word_embeddings=False)


def _small_head(draft_vocab: int, **over):
    cfg = LlamaConfig(**{**SMALL, **over})
    head = Eagle3Draft(draft_config_from_target(cfg, draft_vocab_size=draft_vocab)).float()
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[:draft_vocab] = True
    head.set_vocab(torch.zeros(draft_vocab, dtype=torch.long), t2d)
    return cfg, head


def _batch(cfg, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = cfg.hidden_size
    return {"input_ids": torch.randint(0, cfg.vocab_size, (B, T), generator=g),
            "loss_mask": torch.ones(B, T, dtype=torch.long), "attention_mask": torch.ones(B, T, dtype=torch.long),
            "aux_hidden": torch.randn(B, T, 3 * h, generator=g), "final_hidden": torch.randn(B, T, h, generator=g)}


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["grouped-kv", "one-kv-head"])
def test_planner_terms_are_what_one_ttt_forward_saves_for_backward(kv_heads):
    """Every tensor the unroll saves for backward (bf16 autocast, as the Trainer trains), sorted by
    kind from its shape, against the planner's term for that kind: the attention's K/V expanded to
    every head and growing with the step, the masks, the decoder layer, the logits, and autocast's
    bfloat16 weight copies."""
    from eaglebook.train import ttt_activation_bytes, ttt_forward

    B, T, K, Vd = 2, 40, 4, 300
    cfg, head = _small_head(Vd, num_key_value_heads=kv_heads)
    heads, hd = cfg.num_attention_heads, cfg.head_dim
    params = {p.untyped_storage().data_ptr() for p in head.parameters()}
    weights = {s for p in head.parameters() if p.dim() == 2 for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    got = dict.fromkeys(["decoder layer", "attention (query, output, K/V expanded to all heads)", "attention masks",
                         "draft logits (log-softmax, teacher probs)", "weight copies"], 0)
    seen = set()

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() in seen | params:  # each buffer once; the float32 weights are counted apart
            return t
        seen.add(storage.data_ptr())
        shape = tuple(t.shape)
        if t.dim() == 2 and shape in weights:
            kind = "weight copies"
        elif t.dim() == 4 and shape[1] == heads and shape[3] == hd:
            kind = "attention (query, output, K/V expanded to all heads)"
        elif t.dim() == 4 and shape[:3] == (1, 1, T) and shape[3] % T == 0:
            kind = "attention masks"
        elif t.dim() == 3 and shape[-1] == Vd and t.dtype == torch.float32:
            kind = "draft logits (log-softmax, teacher probs)"
        else:
            kind = "decoder layer"
        got[kind] += storage.nbytes()
        return t

    lm_head = torch.randn(cfg.vocab_size, cfg.hidden_size).to(torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        ttt_forward(head, _batch(cfg, B, T), lm_head, ttt_steps=K)
    want = ttt_activation_bytes(cfg, max_length=T, batch_size=B, ttt_steps=K, draft_vocab_size=Vd)
    print({k: (got[k], want.get(k)) for k in got})
    for kind, b in want.items():
        assert got[kind] == pytest.approx(b, rel=0.01), kind
    # autocast's bfloat16 copy of every linear weight; fc's is held in autocast's cache during the forward,
    # but not saved (its input, the target's features, needs no gradient)
    plan = plan_training_memory(cfg, max_length=T, batch_size=B, ttt_steps=K, draft_vocab_size=Vd)
    linear = sum(m.weight.numel() for m in head.modules() if isinstance(m, torch.nn.Linear))
    assert plan["terms_gib"]["autocast bfloat16 weight copies"] * 2**30 == 2 * linear
    assert got["weight copies"] == 2 * (linear - head.fc.weight.numel())


def _allocator_peak(fn) -> int:
    """Peak bytes the CPU allocator held above what was allocated before `fn` ran (torch.profiler's
    memory events carry the allocator's running total)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        events = json.load(open(f"{d}/trace.json"))["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def test_planner_peak_is_the_cpu_allocators_peak_of_real_training_steps(tmp_path):
    """The Trainer trains a small head as on the GPU (bf16 autocast, accumulated micro-batches, AdamW);
    the CPU allocator's peak above the weights that exist beforehand (the head's, its frozen embedding,
    the target's lm_head) is the planner's peak less those weights: gradients, optimizer state,
    autocast's weight copies and the forward's activations, up to the float32 copies of the returned
    logits."""
    from eaglebook.train import EagleTrainer, training_arguments

    B, T, K, Vd = 1, 64, 7, 2000
    cfg, head = _small_head(Vd, vocab_size=4000, num_key_value_heads=2)
    lm_head = torch.randn(cfg.vocab_size, cfg.hidden_size).to(torch.bfloat16)
    rows = [{k: v[0] for k, v in _batch(cfg, 1, T, seed=i).items() if k != "attention_mask"} for i in range(4)]
    args, K, _ = training_arguments(str(tmp_path), "cpu", ttt_steps=K, max_steps=2, per_device_train_batch_size=B,
                                    gradient_accumulation_steps=2, bf16=True, optim="adamw_torch", save_strategy="no",
                                    report_to=[], disable_tqdm=True)
    trainer = EagleTrainer(model=head, args=args, train_dataset=rows, lm_head_weight=lm_head, ttt_steps=K)
    measured = _allocator_peak(trainer.train)
    plan = plan_training_memory(cfg, max_length=T, batch_size=B, ttt_steps=K, draft_vocab_size=Vd,
                                optim="adamw_torch", target_load="head")
    before = ("target embedding + lm_head", "head weights (float32)", "head's frozen embedding (float32)")
    planned = (plan["peak_allocated_gib"] - sum(plan["terms_gib"][k] for k in before)) * 2**30
    print(f"CPU allocator peak {measured / 2**20:.2f} MiB, planner {planned / 2**20:.2f} MiB")
    assert planned == pytest.approx(measured, rel=0.03)
