"""Benchmark a draft head: baseline vs EAGLE on the same prompts, in one run, one schema.

Three backends answer the one question users ask (how much faster is my target with this
head, on my prompts, on my hardware?):

- ``inprocess``: eaglebook's own engine vs its plain greedy baseline (the CPU default);
- ``sglang``: two ``python -m sglang.launch_server`` processes built from one argument set
  that differ only in the speculative flags, queried through the native ``/generate`` with
  token ids; accept length from each response's ``meta_info`` (``spec_verify_ct``);
- ``openai``: any OpenAI-compatible endpoint (vLLM, a remote SGLang) given by URL; accept
  length from vLLM's ``/metrics`` counters where the server offers them, else unavailable.

Every prompt is rendered by the one render function (contracts.md section 1) and sent as
token ids, so no server-side chat template can differ from the one the head was trained on.
accept_length = completion tokens / verification steps, bonus token included (section 5).
"""
from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

MODES = ("baseline", "eagle")


class BenchError(RuntimeError):
    """A benchmark that cannot go on; the message names the server, the prompt and what to do."""


class ServerError(BenchError):
    """A server that would not start, died, or stopped answering."""


# --------------------------------------------------------------------------------------
# Prompt suites
# --------------------------------------------------------------------------------------

SUITES = ("mt-bench", "humaneval", "sharegpt", "jsonl")


@dataclass
class Prompt:
    """One benchmark prompt: the user turns to send, in order (MT-bench has two)."""

    id: str
    category: str
    turns: list[str]
    system: str | None = None

    def messages(self, upto: int = 0, answers: list[str] | None = None) -> list[dict]:
        """The conversation up to user turn `upto` (0-based), with the model's own earlier answers."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for i in range(upto + 1):
            msgs.append({"role": "user", "content": self.turns[i]})
            if i < upto:
                msgs.append({"role": "assistant", "content": (answers or [])[i]})
        return msgs


def _sharegpt_holdout_path(run_dir: str | os.PathLike | None) -> Path | None:
    """Where notebook 01 persists its ShareGPT hold-out split (if it ran in this run folder)."""
    cands = []
    if run_dir:
        cands += [Path(run_dir) / "01-loss-masks" / "holdout.jsonl", Path(run_dir) / "01-loss-masks" / "sharegpt-holdout.jsonl"]
    try:  # the data module may name its own location; prefer it when it exists
        from . import data as _data
        fn = getattr(_data, "sharegpt_holdout_path", None)
        if fn is not None:
            cands.insert(0, Path(fn(run_dir) if run_dir else fn()))
    except Exception:  # a missing or failing helper just means "look in the usual places"
        pass
    return next((p for p in cands if p.is_file()), None)


def _prompts_from_conversations(rows: Iterable[dict], source: str) -> list[Prompt]:
    """Rows with `messages` (normalized schema) become prompts: every user turn, answers dropped."""
    out = []
    for i, r in enumerate(rows):
        msgs = r["messages"]
        system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if users:
            out.append(Prompt(id=str(r.get("id", f"{source}-{i}")), category=str(r.get("category") or source),
                              turns=users, system=system))
    return out


def load_prompts_file(path: str | os.PathLike) -> list[Prompt]:
    """A user JSONL: one object per line with `prompt` (a string), `turns` (strings) or
    `messages` (chat); optional `id`, `category`, `system`."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"prompts file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{path}:{n}: not valid JSON ({exc})") from exc
        if "messages" in rec:
            ps = _prompts_from_conversations([{**rec, "id": rec.get("id", f"{path.stem}-{n}")}], path.stem)
            if not ps:
                raise BenchError(f"{path}:{n}: `messages` has no user turn")
            p = ps[0]
        elif "turns" in rec or "prompt" in rec:
            turns = rec.get("turns") or [rec["prompt"]]
            if not all(isinstance(t, str) and t for t in turns):
                raise BenchError(f"{path}:{n}: `prompt`/`turns` must be non-empty strings")
            p = Prompt(id=str(rec.get("id", f"{path.stem}-{n}")), category="", turns=list(turns),
                       system=rec.get("system"))
        else:
            raise BenchError(f"{path}:{n}: needs `prompt`, `turns` or `messages`")
        p.category = str(rec.get("category") or path.stem)
        out.append(p)
    if not out:
        raise BenchError(f"prompts file {path} holds no prompts")
    return out


def load_suite(suite: str = "mt-bench", limit: int | None = None, prompts_file: str | None = None,
               run_dir: str | None = None) -> list[Prompt]:
    """The prompts of a suite, in a fixed order.

    mt-bench: 80 questions, 8 categories, two turns each (`turns` in the run decides how many
    are sent). MT-bench is ordered by category, so `limit` takes questions round-robin over
    categories, keeping a small run representative.
    humaneval: 164 problems wrapped in `eaglebook.data.HUMANEVAL_WRAPPER` (category "coding").
    sharegpt: the hold-out split notebook 01 persisted (never trained on).
    jsonl: `prompts_file` (see `load_prompts_file`).
    """
    from . import data

    if prompts_file and suite in ("mt-bench", "jsonl"):
        suite = "jsonl"
    if suite == "mt-bench":
        ds = data.load_mtbench()
        prompts = [Prompt(id=r["id"], category=r["category"], turns=list(r["turns"])) for r in ds]
        prompts = _round_robin(prompts)
    elif suite == "humaneval":
        prompts = [Prompt(id=r["id"], category="coding", turns=[r["messages"][0]["content"]])
                   for r in data.load_humaneval()]
    elif suite == "sharegpt":
        path = _sharegpt_holdout_path(run_dir)
        if path is None:
            raise BenchError("the ShareGPT hold-out split was not found: run notebook 01 into this run_dir first "
                             "(it persists the split), or pass --prompts FILE")
        ds, _ = data.load_conversations(path, source="sharegpt-holdout")
        prompts = _prompts_from_conversations(ds, "sharegpt")
    elif suite == "jsonl":
        if not prompts_file:
            raise BenchError("suite 'jsonl' needs --prompts FILE")
        prompts = load_prompts_file(prompts_file)
    else:
        raise BenchError(f"unknown suite {suite!r}; choose one of {SUITES}")
    return prompts[:limit] if limit else prompts


def _round_robin(prompts: list[Prompt]) -> list[Prompt]:
    by_cat: dict[str, list[Prompt]] = defaultdict(list)
    for p in prompts:
        by_cat[p.category].append(p)
    out, queues = [], list(by_cat.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def render_ids(tokenizer, messages: list[dict], answer_ids: dict | None = None) -> list[int]:
    """Token ids of a conversation plus the generation prompt: THE one render function.

    Every backend sends these ids, so what the head was trained on is what it is served.
    This is the single swap point: it defers to `eaglebook.data.render_prompt` (contracts
    section 1), which keeps earlier answers as the ids the model produced (`answer_ids`:
    {message index: ids}); only where that is absent does it fall back to the chat template.
    """
    from . import data

    render = getattr(data, "render_prompt", None)
    if render is not None:
        ids = render(tokenizer, messages, answer_ids=answer_ids) if answer_ids else render(tokenizer, messages)
        return [int(i) for i in ids]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


# --------------------------------------------------------------------------------------
# One request's result, and the metrics over many
# --------------------------------------------------------------------------------------

@dataclass
class Generation:
    """One request, one mode. The same schema for every backend."""

    prompt_id: str
    category: str
    turn: int
    mode: str  # "baseline" | "eagle"
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # request sent -> last token received
    ttft_s: float | None = None  # request sent -> first token (streaming backends only)
    verify_ct: int | None = None  # verification steps (EAGLE); None where unknown
    finish_reason: str | None = None
    concurrency: int = 1
    config: str = ""  # which draft setting produced it (sweeps)
    text: str = ""
    output_ids: list[int] | None = None

    @property
    def tok_s(self) -> float:
        return self.completion_tokens / self.latency_s if self.latency_s > 0 else float("nan")

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (or overall, when TTFT is unknown)."""
        if self.completion_tokens <= 0:
            return None
        if self.ttft_s is not None and self.completion_tokens > 1:
            return (self.latency_s - self.ttft_s) / (self.completion_tokens - 1)
        return self.latency_s / self.completion_tokens

    @property
    def accept_length(self) -> float | None:
        return self.completion_tokens / self.verify_ct if self.verify_ct else None

    def row(self) -> dict:
        d = asdict(self)
        d.pop("output_ids")
        d.update(tok_s=_r(self.tok_s), tpot_ms=_r(self.tpot_s * 1e3 if self.tpot_s is not None else None),
                 ttft_ms=_r(self.ttft_s * 1e3 if self.ttft_s is not None else None),
                 accept_length=_r(self.accept_length))
        d.pop("ttft_s")
        return d


def _r(x, nd: int = 4):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize_mode(gens: list[Generation], wall_s: float | None = None) -> dict:
    """Throughput, latency and accept length of one mode's requests.

    aggregate tok/s = all output tokens / wall time of the phase (requests may overlap);
    at concurrency 1 that is all tokens / the sum of latencies. accept_length =
    sum(completion tokens) / sum(verification steps), token-weighted as SGLang's benchmarks do.
    """
    if not gens:
        return {"requests": 0}
    tokens = sum(g.completion_tokens for g in gens)
    busy = sum(g.latency_s for g in gens)
    wall = wall_s if wall_s else busy
    verify = [g.verify_ct for g in gens]
    acc = tokens / sum(verify) if all(v for v in verify) else None
    return {
        "requests": len(gens),
        "output_tokens": tokens,
        "tok_s": _r(tokens / wall if wall > 0 else None),
        "tok_s_per_request": _r(_mean([g.tok_s for g in gens])),
        "tpot_ms": _r(_mean([g.tpot_s * 1e3 if g.tpot_s is not None else None for g in gens])),
        "ttft_ms": _r(_mean([g.ttft_s * 1e3 if g.ttft_s is not None else None for g in gens])),
        "accept_length": _r(acc),
        "hit_max_new_tokens": sum(1 for g in gens if g.finish_reason == "length"),
    }


def _speedup(base: list[Generation], eagle: list[Generation]) -> float | None:
    if not base or not eagle:
        return None
    tb = sum(g.completion_tokens for g in base) / sum(g.latency_s for g in base)
    te = sum(g.completion_tokens for g in eagle) / sum(g.latency_s for g in eagle)
    return _r(te / tb) if tb > 0 else None


# --------------------------------------------------------------------------------------
# Hardware, results files
# --------------------------------------------------------------------------------------

def hardware_info() -> dict:
    """What the numbers were measured on: CPU model and cores, memory, GPUs, library versions."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor()
    with contextlib.suppress(Exception):
        import psutil
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["physical_cores"] = psutil.cpu_count(logical=False)
    with contextlib.suppress(Exception):
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda"] = torch.version.cuda
    with contextlib.suppress(Exception):
        import transformers
        info["transformers"] = transformers.__version__
    with contextlib.suppress(Exception):
        from importlib.metadata import version
        info["sglang"] = version("sglang")
    from . import __version__
    info["eaglebook"] = __version__
    return info


def save_results(result: dict, json_path: str | os.PathLike, csv_path: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write the whole result (config, hardware, summary, requests) as JSON, requests as CSV.

    Written atomically, so a reader never sees half a file, also when called again and again
    while a run is in progress (partial results).
    """
    json_path = Path(json_path)
    csv_path = Path(csv_path) if csv_path else json_path.with_suffix(".csv")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, json_path)
    rows = result.get("requests", [])
    cols = list(rows[0]) if rows else list(Generation.__dataclass_fields__)
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    os.replace(tmp, csv_path)
    return json_path, csv_path


# --------------------------------------------------------------------------------------
# Server processes: own process group, health wait, cleanup that leaves no orphans
# --------------------------------------------------------------------------------------

def _tree(pid: int) -> list:
    import psutil

    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


class ServerProcess:
    """A server started as a subprocess in its own session (so its own process group).

    SGLang spawns scheduler and detokenizer children; ending only the parent would orphan
    them with the GPU memory they hold. `stop()` therefore snapshots the whole process tree,
    sends SIGTERM to the group and to every process of the tree (children that started their
    own session escape the group), waits `grace` seconds, then SIGKILLs what is left.
    Use it as a context manager: the server is stopped on normal exit, on errors, on Ctrl-C
    and on SIGTERM to the benchmark itself.
    """

    def __init__(self, cmd: list[str], health_url: str, name: str = "server", env: dict | None = None,
                 log_path: str | os.PathLike | None = None, startup_timeout: float = 900.0, grace: float = 15.0):
        self.cmd, self.health_url, self.name = list(cmd), health_url, name
        self.env = env
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout, self.grace = startup_timeout, grace
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._known: dict[int, object] = {}  # every process of the tree we have seen, by pid
        self._old_sigterm = None

    # ---- life cycle
    def start(self) -> "ServerProcess":
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(self.cmd, stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        return self

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def _remember_tree(self) -> None:
        if self.proc is not None:
            for p in _tree(self.proc.pid):
                self._known.setdefault(p.pid, p)

    def wait_healthy(self, timeout: float | None = None, interval: float = 0.5) -> float:
        """Poll `health_url` until it answers 200; returns seconds waited.

        Raises ServerError (after stopping the server) if the process exits first or the
        timeout passes, with the tail of the server log.
        """
        import httpx

        timeout = self.startup_timeout if timeout is None else timeout
        t0 = time.monotonic()
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                self._remember_tree()
                code = self.poll()
                if code is not None:
                    self.stop()
                    raise ServerError(f"{self.name} exited with code {code} before becoming healthy.\n"
                                      f"command: {' '.join(self.cmd)}\n{self.log_tail()}")
                try:
                    if client.get(self.health_url).status_code == 200:
                        self._remember_tree()
                        return time.monotonic() - t0
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() - t0 > timeout:
                    self.stop()
                    raise ServerError(f"{self.name} did not become healthy at {self.health_url} within "
                                      f"{timeout:.0f} s (stopped it). Raise the startup timeout for big models.\n"
                                      f"command: {' '.join(self.cmd)}\n{self.log_tail()}")
                time.sleep(interval)

    def stop(self) -> list[int]:
        """End the server's process group and tree; returns the pids that needed SIGKILL."""
        import psutil

        if self.proc is None:
            return []
        self._remember_tree()
        procs = list(self._known.values())
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # pgid == pid: we started a new session
        for p in _alive(procs):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=self.grace)
        _, alive = psutil.wait_procs(_alive(procs), timeout=max(0.1, self.grace / 3))
        killed = []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in _alive(alive):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
                killed.append(p.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        psutil.wait_procs(_alive(procs), timeout=5)
        if self._log:
            self._log.close()
            self._log = None
        return killed

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path or not self.log_path.is_file():
            return "(no server log)"
        lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        return f"last {len(lines)} lines of {self.log_path}:\n" + "\n".join(lines)

    # ---- context manager: cleanup on every way out
    def __enter__(self) -> "ServerProcess":
        import threading

        if threading.current_thread() is threading.main_thread():
            # SIGTERM would otherwise end us without running __exit__, orphaning the server.
            def _raise(signum, frame):
                raise KeyboardInterrupt(f"signal {signum}")
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise)
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None


# --------------------------------------------------------------------------------------
# SGLang: one argument set, two servers that differ only in the speculative flags
# --------------------------------------------------------------------------------------

@dataclass
class DraftSetting:
    """A draft setting with SGLang's meaning (contracts section 5)."""

    num_steps: int = 5
    topk: int = 4
    num_draft_tokens: int = 8

    def __post_init__(self):
        if self.num_steps < 1 or self.topk < 1 or self.num_draft_tokens < 2:
            raise BenchError(f"invalid draft setting {self}: need num_steps >= 1, topk >= 1, num_draft_tokens >= 2")
        if self.topk == 1:
            # A chain has exactly one node per step plus the root (SGLang forces the same).
            self.num_draft_tokens = self.num_steps + 1
        elif self.num_draft_tokens > 1 + self.topk + (self.num_steps - 1) * self.topk ** 2:
            # root + topk first-level nodes + topk*topk candidates per later step
            raise BenchError(f"num_draft_tokens={self.num_draft_tokens} exceeds what a tree of "
                             f"num_steps={self.num_steps}, topk={self.topk} can hold")

    @property
    def label(self) -> str:
        return f"s{self.num_steps}-k{self.topk}-n{self.num_draft_tokens}"


@dataclass
class SGLangConfig:
    """Everything both SGLang servers share; EAGLE adds only the speculative flags."""

    model_path: str
    draft_path: str | None = None
    algorithm: str = "EAGLE3"
    host: str = "127.0.0.1"
    port: int = 30000
    dtype: str | None = None  # e.g. "bfloat16"; None = SGLang's auto
    context_length: int | None = None
    mem_fraction_static: float | None = None
    tp_size: int = 1
    cuda_graph_max_bs: int | None = None
    attention_backend: str | None = None
    disable_radix_cache: bool = False
    # The draft is built with the target's context length; a draft config with a smaller
    # max_position_embeddings makes SGLang refuse to start unless this is set (reference sec. 1).
    allow_longer_context: bool = True
    extra_args: list[str] = field(default_factory=list)
    python: str = sys.executable


def sglang_command(cfg: SGLangConfig, mode: str, setting: DraftSetting | None = None,
                   port: int | None = None) -> list[str]:
    """The exact `python -m sglang.launch_server` command line for one mode.

    The baseline and EAGLE commands are built from the same `cfg`; EAGLE appends
    `--speculative-algorithm`, `--speculative-draft-model-path` and the three tree flags.
    """
    if mode not in MODES:
        raise BenchError(f"unknown mode {mode!r}; choose one of {MODES}")
    cmd = [cfg.python, "-m", "sglang.launch_server", "--model-path", cfg.model_path,
           "--host", cfg.host, "--port", str(port if port is not None else cfg.port), "--tp-size", str(cfg.tp_size)]
    if cfg.dtype:
        cmd += ["--dtype", cfg.dtype]
    if cfg.context_length:
        cmd += ["--context-length", str(cfg.context_length)]
    if cfg.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.cuda_graph_max_bs is not None:
        cmd += ["--cuda-graph-max-bs-decode", str(cfg.cuda_graph_max_bs)]  # SGLang 0.5.23 splits it per phase
    if cfg.attention_backend:
        cmd += ["--attention-backend", cfg.attention_backend]
    if cfg.disable_radix_cache:
        cmd += ["--disable-radix-cache"]
    cmd += list(cfg.extra_args)
    if mode == "eagle":
        if not cfg.draft_path:
            raise BenchError("the EAGLE server needs draft_path (an exported EAGLE-3 draft folder)")
        s = setting or DraftSetting()
        cmd += ["--speculative-algorithm", cfg.algorithm.upper(),
                "--speculative-draft-model-path", str(cfg.draft_path),
                "--speculative-num-steps", str(s.num_steps),
                "--speculative-eagle-topk", str(s.topk),
                "--speculative-num-draft-tokens", str(s.num_draft_tokens)]
    return cmd


def sglang_env(cfg: SGLangConfig) -> dict:
    """Environment for both servers (identical, so only the flags differ)."""
    return {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"} if cfg.allow_longer_context else {}


def sglang_server(cfg: SGLangConfig, mode: str, setting: DraftSetting | None = None, port: int | None = None,
                  log_dir: str | os.PathLike | None = None, startup_timeout: float = 900.0) -> ServerProcess:
    """A (not yet started) ServerProcess for one mode; use `with sglang_server(...) as srv:`."""
    port = port if port is not None else cfg.port
    tag = mode if mode == "baseline" else f"eagle-{(setting or DraftSetting()).label}"
    log = Path(log_dir) / f"sglang-{tag}-{port}.log" if log_dir else None
    return ServerProcess(sglang_command(cfg, mode, setting, port), f"http://{cfg.host}:{port}/health",
                         name=f"SGLang {tag} server (port {port})", env=sglang_env(cfg), log_path=log,
                         startup_timeout=startup_timeout)


def require_sglang() -> None:
    """Fail early, clearly, where sglang is missing (it is the optional extra eaglebook[sglang])."""
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        raise BenchError("the sglang backend needs SGLang and a CUDA GPU: pip install 'eaglebook[sglang]' "
                         "(or use --backend inprocess on this machine)")


# --------------------------------------------------------------------------------------
# Parsing what servers answer
# --------------------------------------------------------------------------------------

def parse_generate_response(obj: dict) -> dict:
    """The fields we use from SGLang's native `/generate` answer (or one streamed chunk).

    `meta_info` carries `prompt_tokens`, `completion_tokens`, `finish_reason` ({"type":
    "length"|"stop"|"abort", ...}), `e2e_latency`, and, on a speculative server, `spec_verify_ct`
    (verification steps; SGLang's own accept length is completion_tokens / spec_verify_ct).
    """
    if not isinstance(obj, dict) or "meta_info" not in obj:
        raise BenchError(f"unexpected /generate response (no meta_info): {str(obj)[:300]}")
    meta = obj["meta_info"]
    fr = meta.get("finish_reason")
    if isinstance(fr, dict):
        fr_type = fr.get("type")
        if fr_type == "abort":
            raise BenchError(f"the server aborted the request: {fr.get('message', fr)}")
    else:
        fr_type = fr
    return {
        "prompt_tokens": int(meta.get("prompt_tokens", 0)),
        "completion_tokens": int(meta.get("completion_tokens", 0)),
        "verify_ct": int(meta["spec_verify_ct"]) if meta.get("spec_verify_ct") else None,
        "finish_reason": fr_type,
        "e2e_latency": meta.get("e2e_latency"),
        "text": obj.get("text", ""),
        "output_ids": obj.get("output_ids"),
    }


# Server arguments worth recording next to the numbers (SGLang's /server_info is a flat
# dict of every ServerArgs field, the scheduler info, `internal_states` and `version`).
SERVER_INFO_KEYS = ("model_path", "dtype", "context_length", "tp_size", "mem_fraction_static", "attention_backend",
                    "cuda_graph_max_bs", "disable_radix_cache", "chunked_prefill_size", "max_running_requests",
                    "speculative_algorithm", "speculative_draft_model_path", "speculative_num_steps",
                    "speculative_eagle_topk", "speculative_num_draft_tokens", "max_total_num_tokens", "version")


def parse_server_info(obj: dict) -> dict:
    """The effective arguments a server runs with (after SGLang's own auto-choices)."""
    out = {k: obj.get(k) for k in SERVER_INFO_KEYS if k in obj}
    states = obj.get("internal_states") or []
    accs = [s.get("avg_spec_accept_length") for s in states if isinstance(s, dict)]
    accs = [a for a in accs if a is not None]
    if accs:
        out["avg_spec_accept_length"] = sum(accs) / len(accs)
    return out


VLLM_SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                      "vllm:spec_decode_num_accepted_tokens")


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum every sample of each metric over its labels (engines, models): name -> value.

    Counters are exposed as `<name>_total`; the suffix is folded away so callers use the
    names vLLM documents (`vllm:spec_decode_num_drafts`, ...).
    """
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            rest = rest.rsplit("}", 1)[-1]
        else:
            name, _, rest = line.partition(" ")
        parts = rest.split()
        if not parts:
            continue
        try:
            val = float(parts[0])
        except ValueError:
            continue
        name = name.strip()
        if name.endswith("_total"):
            name = name[: -len("_total")]
        out[name] += val
    return dict(out)


def vllm_accept_length(before: dict, after: dict) -> float | None:
    """vLLM's mean acceptance length over a window: 1 + accepted draft tokens / drafts (bonus included)."""
    if "vllm:spec_decode_num_drafts" not in after:
        return None
    drafts = after["vllm:spec_decode_num_drafts"] - before.get("vllm:spec_decode_num_drafts", 0.0)
    acc = after.get("vllm:spec_decode_num_accepted_tokens", 0.0) - before.get("vllm:spec_decode_num_accepted_tokens", 0.0)
    return 1.0 + acc / drafts if drafts > 0 else None


# --------------------------------------------------------------------------------------
# Clients: one `generate(ids, max_new_tokens)` per backend, the same answer shape
# --------------------------------------------------------------------------------------

class SGLangClient:
    """SGLang's native `/generate` with `input_ids` (greedy), optionally streamed for TTFT."""

    def __init__(self, base_url: str, name: str = "SGLang server", timeout: float = 600.0, stream: bool = False,
                 ignore_eos: bool = False, server: ServerProcess | None = None):
        self.base_url, self.name, self.timeout = base_url.rstrip("/"), name, timeout
        self.stream, self.ignore_eos, self.server = stream, ignore_eos, server
        self._http = None

    async def __aenter__(self):
        import httpx

        self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=10.0), trust_env=False)
        return self

    async def __aexit__(self, *exc):
        await self._http.aclose()

    async def server_info(self) -> dict:
        r = await self._http.get(self.base_url + "/server_info")
        if r.status_code == 404:  # SGLang before /server_info was added
            r = await self._http.get(self.base_url + "/get_server_info")
        r.raise_for_status()
        return parse_server_info(r.json())

    async def generate(self, ids: list[int], max_new_tokens: int) -> dict:
        payload = {"input_ids": list(ids), "stream": self.stream,
                   "sampling_params": {"temperature": 0.0, "max_new_tokens": int(max_new_tokens),
                                       "ignore_eos": self.ignore_eos}}
        t0 = time.perf_counter()
        ttft = None
        if not self.stream:
            r = await self._http.post(self.base_url + "/generate", json=payload)
            _raise_for_status(r, self.name)
            out = parse_generate_response(r.json())
        else:
            out = None
            async with self._http.stream("POST", self.base_url + "/generate", json=payload) as r:
                if r.status_code != 200:
                    await r.aread()
                    _raise_for_status(r, self.name)
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    out = parse_generate_response(json.loads(data))
                    if ttft is None and out["completion_tokens"] > 0:
                        ttft = time.perf_counter() - t0
            if out is None:
                raise ServerError(f"{self.name} closed the stream without any answer")
        out["latency_s"] = time.perf_counter() - t0
        out["ttft_s"] = ttft
        return out


def _raise_for_status(r, name: str) -> None:
    if r.status_code != 200:
        raise ServerError(f"{name} answered HTTP {r.status_code}: {r.text[:300]}")


class OpenAIClient:
    """Any OpenAI-compatible server (vLLM, SGLang, ...): `/v1/completions` with token-id prompts.

    The completions API takes a list of token ids as `prompt`, which keeps the contract that
    servers get pre-tokenized input. Streams for TTFT; token counts from `usage`. Accept
    length comes from the server's `/metrics` (vLLM's spec-decode counters) where offered:
    scraped around each request at concurrency 1, so verify_ct = drafts in that window.
    """

    def __init__(self, base_url: str, name: str = "OpenAI-compatible server", model: str | None = None,
                 api_key: str | None = None, timeout: float = 600.0, ignore_eos: bool = False,
                 per_request_metrics: bool = True):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.root = self.base_url[: -len("/v1")]
        self.name, self.model, self.timeout, self.ignore_eos = name, model, timeout, ignore_eos
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.per_request_metrics = per_request_metrics
        self.metrics_available = False
        self.server = None
        self._oa = self._http = None

    async def __aenter__(self):
        import httpx
        from openai import AsyncOpenAI

        self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=10.0), trust_env=False)
        self._oa = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0,
                               http_client=self._http)
        if not self.model:
            models = await self._oa.models.list()
            if not models.data:
                raise ServerError(f"{self.name} at {self.base_url} serves no model")
            self.model = models.data[0].id
        self.metrics_available = "vllm:spec_decode_num_drafts" in (await self.metrics() or {})
        return self

    async def __aexit__(self, *exc):
        await self._oa.close()

    async def metrics(self) -> dict | None:
        import httpx

        try:
            r = await self._http.get(self.root + "/metrics")
        except httpx.HTTPError:
            return None
        return parse_prometheus(r.text) if r.status_code == 200 else None

    async def server_info(self) -> dict:
        return {"model": self.model, "base_url": self.base_url, "accept_length_source":
                "vllm /metrics counters" if self.metrics_available else "unavailable"}

    async def generate(self, ids: list[int], max_new_tokens: int) -> dict:
        import openai

        before = await self.metrics() if (self.metrics_available and self.per_request_metrics) else None
        t0 = time.perf_counter()
        ttft, text, finish, usage = None, [], None, None
        extra = {"ignore_eos": True} if self.ignore_eos else None
        try:
            stream = await self._oa.completions.create(model=self.model, prompt=list(ids), max_tokens=int(max_new_tokens),
                                                       temperature=0.0, stream=True,
                                                       stream_options={"include_usage": True}, extra_body=extra)
            async for chunk in stream:
                for ch in chunk.choices or []:
                    if ch.text and ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(ch.text or "")
                    finish = ch.finish_reason or finish
                if chunk.usage is not None:
                    usage = chunk.usage
        except openai.APIStatusError as exc:
            raise ServerError(f"{self.name} answered HTTP {exc.status_code}: {str(exc)[:300]}") from exc
        except openai.APITimeoutError as exc:
            raise ServerError(f"{self.name} did not answer within {self.timeout:.0f} s") from exc
        except openai.APIConnectionError as exc:
            raise ServerError(f"lost the connection to {self.name} at {self.base_url}: {exc}") from exc
        latency = time.perf_counter() - t0
        if usage is None:
            raise ServerError(f"{self.name} sent no usage (token counts); it must support stream_options.include_usage")
        verify = None
        if before is not None:
            after = await self.metrics()
            if after and "vllm:spec_decode_num_drafts" in after:
                verify = int(round(after["vllm:spec_decode_num_drafts"] - before.get("vllm:spec_decode_num_drafts", 0)))
        return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                "verify_ct": verify or None, "finish_reason": finish, "text": "".join(text), "output_ids": None,
                "latency_s": latency, "ttft_s": ttft}


class InProcessClient:
    """eaglebook's engine (mode "eagle") or its plain greedy baseline (mode "baseline"), in this process.

    `generate_fn(ids, max_new_tokens) -> dict` does the work; `make_inprocess_clients` builds
    it on the decode engine. Both modes share the target, dtype, threads and forward path.
    """

    def __init__(self, name: str, generate_fn: Callable[[list[int], int], dict], info: dict | None = None):
        self.name, self._gen, self._info = name, generate_fn, info or {}
        self.server = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def server_info(self) -> dict:
        return dict(self._info)

    async def generate(self, ids: list[int], max_new_tokens: int) -> dict:
        # Synchronous on purpose: timing a CPU decode must not share the cores with anything.
        t0 = time.perf_counter()
        out = self._gen(list(ids), int(max_new_tokens))
        out.setdefault("latency_s", time.perf_counter() - t0)
        out.setdefault("ttft_s", None)
        out.setdefault("prompt_tokens", len(ids))
        return out


# --------------------------------------------------------------------------------------
# Running prompts through clients: warm-up, interleaving, concurrency, partial results
# --------------------------------------------------------------------------------------

@dataclass
class Lane:
    """One thing being measured: a mode, a draft-setting label, and the client that serves it."""

    mode: str
    client: object
    config: str = ""


class Recorder:
    """Collects every finished request and (re)writes the result files as it goes.

    If a run dies, what finished is already on disk, with `complete: false` and the error.
    """

    def __init__(self, config: dict, json_path: str | os.PathLike | None = None, save_every: int = 1):
        self.config, self.json_path, self.save_every = config, json_path, save_every
        self.gens: list[Generation] = []
        self.walls: dict[str, float] = defaultdict(float)
        self.server_info: dict[str, dict] = {}
        self.error: str | None = None
        self.hardware = hardware_info()
        self.t0 = time.time()

    def add(self, g: Generation) -> None:
        self.gens.append(g)
        if self.json_path and len(self.gens) % self.save_every == 0:
            self.save()

    def result(self) -> dict:
        eagle_cfgs = sorted({g.config for g in self.gens if g.mode == "eagle"})
        main = self.config.get("main_config") if self.config.get("main_config") in eagle_cfgs else None
        main = main or (eagle_cfgs[0] if eagle_cfgs else None)
        return {
            "complete": self.error is None, "error": self.error,
            "config": self.config, "hardware": self.hardware, "server_info": self.server_info,
            "seconds": round(time.time() - self.t0, 1),
            "summary": summarize(self.gens, config=main, walls=self.walls),
            "settings": sweep_table(self.gens) if len(eagle_cfgs) > 1 else [],
            "concurrency": concurrency_table(self.gens, self.walls),
            "requests": [g.row() for g in self.gens],
        }

    def save(self) -> dict:
        res = self.result()
        if self.json_path:
            save_results(res, self.json_path)
        return res


def _turns_of(p: Prompt, turns: int) -> int:
    return min(len(p.turns), max(1, turns))


def _build_ids(tokenizer, p: Prompt, turn: int, answers: dict) -> list[int]:
    """The ids of turn `turn`; later turns carry the model's own earlier answers, as ids."""
    prev = answers.get(p.id, [])
    msgs = p.messages(turn, [g.text for g in prev])
    from .target import end_of_turn_ids

    eot = set(end_of_turn_ids(tokenizer))
    answer_ids = {}
    offset = 1 if p.system else 0
    for i, g in enumerate(prev[:turn]):
        # An answer cut off by max_new_tokens has no end-of-turn of its own: it goes in as
        # text and the template closes the turn, as a server would render it.
        if g.output_ids and g.output_ids[-1] in eot:
            answer_ids[offset + 2 * i + 1] = g.output_ids
    return render_ids(tokenizer, msgs, answer_ids or None)


async def _one(lane: Lane, p: Prompt, turn: int, ids: list[int], max_new_tokens: int, concurrency: int,
               where: str) -> Generation:
    try:
        out = await lane.client.generate(ids, max_new_tokens)
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise
    except Exception as exc:
        raise _explain(lane, exc, where) from exc
    return Generation(prompt_id=p.id, category=p.category, turn=turn, mode=lane.mode,
                      prompt_tokens=int(out.get("prompt_tokens") or len(ids)),
                      completion_tokens=int(out["completion_tokens"]), latency_s=float(out["latency_s"]),
                      ttft_s=out.get("ttft_s"), verify_ct=out.get("verify_ct"), finish_reason=out.get("finish_reason"),
                      concurrency=concurrency, config=lane.config, text=out.get("text", ""),
                      output_ids=out.get("output_ids"))


def _explain(lane: Lane, exc: BaseException, where: str) -> BenchError:
    """Turn a failed request into an error that says which server, which prompt, and why."""
    name = getattr(lane.client, "name", lane.mode)
    srv = getattr(lane.client, "server", None)
    msg = f"{name} failed at {where}: {type(exc).__name__}: {exc}"
    if srv is not None:
        code = srv.poll()
        timed_out = type(exc).__name__ in ("ReadTimeout", "WriteTimeout", "ConnectTimeout", "PoolTimeout")
        if code is None and srv.proc is not None and not timed_out:
            # A dropped connection is often a server on its way down: give it a moment to say so.
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = srv.proc.wait(timeout=3)
        if code is not None:
            msg = f"{name} died (exit code {code}) at {where}.\n{srv.log_tail()}"
    try:
        import httpx
        if isinstance(exc, httpx.TimeoutException):
            msg = f"{name} did not answer within {getattr(lane.client, 'timeout', '?')} s at {where} (request timed out)"
    except ImportError:
        pass
    return ServerError(msg)


async def warm_up(lanes: list[Lane], prompts: list[Prompt], tokenizer, n: int, max_new_tokens: int = 32) -> None:
    """Run `n` short requests per lane first, so no lane pays for first-call costs in the numbers."""
    for p in prompts[:n]:
        ids = render_ids(tokenizer, p.messages(0))
        for lane in lanes:
            await _one(lane, p, 0, ids, min(max_new_tokens, 32), 1, f"warm-up prompt {p.id}")


async def run_interleaved(lanes: list[Lane], prompts: list[Prompt], tokenizer, rec: Recorder, max_new_tokens: int,
                          turns: int = 1, progress: bool = True) -> None:
    """Concurrency 1: for each prompt (and turn), every lane in turn, the order alternating per
    prompt, so slow drift of the machine (thermal, other load) hits all lanes alike."""
    from tqdm.auto import tqdm

    answers: dict[str, list[Generation]] = defaultdict(list)
    ref = next((ln for ln in lanes if ln.mode == "baseline"), lanes[0])  # whose answers later turns build on
    for i, p in enumerate(tqdm(prompts, desc="prompts", disable=not progress, mininterval=1.0)):
        for t in range(_turns_of(p, turns)):
            ids = _build_ids(tokenizer, p, t, answers)
            order = lanes if i % 2 == 0 else lanes[::-1]
            for lane in order:
                g = await _one(lane, p, t, ids, max_new_tokens, 1,
                               f"prompt {p.id} turn {t + 1} ({i + 1}/{len(prompts)})")
                rec.add(g)
                rec.walls[_wall_key(lane.mode, lane.config, 1)] += g.latency_s
                if lane is ref:
                    answers[p.id].append(g)


async def run_phase(lane: Lane, prompts: list[Prompt], tokenizer, rec: Recorder, max_new_tokens: int,
                    turns: int = 1, concurrency: int = 1, answers: dict | None = None, progress: bool = True) -> dict:
    """All prompts through one lane with up to `concurrency` requests in flight.

    Later turns build on `answers` (the baseline's, when given) else on this lane's own.
    Returns this lane's answers. Wall time per phase goes to `rec.walls` (aggregate tok/s).
    """
    from tqdm.auto import tqdm

    own: dict[str, list[Generation]] = defaultdict(list)
    base = answers if answers is not None else own
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=sum(_turns_of(p, turns) for p in prompts), desc=f"{lane.mode} {lane.config} c={concurrency}",
               disable=not progress, mininterval=1.0)

    async def one(i, p, t):
        async with sem:
            ids = _build_ids(tokenizer, p, t, base)
            g = await _one(lane, p, t, ids, max_new_tokens, concurrency,
                           f"prompt {p.id} turn {t + 1} ({i + 1}/{len(prompts)}, concurrency {concurrency})")
            rec.add(g)
            own[p.id].append(g)
            bar.update(1)

    t0 = time.perf_counter()
    try:
        for t in range(max(_turns_of(p, turns) for p in prompts)):
            async with asyncio.TaskGroup() as tg:  # the first failure cancels the requests in flight
                for i, p in enumerate(prompts):
                    if t < _turns_of(p, turns):
                        tg.create_task(one(i, p, t))
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    finally:
        bar.close()
        rec.walls[_wall_key(lane.mode, lane.config, concurrency)] += time.perf_counter() - t0
    return own


def _wall_key(mode: str, config: str, concurrency: int) -> str:
    return f"{mode}|{config}|{concurrency}"


# --------------------------------------------------------------------------------------
# Tables over many requests: one run, a settings sweep, a concurrency sweep
# --------------------------------------------------------------------------------------

def summarize(gens: list[Generation], config: str | None = None, walls: dict | None = None,
              concurrency: int | None = None) -> dict:
    """Baseline vs EAGLE (one draft setting): per mode, speedup on the paired prompts, per category.

    speedup = EAGLE output tok/s / baseline output tok/s over the prompts both modes finished.
    """
    walls = walls or {}
    if concurrency is None:
        concurrency = min((g.concurrency for g in gens), default=1)
    gens = [g for g in gens if g.concurrency == concurrency]
    if config is None:
        cfgs = sorted({g.config for g in gens if g.mode == "eagle"})
        config = cfgs[0] if cfgs else ""
    by_mode = {"baseline": [g for g in gens if g.mode == "baseline"],
               "eagle": [g for g in gens if g.mode == "eagle" and g.config == config]}
    both = {(g.prompt_id, g.turn) for g in by_mode["baseline"]} & {(g.prompt_id, g.turn) for g in by_mode["eagle"]}
    out = {"config": config, "concurrency": concurrency}
    for m in MODES:
        wall = walls.get(_wall_key(m, "" if m == "baseline" else config, concurrency)) if concurrency > 1 else None
        out[m] = summarize_mode(by_mode[m], wall)
    paired = {m: [g for g in by_mode[m] if (g.prompt_id, g.turn) in both] for m in MODES}
    out["speedup"] = _speedup(paired["baseline"], paired["eagle"])
    out["paired_requests"] = len(both)
    cats = []
    for cat in sorted({g.category for g in paired["eagle"]}):
        b = [g for g in paired["baseline"] if g.category == cat]
        e = [g for g in paired["eagle"] if g.category == cat]
        sb, se = summarize_mode(b), summarize_mode(e)
        cats.append({"category": cat, "requests": len(e), "baseline_tok_s": sb.get("tok_s"),
                     "eagle_tok_s": se.get("tok_s"), "speedup": _speedup(b, e),
                     "accept_length": se.get("accept_length")})
    out["per_category"] = cats
    return out


def parse_label(label: str) -> dict:
    """`s5-k4-n8` -> {num_steps: 5, topk: 4, num_draft_tokens: 8} (empty for other labels)."""
    try:
        s, k, n = label.split("-")
        return {"num_steps": int(s[1:]), "topk": int(k[1:]), "num_draft_tokens": int(n[1:])}
    except (ValueError, IndexError):
        return {}


def sweep_table(gens: list[Generation]) -> list[dict]:
    """One row per EAGLE draft setting: accept_length, tok/s and speedup vs the same run's baseline."""
    rows = []
    for cfg in sorted({g.config for g in gens if g.mode == "eagle"}):
        s = summarize(gens, config=cfg)
        rows.append({"config": cfg, **parse_label(cfg), "accept_length": s["eagle"].get("accept_length"),
                     "eagle_tok_s": s["eagle"].get("tok_s"), "baseline_tok_s": s["baseline"].get("tok_s"),
                     "speedup": s["speedup"], "requests": s["eagle"].get("requests")})
    return rows


def concurrency_table(gens: list[Generation], walls: dict | None = None) -> list[dict]:
    """One row per (concurrency, mode): per-request tok/s and aggregate tok/s."""
    walls = walls or {}
    rows = []
    for c in sorted({g.concurrency for g in gens}):
        for m in MODES:
            sel = [g for g in gens if g.concurrency == c and g.mode == m]
            for cfg in sorted({g.config for g in sel}):
                part = [g for g in sel if g.config == cfg]
                s = summarize_mode(part, walls.get(_wall_key(m, cfg, c)) if c > 1 else None)
                rows.append({"concurrency": c, "mode": m, "config": cfg, "requests": s["requests"],
                             "tok_s_per_request": s["tok_s_per_request"], "tok_s": s["tok_s"],
                             "accept_length": s["accept_length"]})
    return rows


# --------------------------------------------------------------------------------------
# The in-process backend on eaglebook's decode engine
# --------------------------------------------------------------------------------------

_FINISH = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length"}


def make_inprocess_lanes(target, tokenizer, draft, settings: list[DraftSetting]) -> list[Lane]:
    """The plain greedy baseline and one EAGLE lane per draft setting, on `eaglebook.decode`.

    Both go through the same target forward function, cache class, attention and dtype, so
    the speedup compares like with like (issue 7). verify_ct = verification steps of the
    engine; accept_length = generated tokens / that, as everywhere.
    """
    from . import decode
    from .target import end_of_turn_ids

    eos = end_of_turn_ids(tokenizer, getattr(target, "generation_config", None))
    common = {"target": getattr(target, "name_or_path", None), "dtype": str(next(target.parameters()).dtype),
              "device": str(next(target.parameters()).device), "engine": "eaglebook.decode"}

    def base_fn(ids, n):
        r = decode.baseline_decode(target, ids, n, eos, tokenizer=tokenizer)
        return {"completion_tokens": len(r.token_ids), "latency_s": r.seconds, "verify_ct": None,
                "finish_reason": _FINISH.get(r.stop_reason, r.stop_reason), "text": r.text,
                "output_ids": list(r.token_ids)}

    lanes = [Lane("baseline", InProcessClient("in-process baseline", base_fn, {**common, "mode": "baseline"}))]
    for s in settings:
        dec = decode.EagleDecoder(target, draft, decode.SpecConfig(s.num_steps, s.topk, s.num_draft_tokens),
                                  eos_ids=eos, tokenizer=tokenizer)

        def eagle_fn(ids, n, dec=dec):
            r = dec.generate(ids, n)
            return {"completion_tokens": len(r.token_ids), "latency_s": r.seconds,
                    "verify_ct": max(1, r.num_verify_steps), "finish_reason": _FINISH.get(r.stop_reason, r.stop_reason),
                    "text": r.text, "output_ids": list(r.token_ids)}

        info = {**common, "mode": "eagle", **asdict(s)}
        lanes.append(Lane("eagle", InProcessClient(f"in-process EAGLE {s.label}", eagle_fn, info), s.label))
    return lanes


class _Threaded:
    """Serves `concurrency` > 1 in-process: requests arrive together and queue for the engine.

    The reference engine decodes one sequence at a time and hooks the shared target, so
    requests take turns (one lock per target). Latency is measured from arrival, queueing
    included, as a server measures it: per-request tok/s falls with concurrency while the
    aggregate stays flat. That is what a batch-1 engine gives N users; a batching server
    (SGLang) is where the real crossover shows.
    """

    def __init__(self, inner: InProcessClient, lock):
        self.inner, self.name, self.server, self.lock = inner, inner.name, None, lock

    async def generate(self, ids, n):
        t0 = time.perf_counter()

        def work():
            with self.lock:
                return self.inner._gen(list(ids), int(n))
        out = await asyncio.to_thread(work)
        out["latency_s"] = time.perf_counter() - t0
        return out

    async def server_info(self):
        return await self.inner.server_info()


def resolve_draft(spec: str, target, tokenizer=None):
    """The draft head for the in-process engine: a path or shipped name, else the default head
    (issue 9) when it ships, else an untrained head (accept_length ~1; says so)."""
    from . import decode

    if spec:
        return decode.load_head(target, spec)
    for name in ("smollm2-135m-eagle3",):
        try:
            return decode.load_head(target, name)
        except Exception:  # not shipped yet in this checkout
            pass
    print("No draft head given and no default head found: using an UNTRAINED head "
          "(output unchanged, accept_length near 1, so no speedup). Pass --draft PATH.")
    return decode.load_head(target, None)


# --------------------------------------------------------------------------------------
# The whole benchmark: `eaglebook bench`
# --------------------------------------------------------------------------------------

@dataclass
class BenchArgs:
    """Baseline vs EAGLE on a prompt suite: tok/s, speedup, accept_length, per category."""

    suite: str = field(default="mt-bench", metadata={"help": "mt-bench | humaneval | sharegpt | jsonl"})
    prompts: str = field(default="", metadata={"help": "a JSONL of prompts (`prompt`, `turns` or `messages`)"})
    limit: int = field(default=0, metadata={"help": "first N prompts (0 = all; mt-bench round-robin over categories)"})
    turns: int = field(default=1, metadata={"help": "MT-bench turns to send (2 = second turn on the model's own answer)"})
    backend: str = field(default="inprocess", metadata={"help": "auto | inprocess | sglang | openai"})
    target: str = field(default="smollm2-135m", metadata={"help": "target: embedded name, folder or hub id"})
    draft: str = field(default="", metadata={"help": "draft head: path/name (SGLang: an exported EAGLE-3 folder)"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | auto"})
    max_new_tokens: int = field(default=256, metadata={"help": "generation limit per request"})
    num_steps: int = field(default=5, metadata={"help": "draft depth"})
    topk: int = field(default=4, metadata={"help": "branching per expanded node (1 = chain)"})
    num_draft_tokens: int = field(default=8, metadata={"help": "nodes verified, root included"})
    sweep: str = field(default="", metadata={"help": "draft settings to sweep, 'steps,topk,tokens' separated by spaces"})
    concurrency: str = field(default="1", metadata={"help": "concurrency levels, e.g. '1,2,4,8' (crossover sweep)"})
    warmup: int = field(default=2, metadata={"help": "warm-up prompts per lane (not recorded)"})
    stream: bool = field(default=False, metadata={"help": "SGLang: stream to measure TTFT"})
    ignore_eos: bool = field(default=False, metadata={"help": "servers: always generate max_new_tokens"})
    json: str = field(default="", metadata={"help": "results JSON (a CSV of the requests is written beside it)"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = default)"})
    sglang_model: str = field(default="", metadata={"help": "SGLang --model-path (default: the target's folder or id)"})
    port: int = field(default=30000, metadata={"help": "SGLang port (the EAGLE server uses port+1 when together)"})
    layout: str = field(default="sequential", metadata={"help": "SGLang: sequential (one server at a time) | together (both up, interleaved)"})
    mem_fraction_static: float = field(default=0.0, metadata={"help": "SGLang --mem-fraction-static (0 = auto)"})
    context_length: int = field(default=0, metadata={"help": "SGLang --context-length (0 = the model's)"})
    sglang_args: str = field(default="", metadata={"help": "extra SGLang flags for BOTH servers"})
    startup_timeout: float = field(default=900.0, metadata={"help": "seconds a server may take to become healthy"})
    request_timeout: float = field(default=600.0, metadata={"help": "seconds one request may take"})
    url: str = field(default="", metadata={"help": "openai: base URL of the EAGLE server (.../v1)"})
    baseline_url: str = field(default="", metadata={"help": "openai: base URL of the baseline server (for speedup)"})
    model: str = field(default="", metadata={"help": "openai: model name (default: the server's first)"})
    log_dir: str = field(default="", metadata={"help": "server logs (default: beside --json, else runs/bench-logs)"})
    run_dir: str = field(default="", metadata={"help": "suite sharegpt: the run folder notebook 01 saved its hold-out split in"})


def parse_settings(args: BenchArgs) -> list[DraftSetting]:
    if not args.sweep.strip():
        return [DraftSetting(args.num_steps, args.topk, args.num_draft_tokens)]
    out = []
    for item in args.sweep.split():
        try:
            s, k, n = (int(x) for x in item.split(","))
        except ValueError:
            raise BenchError(f"--sweep item {item!r}: write steps,topk,num_draft_tokens, e.g. '3,1,4 5,4,8'") from None
        out.append(DraftSetting(s, k, n))
    return out


def parse_levels(text: str) -> list[int]:
    try:
        levels = sorted({int(x) for x in str(text).replace(" ", "").split(",") if x})
    except ValueError:
        raise BenchError(f"--concurrency {text!r}: write levels like '1,2,4,8'") from None
    if not levels or levels[0] < 1:
        raise BenchError(f"--concurrency {text!r}: levels must be >= 1")
    return levels


def pick_backend(requested: str, draft: str = "") -> str:
    """auto: SGLang where a CUDA GPU and sglang are present, else in-process (said once)."""
    if requested != "auto":
        if requested not in ("inprocess", "sglang", "openai"):
            raise BenchError(f"unknown backend {requested!r}; choose auto, inprocess, sglang or openai")
        return requested
    import importlib.util

    import torch
    if torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None:
        return "sglang"
    why = "no CUDA GPU" if not torch.cuda.is_available() else "sglang is not installed"
    print(f"backend auto -> inprocess ({why}): the same suite through eaglebook's engine on this machine")
    return "inprocess"


def _run_sync(coro_fn):
    """asyncio.run, also from inside Jupyter (whose loop is already running: use a thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn())
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(lambda: asyncio.run(coro_fn())).result()


def run_benchmark(args: BenchArgs, target=None, draft=None, progress: bool = True) -> dict:
    """Run the benchmark `args` describes and return the result (also saved to `args.json`).

    `target` = (model, tokenizer) and `draft` skip loading for the in-process backend. On
    any failure (a server dies, a request times out, Ctrl-C) what finished is saved with
    `complete: false` and the error, and a BenchError says where the partial results are.
    """
    backend = pick_backend(args.backend, args.draft)
    settings = parse_settings(args)
    levels = parse_levels(args.concurrency)
    prompts = load_suite(args.suite, args.limit or None, args.prompts or None, args.run_dir or None)
    config = {**asdict(args), "backend": backend, "settings": [asdict(s) for s in settings],
              "main_config": settings[0].label if backend != "openai" else "server",
              "concurrency_levels": levels, "prompts": len(prompts)}
    rec = Recorder(config, args.json or None)
    log_dir = args.log_dir or (str(Path(args.json).parent / "server-logs") if args.json else "runs/bench-logs")

    async def main():
        if backend == "inprocess":
            await _bench_inprocess(args, settings, levels, prompts, rec, target, draft, progress)
        elif backend == "sglang":
            await _bench_sglang(args, settings, levels, prompts, rec, log_dir, progress)
        else:
            await _bench_openai(args, levels, prompts, rec, progress)

    try:
        _run_sync(main)
    except KeyboardInterrupt:
        rec.error = "interrupted (Ctrl-C)"
        rec.save()
        raise
    except BenchError as exc:
        rec.error = str(exc)
        rec.save()
        where = f"saved to {args.json}" if args.json else "in the returned error's .partial"
        err = BenchError(f"{exc}\nPartial results ({len(rec.gens)} requests finished) {where}.")
        err.partial = rec.result()
        raise err from exc
    return rec.save()


async def _drive(lanes: list[Lane], levels: list[int], prompts, tokenizer, rec: Recorder, args: BenchArgs,
                 progress: bool) -> None:
    """All lanes live at once: interleave per prompt at concurrency 1, phases above it."""
    await warm_up(lanes, prompts, tokenizer, args.warmup)
    for c in levels:
        if c == 1:
            await run_interleaved(lanes, prompts, tokenizer, rec, args.max_new_tokens, args.turns, progress)
            continue
        answers = None
        for lane in lanes:  # baseline first: later turns build on its answers
            own = await run_phase(lane, prompts, tokenizer, rec, args.max_new_tokens, args.turns, c, answers, progress)
            answers = answers if answers is not None else own


async def _bench_inprocess(args, settings, levels, prompts, rec, target, draft, progress):
    from .target import load_target, target_info

    if target is None:
        target = load_target(args.target, dtype=args.dtype, threads=args.threads or None)
    model, tok = target
    if draft is None:
        draft = resolve_draft(args.draft, model, tok)
    lanes = make_inprocess_lanes(model, tok, draft, settings)
    rec.server_info["target"] = target_info(model, tok)
    for lane in lanes:
        rec.server_info[f"{lane.mode} {lane.config}".strip()] = await lane.client.server_info()
    if max(levels) > 1:
        import threading

        lock = threading.Lock()
        lanes_c = [Lane(ln.mode, _Threaded(ln.client, lock), ln.config) for ln in lanes]
        await warm_up(lanes, prompts, tok, args.warmup)
        if 1 in levels:
            await run_interleaved(lanes, prompts, tok, rec, args.max_new_tokens, args.turns, progress)
        for c in [c for c in levels if c > 1]:
            answers = None
            for lane in lanes_c:
                own = await run_phase(lane, prompts, tok, rec, args.max_new_tokens, args.turns, c, answers, progress)
                answers = answers if answers is not None else own
    else:
        await _drive(lanes, levels, prompts, tok, rec, args, progress)


def _sglang_config(args: BenchArgs) -> SGLangConfig:
    import shlex

    from .target import resolve_target

    model_path = args.sglang_model or resolve_target(args.target)
    return SGLangConfig(model_path=model_path, draft_path=args.draft or None, port=args.port,
                        dtype=None if args.dtype == "auto" else args.dtype,
                        context_length=args.context_length or None,
                        mem_fraction_static=args.mem_fraction_static or (0.4 if args.layout == "together" else None),
                        extra_args=shlex.split(args.sglang_args))


async def _bench_sglang(args, settings, levels, prompts, rec, log_dir, progress):
    from transformers import AutoTokenizer

    require_sglang()
    cfg = _sglang_config(args)
    if not cfg.draft_path:
        raise BenchError("the sglang backend needs --draft: an exported EAGLE-3 folder (notebook 03 writes one)")
    tok = AutoTokenizer.from_pretrained(cfg.model_path)
    specs = [("baseline", None)] + [("eagle", s) for s in settings]
    rec.config["sglang_commands"] = {("baseline" if s is None else s.label): sglang_command(cfg, m, s) for m, s in specs}

    def client(srv, mode, s):
        return SGLangClient(srv.health_url.rsplit("/", 1)[0], name=srv.name, timeout=args.request_timeout,
                            stream=args.stream, ignore_eos=args.ignore_eos, server=srv)

    if args.layout == "together":
        if len(settings) != 1:
            raise BenchError("layout 'together' runs one baseline and one EAGLE server: sweep with layout 'sequential'")
        with sglang_server(cfg, "baseline", port=args.port, log_dir=log_dir, startup_timeout=args.startup_timeout) as b, \
                sglang_server(cfg, "eagle", settings[0], port=args.port + 1, log_dir=log_dir,
                              startup_timeout=args.startup_timeout) as e:
            b.wait_healthy()
            e.wait_healthy()
            async with client(b, "baseline", None) as cb, client(e, "eagle", settings[0]) as ce:
                rec.server_info["baseline"] = await cb.server_info()
                rec.server_info[settings[0].label] = await ce.server_info()
                lanes = [Lane("baseline", cb), Lane("eagle", ce, settings[0].label)]
                await _drive(lanes, levels, prompts, tok, rec, args, progress)
        return
    answers = None
    for mode, s in specs:  # one server at a time: all of the GPU for each
        with sglang_server(cfg, mode, s, log_dir=log_dir, startup_timeout=args.startup_timeout) as srv:
            srv.wait_healthy()
            async with client(srv, mode, s) as c:
                label = "" if s is None else s.label
                rec.server_info[label or "baseline"] = await c.server_info()
                lane = Lane(mode, c, label)
                await warm_up([lane], prompts, tok, args.warmup)
                for lvl in levels:
                    own = await run_phase(lane, prompts, tok, rec, args.max_new_tokens, args.turns, lvl, answers,
                                          progress)
                    if mode == "baseline" and lvl == levels[0]:
                        answers = own


async def _bench_openai(args, levels, prompts, rec, progress):
    from transformers import AutoTokenizer

    from .target import resolve_target

    if not args.url:
        raise BenchError("the openai backend needs --url (the EAGLE server; add --baseline-url for speedup)")
    tok = AutoTokenizer.from_pretrained(args.sglang_model or resolve_target(args.target))
    async with contextlib.AsyncExitStack() as stack:
        lanes = []
        if args.baseline_url:
            cb = await stack.enter_async_context(OpenAIClient(args.baseline_url, "baseline server", args.model or None,
                                                              timeout=args.request_timeout, ignore_eos=args.ignore_eos))
            lanes.append(Lane("baseline", cb))
        ce = await stack.enter_async_context(OpenAIClient(args.url, "EAGLE server", args.model or None,
                                                          timeout=args.request_timeout, ignore_eos=args.ignore_eos,
                                                          per_request_metrics=max(levels) == 1))
        lanes.append(Lane("eagle", ce, "server"))
        for ln in lanes:
            rec.server_info[ln.mode] = await ln.client.server_info()
        if not ce.metrics_available:
            print("The EAGLE server offers no speculative-decoding metrics: accept_length is reported as unavailable.")
        await _drive(lanes, levels, prompts, tok, rec, args, progress)


def format_summary(result: dict) -> str:
    """A few lines for the terminal and notebooks."""
    s = result["summary"]
    b, e = s.get("baseline", {}), s.get("eagle", {})
    acc = e.get("accept_length")
    lines = [f"{result['config'].get('backend')} · {result['config'].get('suite')} · {s.get('paired_requests')} paired "
             f"requests · {s.get('config') or 'server'}",
             f"  baseline   {b.get('tok_s')} tok/s",
             f"  EAGLE      {e.get('tok_s')} tok/s   accept_length {acc if acc is not None else 'unavailable'}",
             f"  speedup    {s.get('speedup')}x"]
    for row in result.get("settings") or []:
        lines.append(f"  {row['config']:>12}: accept_length {row['accept_length']}, {row['eagle_tok_s']} tok/s, "
                     f"speedup {row['speedup']}x")
    if not result.get("complete", True):
        lines.append(f"  INCOMPLETE: {result.get('error')}")
    return "\n".join(lines)


def _cli(args: BenchArgs) -> int:
    try:
        res = run_benchmark(args)
    except BenchError as exc:
        print(f"eaglebook bench: {exc}", file=sys.stderr)
        return 1
    print(format_summary(res))
    if args.json:
        print(f"results: {args.json} (+ {Path(args.json).with_suffix('.csv').name})")
    return 0


def _register() -> None:
    from .cli import register

    register("bench", BenchArgs, _cli)


_register()
