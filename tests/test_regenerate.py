"""Regeneration with the real SmolLM2: local batched generation, a real HTTP stand-in server
(SGLang-native ids and OpenAI text), multi-turn sequencing, and kill-and-resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import Dataset

from eaglebook import data
from eaglebook import regenerate as rg
from model_server import StandInServer

REPO = Path(__file__).resolve().parent.parent
PARIS = "What is the capital of France? Answer in one sentence."


def convs(*turn_lists):
    rows = []
    for i, turns in enumerate(turn_lists):
        msgs = []
        for q in turns:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": "(old answer)"}]
        rows.append({"id": f"c{i}", "source": "test", "messages": msgs})
    return Dataset.from_list(rows)


def trained_runs(row):
    runs, cur = [], []
    for t, m in zip(row["input_ids"], row["loss_mask"]):
        if m:
            cur.append(t)
        elif cur:
            runs, cur = runs + [cur], []
    return runs + ([cur] if cur else [])


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    tok = smollm2_tokenizer
    return [data.render_prompt(tok, [{"role": "user", "content": q}])
            for q in (PARIS, "Name three colours. Be brief.")]


def test_local_backend_greedy_batched_equals_single(smollm2, prompts):
    model, tok = smollm2
    one = rg.LocalBackend(model, tok, batch_size=1).generate(prompts, 12)
    batched = rg.LocalBackend(model, tok, batch_size=2).generate(prompts, 12)  # left padding
    assert [a.ids for a in one] == [a.ids for a in batched]
    assert one[0].finished and one[0].ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert "Paris" in tok.decode(one[0].ids)
    cut = rg.LocalBackend(model, tok).generate(prompts[:1], 3)[0]
    assert not cut.finished and len(cut.ids) == 3 and cut.ids == one[0].ids[:3]  # no invented end-of-turn


def test_local_backend_drops_finished_rows_yet_equals_generate(smollm2):
    """The backend drops a row from the batch once it ends; the answers must still be exactly
    what transformers' generate() gives the same left-padded batch (greedy, float32)."""
    import torch

    model, tok = smollm2
    qs = ["Hi", "Write a haiku about the sea.", "What is 2+2? Answer briefly.",
          "List three colors, one per line, and nothing else."]
    ps = [data.render_prompt(tok, [{"role": "user", "content": q}]) for q in qs]
    backend = rg.LocalBackend(model, tok, batch_size=4)
    mine = backend.generate(ps, 40)
    assert any(a.finished for a in mine) and len({len(a.ids) for a in mine}) > 1  # rows did leave early
    width = max(map(len, ps))
    ids = torch.full((4, width), backend.pad)
    att = torch.zeros((4, width), dtype=torch.long)
    for r, p in enumerate(sorted(ps, key=len)):  # the backend's batch order: by prompt length
        ids[r, width - len(p):], att[r, width - len(p):] = torch.tensor(p), 1
    ref = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=40, do_sample=False, top_p=None,
                         top_k=None, temperature=None, eos_token_id=backend.stops, pad_token_id=backend.pad)
    expect = {tuple(p): rg._cut(ref[r, width:].tolist(), set(backend.stops)).ids
              for r, p in enumerate(sorted(ps, key=len))}
    assert [a.ids for a in mine] == [expect[tuple(p)] for p in ps]


def test_server_backends_match_local_and_retry(smollm2, prompts):
    model, tok = smollm2
    local = [a.ids for a in rg.LocalBackend(model, tok, batch_size=1).generate(prompts, 12)]
    with StandInServer(model, tok, fail_first=2) as srv:
        be = rg.ServerBackend(srv.url, tok, api="sglang", concurrency=2, backoff=0.01)
        ans = be.generate(prompts, 12)
        assert [a.ids for a in ans] == local and not any(a.retokenized for a in ans)
        assert be.retried == 2 and srv.requests == len(prompts) + 2
    with StandInServer(model, tok, with_ids=False) as srv:  # text only: re-tokenized, counts checked
        for api in ("sglang", "openai"):
            ans = rg.ServerBackend(srv.url, tok, api=api, concurrency=2).generate(prompts, 12)
            assert all(a.retokenized for a in ans)
            assert [a.ids for a in ans] == local  # plain English round-trips exactly
            assert not any(a.count_mismatch for a in ans)


def test_server_down_is_a_clear_error(smollm2_tokenizer, prompts):
    be = rg.ServerBackend("http://127.0.0.1:9", smollm2_tokenizer, retries=1, backoff=0.01)
    with pytest.raises(rg.RegenerationError, match="failed 2 times"):
        be.generate(prompts[:1], 4)


def test_every_turn_regenerated_in_sequence(smollm2, tmp_path):
    model, tok = smollm2
    ds = convs([PARIS, "And of Italy? One sentence."])
    out, summary = rg.regenerate(ds, rg.LocalBackend(model, tok), tok, tmp_path,
                                 rg.RegenSettings(mode="all", max_new_tokens=24, holdout=0.0), progress=False)
    row = out["train"][0]
    assert row["num_answers"] == 2 and row["finished"]
    a1, a2 = trained_runs(row)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert a1[-1] == a2[-1] == eot and "Paris" in tok.decode(a1) and "(old answer)" not in tok.decode(row["input_ids"])
    # The second answer was generated from a prompt holding the model's own first answer.
    p2 = data.render_prompt(tok, [{"role": "user", "content": PARIS}, {"role": "assistant", "content": ""},
                                  {"role": "user", "content": "And of Italy? One sentence."}], answer_ids={1: a1})
    assert row["input_ids"][:len(p2)] == p2 and row["input_ids"][len(p2):len(p2) + len(a2)] == a2
    assert tok.decode(row["input_ids"][len(p2) + len(a2):]) == "\n"  # template scaffolding, not trained
    assert summary["template_hash"] and summary["settings"]["mode"] == "all"
    assert summary["trained_tokens"] == len(a1) + len(a2)


def test_last_turn_mode_trains_only_the_new_answer_and_checks_resume_settings(smollm2, tmp_path):
    model, tok = smollm2
    ds = convs([PARIS, "And of Italy?"], ["Say hi."])
    s = rg.RegenSettings(max_new_tokens=6, holdout=0.0)
    out, summary = rg.regenerate(ds, rg.LocalBackend(model, tok), tok, tmp_path, s, progress=False)
    rows = out["train"]
    assert len(rows) == 2 and summary["skipped"] == {}
    for row in rows:
        (run,) = trained_runs(row)  # the old first answer is history, not trained
        tail = 1 if row["finished"] else 0  # the newline after <|im_end|>; none after a cut-off answer
        assert row["input_ids"][len(row["input_ids"]) - tail - len(run):][:len(run)] == run and len(run) <= 6
        assert row["finished"] == (run[-1] == tok.convert_tokens_to_ids("<|im_end|>"))
    # Rerunning resumes (nothing left to do); other settings in the same folder are refused.
    _, again = rg.regenerate(ds, rg.LocalBackend(model, tok), tok, tmp_path, s, progress=False)
    assert again["resumed_rows"] == 2 and again["this_run_generated_tokens"] == 0
    with pytest.raises(rg.RegenerationError, match="max_new_tokens"):
        rg.regenerate(ds, rg.LocalBackend(model, tok), tok, tmp_path, rg.RegenSettings(max_new_tokens=7), progress=False)
    ds2, meta = rg.load_regenerated(tmp_path, expect={"template_hash": summary["template_hash"]})
    assert len(ds2["train"]) == 2
    with pytest.raises(rg.RegenerationError, match="template_hash"):
        rg.load_regenerated(tmp_path, expect={"template_hash": "other"})


def test_killed_run_resumes_with_every_row_exactly_once(tmp_path, smollm2_tokenizer):
    out = tmp_path / "regen"
    cmd = [sys.executable, "-m", "eaglebook.cli", "regenerate", "--out", str(out), "--limit", "10",
           "--max_new_tokens", "6", "--max_length", "300", "--batch_size", "1", "--chunk_rows", "1",
           "--dtype", "float32", "--holdout", "0.2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "EAGLEBOOK_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = out / "chunks"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(chunks.glob("chunk-*.jsonl"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(chunks.glob("chunk-*.jsonl")))
    settings = json.loads((out / "settings.json").read_text())
    total = settings["num_rows"]
    assert 2 <= done_before < total, "the run was not interrupted halfway"
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"Resuming: {done_before} of {total}" in res.stdout
    meta = json.loads((out / rg.DATASET_META).read_text())
    assert meta["rows"] == total and meta["resumed_rows"] == done_before
    ds, _ = rg.load_regenerated(out)
    ids = list(ds["train"]["id"]) + list(ds["holdout"]["id"])
    assert len(ids) == len(set(ids)) == meta["kept"] == total - sum(meta["skipped"].values())
    conv, _ = rg.prepare_conversations("sharegpt", 10)
    by_id = {r["id"]: r["messages"] for r in conv}
    tok = smollm2_tokenizer
    for row in ds["train"]:
        msgs = by_id[row["id"]]
        prompt = data.render_prompt(tok, msgs[:max(i for i, m in enumerate(msgs) if m["role"] == "assistant")])
        n = row["answer_tokens"]
        assert row["input_ids"][:len(prompt)] == prompt and 0 < n <= 6
        rest = len(row["input_ids"]) - len(prompt) - n
        assert row["loss_mask"] == [0] * len(prompt) + [1] * n + [0] * rest
        assert rest == (1 if row["finished"] else 0)  # a cut-off answer gets no end-of-turn, no newline
