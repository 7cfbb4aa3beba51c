"""A small real HTTP server on 127.0.0.1 that answers with SGLang's, vLLM's and llama-server's response shapes.

Used by tests/test_bench.py in place of a GPU server: a separate process, a real socket,
real JSON and server-sent events. It "generates" deterministic tokens, so tests can check
that the client reads every field where SGLang puts it:

    POST /generate          {"text", "output_ids", "meta_info": {prompt_tokens, completion_tokens,
                             finish_reason: {"type": ...}, e2e_latency, spec_verify_ct, ...}}
    GET  /health            200 once up
    GET  /server_info       flat ServerArgs fields + internal_states + version
    GET  /v1/models, POST /v1/completions (streamed chunks, usage at the end)
    GET  /metrics           vLLM's Prometheus counters (spec decode, per draft position) when --vllm-metrics
    GET  /version           vLLM's {"version": ...}
    `return_token_ids` in a completions request: each streamed choice carries its new `token_ids`
    GET  /metrics           vLLM's Prometheus counters (spec decode) when --vllm-metrics
    POST /completion        llama-server: {"content", "tokens" (with return_tokens), "stop_type",
                             "tokens_predicted", "tokens_evaluated", "timings": {prompt_n, predicted_n,
                             predicted_ms, ..., draft_n, draft_n_accepted (speculative only)}}
    GET  /props             llama-server: model_path, total_slots, build_info, default_generation_settings

Options shape misbehaviour: --die-after N (exit hard after N generations), --delay S,
--spawn-children (a child, a grandchild and a child in its own session that ignores
SIGTERM; their pids go to --pid-file), --health-after S (unhealthy until then; -1 never),
--diverge-at K (llama-server: output token K differs from the plain server's), --costs STEP,A,B
(llama-server: timings built from a known cost per pass and per drafted token).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ARGS = None
STATE = {"served": 0, "drafts": 0, "accepted": 0, "draft_tokens": 0, "per_pos": [], "t0": time.time()}
LOCK = threading.Lock()


def plan(n_prompt: int, max_new: int, ignore_eos: bool) -> tuple[int, int]:
    """(completion_tokens, verify steps) for a request: deterministic, prompt-dependent."""
    n = max_new if ignore_eos else min(max_new, 5 + n_prompt % 11)
    accept = ARGS.accept if ARGS.speculative else 1.0
    return n, max(1, round(n / accept))


def meta(n_prompt: int, n: int, verify: int, max_new: int, finished: bool) -> dict:
    m = {"id": "req-1", "prompt_tokens": n_prompt, "completion_tokens": n, "cached_tokens": 0,
         "finish_reason": ({"type": "length", "length": max_new} if n >= max_new else {"type": "stop", "matched": 2})
         if finished else None}
    if finished:
        m["e2e_latency"] = 0.01
        if ARGS.speculative:
            m.update(spec_verify_ct=verify, spec_accept_length=n / verify, spec_accept_rate=0.5,
                     spec_num_correct_drafts=n - verify, spec_num_proposed_drafts=verify * 7)
    return m


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _json(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _sse_start(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()

    def _sse(self, obj):
        self.wfile.write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())
        self.wfile.flush()

    def do_GET(self):
        if self.path == "/health":
            if ARGS.health_after < 0 or time.time() - STATE["t0"] < ARGS.health_after:
                return self._json({}, 503)
            return self._json({})
        if self.path in ("/server_info", "/get_server_info"):
            info = {"model_path": "stand-in", "dtype": "bfloat16", "tp_size": 1, "context_length": None,
                    "speculative_algorithm": "EAGLE3" if ARGS.speculative else None,
                    "speculative_num_steps": 5 if ARGS.speculative else None,
                    "speculative_eagle_topk": 4 if ARGS.speculative else None,
                    "speculative_num_draft_tokens": 8 if ARGS.speculative else None,
                    "max_total_num_tokens": 100000, "max_req_input_len": 4090,
                    "internal_states": [{"avg_spec_accept_length": ARGS.accept if ARGS.speculative else None,
                                         "last_gen_throughput": 1.0}],
                    "version": "0.5.23"}
            return self._json(info)
        if self.path == "/version":
            return self._json({"version": "0.0.0-stand-in"})
        if self.path == "/props":
            return self._json({"model_path": "/models/stand-in.gguf", "total_slots": 1, "build_info": "b11434-standin",
                               "default_generation_settings": {"n_ctx": 4096, "params": {
                                   "speculative.n_max": 3 if ARGS.speculative else 0, "speculative.p_min": 0.0,
                                   "speculative.types": "draft-eagle3" if ARGS.speculative else "none",
                                   "temperature": 0.8}}})
        if self.path == "/v1/models":
            return self._json({"object": "list", "data": [{"id": "stand-in", "object": "model", "owned_by": "me"}]})
        if self.path == "/metrics" and ARGS.vllm_metrics:
            lab = '{engine="0",model_name="stand-in"}'
            text = "\n".join([
                "# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.",
                "# TYPE vllm:spec_decode_num_drafts_total counter",
                f"vllm:spec_decode_num_drafts_total{lab} {float(STATE['drafts'])}",
                f"vllm:spec_decode_num_draft_tokens_total{lab} {float(STATE['draft_tokens'])}",
                f"vllm:spec_decode_num_accepted_tokens_total{lab} {float(STATE['accepted'])}",
                *[f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",model_name="stand-in",position="{j}"}} '
                  f"{float(v)}" for j, v in enumerate(STATE["per_pos"] or [0] * ARGS.num_spec)],
                f"vllm:num_requests_running{lab} 0.0", ""])
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return self.wfile.write(body)
        self._json({"detail": "Not Found"}, 404)

    def _count(self):
        with LOCK:
            STATE["served"] += 1
            if ARGS.die_after and STATE["served"] > ARGS.die_after:
                os._exit(3)  # a crash: no response, connection dropped

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/generate":
            self._count()
            time.sleep(ARGS.delay)
            ids = req["input_ids"]
            sp = req.get("sampling_params", {})
            max_new = sp.get("max_new_tokens", 128)
            n, verify = plan(len(ids), max_new, sp.get("ignore_eos", False))
            out_ids = [(ids[-1] + i) % 1000 for i in range(n)]
            if not req.get("stream"):
                return self._json({"text": " tok" * n, "output_ids": out_ids,
                                   "meta_info": meta(len(ids), n, verify, max_new, True)})
            self._sse_start()
            for k in range(1, n + 1):
                time.sleep(ARGS.token_delay)
                self._sse({"text": " tok" * k, "output_ids": out_ids[:k],
                           "meta_info": meta(len(ids), k, verify, max_new, k == n)})
            self._sse("[DONE]")
            return
        if self.path == "/completion":
            self._count()
            time.sleep(ARGS.delay)
            ids = req["prompt"]
            max_new = req.get("n_predict", -1)
            n, verify = plan(len(ids), max_new, req.get("ignore_eos", False))
            out_ids = [(ids[-1] + i) % 1000 for i in range(n)]
            if ARGS.speculative and 0 <= ARGS.diverge_at < n:
                out_ids[ARGS.diverge_at] += 1
            timings = {"cache_n": 0, "prompt_n": len(ids), "prompt_ms": 1.0, "predicted_n": n, "predicted_ms": 2.0 * n,
                       "predicted_per_second": 500.0}
            if ARGS.speculative:  # verify target passes: n - verify tokens came from accepted drafts
                timings.update(draft_n=3 * verify, draft_n_accepted=n - verify)
            if ARGS.costs:  # timings from a known cost model (llama.cpp's first token comes with the prompt)
                step, a, b = (float(x) for x in ARGS.costs.split(","))
                timings["predicted_ms"] = step * (n - 1)
                if ARGS.speculative:  # drafts of a prompt-dependent length: passes * a + b per drafted token
                    passes, accepted = verify - 1, n - verify
                    drafted = accepted + (2 + len(ids) % 5) * passes
                    timings.update(draft_n=drafted, predicted_ms=passes * a + b * drafted)
            res = {"index": 0, "content": " tok" * n, "id_slot": 0, "stop": True, "model": "stand-in",
                   "tokens_predicted": n, "tokens_evaluated": len(ids),
                   "stop_type": "limit" if n >= max_new else "eos", "timings": timings}
            res["tokens"] = out_ids if req.get("return_tokens") else []
            return self._json(res)
        if self.path == "/v1/completions":
            self._count()
            time.sleep(ARGS.delay)
            ids = req["prompt"]
            max_new = req.get("max_tokens", 16)
            n, verify = plan(len(ids), max_new, req.get("ignore_eos", False))
            with LOCK:  # what vLLM counts: drafts = verification steps, accepted = extra tokens
                STATE["drafts"] += verify
                STATE["accepted"] += n - verify
                STATE["draft_tokens"] += verify * ARGS.num_spec
                # a chain accepts a prefix: position j counts the steps that accepted more than j
                # drafts (the n - verify accepted tokens spread as evenly as the chain allows)
                per = [0] * ARGS.num_spec
                for step in range(verify):
                    for j in range(min(ARGS.num_spec, (n - verify) // verify + (step < (n - verify) % verify))):
                        per[j] += 1
                STATE["per_pos"] = [a + b for a, b in zip(STATE["per_pos"] or [0] * ARGS.num_spec, per)]
            self._sse_start()
            base = {"id": "cmpl-1", "object": "text_completion", "created": int(time.time()), "model": "stand-in"}
            out_ids = [(ids[-1] + i) % 1000 for i in range(n)]
            for k in range(n):
                time.sleep(ARGS.token_delay)
                fin = ("length" if n >= max_new else "stop") if k == n - 1 else None
                choice = {"index": 0, "text": " tok", "logprobs": None, "finish_reason": fin}
                if req.get("return_token_ids"):
                    choice["token_ids"] = [out_ids[k]]
                self._sse({**base, "choices": [choice], "usage": None})
            self._sse({**base, "choices": [], "usage": {"prompt_tokens": len(ids), "completion_tokens": n,
                                                        "total_tokens": len(ids) + n}})
            self._sse("[DONE]")
            return
        self._json({"detail": "Not Found"}, 404)


def spawn_children(pid_file: str) -> None:
    """Children like SGLang's scheduler/detokenizer: one in our group with a grandchild, and
    one that starts its own session and ignores SIGTERM (only SIGKILL ends it)."""
    sleeper = [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"]
    stubborn = [sys.executable, "-c",
                "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(1)"]
    parent_of_grandchild = [sys.executable, "-c",
                            "import subprocess, sys, time\n"
                            f"p = subprocess.Popen({sleeper!r})\n"
                            f"open({pid_file!r} + '.gc', 'w').write(str(p.pid))\n"
                            "while True: time.sleep(1)"]
    kids = [subprocess.Popen(parent_of_grandchild), subprocess.Popen(stubborn, start_new_session=True)]
    deadline = time.time() + 20
    while not os.path.exists(pid_file + ".gc") and time.time() < deadline:
        time.sleep(0.05)
    pids = [os.getpid()] + [k.pid for k in kids] + [int(open(pid_file + ".gc").read())]
    with open(pid_file + ".tmp", "w") as fh:
        json.dump(pids, fh)
    os.replace(pid_file + ".tmp", pid_file)


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--speculative", action="store_true")
    ap.add_argument("--accept", type=float, default=2.5)
    ap.add_argument("--die-after", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--token-delay", type=float, default=0.0)
    ap.add_argument("--health-after", type=float, default=0.0)
    ap.add_argument("--vllm-metrics", action="store_true")
    ap.add_argument("--num-spec", type=int, default=3, help="vLLM's num_speculative_tokens (per-position counters)")
    ap.add_argument("--diverge-at", type=int, default=-1)
    ap.add_argument("--costs", default="", help="llama-server timings from 'STEP,A,B': a plain lane takes STEP ms "
                                                "per token, a speculative one A ms per pass + B per drafted token")
    ap.add_argument("--spawn-children", action="store_true")
    ap.add_argument("--pid-file", default="")
    ap.add_argument("--ignore-term", action="store_true")
    ARGS = ap.parse_args()
    if ARGS.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if ARGS.spawn_children:
        spawn_children(ARGS.pid_file)
    srv = ThreadingHTTPServer(("127.0.0.1", ARGS.port), Handler)
    srv.daemon_threads = True
    srv.serve_forever()


if __name__ == "__main__":
    main()
