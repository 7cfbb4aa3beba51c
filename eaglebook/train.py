"""Training-time test (TTT): train an EAGLE-3 head on its own multi-step predictions.

At inference the draft runs several steps in a row, each feeding its own output back in.
Training only on the target's features (step 0) leaves the later steps untrained, so
EAGLE-3 unrolls `ttt_steps` steps during training:

    position t, step 0: feature = target's fused aux features at t, token = x_{t+1},
                        teacher = the target's distribution at t+1 (it predicts x_{t+2})
    position t, step k: feature = the draft's own step k-1 output at t, token = x_{t+1+k},
                        teacher = the target's distribution at t+1+k
    rotary position of step k at t: t + k (what the decoder uses for the k-th draft token)

Attention: a step-k query at t sees the true prefix (step-0 keys 0..t) and its own chain
(steps 1..k at index t). We get that pattern from the draft's ordinary forward pass: the
keys of every step are appended to one KV cache, and the mask is [causal | diag | ... | diag].

Loss: soft cross-entropy against the target's distribution restricted to the draft vocab,
on trained tokens (loss mask) whose teacher argmax is in the draft vocab; each step's loss
is the mean over its own valid positions ("per trained token"), and steps are weighted
0.8**k. The teacher is recomputed from the stored final feature through the target's
`lm_head` only (that feature is already normalized): it is the target's own prediction,
not the dataset's text.
"""
from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache

from .draft import Eagle1Draft, Eagle3Draft


# --------------------------------------------------------------------------------------
# The TTT attention pattern
# --------------------------------------------------------------------------------------

def ttt_mask(T: int, step: int, device=None) -> torch.Tensor:
    """[1, 1, T, (step+1)*T] bool mask of step `step`: causal over step 0, diagonal over steps 1..step."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    diag = torch.eye(T, dtype=torch.bool, device=device)
    return torch.cat([causal] + [diag] * step, dim=1)[None, None]


# --------------------------------------------------------------------------------------
# One TTT forward pass (shared by training and evaluation)
# --------------------------------------------------------------------------------------

@dataclass
class TTTStats:
    """Per-step counts over trained positions; summed over batches, then turned into metrics."""

    ttt_steps: int
    trained: torch.Tensor = None  # positions with a trained target token, per step
    correct: torch.Tensor = None  # draft top-1 == teacher top-1, per step
    chain_ok: torch.Tensor = None  # positions where all steps < k were right (denominator of cond acc)
    chain_correct: torch.Tensor = None  # ... and step k right too
    dropped: int = 0  # trained positions (step 0) whose teacher argmax is outside the draft vocab
    loss_steps: torch.Tensor = None  # per-step loss summed over the positions it averaged
    loss_tokens: torch.Tensor = None  # ... and those positions: loss_k = loss_steps / loss_tokens
    batches: int = 0

    COUNTS = ("trained", "correct", "chain_ok", "chain_correct", "loss_steps", "loss_tokens")

    def __post_init__(self):
        z = lambda: torch.zeros(self.ttt_steps, dtype=torch.float64)  # noqa: E731
        for name in self.COUNTS:
            if getattr(self, name) is None:
                setattr(self, name, z())

    def add_loss(self, k: int, loss: torch.Tensor, positions: torch.Tensor) -> None:
        """Record step k's mean loss over `positions` positions (a per-position mean, however batched)."""
        n = positions.sum().item()
        self.loss_steps[k] += loss.item() * n
        self.loss_tokens[k] += n

    def add(self, other: "TTTStats") -> None:
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dropped += other.dropped
        self.batches += other.batches

    def metrics(self, prefix: str = "") -> dict:
        acc = (self.correct / self.trained.clamp(min=1)).tolist()
        cond = (self.chain_correct / self.chain_ok.clamp(min=1)).tolist()
        out = {f"{prefix}acc_{k}": a for k, a in enumerate(acc)}
        out.update({f"{prefix}cond_acc_{k}": c for k, c in enumerate(cond)})
        out.update({f"{prefix}loss_{k}": (self.loss_steps[k] / self.loss_tokens[k].clamp(min=1)).item()
                    for k in range(self.ttt_steps)})
        out[f"{prefix}tau_sim"] = tau_sim(cond)
        t0 = self.trained[0].item()
        out[f"{prefix}dropped_frac"] = self.dropped / t0 if t0 else 0.0
        return out


def tau_sim(cond_acc: list[float]) -> float:
    """Simulated accept length of a greedy chain: 1 + sum_k prod_{i<=k} cond_acc_i."""
    total, run = 1.0, 1.0
    for c in cond_acc:
        run *= c
        total += run
    return total


@torch.no_grad()
def teacher_from_final(final_hidden: torch.Tensor, lm_head_weight: torch.Tensor, draft_ids: torch.Tensor,
                       target_logits=None):
    """The target's next-token prediction at each position, from the stored final feature, through
    `target_logits` (the target's `LogitMap`: softcapping, logit scaling) when given.

    Returns (argmax over the full target vocab [B,T], log-probs over the draft vocab [B,T,Vd]).
    """
    logits = final_hidden.to(lm_head_weight.dtype) @ lm_head_weight.T
    logits = target_logits(logits) if target_logits is not None else logits
    top = logits.argmax(-1)
    return top, torch.log_softmax(logits[..., draft_ids].float(), dim=-1)


def ttt_forward(draft: Eagle3Draft, batch: dict, lm_head_weight: torch.Tensor, ttt_steps: int = 7,
                decay: float = 0.8) -> tuple[torch.Tensor, TTTStats, list[torch.Tensor]]:
    """Unroll `ttt_steps` draft steps over a padded batch; returns (loss, stats, logits per step).

    batch: input_ids [B,T] long, loss_mask [B,T], attention_mask [B,T] (1 = real token),
           aux_hidden [B,T,3H], final_hidden [B,T,H].
    """
    ids, aux, final = batch["input_ids"], batch["aux_hidden"], batch["final_hidden"]
    B, T = ids.shape
    dev = ids.device
    real = batch["attention_mask"].bool()
    trained = batch["loss_mask"].bool() & real
    draft_ids = draft.draft_ids
    teacher_top, teacher_logp = teacher_from_final(final, lm_head_weight, draft_ids, draft.target_logits)
    in_vocab = draft.t2d[teacher_top]
    stats = TTTStats(ttt_steps, batches=1)
    cache = DynamicCache()
    hidden = aux
    chain = torch.ones(B, T, dtype=torch.bool, device=dev)
    pos = torch.arange(T, device=dev)[None].expand(B, T)
    losses, all_logits = [], []
    for k in range(ttt_steps):
        # Step k at index t reads token x_{t+1+k}; it is scored against the teacher at t+1+k
        # on the token x_{t+2+k}. Indices past the end are padded and masked out.
        n = T - 2 - k
        if n <= 0:
            break
        inp = torch.zeros_like(ids)
        inp[:, : T - 1 - k] = ids[:, 1 + k:]
        out = draft(inp, hidden, pos + k, attention_mask=ttt_mask(T, k, dev), past_key_values=cache)
        logits = out.logits.float()
        all_logits.append(out.logits)
        valid = torch.zeros(B, T, dtype=torch.bool, device=dev)
        valid[:, :n] = trained[:, 2 + k:]
        tl = torch.zeros(B, T, teacher_logp.shape[-1], device=dev)
        tl[:, :n] = teacher_logp[:, 1 + k: T - 1]
        ttop = torch.zeros(B, T, dtype=torch.long, device=dev)
        ttop[:, :n] = teacher_top[:, 1 + k: T - 1]
        tin = torch.zeros(B, T, dtype=torch.bool, device=dev)
        tin[:, :n] = in_vocab[:, 1 + k: T - 1]
        use = valid & tin
        ce = -(tl.exp() * torch.log_softmax(logits, -1)).sum(-1)  # soft cross-entropy per position
        loss_k = (ce * use).sum() / use.sum().clamp(min=1)
        losses.append(loss_k * decay ** k)
        with torch.no_grad():
            right = (draft.to_target_ids(logits.argmax(-1)) == ttop) & valid
            stats.trained[k] += valid.sum().item()
            stats.correct[k] += right.sum().item()
            stats.chain_ok[k] += (chain & valid).sum().item()
            stats.chain_correct[k] += (chain & right).sum().item()
            stats.add_loss(k, loss_k, use)
            chain = chain & right
            if k == 0:
                stats.dropped += (valid & ~tin).sum().item()
        hidden = out.hidden  # the draft's own output feeds the next step
    loss = torch.stack(losses).sum() if losses else aux.sum() * 0
    return loss, stats, all_logits


def eagle1_forward(draft: Eagle1Draft, batch: dict, lm_head_weight: torch.Tensor, p_w: float = 0.1,
                   v_w: float = 1.0, noise: float = 0.0) -> tuple[torch.Tensor, TTTStats, list[torch.Tensor]]:
    """EAGLE-1/2 training: regress the target's next final feature and match its distribution.

    Position t reads the final feature f_t and the embedding of x_{t+1}; it predicts f_{t+1}
    (smooth-L1, weight v_w) and, through the target's lm_head, the target's distribution at
    t+1 (soft cross-entropy, weight p_w), on trained tokens x_{t+2}. Both losses send
    gradients into the draft (BaldEagle's detached classification loss trained nothing).
    `noise`: EAGLE-1's feature noise while training: uniform, (rand - 0.5) * noise * 512 / L added
    to the input features, L being each row's own length (real tokens, not the padded batch
    length: a row gets the same noise whatever it is batched with); EAGLE-1 trains with noise 0.2.
    Off in eval mode.
    """
    ids, final = batch["input_ids"], batch["final_hidden"]
    B, T = ids.shape
    dev = ids.device
    real = batch["attention_mask"].bool()
    trained = batch["loss_mask"].bool() & real
    feats = final.to(draft.fc.weight.dtype)
    if noise and draft.training:
        lengths = real.sum(1).clamp(min=1).to(feats.dtype)[:, None, None]  # [B,1,1]
        feats = feats + (torch.rand_like(feats) - 0.5) * (noise * 512 / lengths)
    n = T - 2
    inp = torch.zeros_like(ids)
    inp[:, : T - 1] = ids[:, 1:]
    out = draft(inp, feats, torch.arange(T, device=dev)[None].expand(B, T))
    stats = TTTStats(1, batches=1)
    if n <= 0:
        return out.hidden.sum() * 0, stats, [out.logits]
    valid = trained[:, 2:]
    pred, logits = out.hidden[:, :n].float(), out.logits[:, :n].float()
    goal = final[:, 1: T - 1].float()
    teacher_top, teacher_logp = teacher_from_final(goal, lm_head_weight, draft.draft_ids, draft.target_logits)
    vloss = F.smooth_l1_loss(pred, goal, reduction="none").mean(-1)
    ploss = -(teacher_logp.exp() * torch.log_softmax(logits, -1)).sum(-1)
    denom = valid.sum().clamp(min=1)
    loss = v_w * (vloss * valid).sum() / denom + p_w * (ploss * valid).sum() / denom
    with torch.no_grad():
        right = (logits.argmax(-1) == teacher_top) & valid
        stats.trained[0] += valid.sum().item()
        stats.correct[0] += right.sum().item()
        stats.chain_ok[0] += valid.sum().item()
        stats.chain_correct[0] += right.sum().item()
        stats.add_loss(0, loss, valid)
    return loss, stats, [out.logits]


EAGLE1_FEATURE_NOISE = 0.2  # EAGLE-1's training noise (see eagle1_forward)


def draft_loss(draft, batch: dict, lm_head_weight: torch.Tensor, ttt_steps: int, decay: float,
               feature_noise: float = 0.0):
    """The training loss of either head: TTT for EAGLE-3, feature + token loss for EAGLE-1/2
    (with `feature_noise` on its input features while the head is in training mode)."""
    if isinstance(draft, Eagle1Draft):
        return eagle1_forward(draft, batch, lm_head_weight, noise=feature_noise)
    return ttt_forward(draft, batch, lm_head_weight, ttt_steps, decay)


class DraftLoss(nn.Module):
    """The module the Trainer trains, and so the one DDP/FSDP wrap: its forward runs the whole
    loss (the TTT unroll for EAGLE-3) on one batch.

    Data-parallel training averages gradients inside the *wrapper's* forward/backward: calling the
    bare head (`ddp.module(...)`) would leave every rank training its own copy on its own shard.
    So the unroll lives here, and `EagleTrainer.compute_loss` calls the wrapped module.

    Its state dict is the head's (same keys as before, so checkpoints and `resume` are unchanged).
    The target's lm_head weight is held outside the module state: it is neither trained, saved,
    nor broadcast between ranks (1 GB for Llama-3.1-8B).
    """

    def __init__(self, draft: nn.Module, lm_head_weight: torch.Tensor, ttt_steps: int = 7, decay: float = 0.8,
                 feature_noise: float = 0.0):
        super().__init__()
        self.draft = draft
        self._head = [lm_head_weight.detach().requires_grad_(False)]  # a list: not a parameter or buffer
        self.ttt_steps, self.decay, self.feature_noise = ttt_steps, decay, feature_noise
        self.last_stats: TTTStats | None = None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self._head[0]

    def forward(self, input_ids, loss_mask, attention_mask, final_hidden, aux_hidden=None):
        return self.run(input_ids, loss_mask, attention_mask, final_hidden, aux_hidden)

    def run(self, input_ids, loss_mask, attention_mask, final_hidden, aux_hidden=None):
        """The loss of one batch, as `forward`, but never through a wrapper patched onto `forward`
        (under mixed precision accelerate patches bf16 autocast into the prepared module's forward)."""
        batch = {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask,
                 "final_hidden": final_hidden}
        if aux_hidden is not None:
            batch["aux_hidden"] = aux_hidden
        head = self._head[0]
        if head.device != final_hidden.device:
            head = self._head[0] = head.to(final_hidden.device)  # moved once, then kept there
        loss, stats, logits = draft_loss(self.draft, batch, head, self.ttt_steps, self.decay, self.feature_noise)
        self.last_stats = stats
        return {"loss": loss, "logits": logits}

    # the head's own keys in checkpoints
    def state_dict(self, *args, **kwargs):
        return self.draft.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.draft.load_state_dict(state_dict, strict=strict, assign=assign)


def _all_reduce_stats(stats: TTTStats) -> TTTStats:
    """Sum per-rank evaluation counts over all ranks (a no-op in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    names = TTTStats.COUNTS
    flat = torch.cat([getattr(stats, n) for n in names] + [torch.tensor([stats.dropped, stats.batches],
                                                                       dtype=torch.float64)])
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = flat.to(dev)
    dist.all_reduce(flat)
    flat = flat.cpu()
    K = stats.ttt_steps
    out = TTTStats(K, **{n: flat[i * K:(i + 1) * K].clone() for i, n in enumerate(names)})
    out.dropped, out.batches = int(flat[-2]), int(flat[-1])
    return out


def weights_digest(draft: nn.Module) -> str:
    """sha256 of the head's trainable weights (names, shapes and float32 bytes): equal iff bitwise equal."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(draft.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------

def collate(rows: list[dict], max_length: int | None = None) -> dict:
    """Right-pad per-sequence feature dicts into a batch (padding is masked everywhere)."""
    lens = [min(len(r["input_ids"]), max_length or 10 ** 9) for r in rows]
    T = max(lens)
    B = len(rows)
    out = {
        "input_ids": torch.zeros(B, T, dtype=torch.long),
        "loss_mask": torch.zeros(B, T, dtype=torch.long),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
    }
    feats = [k for k in ("aux_hidden", "final_hidden") if k in rows[0]]  # EAGLE-1/2 needs no aux
    for k in feats:
        out[k] = torch.zeros(B, T, rows[0][k].shape[-1], dtype=rows[0][k].dtype)
    for i, (r, n) in enumerate(zip(rows, lens)):
        out["input_ids"][i, :n] = torch.as_tensor(r["input_ids"][:n])
        out["loss_mask"][i, :n] = torch.as_tensor(r["loss_mask"][:n])
        out["attention_mask"][i, :n] = 1
        for k in feats:
            out[k][i, :n] = torch.as_tensor(r[k][:n])
    return out


# --------------------------------------------------------------------------------------
# The HF Trainer, taught TTT
# --------------------------------------------------------------------------------------

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

# Profiles: the same code on a laptop CPU, a 24 GB RTX 3090, or a multi-GPU node.
PROFILES = {
    # SmolLM2-135M on 2 CPU cores: short sequences, a few minutes of steps.
    "cpu": dict(ttt_steps=7, max_length=512, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                learning_rate=5e-4, warmup_steps=0.03, optim="adamw_torch"),
    # Llama-3.1-8B features on a 24 GB GPU: batch 1 + accumulation keeps the 7 unrolled
    # vocab-sized logits within memory; 8-bit Adam (bitsandbytes) halves optimizer state.
    "rtx3090": dict(ttt_steps=7, max_length=2048, per_device_train_batch_size=1, gradient_accumulation_steps=16,
                    learning_rate=1e-4, warmup_steps=0.015, optim="adamw_bnb_8bit", max_grad_norm=0.5),
    # Many GPUs through accelerate/torchrun: the SpecForge-style recipe.
    "full": dict(ttt_steps=7, max_length=4096, per_device_train_batch_size=1, gradient_accumulation_steps=4,
                 learning_rate=1e-4, warmup_steps=0.015, optim="adamw_torch_fused", max_grad_norm=0.5),
}


class CSVLogger(TrainerCallback):
    """Every log line of the Trainer (loss, per-step accuracies, eval metrics) into one CSV."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.rows.append({"step": state.global_step, "epoch": state.epoch, **logs})
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume keep the earlier rows, so one CSV holds the whole curve.
        if self.path.is_file() and not self.rows:
            with open(self.path) as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= state.global_step]


class EagleTrainer(Trainer):
    """`transformers.Trainer` whose loss is EAGLE-3 TTT against the target's own distribution.

    Pass the head as `model`; the Trainer trains a `DraftLoss` around it, whose forward runs the
    whole unroll, so under torchrun/accelerate DDP syncs the gradients (the head itself is
    `trainer.draft`, trained in place). Everything else (accumulation, bf16, checkpoints, resume,
    logging, multi-GPU) is the Trainer's own. EAGLE-1/2 heads train with EAGLE-1's feature noise.
    """

    def __init__(self, *args, lm_head_weight: torch.Tensor, ttt_steps: int = 7, decay: float = 0.8,
                 feature_noise: float | None = None, max_length: int | None = None, **kw):
        # `max_length`: sequences are cut to it in training and evaluation batches alike
        kw.setdefault("data_collator", functools.partial(collate, max_length=max_length))
        args = list(args)
        model = kw.pop("model") if "model" in kw else (args.pop(0) if args else None)
        if model is None:
            raise ValueError("EagleTrainer needs the draft head as model=")
        if isinstance(model, DraftLoss):
            model = model.draft
        if isinstance(model, Eagle1Draft):
            ttt_steps = 1  # EAGLE-1/2 trains one step (no TTT unroll)
            noise = EAGLE1_FEATURE_NOISE if feature_noise is None else feature_noise
        else:
            noise = 0.0
        check_feature_layers(model, kw.get("train_dataset"), kw.get("eval_dataset"))
        super().__init__(DraftLoss(model, lm_head_weight, ttt_steps, decay, noise), *args, **kw)
        self.ttt_steps = ttt_steps
        self.decay = decay
        self._running = TTTStats(self.ttt_steps)

    @property
    def draft(self) -> nn.Module:
        """The head being trained (the same object that was passed in as `model`)."""
        return self._loss_module().draft

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self._loss_module().lm_head_weight

    def _loss_module(self) -> DraftLoss:
        return self.accelerator.unwrap_model(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # `model` is what the Trainer wrapped (DDP/FSDP/...): calling it is what syncs gradients.
        out = model(**{k: v for k, v in inputs.items() if k != "seq_id"})
        self._running.add(self._loss_module().last_stats)
        return (out["loss"], out) if return_outputs else out["loss"]

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._running.batches:
            logs.update({k: round(v, 4) for k, v in self._running.metrics("train_").items()})
            self._running = TTTStats(self.ttt_steps)
        super().log(logs, *args, **kwargs)

    def eval_shard_loader(self, eval_dataset=None) -> torch.utils.data.DataLoader:
        """This rank's share of the evaluation set: sequences rank, rank + W, rank + 2W, ... of W ranks,
        so over all ranks every sequence is evaluated exactly once.

        Not the Trainer's own eval loader: accelerate evens out the ranks' batches by repeating
        sequences from the start of the set, which is harmless for a mean loss but counts those
        sequences twice in the summed accuracy counts. Evaluation runs the bare loss module (no
        collective inside the forward), so ranks may hold different numbers of batches.
        """
        ds = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(ds, str):
            ds = self.eval_dataset[ds]
        if ds is None:
            raise ValueError("evaluation needs an eval_dataset (EagleTrainer(eval_dataset=...) or evaluate(...))")
        rank, world = self.args.process_index, self.args.world_size
        if isinstance(ds, torch.utils.data.IterableDataset):
            ds = _EveryNth(ds, rank, world)
        elif world > 1:
            ds = torch.utils.data.Subset(ds, range(rank, len(ds), world))
        return torch.utils.data.DataLoader(ds, batch_size=self.args.eval_batch_size, collate_fn=self.data_collator,
                                           num_workers=self.args.dataloader_num_workers,
                                           pin_memory=self.args.dataloader_pin_memory and self.args.device.type == "cuda")

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Per-step accuracy, conditional accuracy, loss and tau_sim on held-out data: each rank
        evaluates its own share (`eval_shard_loader`) and the counts are summed over ranks, so the
        metrics are those of one process evaluating the whole set.

        The head runs in its own dtype, without the training's mixed-precision autocast: the metrics
        are those of the weights as saved, the same on a machine with native bfloat16 as on one
        without, and equal to `ttt_forward` over the same batches (`collate` at the same max_length).
        """
        loader = self.eval_shard_loader(eval_dataset)
        module = self._loss_module()
        was_training = module.training
        module.eval()
        stats = TTTStats(self.ttt_steps)
        for batch in loader:  # noqa: B007
            batch = self._prepare_inputs(batch)
            with torch.autocast(self.args.device.type, enabled=False):
                module.run(**{k: v for k, v in batch.items() if k != "seq_id"})
            stats.add(module.last_stats)
        module.train(was_training)
        stats = _all_reduce_stats(stats)
        metrics = stats.metrics(f"{metric_key_prefix}_")
        metrics[f"{metric_key_prefix}_loss"] = sum(metrics[f"{metric_key_prefix}_loss_{k}"] * self.decay ** k
                                                   for k in range(self.ttt_steps))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class _EveryNth(torch.utils.data.IterableDataset):
    """Items rank, rank + world, ... of an iterable dataset (a rank's share, each item once)."""

    def __init__(self, dataset, rank: int, world: int):
        self.dataset, self.rank, self.world = dataset, rank, world

    def __iter__(self):
        for i, item in enumerate(self.dataset):
            if i % self.world == self.rank:
                yield item


def check_feature_layers(draft, *datasets) -> None:
    """Refuse features captured at other layers than the head reads (EAGLE-3): a head trained on
    them would be served with other features than it learned from, silently."""
    if isinstance(draft, Eagle1Draft) or not hasattr(draft, "config"):
        return
    from .export import draft_aux_layers

    want = draft_aux_layers(draft.config)["hf"]
    for ds in datasets:
        while isinstance(ds, torch.utils.data.Subset):
            ds = ds.dataset
        rec = getattr(ds, "aux_layers", None)  # FeatureDataset / OnlineFeatures record them
        have = rec.get("hf") if isinstance(rec, dict) else (list(rec) if rec is not None else None)
        if have is not None and want is not None and list(have) != list(want):
            from .draft import DraftError

            raise DraftError(f"the features were captured at aux layers HF {list(have)}, but the head reads HF "
                             f"{list(want)}: build the head with build_draft(..., aux_layers={tuple(have)}) "
                             "(eaglebook train does this from the store), or capture the head's layers")


def training_arguments(output_dir: str, profile: str = "cpu", **overrides) -> tuple[TrainingArguments, int, int]:
    """TrainingArguments for a profile, plus (ttt_steps, max_length). Overrides win."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    p = {**PROFILES[profile], **overrides}
    ttt_steps, max_length = p.pop("ttt_steps"), p.pop("max_length")
    from .device import native_bf16, pick_device

    dev = pick_device(p.pop("device", None))
    check_optimizer(p.get("optim", "adamw_torch"), profile)
    p.setdefault("bf16", native_bf16(dev))
    p.setdefault("logging_steps", 10)
    p.setdefault("save_strategy", "steps")
    p.setdefault("save_steps", 200)
    p.setdefault("save_total_limit", 2)
    p.setdefault("lr_scheduler_type", "cosine")
    p.setdefault("weight_decay", 0.0)
    p.setdefault("report_to", _default_reporters())
    p.setdefault("dataloader_num_workers", 0)
    p.setdefault("seed", 0)
    p.setdefault("use_cpu", dev.type == "cpu")
    args = TrainingArguments(output_dir=output_dir, remove_unused_columns=False, **p)
    return args, ttt_steps, max_length


def check_optimizer(optim: str, profile: str = "") -> None:
    """Refuse, with the fix, an optimizer whose package is not installed (8-bit Adam needs bitsandbytes)."""
    import importlib.util

    if "bnb" in optim and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"optim {optim!r}{f' (profile {profile!r})' if profile else ''} is bitsandbytes' 8-bit Adam, "
                         "which is not installed: pip install 'eaglebook[rtx3090]' (needs a CUDA GPU), or pass "
                         "optim='adamw_torch' (4x the optimizer memory; see plan_training_memory)")


# Optimizer state per trainable parameter: two float32 moments, or two 8-bit ones (+ block scales).
OPTIMIZER_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "adamw_bnb_8bit": 2}


def draft_parameter_count(config, draft_vocab_size: int) -> int:
    """Trainable parameters of an EAGLE-3 head for a Llama-shaped target config (dict or config):
    fc (3H -> H), one decoder layer whose q/k/v read 2H, three norms, the final norm, lm_head (Vd x H)."""
    from .hidden_states import _cfg

    c = _cfg(config)
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    layer = 2 * h * q + 2 * (2 * h * kv) + q * h + 3 * h * i + 3 * h
    return 3 * h * h + layer + h + draft_vocab_size * h


def ttt_activation_bytes(config, max_length: int = 2048, batch_size: int = 1, ttt_steps: int = 7,
                         draft_vocab_size: int = 32000) -> dict[str, int]:
    """Bytes the TTT unroll of an EAGLE-3 head (float32 weights, bfloat16 autocast) keeps for the
    backward pass, by kind, for a batch of `batch_size` x `max_length` tokens. Per token, per step k:

    - decoder layer: the inputs autocast casts to bfloat16 for q/k/v (2H each), gate/up and lm_head
      (H each) and down (I); six float32 H-wide tensors of the RMSNorms (the residual stream is
      float32); gate, act(gate) and up outputs (I each, bfloat16); rotary cos/sin (2 x head_dim,
      float32), attention log-sum-exp (heads x 4 B), norm scales and the step's loss mask:
      42H + 8I + 8 head_dim + 4 heads + 13 B; the first two steps keep 4H B more (step 0 fc's 3H-wide
      bfloat16 input, step 1 one more float32 feature), step 0's cos/sin are bfloat16 (4 head_dim B less);
    - attention: the query and the output (q wide, bfloat16) and the keys and values *expanded to every
      query head* (repeat_kv before SDPA), over the k+1 blocks of keys step k attends: 4q(k+2) B,
      2q K(K+3) over the steps. With a single K/V head the expansion is a free view where no cast
      follows: values (bfloat16 already) and step 0's keys stay kv wide (the later keys, float32 from
      the float32 rotary, are cast to a full-width bfloat16 copy);
    - attention mask: step k's additive bfloat16 mask, T x (k+1)T per batch (shared by its rows),
      K(K+1) T^2 over the steps;
    - draft logits: the float32 log-softmax and the teacher's probabilities, Vd x 8 B.
    """
    from .hidden_states import _cfg

    c = _cfg(config)
    h, i, hd, heads = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["num_attention_heads"]
    q, kv = heads * hd, c["num_key_value_heads"] * hd
    K, T, tokens = ttt_steps, max_length, max_length * batch_size
    layer = K * (42 * h + 8 * i + 8 * hd + 4 * heads + 13) + 4 * h * min(K, 2) - 4 * hd
    blocks = K * (K + 1) // 2  # key blocks attended, summed over the steps
    if c["num_key_value_heads"] == 1:
        keys, values = q * (blocks - 1) + kv, kv * blocks
    else:
        keys = values = q * blocks
    return {"decoder layer": tokens * layer,
            "attention (query, output, K/V expanded to all heads)": tokens * 2 * (2 * q * K + keys + values),
            "attention masks": K * (K + 1) * T * T,
            "draft logits (log-softmax, teacher probs)": tokens * K * draft_vocab_size * 8}


def plan_training_memory(config=None, gpu_gib: float = 24.0, max_length: int = 2048, batch_size: int = 1,
                         ttt_steps: int = 7, draft_vocab_size: int = 32000, optim: str = "adamw_bnb_8bit",
                         target_load: str = "head", target_dtype_bytes: int = 2, reserve_gib: float = 2.0) -> dict:
    """What TTT training holds on one GPU at its peak, term by term with the arithmetic, and whether it fits.

    target_load "head": what `eaglebook train` loads (`load_target_head`): the target's embedding and
    lm_head only, in `target_dtype_bytes`; "full": the whole target in float32 (the old path, for
    comparison). The head trains in float32 under bf16 autocast (the Trainer's mixed precision):
    weights, gradients (kept across accumulated micro-batches) and optimizer state per trainable
    parameter, its frozen float32 copy of the embedding, and autocast's bfloat16 copy of every
    linear weight (cached for the whole forward pass).

    Activations peak at the end of the forward pass: what the unroll saves for backward
    (`ttt_activation_bytes`: the decoder layer per step, the attention's query/output and the K/V
    expanded to all heads, growing with each step, the masks, the log-probs), the float32 batch of
    features (4H per token), the bf16 draft logits of every step that the forward returns, and then
    the larger of: the float32 copies the mixed-precision wrapper makes of those returned logits
    (Vd x 4 B per token and step), or the last step's float32 temporaries, teacher log-probs and the
    float32 KV cache. The teacher's full-vocabulary logits (V x 2 B per token) come and go before
    the unroll, below that peak.

    `reserve_gib` covers what no tensor term counts: the CUDA context, kernel workspaces and the
    caching allocator's slack as the unroll's tensors grow step by step. The tensor terms were checked
    against the CPU allocator's peak of a real training step (tests/test_train_memory.py), and the total
    against a run measured on one H200 at the Llama-3.1-8B shape, rtx3090 profile: 21.85 GiB 8-bit Adam,
    24.20 GiB AdamW. The tensor terms give 19.99 and 22.36 GiB there; the differences, 1.86 and
    1.84 GiB, the same for both optimizers, are what the 2 GiB default reserve stands for.
    """
    from .hidden_states import GIB, LLAMA_3_1_8B, _cfg, param_count

    c = _cfg(config or LLAMA_3_1_8B)
    if optim not in OPTIMIZER_BYTES:
        raise ValueError(f"optim {optim!r}: one of {sorted(OPTIMIZER_BYTES)}")
    if target_load not in ("head", "full"):
        raise ValueError("target_load is 'head' (embedding + lm_head) or 'full' (the whole target, float32)")
    h, v, K, Vd = c["hidden_size"], c["vocab_size"], ttt_steps, draft_vocab_size
    kv = c["num_key_value_heads"] * c["head_dim"]
    P = draft_parameter_count(c, Vd)
    linear = P - 4 * h  # all but the four RMSNorm weights go through autocast's bfloat16 cast
    tied = bool(c.get("tie_word_embeddings"))
    terms = {}
    if target_load == "head":
        n = v * h * (1 if tied else 2)
        terms["target embedding + lm_head"] = (n * target_dtype_bytes,
                                               f"{'1' if tied else '2'} x {v:,} x {h} x {target_dtype_bytes} B")
    else:
        n = param_count(c)
        terms["whole target (float32)"] = (n * 4, f"{n:,} params x 4 B")
    terms["head weights (float32)"] = (4 * P, f"{P:,} trainable x 4 B")
    terms["head gradients (float32)"] = (4 * P, f"{P:,} x 4 B")
    ob = OPTIMIZER_BYTES[optim]
    terms[f"optimizer state ({optim})"] = (ob * P, f"{P:,} x {ob} B")
    terms["head's frozen embedding (float32)"] = (4 * v * h, f"{v:,} x {h} x 4 B")
    terms["autocast bfloat16 weight copies"] = (2 * linear, f"{linear:,} linear weights x 2 B")
    tokens = max_length * batch_size
    saved = ttt_activation_bytes(c, max_length, batch_size, K, Vd)
    for name, b in saved.items():
        why = (f"sum over steps k < {K} of {max_length:,} x (k+1) x {max_length:,} x 2 B" if name == "attention masks"
               else f"{tokens:,} tokens x {b / tokens / 1024:,.1f} KiB ({K} steps)")
        terms[f"saved: {name}"] = (b, why)
    terms["features (float32 batch)"] = (tokens * 16 * h, f"{tokens:,} x 4H x 4 B")
    terms["draft logits returned (bfloat16)"] = (tokens * K * Vd * 2, f"{tokens:,} x {K} steps x {Vd:,} x 2 B")
    cast, temps = tokens * K * Vd * 4, tokens * (16 * Vd + 8 * K * kv)
    if cast >= temps:
        terms["float32 copies of the returned logits"] = (cast, f"{tokens:,} x {K} steps x {Vd:,} x 4 B")
    else:
        terms["last step's float32 logits, teacher log-probs, KV cache"] = (
            temps, f"{tokens:,} x ({Vd:,} x 16 B + {K} x {kv} x 8 B)")
    peak = sum(b for b, _ in terms.values())
    terms["CUDA context, workspaces, allocator slack"] = (reserve_gib * GIB, f"{reserve_gib} GiB")
    total = peak + reserve_gib * GIB
    lines = [f"{k}: {why} = {b / GIB:.2f} GiB" for k, (b, why) in terms.items()]
    fits = total <= gpu_gib * GIB
    lines.append(f"total {total / GIB:.2f} GiB of {gpu_gib} GiB: "
                 + (f"fits, {gpu_gib - total / GIB:.2f} GiB to spare" if fits else "does NOT fit"))
    return {"model": c.get("name", "target"), "gpu_gib": gpu_gib, "trainable_params": P,
            "terms_gib": {k: b / GIB for k, (b, _) in terms.items()}, "peak_allocated_gib": peak / GIB,
            "total_gib": total / GIB, "headroom_gib": gpu_gib - total / GIB, "fits": fits, "arithmetic": lines}


def _default_reporters() -> list[str]:
    try:
        import tensorboard  # noqa: F401
        return ["tensorboard"]
    except ImportError:
        return []


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder the Trainer wrote, if any (what a resume starts from)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None


def train_draft(draft: Eagle3Draft, lm_head_weight: torch.Tensor, train_dataset, eval_dataset=None,
                output_dir: str = "runs/train", profile: str = "cpu", resume: bool = True,
                callbacks: list | None = None, **overrides) -> EagleTrainer:
    """Train `draft` with TTT; resumes from the last checkpoint in `output_dir` when there is one.

    Logs go to TensorBoard (when installed) and to `{output_dir}/log.csv`; pass
    `report_to=["wandb"]` to add Weights & Biases.
    """
    args, ttt_steps, max_length = training_arguments(output_dir, profile, **overrides)
    trainer = EagleTrainer(model=draft, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                           max_length=max_length, lm_head_weight=lm_head_weight,
                           ttt_steps=ttt_steps, callbacks=[CSVLogger(Path(output_dir) / "log.csv"), *(callbacks or [])])
    ckpt = last_checkpoint(output_dir) if resume else None
    if ckpt:
        print(f"Resuming from {ckpt}")
    trainer.train(resume_from_checkpoint=ckpt)
    return trainer


# --------------------------------------------------------------------------------------
# `eaglebook train`
# --------------------------------------------------------------------------------------

@dataclass
class TrainArgs:
    """Train a draft head on stored features (from `eaglebook capture`); resumes if interrupted."""

    features: str = field(default="", metadata={"help": "feature folder written by `eaglebook capture`"})
    output_dir: str = field(default="runs/train", metadata={"help": "checkpoints, logs and the final head"})
    target: str = field(default="smollm2-135m", metadata={"help": "the target the features came from"})
    profile: str = field(default="cpu", metadata={"help": "cpu | rtx3090 | full"})
    head: str = field(default="eagle3", metadata={"help": "eagle3 (TTT) or eagle1 (EAGLE-1/2)"})
    vocab_map: str = field(default="", metadata={"help": "d2t/t2d file from notebook 01 ('' = count the features)"})
    draft_vocab_size: int = field(default=8192, metadata={"help": "reduced vocabulary when counting (eagle3)"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    ttt_steps: int = field(default=0, metadata={"help": "unrolled steps (0 = the profile's)"})
    learning_rate: float = field(default=0.0, metadata={"help": "peak learning rate (0 = the profile's)"})
    batch_size: int = field(default=0, metadata={"help": "sequences per device step (0 = the profile's)"})
    gradient_accumulation_steps: int = field(default=0, metadata={"help": "micro-batches per optimizer step "
                                                                          "(0 = the profile's)"})
    eval_fraction: float = field(default=0.02, metadata={"help": "held-out share of sequences"})
    init_lm_head: bool = field(default=True, metadata={"help": "start lm_head from the target's rows"})
    report_to: str = field(default="", metadata={"help": "extra loggers, e.g. wandb"})


def _train_cli(a: TrainArgs) -> int:
    """One process, or one rank of `torchrun --nproc_per_node W -m eaglebook.cli train ...`
    (the Trainer syncs gradients across ranks; rank 0 saves the head)."""
    from transformers import set_seed

    from . import export, vocab
    from .device import pick_device
    from .draft import build_draft, build_eagle1_draft
    from .cli import UserError
    from .hidden_states import FeatureDataset, dist_env, read_index
    from .target import end_of_turn_ids, load_target_head

    if not a.features:
        raise UserError("--features is required (a folder written by `eaglebook capture`)")
    read_index(a.features)  # a missing or unfinished feature folder fails here, before the model loads
    rank, world, local = dist_env()
    device = f"cuda:{local}" if torch.cuda.is_available() else None
    # Only what training reads: config, embedding, lm_head, provenance (no decoder layers).
    model, tok = load_target_head(a.target, dtype="float32" if pick_device(device).type == "cpu" else "auto",
                                  device=device, verbose=rank == 0)
    feats = FeatureDataset(a.features, expect=(model, tok))
    n = len(feats)
    held = [i for i in range(n) if i < max(1, int(n * a.eval_fraction))]
    trn = [i for i in range(len(held), n)]
    set_seed(0)  # the same initial head on every rank and in every run
    if a.head == "eagle1":
        draft = build_eagle1_draft(model, dtype=torch.float32)
    else:
        if a.vocab_map:
            d2t, t2d, _ = vocab.load_vocab_map(a.vocab_map)
        else:
            counts = torch.zeros(model.config.vocab_size, dtype=torch.int64)
            for i in trn:
                it = feats[i]
                counts += torch.bincount(it["input_ids"][it["loss_mask"].bool()], minlength=counts.numel())
            d2t, t2d = vocab.build_vocab_map(counts, a.draft_vocab_size,
                                             always_keep=end_of_turn_ids(tok, model.generation_config))
        # the head reads exactly the layers the features were captured at (pinned in its exports)
        draft = build_draft(model, d2t, t2d, aux_layers=tuple(feats.aux_layers["hf"]), init_lm_head=a.init_lm_head,
                            dtype=torch.float32)
    over = {k: v for k, v in dict(ttt_steps=a.ttt_steps, learning_rate=a.learning_rate,
                                   per_device_train_batch_size=a.batch_size,
                                   gradient_accumulation_steps=a.gradient_accumulation_steps).items() if v}
    if a.report_to:
        over["report_to"] = _default_reporters() + a.report_to.split(",")
    trainer = train_draft(draft, model.get_output_embeddings().weight, torch.utils.data.Subset(feats, trn),
                          torch.utils.data.Subset(feats, held), output_dir=a.output_dir, profile=a.profile,
                          max_steps=a.max_steps, eval_strategy="steps", eval_steps=max(1, a.max_steps // 10), **over)
    metrics = trainer.evaluate()
    print(f"rank {rank}/{world}: head weights sha256 {weights_digest(draft)}", flush=True)
    digest = check_ranks_agree(draft)
    if rank == 0:
        print({k: round(v, 4) for k, v in metrics.items() if k.startswith(("eval_acc", "eval_tau"))})
        if world > 1:
            print(f"the head is identical on all {world} ranks (sha256 {digest})")
        path = export.save_draft(draft, Path(a.output_dir) / "draft",
                                 export.head_provenance(model, tok, vocab_source=a.vocab_map or a.features))
        print(f"head saved to {path}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # what the Trainer's launch opened: closed before the process exits
    return 0


def check_ranks_agree(draft: nn.Module) -> str:
    """The head's `weights_digest`, checked equal on every rank (DDP keeps them bitwise equal);
    raises naming the ranks that differ, instead of saving a head only rank 0 trained."""
    import torch.distributed as dist

    digest = weights_digest(draft)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, digest)
        if len(set(every)) != 1:
            raise RuntimeError(f"the ranks hold different heads after training (sha256 per rank: {every}): "
                               "gradients were not synchronized")
    return digest


def _register() -> None:
    from .cli import register

    register("train", TrainArgs, _train_cli)


_register()
