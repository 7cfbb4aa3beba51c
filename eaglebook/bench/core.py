"""What every part of the benchmark shares: errors, the draft setting, one request's result
(`Generation`, the same schema for every backend), the hardware record and the results files."""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path


MODES = ("baseline", "eagle")
# In-process peers: what a CPU user would otherwise pick, measured in the same run.
PEER_MODES = ("generate", "prompt_lookup")


class BenchError(RuntimeError):
    """A benchmark that cannot go on; the message names the server, the prompt and what to do."""


class ServerError(BenchError):
    """A server that would not start, died, or stopped answering."""

@dataclass
class DraftSetting:
    """A draft setting with SGLang's meaning."""

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
    temperature: float = 0.0  # 0 = greedy
    identical: bool | None = None  # greedy: output equal to the same prompt's baseline, token for token
    first_divergence: int | None = None  # where it first differs
    margin: float | None = None  # the baseline's top-2 logit margin there (a tie when tiny)
    margins: list[float] | None = None  # baseline, greedy: the top-2 margin at every position
    looped: bool | None = None  # the output repeats itself (see `looped`); None where no ids came back
    timing: dict | None = None  # in-process EAGLE: ms per iteration (draft_ms, verify_ms, other_ms, tree_size)

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

    @classmethod
    def from_row(cls, row: dict) -> "Generation":
        """The record `row()` wrote (a results file's `requests`), back as a Generation (no ids)."""
        own = {f.name for f in fields(cls)}
        g = cls(**{k: v for k, v in row.items() if k in own})
        if row.get("ttft_ms") is not None:
            g.ttft_s = row["ttft_ms"] / 1e3
        return g

    def row(self) -> dict:
        d = asdict(self)
        d.pop("output_ids")
        d.pop("margins")
        d.update(tok_s=_r(self.tok_s), tpot_ms=_r(self.tpot_s * 1e3 if self.tpot_s is not None else None),
                 ttft_ms=_r(self.ttft_s * 1e3 if self.ttft_s is not None else None),
                 accept_length=_r(self.accept_length))
        d.pop("ttft_s")
        return d


def looped(ids: list[int], n: int = 10, times: int = 3) -> bool:
    """True when some n-gram of `ids` occurs `times` times or more: the output repeats itself
    (a small model often does, and repeats are easy to draft, which flatters accept length)."""
    counts = Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    return bool(counts) and max(counts.values()) >= times


def _r(x, nd: int = 4):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None

def _wall_key(mode: str, config: str, concurrency: int) -> str:
    return f"{mode}|{config}|{concurrency}"

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
    from .. import __version__
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
