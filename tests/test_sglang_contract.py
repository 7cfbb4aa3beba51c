"""eaglebook's SGLang contract checked against SGLang's own code (the pinned `sglang` wheel, installed
without its dependencies: its server modules do not import on a CPU-only machine, so the source
files are read with `ast`, never executed).

Checked: every flag `bench` passes to `sglang.launch_server` is declared by SGLang's server
arguments; the exported EAGLE-3 directory names an architecture SGLang registers, and every
tensor in it maps, through `LlamaForCausalLMEagle3.load_weights`, onto a parameter of SGLang's
draft module (SGLang skips unknown names silently, so a misnamed tensor would stay random);
the config fields that change SGLang's draft structure agree with the head; and pinned layer
ids mean in SGLang what the export says they mean.
Not checked here (needs a GPU and a running server): that SGLang starts, loads the head and
accepts its tokens.
"""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from eaglebook import bench
from eaglebook import export as ex
from eaglebook.draft import build_draft

SPEC = importlib.util.find_spec("sglang")
pytestmark = pytest.mark.skipif(SPEC is None, reason="sglang==0.5.23 is not installed (scripts/install.sh installs it)")
SGLANG = Path(SPEC.submodule_search_locations[0]) if SPEC else None


def _tree(rel: str) -> ast.Module:
    return ast.parse((SGLANG / rel).read_text())


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)


def _assigned_attrs(cls: ast.ClassDef) -> set[str]:
    """Attribute paths assigned in __init__ (self.fc = ..., self.self_attn.qkv_proj = ...)."""
    out = set()
    for node in ast.walk(_method(cls, "__init__")):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            src = ast.unparse(t)
            if src.startswith("self."):
                out.add(src[len("self."):])
    return out


# ---------------------------------------------------------------------------- server flags

def sglang_cli_flags() -> set[str]:
    """Every `--flag` SGLang's server accepts: the dataclass-declared fields of its argument groups
    (`A[type, "help"]` or `A[type, Arg(...)]`, named `--field-name` unless `cli_name`, plus aliases,
    minus `no_cli`) and the arguments `ServerArgs.add_cli_args` adds by hand."""
    flags = set()
    for f in sorted((SGLANG / "srt" / "arg_groups" / "fields").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            ann = node.annotation
            if not (isinstance(ann, ast.Subscript) and ast.unparse(ann.value) == "A"):
                continue
            meta = ann.slice.elts[1] if isinstance(ann.slice, ast.Tuple) and len(ann.slice.elts) > 1 else None
            kw = {k.arg: k.value for k in meta.keywords} if isinstance(meta, ast.Call) else {}
            if "no_cli" in kw and ast.literal_eval(kw["no_cli"]):
                continue
            name = ast.literal_eval(kw["cli_name"]) if "cli_name" in kw else "--" + node.target.id.replace("_", "-")
            flags.add(name)
            if "aliases" in kw:
                flags.update(ast.literal_eval(kw["aliases"]))
    for node in ast.walk(_tree("srt/server_args.py")):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("add_argument"):
            flags.update(a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--"))
    return flags


def test_every_flag_bench_passes_is_an_sglang_server_flag():
    flags = sglang_cli_flags()
    assert {"--model-path", "--port", "--speculative-eagle-topk"} <= flags  # the reader finds SGLang's flags
    assert "--no-such-flag" not in flags
    cfg = bench.SGLangConfig(model_path="m", draft_path="d", dtype="bfloat16", context_length=4096,
                             mem_fraction_static=0.8, cuda_graph_max_bs=8, attention_backend="flashinfer",
                             disable_radix_cache=True)
    used = set()
    for mode in bench.MODES:
        cmd = bench.sglang_command(cfg, mode, bench.DraftSetting(num_steps=3, topk=4, num_draft_tokens=8))
        assert cmd[1:3] == ["-m", "sglang.launch_server"]
        used.update(t for t in cmd if t.startswith("--"))
    assert (SGLANG / "launch_server.py").is_file()
    assert used - flags == set(), f"bench passes flags SGLang does not declare: {sorted(used - flags)}"
    # the algorithm name and the context-length environment switch exist too
    assert '"EAGLE3"' in (SGLANG / "srt" / "speculative" / "spec_info.py").read_text() or \
        "EAGLE3" in (SGLANG / "srt" / "arg_groups" / "fields" / "spec.py").read_text()
    env = next(iter(bench.sglang_env(cfg)))
    assert f"{env} = EnvBool" in (SGLANG / "srt" / "environ.py").read_text()


# ---------------------------------------------------------------------------- the EAGLE-3 directory

def sglang_eagle3_loader() -> dict:
    """What llama_eagle3.py registers and how its load_weights renames checkpoint keys."""
    tree = _tree("srt/models/llama_eagle3.py")
    entry = next(n for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "EntryClass")
    classes = _classes(tree)
    lw = _method(classes["LlamaForCausalLMEagle3"], "load_weights")
    lits = {}
    for node in ast.walk(lw):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                lits[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    skipped = {c.value for n in ast.walk(lw) if isinstance(n, ast.Compare)
               for c in [n.left] if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return {"archs": [ast.unparse(e) for e in entry.value.elts], "legacy": lits["legacy_name_map"],
            "stacked": lits["stacked_params_mapping"], "special": skipped, "classes": classes}


def sglang_parameter_for(key: str, loader: dict) -> str | None:
    """The SGLang parameter a checkpoint key loads into, following load_weights (None: consumed,
    e.g. d2t becomes the hot-token map, t2d is skipped)."""
    for legacy, new in loader["legacy"].items():
        if legacy in key:
            key = key.replace(legacy, new)
    if "d2t" in key or "t2d" in key:
        assert {"d2t", "t2d"} <= loader["special"]
        return None
    for param, shard, _ in loader["stacked"]:
        if shard in key:
            key = key.replace(shard, param)
            break
    return key if key.startswith("lm_head") else f"model.{key}"


def sglang_parameter_names(cfg) -> set[str]:
    """Parameter names of SGLang's EAGLE-3 draft, each attribute checked to be assigned in its
    class's __init__ in SGLang's source (llama_eagle3.py, and llama.py for the inherited parts)."""
    e3 = sglang_eagle3_loader()["classes"]
    base = _classes(_tree("srt/models/llama.py"))
    root = _assigned_attrs(e3["LlamaForCausalLMEagle3"])
    model = _assigned_attrs(e3["LlamaModel"])
    layer = _assigned_attrs(e3["LlamaDecoderLayer"]) | _assigned_attrs(base["LlamaDecoderLayer"])
    attn, mlp = _assigned_attrs(base["LlamaAttention"]), _assigned_attrs(base["LlamaMLP"])
    assert {"model", "lm_head"} <= root and {"embed_tokens", "fc", "layers", "norm"} <= model
    assert {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "hidden_norm",
            "self_attn.qkv_proj"} <= layer
    names = {"model.embed_tokens.weight", "model.fc.weight", "model.norm.weight", "lm_head.weight"}
    names |= {f"model.layers.0.{a}.weight" for a in ("input_layernorm", "post_attention_layernorm", "hidden_norm")}
    names |= {f"model.layers.0.self_attn.{a}.weight" for a in attn & {"qkv_proj", "o_proj"}}
    names |= {f"model.layers.0.mlp.{a}.weight" for a in mlp & {"gate_up_proj", "down_proj"}}
    return names


def test_exported_eagle3_dir_is_what_sglang_loads(tiny_llama, tmp_path):
    loader = sglang_eagle3_loader()
    head = build_draft(tiny_llama, torch.arange(0, 512, 2) - torch.arange(256), _t2d(), aux_layers=(3, 4, 6))
    path = ex.export_eagle3(head, tmp_path / "e3", tiny_llama, ex.head_provenance(tiny_llama))
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [ex.EAGLE3_ARCH] and ex.EAGLE3_ARCH in loader["archs"]
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    params = sglang_parameter_names(head.config)
    mapped = {k: sglang_parameter_for(k, loader) for k in keys}
    unknown = {k: v for k, v in mapped.items() if v is not None and v not in params}
    assert not unknown, f"SGLang would silently skip {unknown}"
    # and every parameter SGLang must load from the draft gets a tensor (the embedding is the target's)
    shards = {p: {s for _, s, sid in loader["stacked"] for k in keys if s in k and p in mapped[k]}
              for p, _, _ in loader["stacked"]}
    assert shards[".qkv_proj"] == {".q_proj", ".k_proj", ".v_proj"} and shards[".gate_up_proj"] == {".gate_proj", ".up_proj"}
    assert params - {"model.embed_tokens.weight"} == {v for v in mapped.values() if v is not None}
    assert "d2t" in keys  # becomes SGLang's hot-token map: target id = draft id + d2t
    # config fields that change SGLang's draft structure agree with the head
    src = (SGLANG / "srt" / "models" / "llama_eagle3.py").read_text()
    for field in ("draft_vocab_size", "target_hidden_size", "tie_word_embeddings", '"bias"', '"norm_before_fc"',
                  '"fc_norm"', '"norm_output"'):
        assert field in src
    assert cfg["tie_word_embeddings"] is False  # else SGLang would use the embedding as lm_head
    assert cfg["draft_vocab_size"] == 256 and cfg["target_hidden_size"] == 64
    assert not any(cfg.get(k) for k in ("bias", "norm_before_fc", "fc_norm", "use_aux_norm", "norm_output"))


def _t2d():
    t2d = torch.zeros(49152, dtype=torch.bool)
    t2d[torch.arange(0, 512, 2)] = True
    return t2d


def test_pinned_layer_ids_mean_in_sglang_what_the_export_says(tiny_llama, tmp_path):
    """SGLang reads eagle_config.eagle_aux_hidden_state_layer_ids and captures the input of layer
    id+1 (= HF hidden_states[id+1]); with no ids, HF indices (2, N//2, N-3)."""
    aux = (ast.unparse(n) for n in ast.walk(_tree("srt/model_executor/model_runner_components/spec_aux_hidden_state.py"))
           if isinstance(n, ast.Subscript))
    assert "eagle_config['eagle_aux_hidden_state_layer_ids']" in set(aux)
    fn = _method(_classes(_tree("srt/models/llama.py"))["LlamaForCausalLM"], "set_eagle3_layers_to_capture")
    values = [ast.unparse(n.value) for n in ast.walk(fn) if isinstance(n, ast.Assign)
              and ast.unparse(n.targets[0]) == "self.model.layers_to_capture"]
    assert values == ["[2, num_layers // 2, num_layers - 3]", "[val + 1 for val in layer_ids]"]
    from eaglebook.hidden_states import default_aux_layers

    n = tiny_llama.config.num_hidden_layers
    assert list(default_aux_layers(n)) == [2, n // 2, n - 3]  # SGLang's own default, same indices
    head = build_draft(tiny_llama, aux_layers=(1, 4, 6))
    ex.export_eagle3(head, tmp_path / "p", tiny_llama, ex.head_provenance(tiny_llama))
    ids = json.loads((tmp_path / "p" / "config.json").read_text())["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert [i + 1 for i in ids] == [1, 4, 6]  # what SGLang then captures, in HF indices
