"""Notebook 06's benchmark machinery, tested on the CPU as far as it goes without a GPU.

Servers here are real processes (tests/standin_server.py) on 127.0.0.1 answering with
SGLang's and vLLM's response shapes; nothing else is contacted. What needs a GPU (a real
SGLang launch, real accept lengths) is not tested here.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest

from eaglebook import bench
from eaglebook.bench import (BenchArgs, BenchError, DraftSetting, Lane, Recorder, ServerError, ServerProcess,
                             SGLangClient, SGLangConfig)

STANDIN = str(Path(__file__).with_name("standin_server.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def standin(port: int, *flags: str, pid_file: str = "", name: str = "stand-in", timeout: float = 30.0):
    cmd = [sys.executable, STANDIN, "--port", str(port), *flags] + (["--pid-file", pid_file] if pid_file else [])
    return ServerProcess(cmd, f"http://127.0.0.1:{port}/health", name=name, startup_timeout=timeout, grace=2.0)


def wait_for_file(path: Path, timeout: float = 20.0) -> None:
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def survivors(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


# ---------------------------------------------------------------------------------------
# The SGLang command line
# ---------------------------------------------------------------------------------------

def test_sglang_command_lines_differ_only_in_speculative_flags():
    cfg = SGLangConfig(model_path="meta-llama/Llama-3.1-8B-Instruct", draft_path="/heads/llama-eagle3", port=30123,
                       dtype="bfloat16", context_length=4096, mem_fraction_static=0.7, cuda_graph_max_bs=8,
                       extra_args=["--disable-overlap-schedule"], python="python3")
    base = bench.sglang_command(cfg, "baseline")
    eagle = bench.sglang_command(cfg, "eagle", DraftSetting(3, 4, 16))
    assert base == ["python3", "-m", "sglang.launch_server", "--model-path", "meta-llama/Llama-3.1-8B-Instruct",
                    "--host", "127.0.0.1", "--port", "30123", "--tp-size", "1", "--dtype", "bfloat16",
                    "--context-length", "4096", "--mem-fraction-static", "0.7", "--cuda-graph-max-bs-decode", "8",
                    "--disable-overlap-schedule"]
    assert eagle[:len(base)] == base
    assert eagle[len(base):] == ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path",
                                 "/heads/llama-eagle3", "--speculative-num-steps", "3", "--speculative-eagle-topk",
                                 "4", "--speculative-num-draft-tokens", "16"]
    # The context-length override goes to both servers alike (the environment, not a flag).
    assert bench.sglang_env(cfg) == {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}


def test_draft_setting_follows_sglang_rules():
    assert DraftSetting(4, 1, 99).num_draft_tokens == 5  # a chain verifies num_steps + root
    with pytest.raises(BenchError, match="exceeds"):
        DraftSetting(1, 2, 8)  # root + 2 candidates at most
    with pytest.raises(BenchError, match="needs draft_path"):
        bench.sglang_command(SGLangConfig(model_path="m"), "eagle")
    assert bench.parse_label(DraftSetting(5, 4, 8).label) == {"num_steps": 5, "topk": 4, "num_draft_tokens": 8}


# ---------------------------------------------------------------------------------------
# Process groups: health-wait timeout, Ctrl-C, no orphans
# ---------------------------------------------------------------------------------------

def test_health_timeout_stops_the_whole_tree(tmp_path):
    pid_file = tmp_path / "pids.json"
    srv = standin(free_port(), "--spawn-children", "--health-after", "-1", pid_file=str(pid_file), timeout=4.0)
    srv.log_path = tmp_path / "server.log"
    srv.start()
    wait_for_file(pid_file)
    pids = json.loads(pid_file.read_text())
    assert len(survivors(pids)) == 4  # server, child, stubborn child, grandchild all up
    t0 = time.time()
    with pytest.raises(ServerError, match="did not become healthy"):
        srv.wait_healthy()
    print(f"health wait gave up and cleaned up in {time.time() - t0:.1f} s")
    assert survivors(pids) == [], "processes survived the stop"


def test_ctrl_c_inside_the_context_leaves_no_orphans(tmp_path):
    pid_file = tmp_path / "pids.json"
    port = free_port()
    with pytest.raises(KeyboardInterrupt):
        with standin(port, "--spawn-children", "--ignore-term", pid_file=str(pid_file)) as srv:
            srv.wait_healthy()
            wait_for_file(pid_file)
            pids = json.loads(pid_file.read_text())
            assert len(survivors(pids)) == 4
            raise KeyboardInterrupt
    assert survivors(pids) == []


def test_server_that_exits_during_startup_is_reported(tmp_path):
    srv = ServerProcess([sys.executable, "-c", "import sys; print('CUDA out of memory'); sys.exit(7)"],
                        f"http://127.0.0.1:{free_port()}/health", name="SGLang eagle server",
                        log_path=tmp_path / "s.log", startup_timeout=20)
    srv.start()
    with pytest.raises(ServerError, match=r"(?s)exited with code 7.*CUDA out of memory"):
        srv.wait_healthy()


# ---------------------------------------------------------------------------------------
# Parsing real response shapes
# ---------------------------------------------------------------------------------------

# A /generate answer as SGLang 0.5.x returns it on an EAGLE-3 server (tokenizer_manager meta_info).
SGLANG_GENERATE = {
    "text": " Paris is the capital of France.",
    "output_ids": [7042, 314, 260, 3575, 282, 4649, 30, 2],
    "meta_info": {"id": "a1b2", "finish_reason": {"type": "stop", "matched": 2}, "prompt_tokens": 31,
                  "weight_version": "default", "total_retractions": 0, "completion_tokens": 8,
                  "cached_tokens": 0, "spec_accept_rate": 0.25, "spec_accept_length": 2.6666666666666665,
                  "spec_num_correct_drafts": 5, "spec_num_proposed_drafts": 21, "spec_verify_ct": 3,
                  "spec_accepted_drafts": 5, "spec_proposed_drafts": 21, "e2e_latency": 0.0412},
}


def test_parse_generate_meta_info():
    out = bench.parse_generate_response(SGLANG_GENERATE)
    assert (out["prompt_tokens"], out["completion_tokens"], out["verify_ct"]) == (31, 8, 3)
    assert out["finish_reason"] == "stop"
    assert out["completion_tokens"] / out["verify_ct"] == pytest.approx(SGLANG_GENERATE["meta_info"]["spec_accept_length"])
    plain = {"text": "x", "meta_info": {"finish_reason": {"type": "length", "length": 8}, "prompt_tokens": 3,
                                        "completion_tokens": 8, "cached_tokens": 0, "e2e_latency": 0.1}}
    assert bench.parse_generate_response(plain)["verify_ct"] is None
    with pytest.raises(BenchError, match="aborted"):
        bench.parse_generate_response({"text": "", "meta_info": {"finish_reason": {"type": "abort", "message": "oom"},
                                                                 "completion_tokens": 0}})
    with pytest.raises(BenchError, match="no meta_info"):
        bench.parse_generate_response({"error": "bad"})


def test_parse_server_info_and_vllm_metrics():
    info = bench.parse_server_info({"model_path": "m", "speculative_algorithm": "EAGLE3", "speculative_num_steps": 5,
                                    "speculative_eagle_topk": 4, "speculative_num_draft_tokens": 8, "tp_size": 1,
                                    "max_total_num_tokens": 123, "chunked_prefill_size": 8192, "unrelated": 1,
                                    "internal_states": [{"avg_spec_accept_length": 3.0}, {"avg_spec_accept_length": 4.0}],
                                    "version": "0.5.23"})
    assert info["speculative_num_draft_tokens"] == 8 and info["version"] == "0.5.23" and "unrelated" not in info
    assert info["avg_spec_accept_length"] == 3.5
    text = ("# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.\n"
            "# TYPE vllm:spec_decode_num_drafts_total counter\n"
            'vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 40.0\n'
            'vllm:spec_decode_num_drafts_total{engine="1",model_name="m"} 60.0\n'
            'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 150.0\n'
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 80.0\n'
            "vllm:num_requests_running 2\n")
    m = bench.parse_prometheus(text)
    assert m["vllm:spec_decode_num_drafts"] == 100.0 and m["vllm:num_requests_running"] == 2.0
    assert bench.vllm_accept_length({}, m) == pytest.approx(2.5)
    assert bench.vllm_accept_length({}, {"vllm:num_requests_running": 1.0}) is None


# ---------------------------------------------------------------------------------------
# Clients against real stand-in servers; a server dying or hanging mid-run
# ---------------------------------------------------------------------------------------

def prompts(n=4):
    return [bench.Prompt(id=f"p{i}", category=["math", "writing"][i % 2], turns=[f"Question {i}?" * (i + 1),
                                                                                "And why?"]) for i in range(n)]


def test_sglang_clients_interleaved_and_concurrent(smollm2_tokenizer, tmp_path):
    pb, pe = free_port(), free_port()
    with standin(pb) as b, standin(pe, "--speculative", "--accept", "2.5", "--token-delay", "0.002") as e:
        b.wait_healthy()
        e.wait_healthy()
        rec = Recorder({"test": True}, tmp_path / "r.json")

        async def go():
            async with SGLangClient(f"http://127.0.0.1:{pb}", server=b) as cb, \
                    SGLangClient(f"http://127.0.0.1:{pe}", stream=True, server=e) as ce:
                rec.server_info["eagle"] = await ce.server_info()
                lanes = [Lane("baseline", cb), Lane("eagle", ce, "s5-k4-n8")]
                await bench.warm_up(lanes, prompts(), smollm2_tokenizer, 1)
                await bench.run_interleaved(lanes, prompts(), smollm2_tokenizer, rec, 64, turns=2, progress=False)
                for lane in lanes:
                    await bench.run_phase(lane, prompts(), smollm2_tokenizer, rec, 64, 1, 3, progress=False)
        asyncio.run(go())
    res = rec.save()
    eg = [g for g in rec.gens if g.mode == "eagle" and g.concurrency == 1]
    assert len(eg) == 8 and {g.turn for g in eg} == {0, 1}  # two turns each
    # accept_length = sum(completion_tokens) / sum(spec_verify_ct), as the server reported them
    assert res["summary"]["eagle"]["accept_length"] == pytest.approx(
        sum(g.completion_tokens for g in eg) / sum(g.verify_ct for g in eg), abs=1e-4)
    assert all(g.ttft_s is not None and 0 < g.ttft_s <= g.latency_s for g in eg)  # streamed
    assert res["summary"]["baseline"]["accept_length"] is None  # no speculation, no accept length
    assert res["server_info"]["eagle"]["speculative_algorithm"] == "EAGLE3"
    assert {r["concurrency"] for r in res["concurrency"]} == {1, 3}
    assert {c["category"] for c in res["summary"]["per_category"]} == {"math", "writing"}
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["complete"] and len(saved["requests"]) == len(rec.gens)
    assert (tmp_path / "r.csv").read_text().count("\n") == len(rec.gens) + 1
    print(f"stand-in speedup {res['summary']['speedup']}, accept_length {res['summary']['eagle']['accept_length']}")


def test_sglang_server_dying_mid_run_is_named_and_partial_results_kept(smollm2_tokenizer, tmp_path):
    port = free_port()
    rec = Recorder({"test": True}, tmp_path / "partial.json")
    with standin(port, "--speculative", "--die-after", "3", name="SGLang eagle server") as srv:
        srv.log_path = None
        srv.wait_healthy()

        async def go():
            async with SGLangClient(f"http://127.0.0.1:{port}", name=srv.name, server=srv) as c:
                await bench.run_phase(Lane("eagle", c, "x"), prompts(6), smollm2_tokenizer, rec, 32, progress=False)
        with pytest.raises(ServerError, match=r"SGLang eagle server died \(exit code 3\) at prompt p3"):
            asyncio.run(go())
    rec.error = "died"
    rec.save()
    saved = json.loads((tmp_path / "partial.json").read_text())
    assert saved["complete"] is False and len(saved["requests"]) == 3


def test_request_timeout_is_a_clear_error(smollm2_tokenizer):
    port = free_port()
    with standin(port, "--delay", "3") as srv:
        srv.wait_healthy()

        async def go():
            async with SGLangClient(f"http://127.0.0.1:{port}", name="slow server", timeout=0.5, server=srv) as c:
                await bench.run_phase(Lane("baseline", c), prompts(1), smollm2_tokenizer, Recorder({}), 8,
                                      progress=False)
        with pytest.raises(ServerError, match=r"slow server did not answer within 0.5 s at prompt p0"):
            asyncio.run(go())


def test_openai_backend_end_to_end_with_vllm_metrics_and_a_crash(tmp_path):
    pb, pe = free_port(), free_port()
    with standin(pb) as b, standin(pe, "--speculative", "--accept", "3", "--vllm-metrics") as e:
        b.wait_healthy()
        e.wait_healthy()
        args = BenchArgs(backend="openai", url=f"http://127.0.0.1:{pe}/v1", baseline_url=f"http://127.0.0.1:{pb}",
                         suite="mt-bench", limit=4, max_new_tokens=40, warmup=1, json=str(tmp_path / "o.json"))
        res = bench.run_benchmark(args, progress=False)
    eg = [r for r in res["requests"] if r["mode"] == "eagle"]
    assert len(eg) == 4 and all(r["ttft_ms"] is not None for r in eg)
    # verify steps read from the /metrics deltas around each request: tokens / drafts
    assert all(r["accept_length"] == pytest.approx(r["completion_tokens"] / round(r["completion_tokens"] / 3), abs=1e-3)
               for r in eg)
    assert res["summary"]["speedup"] is not None and res["complete"]
    print(bench.format_summary(res))

    port = free_port()
    with standin(port, "--die-after", "3") as srv:
        srv.wait_healthy()
        args = BenchArgs(backend="openai", url=f"http://127.0.0.1:{port}", suite="mt-bench", limit=5, warmup=1,
                         max_new_tokens=16, json=str(tmp_path / "crash.json"))
        with pytest.raises(BenchError, match=r"(?s)lost the connection.*Partial results \(2 requests finished\)"):
            bench.run_benchmark(args, progress=False)
    saved = json.loads((tmp_path / "crash.json").read_text())
    assert saved["complete"] is False and "lost the connection" in saved["error"] and len(saved["requests"]) == 2
    assert "accept_length" in saved["summary"]["eagle"]  # the summary of what did finish


def test_prompt_suites_and_files(tmp_path, smollm2_tokenizer):
    mt = bench.load_suite("mt-bench", limit=8)
    assert len({p.category for p in mt}) == 8 and all(len(p.turns) == 2 for p in mt)
    he = bench.load_suite("humaneval", limit=2)
    assert he[0].category == "coding" and "def " in he[0].turns[0]
    f = tmp_path / "mine.jsonl"
    f.write_text('{"prompt": "Hi there"}\n{"messages": [{"role": "user", "content": "A"}, '
                 '{"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}], "category": "chat"}\n')
    mine = bench.load_suite("jsonl", prompts_file=str(f))
    assert [p.turns for p in mine] == [["Hi there"], ["A", "C"]] and mine[1].category == "chat"
    f.write_text('{"nope": 1}\n')
    with pytest.raises(BenchError, match="mine.jsonl:1: needs"):
        bench.load_suite("jsonl", prompts_file=str(f))
    with pytest.raises(BenchError, match="hold-out split was not found"):
        bench.load_suite("sharegpt", run_dir=str(tmp_path))
    ids = bench.render_ids(smollm2_tokenizer, mt[0].messages(0))
    assert smollm2_tokenizer.decode(ids).rstrip().endswith("assistant")


# ---------------------------------------------------------------------------------------
# The in-process backend (needs eaglebook.decode, the in-process engine)
# ---------------------------------------------------------------------------------------

needs_decode = pytest.mark.skipif(__import__("importlib").util.find_spec("eaglebook.decode") is None,
                                  reason="eaglebook.decode is not in this checkout yet")


@needs_decode
def test_inprocess_sweep_and_concurrency_on_a_tiny_llama(tiny_llama, smollm2_tokenizer, tmp_path):
    args = BenchArgs(backend="inprocess", suite="mt-bench", limit=2, max_new_tokens=6, warmup=1,
                     sweep="2,1,3 2,2,4", concurrency="1,2", json=str(tmp_path / "b.json"))
    res = bench.run_benchmark(args, target=(tiny_llama, smollm2_tokenizer), progress=False)
    assert res["complete"] and [s["config"] for s in res["settings"]] == ["s2-k1-n3", "s2-k2-n4"]
    assert res["summary"]["config"] == "s2-k1-n3"  # the first setting is the main one
    rows = res["requests"]
    for cfg in ("s2-k1-n3", "s2-k2-n4"):
        e = [r for r in rows if r["mode"] == "eagle" and r["config"] == cfg and r["concurrency"] == 1]
        b = {(r["prompt_id"], r["turn"]): r for r in rows if r["mode"] == "baseline" and r["concurrency"] == 1}
        assert len(e) == 2 and all(r["verify_ct"] >= 1 for r in e)
        # float32 greedy: EAGLE's output is the baseline's, token for token (text as the proxy)
        assert all(r["text"] == b[(r["prompt_id"], r["turn"])]["text"] for r in e)
        assert all(1.0 <= r["accept_length"] <= 3 for r in e)  # at most num_steps + bonus per step
    assert {(r["concurrency"], r["mode"]) for r in res["concurrency"]} == {(1, "baseline"), (1, "eagle"),
                                                                           (2, "baseline"), (2, "eagle")}
    print(bench.format_summary(res))


@needs_decode
def test_eaglebook_bench_command_on_the_cpu_default(tmp_path, capsys):
    from eaglebook.cli import main

    out = tmp_path / "out.json"
    t0 = time.time()
    assert main(["bench", "--suite", "mt-bench", "--limit", "1", "--max-new-tokens", "4", "--warmup", "0",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    s = res["summary"]
    assert s["baseline"]["tok_s"] > 0 and s["eagle"]["tok_s"] > 0 and s["speedup"] > 0
    assert s["eagle"]["accept_length"] >= 1.0
    assert "speedup" in printed and "accept_length" in printed and out.with_suffix(".csv").is_file()
    assert res["hardware"]["cpu_count"] and res["config"]["backend"] == "inprocess"
    print(f"eaglebook bench (1 prompt, 4 tokens) took {time.time() - t0:.0f} s")


@needs_decode
def test_inprocess_peers_merged_drafter_and_a_temperature_sweep(smollm2, tmp_path):
    """transformers' generate() and prompt lookup run as lanes of the same interleaved run, the
    merged drafter too; greedy lanes are checked token for token against the one baseline
    (float32: identical or a float tie); a temperature sweep reports every lane per temperature."""
    args = BenchArgs(backend="inprocess", suite="mt-bench", limit=2, max_new_tokens=8, warmup=1,
                     sweep="3,2,5", prompt_lookup="3", ngram=3, temperatures="0 0.8", seed=1,
                     draft="smollm2-135m-eagle3", json=str(tmp_path / "b.json"))
    res = bench.run_benchmark(args, target=smollm2, progress=False)
    lanes = {r["lane"]: r for r in res["lanes"]}
    assert list(lanes) == ["baseline", "eagle s3-k2-n5", "eagle s3-k2-n5+ng3", "generate", "prompt_lookup pld3-m3"]
    for name, r in lanes.items():
        assert r["requests"] == 2 and r["speedup"] > 0 and r["temperature"] == 0.0
        assert {c["category"] for c in r["per_category"]} == {"writing", "roleplay"}  # round-robin order
        if name != "baseline":
            assert r["checked"] == 2 and r["lossless_ok"] == 2, r
    assert lanes["generate"]["accept_length"] is None and lanes["prompt_lookup pld3-m3"]["accept_length"] >= 1.0
    assert res["head_to_head"]["prompts"] == 2 and res["head_to_head"]["b_label"] == "EAGLE"
    assert [(h["a_label"], h["b_label"]) for h in res["head_to_heads"]] == [
        ("prompt lookup", "EAGLE"), ("merged drafter", "EAGLE"), ("merged drafter", "prompt lookup")]
    temps = {(r["temperature"], r["lane"]) for r in res["temperatures"]}
    assert temps == {(t, lane) for t in (0.0, 0.8) for lane in lanes}
    sampled = [r for r in res["requests"] if r["temperature"] == 0.8]
    assert len(sampled) == 2 * len(lanes) and all(r["identical"] is None for r in sampled)  # no identity when sampling
    assert res["summary"]["paired_requests"] == 2  # the main summary is the greedy run
    printed = bench.format_summary(res)
    assert "prompt_lookup pld3-m3" in printed and "T=0.8" in printed
    assert "merged drafter faster than prompt lookup" in printed


def test_bad_sampling_and_peer_flags_are_clear_errors():
    with pytest.raises(BenchError, match="--temperatures"):
        bench.run_benchmark(BenchArgs(temperatures="0 warm", limit=1))
    with pytest.raises(BenchError, match="--prompt_lookup"):
        bench.command.parse_prompt_lookup("3 0")
    with pytest.raises(BenchError, match="in-process backend only"):
        bench.run_benchmark(BenchArgs(backend="openai", url="http://127.0.0.1:9/v1", temperature=0.7, limit=1))
    with pytest.raises(BenchError, match="--ngram_max 1 with --ngram: the merged drafter matches suffixes of at least 2"):
        bench.run_benchmark(BenchArgs(ngram=3, ngram_max=1, limit=1))


def test_a_run_that_records_its_server_commands_resumes(tmp_path):
    """The SGLang backend adds its servers' command lines to the config after the Recorder has
    compared it with the file on disk: resuming such a file must not read them as changed arguments."""
    out = tmp_path / "r.json"
    config = {"backend": "sglang", "draft": "head", "limit": 2}
    rec = Recorder(dict(config), out)
    rec.config["sglang_commands"] = {"baseline": ["python", "-m", "sglang.launch_server"]}
    rec.save()
    assert "sglang_commands" in json.loads(out.read_text())["config"]
    Recorder(dict(config), out, resume=True)  # the same arguments: resumes
    with pytest.raises(BenchError, match="other arguments"):
        Recorder({**config, "limit": 3}, out, resume=True)


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    """`eaglebook bench --json F` is killed (SIGKILL) after its first prompts are on disk; the
    same command with --resume measures only the rest: the rows on disk stay as they were and
    every lane ends with every prompt. Other arguments against the same file are refused."""
    import signal
    import subprocess

    out = tmp_path / "b.json"
    cmd = [sys.executable, "-m", "eaglebook.cli", "bench", "--suite", "mt-bench", "--limit", "4",
           "--max_new_tokens", "32", "--warmup", "0", "--sweep", "3,1,4", "--no_peers", "--threads", "1",
           "--json", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        t0 = time.time()
        while len(rows) < 2:  # the first prompt on both lanes
            assert proc.poll() is None, "bench ended before it could be killed"
            assert time.time() - t0 < 300
            time.sleep(0.05)
            if out.is_file():
                try:
                    rows = json.loads(out.read_text())["requests"]
                except json.JSONDecodeError:
                    rows = []
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    before = json.loads(out.read_text())
    assert not before["complete"] or len(before["requests"]) < 8
    kept = before["requests"]
    assert 2 <= len(kept) < 8, "the kill should land mid-run"
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    after = json.loads(out.read_text())
    assert after["complete"] and len(after["requests"]) == 8  # 4 prompts x (baseline, EAGLE)
    finished = {r["prompt_id"] for r in kept if sum(x["prompt_id"] == r["prompt_id"] for x in kept) == 2}
    for r in kept:
        if r["prompt_id"] in finished:  # measured before the kill: taken as it was, not generated again
            assert r in after["requests"]
    assert {(r["prompt_id"], r["mode"]) for r in after["requests"]} == {
        (p, m) for p in {r["prompt_id"] for r in after["requests"]} for m in ("baseline", "eagle")}
    other = subprocess.run(cmd[:-2] + ["--json", str(out), "--resume", "--max_new_tokens", "16"],
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 1 and "other arguments (max_new_tokens)" in other.stderr


@needs_decode
def test_peer_lanes_ignore_the_targets_generation_config_and_count_every_verification(tiny_llama, smollm2_tokenizer,
                                                                                      capfd, caplog):
    """transformers' generate() fills every field a config leaves unset from the target's
    generation_config (a hub target's advice: sampling, top-k, min-p, a repetition penalty). The
    peer lanes pin neutral ones, so such advice changes neither their greedy output nor their
    samples for a given seed. Prompt lookup matches suffixes of up to ngram_max tokens (recorded),
    and its verification count is every target forward: transformers' first forward takes the
    prompt and the first draft together, and each forward yields at least one token."""
    tok = smollm2_tokenizer
    greedy = bench.make_inprocess_lanes(tiny_llama, tok, None, [], peers=True, prompt_lookup=(3,), ngram_max=3)
    sampled = bench.make_inprocess_lanes(tiny_llama, tok, None, [], peers=True, prompt_lookup=(3,), temperature=1.0,
                                         ngram_max=3)
    assert [(ln.mode, ln.config) for ln in greedy] == [("baseline", ""), ("generate", ""), ("prompt_lookup", "pld3-m3")]
    info = asyncio.run(greedy[2].client.server_info())
    assert info["generation_config"]["max_matching_ngram_size"] == 3
    assert info["generation_config"]["repetition_penalty"] == 1.0
    ids = bench.render_ids(tok, [{"role": "user", "content": "Repeat: alpha beta gamma, alpha beta gamma."}])

    def outputs():
        return ([asyncio.run(ln.client.generate(ids, 12))["output_ids"] for ln in greedy[1:]]
                + [asyncio.run(ln.client.generate(ids, 12, seed=5))["output_ids"] for ln in sampled[1:]])

    neutral = outputs()
    own = tiny_llama.generation_config
    tiny_llama.generation_config = type(own)(do_sample=True, temperature=0.6, top_p=0.9, top_k=5, min_p=0.2,
                                             repetition_penalty=1.5, no_repeat_ngram_size=2)
    try:
        advised = outputs()
    finally:
        tiny_llama.generation_config = own
    assert advised == neutral
    assert all(neutral)
    assert "min_length" not in capfd.readouterr().err + caplog.text  # no warning on every request

    seen = []
    hook = tiny_llama.register_forward_hook(lambda m, a, kw, out: seen.append(kw["input_ids"].shape[1]),
                                            with_kwargs=True)
    try:
        out = asyncio.run(greedy[2].client.generate(ids, 12))
    finally:
        hook.remove()
    assert seen[0] > len(ids)  # no separate prefill: the prompt and the first draft in one forward
    assert out["verify_ct"] == len(seen) and out["completion_tokens"] >= out["verify_ct"]


@needs_decode
def test_a_resumed_sampled_run_draws_the_same_samples(tiny_llama, smollm2_tokenizer, tmp_path):
    """Each sampled request's seed comes from (seed, prompt, turn, lane), not from a counter that
    the warm-up and the other lanes advance: a run killed after its first prompt and resumed
    (its warm-up on what is left) draws exactly the samples the uninterrupted run drew."""
    path = tmp_path / "b.json"
    args = BenchArgs(suite="mt-bench", limit=3, max_new_tokens=6, warmup=1, sweep="2,2,4", prompt_lookup="3",
                     temperature=1.0, seed=7, json=str(path))
    full = bench.run_benchmark(args, target=(tiny_llama, smollm2_tokenizer), progress=False)
    first = full["requests"][0]["prompt_id"]
    saved = json.loads(path.read_text())
    saved["requests"] = [r for r in saved["requests"] if r["prompt_id"] == first]  # killed after prompt 1
    saved["complete"] = False
    path.write_text(json.dumps(saved))
    resumed = bench.run_benchmark(dataclasses.replace(args, resume=True), target=(tiny_llama, smollm2_tokenizer),
                                  progress=False)

    def samples(res):
        return {(r["prompt_id"], r["mode"], r["config"]): (r["completion_tokens"], r["text"]) for r in res["requests"]}

    assert len(samples(full)) == 3 * 4  # 3 prompts x (baseline, EAGLE, generate(), prompt lookup)
    assert samples(resumed) == samples(full)
    lanes_of_first = [v for (p, _, _), v in samples(full).items() if p == first]
    assert len(set(lanes_of_first)) > 1  # lanes draw their own samples


@needs_decode
def test_a_prompts_file_is_named_hashed_and_checked_on_resume(tiny_llama, smollm2_tokenizer, tmp_path, capsys):
    """`--prompts FILE` records the file's name and sha256 (not the default suite) and prints
    them; a resumed run accepts the same bytes anywhere, and refuses another file of that name."""
    import hashlib
    import shutil

    f = tmp_path / "gsm8k.jsonl"
    f.write_text('{"prompt": "What is 2 + 3?"}\n{"prompt": "Name a prime number."}\n')
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    args = BenchArgs(prompts=str(f), max_new_tokens=4, warmup=0, sweep="2,1,3", peers=False,
                     json=str(tmp_path / "b.json"))
    target = (tiny_llama, smollm2_tokenizer)
    res = bench.run_benchmark(args, target=target, progress=False)
    c = res["config"]
    assert (c["suite"], c["prompts_file"], c["prompts_sha256"]) == ("jsonl", "gsm8k.jsonl", sha)
    assert bench.format_summary(res).startswith(f"inprocess · gsm8k.jsonl (sha256 {sha[:12]}) · 2 paired")
    moved = tmp_path / "elsewhere" / "gsm8k.jsonl"
    moved.parent.mkdir()
    shutil.copy(f, moved)
    again = bench.run_benchmark(dataclasses.replace(args, prompts=str(moved), resume=True), target=target,
                                progress=False)
    assert again["requests"] == res["requests"]  # the same bytes: nothing measured again
    moved.write_text('{"prompt": "What is 7 * 6?"}\n{"prompt": "Name a prime number."}\n')
    with pytest.raises(BenchError, match=r"it measured gsm8k.jsonl \(sha256 \w{12}\), this run gives "
                       r"gsm8k.jsonl \(sha256 \w{12}\): another file, or the same one changed"):
        bench.run_benchmark(dataclasses.replace(args, prompts=str(moved), resume=True), target=target, progress=False)
    with pytest.raises(BenchError, match="not with --suite humaneval"):
        bench.run_benchmark(dataclasses.replace(args, suite="humaneval"), target=target, progress=False)
