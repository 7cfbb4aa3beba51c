"""The EAGLE-3 draft head, built from `transformers`' own Llama pieces.

One decoder layer reads two things at every position t:
  - the embedding of the next token x_{t+1} (from the target, frozen), and
  - a feature h_t: at the first draft step the target's fused low/mid/high features
    (3*H_target wide, squeezed by `fc`), at later steps the draft's own previous output.
Attention sees `cat(input_layernorm(embedding), hidden_norm(h))`, so q/k/v are 2H wide.
The layer's pre-norm output feeds the next draft step; `norm` + a reduced-vocabulary
`lm_head` turn it into logits over `draft_vocab` ids, mapped back with `d2t`.

The module names (`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`) are exactly the
checkpoint keys SGLang and vLLM read (docs/stages.md § 9).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .target import LogitMap, logit_map


class DraftError(ValueError):
    """A draft head whose shapes, keys or provenance disagree with what it is used with."""


def draft_config_from_target(target_config, draft_vocab_size: int | None = None,
                             aux_layers: tuple[int, ...] | None = None) -> LlamaConfig:
    """A one-layer Llama config for the draft, sized from any Llama/Qwen/Mistral target config.

    The draft copies the target's width, heads, head_dim, MLP size, norm eps and RoPE, so
    the same code serves SmolLM2-135M and Llama-3.1-8B. `vocab_size` stays the target's;
    `draft_vocab_size` is the reduced head (None = the full target vocab). `aux_layers` (HF
    indices) are the layers the head reads; None = the target's default, which on a
    hybrid-attention target is its full-attention choice (recorded, so exports pin it).
    """
    tc = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    if aux_layers is None:
        from .hidden_states import choose_aux_layers, layer_types_of

        types = layer_types_of(tc)
        if types is not None:
            aux_layers = choose_aux_layers(tc.num_hidden_layers, types)
    n_heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // n_heads
    rope = getattr(tc, "rope_parameters", None) or {"rope_type": "default",
                                                     "rope_theta": getattr(tc, "rope_theta", 10000.0)}
    if "full_attention" in rope and isinstance(rope["full_attention"], dict):
        rope = rope["full_attention"]  # hybrid models keep RoPE per layer type; the draft attends fully
    cfg = LlamaConfig(
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=n_heads,
        num_key_value_heads=getattr(tc, "num_key_value_heads", n_heads),
        head_dim=head_dim,
        hidden_act=getattr(tc, "hidden_act", "silu"),
        rms_norm_eps=getattr(tc, "rms_norm_eps", None) or tc.layer_norm_eps,  # Cohere: layer_norm_eps
        max_position_embeddings=tc.max_position_embeddings,
        rope_parameters=dict(rope),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=getattr(tc, "bos_token_id", None),
        eos_token_id=getattr(tc, "eos_token_id", None),
        pad_token_id=getattr(tc, "pad_token_id", None),
    )
    cfg.draft_vocab_size = draft_vocab_size or tc.vocab_size
    cfg.target_hidden_size = tc.hidden_size
    cfg.num_aux_hidden_states = 3
    cfg.target_num_hidden_layers = tc.num_hidden_layers
    cfg.aux_layers = list(aux_layers) if aux_layers is not None else None
    cfg._attn_implementation = "sdpa"
    return cfg


class Eagle3DecoderLayer(nn.Module):
    """A Llama decoder layer whose attention reads cat(embedding, feature): 2H-wide q/k/v."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        wide = copy.copy(config)
        wide.hidden_size = 2 * config.hidden_size  # only q/k/v see the doubled width
        self.self_attn = LlamaAttention(wide, layer_idx=0)
        n = config.num_attention_heads * config.head_dim
        self.self_attn.o_proj = nn.Linear(n, config.hidden_size, bias=False)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, embeds, hidden, position_embeddings, attention_mask, past_key_values=None):
        residual = hidden
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        attn, _ = self.self_attn(x, position_embeddings=position_embeddings, attention_mask=attention_mask,
                                 past_key_values=past_key_values)
        h = residual + attn
        return h + self.mlp(self.post_attention_layernorm(h))


@dataclass
class DraftOutput:
    logits: torch.Tensor  # [B, T, draft_vocab]
    hidden: torch.Tensor  # [B, T, H] pre-norm layer output: the next draft step's feature
    past_key_values: DynamicCache | None = None


class Eagle3Draft(nn.Module):
    """The EAGLE-3 draft head (see the module docstring for the data flow)."""

    target_logits = LogitMap()  # the target's logit map, set by init_from_target (identity until then)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        H, V, Vd = config.hidden_size, config.vocab_size, config.draft_vocab_size
        self.embed_tokens = nn.Embedding(V, H)
        self.embed_tokens.weight.requires_grad_(False)  # shared with the target, frozen
        self.fc = nn.Linear(config.num_aux_hidden_states * config.target_hidden_size, H, bias=False)
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = LlamaRMSNorm(H, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(H, Vd, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.register_buffer("d2t", torch.zeros(Vd, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(V, dtype=torch.bool) if Vd == V else torch.zeros(V, dtype=torch.bool))

    # -- vocabulary ------------------------------------------------------------------------
    def set_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Install a draft-vocabulary map (target_id = draft_id + d2t[draft_id])."""
        Vd, V = self.config.draft_vocab_size, self.config.vocab_size
        if d2t.shape != (Vd,) or t2d.shape != (V,):
            raise DraftError(f"vocab map shapes d2t {tuple(d2t.shape)}, t2d {tuple(t2d.shape)}; "
                             f"expected ({Vd},) and ({V},)")
        ids = d2t.long() + torch.arange(Vd)
        if not torch.equal(torch.nonzero(t2d.bool()).flatten(), ids):
            raise DraftError("vocab map is inconsistent: nonzero(t2d) != d2t + arange(draft_vocab)")
        self.d2t.copy_(d2t.long())
        self.t2d.copy_(t2d.bool())

    @property
    def draft_ids(self) -> torch.Tensor:
        """Target ids of the draft vocabulary, in draft order."""
        return self.d2t + torch.arange(self.d2t.numel(), device=self.d2t.device)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def init_from_target(self, target, lm_head_rows: bool = True) -> None:
        """Copy the target's (frozen) embedding, and optionally its output rows at the draft ids."""
        copy_from_target(self, target, lm_head_rows)

    @property
    def feature_width(self) -> int:
        """Width of the target features the head reads at its first step (k aux layers x H)."""
        return self.fc.in_features

    # -- forward -------------------------------------------------------------------------
    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Target features (3*H_target wide) go through fc; the draft's own H-wide state does not."""
        if hidden.shape[-1] == self.fc.in_features:
            return self.fc(hidden)
        if hidden.shape[-1] != self.config.hidden_size:
            raise DraftError(f"hidden width {hidden.shape[-1]} is neither the fused target features "
                             f"({self.fc.in_features}) nor the draft state ({self.config.hidden_size})")
        return hidden

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, past_key_values: DynamicCache | None = None,
                logits: bool = True) -> DraftOutput:
        """One draft pass over T query positions.

        input_ids: [B, T] the tokens whose embeddings enter (x_{t+1} beside feature h_t).
        hidden: [B, T, 3*H_target] target features or [B, T, H] the draft's previous outputs.
        position_ids: [B, T] rotary positions.
        attention_mask: [B, 1, T, S] bool (True = may attend) over cached + new keys;
            None means plain causal attention over the cache and the new positions.
        past_key_values: a DynamicCache that receives this pass's keys and values.
        """
        if attention_mask is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            T = input_ids.shape[1]
            attention_mask = causal_mask(T, past + T, device=input_ids.device)
        embeds = self.embed_tokens(input_ids).to(self.fc.weight.dtype)
        h = self.project(hidden.to(self.fc.weight.dtype))
        pos_emb = self.rotary_emb(h, position_ids)
        out = self.midlayer(embeds, h, pos_emb, attention_mask, past_key_values)
        lg = self.compute_logits(out) if logits else None
        return DraftOutput(logits=lg, hidden=out, past_key_values=past_key_values)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of the layer's output: final norm, then the reduced lm_head."""
        return self.lm_head(self.norm(hidden))


@torch.no_grad()
def copy_from_target(draft, target, lm_head_rows: bool = True) -> None:
    """The target's embedding into `draft`, and its output rows at `draft.draft_ids` into the lm_head
    (all rows for an EAGLE-1/2 head, whose draft ids are the whole vocabulary). The head also keeps
    the target's `LogitMap` (`target_logits`): training turns stored final features into the target's
    logits with it, and an EAGLE-1/2 head's borrowed lm_head applies it."""
    draft.target_logits = logit_map(target.config)
    emb = target.get_input_embeddings().weight
    if emb.shape != draft.embed_tokens.weight.shape:
        raise DraftError(f"target embedding {tuple(emb.shape)} != draft {tuple(draft.embed_tokens.weight.shape)}")
    draft.embed_tokens.weight.copy_(emb)
    if lm_head_rows:
        head = target.get_output_embeddings().weight
        draft.lm_head.weight.copy_(head[draft.draft_ids.to(head.device)])


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """[1, 1, q_len, kv_len] bool: the q new positions follow kv_len - q_len cached ones."""
    past = kv_len - q_len
    q = torch.arange(q_len, device=device)[:, None] + past
    k = torch.arange(kv_len, device=device)[None, :]
    return (k <= q)[None, None]


def build_draft(target, d2t: torch.Tensor | None = None, t2d: torch.Tensor | None = None,
                aux_layers: tuple[int, ...] | None = None, init_lm_head: bool = True,
                dtype: torch.dtype | None = None) -> Eagle3Draft:
    """An EAGLE-3 head for `target`, with its vocab map and the target's embedding (frozen).

    Without a vocab map the draft predicts the full target vocabulary.
    """
    vd = int(d2t.numel()) if d2t is not None else None
    cfg = draft_config_from_target(target.config, draft_vocab_size=vd, aux_layers=aux_layers)
    draft = Eagle3Draft(cfg)
    if d2t is not None:
        if t2d is None:
            raise DraftError("give t2d with d2t")
        draft.set_vocab(d2t, t2d)
    draft.init_from_target(target, lm_head_rows=init_lm_head)
    dev = next(target.parameters()).device
    return draft.to(device=dev, dtype=dtype or next(target.parameters()).dtype)


# --------------------------------------------------------------------------------------
# EAGLE-1/2: the head EAGLE-3 grew out of
# --------------------------------------------------------------------------------------

class Eagle1Draft(nn.Module):
    """The EAGLE-1/2 draft head: `fc` over cat(embedding, feature), one decoder layer, the
    target's own lm_head.

    The feature is the target's *final* hidden state (`hidden_states[N]`, already normalized)
    at the first step, and the draft's own output at later steps: EAGLE-1 regresses that
    feature, so the output goes straight into the target's lm_head (no final norm). Layer 0
    has no `input_layernorm` (the fc output enters attention as is). Keys follow SGLang's
    `LlamaForCausalLMEagle`: `fc.weight`, `fc.bias`, `layers.0.*`.
    Same forward signature and output as `Eagle3Draft`; its vocabulary is the full target one.
    """

    target_logits = LogitMap()  # the target's logit map, set by init_from_target (identity until then)

    def __init__(self, config: LlamaConfig, fc_bias: bool = True):
        super().__init__()
        self.config = config
        H, V = config.hidden_size, config.vocab_size
        if config.draft_vocab_size != V:
            raise DraftError(f"an EAGLE-1/2 head predicts the full target vocabulary ({V}); "
                             f"got draft_vocab_size {config.draft_vocab_size}")
        self.embed_tokens = nn.Embedding(V, H)
        self.embed_tokens.weight.requires_grad_(False)  # shared with the target, frozen
        self.fc = nn.Linear(2 * H, H, bias=fc_bias)
        if fc_bias:
            nn.init.zeros_(self.fc.bias)  # an untrained bias of zeros exports to vLLM (which has none) too
        layer = LlamaDecoderLayer(config, layer_idx=0)
        layer.input_layernorm = nn.Identity()  # EAGLE drops it on layer 0: fc output enters attention
        self.layers = nn.ModuleList([layer])
        self.lm_head = nn.Linear(H, V, bias=False)  # the target's, frozen
        self.lm_head.weight.requires_grad_(False)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    @property
    def draft_ids(self) -> torch.Tensor:
        return torch.arange(self.config.vocab_size, device=self.fc.weight.device)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids  # the full vocabulary: draft ids are target ids

    def init_from_target(self, target, lm_head_rows: bool = True) -> None:
        """Copy the target's embedding and output head (both stay frozen)."""
        copy_from_target(self, target, lm_head_rows)

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, past_key_values: DynamicCache | None = None,
                logits: bool = True) -> DraftOutput:
        """One draft pass; arguments as `Eagle3Draft.forward`, but `hidden` is always H wide."""
        if hidden.shape[-1] != self.config.hidden_size:
            raise DraftError(f"hidden width {hidden.shape[-1]} != {self.config.hidden_size}: an EAGLE-1/2 head "
                             "reads the target's final hidden state (or its own output)")
        if attention_mask is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            T = input_ids.shape[1]
            attention_mask = causal_mask(T, past + T, device=input_ids.device)
        embeds = self.embed_tokens(input_ids).to(self.fc.weight.dtype)
        h = self.fc(torch.cat([embeds, hidden.to(self.fc.weight.dtype)], dim=-1))
        pos_emb = self.rotary_emb(h, position_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=past_key_values, position_embeddings=pos_emb)
        lg = self.compute_logits(h) if logits else None
        return DraftOutput(logits=lg, hidden=h, past_key_values=past_key_values)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the output: it regresses the target's (normed) final state, so no final norm;
        the target's own lm_head and logit map make them the target's logits for that state."""
        return self.target_logits(self.lm_head(hidden))

    @property
    def feature_width(self) -> int:
        return self.config.hidden_size


def build_eagle1_draft(target, fc_bias: bool = True, dtype: torch.dtype | None = None) -> Eagle1Draft:
    """An EAGLE-1/2 head for `target`, sharing its embedding and lm_head (frozen)."""
    cfg = draft_config_from_target(target.config)
    draft = Eagle1Draft(cfg, fc_bias=fc_bias)
    draft.init_from_target(target)
    dev = next(target.parameters()).device
    return draft.to(device=dev, dtype=dtype or next(target.parameters()).dtype)


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Trainable parameters by top-level module, plus `trainable` and `frozen` totals.

    Frozen tensors (the embedding shared with the target, an EAGLE-1 head's borrowed lm_head)
    are not the draft's own cost, so they count only under `frozen`.
    """
    out: dict[str, int] = {}
    frozen = 0
    for name, p in module.named_parameters():
        if not p.requires_grad:
            frozen += p.numel()
            continue
        key = name.split(".")[0]
        out[key] = out.get(key, 0) + p.numel()
    out["trainable"] = sum(out.values())
    out["frozen"] = frozen
    return out
