"""The draft vocabulary map: d2t/t2d in the serving engines' convention, and its edge cases."""
from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from eaglebook import vocab


def toy_dataset():
    # Token 7 is trained 3x, 5 twice, 9 once; 1 and 2 appear only in prompts (mask 0).
    return Dataset.from_list([
        {"input_ids": [1, 2, 7, 7, 5], "loss_mask": [0, 0, 1, 1, 1]},
        {"input_ids": [2, 1, 7, 9, 5], "loss_mask": [0, 0, 1, 1, 1]},
    ])


def test_counts_only_trained_tokens():
    c = vocab.trained_token_counts(toy_dataset(), 16)
    assert c.tolist() == [0, 0, 0, 0, 0, 2, 0, 3, 0, 1, 0, 0, 0, 0, 0, 0]
    with pytest.raises(vocab.VocabError, match="outside the target vocab"):
        vocab.trained_token_counts(toy_dataset(), 8)


def test_top_k_sorted_with_end_of_turn_kept():
    c = vocab.trained_token_counts(toy_dataset(), 16)
    d2t, t2d = vocab.build_vocab_map(c, 3, always_keep=[15])
    ids = vocab.draft_to_target(d2t)
    assert ids.tolist() == [5, 7, 15]  # eot 15 kept although never trained; 9 (rarest) dropped
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool
    assert torch.equal(torch.nonzero(t2d).flatten(), d2t + torch.arange(3))
    assert vocab.coverage(c, t2d) == pytest.approx(5 / 6)


def test_padding_when_fewer_distinct_tokens_than_draft_vocab():
    c = vocab.trained_token_counts(toy_dataset(), 16)
    d2t, t2d = vocab.build_vocab_map(c, 6, always_keep=[15])
    ids = vocab.draft_to_target(d2t).tolist()
    assert ids == [0, 1, 5, 7, 9, 15]  # 5, 7, 9, 15 + unused 0, 1 as padding
    assert int(t2d.sum()) == 6 and vocab.coverage(c, t2d) == 1.0
    vocab.check_vocab_map(d2t, t2d)


def test_real_counts_from_smollm2_data(smollm2_tokenizer):
    from eaglebook import data
    tok = smollm2_tokenizer
    ds, _ = data.load_sharegpt(limit=30)
    tds, _ = data.tokenize_dataset(ds, tok, max_length=1024, progress=False)
    c = vocab.trained_token_counts(tds, len(tok))
    assert int(c.sum()) == sum(tds["num_trained"])
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    d2t, t2d = vocab.build_vocab_map(c, 2048, always_keep=[eot, tok.eos_token_id])
    vocab.check_vocab_map(d2t, t2d)
    assert t2d[eot] and len(d2t) == 2048
    sizes, cov = vocab.coverage_curve(c, [16, 256, 2048, len(tok)])
    assert cov == sorted(cov) and cov[-1] == 1.0 and 0 < cov[0] < cov[2] <= 1.0
    assert vocab.coverage(c, t2d) == pytest.approx(cov[2], abs=1e-3)  # only eot may displace one


def test_bad_maps_are_refused(tmp_path):
    c = torch.tensor([3, 2, 1, 0])
    with pytest.raises(vocab.VocabError, match="draft_vocab"):
        vocab.build_vocab_map(c, 5)
    d2t, t2d = vocab.build_vocab_map(c, 2)
    path = vocab.save_vocab_map(tmp_path / "v.safetensors", d2t, t2d, {"template_hash": "x"})
    d, t, meta = vocab.load_vocab_map(path)
    assert torch.equal(d, d2t) and torch.equal(t, t2d) and meta == {"template_hash": "x"}
    with pytest.raises(vocab.VocabError, match="nonzero"):
        vocab.check_vocab_map(torch.tensor([1, -1]), t2d)  # ids [1, 0]: unsorted


def test_held_out_coverage_ranks_by_the_training_counts():
    train = vocab.trained_token_counts(toy_dataset(), 16)  # 7: 3, 5: 2, 9: 1
    held = torch.zeros(16, dtype=torch.int64)
    held[7], held[3], held[5] = 1, 2, 1  # token 3 was never trained
    _, in_sample = vocab.coverage_curve(held, [1, 2, 16])
    assert in_sample == [0.5, 0.75, 1.0]  # ranked by its own counts: 3 first, reaches 1.0
    _, out = vocab.coverage_curve(held, [1, 2, 3, 16], rank_by=train)
    assert out == [0.25, 0.5, 0.5, 1.0]  # the top-3 trained tokens (7, 5, 9) cover half
    d2t, t2d = vocab.build_vocab_map(train, 2)
    assert vocab.coverage(held, t2d) == out[1]  # the same number the draft vocab map gives
    with pytest.raises(vocab.VocabError, match="rank_by"):
        vocab.coverage_curve(held, rank_by=train[:8])


def test_a_saved_map_keeps_the_counts_it_was_chosen_from(tmp_path):
    counts = vocab.trained_token_counts(toy_dataset(), 16)
    d2t, t2d = vocab.build_vocab_map(counts, 3)
    with_counts = vocab.save_vocab_map(tmp_path / "a.safetensors", d2t, t2d, {"source": "toy"}, counts=counts)
    d, t, meta = vocab.load_vocab_map(with_counts)  # the engines' tensors and the provenance, as before
    assert torch.equal(d, d2t) and torch.equal(t, t2d) and meta == {"source": "toy"}
    back = vocab.load_vocab_counts(with_counts)
    assert torch.equal(back, counts)
    # the map is exactly the top of these counts: a later stage can redraw its coverage curve
    assert vocab.coverage(back, t2d) == vocab.coverage_curve(back, [3])[1][0]
    plain = vocab.save_vocab_map(tmp_path / "b.safetensors", d2t, t2d)
    assert vocab.load_vocab_counts(plain) is None
    with pytest.raises(vocab.VocabError, match="same target vocabulary"):
        vocab.save_vocab_map(tmp_path / "c.safetensors", d2t, t2d, counts=counts[:8])
