"""The target's hidden states: capture them, store them, read them back, and count their cost.

EAGLE trains its draft on the target's internal features:
- EAGLE-3 fuses three *auxiliary* layers (low, mid, high), `aux_hidden` [T, 3H];
- the *final* feature `hidden_states[N]` (after the final norm) is EAGLE-1/2's input and the
  teacher: the target's next-token logits are `lm_head(final_hidden)`, no second norm.

Indices follow `transformers`' `output_hidden_states` (docs/stages.md § 2): `hidden_states[j]`
is the input of decoder layer j (= output of layer j-1), `hidden_states[0]` the embedding
output, `hidden_states[N]` the final-normed state. SGLang/SpecForge number the same tensors
by the layer that *produced* them: SGLang id = HF index - 1. Both conventions are recorded.

Capture runs ONE forward of the target's base model per batch (no lm_head: the 49k-128k
vocab projection is the costliest matmul and is not needed) with forward pre-hooks on just
the aux layers. `output_hidden_states` stays the test oracle.

Storage: sharded safetensors files (`shard-r{rank}-{k}.safetensors`) plus one `index.json`
holding provenance (docs/stages.md § 7), sizes and hashes. Shards are written atomically
(temporary file + `os.replace`); each rank records its finished shards in its own
`index-rank{r}-of-{W}.json`, so a killed run resumes at the first unfinished shard and a
truncated or corrupt shard is found and regenerated. `FeatureDataset` reads the shards;
`OnlineFeatures` computes the same items on the fly (no disk).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .target import file_sha256

INDEX_NAME = "index.json"
FORMAT = "eaglebook-features"
FORMAT_VERSION = 1
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
STORAGE_DTYPES = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
    "fp8-token": FP8_DTYPE, "fp8-channel": FP8_DTYPE,
}
_STORAGE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "fp8-token"}


class FeatureStoreError(RuntimeError):
    """A feature store that is missing, incomplete, corrupt or belongs to another target."""


# --------------------------------------------------------------------------------------
# 1. Which layers: the EAGLE-3 default and the two numbering conventions
# --------------------------------------------------------------------------------------

def default_aux_layers(num_hidden_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's default auxiliary layers in HF indices: (2, N//2, N-3), low/mid/high.

    The same physical tensors as SGLang's default [1, N//2-1, N-4], vLLM's and official EAGLE's.
    """
    n = int(num_hidden_layers)
    if n < 7:
        raise ValueError(f"a target with {n} decoder layers has no three distinct EAGLE-3 aux layers "
                         "(2, N//2, N-3); it needs at least 7 layers (tiny test models use 8)")
    return (2, n // 2, n - 3)


def hf_to_sglang(hf_layers: Iterable[int], num_hidden_layers: int | None = None) -> list[int]:
    """HF/vLLM index (input of layer j) -> SGLang/SpecForge id (output of layer j-1): j - 1."""
    out = []
    for j in hf_layers:
        j = int(j)
        if j < 1:
            raise ValueError(f"HF index {j} is the embedding output; SGLang has no layer id for it")
        if num_hidden_layers is not None and j >= num_hidden_layers:
            raise ValueError(f"HF index {j} is the final *normed* state (N={num_hidden_layers}); SGLang id "
                             f"{j - 1} would be the un-normed output of the last layer, a different tensor")
        out.append(j - 1)
    return out


def sglang_to_hf(sglang_ids: Iterable[int], num_hidden_layers: int | None = None) -> list[int]:
    """SGLang/SpecForge id (output of layer i) -> HF/vLLM index (input of layer i+1): i + 1."""
    out = []
    for i in sglang_ids:
        i = int(i)
        if i < 0 or (num_hidden_layers is not None and i > num_hidden_layers - 2):
            raise ValueError(f"SGLang layer id {i} is out of range for a target with {num_hidden_layers} layers "
                             f"(0..{'N-2' if num_hidden_layers is None else num_hidden_layers - 2} map to HF indices)")
        out.append(i + 1)
    return out


FULL_ATTENTION = "full_attention"


def layer_types_of(config) -> list[str] | None:
    """The target's per-layer attention kinds (`config.layer_types` in transformers, e.g.
    "sliding_attention" / "full_attention"), or None for a model whose layers are all alike."""
    if config is None:
        return None
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(tc, "layer_types", None)
    if not types or all(t == FULL_ATTENTION for t in types):
        return None
    return list(types)


def explain_aux_layers(num_hidden_layers: int, layer_types: Sequence[str] | None = None) -> dict:
    """The default aux layers for a target, and why: {"hf", "sglang", "engine_default_hf", "reason",
    "layer_types" (of the layers whose outputs are captured)}.

    Uniform models: EAGLE-3's (2, N//2, N-3). Hybrid-attention models (sliding-window and
    full-attention layers interleaved, e.g. OLMo-3, Gemma-3): each captured state should be the
    output of a *full-attention* layer, since a sliding-window layer's output has only seen a
    window of the prefix. HF index j is the output of layer j-1 (SGLang id j-1), so for each of the
    low/mid/high SGLang ids [1, N//2-1, N-4] we take the nearest full-attention layer i (i <= N-2,
    ties to the lower layer, each used once) and capture HF index i+1.
    """
    n = int(num_hidden_layers)
    base = default_aux_layers(n)
    types = list(layer_types) if layer_types else None
    if types is not None and len(types) != n:
        raise ValueError(f"layer_types has {len(types)} entries for a target with {n} layers")
    if types is None or all(t == FULL_ATTENTION for t in types):
        return {"hf": list(base), "sglang": hf_to_sglang(base, n), "engine_default_hf": list(base),
                "reason": "EAGLE-3's default low/mid/high layers (2, N//2, N-3)", "layer_types": None}
    full = [i for i in range(n - 1) if types[i] == FULL_ATTENTION]  # SGLang ids that are full-attention outputs
    if len(full) < len(base):
        raise ValueError(f"only {len(full)} full-attention layers (SGLang ids {full}) below the last layer: "
                         "not enough for three distinct aux layers; pass aux_layers explicitly")
    chosen: list[int] = []
    for want in hf_to_sglang(base, n):
        i = min((i for i in full if i not in chosen), key=lambda i: (abs(i - want), i))
        chosen.append(i)
    chosen.sort()
    moved = [(w, c) for w, c in zip(hf_to_sglang(base, n), chosen) if w != c]
    why = ("hybrid attention: captured states must be outputs of full-attention layers; "
           + (", ".join(f"SGLang id {w} ({types[w]}) -> {c}" for w, c in moved) if moved
              else "the default layers already are"))
    hf = [i + 1 for i in chosen]
    return {"hf": hf, "sglang": chosen, "engine_default_hf": list(base), "reason": why,
            "layer_types": [types[i] for i in chosen]}


def choose_aux_layers(num_hidden_layers: int, layer_types: Sequence[str] | None = None) -> tuple[int, ...]:
    """The default aux layers (HF indices) for a target; see `explain_aux_layers` for the rule."""
    return tuple(explain_aux_layers(num_hidden_layers, layer_types)["hf"])


def resolve_aux_layers(num_hidden_layers: int, aux_layers: Sequence[int] | None = None,
                       convention: str = "hf", warn: bool = True,
                       layer_types: Sequence[str] | None = None) -> tuple[int, ...]:
    """The aux layers to capture, as HF indices. `None` means the default for this target
    (`choose_aux_layers`: EAGLE-3's, or full-attention layers on a hybrid-attention model).

    Index N (the final state, after the final norm) is refused: serving engines capture the
    pre-norm residual stream, so no engine can feed such a head what it trained on.
    Custom layers are allowed but engines use their defaults unless the exported draft pins the
    ids, so we warn; on a hybrid model a sliding-window layer's output gets its own warning.
    """
    n = int(num_hidden_layers)
    types = list(layer_types) if layer_types else None
    if aux_layers is None:
        return choose_aux_layers(n, types)
    if convention not in ("hf", "sglang"):
        raise ValueError(f"convention must be 'hf' or 'sglang', not {convention!r}")
    hf = sglang_to_hf(aux_layers, n) if convention == "sglang" else [int(j) for j in aux_layers]
    if not hf:
        raise ValueError("aux_layers is empty")
    for j in hf:
        if not 0 <= j <= n:
            raise ValueError(f"aux layer HF index {j} is out of range 0..{n} for a target with {n} layers")
        if j == n:
            raise ValueError(f"aux layer HF index {n} is the final state after the final norm; EAGLE-3 heads are "
                             "served on pre-norm residual states (SGLang and vLLM capture those), so no engine could "
                             f"give this head the feature it trained on. Use an index below {n} (the last layer's "
                             f"input is {n - 1})")
    if len(set(hf)) != len(hf):
        raise ValueError(f"aux layers repeat an index: {hf}")
    hf_t = tuple(hf)
    default = choose_aux_layers(n, types) if n >= 7 else None
    if warn and types is not None:
        sliding = [j for j in hf_t if j >= 1 and types[j - 1] != FULL_ATTENTION]
        if sliding:
            warnings.warn(f"aux layers HF {sliding} are outputs of sliding-window layers (SGLang ids "
                          f"{[j - 1 for j in sliding]}: {[types[j - 1] for j in sliding]}), which saw only a window "
                          f"of the prefix; the full-attention choice for this target is HF {list(default) if default else 'n/a'}",
                          stacklevel=2)
    if warn and hf_t != default:
        rec = aux_layers_record(n, hf_t)
        warnings.warn(f"custom aux layers HF {list(hf_t)} (SGLang {rec['sglang'] or 'n/a'}); SGLang and vLLM use "
                      f"the default HF {list(default_aux_layers(n)) if n >= 7 else 'n/a'} unless the exported draft "
                      "config pins these ids (eaglebook's export writes both conventions)", stacklevel=2)
    return hf_t


def aux_layers_record(num_hidden_layers: int, hf_layers: Sequence[int]) -> dict:
    """Both conventions, for provenance and export."""
    hf = [int(j) for j in hf_layers]
    try:
        sg = hf_to_sglang(hf, num_hidden_layers)
    except ValueError:
        sg = None  # embedding output or final normed state: not expressible in SGLang ids
    # "default": the layers SGLang and vLLM pick on their own (an export need not pin them)
    default = num_hidden_layers >= 7 and tuple(hf) == default_aux_layers(num_hidden_layers)
    return {"hf": hf, "sglang": sg, "default": default}


# --------------------------------------------------------------------------------------
# 2. Capture: one forward of the base model, pre-hooks on the aux layers
# --------------------------------------------------------------------------------------

def _decoder_parts(model):
    """(base model, its decoder layers, number of layers) for a *ForCausalLM."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if base is None or layers is None:
        raise TypeError(f"{type(model).__name__}: expected a decoder-only *ForCausalLM with `.model.layers` "
                        "(Llama, Qwen, Mistral, OLMo, ...)")
    return base, layers, model.config.num_hidden_layers


class HiddenStateCapture:
    """Forward pre-hooks on the aux layers of a target; calling it runs one base-model forward.

        with HiddenStateCapture(model) as cap:
            feats = cap(input_ids, attention_mask)    # {"aux_hidden": [B,T,kH], "final_hidden": [B,T,H]}

    The pre-hook on decoder layer j sees exactly `hidden_states[j]` (the layer's input), the
    definition every engine uses. Index N is the base model's output (already normed).
    """

    def __init__(self, model, aux_layers: Sequence[int] | None = None, convention: str = "hf"):
        self.model = model
        self.base, self.layers, self.num_layers = _decoder_parts(model)
        self.aux_layers = resolve_aux_layers(self.num_layers, aux_layers, convention,
                                             layer_types=layer_types_of(model.config))
        self._handles: list = []
        self._store: dict[int, torch.Tensor] = {}

    def _hook(self, j: int):
        def pre_hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self._store[j] = h  # a reference, no copy: the layer does not modify its input in place
        return pre_hook

    def __enter__(self):
        self.remove()
        for j in self.aux_layers:
            if j < self.num_layers:
                self._handles.append(self.layers[j].register_forward_pre_hook(self._hook(j), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._store.clear()

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        if not self._handles and any(j < self.num_layers for j in self.aux_layers):
            raise RuntimeError("HiddenStateCapture is not active: use it as `with HiddenStateCapture(model) as cap:`")
        self._store.clear()
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        final = out.last_hidden_state
        missing = [j for j in self.aux_layers if j < self.num_layers and j not in self._store]
        if missing:
            raise RuntimeError(f"the forward pass did not reach aux layers {missing}")
        aux = torch.cat([final if j == self.num_layers else self._store[j] for j in self.aux_layers], dim=-1)
        self._store.clear()
        return {"aux_hidden": aux, "final_hidden": final}


def capture_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  aux_layers: Sequence[int] | None = None) -> dict:
    """One-shot capture (hooks added and removed); padded [B, T, ...] tensors."""
    with HiddenStateCapture(model, aux_layers) as cap:
        return cap(input_ids, attention_mask)


def teacher_logits(model, final_hidden: torch.Tensor) -> torch.Tensor:
    """The target's next-token logits from a stored final feature: `lm_head` (no second norm: it is
    already normed), then the target's own softcapping or scaling (`target.output_logits`)."""
    from .target import output_logits

    return output_logits(model, final_hidden)


def oracle_hidden_states(model, input_ids, attention_mask=None) -> tuple[torch.Tensor, ...]:
    """All N+1 hidden states through `output_hidden_states` (slow, memory-hungry: tests and plots)."""
    with torch.inference_mode():
        return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                     use_cache=False).hidden_states


# --------------------------------------------------------------------------------------
# 3. Inputs: tokenized sequences (input_ids + loss_mask), batched with right padding
# --------------------------------------------------------------------------------------

class Sequences:
    """Tokenized sequences from a `datasets.Dataset`, a list of dicts or a list of id lists.

    Every row needs `input_ids`; `loss_mask` defaults to all ones (and is noted as such).
    `max_length` truncates from the right (counted).
    """

    def __init__(self, data, max_length: int | None = None):
        self.data = data
        self.max_length = max_length
        self.n = len(data)
        self.has_loss_mask = True
        if hasattr(data, "column_names"):  # datasets.Dataset
            if "input_ids" not in data.column_names:
                raise ValueError(f"the dataset has no 'input_ids' column (columns: {data.column_names}); "
                                 "tokenize it first (notebook 01, eaglebook.data.tokenize_conversation)")
            self.has_loss_mask = "loss_mask" in data.column_names
        elif self.n:
            first = data[0]
            if isinstance(first, dict):
                if "input_ids" not in first:
                    raise ValueError(f"sequence 0 has no 'input_ids' (keys: {sorted(first)})")
                self.has_loss_mask = "loss_mask" in first
            else:
                self.has_loss_mask = False
        self._lengths: list[int] | None = None
        self.truncated = 0

    def __len__(self) -> int:
        return self.n

    def row(self, i: int) -> tuple[list[int], list[int], bool]:
        """(input_ids, loss_mask, was_truncated) of sequence i."""
        row = self.data[int(i)]
        ids = list(row["input_ids"]) if isinstance(row, dict) else list(row)
        mask = list(row["loss_mask"]) if isinstance(row, dict) and "loss_mask" in row else [1] * len(ids)
        if len(mask) != len(ids):
            raise ValueError(f"sequence {i}: loss_mask has {len(mask)} entries for {len(ids)} input_ids")
        if not ids:
            raise ValueError(f"sequence {i} is empty")
        if self.max_length and len(ids) > self.max_length:
            return ids[: self.max_length], mask[: self.max_length], True
        return ids, mask, False

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        ids, mask, _ = self.row(i)
        return ids, mask

    def lengths_and_hash(self) -> tuple[list[int], str]:
        """Every (truncated) length and a hash of all ids and masks (pins resumes to the same data)."""
        h = hashlib.sha256()
        lengths = []
        truncated = 0
        for i in range(self.n):
            ids, mask, cut = self.row(i)
            truncated += cut
            lengths.append(len(ids))
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(np.asarray(mask, dtype=np.int8).tobytes())
        self._lengths, self.truncated = lengths, truncated
        return lengths, h.hexdigest()[:16]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (input_ids, attention_mask). Right padding keeps every real
    token's causal context (and its position ids) identical to the unpadded sequence."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), int(pad_id), dtype=torch.long)
    att = torch.zeros((len(seqs), t), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        att[b, : len(s)] = 1
    if device is not None:
        ids, att = ids.to(device), att.to(device)
    return ids, att


def make_batches(lengths: Sequence[int], order: Sequence[int], batch_size: int = 8,
                 max_batch_tokens: int | None = None) -> list[list[int]]:
    """Group `order` (indices into lengths) into batches, longest first so padding is small.

    A batch holds at most `batch_size` sequences and at most `max_batch_tokens` padded tokens
    (batch x longest), the knob the GPU memory planner sizes.
    """
    srt = sorted(order, key=lambda i: -lengths[i])
    batches, cur, cur_max = [], [], 0
    for i in srt:
        new_max = max(cur_max, lengths[i])
        if cur and (len(cur) >= batch_size or (max_batch_tokens and new_max * (len(cur) + 1) > max_batch_tokens)):
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def unpad(feats: dict, attention_mask: torch.Tensor) -> list[dict]:
    """Per-sequence features holding only the real (unpadded) tokens."""
    out = []
    for b in range(attention_mask.shape[0]):
        keep = attention_mask[b].bool()
        out.append({k: v[b][keep] for k, v in feats.items()})
    return out


# --------------------------------------------------------------------------------------
# 4. Storage dtypes: bf16 by default, fp8 with per-token or per-channel scales
# --------------------------------------------------------------------------------------

def normalize_storage(storage: str) -> str:
    s = _STORAGE_ALIASES.get(storage, storage)
    if s not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {storage!r}; choose one of {sorted(STORAGE_DTYPES)}")
    return s


def quantize(x: torch.Tensor, storage: str, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [T, k*block] -> (stored tensor, scale or None).

    fp8-token: one scale per token and per layer block ([T, k]); fp8-channel: one per column
    ([k*block], computed over the shard's tokens). Residual streams carry outlier values far
    beyond e4m3's +-448, so raw fp8 casting would saturate: the scale maps each amax to 448.
    """
    storage = normalize_storage(storage)
    if storage not in ("fp8-token", "fp8-channel"):
        return x.to(STORAGE_DTYPES[storage]), None
    xf = x.float()
    if storage == "fp8-token":
        t, c = xf.shape
        blocks = xf.view(t, c // block, block)
        scale = (blocks.abs().amax(dim=-1) / FP8_MAX).clamp_min(1e-12)  # [T, k]
        q = (blocks / scale.unsqueeze(-1)).to(FP8_DTYPE).view(t, c)
        return q, scale
    scale = (xf.abs().amax(dim=0) / FP8_MAX).clamp_min(1e-12)  # [k*block]
    return (xf / scale).to(FP8_DTYPE), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, storage: str, block: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize` (rows may be any slice of the stored tensor with matching scales)."""
    storage = normalize_storage(storage)
    if scale is None:
        return q.to(dtype)
    if storage == "fp8-token":
        t, c = q.shape
        return (q.float().view(t, c // block, block) * scale.unsqueeze(-1)).view(t, c).to(dtype)
    return (q.float() * scale).to(dtype)


def storage_error(feats: dict, storage: str, hidden_size: int) -> list[dict]:
    """Per-layer relative L2 error and max |error| of a storage dtype on real features.

    feats: {"aux_hidden": [T, kH], "final_hidden": [T, H]} (unpadded, e.g. torch.cat of several
    sequences). Returns one row per layer block: aux low/mid/high..., then final.
    """
    rows = []
    for name in ("aux_hidden", "final_hidden"):
        x = feats[name].float()
        q, s = quantize(x, storage, hidden_size)
        err = dequantize(q, s, storage, hidden_size) - x
        for k in range(x.shape[1] // hidden_size):
            sl = slice(k * hidden_size, (k + 1) * hidden_size)
            ref = x[:, sl]
            rows.append({"block": f"{name}[{k}]" if name == "aux_hidden" else "final",
                         "rel_l2": float(err[:, sl].norm() / ref.norm().clamp_min(1e-30)),
                         "max_abs_err": float(err[:, sl].abs().max()), "max_abs": float(ref.abs().max())})
    return rows


# --------------------------------------------------------------------------------------
# 5. Writing shards: atomic, hashed, resumable, one set per rank
# --------------------------------------------------------------------------------------

def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # a reader (or a resume) sees the old file or the whole new one


def _atomic_write_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def shard_ok(directory: Path, entry: dict, verify: str = "hash") -> tuple[bool, str]:
    """(ok, why not) for one shard listed in an index. verify: "size" (cheap) or "hash" (reads it)."""
    path = Path(directory) / entry["file"]
    if not path.is_file():
        return False, "missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return False, f"size {size} != {entry['bytes']} (truncated?)"
    if verify == "hash" and file_sha256(path) != entry["sha256"]:
        return False, "sha256 mismatch (corrupt)"
    return True, ""


def _rank_index_name(rank: int, world_size: int) -> str:
    return f"index-rank{rank:03d}-of-{world_size:03d}.json"


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / accelerate's environment (0, 1, 0 alone)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in 0..WORLD_SIZE-1={world - 1}")
    return rank, world, local


def plan_shards(lengths: Sequence[int], rank: int, world_size: int, tokens_per_shard: int) -> list[list[int]]:
    """This rank's sequences (i % world_size == rank) cut into shards of ~tokens_per_shard tokens.

    Deterministic from the lengths alone, so a resumed run recomputes the same plan.
    """
    mine = [i for i in range(len(lengths)) if i % world_size == rank]
    shards, cur, cur_tokens = [], [], 0
    for i in mine:
        if cur and cur_tokens + lengths[i] > tokens_per_shard:
            shards.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += lengths[i]
    if cur:
        shards.append(cur)
    return shards


def bytes_per_token(hidden_size: int, n_aux: int = 3, storage: str = "bfloat16", final: bool = True,
                    ids_bytes: int = 4, mask_bytes: int = 1) -> int:
    """Bytes one token costs in eaglebook's shards (aux + final features, scales, id, mask)."""
    storage = normalize_storage(storage)
    elem = STORAGE_DTYPES[storage].itemsize
    blocks = n_aux + (1 if final else 0)
    scales = 4 * blocks if storage == "fp8-token" else 0  # float32 scale per token per block
    return blocks * hidden_size * elem + scales + ids_bytes + mask_bytes


@dataclass
class CaptureReport:
    """What a `write_features` call did (per rank) and how fast."""

    out_dir: str
    rank: int
    world_size: int
    shards_total: int
    shards_written: int
    shards_reused: int
    shards_regenerated: list[str] = field(default_factory=list)
    sequences: int = 0
    tokens_written: int = 0
    padded_tokens: int = 0
    bytes_written: int = 0
    forward_seconds: float = 0.0
    total_seconds: float = 0.0
    truncated: int = 0
    merged: bool = False

    @property
    def capture_tok_s(self) -> float:
        return self.tokens_written / self.forward_seconds if self.forward_seconds else float("nan")

    @property
    def end_to_end_tok_s(self) -> float:
        return self.tokens_written / self.total_seconds if self.total_seconds else float("nan")

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(capture_tok_s=self.capture_tok_s, end_to_end_tok_s=self.end_to_end_tok_s)
        return d


def _encode_shard(seq_ids: list[int], per_seq: dict[int, dict], storage: str, hidden: int,
                  metadata: dict) -> bytes:
    from safetensors.torch import save

    ids = torch.cat([torch.as_tensor(per_seq[i]["input_ids"], dtype=torch.int32) for i in seq_ids])
    mask = torch.cat([torch.as_tensor(per_seq[i]["loss_mask"], dtype=torch.uint8) for i in seq_ids])
    lens = [len(per_seq[i]["input_ids"]) for i in seq_ids]
    tensors = {
        "input_ids": ids, "loss_mask": mask,
        "offsets": torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int64),
        "seq_ids": torch.tensor(seq_ids, dtype=torch.int64),
    }
    for name in ("aux_hidden", "final_hidden"):
        x = torch.cat([per_seq[i][name] for i in seq_ids])
        q, scale = quantize(x, storage, hidden)
        tensors[name] = q.contiguous()
        if scale is not None:
            tensors[name.replace("hidden", "scale")] = scale.contiguous()
    return save(tensors, metadata={k: str(v) for k, v in metadata.items()})


def write_features(model, tokenizer, sequences, out_dir: str | os.PathLike, *,
                   aux_layers: Sequence[int] | None = None, storage: str = "bfloat16",
                   batch_size: int = 8, max_batch_tokens: int | None = None, max_length: int | None = None,
                   shard_mb: float = 1024.0, rank: int | None = None, world_size: int | None = None,
                   verify: str = "hash", overwrite: bool = False, merge: bool = True,
                   progress: bool = True, target_name: str | None = None) -> CaptureReport:
    """Capture features for `sequences` and store them as shards under `out_dir`.

    Each rank (from RANK/WORLD_SIZE under torchrun or accelerate, or the arguments) takes the
    sequences i % world_size == rank and writes its own shards and `index-rank*.json`; the
    rank that finds every rank complete merges them into `index.json`. Rerunning the same
    call resumes: finished shards that still verify are kept, missing/truncated/corrupt ones
    are regenerated. Different data or settings in a non-empty folder raise unless overwrite.
    """
    from tqdm.auto import tqdm

    from .target import target_info

    t_start = time.perf_counter()
    env_rank, env_world, _ = dist_env()
    rank = env_rank if rank is None else int(rank)
    world_size = env_world if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if verify not in ("size", "hash"):
        raise ValueError(f"verify must be 'size' or 'hash', not {verify!r}")
    storage = normalize_storage(storage)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    seqs = sequences if isinstance(sequences, Sequences) else Sequences(sequences, max_length=max_length)
    if len(seqs) == 0:
        raise ValueError("no sequences to capture")
    lengths, data_hash = seqs.lengths_and_hash()
    _, _, n_layers = _decoder_parts(model)
    hidden = model.config.hidden_size
    hf_layers = resolve_aux_layers(n_layers, aux_layers, warn=False, layer_types=layer_types_of(model.config))
    info = target_info(model, tokenizer)
    if target_name or not info.get("target"):
        info["target"] = target_name or f"unnamed {type(model).__name__}"  # a model built in memory has no name
    provenance = {**info, "aux_layers": aux_layers_record(n_layers, hf_layers)}
    bpt = bytes_per_token(hidden, len(hf_layers), storage)
    tokens_per_shard = max(1, int(shard_mb * 2**20 // bpt))
    settings = {"storage": storage, "aux_layers": list(hf_layers), "tokens_per_shard": tokens_per_shard,
                "world_size": world_size, "data_hash": data_hash, "num_sequences": len(seqs),
                "weights_fingerprint": info["weights_fingerprint"], "template_hash": info["template_hash"],
                "max_length": max_length}
    plan = plan_shards(lengths, rank, world_size, tokens_per_shard)

    rank_path = out / _rank_index_name(rank, world_size)
    if overwrite:  # each rank clears only its own files; rank 0 also the merged index
        rank_path.unlink(missing_ok=True)
        for old in out.glob(f"shard-r{rank:03d}-*.safetensors"):
            old.unlink()
        if rank == 0:
            (out / INDEX_NAME).unlink(missing_ok=True)
    done: dict[str, dict] = {}
    regenerated: list[str] = []
    if rank_path.is_file():
        prev = json.loads(rank_path.read_text())
        if prev.get("settings") != settings:
            diff = sorted(k for k in set(settings) | set(prev.get("settings", {}))
                          if settings.get(k) != prev.get("settings", {}).get(k))
            raise FeatureStoreError(f"{out} holds features made with other settings (differs in {diff}); "
                                    "use another folder or overwrite=True")
        else:
            for e in prev["shards"]:
                ok, why = shard_ok(out, e, verify)
                if ok:
                    done[e["file"]] = e
                else:
                    regenerated.append(f"{e['file']}: {why}")
    elif (out / INDEX_NAME).is_file():
        prev = json.loads((out / INDEX_NAME).read_text())
        if prev.get("settings") != settings:
            raise FeatureStoreError(f"{out} already holds a feature store for other data or world size; "
                                    "use another folder or overwrite=True")
    for tmp in out.glob(".shard-r*.tmp-*"):  # leftovers of a run killed mid-write
        tmp.unlink(missing_ok=True)
    if regenerated:
        print(f"rank {rank}: regenerating {len(regenerated)} shard(s): " + "; ".join(regenerated))

    report = CaptureReport(str(out), rank, world_size, shards_total=len(plan), shards_written=0,
                           shards_reused=0, shards_regenerated=regenerated, truncated=seqs.truncated,
                           sequences=sum(len(s) for s in plan))
    entries: list[dict] = []
    todo_tokens = sum(lengths[i] for k, s in enumerate(plan) if _shard_name(rank, k) not in done for i in s)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    bar = tqdm(total=todo_tokens, unit="tok", desc=f"capture r{rank}", disable=not progress, position=rank)
    with HiddenStateCapture(model, hf_layers) as cap:
        for k, shard_seqs in enumerate(plan):
            name = _shard_name(rank, k)
            if name in done and done[name]["seq_ids"] == shard_seqs:
                entries.append(done[name])
                report.shards_reused += 1
                continue
            per_seq: dict[int, dict] = {}
            for batch in make_batches(lengths, shard_seqs, batch_size, max_batch_tokens):
                rows = [seqs[i] for i in batch]
                input_ids, att = pad_batch([r[0] for r in rows], pad_id, device)
                t0 = time.perf_counter()
                feats = cap(input_ids, att)
                keep = att.bool()
                aux, fin = feats["aux_hidden"][keep], feats["final_hidden"][keep]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                report.forward_seconds += time.perf_counter() - t0
                report.padded_tokens += int(att.numel())
                start = 0
                for i, (ids, mask) in zip(batch, rows):
                    n = len(ids)
                    per_seq[i] = {"input_ids": ids, "loss_mask": mask,
                                  "aux_hidden": aux[start:start + n].cpu(), "final_hidden": fin[start:start + n].cpu()}
                    start += n
                bar.update(int(keep.sum()))
            meta = {"format": FORMAT, "storage": storage, "hidden_size": hidden, "rank": rank, "shard": k}
            blob = _encode_shard(shard_seqs, per_seq, storage, hidden, meta)
            _atomic_write_bytes(out / name, blob)
            entry = {"file": name, "rank": rank, "shard": k, "seq_ids": shard_seqs,
                     "lengths": [lengths[i] for i in shard_seqs], "tokens": sum(lengths[i] for i in shard_seqs),
                     "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
            entries.append(entry)
            report.shards_written += 1
            report.tokens_written += entry["tokens"]
            report.bytes_written += len(blob)
            # The rank index is rewritten after every shard: it is the resume point.
            _atomic_write_json(rank_path, _rank_index(provenance, settings, rank, world_size, entries + [
                done[_shard_name(rank, j)] for j in range(k + 1, len(plan)) if _shard_name(rank, j) in done], False))
    bar.close()
    _atomic_write_json(rank_path, _rank_index(provenance, settings, rank, world_size, entries, True))
    report.total_seconds = time.perf_counter() - t_start
    if merge:
        report.merged = try_merge_index(out, settings)
    return report


def _shard_name(rank: int, k: int) -> str:
    return f"shard-r{rank:03d}-{k:05d}.safetensors"


def _rank_index(provenance, settings, rank, world_size, entries, complete) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "provenance": provenance, "settings": settings,
            "rank": rank, "world_size": world_size, "complete": complete,
            "shards": sorted(entries, key=lambda e: e["shard"])}


def try_merge_index(out_dir: str | os.PathLike, settings: dict | None = None) -> bool:
    """Merge every rank's index into `index.json` if all ranks are complete; False otherwise.

    Whichever rank finishes last sees all parts complete and writes the merged index (an
    atomic replace, so two ranks finishing together write the same file harmlessly).
    `settings` picks the run (default: that of the newest rank index).
    """
    out = Path(out_dir)
    paths = sorted(out.glob("index-rank*-of-*.json"), key=lambda p: p.stat().st_mtime)
    if not paths:
        return False
    loaded = [json.loads(p.read_text()) for p in paths]
    settings = settings or loaded[-1]["settings"]
    mine = {p["rank"]: p for p in loaded if p["settings"] == settings}
    world = settings["world_size"]
    if sorted(mine) != list(range(world)) or not all(p["complete"] for p in mine.values()):
        return False
    shards = [e for r in range(world) for e in mine[r]["shards"]]
    n_seq = sum(len(e["seq_ids"]) for e in shards)
    if n_seq != settings["num_sequences"]:
        raise FeatureStoreError(f"ranks hold {n_seq} sequences, expected {settings['num_sequences']}")
    index = {"format": FORMAT, "format_version": FORMAT_VERSION, "provenance": mine[0]["provenance"],
             "settings": settings, "world_size": world, "num_sequences": n_seq,
             "num_tokens": sum(e["tokens"] for e in shards), "total_bytes": sum(e["bytes"] for e in shards),
             "shards": shards}
    _atomic_write_json(out / INDEX_NAME, index)
    return True


def verify_features(out_dir: str | os.PathLike, verify: str = "hash") -> list[str]:
    """Names of shards in `index.json` that are missing, truncated or corrupt (empty = all good)."""
    index = read_index(out_dir)
    return [f"{e['file']}: {why}" for e in index["shards"] for ok, why in [shard_ok(Path(out_dir), e, verify)] if not ok]


def read_index(out_dir: str | os.PathLike) -> dict:
    out = Path(out_dir)
    path = out / INDEX_NAME
    if not path.is_file():
        parts = sorted(out.glob("index-rank*-of-*.json")) if out.is_dir() else []
        hint = (f"; {len(parts)} rank index file(s) exist: the capture is incomplete (rerun it to resume)"
                if parts else "; run the capture first (notebook 02 or `eaglebook capture`)")
        raise FeatureStoreError(f"no {INDEX_NAME} in {out}" + hint)
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise FeatureStoreError(f"{path} is not an {FORMAT} v{FORMAT_VERSION} index")
    return index


# --------------------------------------------------------------------------------------
# 6. Reading: a torch Dataset over the shards, checked against the target
# --------------------------------------------------------------------------------------

def check_provenance(provenance: dict, expect, aux_layers: Sequence[int] | None = None) -> None:
    """Raise FeatureStoreError naming every mismatch between stored provenance and a target.

    expect: a (model, tokenizer) pair, or a dict like `eaglebook.target_info(...)`.
    """
    from .target import target_info

    if isinstance(expect, tuple):
        expect = target_info(*expect)
    problems = []
    for key in ("weights_fingerprint", "template_hash", "hidden_size", "num_hidden_layers", "vocab_size"):
        if key in expect and expect[key] != provenance.get(key):
            problems.append(f"{key}: store has {provenance.get(key)!r}, target has {expect[key]!r}")
    if aux_layers is not None and list(aux_layers) != provenance["aux_layers"]["hf"]:
        problems.append(f"aux_layers (HF): store has {provenance['aux_layers']['hf']}, expected {list(aux_layers)}")
    if problems:
        raise FeatureStoreError(f"the features were made by another target/template ({provenance.get('target')}): "
                                + "; ".join(problems))


class FeatureDataset(torch.utils.data.Dataset):
    """Stored features as a torch Dataset: item i is sequence i of the captured data.

    Each item: input_ids [T] (long), loss_mask [T] (long), aux_hidden [T, kH], final_hidden
    [T, H] (dequantized to `dtype`), seq_id. Pass `expect=(model, tokenizer)` (or a
    target_info dict) to refuse features of another target or template.
    """

    def __init__(self, out_dir: str | os.PathLike, expect=None, aux_layers: Sequence[int] | None = None,
                 dtype: torch.dtype = torch.float32, verify: str = "size"):
        self.dir = Path(out_dir)
        self.index = read_index(self.dir)
        self.provenance = self.index["provenance"]
        self.storage = self.index["settings"]["storage"]
        self.hidden_size = int(self.provenance["hidden_size"])
        self.dtype = dtype
        if expect is not None or aux_layers is not None:
            check_provenance(self.provenance, expect or {}, aux_layers)
        bad = [f"{e['file']}: {why}" for e in self.index["shards"] for ok, why in [shard_ok(self.dir, e, verify)]
               if not ok]
        if bad:
            raise FeatureStoreError(f"{len(bad)} shard(s) in {self.dir} are damaged ({'; '.join(bad[:3])}); "
                                    "rerun the capture with the same settings to regenerate them")
        self._where: dict[int, tuple[int, int]] = {}
        for s, e in enumerate(self.index["shards"]):
            for local, sid in enumerate(e["seq_ids"]):
                self._where[sid] = (s, local)
        n = self.index["num_sequences"]
        if sorted(self._where) != list(range(n)):
            raise FeatureStoreError(f"{self.dir}: the shards do not cover sequences 0..{n - 1} exactly once")
        self._files: dict[int, object] = {}
        self._offsets: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.index["num_sequences"]

    @property
    def aux_layers(self) -> dict:
        return self.provenance["aux_layers"]

    @property
    def lengths(self) -> list[int]:
        out = [0] * len(self)
        for e in self.index["shards"]:
            for sid, n in zip(e["seq_ids"], e["lengths"]):
                out[sid] = n
        return out

    def __getstate__(self):
        # Open safetensors handles do not pickle (DataLoader workers under spawn); reopen lazily.
        state = dict(self.__dict__)
        state["_files"], state["_offsets"] = {}, {}
        return state

    def _open(self, s: int):
        # Opened lazily so DataLoader workers each get their own handles after fork.
        if s not in self._files:
            from safetensors import safe_open

            f = safe_open(str(self.dir / self.index["shards"][s]["file"]), framework="pt")
            self._files[s] = f
            self._offsets[s] = f.get_tensor("offsets")
        return self._files[s]

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range 0..{len(self) - 1}")
        s, local = self._where[i]
        f = self._open(s)
        a, b = int(self._offsets[s][local]), int(self._offsets[s][local + 1])
        item = {"seq_id": i,
                "input_ids": f.get_slice("input_ids")[a:b].long(),
                "loss_mask": f.get_slice("loss_mask")[a:b].long()}
        keys = f.keys()
        for name in ("aux_hidden", "final_hidden"):
            q = f.get_slice(name)[a:b]
            scale_name = name.replace("hidden", "scale")
            scale = None
            if scale_name in keys:
                scale = f.get_tensor(scale_name) if self.storage == "fp8-channel" else f.get_slice(scale_name)[a:b]
            item[name] = dequantize(q, scale, self.storage, self.hidden_size, self.dtype)
        return item


# --------------------------------------------------------------------------------------
# 7. Online mode: the same items, computed on the fly
# --------------------------------------------------------------------------------------

class OnlineFeatures(torch.utils.data.IterableDataset):
    """The items `FeatureDataset` yields, computed from the target as you iterate (no disk).

    `storage_dtype` rounds the features as the disk store would (e.g. "bfloat16"), so online
    and offline training see identical numbers; None keeps the target's own dtype. Iterate in
    the main process (the target lives there): DataLoader(num_workers=0).
    """

    def __init__(self, model, tokenizer, sequences, aux_layers: Sequence[int] | None = None,
                 batch_size: int = 8, max_batch_tokens: int | None = None, max_length: int | None = None,
                 storage_dtype: str | None = None, dtype: torch.dtype = torch.float32, to_cpu: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.to_cpu = to_cpu  # False keeps features on the target's device (online training on one GPU)
        self.seqs = sequences if isinstance(sequences, Sequences) else Sequences(sequences, max_length=max_length)
        _, _, n_layers = _decoder_parts(model)
        self.aux = resolve_aux_layers(n_layers, aux_layers, layer_types=layer_types_of(model.config))
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.storage = normalize_storage(storage_dtype) if storage_dtype else None
        if self.storage == "fp8-channel":
            warnings.warn("fp8-channel scales depend on a whole shard; online rounding uses per-sequence scales",
                          stacklevel=2)
        self.dtype = dtype
        self.hidden_size = model.config.hidden_size

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def aux_layers(self) -> dict:
        """The captured layers in both conventions (as `FeatureDataset.aux_layers`)."""
        return aux_layers_record(self.model.config.num_hidden_layers, self.aux)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        if self.storage is None:
            return x.to(self.dtype)
        q, s = quantize(x, self.storage, self.hidden_size)
        return dequantize(q, s, self.storage, self.hidden_size, self.dtype)

    def __iter__(self) -> Iterator[dict]:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        # Sequences come in order i = 0, 1, ...; each batch is a window of consecutive ones.
        with HiddenStateCapture(self.model, self.aux) as cap:
            for start in range(0, len(self.seqs), self.batch_size):
                batch = list(range(start, min(start + self.batch_size, len(self.seqs))))
                rows = [self.seqs[i] for i in batch]
                input_ids, att = pad_batch([r[0] for r in rows], pad_id, device)
                for i, (ids, mask), f in zip(batch, rows, unpad(cap(input_ids, att), att)):
                    item = {"aux_hidden": self._round(f["aux_hidden"]), "final_hidden": self._round(f["final_hidden"])}
                    if self.to_cpu:
                        item = {k: v.cpu() for k, v in item.items()}
                    yield {"seq_id": i, "input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask), **item}


# --------------------------------------------------------------------------------------
# 8. Cost: disk per token and total, and a GPU memory planner
# --------------------------------------------------------------------------------------

GIB = 2**30


def disk_cost(num_tokens: float, hidden_size: int, n_aux: int = 3, storage: str = "bfloat16",
              final: bool = True, ids_bytes: int = 4, mask_bytes: int = 1) -> dict:
    """Bytes per token and total bytes of a feature store, with the arithmetic as text."""
    bpt = bytes_per_token(hidden_size, n_aux, storage, final, ids_bytes, mask_bytes)
    blocks = n_aux + (1 if final else 0)
    elem = STORAGE_DTYPES[normalize_storage(storage)].itemsize
    extra = bpt - blocks * hidden_size * elem
    total = bpt * num_tokens
    return {"bytes_per_token": bpt, "total_bytes": total, "total_gb": total / 1e9, "total_gib": total / GIB,
            "arithmetic": (f"({blocks} layers x {hidden_size} x {elem} B + {extra} B ids/mask/scales) = {bpt:,} B/token; "
                           f"x {num_tokens:,.0f} tokens = {total / 1e9:,.1f} GB ({total / GIB:,.1f} GiB)")}


# Published shapes (config.json of meta-llama/Llama-3.1-8B-Instruct); no download needed.
LLAMA_3_1_8B = {"name": "Llama-3.1-8B", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                "tie_word_embeddings": False}


def _cfg(config) -> dict:
    if isinstance(config, dict):
        c = dict(config)
    else:
        c = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "vocab_size",
                                             "tie_word_embeddings")}
        c["head_dim"] = getattr(config, "head_dim", None)
        c["name"] = getattr(config, "_name_or_path", "target")
    c["head_dim"] = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    c.setdefault("num_key_value_heads", c["num_attention_heads"])
    return c


def param_count(config) -> int:
    """Parameters of a Llama-shaped decoder from its config (8,030,261,248 for Llama-3.1-8B)."""
    c = _cfg(config)
    h, i, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return v * h * (1 if c.get("tie_word_embeddings") else 2) + c["num_hidden_layers"] * per_layer + h


def plan_capture_memory(config=LLAMA_3_1_8B, gpu_gib: float = 24.0, dtype_bytes: int = 2,
                        max_lengths: Sequence[int] = (1024, 2048, 4096), n_aux: int = 3,
                        compute_logits: bool = False, use_cache: bool = False,
                        reserve_gib: float = 1.0, headroom: float = 0.10) -> dict:
    """How many sequences of each length fit in one capture forward on a GPU, arithmetic shown.

    Counted per token in the batch (inference, SDPA/flash attention: no T x T score matrix):
    - the peak inside a decoder layer: the MLP phase holds the residual, its norm, gate, up
      and act(gate) at once: (2H + 3I) x dtype;
    - the captured features, alive for the whole forward: (n_aux + 1) x H x dtype;
    - the KV cache if `use_cache` (capture does not need it): 2 x L x kv_heads x head_dim x dtype;
    - logits if `compute_logits` (a plain `model(...)` call; HF upcasts them to float32): V x 4.
    - the causal mask with padding that SDPA receives: T x T bools per sequence (T B/token).
    Plus the weights, `reserve_gib` for the CUDA context and allocator, and a `headroom` share
    of what remains for fragmentation. These are estimates; a measured peak
    (torch.cuda.max_memory_allocated) should confirm them on real hardware.
    """
    c = _cfg(config)
    h, i, v, n_layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kvd = c["num_key_value_heads"] * c["head_dim"]
    params = param_count(c)
    weights = params * dtype_bytes
    per_tok = {"layer peak (2H+3I)": (2 * h + 3 * i) * dtype_bytes,
               f"captured features ({n_aux}+1)xH": (n_aux + 1) * h * dtype_bytes}
    if use_cache:
        per_tok["KV cache 2xLxkv"] = 2 * n_layers * kvd * dtype_bytes
    if compute_logits:
        per_tok["logits Vx4 (fp32)"] = v * 4
    per_token = sum(per_tok.values())
    budget = gpu_gib * GIB - weights - reserve_gib * GIB
    usable = budget * (1 - headroom)
    lines = [f"weights: {params:,} params x {dtype_bytes} B = {weights / GIB:.2f} GiB",
             f"free after weights and {reserve_gib} GiB reserve: {gpu_gib} - {weights / GIB:.2f} - {reserve_gib} = "
             f"{budget / GIB:.2f} GiB; minus {headroom:.0%} headroom = {usable / GIB:.2f} GiB",
             "per token: " + " + ".join(f"{k} {val / 1024:.1f} KiB" for k, val in per_tok.items())
             + f" = {per_token / 1024:.1f} KiB",
             "plus the padding-aware causal mask SDPA gets, T x T bool per sequence = T B per token"]
    table = []
    for t in max_lengths:
        tokens = int(max(usable, 0) // (per_token + t))
        batch = tokens // t
        table.append({"max_length": t, "batch_size": batch, "max_batch_tokens": batch * t,
                      "peak_gib": (weights + batch * t * (per_token + t)) / GIB + reserve_gib})
        lines.append(f"max_length {t}: {usable / GIB:.2f} GiB / ({per_token / 1024:.1f} KiB + {t} B) = {tokens:,} tokens "
                     f"-> batch {batch}")
    return {"model": c.get("name", "target"), "gpu_gib": gpu_gib, "params": params, "weights_gib": weights / GIB,
            "per_token_bytes": per_token, "per_token": per_tok,
            "fits": all(r["batch_size"] >= 1 for r in table), "table": table, "arithmetic": lines}


# --------------------------------------------------------------------------------------
# 9. Timing: capture vs a plain forward over the same batches
# --------------------------------------------------------------------------------------

def time_capture_vs_forward(model, tokenizer, sequences, batch_size: int = 8, repeats: int = 3,
                            aux_layers: Sequence[int] | None = None) -> dict:
    """Tokens/s of (a) the base-model forward, (b) the full `model(...)` forward with logits,
    and (c) capture (hooks + gather of the real tokens), over identical batches, interleaved
    per batch in rotating order and repeated, so load changes on a shared machine hit all three
    alike. Throughputs are medians over `repeats`; overheads are medians of per-repeat ratios.
    """
    seqs = sequences if isinstance(sequences, Sequences) else Sequences(sequences)
    lengths = [len(seqs[i][0]) for i in range(len(seqs))]
    batches = make_batches(lengths, range(len(seqs)), batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    padded = [pad_batch([seqs[i][0] for i in b], pad_id, device) for b in batches]
    n_tokens = sum(lengths)
    base, _, _ = _decoder_parts(model)
    times = {"base_forward": [], "full_forward": [], "capture": []}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(name, ids, att, cap):
        if name == "capture":
            f = cap(ids, att)
            keep = att.bool()
            f["aux_hidden"][keep].cpu(), f["final_hidden"][keep].cpu()
        else:
            # No hooks are registered while the plain passes run.
            (base if name == "base_forward" else model)(input_ids=ids, attention_mask=att, use_cache=False)

    names = list(times)
    cap = HiddenStateCapture(model, aux_layers)
    with torch.inference_mode():
        for ids, att in padded:  # warm-up: kernels are built per shape on first use (oneDNN, cuBLAS)
            for name in names:
                with cap:
                    run(name, ids, att, cap)
        for r in range(repeats):
            acc = dict.fromkeys(names, 0.0)
            # Interleave per batch, rotating the order, so load changes on a shared machine hit all alike.
            for b, (ids, att) in enumerate(padded):
                for name in names[(r + b) % 3:] + names[:(r + b) % 3]:
                    if name == "capture":
                        cap.__enter__()
                    sync()
                    t0 = time.perf_counter()
                    run(name, ids, att, cap)
                    sync()
                    acc[name] += time.perf_counter() - t0
                    cap.remove()
            for name in names:
                times[name].append(acc[name])

    def median(v):
        v = sorted(v)
        return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])

    med = {k: median(v) for k, v in times.items()}
    res = {f"{k}_tok_s": n_tokens / s for k, s in med.items()}
    res["tokens"] = n_tokens
    res["repeats"] = repeats
    # Paired: the ratio within each repeat, then the median, so slow drifts cancel.
    res["overhead_vs_base_pct"] = 100 * (median([c / b for c, b in zip(times["capture"], times["base_forward"])]) - 1)
    res["overhead_vs_full_pct"] = 100 * (median([c / f for c, f in zip(times["capture"], times["full_forward"])]) - 1)
    return res


# --------------------------------------------------------------------------------------
# 10. `eaglebook capture`
# --------------------------------------------------------------------------------------

@dataclass
class CaptureArgs:
    """Capture the target's hidden states into sharded safetensors (resumable; torchrun/accelerate aware)."""

    data: str = field(metadata={"help": "tokenized data: a datasets folder (save_to_disk, e.g. notebook 01's) or .jsonl"})
    out_dir: str = field(metadata={"help": "feature store folder"})
    target: str = field(default="smollm2-135m", metadata={"help": "HF id, local path, or the embedded default"})
    dtype: str = field(default="auto", metadata={"help": "target dtype: auto | bfloat16 | float32"})
    storage: str = field(default="bfloat16", metadata={"help": "bfloat16 | float16 | float32 | fp8-token | fp8-channel"})
    aux_layers: list[int] = field(default_factory=list, metadata={"help": "custom aux layers (default: EAGLE-3's)"})
    aux_convention: str = field(default="hf", metadata={"help": "convention of --aux_layers: hf | sglang"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward"})
    max_batch_tokens: int = field(default=0, metadata={"help": "padded tokens per forward (0: no limit)"})
    max_length: int = field(default=0, metadata={"help": "truncate longer sequences (0: keep)"})
    shard_mb: float = field(default=1024.0, metadata={"help": "approximate shard size in MiB"})
    limit: int = field(default=0, metadata={"help": "use only the first N sequences (0: all)"})
    verify: str = field(default="hash", metadata={"help": "check finished shards on resume: hash | size"})
    overwrite: bool = field(default=False, metadata={"help": "replace a store made with other settings"})


def load_tokenized(path: str, limit: int = 0):
    """A tokenized dataset from a `save_to_disk` folder or a .jsonl file."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise FeatureStoreError(f"{path} does not exist: expected a datasets folder (save_to_disk) or a .jsonl file")
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    elif p.suffix in (".jsonl", ".json"):
        ds = datasets.Dataset.from_json(str(p))
    else:
        raise FileNotFoundError(f"{path}: expected a datasets folder (save_to_disk) or a .jsonl file")
    return ds.select(range(min(limit, len(ds)))) if limit else ds


def _capture_cli(args: CaptureArgs) -> int:
    from .target import load_target

    rank, world, local = dist_env()
    device = f"cuda:{local}" if torch.cuda.is_available() else None
    model, tok = load_target(args.target, dtype=args.dtype, device=device, verbose=rank == 0)
    data = load_tokenized(args.data, args.limit)
    n, types = model.config.num_hidden_layers, layer_types_of(model.config)
    aux = None
    if args.aux_layers:
        aux = resolve_aux_layers(n, args.aux_layers, args.aux_convention, layer_types=types)
    elif types is not None and rank == 0:
        why = explain_aux_layers(n, types)
        print(f"aux layers HF {why['hf']} (SGLang {why['sglang']}): {why['reason']}")
    rep = write_features(model, tok, data, args.out_dir, aux_layers=aux, storage=args.storage,
                         batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens or None,
                         max_length=args.max_length or None, shard_mb=args.shard_mb, verify=args.verify,
                         overwrite=args.overwrite, target_name=args.target)
    print(json.dumps(rep.as_dict(), indent=1))
    if rep.merged:
        print(f"index written: {Path(args.out_dir) / INDEX_NAME}")
    return 0


try:  # the CLI registers sub-commands when stage modules are imported
    from .cli import register

    register("capture", CaptureArgs, _capture_cli)
except ImportError:  # pragma: no cover - cli needs transformers' HfArgumentParser
    pass
