"""A quick, real fit of a draft head to a (tiny) target, for the decoding tests.

Not the training pipeline (that is `eaglebook.train`): a few hundred Adam steps of the
EAGLE-3 step-0 objective on the target's own greedy continuations, so tests have a head
that agrees with its target often enough to exercise long accepted paths.
"""
from __future__ import annotations

import torch

from eaglebook.decode import baseline_decode, capture_aux, target_forward
from eaglebook.draft import build_draft
from transformers.cache_utils import DynamicCache


def greedy_sequences(target, n: int = 8, prompt_len: int = 8, new_tokens: int = 48, low: int = 3, seed: int = 0):
    """n token sequences: a random prompt followed by the target's greedy continuation."""
    g = torch.Generator().manual_seed(seed)
    high = target.config.vocab_size
    seqs = []
    for _ in range(n):
        p = torch.randint(low, high, (prompt_len,), generator=g).tolist()
        seqs.append(p + baseline_decode(target, p, new_tokens).token_ids)
    return seqs


@torch.no_grad()
def features_and_teacher(target, seq, aux_layers):
    ids = torch.tensor([seq])
    store = []
    with capture_aux(target, aux_layers, store):
        logits = target_forward(target, ids, torch.arange(len(seq))[None], DynamicCache())
    return store[0], logits.float().log_softmax(-1)


def fit_draft(target, sequences, steps: int = 300, lr: float = 3e-3, ttt_steps: int = 3, seed: int = 0, draft=None):
    """Fit the draft with a small training-time test: step 0 reads (target feature_t, token_{t+1}) at
    position t; step k reads its own step k-1 output, token_{t+1+k}, position t+k, and attends to the
    step-0 keys up to t plus its own chain, exactly as the decoder's draft does. Teacher: the
    target's distribution at t+1+k restricted to the draft vocab. Step weights 0.8^k."""
    torch.manual_seed(seed)
    draft = draft if draft is not None else build_draft(target)
    n = target.config.num_hidden_layers
    aux = (2, n // 2, n - 3)
    data = [(torch.tensor([s]), *features_and_teacher(target, s, aux)) for s in sequences]
    draft.train().requires_grad_(True)
    draft.embed_tokens.weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=lr)
    vocab = draft.draft_ids
    for i in range(steps):
        ids, feats, teacher = data[i % len(data)]
        T = ids.shape[1] - 1
        cache, hidden, loss = DynamicCache(), feats[:, :-1], 0.0
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for k in range(ttt_steps):
            valid = T - k
            if valid <= 0:
                break
            tok = torch.zeros(1, T, dtype=torch.long)
            tok[0, :valid] = ids[0, 1 + k:]
            mask = torch.cat([causal] + [torch.eye(T, dtype=torch.bool)] * k, dim=1) if k else causal
            out = draft(tok, hidden, (torch.arange(T) + k)[None], attention_mask=mask[None, None],
                        past_key_values=cache)
            target_lp = teacher[0, 1 + k:, vocab].log_softmax(-1)  # [valid, Vd]
            ce = -(target_lp.exp() * out.logits[0, :valid].float().log_softmax(-1)).sum(-1).mean()
            loss = loss + 0.8 ** k * ce
            hidden = out.hidden
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draft.eval().requires_grad_(False)
