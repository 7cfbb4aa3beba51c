"""llama.cpp: the head as GGUF, llama-server command lines, the llamacpp benchmark backend.

Fast tests install nothing: the GGUF is written by llama.cpp's own converter (its source comes
from the package index once, into the cache) and read back with `gguf`'s reader; the backend
runs end to end against tests/standin_llama_server.py, a real process speaking llama-server's
command line and /completion API. Tests marked `engine` serve the shipped head in a real
llama-server; they skip, naming `make engine-llamacpp`, where it is not built.
"""
from __future__ import annotations

import importlib.util
import json
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from eaglebook import bench
from eaglebook.bench import BenchArgs, BenchError
from eaglebook.bench import llamacpp as L

STANDIN_LLAMA = str(Path(__file__).with_name("standin_llama_server.py"))
HEAD = "smollm2-135m-eagle3"

needs_converter = pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is None,
                                     reason="llama.cpp's GGUF converter needs sentencepiece (`make setup` installs it)")


def _built() -> bool:
    try:
        L.llama_server_binary()
        return True
    except BenchError:
        return False


needs_engine = pytest.mark.skipif(not _built(), reason="llama-server is not built: run `make engine-llamacpp`")


def free_port(n: int = 1) -> int:
    """A port with the next n-1 ports free too."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n < 65535 and not any(L.port_in_use("127.0.0.1", p + i) for i in range(n)):
            return p
    raise RuntimeError("no free port range")


@pytest.fixture(scope="module")
def head_gguf():
    """The shipped head as GGUF, converted once into the engine cache (reused by later runs)."""
    if importlib.util.find_spec("sentencepiece") is None:
        pytest.skip("llama.cpp's GGUF converter needs sentencepiece (`make setup` installs it)")
    return L.draft_gguf(HEAD, "smollm2-135m", progress=False)


@pytest.fixture
def standin_binary(tmp_path):
    """An executable that runs the stand-in llama-server with the same Python."""
    path = tmp_path / "llama-server"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {STANDIN_LLAMA} \"$@\"\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def standins_alive(port: int, n: int) -> list[int]:
    """Stand-in servers still running on ports port..port+n-1 (the wrapper execs into standin_server.py)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if p.info["status"] == psutil.STATUS_ZOMBIE or not any("standin" in c for c in cmd) or "--port" not in cmd:
            continue
        if port <= int(cmd[cmd.index("--port") + 1]) < port + n:
            out.append(p.pid)
    return out


# ---------------------------------------------------------------------------------------
# GGUF export, read back with gguf's own reader
# ---------------------------------------------------------------------------------------

@needs_converter
def test_gguf_export_round_trip(tmp_path):
    import gguf

    from eaglebook.export import export_gguf, load_draft, resolve_head
    from eaglebook.target import EMBEDDED, find_gguf

    out = export_gguf(HEAD, tmp_path / "head.gguf", target="smollm2-135m", progress=False)
    r = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in r.fields.items() if k != "tokenizer.ggml.tokens"}
    assert f["general.architecture"] == "eagle3"
    side = json.loads((resolve_head(HEAD) / "eaglebook.json").read_text())
    assert f["eagle3.target_layers"] == side["aux_layers"]["hf"] == [2, 15, 27]  # HF convention, what it trained on
    assert f["eagle3.target_hidden_size"] == 576 and f["eagle3.block_count"] == 1
    tensors = {t.name: t for t in r.tensors}
    draft = load_draft(HEAD)
    # d2t as llama.cpp reads it: absolute target ids, the head's offsets + position
    d2t = tensors["d2t"].data.astype(np.int64).reshape(-1)
    assert np.array_equal(d2t, draft.d2t.cpu().numpy() + np.arange(draft.d2t.numel()))
    assert np.array_equal(d2t, np.nonzero(draft.t2d.cpu().numpy())[0])
    # shapes in GGUF order (fastest dimension first): fc reads 3 target layers of 576
    assert tuple(tensors["fc.weight"].shape) == (3 * 576, 576)
    assert tuple(tensors["output.weight"].shape) == (576, draft.config.draft_vocab_size)
    assert tuple(tensors["blk.0.attn_q.weight"].shape) == (2 * 576, 576)  # [embedding; hidden] in, one layer
    assert "t2d" not in tensors and "token_embd.weight" not in tensors  # the target's embedding is shared
    # the tokenizer is the target's, token for token (llama.cpp refuses a draft whose vocabulary differs)
    t = gguf.GGUFReader(find_gguf(EMBEDDED["smollm2-135m"]))
    assert f["tokenizer.ggml.model"] == t.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.tokens"].contents() == t.fields["tokenizer.ggml.tokens"].contents()
    # what the backend checks before serving: it fits the target GGUF
    assert L.check_gguf_pair(out, find_gguf(EMBEDDED["smollm2-135m"]))["draft"]["target_layers"] == [2, 15, 27]


@needs_converter
def test_gguf_export_pins_custom_layers_and_refuses_eagle1(tmp_path):
    """A head trained on other layers than the default: the GGUF records those layers."""
    import shutil

    from eaglebook.export import export_gguf, read_gguf_head
    from eaglebook.draft import DraftError

    head = tmp_path / "head"
    shutil.copytree(Path(__file__).resolve().parent.parent / "data" / HEAD, head,
                    ignore=shutil.ignore_patterns("headline*", "*.png", "*.csv"))
    side = json.loads((head / "eaglebook.json").read_text())
    side["aux_layers"] = {"hf": [3, 10, 20], "sglang": [2, 9, 19], "default": False}
    (head / "eaglebook.json").write_text(json.dumps(side))
    out = export_gguf(head, tmp_path / "custom.gguf", progress=False)
    assert read_gguf_head(out)["target_layers"] == [3, 10, 20]
    cfg = json.loads((head / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLMEagle"]
    cfg.pop("draft_vocab_size")
    (head / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DraftError, match="EAGLE-1/2 head: llama.cpp serves EAGLE-3 heads only"):
        export_gguf(head, tmp_path / "e1.gguf", progress=False)


def test_export_command_bad_input_is_one_line(tmp_path, tiny_llama, capsys):
    """`eaglebook export`: a head trained for another target, a missing head, no --out."""
    import torch

    from eaglebook.cli import main
    from eaglebook.draft import build_draft
    from eaglebook.export import head_provenance, save_draft

    V = tiny_llama.config.vocab_size
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[:64] = True
    tiny_head = save_draft(build_draft(tiny_llama, torch.zeros(64, dtype=torch.long), t2d), tmp_path / "tiny",
                           head_provenance(tiny_llama))
    cases = [(["--draft", str(tiny_head)], "the head does not fit its target: hidden_size: draft 64, target 576"),
             (["--draft", str(tmp_path / "none")], "no draft head at"),
             ([], "give --out")]
    for extra, msg in cases:
        out = [] if not extra and msg == "give --out" else ["--out", str(tmp_path / "x.gguf")]
        assert main(["export", "--gguf", *out, *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.gguf").exists()


def _write_gguf(path: Path, hidden: int, tokens: int, d2t_max: int) -> Path:
    """A deliberately wrong EAGLE-3 GGUF (bad input), written with gguf's own writer."""
    import gguf

    w = gguf.GGUFWriter(str(path), "eagle3")
    w.add_block_count(1)
    w.add_embedding_length(hidden)
    w.add_uint32("eagle3.target_hidden_size", hidden)
    w.add_array("eagle3.target_layers", [2, 15, 27])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(tokens)])
    w.add_tensor("d2t", np.array([0, 1, d2t_max], dtype=np.int64), raw_dtype=gguf.GGMLQuantizationType.I64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_that_does_not_fit_the_target_is_one_clear_line(tmp_path):
    from eaglebook.target import EMBEDDED, find_gguf

    target = find_gguf(EMBEDDED["smollm2-135m"])
    with pytest.raises(BenchError, match="hidden states of size 64, but the target .* has hidden size 576") as e:
        L.check_gguf_pair(_write_gguf(tmp_path / "h.gguf", 64, 49152, 10), target)
    assert "\n" not in str(e.value)
    with pytest.raises(BenchError, match="1000-token vocabulary, the target .* 49152"):
        L.check_gguf_pair(_write_gguf(tmp_path / "v.gguf", 576, 1000, 10), target)
    with pytest.raises(BenchError, match="target id 60000, beyond the target's 49152-token vocabulary"):
        L.check_gguf_pair(_write_gguf(tmp_path / "d.gguf", 576, 49152, 60000), target)
    with pytest.raises(BenchError, match="is a 'llama' model, not an EAGLE-3 head"):
        L.check_gguf_pair(target, target)


# ---------------------------------------------------------------------------------------
# Command lines, the missing binary
# ---------------------------------------------------------------------------------------

def test_llama_server_command_lines_differ_only_in_speculative_flags():
    cfg = L.LlamaCppConfig(model="/m/target.gguf", draft="/m/head.gguf", server="/opt/llama-server", port=30100,
                           threads=2, ctx_size=2048, extra_args=["--no-mmap"])
    lanes = L.llamacpp_lanes([3, 5], 0.2, ["ngram-simple", "ngram-mod"])
    assert [ln.name for ln in lanes] == ["baseline", "eagle n3-p0.2", "eagle n5-p0.2", "prompt_lookup ngram-simple",
                                         "prompt_lookup ngram-mod"]
    base = L.llamacpp_command(cfg, lanes[0], 30100)
    assert base == ["/opt/llama-server", "-m", "/m/target.gguf", "--host", "127.0.0.1", "--port", "30100",
                    "--ctx-size", "2048", "--parallel", "1", "--threads", "2", "--threads-batch", "2", "--no-mmap"]
    eagle = L.llamacpp_command(cfg, lanes[1], 30100)
    assert eagle[:len(base)] == base
    assert eagle[len(base):] == ["-md", "/m/head.gguf", "--spec-type", "draft-eagle3", "--spec-draft-n-max", "3",
                                 "--spec-draft-p-min", "0.2"]
    ngram = L.llamacpp_command(cfg, lanes[4], 30100)
    assert ngram == base + ["--spec-type", "ngram-mod"]
    # concurrency: one slot per request in flight, each with the context asked for
    cfg.parallel = 4
    assert L.llamacpp_command(cfg, lanes[0], 1)[7:11] == ["--ctx-size", "8192", "--parallel", "4"]
    with pytest.raises(BenchError, match="n-gram mode 'ngram-fast'"):
        L.llamacpp_lanes([3], 0.0, ["ngram-fast"])


def test_missing_llama_server_names_the_make_target(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EAGLEBOOK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BenchError, match="run `make engine-llamacpp` once"):
        L.llama_server_binary()
    from eaglebook.cli import main

    assert main(["bench", "--backend", "llamacpp", "--limit", "1", "--draft", HEAD]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("eaglebook bench: llama-server is not built") and "make engine-llamacpp" in err[0]


def test_parse_completion_response_counts_target_passes():
    obj = {"content": "hi", "tokens": [5, 6, 7, 8, 9], "stop_type": "limit", "tokens_evaluated": 12,
           "tokens_predicted": 5, "timings": {"prompt_n": 12, "predicted_n": 5, "predicted_ms": 10.0,
                                              "draft_n": 6, "draft_n_accepted": 3}}
    out = L.parse_completion_response(obj, speculative=True)
    assert (out["completion_tokens"], out["verify_ct"], out["finish_reason"]) == (5, 2, "length")
    assert out["output_ids"] == [5, 6, 7, 8, 9] and out["timing"]["draft_n"] == 6
    plain = {**obj, "stop_type": "eos", "timings": {"prompt_n": 12, "predicted_n": 5}}
    assert L.parse_completion_response(plain, speculative=False)["verify_ct"] is None
    # a speculative lane that never drafted: every token is a target pass
    assert L.parse_completion_response(plain, speculative=True)["verify_ct"] == 5
    with pytest.raises(BenchError, match="no timings"):
        L.parse_completion_response({"error": "x"}, speculative=False)


# ---------------------------------------------------------------------------------------
# The backend end to end against the stand-in llama-server
# ---------------------------------------------------------------------------------------

def _args(tmp_path, binary, head, port, **kw) -> BenchArgs:
    base = dict(backend="llamacpp", suite="mt-bench", limit=4, max_new_tokens=16, warmup=1, draft=str(head),
                llama_server=str(binary), port=port, json=str(tmp_path / "out.json"), startup_timeout=30.0,
                request_timeout=30.0, num_steps=3)
    base.update(kw)
    return BenchArgs(**base)


def test_llamacpp_threads_default_to_the_cores_no_neighbour_keeps_busy(tmp_path, standin_binary, head_gguf):
    """--threads 0 gives every llama-server eaglebook's default thread count (the free cores, as torch
    gets), not llama.cpp's own (all physical cores, whose spinning threads stall beside a busy process)."""
    from eaglebook import device

    yes = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        cores, free = device.free_cores()
        device._DEFAULT_THREADS = None  # decided afresh, beside the neighbour
        cfg, lanes = L.llamacpp_setup(_args(tmp_path, standin_binary, head_gguf, 8080, threads=0))
    finally:
        yes.kill()
        device._DEFAULT_THREADS = None
    assert cfg.threads == free and (cores == 1 or free < cores)
    cmd = L.llamacpp_command(cfg, lanes[0])
    assert cmd[cmd.index("--threads") + 1] == str(free)
    cfg2, _ = L.llamacpp_setup(_args(tmp_path, standin_binary, head_gguf, 8080, threads=3))
    assert cfg2.threads == 3


def test_llamacpp_backend_interleaves_all_lanes_with_the_standin(tmp_path, standin_binary, head_gguf):
    port = free_port(4)
    args = _args(tmp_path, standin_binary, head_gguf, port, llamacpp_args="--standin-eagle-diverge-at 4")
    res = bench.run_benchmark(args, progress=False)
    assert res["complete"] and res["config"]["backend"] == "llamacpp"
    lanes = {r["lane"]: r for r in res["lanes"]}
    assert list(lanes) == ["baseline", "eagle n3", "prompt_lookup ngram-simple", "prompt_lookup ngram-mod"]
    assert all(r["requests"] == 4 for r in lanes.values())
    # accept length from the draft counters: tokens / (tokens - accepted drafts); the stand-in accepts 2.0
    assert lanes["eagle n3"]["accept_length"] == pytest.approx(2.0, rel=0.15)
    assert lanes["baseline"]["accept_length"] is None
    # identity against llama.cpp's own greedy, per request: the stand-in's EAGLE lane differs at token 4
    assert lanes["eagle n3"]["identical"] == 0 and lanes["prompt_lookup ngram-mod"]["identical"] == 4
    eagle_rows = [r for r in res["requests"] if r["mode"] == "eagle"]
    assert {r["first_divergence"] for r in eagle_rows} == {4}
    assert all(r["timing"]["draft_n"] > 0 for r in eagle_rows)
    assert res["summary"]["config"] == "n3" and res["summary"]["speedup"] is not None
    info = res["server_info"]["eagle n3"]
    assert info["build_info"] == "b11434-standin" and "--spec-type" in info["command"]
    assert info["command"][info["command"].index("-md") + 1] == str(head_gguf)
    assert json.loads(Path(args.json).read_text())["complete"]
    assert not standins_alive(port, 4)


def test_llamacpp_server_dying_mid_run_keeps_partial_results(tmp_path, standin_binary, head_gguf):
    port = free_port(2)
    args = _args(tmp_path, standin_binary, head_gguf, port, ngram_modes="", warmup=0,
                 llamacpp_args="--standin-eagle-die-after 2")
    with pytest.raises(BenchError, match=r"llama-server eagle n3 \(port \d+\) died \(exit code 3\) at prompt") as e:
        bench.run_benchmark(args, progress=False)
    assert "Partial results (4 requests finished) saved to" in str(e.value)
    saved = json.loads(Path(args.json).read_text())
    assert saved["complete"] is False and "died" in saved["error"] and len(saved["requests"]) == 4
    assert not standins_alive(port, 2)
    # resuming measures only the two prompts left (fresh servers: the EAGLE one answers 2 more)
    args.resume = True
    res = bench.run_benchmark(args, progress=False)
    assert res["complete"] and len(res["requests"]) == 8
    assert sorted({r["prompt_id"] for r in res["requests"]}) == sorted({r["prompt_id"] for r in saved["requests"]}
                                                                       | {r["prompt_id"] for r in res["requests"][4:]})
    args.llamacpp_args = ""
    with pytest.raises(BenchError, match="other arguments \\(llamacpp_args\\)"):
        bench.run_benchmark(args, progress=False)


def test_llamacpp_port_in_use_is_one_line_and_starts_nothing(tmp_path, standin_binary, head_gguf):
    port = free_port(4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port + 2))
        s.listen()
        with pytest.raises(BenchError, match=f"port {port + 2} on 127.0.0.1 is in use .*pass another --port"):
            bench.run_benchmark(_args(tmp_path, standin_binary, head_gguf, port), progress=False)
    assert not standins_alive(port, 4)


def test_llamacpp_server_that_cannot_load_its_model_is_reported(tmp_path, standin_binary, head_gguf):
    args = _args(tmp_path, standin_binary, head_gguf, free_port(4), target_gguf=str(tmp_path / "gone.gguf"))
    with pytest.raises(BenchError, match="no target GGUF at"):
        bench.run_benchmark(args, progress=False)


# ---------------------------------------------------------------------------------------
# The real engine (where `make engine-llamacpp` has built it)
# ---------------------------------------------------------------------------------------

@pytest.mark.engine
@needs_engine
@pytest.mark.timeout(600)
def test_llama_server_serves_the_shipped_head_losslessly(tmp_path, head_gguf):
    n_max = 3
    # one thread: OpenMP's two-thread barriers crawl on a CPU other jobs share; this checks behaviour, not speed
    args = BenchArgs(backend="llamacpp", suite="mt-bench", limit=4, max_new_tokens=64, warmup=1, draft=HEAD,
                     num_steps=n_max, ngram_modes="ngram-mod", threads=1, port=free_port(3),
                     json=str(tmp_path / "llamacpp.json"))
    res = bench.run_benchmark(args, progress=False)
    lanes = {r["lane"]: r for r in res["lanes"]}
    eagle = lanes[f"eagle n{n_max}"]
    assert eagle["requests"] == 4 and eagle["accept_length"] > 1.3
    assert eagle["identical"] == eagle["checked"] == 4  # greedy output equals llama.cpp's own greedy
    assert all(r["completion_tokens"] > 0 for r in res["requests"])
    cmd = res["server_info"][f"eagle n{n_max}"]["command"]
    assert cmd[cmd.index("--spec-type") + 1] == "draft-eagle3" and cmd[cmd.index("-md") + 1].endswith(".gguf")
    assert lanes["prompt_lookup ngram-mod"]["identical"] == 4


# ---------------------------------------------------------------------------------------
# The cost model, fitted on a run's own timings; another target GGUF, n-gram lanes alone
# ---------------------------------------------------------------------------------------

def test_cost_model_recovers_the_costs_the_standin_was_built_from(tmp_path, standin_binary, head_gguf):
    """Stand-in timings follow a known model: 10 ms per greedy token; a speculative pass 12 ms plus
    3 ms per drafted token verified, plus 5 ms per token the EAGLE-3 head drafts."""
    step, a, b_verify, b_draft = 10.0, 12.0, 3.0, 5.0
    args = _args(tmp_path, standin_binary, head_gguf, free_port(5), limit=8, sweep="1,1,2 3,1,4",
                 llamacpp_args=f"--standin-costs {step},{a},{b_verify},{b_draft}")
    res = bench.run_benchmark(args, progress=False)
    m = L.llamacpp_cost_model(res)
    assert m["t_step_ms"] == pytest.approx(step) and m["baseline_requests"] == 8
    assert m["eagle"]["lanes"] == ["n1", "n3"] and m["eagle"]["requests"] == 16
    assert m["ngram"]["lanes"] == ["ngram-mod", "ngram-simple"] and m["ngram"]["requests"] == 16
    assert (m["eagle"]["a_ms"], m["eagle"]["b_ms"]) == (pytest.approx(a), pytest.approx(b_verify + b_draft))
    assert (m["ngram"]["a_ms"], m["ngram"]["b_ms"]) == (pytest.approx(a), pytest.approx(b_verify))
    assert m["t_draft_ms"] == pytest.approx(b_draft) and m["eagle"]["r2"] == pytest.approx(1.0)
    assert m["eagle"]["b_se_ms"] == pytest.approx(0.0, abs=1e-9)  # an exact line: no doubt about its slope
    assert m["ngram"]["b_steps"] == pytest.approx(b_verify / step)
    # a chain of 3 pays where it makes more than (12 + 3 * 8) / 10 tokens per pass
    assert L.break_even(m, 3) == pytest.approx((a + 3 * (b_verify + b_draft)) / step)
    assert L.break_even(m, 3, "ngram") == pytest.approx((a + 3 * b_verify) / step)
    text = bench.format_summary(res)
    assert "greedy step 10.00 ms" in text and "EAGLE-3  12.00 ms + 8.000 (+-0.000) ms x drafted = 1.200 + 0.8000" in text
    assert "the head drafts a token in 5.000 ms" in text and "EAGLE-3 chain of n pays above accept length n1 2.00" in text
    # one family drafting the same length every pass has no slope; no baseline lane is one clear line
    same = {**res, "requests": [r for r in res["requests"] if r["mode"] != "eagle" or r["prompt_id"] == res[
        "requests"][0]["prompt_id"]]}
    assert L.llamacpp_cost_model(same)["eagle"]["b_ms"] is None and L.llamacpp_cost_model(same)["t_draft_ms"] is None
    # a p-min lane runs the head for tokens it then does not draft: left out of the EAGLE fit
    relabelled = {**res, "requests": [{**r, "config": r["config"] + "-p0.5"} if r["mode"] == "eagle" else r
                                      for r in res["requests"]]}
    m = L.llamacpp_cost_model(relabelled)
    assert m["skipped"] == ["n1-p0.5", "n3-p0.5"] and m["eagle"]["requests"] == 0
    assert m["ngram"]["b_ms"] == pytest.approx(b_verify)
    assert "left out: n1-p0.5, n3-p0.5" in "\n".join(L.format_cost_model(m))
    with pytest.raises(BenchError, match="needs the baseline lane's llama-server timings"):
        L.llamacpp_cost_model({**res, "requests": [r for r in res["requests"] if r["mode"] != "baseline"]})


def _base_model_gguf(path: Path) -> Path:
    """A GGUF holding the embedded target's tokenizer without its chat template, asking for a bos
    token (as a base model's does): written with gguf's own writer, metadata only."""
    import gguf

    from eaglebook.target import EMBEDDED, find_gguf

    src = gguf.GGUFReader(find_gguf(EMBEDDED["smollm2-135m"]))
    w = gguf.GGUFWriter(str(path), "llama")
    for k, f in src.fields.items():
        if k.startswith("GGUF.") or k in ("general.architecture", "tokenizer.chat_template",
                                          "tokenizer.ggml.add_bos_token"):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(k, f.contents(), f.types[0], sub)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_llamacpp_backend_on_another_target_gguf_runs_the_ngram_lanes_with_its_tokenizer(tmp_path, standin_binary,
                                                                                          capsys):
    from transformers import AutoTokenizer

    from eaglebook.target import EMBEDDED, find_gguf, resolve_target

    gguf_file = find_gguf(EMBEDDED["smollm2-135m"])  # a real GGUF given as a file: its own tokenizer is read
    args = _args(tmp_path, standin_binary, "", free_port(3), num_steps=0, target_gguf=str(gguf_file))
    res = bench.run_benchmark(args, progress=False)
    assert [r["lane"] for r in res["lanes"]] == ["baseline", "prompt_lookup ngram-simple", "prompt_lookup ngram-mod"]
    assert res["complete"] and res["config"]["settings"] == [] and res["server_info"]["tokenizer"]["chat_template"]
    assert "prompts tokenized by the GGUF's own tokenizer; its own chat template" in capsys.readouterr().out
    text = bench.format_summary(res)  # no EAGLE lane: no EAGLE line, and the n-gram lanes' table
    assert "EAGLE " not in text and "None" not in text and "prompt_lookup ngram-mod" in text
    # the GGUF's tokenizer renders every prompt to the very ids the embedded target's tokenizer does
    ref = AutoTokenizer.from_pretrained(resolve_target("smollm2-135m"))
    want = {p.id: len(bench.render_ids(ref, p.messages(0))) for p in bench.load_suite("mt-bench", 4)}
    assert {r["prompt_id"]: r["prompt_tokens"] for r in res["requests"]} == want

    # a base model's GGUF (no chat template): the text plainly, after bos, then a blank line
    base = _base_model_gguf(tmp_path / "base.gguf")
    tok, plain = L.gguf_tokenizer(base)
    msgs = [{"role": "user", "content": "Name three rivers."}]
    assert plain and bench.render_ids(tok, msgs) == [tok.bos_token_id] + tok("Name three rivers.\n\n",
                                                                             add_special_tokens=False)["input_ids"]
    args = _args(tmp_path, standin_binary, "", free_port(3), num_steps=0, target_gguf=str(base), ngram_modes="ngram-mod",
                 json=str(tmp_path / "base.json"))
    res = bench.run_benchmark(args, progress=False)
    assert res["complete"] and res["server_info"]["tokenizer"]["rendering"] == "plain text"
    assert "it has no chat template (a base model): each prompt's text is sent plainly, after <|im_start|>" \
        in capsys.readouterr().out
    args.turns, args.json = 2, ""
    with pytest.raises(BenchError, match="base.gguf has no chat template .* first turns only"):
        bench.run_benchmark(args, progress=False)
    # a head that does not fit the target names the way to run without one
    args = _args(tmp_path, standin_binary, _write_gguf(tmp_path / "h.gguf", 64, 49152, 10), free_port(3),
                 target_gguf=str(base))
    with pytest.raises(BenchError, match=r"hidden size 576.*\(--num_steps 0 runs the baseline and the n-gram"):
        bench.run_benchmark(args, progress=False)
