"""Tree-verification decoding: a reference EAGLE-2/3 engine over a `transformers` target.

One iteration (a "step") of `EagleDecoder`:
  1. draft a tree: the draft head expands, depth by depth, the `topk` most likely frontier
     nodes (by cumulative log-probability), `topk` children each, in ONE draft call per
     depth; the best `num_draft_tokens` nodes overall (the root included) are kept;
  2. verify: ONE target forward over the tree, with a tree attention mask (each node sees
     the prefix and its ancestors) and position ids = prefix length + depth;
  3. accept the longest path the target agrees with, plus the bonus token the target
     predicts after it (greedy: argmax; sampling: the multi-candidate rejection rule);
  4. compact the target's KV cache to the accepted path (no prefix recompute) and extend
     the draft's cache over the accepted tokens with the *target's* features from the
     verify pass; the draft's last output there is the root of the next tree.

Parameters mean what SGLang's do (docs/stages.md § 5): `num_steps` = draft depth,
`topk` = branching, `num_draft_tokens` = nodes verified including the root; `topk=1` is
a chain with `num_draft_tokens = num_steps + 1`.

`baseline_decode` is plain one-token-per-forward decoding through the same forward
function, cache class, attention implementation and dtype, so `speedup` compares like
with like. Batch size is 1 throughout: this is a reference engine to read and to test.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from .hidden_states import default_aux_layers


class DecodeError(ValueError):
    """Decoding parameters or inputs that cannot work together; the message says why."""


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------

@dataclass
class SpecConfig:
    """Draft-tree shape, with SGLang's meanings (docs/stages.md § 5)."""

    num_steps: int = 4  # draft depth: tokens on the longest drafted path
    topk: int = 4  # children per expanded node, and nodes expanded per depth
    num_draft_tokens: int = 16  # nodes verified by the target, the root included
    ngram_tokens: int = 0  # merged drafter: prompt-lookup tokens offered to every tree (0 = EAGLE alone)
    ngram_max: int = 3  # longest context suffix the prompt lookup matches
    ngram_min: int = 2  # shortest: a one-token match is too weak a guess to offer
    ngram_prior: float = 0.5  # lookup acceptance rate assumed before any is measured (worth 2 observations)

    def __post_init__(self):
        if self.ngram_tokens < 0:
            raise DecodeError(f"ngram_tokens ({self.ngram_tokens}) must be >= 0")
        if not 0 < self.ngram_prior < 1:
            raise DecodeError(f"ngram_prior={self.ngram_prior}: an acceptance rate in (0, 1)")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise DecodeError(f"the prompt lookup matches suffixes of ngram_min ({self.ngram_min}) to ngram_max "
                              f"({self.ngram_max}) tokens: need 1 <= ngram_min <= ngram_max")
        if self.num_steps < 1 or self.topk < 1:
            raise DecodeError(f"num_steps ({self.num_steps}) and topk ({self.topk}) must be >= 1")
        if self.topk == 1:
            # As SGLang does: a chain verifies exactly its num_steps tokens plus the root.
            self.num_draft_tokens = self.num_steps + 1
        if self.num_draft_tokens < 2:
            raise DecodeError(f"num_draft_tokens={self.num_draft_tokens}: need the root and at least one draft token")
        if self.num_draft_tokens - 1 > self.max_candidates:
            raise DecodeError(
                f"num_draft_tokens={self.num_draft_tokens} exceeds what num_steps={self.num_steps}, topk={self.topk} "
                f"can draft: {self.max_candidates} candidates + the root")

    @property
    def max_candidates(self) -> int:
        """Nodes the draft proposes: topk at depth 1, then topk*topk per further depth."""
        return self.topk + (self.num_steps - 1) * self.topk ** 2

    @classmethod
    def chain(cls, num_steps: int) -> "SpecConfig":
        return cls(num_steps=num_steps, topk=1, num_draft_tokens=num_steps + 1)

    @property
    def label(self) -> str:
        base = f"s{self.num_steps}-k{self.topk}-n{self.num_draft_tokens}"
        return base + (f"+ng{self.ngram_tokens}" if self.ngram_tokens else "")


@dataclass
class SamplingConfig:
    """temperature 0 = greedy. Otherwise the target's distribution after temperature, then
    top-k (0 = off), then top-p (1.0 = off) is what both EAGLE and the baseline sample from."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def __post_init__(self):
        if not 0 < self.top_p <= 1:
            raise DecodeError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise DecodeError(f"top_k={self.top_k} must be >= 0")


def processed_probs(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """The distribution a sampler draws from: softmax(logits / T), then top-k, then top-p (float32)."""
    x = logits.float() / s.temperature
    if s.top_k and s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = torch.softmax(x, dim=-1)
    if s.top_p < 1.0:
        sp, si = torch.sort(p, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (sp.cumsum(-1) - sp) >= s.top_p
        sp = sp.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter_(-1, si, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


# --------------------------------------------------------------------------------------
# Stops
# --------------------------------------------------------------------------------------

class StopChecker:
    """Decides, token by token, whether generation ends: an eos id (chat template's end of
    turn and the generation config's eos), max_new_tokens, or a stop string. The stopping
    token is kept (as `generate()` does); nothing after it is."""

    def __init__(self, eos_ids=(), max_new_tokens: int = 256, stop_strings=(), tokenizer=None):
        self.eos_ids = {int(i) for i in eos_ids}
        self.max_new_tokens = int(max_new_tokens)
        self.stop_strings = [s for s in (stop_strings or []) if s]
        if self.stop_strings and tokenizer is None:
            raise DecodeError("stop strings need a tokenizer to decode the generated text")
        self.tokenizer = tokenizer
        if self.max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens={max_new_tokens} must be >= 1")

    def extend(self, generated: list[int], new: list[int]) -> tuple[int, str | None]:
        """Append `new` to `generated` up to the first stop; return (tokens kept, reason or None)."""
        for i, t in enumerate(new):
            generated.append(t)
            if t in self.eos_ids:
                return i + 1, "eos"
            if self.stop_strings and self._hit_stop_string(generated):
                return i + 1, "stop_string"
            if len(generated) >= self.max_new_tokens:
                return i + 1, "max_new_tokens"
        return len(new), None

    def _hit_stop_string(self, generated: list[int]) -> bool:
        # Decode only a tail long enough to hold any stop string plus a partial token.
        longest = max(len(s) for s in self.stop_strings)
        tail = self.tokenizer.decode(generated[-(longest + 8):], skip_special_tokens=False)
        return any(s in tail for s in self.stop_strings)


# --------------------------------------------------------------------------------------
# The target: one forward function for EAGLE and the baseline
# --------------------------------------------------------------------------------------

@contextmanager
def capture_aux(target, aux_layers, store: list):
    """Forward pre-hooks that append the inputs of decoder layers `aux_layers`
    (= HF hidden_states[j]) to `store` during the `with` block, in aux order."""
    layers = target.get_decoder().layers
    slots: dict[int, torch.Tensor] = {}
    handles = []

    def make(j):
        def hook(module, args, kwargs):
            slots[j] = args[0] if args else kwargs["hidden_states"]
        return hook

    for j in aux_layers:
        handles.append(layers[j].register_forward_pre_hook(make(j), with_kwargs=True))
    try:
        yield slots
    finally:
        for h in handles:
            h.remove()
        if slots:
            store.append(torch.cat([slots[j] for j in aux_layers], dim=-1))


@contextmanager
def capture_final(target, store: list):
    """A forward hook that appends the decoder's output (the final, normed state = HF
    hidden_states[N], what an EAGLE-1/2 head reads) to `store` during the `with` block."""
    def hook(module, args, output):
        store.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = target.get_decoder().register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def target_forward(target, input_ids, position_ids, cache, attention_mask=None, logits_at=None):
    """The target's own forward on the rows we need (`logits_at`: None = all, or `slice(-k, None)` =
    the last k): its decoder, its lm_head and whatever it does to the logits after (Gemma-2's final
    softcapping, Cohere's logit_scale, Granite's logits_scaling), so they are the target's logits."""
    if logits_at is None:
        keep = 0
    elif isinstance(logits_at, slice) and logits_at.stop is None and logits_at.step is None \
            and (logits_at.start or 0) < 0:
        keep = -logits_at.start
    else:
        raise DecodeError(f"logits_at={logits_at!r}: give None (every row) or slice(-k, None) (the last k rows)")
    out = target(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                 past_key_values=cache, use_cache=True, logits_to_keep=keep)
    return out.logits


def verify_mask_layout(config) -> dict:
    """How the target's layers attend, for the masks of a verify pass: {layer type: sliding window or
    None}, or {None: window or None} when every layer takes the same mask (one 4-D tensor).

    A 4-D mask handed to a `transformers` model reaches every layer unchanged, so a tree mask that
    lets each node see the whole prefix would also reach the sliding-window layers of a hybrid model
    (OLMo-3, Gemma-2/3: `config.layer_types` mixes "sliding_attention" and "full_attention"), which
    see only the last `sliding_window` positions in prefill and in plain decoding. Such models take a
    dict of masks keyed by layer type instead. A model with `sliding_window` set and no layer types
    (Mistral-style) windows every layer.
    """
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(tc, "sliding_window", None)
    types = getattr(tc, "layer_types", None)
    if not types:
        return {None: window}
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise DecodeError(f"the target has {unknown} layers: tree verification builds masks for full-attention and "
                          "sliding-window layers only, so this engine cannot decode it losslessly")
    if "sliding_attention" not in types:
        return {None: None}
    if not window:
        raise DecodeError("the target has sliding_attention layers but no config.sliding_window")
    return {t: (window if t == "sliding_attention" else None) for t in sorted(set(types))}


def tree_attention_mask(anc: torch.Tensor, prefix_len: int, dtype=None, window: int | None = None,
                        depths=None) -> torch.Tensor:
    """[1, 1, N, prefix_len + N] mask: every node sees the whole prefix and its ancestors-or-self.

    With `window` (a sliding-window layer's) a node sees only keys fewer than `window` positions
    back, the rule `transformers` applies in prefill and plain decoding: position(query) -
    position(key) < window, where prefix key j sits at position j and node i at prefix_len +
    depths[i]. Bool (True = attend) for sdpa; with `dtype` an additive float mask for eager attention.
    """
    N = anc.shape[0]
    m = torch.cat([torch.ones(N, prefix_len, dtype=torch.bool, device=anc.device), anc], dim=1)
    if window is not None:
        if depths is None:
            raise DecodeError("a sliding-window mask needs the nodes' depths")
        d = torch.as_tensor(depths, device=anc.device)
        q_pos = prefix_len + d
        k_pos = torch.cat([torch.arange(prefix_len, device=anc.device), q_pos])
        m = m & (q_pos[:, None] - k_pos[None, :] < window)
    m = m[None, None]
    if dtype is None:
        return m
    return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)


def _cache_keep(cache: DynamicCache, start: int, keep: torch.Tensor | None, new_len: int) -> None:
    """Keep cache entries [0, start) + start + `keep` (in order); `keep=None` means a plain crop."""
    for layer in cache.layers:
        if keep is not None:
            # in place: the accepted rows move down to follow the prefix, then we cut
            layer.keys[:, :, start:start + keep.numel()] = layer.keys[:, :, start + keep]
            layer.values[:, :, start:start + keep.numel()] = layer.values[:, :, start + keep]
        layer.keys = layer.keys[:, :, :new_len]
        layer.values = layer.values[:, :, :new_len]


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------

@dataclass
class DraftTree:
    """One step's verified tree. Node 0 is the root (the last committed token, not yet in the
    target's cache); parents come before children. EAGLE's own trees are ordered by depth; the
    merged drafter appends its prompt-lookup nodes after the tree's, still after their parents."""

    tokens: list[int]  # target ids
    parents: list[int]  # -1 for the root
    depths: list[int]
    scores: list[float]  # cumulative draft log-probability (root 0); lookup nodes: see merge_chain
    mask: torch.Tensor  # [N, N] bool ancestor-or-self
    prefix_len: int  # tokens in the target cache before this tree (root's position)
    ngram: list[bool] | None = None  # merged drafter: True for nodes only the prompt lookup proposed

    @property
    def size(self) -> int:
        return len(self.tokens)


@dataclass
class StepRecord:
    accepted_nodes: list[int]  # tree nodes on the accepted path, root first
    new_tokens: list[int]  # tokens this step appended (accepted drafts + bonus, cut at a stop)
    draft_ms: float
    verify_ms: float
    other_ms: float
    tree_size: int
    tree: DraftTree | None = None  # kept when generate(keep_trees=True)
    target_argmax: list[int] | None = None  # greedy: the target's choice at every node
    target_logits: torch.Tensor | None = None  # kept with the tree: the target's logits at every node [N, V]
    ngram_accepted: int = 0  # merged drafter: accepted nodes that only the prompt lookup proposed

    @property
    def accept_length(self) -> int:
        return len(self.new_tokens)


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids (the first comes from the prefill)
    steps: list[StepRecord]
    stop_reason: str
    prefill_ms: float
    seconds: float  # wall clock of the whole generate call, prefill included
    text: str = ""

    @property
    def num_verify_steps(self) -> int:
        return len(self.steps)

    @property
    def accept_lengths(self) -> list[int]:
        return [s.accept_length for s in self.steps]

    @property
    def accept_length(self) -> float:
        """Generated tokens / verification steps, bonus included (SGLang's
        completion_tokens / spec_verify_ct; the prefill's token counts too)."""
        return len(self.token_ids) / max(1, len(self.steps))

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("nan")

    def timing(self) -> dict:
        n = max(1, len(self.steps))
        return {"draft_ms": sum(s.draft_ms for s in self.steps) / n,
                "verify_ms": sum(s.verify_ms for s in self.steps) / n,
                "other_ms": sum(s.other_ms for s in self.steps) / n,
                "tree_size": sum(s.tree_size for s in self.steps) / n}

    def summary(self) -> dict:
        return {"tokens": len(self.token_ids), "verify_steps": self.num_verify_steps,
                "accept_length": round(self.accept_length, 3), "tok_s": round(self.tokens_per_second, 2),
                "stop_reason": self.stop_reason, **{k: round(v, 2) for k, v in self.timing().items()}}


@dataclass
class BaselineResult:
    prompt_ids: list[int]
    token_ids: list[int]
    margins: list[float]  # top-2 logit margin at every generated position (greedy)
    stop_reason: str
    seconds: float
    text: str = ""

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("nan")


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------

@dataclass
class DecodeState:
    """Everything carried between steps (batch size 1)."""

    prompt_len: int
    tokens: list[int]  # prompt + generated
    generated: list[int]
    target_cache: DynamicCache
    draft_cache: DynamicCache
    root_hidden: torch.Tensor  # [H] the draft's pre-norm output at the last committed pair
    root_logprobs: torch.Tensor  # [draft_vocab] its log-probabilities: depth-1 candidates
    finished: bool = False
    stop_reason: str = ""
    lookup: "LookupRates | None" = None  # merged drafter: this generation's lookup acceptance, per depth

    @property
    def cached(self) -> int:
        """Tokens in the target's cache: all committed tokens but the last (the next root)."""
        return len(self.tokens) - 1


class EagleDecoder:
    """EAGLE-2/3 tree decoding with a target (`transformers` causal LM) and a draft head: an
    `Eagle3Draft` (EAGLE-3, fed the target's fused aux features) or an `Eagle1Draft` (fed the
    target's final state; with this dynamic tree that is EAGLE-2).

        dec = EagleDecoder(target, draft, SpecConfig(num_steps=4, topk=4, num_draft_tokens=16),
                           eos_ids=end_of_turn_ids(tokenizer, target.generation_config))
        res = dec.generate(input_ids, max_new_tokens=128)
        res.token_ids, res.accept_length

    Any head works: an untrained one lowers accept_length, never changes a greedy output.
    """

    def __init__(self, target, draft, spec: SpecConfig | None = None, eos_ids=(), tokenizer=None,
                 aux_layers: tuple[int, ...] | None = None):
        self.target, self.draft = target, draft
        self.spec = spec or SpecConfig()
        self.eos_ids = list(eos_ids)
        self.tokenizer = tokenizer
        tc = target.config.get_text_config()
        n = tc.num_hidden_layers
        from .draft import Eagle1Draft

        self.reads_final = isinstance(draft, Eagle1Draft)  # EAGLE-1/2: the final state, no aux layers
        if self.reads_final:
            if aux_layers:
                raise DecodeError("an EAGLE-1/2 head reads the target's final state: it takes no aux_layers")
            self.aux_layers = ()
            if draft.config.hidden_size != tc.hidden_size:
                raise DecodeError(f"EAGLE-1/2 head width {draft.config.hidden_size} != target hidden size "
                                  f"{tc.hidden_size}")
        else:
            # A head eaglebook built records its layers (on a hybrid target, full-attention ones). A head
            # that records none is decoded on the layers SGLang and vLLM feed it: (2, N//2, N-3).
            self.aux_layers = tuple(aux_layers or getattr(draft.config, "aux_layers", None)
                                    or default_aux_layers(n))
            if max(self.aux_layers) >= n:
                raise DecodeError(f"aux layers {self.aux_layers} do not exist in a {n}-layer target")
            if draft.fc.in_features != len(self.aux_layers) * tc.hidden_size:
                raise DecodeError(f"draft fc expects {draft.fc.in_features} features, the target gives "
                                  f"{len(self.aux_layers)} x {tc.hidden_size}")
        if draft.config.vocab_size != tc.vocab_size:
            raise DecodeError(f"draft vocab_size {draft.config.vocab_size} != target vocab {tc.vocab_size}")
        self.device = next(target.parameters()).device
        impl = getattr(target.config, "_attn_implementation", "sdpa")
        # eager attention adds the mask to the scores; sdpa takes a bool mask directly
        self._mask_dtype = next(target.parameters()).dtype if impl == "eager" else None
        self._mask_layout = verify_mask_layout(target.config)  # one mask, or one per layer type
        self.d2t_ids = draft.draft_ids.to(self.device)  # draft id -> target id, as one lookup

    # -- pieces ------------------------------------------------------------------------
    def _target(self, ids, pos, cache, mask=None, logits_at=None):
        feats: list = []
        with (capture_final(self.target, feats) if self.reads_final else
              capture_aux(self.target, self.aux_layers, feats)):
            logits = target_forward(self.target, ids, pos, cache, mask, logits_at)
        return logits, feats[0]

    def _draft_extend(self, state: DecodeState, feats: torch.Tensor, next_ids: list[int], start: int) -> None:
        """Append pairs (target feature at position start+i, token at start+i+1) to the draft cache."""
        ids = torch.tensor([next_ids], device=self.device)
        pos = torch.arange(start, start + len(next_ids), device=self.device)[None]
        out = self.draft(ids, feats, pos, past_key_values=state.draft_cache, logits=False)
        last = out.hidden[0, -1]
        state.root_hidden = last
        state.root_logprobs = torch.log_softmax(self.draft.compute_logits(last).float(), dim=-1)

    def prefill(self, input_ids, sampling: SamplingConfig | None = None, stop: StopChecker | None = None,
                generator: torch.Generator | None = None) -> DecodeState:
        """Target prefill (first token), then the draft's prefill from the target's features."""
        sampling = sampling or SamplingConfig()
        ids = _as_ids(input_ids, self.device)
        L = ids.shape[1]
        if L < 1:
            raise DecodeError("empty prompt: give at least one token")
        tcache, dcache = DynamicCache(), DynamicCache()
        logits, feats = self._target(ids, torch.arange(L, device=self.device)[None], tcache, logits_at=slice(-1, None))
        first = _pick(logits[0, -1], sampling, generator)
        state = DecodeState(prompt_len=L, tokens=ids[0].tolist(), generated=[], target_cache=tcache,
                            draft_cache=dcache, root_hidden=None, root_logprobs=None,
                            lookup=(LookupRates.fresh(self.spec.ngram_tokens, self.spec.ngram_prior)
                                    if self.spec.ngram_tokens else None))
        stop = stop or StopChecker(self.eos_ids, 1 << 30)
        _, why = stop.extend(state.generated, [first])
        state.tokens.append(first)
        if why:
            state.finished, state.stop_reason = True, why
            return state
        self._draft_extend(state, feats, state.tokens[1:], 0)
        return state

    @torch.no_grad()
    def build_tree(self, state: DecodeState) -> DraftTree:
        """Grow the draft tree from the root: one draft call per depth for the whole frontier."""
        k, steps, N = self.spec.topk, self.spec.num_steps, self.spec.num_draft_tokens
        dev, n = self.device, state.cached  # n = the root's position
        draft_len0 = cache_length(state.draft_cache)
        lp, tok = torch.topk(state.root_logprobs, k)  # depth 1, best first
        pool_scores, pool_tok, pool_parent = [lp], [tok], [torch.full((k,), -1, device=dev)]
        front_idx = torch.arange(k, device=dev)  # pool indices of the frontier
        front_scores, front_tok = lp, tok
        front_hidden = state.root_hidden.expand(k, -1)
        anc = torch.eye(k, dtype=torch.bool, device=dev)  # frontier x expanded-nodes-in-draft-cache
        eye = anc
        pool_size = k
        prefix_ones = torch.ones(k, draft_len0, dtype=torch.bool, device=dev)
        for depth in range(1, steps):
            mask = torch.cat([prefix_ones, anc], dim=1)[None, None]
            pos = torch.full((1, k), n - 1 + depth, device=dev)
            out = self.draft(self.d2t_ids[front_tok][None], front_hidden[None], pos, attention_mask=mask,
                             past_key_values=state.draft_cache)
            clp, ctok = torch.topk(torch.log_softmax(out.logits[0].float(), dim=-1), k, dim=-1)  # [k, k]
            cscores = (front_scores[:, None] + clp).flatten()
            pool_scores.append(cscores)
            pool_tok.append(ctok.flatten())
            pool_parent.append(front_idx.repeat_interleave(k))
            if depth < steps - 1:
                # expand the k best children next; a stable sort breaks ties toward earlier nodes
                best = torch.sort(cscores, descending=True, stable=True).indices[:k]
                par = best // k
                front_idx = pool_size + best
                front_scores, front_tok = cscores[best], ctok.flatten()[best]
                front_hidden = out.hidden[0, par]
                anc = torch.cat([anc[par], eye], dim=1)
            pool_size += k * k
        scores = torch.cat(pool_scores)
        toks = torch.cat(pool_tok)
        parents = torch.cat(pool_parent)
        depths = torch.cat([torch.full((k,), 1, device=dev)] +
                           [torch.full((k * k,), d + 1, device=dev) for d in range(1, steps)])
        # keep the best N-1; stable sort = ties go to shallower, earlier nodes (pool order is by depth),
        # so every kept node's parent (scored >= its child, and earlier) is kept too
        sel = torch.sort(scores, descending=True, stable=True).indices[: N - 1].sort().values
        node_of = torch.full((scores.numel(),), -1, dtype=torch.long, device=dev)
        node_of[sel] = torch.arange(1, sel.numel() + 1, device=dev)
        par_pool = parents[sel]
        par_node = torch.where(par_pool >= 0, node_of[par_pool.clamp(min=0)], torch.zeros_like(par_pool))
        if bool((par_node < 0).any()):
            raise DecodeError("internal: a kept node's parent was dropped")
        tokens = [state.tokens[-1]] + self.d2t_ids[toks[sel]].tolist()
        parents_l = [-1] + par_node.tolist()
        depth_l = [0] + depths[sel].tolist()
        score_l = [0.0] + scores[sel].tolist()
        Nn = len(tokens)
        m = torch.zeros(Nn, Nn, dtype=torch.bool, device=dev)
        m[0, 0] = True
        par_t = torch.tensor(parents_l, device=dev)
        dep_t = torch.tensor(depth_l, device=dev)
        for d in range(1, steps + 1):  # parents precede children: fill depth by depth
            rows = (dep_t == d).nonzero().flatten()
            if rows.numel():
                m[rows] = m[par_t[rows]]
                m[rows, rows] = True
        # drop the tree's entries from the draft cache: it is rebuilt from target features
        _cache_keep(state.draft_cache, draft_len0, None, draft_len0)
        return DraftTree(tokens=tokens, parents=parents_l, depths=depth_l, scores=score_l, mask=m, prefix_len=n)

    @torch.no_grad()
    def step(self, state: DecodeState, sampling: SamplingConfig | None = None, stop: StopChecker | None = None,
             generator: torch.Generator | None = None, keep_tree: bool = False) -> StepRecord:
        """One draft-verify-accept iteration."""
        if state.finished:
            raise DecodeError("generation already finished; start again with prefill()")
        sampling = sampling or SamplingConfig()
        stop = stop or StopChecker(self.eos_ids, 1 << 30)
        t0 = time.perf_counter()
        tree = self.build_tree(state)
        cont: list[int] = []
        if self.spec.ngram_tokens:  # the merged drafter: the context's own continuation competes for the tree
            cont = ngram_continuation(state.tokens, self.spec.ngram_tokens, self.spec.ngram_max, self.spec.ngram_min)
            tree = merge_chain(tree, cont, self.spec.num_draft_tokens, state.lookup.log_rates())
        t1 = time.perf_counter()
        n, dev = tree.prefix_len, self.device
        ids = torch.tensor([tree.tokens], device=dev)
        pos = (n + torch.tensor(tree.depths, device=dev))[None]
        masks = {kind: tree_attention_mask(tree.mask, n, self._mask_dtype, window, tree.depths)
                 for kind, window in self._mask_layout.items()}
        mask = masks.pop(None) if None in masks else masks
        logits, feats = self._target(ids, pos, state.target_cache, mask)
        logits = logits[0]
        argmax = logits.argmax(-1).tolist() if sampling.greedy else None
        t2 = time.perf_counter()
        path, bonus = self._accept(tree, logits, argmax, sampling, generator)
        proposed = [tree.tokens[i] for i in path[1:]] + [bonus]
        kept, why = stop.extend(state.generated, proposed)
        new = proposed[:kept]
        state.tokens.extend(new)
        if cont:
            state.lookup.update(cont, new)
        extend_ms = 0.0
        if why:
            state.finished, state.stop_reason = True, why
        else:
            # target cache: prefix + the root and accepted nodes (the bonus is the next root)
            keep = torch.tensor(path, device=dev)
            contiguous = path == list(range(len(path)))  # always so in a chain: a crop suffices
            _cache_keep(state.target_cache, n, None if contiguous else keep, n + len(path))
            t3 = time.perf_counter()
            self._draft_extend(state, feats[:, keep], new, n)
            extend_ms = (time.perf_counter() - t3) * 1e3
        other_ms = (time.perf_counter() - t2) * 1e3 - extend_ms
        return StepRecord(accepted_nodes=path, new_tokens=new, draft_ms=(t1 - t0) * 1e3 + extend_ms,
                          verify_ms=(t2 - t1) * 1e3, other_ms=other_ms, tree_size=tree.size,
                          tree=tree if keep_tree else None, target_argmax=argmax if keep_tree else None,
                          target_logits=logits if keep_tree else None,
                          ngram_accepted=sum(tree.ngram[i] for i in path[1:]) if tree.ngram else 0)

    def _accept(self, tree: DraftTree, logits, argmax, sampling, generator) -> tuple[list[int], int]:
        children: dict[int, list[int]] = {}
        for i, p in enumerate(tree.parents[1:], start=1):
            children.setdefault(p, []).append(i)
        path, cur = [0], 0
        if argmax is not None:
            while True:
                want = argmax[cur]
                nxt = next((c for c in children.get(cur, ()) if tree.tokens[c] == want), None)
                if nxt is None:
                    return path, want
                path.append(nxt)
                cur = nxt
        while True:
            p = processed_probs(logits[cur], sampling)
            nxt, tok = accept_among_children(p, [tree.tokens[c] for c in children.get(cur, ())], generator)
            if nxt is None:
                return path, tok
            cur = children[cur][nxt]
            path.append(cur)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_strings=(), keep_trees: bool = False
                 ) -> GenerationResult:
        sampling = SamplingConfig(temperature, top_p, top_k, seed)
        stop = StopChecker(self.eos_ids, max_new_tokens, stop_strings, self.tokenizer)
        gen = _generator(sampling, self.device)
        t0 = time.perf_counter()
        state = self.prefill(input_ids, sampling, stop, gen)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        steps = []
        while not state.finished:
            steps.append(self.step(state, sampling, stop, gen, keep_tree=keep_trees))
        secs = time.perf_counter() - t0
        res = GenerationResult(prompt_ids=state.tokens[:state.prompt_len], token_ids=list(state.generated),
                               steps=steps, stop_reason=state.stop_reason, prefill_ms=prefill_ms, seconds=secs)
        if self.tokenizer is not None:
            res.text = self.tokenizer.decode(res.token_ids, skip_special_tokens=True)
        return res


# --------------------------------------------------------------------------------------
# The merged drafter: prompt-lookup (n-gram) candidates competing for the EAGLE tree
# --------------------------------------------------------------------------------------

def ngram_continuation(tokens: list[int], max_tokens: int, max_ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """Prompt lookup: find the context's last n tokens earlier in the context (n = `max_ngram`
    down to `min_ngram`, the earliest occurrence first) and return up to `max_tokens` tokens
    that followed it; [] when no such suffix repeats. No model, no training: a small model
    that repeats its prompt and itself is drafted well by its own history. A one-token match
    (`min_ngram=1`) fires on nearly every common token and mostly guesses wrong, so the merged
    drafter asks for two."""
    if min_ngram < 1:
        raise DecodeError(f"min_ngram={min_ngram}: a lookup matches at least one token")
    L = len(tokens)
    t = torch.tensor(tokens)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        windows = t.unfold(0, n, 1)[: L - n]  # every earlier window; the suffix itself excluded
        hits = (windows == t[L - n:]).all(dim=1).nonzero()
        if hits.numel():
            start = int(hits[0]) + n
            return tokens[start:start + max_tokens]
    return []


@dataclass
class LookupRates:
    """How often the target accepts prompt-lookup tokens, per depth, measured as decoding goes.

    Depth d is the lookup's d-th token (the lookup hangs from the root, so it sits at tree
    depth d). After each step, `update` compares the lookup's proposal with the tokens the
    step committed: token d counts as proposed when tokens 1..d-1 matched and the step
    committed a d-th token, and as accepted when it matched that too. The rate is thus the
    chance of acceptance given the parent was accepted, and it is measured whether or not the
    branch made it into the tree (a branch that lost once can win later); since the committed
    tokens are the target's own (greedy) or distributed as the target's (sampling, the tree's
    siblings being distinct tokens), a match is exactly the event "this node would be accepted".

    With a Beta prior (`prior_accepted` of `prior_proposed` pseudo-observations) the rate is
    (accepted_d + prior_accepted) / (proposed_d + prior_proposed), always in (0, 1); its log
    plays the role of a draft log-probability. One LookupRates lives in each DecodeState,
    made fresh by `EagleDecoder.prefill`: a generation starts from the prior, so its output and
    its trees depend only on the prompt (and the seed), not on what was decoded before.
    """

    proposed: list[int]
    accepted: list[int]
    prior_accepted: float = 1.0
    prior_proposed: float = 2.0

    @classmethod
    def fresh(cls, depth: int, prior: float = 0.5, strength: float = 2.0) -> "LookupRates":
        """No observations yet: every depth starts at rate `prior`, worth `strength` observations."""
        return cls(proposed=[0] * depth, accepted=[0] * depth, prior_accepted=prior * strength,
                   prior_proposed=strength)

    def rates(self) -> list[float]:
        return [(a + self.prior_accepted) / (p + self.prior_proposed) for p, a in zip(self.proposed, self.accepted)]

    def log_rates(self) -> list[float]:
        """log(rate) per depth: the score a lookup node adds to its parent's."""
        return [math.log(r) for r in self.rates()]

    def update(self, chain: list[int], committed: list[int]) -> None:
        """Count the lookup's `chain` against the tokens the step `committed` (accepted + bonus)."""
        for d, tok in enumerate(chain[: len(self.proposed)]):
            if d >= len(committed):
                break
            self.proposed[d] += 1
            if committed[d] != tok:
                break
            self.accepted[d] += 1


def merge_chain(tree: DraftTree, chain: list[int], budget: int, log_rates: list[float]) -> DraftTree:
    """The tree with `chain` (tokens to follow the root) merged in, the best `budget` nodes kept.

    Walk the chain down from the root while the tree already has each token as a child:
    those nodes are shared and cost nothing. The rest would hang below the last shared node
    as new nodes. Every chain node gets a score like the draft's cumulative log-probability:
    its parent's score plus `log_rates[d - 1]`, the log of the measured acceptance rate of
    lookup tokens at its depth d (`LookupRates`); a shared node keeps the better of its two
    scores. Then, as EAGLE picks its own tree, the `budget - 1` best-scored nodes are kept
    (ties: the earlier node, so the tree's own nodes before the lookup's): a lookup node
    displaces only EAGLE nodes that score lower, and a lookup branch that scores lower than
    the tree's leaves is cut (or left out). Scores never rise from parent to child and a
    parent comes before its children, so every kept node's parent is kept; siblings stay
    distinct tokens, which the sampling rule needs. Verification then keeps whichever branch
    the target accepts.
    """
    if len(log_rates) < len(chain):
        raise DecodeError(f"merge_chain: {len(chain)} lookup tokens but rates for {len(log_rates)} depths")
    kids: dict[int, dict[int, int]] = {}
    for i in range(1, tree.size):
        kids.setdefault(tree.parents[i], {})[tree.tokens[i]] = i
    scores = list(tree.scores)
    cur, own = 0, 0.0  # own: the chain's score at the current node
    d = 0
    for d, tok in enumerate(chain):
        if tok not in kids.get(cur, {}):
            break
        cur = kids[cur][tok]
        own = max(scores[cur], own + log_rates[d])
        scores[cur] = own  # shared: the better of the two estimates
    else:
        d = len(chain)
    new = chain[d:]
    new_scores = []
    for j in range(len(new)):
        own += log_rates[d + j]
        new_scores.append(own)
    cand = scores[1:] + new_scores  # node i of the candidates = tree node i + 1, then the chain
    order = sorted(range(len(cand)), key=lambda i: (-cand[i], i))
    kept = sorted(order[: budget - 1])
    old = [0] + [i + 1 for i in kept if i + 1 < tree.size]
    n_new = sum(1 for i in kept if i + 1 >= tree.size)  # a prefix of the chain: parents outrank children
    if n_new == 0 and len(old) == tree.size:  # the lookup adds nothing (all shared, or cut): the same tree
        return tree if scores == tree.scores else DraftTree(
            tokens=tree.tokens, parents=tree.parents, depths=tree.depths, scores=scores, mask=tree.mask,
            prefix_len=tree.prefix_len, ngram=tree.ngram)
    index = {o: j for j, o in enumerate(old)}
    if any(tree.parents[o] not in index for o in old[1:]) or (n_new and cur not in index):
        raise DecodeError("internal: a kept node's parent was dropped")
    new = new[:n_new]
    tokens = [tree.tokens[o] for o in old] + new
    parents = [-1] + [index[tree.parents[o]] for o in old[1:]]
    parents += ([index[cur]] + list(range(len(old), len(old) + n_new - 1))) if n_new else []
    depths = [tree.depths[o] for o in old] + [tree.depths[cur] + 1 + j for j in range(n_new)]
    out_scores = [scores[o] for o in old] + new_scores[:n_new]
    ngram = [bool(tree.ngram and tree.ngram[o]) for o in old] + [True] * n_new
    m = torch.zeros(len(tokens), len(tokens), dtype=torch.bool, device=tree.mask.device)
    for i, p in enumerate(parents):  # parents come first: copy the parent's row, add self
        if p >= 0:
            m[i] = m[p]
        m[i, i] = True
    return DraftTree(tokens=tokens, parents=parents, depths=depths, scores=out_scores, mask=m,
                     prefix_len=tree.prefix_len, ngram=ngram)


def accept_among_children(p: torch.Tensor, child_tokens: list[int], generator=None) -> tuple[int | None, int]:
    """The multi-candidate rejection rule, for candidates chosen deterministically (top-k).

    Try the children in order. Each proposal is a point mass on its token, so child i is
    accepted with probability p_res(c_i) / 1, where p_res is the residual target
    distribution after the earlier rejections: p with the rejected tokens removed and
    renormalized (max(0, p - q) for a point mass q). If all are rejected, the bonus is
    drawn from that final residual. The emitted token is then distributed exactly as p.
    (EAGLE's rule divides by the draft's probability q(c_i) instead; that is exact only
    when the candidates were *sampled* from q, not taken as its top-k.)
    Returns (index of the accepted child or None, token).
    """
    remaining = 1.0
    for i, t in enumerate(child_tokens):
        pt = float(p[t])
        if remaining > 0 and _uniform(generator) * remaining < pt:
            return i, t
        remaining -= pt
    if child_tokens:
        p = p.clone()
        p[child_tokens] = 0.0
        if float(p.sum()) <= 0:  # every token with mass was a rejected child: impossible in exact arithmetic
            p[child_tokens] = 1.0
    return None, int(torch.multinomial(p / p.sum(), 1, generator=generator))


def _uniform(generator) -> float:
    return float(torch.rand((), generator=generator))


def _pick(logits: torch.Tensor, sampling: SamplingConfig, generator) -> int:
    if sampling.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(processed_probs(logits, sampling), 1, generator=generator))


def _generator(sampling: SamplingConfig, device) -> torch.Generator | None:
    if sampling.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def _as_ids(input_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise DecodeError(f"input_ids of shape {tuple(ids.shape)}: the reference engine decodes one sequence")
    return ids


# --------------------------------------------------------------------------------------
# The baseline: one token per target forward, through the same forward function
# --------------------------------------------------------------------------------------

@torch.no_grad()
def baseline_decode(target, input_ids, max_new_tokens: int = 256, eos_ids=(), temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop_strings=(),
                    tokenizer=None) -> BaselineResult:
    """Plain autoregressive decoding (greedy or sampled) with the same DynamicCache, attention
    implementation, dtype and forward call as the EAGLE engine; records top-2 margins."""
    sampling = SamplingConfig(temperature, top_p, top_k, seed)
    stop = StopChecker(eos_ids, max_new_tokens, stop_strings, tokenizer)
    dev = next(target.parameters()).device
    gen = _generator(sampling, dev)
    ids = _as_ids(input_ids, dev)
    L = ids.shape[1]
    cache = DynamicCache()
    t0 = time.perf_counter()
    logits = target_forward(target, ids, torch.arange(L, device=dev)[None], cache, logits_at=slice(-1, None))
    generated, margins = [], []
    pos = L
    while True:
        row = logits[0, -1]
        if sampling.greedy:
            top2 = torch.topk(row, 2).values
            margins.append(float(top2[0] - top2[1]))
        tok = _pick(row, sampling, gen)
        _, why = stop.extend(generated, [tok])
        if why:
            break
        logits = target_forward(target, torch.tensor([[tok]], device=dev), torch.tensor([[pos]], device=dev), cache)
        pos += 1
    secs = time.perf_counter() - t0
    res = BaselineResult(prompt_ids=ids[0].tolist(), token_ids=generated, margins=margins, stop_reason=why,
                         seconds=secs)
    if tokenizer is not None:
        res.text = tokenizer.decode(generated, skip_special_tokens=True)
    return res


def check_lossless(baseline: BaselineResult, eagle_ids: list[int], tol: float = 1e-4) -> dict:
    """docs/stages.md § 6: identical, or the first divergence sits where the baseline's top-2
    margin is below `tol` (a float rounding tie, not a bug)."""
    ref = baseline.token_ids
    i = next((j for j, (a, b) in enumerate(zip(ref, eagle_ids)) if a != b), None)
    if i is None:
        same = len(ref) == len(eagle_ids)
        return {"identical": same, "ok": same, "first_divergence": None if same else min(len(ref), len(eagle_ids)),
                "margin": None}
    margin = baseline.margins[i] if i < len(baseline.margins) else None
    return {"identical": False, "ok": margin is not None and margin < tol, "first_divergence": i, "margin": margin}


# --------------------------------------------------------------------------------------
# Prompts, comparisons and the `eaglebook generate` command
# --------------------------------------------------------------------------------------

def render_prompt_ids(tokenizer, messages) -> list[int]:
    """The one place this module renders a chat for the target (docs/stages.md § 1)."""
    try:
        from .data import render_prompt  # the suite's single render function, once it exists
    except ImportError:
        render_prompt = None
    if render_prompt is not None:
        out = render_prompt(tokenizer, messages)
        return list(out) if not isinstance(out, str) else tokenizer(out, add_special_tokens=False).input_ids
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # some tokenizers return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def compare(decoder: EagleDecoder, prompts: list[list[int]], max_new_tokens: int = 128, warmup: bool = True,
            tol: float = 1e-4, **sampling) -> dict:
    """Baseline and EAGLE on the same prompts, interleaved per prompt, in this process.

    Returns per-prompt rows and totals: speedup = EAGLE tok/s / baseline tok/s (sums of tokens
    over sums of seconds), accept_length over all steps, the lossless check per prompt."""
    if warmup and prompts:
        w = prompts[0][:32]
        baseline_decode(decoder.target, w, 4, decoder.eos_ids, **sampling)
        decoder.generate(w, 4, **sampling)
    rows = []
    for p in prompts:
        b = baseline_decode(decoder.target, p, max_new_tokens, decoder.eos_ids, **sampling)
        e = decoder.generate(p, max_new_tokens, **sampling)
        row = {"prompt_tokens": len(p), "baseline_tokens": len(b.token_ids), "eagle_tokens": len(e.token_ids),
               "baseline_s": b.seconds, "eagle_s": e.seconds, "accept_lengths": e.accept_lengths,
               "accept_length": e.accept_length, **e.timing(), "baseline": b, "eagle": e}
        if not sampling.get("temperature"):
            row.update(check_lossless(b, e.token_ids, tol))
        rows.append(row)
    bt = sum(r["baseline_tokens"] for r in rows) / max(1e-9, sum(r["baseline_s"] for r in rows))
    et = sum(r["eagle_tokens"] for r in rows) / max(1e-9, sum(r["eagle_s"] for r in rows))
    steps = sum(len(r["accept_lengths"]) for r in rows)
    tot = {"prompts": len(rows), "baseline_tok_s": bt, "eagle_tok_s": et, "speedup": et / bt if bt else float("nan"),
           "accept_length": sum(r["eagle_tokens"] for r in rows) / max(1, steps),
           "draft_ms": sum(r["draft_ms"] * len(r["accept_lengths"]) for r in rows) / max(1, steps),
           "verify_ms": sum(r["verify_ms"] * len(r["accept_lengths"]) for r in rows) / max(1, steps),
           "other_ms": sum(r["other_ms"] * len(r["accept_lengths"]) for r in rows) / max(1, steps)}
    if rows and "identical" in rows[0]:
        tot["identical"] = sum(r["identical"] for r in rows)
        tot["lossless_ok"] = all(r["ok"] for r in rows)
    return {"rows": rows, "total": tot}


DEFAULT_HEAD = "smollm2-135m-eagle3"  # the shipped default head's name


def load_head(target, draft_path: str | None = None, dtype=None):
    """A draft head for `target`: from `draft_path` (a saved head or a shipped name) when given,
    else an untrained one from `build_draft` (accept_length ~1, output unchanged)."""
    from . import draft as draft_mod
    from .export import load_draft

    if draft_path:
        d = load_draft(draft_path, target=target)
    else:
        d = draft_mod.build_draft(target)
    dt = dtype or next(target.parameters()).dtype
    return d.to(device=next(target.parameters()).device, dtype=dt).eval().requires_grad_(False)


def resolve_head(target, draft_path: str = "", run_dir: str | None = None, dtype=None):
    """(head, description): `draft_path` if given; else the shipped default (trained on far more
    data than a notebook can, so a learner sees a real speedup at once); else notebook 04's head in
    `run_dir`; else an untrained head (said plainly: it lowers accept_length only)."""
    if draft_path:
        return load_head(target, draft_path, dtype), f"head from {draft_path}"
    candidates = [(DEFAULT_HEAD, f"shipped default head {DEFAULT_HEAD!r}")]
    if run_dir:
        p = Path(run_dir) / "04-ttt-training" / "draft"
        if p.exists():
            candidates.append((str(p), f"trained head from notebook 04 ({p})"))
    reasons = []
    for path, what in candidates:
        try:
            return load_head(target, path, dtype), what
        except Exception as exc:  # fall through to the next candidate, and say why
            reasons.append(f"{what}: {type(exc).__name__}: {str(exc)[:160]}")
    return load_head(target, None, dtype), ("UNTRAINED head (build_draft): accept_length will be ~1 and there "
                                            "is no speedup, but the output is unchanged. Not used: "
                                            + " | ".join(reasons))


@dataclass
class GenerateArgs:
    """Decode prompts from a JSONL file with EAGLE; write one JSONL line per prompt."""

    prompts: str = field(metadata={"help": "JSONL: each line has 'messages' (chat), 'prompt' (a user text) "
                                           "or 'input_ids'; optional 'id'"})
    output: str = field(default="generate.jsonl", metadata={"help": "output JSONL path"})
    target: str = field(default="smollm2-135m", metadata={"help": "target: embedded name, folder or hub id"})
    draft: str = field(default="", metadata={"help": "draft head folder or shipped name; empty = the shipped "
                                                          "default head (smollm2-135m-eagle3) if it fits the target, "
                                                          "else an untrained head (the run says which)"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | auto"})
    num_steps: int = field(default=4, metadata={"help": "draft depth"})
    topk: int = field(default=4, metadata={"help": "branching per expanded node (1 = chain)"})
    num_draft_tokens: int = field(default=16, metadata={"help": "nodes verified, root included"})
    ngram: int = field(default=0, metadata={"help": "merged drafter: up to this many prompt-lookup tokens compete "
                                                    "by score for the EAGLE tree's num_draft_tokens (0 = EAGLE alone)"})
    max_new_tokens: int = field(default=128, metadata={"help": "generation limit"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0 = off)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings"})
    baseline: bool = field(default=False, metadata={"help": "also run plain decoding: identity and speedup"})
    limit: int = field(default=0, metadata={"help": "first N prompts only (0 = all)"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = default)"})


def _prompt_from_record(rec: dict, tokenizer) -> list[int]:
    if "input_ids" in rec:
        return [int(i) for i in rec["input_ids"]]
    if "messages" in rec:
        return render_prompt_ids(tokenizer, rec["messages"])
    if "prompt" in rec:
        return render_prompt_ids(tokenizer, [{"role": "user", "content": rec["prompt"]}])
    raise DecodeError(f"prompt record has none of 'input_ids', 'messages', 'prompt': keys {sorted(rec)}")


def run_generate(args: GenerateArgs) -> int:
    from .target import end_of_turn_ids, load_target

    from .cli import UserError, read_jsonl

    recs = []
    for n, rec in read_jsonl(args.prompts, "prompts file"):
        if not {"input_ids", "messages", "prompt"} & set(rec):
            raise UserError(f"{args.prompts}:{n}: needs 'messages', 'prompt' or 'input_ids'")
        recs.append(rec)
    target, tok = load_target(args.target, dtype=args.dtype, threads=args.threads or None)
    draft, what = resolve_head(target, args.draft)
    print(f"draft: {what}")
    dec = EagleDecoder(target, draft, SpecConfig(args.num_steps, args.topk, args.num_draft_tokens,
                                                 ngram_tokens=args.ngram),
                       eos_ids=end_of_turn_ids(tok, target.generation_config), tokenizer=tok)
    if args.limit:
        recs = recs[:args.limit]
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if recs:  # warm up both paths so the first prompt's timing is not a cold start
        w = _prompt_from_record(recs[0], tok)[:32]
        dec.generate(w, 4, **sampling)
        if args.baseline:
            baseline_decode(target, w, 4, dec.eos_ids, **sampling)
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n_ok = 0
    with open(out_path, "w") as fh:
        for i, rec in enumerate(recs):
            ids = _prompt_from_record(rec, tok)
            e = dec.generate(ids, args.max_new_tokens, stop_strings=args.stop, **sampling)
            row = {"id": rec.get("id", i), "prompt_tokens": len(ids), "token_ids": e.token_ids, "text": e.text,
                   "accept_lengths": e.accept_lengths, **e.summary(),
                   "spec": asdict(dec.spec)}
            if args.baseline:
                b = baseline_decode(target, ids, args.max_new_tokens, dec.eos_ids, stop_strings=args.stop,
                                    tokenizer=tok, **sampling)
                row["baseline_tok_s"] = round(b.tokens_per_second, 2)
                row["speedup"] = round(e.tokens_per_second / b.tokens_per_second, 3)
                if not args.temperature:
                    row.update(check_lossless(b, e.token_ids))
                    n_ok += row["ok"]
            fh.write(json.dumps(row) + "\n")
            print(f"[{i + 1}/{len(recs)}] {len(e.token_ids)} tokens, accept_length {e.accept_length:.2f}"
                  + (f", speedup {row['speedup']:.2f}x" if args.baseline else ""), flush=True)
    print(f"wrote {len(recs)} results to {out_path}")
    if args.baseline and not args.temperature and n_ok < len(recs):
        print(f"LOSSLESS CHECK FAILED on {len(recs) - n_ok} prompt(s)")
        return 1
    return 0


def _register() -> None:
    from .cli import register

    register("generate", GenerateArgs, run_generate)


_register()
