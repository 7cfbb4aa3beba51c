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
    regen_conversations: int = field(default=600, metadata={"help": "first-turn prompts answered by the target"})
    regen_max_new_tokens: int = field(default=256, metadata={"help": "greedy answer length limit"})
    regen_batch_size: int = field(default=32, metadata={"help": "prompts per generate() batch"})
    original_conversations: int = field(default=3000, metadata={"help": "ShareGPT conversations kept as written"})
    max_length: int = field(default=768, metadata={"help": "tokens per training sequence"})
    holdout_fraction: float = field(default=0.02, metadata={"help": "share of conversations held out"})
    draft_vocab_size: int = field(default=4096, metadata={"help": "reduced draft vocabulary"})
    ttt_steps: int = field(default=7, metadata={"help": "unrolled draft steps"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training features"})
    batch_size: int = field(default=8, metadata={"help": "sequences per optimizer step"})
    learning_rate: float = field(default=5e-4, metadata={"help": "peak learning rate (cosine decay)"})
    capture_dtype: str = field(default="bfloat16", metadata={"help": "target dtype while capturing"})
    export_dir: str = field(default="", metadata={"help": "where the finished head goes ('' = work_dir/head)"})
    stop_after: str = field(default="", metadata={"help": "stop after this stage (e.g. capture)"})


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
        self.log["stages"][stage] = {"seconds": round(prev.get("seconds", 0) + seconds, 1), **facts}
        self.log_path.write_text(json.dumps(self.log, indent=2, default=str))
        print(f"[{stage}] done in {seconds:.0f} s: {facts}", flush=True)

    def run(self) -> Path | None:
        from . import data, export, hidden_states, regenerate, train, vocab
        from .draft import build_draft
        from .target import end_of_turn_ids, load_target

        a = self.args
        # 1. conversations: deterministic, so recomputed rather than stored
        t0 = time.time()
        convs, report = regenerate.prepare_conversations("sharegpt")
        split = data.split_holdout(convs, a.holdout_fraction)
        train_convs = split["train"]
        n_regen = min(a.regen_conversations, len(train_convs))
        regen_rows = train_convs.select(range(n_regen)).map(
            lambda r: {"messages": r["messages"][: 3 if r["messages"][0]["role"] == "system" else 2]})
        orig_rows = train_convs.select(range(n_regen, min(len(train_convs), n_regen + a.original_conversations)))
        self._done("conversations", time.time() - t0, kept=len(convs), holdout=len(split["holdout"]),
                   regen=len(regen_rows), original=len(orig_rows), skipped=dict(report.skipped))
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


def _cli(args: DefaultHeadArgs) -> int:
    Recipe(args).run()
    return 0


def _register() -> None:
    from .cli import register

    register("default-head", DefaultHeadArgs, _cli)


_register()
