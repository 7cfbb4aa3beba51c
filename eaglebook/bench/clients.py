"""Clients: one `generate(ids, max_new_tokens)` per backend (SGLang, OpenAI-compatible, in-process),
all answering the same dict, and the parsers for what servers send back."""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from typing import Callable

from .core import BenchError, ServerError
from .servers import ServerProcess


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

class ServerClient:
    """What every client of a server process shares: base URL, name, timeout, the process it talks
    to (for a clear error when it dies) and one httpx session opened by `async with`."""

    def __init__(self, base_url: str, name: str, timeout: float = 600.0, ignore_eos: bool = False,
                 server: ServerProcess | None = None):
        self.base_url, self.name, self.timeout = base_url.rstrip("/"), name, timeout
        self.ignore_eos, self.server = ignore_eos, server
        self._http = None

    async def __aenter__(self):
        import httpx

        self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=10.0), trust_env=False)
        return self

    async def __aexit__(self, *exc):
        await self._http.aclose()


class SGLangClient(ServerClient):
    """SGLang's native `/generate` with `input_ids` (greedy), optionally streamed for TTFT."""

    def __init__(self, base_url: str, name: str = "SGLang server", timeout: float = 600.0, stream: bool = False,
                 ignore_eos: bool = False, server: ServerProcess | None = None):
        super().__init__(base_url, name, timeout, ignore_eos, server)
        self.stream = stream

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
                 per_request_metrics: bool = True, extra_body: dict | None = None):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.root = self.base_url[: -len("/v1")]
        self.name, self.model, self.timeout, self.ignore_eos = name, model, timeout, ignore_eos
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.per_request_metrics = per_request_metrics
        self.extra_body = dict(extra_body or {})  # e.g. vLLM's {"return_token_ids": True}: output ids come back
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
        ttft, text, finish, usage, out_ids = None, [], None, None, None
        extra = {**self.extra_body, **({"ignore_eos": True} if self.ignore_eos else {})} or None
        try:
            stream = await self._oa.completions.create(model=self.model, prompt=list(ids), max_tokens=int(max_new_tokens),
                                                       temperature=0.0, stream=True,
                                                       stream_options={"include_usage": True}, extra_body=extra)
            async for chunk in stream:
                for ch in chunk.choices or []:
                    if ch.text and ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(ch.text or "")
                    if getattr(ch, "token_ids", None) is not None:  # vLLM's return_token_ids: the new ids
                        out_ids = (out_ids or []) + list(ch.token_ids)
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
                "verify_ct": verify or None, "finish_reason": finish, "text": "".join(text), "output_ids": out_ids,
                "latency_s": latency, "ttft_s": ttft}


class InProcessClient:
    """eaglebook's engine (mode "eagle") or its plain greedy baseline (mode "baseline"), in this process.

    `generate_fn(ids, max_new_tokens, seed) -> dict` does the work (`seed`: a sampled request's
    own, None when greedy); `make_inprocess_lanes` builds it on the decode engine. Both modes
    share the target, dtype, threads and forward path.
    """

    def __init__(self, name: str, generate_fn: Callable[[list[int], int, int | None], dict], info: dict | None = None):
        self.name, self._gen, self._info = name, generate_fn, info or {}
        self.server = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def server_info(self) -> dict:
        return dict(self._info)

    async def generate(self, ids: list[int], max_new_tokens: int, seed: int | None = None) -> dict:
        # Synchronous on purpose: timing a CPU decode must not share the cores with anything.
        t0 = time.perf_counter()
        out = self._gen(list(ids), int(max_new_tokens), seed)
        out.setdefault("latency_s", time.perf_counter() - t0)
        out.setdefault("ttft_s", None)
        out.setdefault("prompt_tokens", len(ids))
        return out
