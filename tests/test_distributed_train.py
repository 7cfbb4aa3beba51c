"""Data-parallel training syncs: `torchrun --nproc_per_node 2 -m eaglebook.cli train` (gloo, CPU)
on a real SmolLM2 feature store ends with the same head on both ranks, and that head is the one a
single process trains on the same global batches (2 micro-batches accumulated per step)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from eaglebook.export import load_draft

REPO = Path(__file__).resolve().parent.parent
# Small enough for CI: 6 training sequences of 96 tokens, 3 optimizer steps, 2 TTT steps.
TRAIN_FLAGS = ["--max_steps", "3", "--batch_size", "1", "--ttt_steps", "2", "--draft_vocab_size", "512",
               "--eval_fraction", "0.25", "--learning_rate", "0.001", "--report_to", ""]


def test_torchrun_two_ranks_train_the_single_process_head(smol_store, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO), "EAGLEBOOK_THREADS": "1", "OMP_NUM_THREADS": "1"}
    # The multi-GPU command of the README, on 2 CPU processes (torch picks the gloo backend).
    # --standalone: a free rendezvous port, so parallel runs on one machine do not collide on 29500
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "eaglebook.cli", "train",
           "--features", str(smol_store), "--output_dir", str(tmp_path / "ddp"), *TRAIN_FLAGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    digests = dict(re.findall(r"rank (\d)/2: head weights sha256 (\w+)", out))
    assert sorted(digests) == ["0", "1"], out[-2000:]
    assert digests["0"] == digests["1"]  # bitwise the same head on both ranks
    assert "identical on all 2 ranks" in out

    # One process, the same global batch per step: rank r's batch is micro-batch r of the step.
    one = subprocess.run([sys.executable, "-m", "eaglebook.cli", "train", "--features", str(smol_store),
                          "--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2", *TRAIN_FLAGS],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]
    ddp, ref = load_draft(tmp_path / "ddp" / "draft"), load_draft(tmp_path / "one" / "draft")
    assert ddp.config.aux_layers == ref.config.aux_layers == [2, 15, 27]
    worst = 0.0
    for (name, a), (_, b) in zip(ddp.named_parameters(), ref.named_parameters()):
        if not a.requires_grad:
            continue
        # Tolerance: float32 sums run in another order (all-reduce vs accumulation, 1 vs 2 threads)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6, msg=name)
        worst = max(worst, (a - b).abs().max().item())
    print(f"largest |ddp - one process| weight difference: {worst:.2e}")
    # and training really moved the weights (the comparison is not between two untouched inits)
    from eaglebook.draft import build_draft
    from eaglebook.target import load_target_head
    from transformers import set_seed

    head, _ = load_target_head("smollm2-135m", dtype="float32", verbose=False)
    set_seed(0)
    init = build_draft(head, ref.d2t.clone(), ref.t2d.clone(), aux_layers=(2, 15, 27), dtype=torch.float32)
    moved = max((a - b).abs().max().item() for (n, a), (_, b) in zip(ref.named_parameters(), init.named_parameters())
                if a.requires_grad)
    assert moved > 1e-4
