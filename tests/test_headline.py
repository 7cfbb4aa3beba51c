"""The headline benchmark: real SmolLM2, real MT-bench prompts, an untrained head (its accept
length is low, its output must still equal greedy in float32), resumable rows."""
from __future__ import annotations

import hashlib
import json

import pytest

from eaglebook.bench.core import looped
from eaglebook.headline import HeadlineArgs, Setting, format_headline, run_headline, summarize_headline


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


def _row(pid, mode, tokens, finish="stop", loop=False, steps=None, cfg="", latency=None, category="writing"):
    """One bench request row as `eaglebook bench` writes it (float32)."""
    from eaglebook.bench import Generation

    g = Generation(prompt_id=pid, category=category, turn=0, mode=mode, prompt_tokens=5, completion_tokens=tokens,
                   latency_s=tokens / 10 if latency is None else latency, verify_ct=steps, finish_reason=finish,
                   config=cfg, looped=loop)
    if steps and mode == "eagle":
        g.identical = True
        g.timing = {"draft_ms": 1.0, "verify_ms": 2.0, "other_ms": 0.1, "tree_size": 3}
    return {**g.row(), "dtype": "float32"}


def test_summary_counts_loops_and_limits_and_cleans_per_lane():
    """bench's request rows in, the headline's figures out: limits and loops are counted for the
    baseline and for each lane, the clean columns leave out every prompt where either side ran to
    the limit or looped (here c: the baseline stopped cleanly, the lane's own output looped), the
    cost model weights by iterations."""
    rows = [_row("a", "baseline", 10), _row("a", "eagle", 10, steps=5, cfg="s2-k1-n3"),
            _row("b", "baseline", 20, "length", True), _row("b", "eagle", 20, "length", True, 5, "s2-k1-n3"),
            _row("c", "baseline", 16), _row("c", "eagle", 16, "stop", True, 4, "s2-k1-n3")]
    res = summarize_headline(rows)
    t = res["table"][0]
    assert t["setting"] == "chain s2-k1-n3"
    assert (t["baseline_limit_hits"], t["baseline_looped"], t["limit_hits"], t["looped"]) == (1, 1, 1, 2)
    assert t["clean_prompts"] == 1  # only a: b looped on both sides, c on the lane's side
    assert t["accept_length"] == pytest.approx(46 / 14, abs=1e-3)  # rounded to 3 places
    assert t["clean_accept_length"] == pytest.approx(10 / 5)
    assert (t["identical"], t["checked"], t["lossless_ok"]) == (3, 3, 3)
    c = res["cost_model"][0]
    assert (c["t_step_ms"], c["t_draft_ms"], c["t_verify_ms"]) == (100.0, 1.0, 2.0)
    assert c["predicted_speedup"] == pytest.approx((46 / 14) * 100 / 3.1, rel=1e-3)
    assert "1 / 1; 1 / 2" in format_headline(res)


def test_head_to_head_keeps_eagle_alone_apart_from_the_merged_drafter():
    """The merged drafter runs as mode "eagle" (setting `...+ng3`) but is not "EAGLE": on prompt a
    prompt lookup (20 tok/s) beats EAGLE alone (10) while the merged drafter (30) beats both. The
    per-prompt and per-category tables say exactly that, each side named."""
    rows = []
    for pid, cat in (("a", "writing"), ("b", "math")):
        fast = pid == "a"
        rows += [_row(pid, "baseline", 10, latency=1.0, category=cat),
                 _row(pid, "eagle", 10, steps=5, cfg="s2-k1-n3", latency=1.0 if fast else 0.2, category=cat),
                 _row(pid, "eagle", 10, steps=4, cfg="s2-k1-n3+ng3", latency=1 / 3, category=cat),
                 _row(pid, "prompt_lookup", 10, steps=6, cfg="pld4-m3", latency=0.5, category=cat)]
    res = summarize_headline(rows)
    assert {r["setting"] for r in res["table"]} == {"chain s2-k1-n3", "merged chain s2-k1-n3+ng3",
                                                    "prompt lookup 4 (match 3)"}
    h2h = {(h["a_label"], h["b_label"]): (h["a_wins"], h["prompts"]) for h in res["head_to_head"]}
    assert h2h == {("prompt lookup", "EAGLE"): (1, 2), ("merged drafter", "EAGLE"): (1, 2),
                   ("merged drafter", "prompt lookup"): (2, 2)}
    vs = {v["category"]: v for v in res["eagle_vs_prompt_lookup"]}
    assert vs["writing"]["eagle"] == "chain s2-k1-n3" and vs["writing"]["winner"] == "prompt lookup"
    assert vs["math"]["winner"] == "EAGLE"
    assert vs["writing"]["merged"] == "merged chain s2-k1-n3+ng3"
    assert (vs["writing"]["merged_vs_eagle"], vs["writing"]["merged_vs_prompt_lookup"]) == ("merged drafter",
                                                                                            "merged drafter")
    assert vs["math"]["merged_vs_eagle"] == "EAGLE"
    text = format_headline(res)
    assert "prompt lookup (best lane) faster than EAGLE (best lane) on 1 of 2" in text
    assert "merged drafter (best lane) faster than prompt lookup (best lane) on 2 of 2" in text


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
    c = res["config"]  # the report names the file it measured, not the default suite
    assert (c["suite"], c["prompts_file"], c["prompts_sha256"]) == ("jsonl", "unseen.jsonl",
                                                                    hashlib.sha256(f.read_bytes()).hexdigest())


def test_headline_peers_and_the_merged_drafter_in_the_same_run(tmp_path):
    """transformers' generate() and prompt lookup, and the merged drafter, ride along as lanes:
    float32 greedy outputs equal the baseline's (or differ only at a float tie), the prompt-lookup
    lanes report an accept length, and a per-category EAGLE vs prompt-lookup table is written."""
    args = HeadlineArgs(out=str(tmp_path), draft="smollm2-135m-eagle3", limit=2, max_new_tokens=10,
                        dtypes="float32", settings="3,2,5", threads=2, warmup=0, prompt_lookup="4", ngram=3)
    res = run_headline(args, progress=False)
    table = {r["setting"]: r for r in res["table"]}
    assert set(table) == {"tree s3-k2-n5", "merged tree s3-k2-n5+ng3", "transformers generate()",
                          "prompt lookup 4 (match 3)"}
    for r in table.values():
        assert r["prompts"] == 2 and r["checked"] == 2 and r["lossless_ok"] == 2
        assert r["speedup"] > 0
    assert table["prompt lookup 4 (match 3)"]["accept_length"] >= 1.0
    assert table["transformers generate()"]["accept_length"] is None
    assert {c["setting"] for c in res["cost_model"]} == {"tree s3-k2-n5", "merged tree s3-k2-n5+ng3"}
    vs = res["eagle_vs_prompt_lookup"]
    assert vs and all(v["winner"] in ("EAGLE", "prompt lookup") and v["eagle"] == "tree s3-k2-n5"
                      and v["merged"] == "merged tree s3-k2-n5+ng3" for v in vs)
    assert [(h["a"], h["b"]) for h in res["head_to_head"]] == [("prompt_lookup", "eagle"), ("merged", "eagle"),
                                                               ("merged", "prompt_lookup")]


def test_a_head_retrained_in_place_is_measured_again(smollm2, tmp_path, capsys):
    """The rows belong to the head's weights, not to its folder's name: a head retrained into the
    same folder (here: the shipped head's folder overwritten by another head) gets fresh rows,
    every one of them the new head's; `bench --resume` on that file refuses, naming why; and
    `--no_resume` measures every row again."""
    import asyncio
    import shutil

    import torch

    from eaglebook.bench import BenchError, DraftSetting, load_suite, make_inprocess_lanes, render_ids, run_benchmark
    from eaglebook.decode import load_head
    from eaglebook.draft import build_draft
    from eaglebook.export import SHIPPED_HEADS, head_provenance, save_draft

    model, tok = smollm2
    head = tmp_path / "head"
    shutil.copytree(SHIPPED_HEADS["smollm2-135m-eagle3"], head)
    args = HeadlineArgs(out=str(tmp_path / "out"), draft=str(head), limit=2, max_new_tokens=10, dtypes="float32",
                        settings="3,1,4", threads=2, warmup=0, peers=False)
    bench_file = tmp_path / "out" / "bench-float32.json"
    run_headline(args, progress=False)
    old = json.loads(bench_file.read_text())

    def retrain(seed):
        torch.manual_seed(seed)
        save_draft(build_draft(model), head, head_provenance(model, tok), target=model)

    retrain(1)
    capsys.readouterr()
    res = run_headline(args, progress=False)
    assert "measured something else (draft head weights" in capsys.readouterr().out
    new = json.loads(bench_file.read_text())
    assert new["config"]["draft_fingerprint"] != old["config"]["draft_fingerprint"]
    assert res["config"]["runs"]["float32"]["draft_fingerprint"] == new["config"]["draft_fingerprint"]
    assert len(new["requests"]) == 4  # 2 prompts x (baseline, chain): fresh, not added to the old ones
    # every EAGLE row is the new head's: its verification count is that of a decode with the new head
    (lane,) = [ln for ln in make_inprocess_lanes(model, tok, load_head(model, str(head)), [DraftSetting(3, 1, 4)])
               if ln.mode == "eagle"]
    prompts = {p.id: p for p in load_suite("mt-bench", 2)}
    eagle = [r for r in new["requests"] if r["mode"] == "eagle"]
    for r in eagle:
        out = asyncio.run(lane.client.generate(render_ids(tok, prompts[r["prompt_id"]].messages(0)), 10))
        assert r["verify_ct"] == out["verify_ct"], r["prompt_id"]
    assert [r["verify_ct"] for r in eagle] != [r["verify_ct"] for r in old["requests"] if r["mode"] == "eagle"]

    retrain(2)
    with pytest.raises(BenchError, match="cannot resume .* measured something else \\(draft head weights"):
        run_benchmark(args.bench_args("float32"), progress=False)  # bench --resume: refused, not restarted

    retrain(1)  # the head of the file again: a rerun resumes (nothing to measure)
    run_headline(args, progress=False)
    assert requests_of(bench_file) == new["requests"]
    args.no_resume = True
    run_headline(args, progress=False)
    again = requests_of(bench_file)
    assert len(again) == 4 and [r["latency_s"] for r in again] != [r["latency_s"] for r in new["requests"]]
