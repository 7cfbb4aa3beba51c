"""One place that decides device, dtype and CPU threads, and says so once."""
from __future__ import annotations

import os

import torch

_ANNOUNCED = False


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """cuda > mps > cpu, unless the caller names one."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """True where bfloat16 matmuls run natively (Ampere+ GPUs, Apple silicon, CPUs with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return True
    # On x86 CPUs torch runs bf16 GEMMs through oneDNN; it is fast where the CPU has
    # AVX512-BF16 or AMX and emulated (slow, but correct) elsewhere.
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/"auto": bfloat16 where native, float32 otherwise; or the named dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if native_bf16(device) else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[dtype]


def busy_tasks(samples: int = 5, interval: float = 0.05) -> set[int]:
    """Threads of other processes that were running or waiting for a core at each of `samples` looks,
    `interval` seconds apart: a neighbour that keeps a core busy (a build, a browser, `yes > /dev/null`),
    not one that passed by. Empty where there is no Linux /proc to read."""
    import glob
    import time

    me = str(os.getpid())
    seen = None
    for i in range(samples):
        running = set()
        for stat in glob.glob("/proc/[0-9]*/task/[0-9]*/stat"):
            if stat.split("/")[2] == me:
                continue
            try:
                text = open(stat).read()
            except OSError:  # the task ended while we looked
                continue
            if text[text.rindex(")") + 2:].startswith("R"):  # the state follows "(name) "
                running.add(int(stat.split("/")[4]))
        seen = running if seen is None else seen & running
        if not seen:
            break
        if i + 1 < samples:
            time.sleep(interval)
    return seen or set()


def free_cores() -> tuple[int, int]:
    """(cores this process may use, those of them not kept busy by other processes)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores, max(1, cores - len(busy_tasks()))


_DEFAULT_THREADS: int | None = None


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: EAGLEBOOK_THREADS, or the cores no other process keeps busy).

    On a CPU every torch op splits its work over the threads and waits for the slowest: a thread that
    shares its core with a busy neighbour makes every op wait for it, so beside one busy process on
    2 cores, 2 threads decode at a third of their quiet speed where 1 thread keeps all of its own.
    The default is decided once per process, when it is first needed.
    """
    global _DEFAULT_THREADS
    if threads is None:
        threads = int(os.environ.get("EAGLEBOOK_THREADS", "0"))
    if not threads:
        if _DEFAULT_THREADS is None:
            cores, free = free_cores()
            _DEFAULT_THREADS = free
            if free < cores:
                print(f"{cores - free} of {cores} CPU cores are busy with other processes: using {free} "
                      f"torch thread{'s' * (free > 1)} (set EAGLEBOOK_THREADS to choose)")
        threads = _DEFAULT_THREADS
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def setup(device=None, dtype=None, threads: int | None = None, verbose: bool = True):
    """Pick device and dtype, set threads, print `Using cpu / float32` once per process."""
    global _ANNOUNCED
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    n = set_threads(threads)
    if verbose and not _ANNOUNCED:
        print(f"Using {dev.type} / {str(dt).removeprefix('torch.')} ({n} threads, torch {torch.__version__})")
        _ANNOUNCED = True
    return dev, dt
