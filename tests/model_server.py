"""A small real HTTP server on 127.0.0.1 that answers like SGLang and an OpenAI-compatible
server, generating with a real model (greedy, one request at a time).

POST /generate        SGLang native: {"input_ids", "sampling_params"} -> {"text", "output_ids", "meta_info"}
POST /v1/completions  OpenAI: {"prompt": [ids], "max_tokens"} -> text only, with usage counts
`fail_first` answers that many requests with HTTP 503 first (to exercise retries);
`with_ids=False` leaves `output_ids` out (an older SGLang), forcing the text path.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class StandInServer:
    def __init__(self, model, tokenizer, fail_first: int = 0, with_ids: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.fail_left, self.with_ids = fail_first, with_ids
        self.lock = threading.Lock()
        self.requests = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def complete(self, ids, max_new_tokens, stops):
        with self.lock, torch.no_grad():
            x = torch.tensor([ids])
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
        new = out[0, len(ids):].tolist()
        for k, t in enumerate(new):
            if t in stops:
                return new[:k + 1], True, t
        return new, False, None

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    fail = server.fail_left > 0
                    server.fail_left -= fail
                if fail:
                    return self._send(503, {"error": "warming up"})
                tok = server.tokenizer
                if self.path == "/generate":
                    sp = req["sampling_params"]
                    ids, stopped, matched = server.complete(req["input_ids"], sp["max_new_tokens"], sp["stop_token_ids"])
                    body_ids = ids[:-1] if stopped else ids  # SGLang reports the matched stop token apart
                    body = {"text": tok.decode(body_ids),
                            "meta_info": {"finish_reason": {"type": "stop", "matched": matched} if stopped
                                          else {"type": "length", "length": len(ids)},
                                          "prompt_tokens": len(req["input_ids"]), "completion_tokens": len(ids)}}
                    if server.with_ids:
                        body["output_ids"] = body_ids
                    return self._send(200, body)
                if self.path == "/v1/completions":
                    stops = req.get("stop_token_ids") or [tok.eos_token_id]
                    ids, stopped, matched = server.complete(req["prompt"], req["max_tokens"], stops)
                    text = tok.decode(ids[:-1] if stopped else ids)
                    return self._send(200, {
                        "id": "cmpl-standin", "object": "text_completion", "created": 0, "model": req["model"],
                        "choices": [{"index": 0, "text": text, "finish_reason": "stop" if stopped else "length",
                                     "logprobs": None, "stop_reason": matched}],
                        "usage": {"prompt_tokens": len(req["prompt"]), "completion_tokens": len(ids),
                                  "total_tokens": len(req["prompt"]) + len(ids)}})
                return self._send(404, {"error": f"no route {self.path}"})

        return Handler
