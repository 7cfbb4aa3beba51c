"""The headline benchmark: real SmolLM2, real MT-bench prompts, an untrained head (its accept
length is low, its output must still equal greedy in float32), resumable rows."""
from __future__ import annotations

import json

import pytest

from eaglebook.bench.core import looped
from eaglebook.headline import HeadlineArgs, Setting, run_headline, summarize_headline


def requests_of(path):
    """The request rows of one bench run the headline made."""
    return json.loads(path.read_text())["requests"]


def test_looped_finds_repeats_only():
    assert looped(list(range(10)) * 3)
    assert not looped(list(range(60)))
    assert not looped(list(range(10)) * 2)  # twice is not a loop at the default threshold


def test_setting_parse_and_errors():
    assert Setting.parse("5,1,99").num_draft_tokens == 6  # a chain verifies its steps + the root
    assert Setting.parse("6,4,24").label == "tree s6-k4-n24"
    with pytest.raises(ValueError, match="num_steps,topk,num_draft_tokens"):
        Setting.parse("5,1")


def test_headline_float32_lossless_and_resumes(tmp_path, capsys):
    args = HeadlineArgs(out=str(tmp_path), draft="", limit=2, max_new_tokens=12, dtypes="float32",
                        settings="3,1,4 3,2,6", threads=2, warmup=0, peers=False)
    res = run_headline(args, progress=False)
    rows = requests_of(tmp_path / "bench-float32.json")
    assert len(rows) == 2 * 3  # 2 prompts x (baseline + 2 settings)
    table = {r["setting"]: r for r in res["table"]}
    assert set(table) == {"chain s3-k1-n4", "tree s3-k2-n6"}
    for r in table.values():
        assert r["prompts"] == 2 and r["checked"] == 2
        assert r["lossless_ok"] == 2  # float32: identical, or a tie below 1e-4 (docs/stages.md § 6)
        assert r["accept_length"] >= 1.0
        assert r["baseline_limit_hits"] == 2  # 12 tokens never finish an MT-bench answer
    cost = {c["setting"]: c for c in res["cost_model"]}
    assert all(c["t_verify_ms"] > 0 and c["t_draft_ms"] > 0 and c["t_step_ms"] > 0 for c in cost.values())
    assert (tmp_path / "headline.png").stat().st_size > 0
    # a rerun finds every row done: nothing is generated again, the tables are the same
    again = run_headline(args, progress=False)
    assert requests_of(tmp_path / "bench-float32.json") == rows
    assert again["table"] == res["table"]
    assert "Cost model" in capsys.readouterr().out


def test_summary_counts_loops_and_limits_from_the_baseline():
    """bench's request rows in, the headline's figures out: limits and loops come from the
    baseline, the clean columns leave those prompts out, the cost model weights by iterations."""
    from eaglebook.bench import Generation

    def row(pid, mode, tokens, finish, loop, steps=None, cfg=""):
        g = Generation(prompt_id=pid, category="writing", turn=0, mode=mode, prompt_tokens=5,
                       completion_tokens=tokens, latency_s=tokens / 10, verify_ct=steps, finish_reason=finish,
                       config=cfg, looped=loop)
        if steps:
            g.identical = True
            g.timing = {"draft_ms": 1.0, "verify_ms": 2.0, "other_ms": 0.1, "tree_size": 3}
        return {**g.row(), "dtype": "float32"}

    rows = [row("a", "baseline", 10, "stop", False), row("a", "eagle", 10, "stop", False, 5, "s2-k1-n3"),
            row("b", "baseline", 20, "length", True), row("b", "eagle", 20, "length", True, 5, "s2-k1-n3")]
    res = summarize_headline(rows)
    t = res["table"][0]
    assert t["setting"] == "chain s2-k1-n3"
    assert (t["baseline_limit_hits"], t["baseline_looped"], t["clean_prompts"]) == (1, 1, 1)
    assert t["accept_length"] == pytest.approx(30 / 10)
    assert t["clean_accept_length"] == pytest.approx(10 / 5)
    assert (t["identical"], t["checked"], t["lossless_ok"]) == (2, 2, 2)
    c = res["cost_model"][0]
    assert (c["t_step_ms"], c["t_draft_ms"], c["t_verify_ms"]) == (100.0, 1.0, 2.0)
    assert c["predicted_speedup"] == pytest.approx(3.0 * 100 / 3.1, rel=1e-3)


def test_headline_reads_a_prompts_file(tmp_path):
    f = tmp_path / "unseen.jsonl"
    f.write_text(json.dumps({"id": "u1", "category": "sharegpt-unseen",
                             "messages": [{"role": "user", "content": "Name three rivers in Europe."}]}) + "\n")
    args = HeadlineArgs(out=str(tmp_path / "out"), draft="", prompts=str(f), max_new_tokens=6, dtypes="float32",
                        settings="2,1,3", threads=2, warmup=0, peers=False)
    res = run_headline(args, progress=False)
    rows = requests_of(tmp_path / "out" / "bench-float32.json")
    assert {(r["prompt_id"], r["category"]) for r in rows} == {("u1", "sharegpt-unseen")}
    assert [c["category"] for c in res["per_category"]] == ["sharegpt-unseen"]


def test_headline_peers_and_the_merged_drafter_in_the_same_run(tmp_path):
    """transformers' generate() and prompt lookup, and the merged drafter, ride along as lanes:
    float32 greedy outputs equal the baseline's (or differ only at a float tie), the prompt-lookup
    lanes report an accept length, and a per-category EAGLE vs prompt-lookup table is written."""
    args = HeadlineArgs(out=str(tmp_path), draft="smollm2-135m-eagle3", limit=2, max_new_tokens=10,
                        dtypes="float32", settings="3,2,5", threads=2, warmup=0, prompt_lookup="4", ngram=3)
    res = run_headline(args, progress=False)
    table = {r["setting"]: r for r in res["table"]}
    assert set(table) == {"tree s3-k2-n5", "tree s3-k2-n5+ng3", "transformers generate()", "prompt lookup 4"}
    for r in table.values():
        assert r["prompts"] == 2 and r["checked"] == 2 and r["lossless_ok"] == 2
        assert r["speedup"] > 0
    assert table["prompt lookup 4"]["accept_length"] >= 1.0
    assert table["transformers generate()"]["accept_length"] is None
    assert {c["setting"] for c in res["cost_model"]} == {"tree s3-k2-n5", "tree s3-k2-n5+ng3"}
    vs = res["eagle_vs_prompt_lookup"]
    assert vs and all(v["winner"] in ("EAGLE", "prompt lookup") for v in vs)
