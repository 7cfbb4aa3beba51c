"""Saving, loading and exporting draft heads: round trips, refusals, and the serving contracts
of docs/stages.md § 9."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from conftest import tiny_llama_config
from eaglebook import export as ex
from eaglebook.draft import DraftError, Eagle1Draft, build_draft, build_eagle1_draft


def _vocab(V, ids):
    ids = torch.tensor(sorted(ids))
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(len(ids)), t2d


def _randomize(module, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, mean=1.0 if p.dim() == 1 else 0.0, std=0.05 if p.dim() > 1 else 0.3)
    return module


@pytest.fixture
def eagle3(tiny_llama):
    d2t, t2d = _vocab(tiny_llama.config.vocab_size, range(0, 4000, 7))
    return _randomize(build_draft(tiny_llama, d2t, t2d))


@pytest.fixture
def inputs(tiny_llama):
    torch.manual_seed(5)
    H, T = tiny_llama.config.hidden_size, 7
    return (torch.randint(0, 4000, (1, T)), torch.randn(1, T, 3 * H), torch.randn(1, T, H),
            torch.arange(2, 2 + T)[None])


def _max_diff(a, b):
    return (a - b).abs().max().item()


# The exact key sets of docs/stages.md § 9 (EAGLE-3, and EAGLE-1/2).
LAYER = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
         "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
EAGLE3_KEYS = ({"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"}
               | {f"midlayer.{k}" for k in LAYER}
               | {f"midlayer.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")})
EAGLE1_KEYS = {"fc.weight"} | {f"layers.0.{k}" for k in LAYER} | {"layers.0.post_attention_layernorm.weight"}


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


# ---------------------------------------------------------------------------------------------
# Round trips: eaglebook -> export -> reload gives the same logits
# ---------------------------------------------------------------------------------------------

def test_eagle3_round_trip_identical_logits(tiny_llama, eagle3, inputs, tmp_path):
    ids, feats, _, pos = inputs
    ex.export_eagle3(eagle3, tmp_path / "e3", tiny_llama, ex.head_provenance(tiny_llama))
    back = ex.load_draft(tmp_path / "e3", tiny_llama)
    assert back.source_format == "eagle3"
    a, b = eagle3(ids, feats, pos), back(ids, feats, pos)
    diff = max(_max_diff(a.logits, b.logits), _max_diff(a.hidden, b.hidden))
    print(f"eagle3 round trip max abs diff {diff}")
    assert diff == 0.0
    assert torch.equal(back.d2t, eagle3.d2t) and torch.equal(back.t2d, eagle3.t2d)


def test_speculators_round_trip_identical_logits(tiny_llama, eagle3, inputs, tmp_path):
    ids, feats, _, pos = inputs
    ex.export_speculators(eagle3, tmp_path / "sp", tiny_llama, ex.head_provenance(tiny_llama),
                          verifier_name_or_path="local/verifier")
    back = ex.load_draft(tmp_path / "sp", tiny_llama)
    assert back.source_format == "speculators"
    diff = _max_diff(eagle3(ids, feats, pos).logits, back(ids, feats, pos).logits)
    print(f"speculators round trip max abs diff {diff}")
    assert diff == 0.0


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_eagle1_round_trip_identical_logits(tiny_llama, inputs, tmp_path, engine):
    ids, _, feat, pos = inputs
    head = _randomize(build_eagle1_draft(tiny_llama, fc_bias=engine == "sglang"))
    ex.export_eagle(head, tmp_path / engine, tiny_llama, ex.head_provenance(tiny_llama), engine=engine)
    back = ex.load_draft(tmp_path / engine, tiny_llama)
    assert isinstance(back, Eagle1Draft) and back.source_format == f"eagle-{engine}"
    diff = _max_diff(head(ids, feat, pos).logits, back(ids, feat, pos).logits)
    print(f"EAGLE-1/2 {engine} round trip max abs diff {diff}")
    assert diff == 0.0


def test_bfloat16_head_round_trips_in_bfloat16(tiny_llama, eagle3, inputs, tmp_path):
    ids, feats, _, pos = inputs
    head = eagle3.to(torch.bfloat16)
    ex.export_eagle3(head, tmp_path / "bf", tiny_llama, ex.head_provenance(tiny_llama))
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert _tensors(tmp_path / "bf")["fc.weight"].dtype == torch.bfloat16
    back = ex.load_draft(tmp_path / "bf", tiny_llama)
    assert back.fc.weight.dtype == torch.bfloat16
    assert torch.equal(head(ids, feats, pos).logits, back(ids, feats, pos).logits)


def test_load_without_target_leaves_shared_tensors_nan(tiny_llama, eagle3, tmp_path):
    ex.save_draft(eagle3, tmp_path / "e3", ex.head_provenance(tiny_llama))
    back = ex.load_draft(tmp_path / "e3")
    assert torch.isnan(back.embed_tokens.weight).all()  # loud, not silently random
    assert torch.equal(back.fc.weight, eagle3.fc.weight)


# ---------------------------------------------------------------------------------------------
# The SGLang / vLLM contract of the canonical EAGLE-3 directory
# ---------------------------------------------------------------------------------------------

def test_eagle3_dir_matches_the_serving_contract(tiny_llama, eagle3, tmp_path):
    ex.export_eagle3(eagle3, tmp_path / "e3", tiny_llama, ex.head_provenance(tiny_llama))
    cfg = json.loads((tmp_path / "e3" / "config.json").read_text())
    t = _tensors(tmp_path / "e3")
    tc = tiny_llama.config
    H, Vd = tc.hidden_size, 572
    assert set(t) == EAGLE3_KEYS  # exactly: vLLM raises on extras, SGLang drops them silently
    assert t["fc.weight"].shape == (H, 3 * H)
    q, kv = tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim
    assert t["midlayer.self_attn.q_proj.weight"].shape == (q, 2 * H)
    assert t["midlayer.self_attn.k_proj.weight"].shape == (kv, 2 * H)
    assert t["midlayer.self_attn.o_proj.weight"].shape == (H, q)
    assert t["lm_head.weight"].shape == (Vd, H)
    assert t["d2t"].dtype == torch.int64 and t["d2t"].shape == (Vd,)
    assert t["t2d"].dtype == torch.bool and t["t2d"].shape == (tc.vocab_size,)
    assert torch.equal(torch.nonzero(t["t2d"]).flatten(), t["d2t"] + torch.arange(Vd))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is False and tc.tie_word_embeddings is True
    assert cfg["vocab_size"] == tc.vocab_size and cfg["draft_vocab_size"] == Vd
    assert cfg["head_dim"] == tc.head_dim and cfg["num_hidden_layers"] == 1
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == tc.rope_parameters["rope_theta"]
    assert "rope_scaling" in cfg
    assert cfg["max_position_embeddings"] >= tc.max_position_embeddings  # SGLang's context-length check
    assert "eagle_config" not in cfg and "eagle_aux_hidden_state_layer_ids" not in cfg  # default layers
    assert ex.check_export(tmp_path / "e3")["format"] == "eagle3"
    side = json.loads((tmp_path / "e3" / "eaglebook.json").read_text())
    assert side["aux_layers"] == {"hf": [2, 4, 5], "sglang": [1, 3, 4], "default": True}
    assert side["weights_fingerprint"] and side["vocab_source"] and side["eaglebook_version"]


def test_pinned_layers_are_written_in_both_conventions(tiny_llama, tmp_path):
    head = build_draft(tiny_llama, aux_layers=(1, 4, 7))
    ex.export_eagle3(head, tmp_path / "p", tiny_llama, ex.head_provenance(tiny_llama))
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 4, 7]  # vLLM (HF) convention, top level
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 3, 6]  # SGLang convention
    assert ex.load_draft(tmp_path / "p", tiny_llama).config.aux_layers == [1, 4, 7]
    # HF index 0 (the embedding output) has no SGLang id: only the vLLM-side export takes it
    first = build_draft(tiny_llama, aux_layers=(0, 4, 7))
    with pytest.raises(DraftError, match="SGLang cannot capture"):
        ex.export_eagle3(first, tmp_path / "q", tiny_llama, ex.head_provenance(tiny_llama))
    ex.export_speculators(first, tmp_path / "r", tiny_llama, ex.head_provenance(tiny_llama), verifier_name_or_path="v")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"] == [0, 4, 7]
    # HF index N (after the final norm) is what no engine captures: both exports refuse it
    last = build_draft(tiny_llama, aux_layers=(2, 4, 8))
    for export in (ex.export_eagle3, lambda *a: ex.export_speculators(*a, verifier_name_or_path="v")):
        with pytest.raises(DraftError, match="after the final norm.*pre-norm"):
            export(last, tmp_path / "s", tiny_llama, ex.head_provenance(tiny_llama))


def test_vllm_accepts_every_key(tiny_llama, eagle3, tmp_path):
    ex.export_eagle3(eagle3, tmp_path / "e3", tiny_llama, ex.head_provenance(tiny_llama))
    names = {k: ex.vllm_parameter_for(k, "eagle3") for k in _tensors(tmp_path / "e3")}
    assert names["midlayer.self_attn.q_proj.weight"] == "model.layers.0.self_attn.qkv_proj.weight"
    assert names["d2t"] == "draft_id_to_target_id" and names["t2d"] is None
    assert names["lm_head.weight"] == "lm_head.weight" and names["fc.weight"] == "model.fc.weight"
    known = ex.vllm_parameter_names(eagle3.config, "eagle3")
    assert {n for n in names.values() if n} <= known
    # and the check does catch a key vLLM has no parameter for
    t = _tensors(tmp_path / "e3")
    t["midlayer.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(t, str(tmp_path / "e3" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DraftError, match="q_proj.bias"):
        ex.check_export(tmp_path / "e3")


def test_speculators_dir_fields(tiny_llama, eagle3, tmp_path):
    ex.export_speculators(eagle3, tmp_path / "sp", tiny_llama, ex.head_provenance(tiny_llama),
                          verifier_name_or_path="org/verifier")
    cfg = json.loads((tmp_path / "sp" / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3" and cfg["norm_before_residual"] is False
    assert cfg["speculators_config"]["verifier"] == {"architectures": ["LlamaForCausalLM"], "name_or_path": "org/verifier"}
    layer = cfg["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["vocab_size"] == tiny_llama.config.vocab_size
    assert layer["head_dim"] == tiny_llama.config.head_dim and cfg["draft_vocab_size"] == 572
    keys = set(_tensors(tmp_path / "sp"))
    assert "layers.0.hidden_norm.weight" in keys and not any(k.startswith("midlayer.") for k in keys)
    assert ex.check_export(tmp_path / "sp")["format"] == "speculators"


def test_eagle1_dirs_for_each_engine(tiny_llama, tmp_path):
    head = build_eagle1_draft(tiny_llama)
    prov = ex.head_provenance(tiny_llama)
    ex.export_eagle(head, tmp_path / "sg", tiny_llama, prov, engine="sglang")
    ex.export_eagle(head, tmp_path / "vl", tiny_llama, prov, engine="vllm")
    sg, vl = _tensors(tmp_path / "sg"), _tensors(tmp_path / "vl")
    assert set(sg) == EAGLE1_KEYS | {"fc.bias"} and set(vl) == EAGLE1_KEYS
    assert sg["fc.weight"].shape == (64, 128) and sg["fc.bias"].shape == (64,)
    assert json.loads((tmp_path / "sg" / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle"]
    assert json.loads((tmp_path / "vl" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for k in vl:
        assert ex.vllm_parameter_for(k, "eagle-vllm") in ex.vllm_parameter_names(head.config, "eagle-vllm")
    # a trained (non-zero) bias cannot go to vLLM, whose fc has none
    with torch.no_grad():
        head.fc.bias.fill_(0.1)
    with pytest.raises(DraftError, match="fc.bias is non-zero"):
        ex.export_eagle(head, tmp_path / "vl2", tiny_llama, prov, engine="vllm")


# ---------------------------------------------------------------------------------------------
# Refusals name the problem
# ---------------------------------------------------------------------------------------------

def _edit_tensors(path, fn):
    t = _tensors(path)
    fn(t)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_unknown_and_misshapen_keys_are_named(tiny_llama, eagle3, tmp_path):
    d = tmp_path / "e3"
    ex.save_draft(eagle3, d, ex.head_provenance(tiny_llama))
    _edit_tensors(d, lambda t: t.pop("midlayer.hidden_norm.weight"))
    with pytest.raises(DraftError, match="missing key 'midlayer.hidden_norm.weight'"):
        ex.load_draft(d, tiny_llama)
    ex.save_draft(eagle3, d, ex.head_provenance(tiny_llama))
    _edit_tensors(d, lambda t: t.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(DraftError, match="unknown key 'model.extra.weight'"):
        ex.load_draft(d, tiny_llama)
    ex.save_draft(eagle3, d, ex.head_provenance(tiny_llama))
    _edit_tensors(d, lambda t: t.update({"fc.weight": torch.zeros(64, 128)}))
    with pytest.raises(DraftError, match=r"fc.weight: shape \(64, 128\)"):
        ex.load_draft(d, tiny_llama)
    ex.save_draft(eagle3, d, ex.head_provenance(tiny_llama))
    _edit_tensors(d, lambda t: t.update({"d2t": t["d2t"].to(torch.int32)}))
    with pytest.raises(DraftError, match="d2t: dtype"):
        ex.load_draft(d, tiny_llama)


def test_provenance_mismatch_is_named(tiny_llama, eagle3, tmp_path, smollm2_tokenizer):
    ex.save_draft(eagle3, tmp_path / "e3", ex.head_provenance(tiny_llama, smollm2_tokenizer))
    torch.manual_seed(99)
    other = LlamaForCausalLM(tiny_llama_config()).eval()  # same shapes, other weights
    with pytest.raises(DraftError, match="weights_fingerprint"):
        ex.load_draft(tmp_path / "e3", other)
    ex.load_draft(tmp_path / "e3", other, check=False)  # shapes fit: an explicit override loads it
    side = json.loads((tmp_path / "e3" / "eaglebook.json").read_text())
    side["template_hash"] = "0000"
    (tmp_path / "e3" / "eaglebook.json").write_text(json.dumps(side))
    with pytest.raises(DraftError, match="template_hash"):
        ex.load_draft(tmp_path / "e3", tiny_llama, tokenizer=smollm2_tokenizer)


def test_export_refuses_a_head_that_does_not_fit_its_target(tiny_llama, eagle3, tmp_path):
    wider = LlamaForCausalLM(tiny_llama_config(hidden_size=96))
    with pytest.raises(DraftError, match="hidden_size: draft 64, target 96"):
        ex.export_eagle3(eagle3, tmp_path / "x", wider, ex.head_provenance(tiny_llama))
    other_vocab = tiny_llama_config(vocab_size=32000)
    with pytest.raises(DraftError, match="vocab_size: draft 49152, target 32000"):
        ex.export_speculators(eagle3, tmp_path / "y", other_vocab, {}, verifier_name_or_path="v")
    fewer = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4))
    with pytest.raises(DraftError, match="target_num_hidden_layers: draft 8, target 4"):
        ex.export_eagle3(eagle3, tmp_path / "z", fewer, ex.head_provenance(tiny_llama))
    with pytest.raises(DraftError, match="provenance lacks"):
        ex.export_eagle3(eagle3, tmp_path / "w", tiny_llama, {"target": "x"})
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Other target families and RoPE forms
# ---------------------------------------------------------------------------------------------

def test_qwen3_target_exports_a_llama_draft(tmp_path):
    """Qwen3's head_dim * heads != hidden: the draft must carry head_dim explicitly."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    target = Qwen3ForCausalLM(cfg).eval()
    head = _randomize(build_draft(target))
    ex.export_eagle3(head, tmp_path / "q", target, ex.head_provenance(target))
    c = json.loads((tmp_path / "q" / "config.json").read_text())
    assert c["model_type"] == "llama" and c["head_dim"] == 32 and c["num_attention_heads"] == 4
    t = _tensors(tmp_path / "q")
    assert t["midlayer.self_attn.q_proj.weight"].shape == (128, 128)  # 4 heads x 32, from 2H = 128
    assert t["midlayer.self_attn.o_proj.weight"].shape == (64, 128)
    back = ex.load_draft(tmp_path / "q", target)
    ids, feats, pos = torch.randint(0, 1000, (1, 5)), torch.randn(1, 5, 192), torch.arange(5)[None]
    assert torch.equal(head(ids, feats, pos).logits, back(ids, feats, pos).logits)


def test_scaled_rope_is_written_in_both_forms(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    torch.manual_seed(0)
    target = LlamaForCausalLM(tiny_llama_config(rope_parameters=rope, max_position_embeddings=8192)).eval()
    head = _randomize(build_draft(target))
    ex.export_eagle3(head, tmp_path / "r", target, ex.head_provenance(target))
    c = json.loads((tmp_path / "r" / "config.json").read_text())
    assert c["rope_parameters"]["rope_type"] == "llama3" and c["rope_theta"] == 500000.0
    assert c["rope_scaling"]["factor"] == 8.0 and c["rope_scaling"]["rope_type"] == "llama3"
    assert c["max_position_embeddings"] == 8192
    back = ex.load_draft(tmp_path / "r", target)
    assert back.config.rope_parameters["rope_type"] == "llama3"
    ids, feats, pos = torch.randint(0, 4000, (1, 5)), torch.randn(1, 5, 192), torch.arange(2000, 2005)[None]
    assert torch.equal(head(ids, feats, pos).logits, back(ids, feats, pos).logits)
