"""EAGLE-3 training-time test: the attention pattern, alignment, metrics, training, resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from eaglebook.draft import build_draft
from eaglebook.train import TTTStats, collate, tau_sim, teacher_from_final, ttt_forward, ttt_mask

from conftest import tiny_llama_config

AUX = (2, 4, 5)  # HF indices (2, N//2, N-3) for N = 8


def _target(vocab=512, seed=0, sharp=1.0):
    """A tiny random target; `sharp` scales its output layer so its distribution is peaked
    (a freshly initialised model is nearly uniform, which leaves nothing to learn)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=vocab, tie_word_embeddings=sharp == 1.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(sharp)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def features(target, ids, loss_mask=None):
    """Per-sequence feature dicts from the target (output_hidden_states: the oracle)."""
    out = target(ids, output_hidden_states=True)
    hs = out.hidden_states
    rows = []
    for i in range(ids.shape[0]):
        rows.append({"input_ids": ids[i], "loss_mask": torch.ones_like(ids[i]) if loss_mask is None else loss_mask[i],
                     "aux_hidden": torch.cat([hs[j][i] for j in AUX], -1), "final_hidden": hs[-1][i]})
    return rows, out.logits


def _randomize(draft, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in draft.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.08 if p.dim() > 1 else 0.3) + (1.0 if p.dim() == 1 else 0))
    return draft


def test_ttt_mask_pattern():
    m = ttt_mask(3, 2)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 1, 0, 0, 1, 0, 0],
                 [1, 1, 0, 0, 1, 0, 0, 1, 0],
                 [1, 1, 1, 0, 0, 1, 0, 0, 1]]


def test_parallel_ttt_equals_step_by_step_decoding():
    """Step-k logits at every position == running the draft step by step from that prefix,
    over a KV cache of the true prefix, feeding back its own hidden outputs."""
    target = _target()
    draft = _randomize(build_draft(target))
    ids = torch.randint(0, 512, (2, 10))
    rows, _ = features(target, ids)
    batch = collate(rows)
    K = 4
    _, _, logits = ttt_forward(draft, batch, target.lm_head.weight, ttt_steps=K)
    T = ids.shape[1]
    with torch.no_grad():
        for b in range(2):
            for t in range(T - 2):
                cache = DynamicCache()
                pre = draft(ids[b:b + 1, 1:t + 2], batch["aux_hidden"][b:b + 1, :t + 1],
                            torch.arange(t + 1)[None], past_key_values=cache)
                torch.testing.assert_close(logits[0][b, t], pre.logits[0, -1], rtol=1e-4, atol=1e-5)
                h = pre.hidden[:, -1:]
                for k in range(1, K):
                    if t + 1 + k >= T:
                        break
                    step = draft(ids[b:b + 1, t + 1 + k: t + 2 + k], h, torch.tensor([[t + k]]), past_key_values=cache)
                    torch.testing.assert_close(logits[k][b, t], step.logits[0, -1], rtol=1e-4, atol=1e-5,
                                               msg=f"step {k} at position {t}")
                    h = step.hidden


def test_alignment_and_metrics_against_the_target_itself():
    """Step k at t is scored on the target's own argmax at t+1+k, on trained token t+2+k."""
    target = _target(seed=3)
    draft = _randomize(build_draft(target), seed=4)
    ids = torch.randint(0, 512, (1, 9))
    mask = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1, 1]])
    rows, target_logits = features(target, ids, mask)
    batch = collate(rows)
    K = 3
    _, stats, logits = ttt_forward(draft, batch, target.lm_head.weight, ttt_steps=K)
    # lm_head(final feature) is the target's prediction: the teacher needs no second norm
    top, _ = teacher_from_final(batch["final_hidden"], target.lm_head.weight, draft.draft_ids)
    assert torch.equal(top, target_logits.argmax(-1))
    T = 9
    chain = {t: True for t in range(T)}
    for k in range(K):
        trained = correct = chain_ok = chain_right = 0
        for t in range(T - 2 - k):
            if not mask[0, t + 2 + k]:
                continue
            right = draft.to_target_ids(logits[k][0, t].argmax()).item() == target_logits[0, t + 1 + k].argmax().item()
            trained += 1
            correct += right
            chain_ok += chain[t]
            chain_right += chain[t] and right
        for t in range(T):  # a chain survives step k only if that step was trained and right
            chain[t] = chain[t] and t < T - 2 - k and bool(mask[0, t + 2 + k]) and (
                draft.to_target_ids(logits[k][0, t].argmax()).item() == target_logits[0, t + 1 + k].argmax().item())
        assert stats.trained[k] == trained and stats.correct[k] == correct
        assert stats.chain_ok[k] == chain_ok and stats.chain_correct[k] == chain_right
    m = stats.metrics()
    assert m["tau_sim"] == pytest.approx(tau_sim([m[f"cond_acc_{k}"] for k in range(K)]))


def test_tau_sim_definition():
    assert tau_sim([1.0, 1.0, 1.0]) == 4.0
    assert tau_sim([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    assert tau_sim([0.0, 1.0]) == 1.0


def test_out_of_vocab_teacher_positions_are_dropped():
    target = _target(seed=5)
    ids = torch.randint(0, 512, (2, 12))
    rows, logits = features(target, ids)
    tops = logits.argmax(-1).flatten().unique()
    keep = sorted(set(range(0, 512, 2)) | {2})
    d2t = torch.tensor(keep) - torch.arange(len(keep))
    t2d = torch.zeros(512, dtype=torch.bool)
    t2d[keep] = True
    draft = build_draft(target, d2t, t2d)
    _, stats, out = ttt_forward(draft, collate(rows), target.lm_head.weight, ttt_steps=2)
    assert out[0].shape[-1] == len(keep)
    expected = int((~t2d[logits.argmax(-1)[:, 1:11]]).sum())  # step-0 teacher positions 1..T-2
    assert stats.dropped == expected > 0
    assert len(tops) > 1


def _dataset(target, n=48, T=24, seed=0):
    """Sequences the tiny target writes itself (sampled), with its features."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 512, (n, 4), generator=g)
    with torch.no_grad():
        torch.manual_seed(seed)
        seqs = target.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=8,
                               max_new_tokens=T - 4, min_new_tokens=T - 4, pad_token_id=0, eos_token_id=None)
    rows, _ = features(target, seqs)
    return rows


def test_training_lowers_loss_and_beats_untrained(tmp_path):
    from eaglebook.train import EagleTrainer, training_arguments

    target = _target(seed=7, sharp=40.0)
    # A tiny random target gives too little structure to generalise from 48 sequences, so
    # this checks that the loop fits its data; held-out gains are checked on SmolLM2 in notebook 04.
    train = _dataset(target)
    held = train[:16]
    draft = build_draft(target)
    args, K, _ = training_arguments(str(tmp_path), "cpu", ttt_steps=3, max_steps=60, learning_rate=3e-3,
                                    per_device_train_batch_size=8, logging_steps=10, save_strategy="no",
                                    report_to=[], bf16=False)
    trainer = EagleTrainer(model=draft, args=args, train_dataset=train, eval_dataset=held,
                           lm_head_weight=target.lm_head.weight, ttt_steps=K)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0]
    assert after["eval_acc_0"] > before["eval_acc_0"] + 0.2
    assert after["eval_loss"] < before["eval_loss"]
    assert {"train_acc_0", "train_tau_sim", "train_cond_acc_2"} <= set(trainer.state.log_history[0])


RESUME_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import torch
    from transformers import TrainerCallback
    from test_train import _dataset, _target
    from eaglebook.draft import build_draft
    from eaglebook.train import train_draft

    out, die_at = sys.argv[1], int(sys.argv[2])

    class Die(TrainerCallback):  # a hard kill: no cleanup, no final save
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == die_at:
                os._exit(3)

    target = _target(seed=7, sharp=40.0)
    rows = _dataset(target, n=32)
    torch.manual_seed(0)
    draft = build_draft(target)
    tr = train_draft(draft, target.lm_head.weight, rows, output_dir=out, profile="cpu", ttt_steps=2,
                     max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
                     save_steps=5, report_to=[], bf16=False, callbacks=[Die()] if die_at else [])
    json.dump([h for h in tr.state.log_history if "loss" in h], open(os.path.join(out, "losses.json"), "w"))
""")


def test_killed_training_resumes_on_the_same_curve(tmp_path):
    """A run killed after its step-5 checkpoint resumes there, on the same batch order:
    its losses for steps 6..12 match the uninterrupted run's."""
    import pathlib

    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(pathlib.Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = lambda out, die: subprocess.run([sys.executable, str(script), str(out), str(die)], env=env,  # noqa: E731
                                          capture_output=True, text=True, timeout=300)
    full = run(tmp_path / "full", 0)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = run(tmp_path / "killed", 7)
    assert killed.returncode == 3, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint-5").is_dir() and not (tmp_path / "killed" / "losses.json").exists()
    resumed = run(tmp_path / "killed", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stdout
    a = {h["step"]: h["loss"] for h in json.loads((tmp_path / "full" / "losses.json").read_text())}
    b = {h["step"]: h["loss"] for h in json.loads((tmp_path / "killed" / "losses.json").read_text())}
    assert sorted(a) == sorted(b) == list(range(1, 13))  # the checkpoint carries steps 1..5
    for step in range(1, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-3), step
    # the CSV log holds the whole curve, before and after the kill
    import csv

    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "killed" / "log.csv")) if r.get("loss")]
    assert steps[:5] == [1, 2, 3, 4, 5] and steps[-1] == 12


def test_eagle1_losses_both_send_gradients_and_training_fits(tmp_path):
    from eaglebook.draft import build_eagle1_draft
    from eaglebook.train import EagleTrainer, collate, eagle1_forward, training_arguments

    target = _target(seed=7, sharp=40.0)
    rows = [{k: r[k] for k in ("input_ids", "loss_mask", "final_hidden")} for r in _dataset(target, n=32)]
    draft = build_eagle1_draft(target)
    batch = collate(rows[:4])
    for p_w, v_w in ((1.0, 0.0), (0.0, 1.0)):  # each loss alone reaches the trainable layers
        draft.zero_grad()
        loss, _, _ = eagle1_forward(draft, batch, target.lm_head.weight, p_w=p_w, v_w=v_w)
        loss.backward()
        assert draft.fc.weight.grad.abs().sum() > 0 and draft.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
        assert draft.lm_head.weight.grad is None  # the target's head stays frozen
    draft.zero_grad()
    args, _, _ = training_arguments(str(tmp_path), "cpu", ttt_steps=1, max_steps=40, learning_rate=3e-3,
                                    per_device_train_batch_size=8, logging_steps=10, save_strategy="no",
                                    report_to=[], bf16=False)
    trainer = EagleTrainer(model=draft, args=args, train_dataset=rows, eval_dataset=rows[:8],
                           lm_head_weight=target.lm_head.weight)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.8 * before["eval_loss"]
    assert after["eval_acc_0"] > before["eval_acc_0"]


def test_eagle1_feature_noise_scales_with_each_rows_own_length():
    """EAGLE-1's training noise is uniform in +-noise*256/L for a row of L real tokens, whatever the
    other rows of its batch are: a short row batched with a long one gets the noise it gets alone."""
    from eaglebook.draft import build_eagle1_draft
    from eaglebook.train import eagle1_forward

    target = _target(seed=7)
    g = torch.Generator().manual_seed(0)
    short, long_ = (features(target, torch.randint(0, 512, (1, n), generator=g))[0][0] for n in (12, 48))
    draft = build_eagle1_draft(target).train()
    entering = []  # the features the head reads: the stored ones plus the noise
    draft.register_forward_pre_hook(lambda module, args: entering.append(args[1].detach().clone()))
    noise = 0.2

    def largest_noise(rows, i):
        batch = collate(rows)
        entering.clear()
        eagle1_forward(draft, batch, target.lm_head.weight, noise=noise)
        n = int(batch["attention_mask"][i].sum())
        return (entering[0][i, :n] - batch["final_hidden"][i, :n]).abs().max().item(), n

    torch.manual_seed(0)
    for rows, i in (([short], 0), ([short, long_], 0), ([long_, short], 1), ([short, long_], 1)):
        got, n = largest_noise(rows, i)
        bound = noise * 256 / n  # |rand - 0.5| <= 0.5; n x 64 draws come close to it
        assert 0.95 * bound < got <= bound * (1 + 1e-6), (len(rows), i, n, got, bound)
    draft.eval()
    assert largest_noise([short], 0)[0] == 0.0  # no noise in eval mode


def _eval_by_hand(draft, rows, lm_head_weight, ttt_steps, batch_size, max_length=None):
    """The held-out metrics written out: ttt_forward over the rows in order, `batch_size` at a time."""
    stats = TTTStats(ttt_steps)
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            stats.add(ttt_forward(draft, collate(rows[i:i + batch_size], max_length), lm_head_weight, ttt_steps)[1])
    return stats.metrics("eval_")


def test_evaluation_is_the_heads_own_forward_even_after_bf16_training(tmp_path):
    """The Trainer's evaluation counts what ttt_forward counts over the same batches, in the head's own
    dtype: not under the training's bf16 autocast (which accelerate also patches into the trained
    module's forward), so a hand-written loop over the held-out set reproduces it exactly, on any machine."""
    from eaglebook.train import EagleTrainer, training_arguments

    target = _target(seed=7, sharp=40.0)
    rows = _dataset(target, n=12)
    draft = _randomize(build_draft(target))
    args, K, _ = training_arguments(str(tmp_path), "cpu", ttt_steps=3, max_steps=2, per_device_train_batch_size=4,
                                    per_device_eval_batch_size=4, save_strategy="no", report_to=[], bf16=True)
    trainer = EagleTrainer(model=draft, args=args, train_dataset=rows, eval_dataset=rows,
                           lm_head_weight=target.lm_head.weight, ttt_steps=K)
    trainer.train()
    got = trainer.evaluate()
    want = _eval_by_hand(draft, rows, target.lm_head.weight, K, batch_size=4)
    for k in range(K):
        assert got[f"eval_loss_{k}"] == pytest.approx(want[f"eval_loss_{k}"], rel=1e-9, abs=0)
        assert got[f"eval_cond_acc_{k}"] == want[f"eval_cond_acc_{k}"]
        assert got[f"eval_acc_{k}"] == want[f"eval_acc_{k}"]


def test_evaluation_cuts_sequences_at_max_length_as_training_does(tmp_path):
    """An EagleTrainer given max_length evaluates the first max_length tokens of each sequence, as its
    training batches are cut (and as train_draft's evaluations are), not the whole stored sequence."""
    from eaglebook.train import EagleTrainer, training_arguments

    target = _target(seed=7, sharp=40.0)
    rows = _dataset(target, n=8, T=24)
    draft = _randomize(build_draft(target))
    args, K, _ = training_arguments(str(tmp_path), "cpu", ttt_steps=3, per_device_eval_batch_size=4,
                                    report_to=[], bf16=False)
    got = EagleTrainer(model=draft, args=args, eval_dataset=rows, lm_head_weight=target.lm_head.weight,
                       ttt_steps=K, max_length=16).evaluate()
    cut = _eval_by_hand(draft, rows, target.lm_head.weight, K, batch_size=4, max_length=16)
    whole = _eval_by_hand(draft, rows, target.lm_head.weight, K, batch_size=4)
    assert got["eval_loss_0"] == pytest.approx(cut["eval_loss_0"], rel=1e-9, abs=0) != whole["eval_loss_0"]
    assert [got[f"eval_cond_acc_{k}"] for k in range(K)] == [cut[f"eval_cond_acc_{k}"] for k in range(K)]
