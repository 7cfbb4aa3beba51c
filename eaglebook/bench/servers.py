"""Server processes (own process group, health wait, cleanup that leaves no orphans) and the
SGLang command lines: one argument set, two servers that differ only in the speculative flags."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .core import MODES, BenchError, DraftSetting, ServerError


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


def require_free_port(host: str, port: int) -> None:
    """Refuse a port something already listens on: a health check would otherwise pass against the
    wrong server. Binds the way servers do (SO_REUSEADDR), so a port in TIME_WAIT counts as free."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServerError(f"port {port} on {host} is in use ({exc.strerror}): stop what listens there "
                              "or pass another --port") from None


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
