"""Every command meets bad input with one line naming the problem, a non-zero exit and no traceback.

Each test runs the real command in its own process (`python -m eaglebook.cli ...`), the way a
user types it, and feeds it one broken or missing input.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EAGLEBOOK_THREADS": "1"}
    env.pop("EAGLEBOOK_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "eaglebook.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_clean_failure(proc: subprocess.CompletedProcess, command: str, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout[-1000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"eaglebook {command}: "), proc.stderr[-1000:]
    for n in needles:
        assert n in last, last


@pytest.fixture
def broken_jsonl(tmp_path) -> Path:
    """Prompts whose line 3 is not JSON (line 2 is blank, line 1 is fine)."""
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"prompt": "Name a colour."}) + "\n\n" + '{"prompt": "unterminated\n')
    return p


def test_read_jsonl_names_the_line(broken_jsonl, tmp_path):
    from eaglebook.cli import UserError, read_jsonl

    with pytest.raises(UserError, match=rf"{broken_jsonl}:3: not valid JSON \("):
        read_jsonl(broken_jsonl)
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "list.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"list.jsonl:2: expected a JSON object, got list"):
        read_jsonl(tmp_path / "list.jsonl")
    (tmp_path / "ok.jsonl").write_text('{"a": 1}\n\n{"b": 2}\n')
    assert read_jsonl(tmp_path / "ok.jsonl") == [(1, {"a": 1}), (3, {"b": 2})]


def test_generate_broken_line(broken_jsonl, tmp_path):
    proc = run_cli("generate", "--prompts", str(broken_jsonl), "--output", str(tmp_path / "out.jsonl"))
    assert_clean_failure(proc, "generate", f"{broken_jsonl}:3: not valid JSON")
    assert not (tmp_path / "out.jsonl").exists()


def test_generate_record_without_prompt(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"question": "hi"}) + "\n")
    proc = run_cli("generate", "--prompts", str(p), "--output", str(tmp_path / "out.jsonl"))
    assert_clean_failure(proc, "generate", f"{p}:2: needs 'messages', 'prompt' or 'input_ids'")


def test_bench_broken_line(broken_jsonl):
    proc = run_cli("bench", "--suite", "jsonl", "--prompts", str(broken_jsonl))
    assert_clean_failure(proc, "bench", f"{broken_jsonl}:3: not valid JSON")


def test_headline_broken_line(broken_jsonl, tmp_path):
    proc = run_cli("headline", "--prompts", str(broken_jsonl), "--out", str(tmp_path / "headline"))
    assert_clean_failure(proc, "headline", f"{broken_jsonl}:3: not valid JSON")


def test_train_missing_features(tmp_path):
    proc = run_cli("train", "--features", str(tmp_path / "no-features"), "--output_dir", str(tmp_path / "t"))
    assert_clean_failure(proc, "train", "no index.json in", str(tmp_path / "no-features"))


def test_train_without_features():
    proc = run_cli("train")
    assert_clean_failure(proc, "train", "--features is required")


def test_capture_missing_data(tmp_path):
    proc = run_cli("capture", "--data", str(tmp_path / "missing.jsonl"), "--out_dir", str(tmp_path / "f"))
    assert_clean_failure(proc, "capture", f"{tmp_path / 'missing.jsonl'} does not exist")


def test_regenerate_missing_data(tmp_path):
    proc = run_cli("regenerate", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "missing.jsonl"))
    assert_clean_failure(proc, "regenerate", str(tmp_path / "missing.jsonl"))


def test_default_head_missing_data(tmp_path):
    proc = run_cli("default-head", "--work_dir", str(tmp_path / "d"), "--data", str(tmp_path / "missing.jsonl"))
    assert_clean_failure(proc, "default-head", str(tmp_path / "missing.jsonl"))


def test_generate_help_says_what_an_empty_draft_loads(tmp_path):
    proc = run_cli("generate", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "empty = the shipped default head (smollm2-135m-eagle3)" in text
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    proc = run_cli("generate", "--prompts", str(p), "--output", str(tmp_path / "out.jsonl"), "--max_new_tokens", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "draft: shipped default head 'smollm2-135m-eagle3'" in proc.stdout
