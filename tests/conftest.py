"""Shared fixtures: the real embedded default (loaded once per session) and tiny local models."""
from __future__ import annotations

import pytest
import torch

import eaglebook


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default target in float32 (the lossless reference dtype) and its tokenizer."""
    model, tok = eaglebook.load_target("smollm2-135m", dtype="float32", verbose=False)
    return model, tok


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2[1]


def tiny_llama_config(num_hidden_layers: int = 8, vocab_size: int = 49152, hidden_size: int = 64, **kw):
    """A tiny Llama config (>= 8 layers so the three EAGLE-3 aux layers are distinct)."""
    from transformers import LlamaConfig

    base = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                head_dim=hidden_size // 4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture
def tiny_llama():
    """A randomly initialized tiny Llama (float32, eval mode), seeded, SmolLM2's vocab size."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.config._attn_implementation = "sdpa"
    return model.eval().requires_grad_(False)


def smollm2_feature_store(smollm2, out_dir, aux_layers=None, n: int = 8, max_length: int = 96):
    """A small real feature store: the first `n` ShareGPT conversations (assistant tokens kept within
    `max_length`) captured from SmolLM2 by the package's own capture, float32 storage."""
    from eaglebook import data, hidden_states as hs

    model, tok = smollm2
    convs, _ = data.load_sharegpt(limit=4 * n)
    ds, _ = data.tokenize_dataset(convs, tok, max_length=max_length, progress=False)
    ds = ds.select(range(min(n, len(ds))))
    hs.write_features(model, tok, ds, out_dir, aux_layers=aux_layers, storage="float32", progress=False,
                      target_name="smollm2-135m")
    return out_dir


@pytest.fixture(scope="session")
def smol_store(smollm2, tmp_path_factory):
    """8 ShareGPT conversations of SmolLM2 features at the default aux layers."""
    return smollm2_feature_store(smollm2, tmp_path_factory.mktemp("smol-store") / "features")
