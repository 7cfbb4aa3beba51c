"""The EAGLE-3 draft head's forward pass against a hand-written reference, and its KV cache."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.cache_utils import DynamicCache

from eaglebook.draft import DraftError, build_draft, causal_mask


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta, hd):
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_step(d, ids, feats, pos):
    """EAGLE-3 layer written out by hand (one sequence, causal)."""
    c = d.config
    eps, H, nh, nkv, hd = c.rms_norm_eps, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    m = d.midlayer
    emb = d.embed_tokens.weight[ids]
    h = feats @ d.fc.weight.T
    x = torch.cat([_rms(emb, m.input_layernorm.weight, eps), _rms(h, m.hidden_norm.weight, eps)], -1)
    T = ids.shape[0]
    q = (x @ m.self_attn.q_proj.weight.T).view(T, nh, hd).transpose(0, 1)
    k = (x @ m.self_attn.k_proj.weight.T).view(T, nkv, hd).transpose(0, 1)
    v = (x @ m.self_attn.v_proj.weight.T).view(T, nkv, hd).transpose(0, 1)
    theta = c.rope_parameters["rope_theta"]
    q, k = _rope(q, pos, theta, hd), _rope(k, pos, theta, hd)
    k = k.repeat_interleave(nh // nkv, 0)
    v = v.repeat_interleave(nh // nkv, 0)
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    a = (s.softmax(-1) @ v).transpose(0, 1).reshape(T, nh * hd) @ m.self_attn.o_proj.weight.T
    out = h + a
    y = _rms(out, m.post_attention_layernorm.weight, eps)
    mlp = m.mlp
    out = out + (torch.nn.functional.silu(y @ mlp.gate_proj.weight.T) * (y @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    logits = _rms(out, d.norm.weight, eps) @ d.lm_head.weight.T
    return logits, out


def _vocab(V, ids):
    ids = torch.tensor(sorted(ids))
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(len(ids)), t2d


def test_one_step_equals_hand_written_reference(tiny_llama):
    torch.manual_seed(1)
    d2t, t2d = _vocab(tiny_llama.config.vocab_size, range(0, 4000, 7))
    d = build_draft(tiny_llama, d2t, t2d)
    for p in d.parameters():  # random, non-trivial weights everywhere (norms too)
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05 if p.dim() > 1 else 1.0)
    T, H = 6, tiny_llama.config.hidden_size
    ids = torch.randint(0, 4000, (T,))
    feats = torch.randn(T, 3 * H)
    pos = torch.arange(3, 3 + T)
    out = d(ids[None], feats[None], pos[None])
    ref_logits, ref_hidden = reference_step(d, ids, feats, pos)
    torch.testing.assert_close(out.logits[0], ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.hidden[0], ref_hidden, rtol=1e-4, atol=1e-4)
    # the target's own output rows initialise the reduced lm_head
    assert torch.equal(build_draft(tiny_llama, d2t, t2d).lm_head.weight, tiny_llama.lm_head.weight[d.draft_ids])


def test_kv_cache_incremental_equals_full(tiny_llama):
    torch.manual_seed(2)
    d = build_draft(tiny_llama)
    H = tiny_llama.config.hidden_size
    ids = torch.randint(0, 1000, (1, 9))
    feats = torch.randn(1, 9, 3 * H)
    pos = torch.arange(9)[None]
    full = d(ids, feats, pos)
    cache = DynamicCache()
    a = d(ids[:, :5], feats[:, :5], pos[:, :5], past_key_values=cache)
    b = d(ids[:, 5:], feats[:, 5:], pos[:, 5:], past_key_values=cache)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), full.logits, rtol=1e-5, atol=1e-5)
    # the draft's own H-wide state skips fc
    step = d(ids[:, :1], full.hidden[:, -1:], pos[:, :1] + 9, past_key_values=cache)
    assert step.hidden.shape == (1, 1, H) and cache.get_seq_length() == 10


def test_bad_shapes_name_the_problem(tiny_llama):
    d = build_draft(tiny_llama)
    with pytest.raises(DraftError, match="hidden width 7"):
        d(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 7), torch.arange(2)[None])
    d2t, t2d = _vocab(tiny_llama.config.vocab_size, [1, 5, 9])
    t2d[10] = True
    with pytest.raises(DraftError, match="inconsistent"):
        build_draft(tiny_llama, d2t, t2d)


def test_causal_mask_with_prefix():
    m = causal_mask(2, 5)[0, 0]
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
