"""Benchmark a draft head: baseline, EAGLE and its peers on the same prompts, in one run, one schema.

Five backends answer the one question users ask (how much faster is my target with this
head, on my prompts, on my hardware?):

- ``inprocess``: eaglebook's own engine vs its plain greedy baseline (the CPU default), with
  the peers a CPU user would otherwise pick in the same interleaved run: transformers'
  ``generate()`` and its prompt-lookup decoding (n-gram drafts from the context);
- ``sglang``: two ``python -m sglang.launch_server`` processes built from one argument set
  that differ only in the speculative flags, queried through the native ``/generate`` with
  token ids; accept length from each response's ``meta_info`` (``spec_verify_ct``);
- ``openai``: any OpenAI-compatible endpoint (vLLM, a remote SGLang) given by URL; accept
  length from vLLM's ``/metrics`` counters where the server offers them, else unavailable;
- ``vllm``: vLLM on this CPU (``make engine-vllm`` installs it in its own environment): a plain
  and an EAGLE-3 server from one argument set, one at a time; accept length from vLLM's
  ``spec_decode`` counters, per draft position too (``vllm_cpu``);
- ``llamacpp``: ``llama-server`` processes on the CPU built from one argument set (plain greedy,
  the EAGLE-3 head as GGUF per draft length, llama.cpp's n-gram modes), queried through the
  native ``/completion`` with token ids; accept length from each response's draft counters.

Every prompt is rendered by the one render function and sent as token ids, so no server-side
chat template can differ from the one the head was trained on. accept_length = completion
tokens / verification steps, bonus token included.

The modules, in reading order: ``suites`` (prompts), ``core`` (one request's record, results
files), ``servers`` (SGLang processes), ``clients`` (one ``generate`` per backend), ``lanes``
(the in-process engine and its peers), ``llamacpp`` (llama.cpp's server and client), ``protocol``
(warm-up, interleaving, concurrency), ``tables`` (speedup, per category, sweeps), ``command``
(``eaglebook bench``).
"""
from __future__ import annotations

from .clients import (SERVER_INFO_KEYS, VLLM_SPEC_COUNTERS, InProcessClient, OpenAIClient, SGLangClient,  # noqa: F401
                      parse_generate_response, parse_prometheus, parse_server_info, vllm_accept_length)
from .command import (BenchArgs, format_summary, parse_levels, parse_settings, pick_backend,  # noqa: F401
                      run_benchmark)
from .core import (MODES, BenchError, DraftSetting, Generation, ServerError, hardware_info,  # noqa: F401
                   save_results)
from .lanes import make_inprocess_lanes, resolve_draft  # noqa: F401
from .llamacpp import (LlamaCppClient, LlamaCppConfig, check_gguf_pair, draft_gguf, llama_server_binary,  # noqa: F401
                       llamacpp_command, llamacpp_lanes, target_gguf)
from .protocol import Lane, Recorder, run_interleaved, run_phase, warm_up  # noqa: F401
from .servers import (SGLangConfig, ServerProcess, require_sglang, sglang_command, sglang_env,  # noqa: F401
                      sglang_server)
from .vllm_cpu import VLLMBackend, VLLMClient, VLLMConfig, vllm_command, vllm_env, vllm_installed  # noqa: F401
from .suites import SUITES, Prompt, load_prompts_file, load_suite, render_ids  # noqa: F401
from .tables import concurrency_table, parse_label, summarize, summarize_mode, sweep_table  # noqa: F401
