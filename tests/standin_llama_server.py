"""`llama-server`'s command line in front of tests/standin_server.py: a stand-in binary for the
llamacpp backend. It reads the flags eaglebook passes (-m, -md, --host, --port, --spec-type, ...),
checks that the files it is given exist, and serves /completion, /props and /health with
llama-server's response shapes; a --spec-type lane answers with draft counters.

Two flags of its own shape misbehaviour of the EAGLE-3 lane only (they reach every lane through
`--llamacpp_args`): --standin-eagle-die-after N, --standin-eagle-diverge-at K; a third,
--standin-costs STEP,A,B_VERIFY,B_DRAFT, makes every lane's timings follow a known cost model.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

STANDIN = str(Path(__file__).with_name("standin_server.py"))

ap = argparse.ArgumentParser()
ap.add_argument("-m", required=True)
ap.add_argument("-md", default="")
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--spec-type", default="none")
ap.add_argument("--standin-eagle-die-after", type=int, default=0)
ap.add_argument("--standin-eagle-diverge-at", type=int, default=-1)
ap.add_argument("--standin-costs", default="", help="STEP,A,B_VERIFY,B_DRAFT: ms per greedy token, per pass, per "
                                                   "verified draft token, per token the EAGLE-3 head drafts")
args, _rest = ap.parse_known_args()  # the other llama-server flags (--ctx-size, --threads, ...) change nothing here
for f in (args.m, args.md):
    if f and not os.path.isfile(f):
        sys.exit(f"error: failed to load model '{f}'")
if args.md and args.spec_type != "draft-eagle3":
    sys.exit("error: -md without --spec-type draft-eagle3")
flags = ["--port", str(args.port)]
if args.spec_type != "none":
    flags += ["--speculative", "--accept", "2.0"]
if args.standin_costs:  # the n-gram lanes draft for free: b = B_VERIFY; the EAGLE-3 lane pays B_DRAFT too
    step, a, b_verify, b_draft = (float(x) for x in args.standin_costs.split(","))
    b = b_verify + (b_draft if args.spec_type == "draft-eagle3" else 0.0)
    flags += ["--costs", f"{step},{a},{b}"]
if args.spec_type == "draft-eagle3":
    flags += ["--die-after", str(args.standin_eagle_die_after), "--diverge-at", str(args.standin_eagle_diverge_at)]
os.execv(sys.executable, [sys.executable, STANDIN, *flags])
