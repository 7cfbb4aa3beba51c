"""The EAGLE-1/2 head against a hand-written reference, its KV cache, and parameter counting."""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from eaglebook.draft import DraftError, build_draft, build_eagle1_draft, count_parameters
from test_draft_core import _rms, _rope


def _attention(m, x, pos, c):
    T, nh, nkv, hd = x.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = (x @ m.q_proj.weight.T).view(T, nh, hd).transpose(0, 1)
    k = (x @ m.k_proj.weight.T).view(T, nkv, hd).transpose(0, 1)
    v = (x @ m.v_proj.weight.T).view(T, nkv, hd).transpose(0, 1)
    theta = c.rope_parameters["rope_theta"]
    q, k = _rope(q, pos, theta, hd), _rope(k, pos, theta, hd)
    k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
    s = (q @ k.transpose(-1, -2)) / hd ** 0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1).reshape(T, nh * hd) @ m.o_proj.weight.T


def test_eagle1_step_equals_hand_written_reference(tiny_llama):
    head = build_eagle1_draft(tiny_llama)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in head.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, mean=1.0 if p.dim() == 1 and p is not head.fc.bias else 0.0, std=0.05)
    c, H, T = head.config, tiny_llama.config.hidden_size, 5
    ids, feat, pos = torch.randint(0, 4000, (T,)), torch.randn(T, H), torch.arange(1, 1 + T)
    layer = head.layers[0]
    # fc over cat(embedding, feature), with bias; no input_layernorm on layer 0; no final norm
    h = torch.cat([tiny_llama.get_input_embeddings().weight[ids], feat], -1) @ head.fc.weight.T + head.fc.bias
    h = h + _attention(layer.self_attn, h, pos, c)
    y = _rms(h, layer.post_attention_layernorm.weight, c.rms_norm_eps)
    mlp = layer.mlp
    h = h + (torch.nn.functional.silu(y @ mlp.gate_proj.weight.T) * (y @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    logits = h @ tiny_llama.get_output_embeddings().weight.T  # the target's own head
    out = head(ids[None], feat[None], pos[None])
    torch.testing.assert_close(out.hidden[0], h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[0], logits, rtol=1e-4, atol=1e-4)
    assert "layers.0.input_layernorm.weight" not in head.state_dict()


def test_eagle1_kv_cache_incremental_equals_full(tiny_llama):
    head = build_eagle1_draft(tiny_llama)
    torch.manual_seed(6)
    ids, feat, pos = torch.randint(0, 1000, (1, 8)), torch.randn(1, 8, 64), torch.arange(8)[None]
    full = head(ids, feat, pos)
    cache = DynamicCache()
    a = head(ids[:, :3], feat[:, :3], pos[:, :3], past_key_values=cache)
    b = head(ids[:, 3:], feat[:, 3:], pos[:, 3:], past_key_values=cache)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), full.logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(DraftError, match="hidden width 192"):
        head(ids, torch.randn(1, 8, 192), pos)


def test_count_parameters_excludes_frozen_shared_tensors(tiny_llama):
    H, I, V = 64, 128, tiny_llama.config.vocab_size
    layer = 2 * H * H + 2 * 2 * H * (H // 2) + H * H + 3 * H * I  # q(2H->H), k,v(2H->H/2), o, mlp
    d3 = count_parameters(build_draft(tiny_llama))
    assert d3["fc"] == 3 * H * H and d3["lm_head"] == V * H and d3["norm"] == H
    assert d3["midlayer"] == layer + 3 * H
    assert d3["trainable"] == d3["fc"] + d3["midlayer"] + d3["norm"] + d3["lm_head"]
    assert d3["frozen"] == V * H  # the shared embedding
    d1 = count_parameters(build_eagle1_draft(tiny_llama))
    assert "lm_head" not in d1 and d1["frozen"] == 2 * V * H  # embedding + the target's head
    assert d1["fc"] == 2 * H * H + H
