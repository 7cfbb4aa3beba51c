"""Distributed evaluation counts every held-out sequence once: `torchrun --nproc_per_node 2` (gloo,
CPU) on an evaluation set whose size is not a multiple of ranks x batch gives the metrics one
process gives on the whole set."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eaglebook.draft import build_draft
from eaglebook.train import collate, ttt_forward

from test_train import _dataset, _target

REPO = Path(__file__).resolve().parent.parent
EVAL_LENGTHS = (24, 9, 17, 12, 21, 8, 20)  # 7 sequences: 2 ranks x batch 2 leave the last batch short

EVAL_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import torch
    from test_train import _dataset, _target
    from test_distributed_eval import EVAL_LENGTHS
    from eaglebook.draft import build_draft
    from eaglebook.train import EagleTrainer, training_arguments

    head, out = sys.argv[1], sys.argv[2]
    target = _target(seed=7, sharp=40.0)
    rows = [{{k: v[:n] for k, v in r.items()}} for r, n in zip(_dataset(target, n=32), EVAL_LENGTHS)]
    draft = build_draft(target)
    draft.load_state_dict(torch.load(head))
    args, K, _ = training_arguments(out, "cpu", ttt_steps=3, per_device_eval_batch_size=2, report_to=[], bf16=False)
    trainer = EagleTrainer(model=draft, args=args, eval_dataset=rows, lm_head_weight=target.lm_head.weight, ttt_steps=K)
    metrics = trainer.evaluate()
    if trainer.args.process_index == 0:
        json.dump({{"world": trainer.args.world_size, **metrics}}, open(out + "/metrics.json", "w"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a clean exit: no gloo thread left running
""")


def test_two_ranks_evaluate_each_sequence_once(tmp_path):
    # A head fitted a little to the tiny target's own text, so the accuracies are not all zero (the
    # evaluation reads prefixes of its training sequences: this checks counting, not generalisation).
    target = _target(seed=7, sharp=40.0)
    rows = _dataset(target, n=32)
    torch.manual_seed(0)
    draft = build_draft(target)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    for step in range(24):
        loss, _, _ = ttt_forward(draft, collate(rows[(step % 4) * 8:(step % 4 + 1) * 8]), target.lm_head.weight, 3)
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save(draft.state_dict(), tmp_path / "head.pt")

    script = tmp_path / "evaluate.py"
    script.write_text(EVAL_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "EAGLEBOOK_THREADS": "1", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    runs = {"one": [sys.executable, str(script)],
            "two": [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)]}
    metrics = {}
    for name, cmd in runs.items():
        (tmp_path / name).mkdir()
        proc = subprocess.run([*cmd, str(tmp_path / "head.pt"), str(tmp_path / name)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    one, two = metrics["one"], metrics["two"]
    assert (one.pop("world"), two.pop("world")) == (1, 2)
    print({k: round(v, 4) for k, v in one.items()})
    assert 0 < one["eval_acc_0"] < 1 and one["eval_tau_sim"] > 1  # a metric that a duplicate would move
    assert one.keys() == two.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
