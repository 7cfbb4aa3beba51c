"""A real third-party reader: vllm-project/speculators loads our speculators export on CPU and
its modules compute what eaglebook's do, module by module, on the same inputs.

speculators is installed --no-deps by scripts/install.sh (a plain install pulls a CUDA torch).
Its `from_pretrained` reads the verifier's config and weights from `name_or_path`, so the
verifier here is a tiny Llama (8 layers) saved to a local folder, with the hub switched off.
"""
from __future__ import annotations

import pytest
import torch

from eaglebook import export as ex
from eaglebook.draft import build_draft, causal_mask


@pytest.fixture
def speculators_pair(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

    ids = torch.arange(0, 4000, 7)
    t2d = torch.zeros(tiny_llama.config.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    head = build_draft(tiny_llama, ids - torch.arange(len(ids)), t2d)
    torch.manual_seed(11)
    with torch.no_grad():  # random everywhere, norms too, so a swapped tensor would show
        for p in head.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, mean=1.0 if p.dim() == 1 else 0.0, std=0.05 if p.dim() > 1 else 0.3)
    tiny_llama.save_pretrained(tmp_path / "verifier")
    ex.export_speculators(head, tmp_path / "spec", tiny_llama, ex.head_provenance(tiny_llama),
                          verifier_name_or_path=str(tmp_path / "verifier"))
    config = Eagle3SpeculatorConfig.from_pretrained(tmp_path / "spec")
    config.transformer_layer_config._attn_implementation = "eager"  # their default is flex attention
    theirs = Eagle3DraftModel.from_pretrained(tmp_path / "spec", config=config).eval()
    return head, theirs


def test_speculators_reads_the_export_with_our_semantics(speculators_pair, tiny_llama):
    head, theirs = speculators_pair
    assert theirs.config.draft_vocab_size == head.config.draft_vocab_size
    assert theirs.config.norm_before_residual is False
    assert theirs.config.eagle_aux_hidden_state_layer_ids == [2, 4, 5]  # default (2, N//2, N-3), HF ids
    assert torch.equal(theirs.d2t, head.d2t) and torch.equal(theirs.t2d, head.t2d)
    assert torch.equal(theirs.embed_tokens.weight, tiny_llama.get_input_embeddings().weight)


def test_module_by_module_outputs_match(speculators_pair):
    head, theirs = speculators_pair
    torch.manual_seed(12)
    T, H = 6, head.config.hidden_size
    ids = torch.randint(0, 4000, (1, T))
    feats = torch.randn(1, T, 3 * H)
    pos = torch.arange(3, 3 + T)[None]
    with torch.no_grad():
        h = head.fc(feats)
        fc_diff = (h - theirs.fc(feats)).abs().max().item()
        emb = head.embed_tokens(ids)
        # their rotary is built on a 2H-wide config; with an explicit head_dim it must not matter
        ours_pe = head.rotary_emb(h, pos)
        their_pe = theirs.rotary_emb(torch.cat([emb, h], -1), pos)
        rope_diff = max((a - b).abs().max().item() for a, b in zip(ours_pe, their_pe))
        mask = causal_mask(T, T)
        ours_layer = head.midlayer(emb, h, ours_pe, mask)
        additive = torch.zeros(1, 1, T, T).masked_fill(~mask, float("-inf"))  # eager attention adds it
        their_layer = theirs.layers[0](torch.cat([emb, h], -1), attention_mask=additive, position_ids=pos,
                                       position_embeddings=their_pe)
        layer_diff = (ours_layer - their_layer).abs().max().item()
        norm_diff = (head.norm(ours_layer) - theirs.norm(ours_layer)).abs().max().item()
        x = head.norm(ours_layer)
        head_diff = (head.lm_head(x) - theirs.lm_head(x)).abs().max().item()
        chain = theirs.lm_head(theirs.norm(their_layer))
        chain_diff = (chain - head(ids, feats, pos).logits).abs().max().item()
    print(f"speculators vs eaglebook max abs diff: fc {fc_diff}, rope {rope_diff}, layer {layer_diff}, "
          f"norm {norm_diff}, lm_head {head_diff}, whole step {chain_diff}")
    assert fc_diff == 0.0 and rope_diff == 0.0 and norm_diff == 0.0 and head_diff == 0.0
    assert layer_diff < 1e-5 and chain_diff < 1e-5  # eager vs sdpa attention: float rounding only
    assert their_layer.abs().max() > 1.0  # a real signal, not two zeros agreeing
