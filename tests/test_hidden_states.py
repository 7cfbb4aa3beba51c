"""Hidden-state capture and storage (docs/stages.md §§ 2 and 7)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eaglebook import hidden_states as hs

from conftest import tiny_llama_config

REPO = Path(__file__).resolve().parent.parent


def random_sequences(n=10, lo=5, hi=40, vocab=49152, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(lo, hi + 1, (1,), generator=g))
        out.append({"input_ids": torch.randint(3, vocab, (t,), generator=g).tolist(),
                    "loss_mask": torch.randint(0, 2, (t,), generator=g).tolist()})
    return out


def reference_item(model, seq, aux_layers):
    """Per-sequence oracle through output_hidden_states (no padding, no hooks)."""
    ids = torch.tensor([seq["input_ids"]])
    hsts = hs.oracle_hidden_states(model, ids)
    return {"aux_hidden": torch.cat([hsts[j][0] for j in aux_layers], -1), "final_hidden": hsts[-1][0]}


# ---------------------------------------------------------------- layer conventions

def test_default_aux_layers_and_both_conventions():
    assert hs.default_aux_layers(30) == (2, 15, 27)  # SmolLM2-135M
    assert hs.hf_to_sglang((2, 15, 27), 30) == [1, 14, 26]
    assert hs.default_aux_layers(32) == (2, 16, 29)  # Llama-3.1-8B
    assert hs.hf_to_sglang((2, 16, 29), 32) == [1, 15, 28]
    assert hs.sglang_to_hf([1, 15, 28], 32) == [2, 16, 29]
    for n in (7, 8, 24, 36, 61, 80):  # SGLang's own default formula names the same tensors
        assert hs.hf_to_sglang(hs.default_aux_layers(n), n) == [1, n // 2 - 1, n - 4]
        assert hs.sglang_to_hf(hs.hf_to_sglang(hs.default_aux_layers(n), n), n) == list(hs.default_aux_layers(n))
    assert len(set(hs.default_aux_layers(8))) == 3


def test_conventions_refuse_what_has_no_counterpart():
    with pytest.raises(ValueError, match="at least 7"):
        hs.default_aux_layers(6)
    with pytest.raises(ValueError, match="embedding output"):
        hs.hf_to_sglang([0])
    with pytest.raises(ValueError, match="normed"):
        hs.hf_to_sglang([30], 30)  # hidden_states[N] is after the final norm; SGLang 29 is before it
    with pytest.raises(ValueError, match="out of range"):
        hs.sglang_to_hf([29], 30)
    with pytest.raises(ValueError, match="out of range"):
        hs.resolve_aux_layers(30, [2, 31], warn=False)
    with pytest.raises(ValueError, match="repeat"):
        hs.resolve_aux_layers(30, [2, 2, 5], warn=False)


def test_custom_aux_layers_warn_and_are_recorded_in_both_conventions():
    with pytest.warns(UserWarning, match="custom aux layers HF \\[4, 8, 12\\]"):
        hf = hs.resolve_aux_layers(30, [3, 7, 11], convention="sglang")
    assert hf == (4, 8, 12)
    assert hs.aux_layers_record(30, hf) == {"hf": [4, 8, 12], "sglang": [3, 7, 11], "default": False}
    assert hs.aux_layers_record(30, (2, 15, 27)) == {"hf": [2, 15, 27], "sglang": [1, 14, 26], "default": True}
    with pytest.warns(UserWarning):
        assert hs.resolve_aux_layers(8, [0, 4, 7]) == (0, 4, 7)
    assert hs.aux_layers_record(8, (0, 4, 7))["sglang"] is None  # the embedding output has no SGLang id


def test_final_normed_state_is_refused_as_an_aux_layer(tiny_llama):
    # hidden_states[N] is after the final norm; engines capture pre-norm residual states only
    with pytest.raises(ValueError, match="after the final norm.*pre-norm"):
        hs.resolve_aux_layers(8, [2, 4, 8], warn=False)
    with pytest.raises(ValueError, match="after the final norm"):
        hs.capture_batch(tiny_llama, torch.randint(3, 100, (1, 5)), aux_layers=(2, 4, 8))
    with pytest.raises(ValueError, match="out of range"):
        hs.resolve_aux_layers(8, [1, 3, 7], convention="sglang", warn=False)  # no SGLang id names it either


# ---------------------------------------------------------------- capture == oracle

def test_capture_equals_output_hidden_states_and_teacher_logits(tiny_llama):
    ids = torch.randint(3, 49152, (2, 17))
    n = tiny_llama.config.num_hidden_layers
    feats = hs.capture_batch(tiny_llama, ids)
    oracle = hs.oracle_hidden_states(tiny_llama, ids)
    assert len(oracle) == n + 1
    h = tiny_llama.config.hidden_size
    for k, j in enumerate(hs.default_aux_layers(n)):
        torch.testing.assert_close(feats["aux_hidden"][..., k * h:(k + 1) * h], oracle[j], rtol=0, atol=0)
    torch.testing.assert_close(feats["final_hidden"], oracle[n], rtol=0, atol=0)
    logits = tiny_llama(input_ids=ids).logits
    torch.testing.assert_close(hs.teacher_logits(tiny_llama, feats["final_hidden"]), logits, rtol=1e-5, atol=1e-5)


def test_capture_on_smollm2_matches_oracle(smollm2):
    model, tok = smollm2
    text = tok.apply_chat_template([{"role": "user", "content": "Name three primes."}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    feats = hs.capture_batch(model, ids)
    oracle = hs.oracle_hidden_states(model, ids)
    assert feats["aux_hidden"].shape == (1, ids.shape[1], 3 * 576)
    for k, j in enumerate((2, 15, 27)):
        torch.testing.assert_close(feats["aux_hidden"][..., k * 576:(k + 1) * 576], oracle[j], rtol=0, atol=0)
    # hidden_states[j] is the *input* of layer j: one layer off is a different tensor.
    assert not torch.allclose(feats["aux_hidden"][..., :576], oracle[3])
    torch.testing.assert_close(hs.teacher_logits(model, feats["final_hidden"]), model(ids).logits,
                               rtol=1e-4, atol=1e-4)


def test_capture_custom_layers_including_embedding_and_last_input(tiny_llama):
    ids = torch.randint(3, 49152, (1, 9))
    with pytest.warns(UserWarning):
        feats = hs.capture_batch(tiny_llama, ids, aux_layers=(0, 5, 7))
    oracle = hs.oracle_hidden_states(tiny_llama, ids)
    torch.testing.assert_close(feats["aux_hidden"], torch.cat([oracle[0], oracle[5], oracle[7]], -1), rtol=0, atol=0)


def test_batched_capture_with_padding_equals_per_sequence(tiny_llama, smollm2_tokenizer, tmp_path):
    seqs = random_sequences(7, 3, 30, seed=1)
    aux = hs.default_aux_layers(8)
    hs.write_features(tiny_llama, smollm2_tokenizer, seqs, tmp_path, storage="float32", batch_size=4,
                      progress=False, verify="size")
    ds = hs.FeatureDataset(tmp_path)
    assert len(ds) == 7
    for i, s in enumerate(seqs):
        item = ds[i]
        ref = reference_item(tiny_llama, s, aux)
        assert item["input_ids"].tolist() == s["input_ids"]  # only the real tokens are stored
        assert item["loss_mask"].tolist() == s["loss_mask"]
        assert item["aux_hidden"].shape == (len(s["input_ids"]), 3 * 64)
        torch.testing.assert_close(item["aux_hidden"], ref["aux_hidden"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(item["final_hidden"], ref["final_hidden"], rtol=1e-5, atol=1e-5)
    idx = hs.read_index(tmp_path)
    assert idx["num_tokens"] == sum(len(s["input_ids"]) for s in seqs)


# ---------------------------------------------------------------- storage dtypes

def test_bf16_store_is_the_rounded_capture(tiny_llama, smollm2_tokenizer, tmp_path):
    seqs = random_sequences(4, seed=2)
    hs.write_features(tiny_llama, smollm2_tokenizer, seqs, tmp_path, progress=False)
    ds = hs.FeatureDataset(tmp_path, dtype=torch.bfloat16)
    ref = reference_item(tiny_llama, seqs[3], hs.default_aux_layers(8))
    torch.testing.assert_close(ds[3]["aux_hidden"], ref["aux_hidden"].to(torch.bfloat16), rtol=0.01, atol=1e-2)
    assert ds.provenance["aux_layers"] == {"hf": [2, 4, 5], "sglang": [1, 3, 4], "default": True}


@pytest.mark.parametrize("storage", ["fp8-token", "fp8-channel"])
def test_fp8_scaled_storage_error_is_small_per_layer(tiny_llama, smollm2_tokenizer, tmp_path, storage):
    seqs = random_sequences(6, seed=3)
    hs.write_features(tiny_llama, smollm2_tokenizer, seqs, tmp_path, storage=storage, progress=False)
    ds = hs.FeatureDataset(tmp_path)
    refs = [reference_item(tiny_llama, s, hs.default_aux_layers(8)) for s in seqs]
    feats = {k: torch.cat([r[k] for r in refs]) for k in ("aux_hidden", "final_hidden")}
    stored = {k: torch.cat([ds[i][k] for i in range(len(ds))]) for k in feats}
    rows = hs.storage_error(feats, storage, 64)
    assert [r["block"] for r in rows] == ["aux_hidden[0]", "aux_hidden[1]", "aux_hidden[2]", "final"]
    for r in rows:
        assert 0 < r["rel_l2"] < 0.06, r  # e4m3 keeps 3 mantissa bits: a few percent
    # The reader's dequantized features are what storage_error measured, and close to the truth.
    rel = (stored["aux_hidden"] - feats["aux_hidden"]).norm() / feats["aux_hidden"].norm()
    assert float(rel) < 0.06
    assert hs.bytes_per_token(64, 3, storage) < hs.bytes_per_token(64, 3, "bfloat16")


def test_fp8_needs_scales_for_outliers():
    x = torch.randn(16, 64) * 2000  # beyond e4m3's +-448: a raw cast saturates
    raw = x.to(torch.float8_e4m3fn).float()
    assert ((raw - x).norm() / x.norm()) > 0.3
    q, s = hs.quantize(x, "fp8-token", 64)
    assert ((hs.dequantize(q, s, "fp8-token", 64) - x).norm() / x.norm()) < 0.06


# ---------------------------------------------------------------- provenance, bad input

def test_provenance_is_checked_against_the_target(tiny_llama, smollm2_tokenizer, tmp_path):
    from transformers import LlamaForCausalLM

    hs.write_features(tiny_llama, smollm2_tokenizer, random_sequences(3), tmp_path, progress=False)
    hs.FeatureDataset(tmp_path, expect=(tiny_llama, smollm2_tokenizer), aux_layers=(2, 4, 5))
    torch.manual_seed(1)
    other = LlamaForCausalLM(tiny_llama_config()).eval()
    with pytest.raises(hs.FeatureStoreError, match="weights_fingerprint"):
        hs.FeatureDataset(tmp_path, expect=(other, smollm2_tokenizer))
    with pytest.raises(hs.FeatureStoreError, match="aux_layers"):
        hs.FeatureDataset(tmp_path, aux_layers=(2, 4, 6))
    prov = hs.read_index(tmp_path)["provenance"]
    for key in ("weights_fingerprint", "template_hash", "eaglebook_version", "target"):
        assert prov[key]


def test_bad_input_is_named(tiny_llama, smollm2_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        hs.write_features(tiny_llama, smollm2_tokenizer, [{"input_ids": [5, 6]}, {"input_ids": []}], tmp_path)
    with pytest.raises(ValueError, match="loss_mask has 1 entries for 2"):
        hs.write_features(tiny_llama, smollm2_tokenizer, [{"input_ids": [5, 6], "loss_mask": [1]}], tmp_path)
    with pytest.raises(ValueError, match="unknown storage dtype 'int4'"):
        hs.write_features(tiny_llama, smollm2_tokenizer, random_sequences(2), tmp_path, storage="int4")
    with pytest.raises(hs.FeatureStoreError, match="run the capture first"):
        hs.FeatureDataset(tmp_path / "nowhere")
    hs.write_features(tiny_llama, smollm2_tokenizer, random_sequences(2), tmp_path, progress=False)
    with pytest.raises(hs.FeatureStoreError, match="other settings.*storage"):
        hs.write_features(tiny_llama, smollm2_tokenizer, random_sequences(2), tmp_path, storage="float32")
    rep = hs.write_features(tiny_llama, smollm2_tokenizer, random_sequences(2), tmp_path, storage="float32",
                            overwrite=True, progress=False)
    assert rep.shards_written == 1 and hs.read_index(tmp_path)["settings"]["storage"] == "float32"


# ---------------------------------------------------------------- resumable, corruption

def _items(ds):
    return [ds[i] for i in range(len(ds))]


def _assert_same_store(a, b, atol=0.0):
    """Equal stores; atol > 0 where batches were composed differently (padding changes float sums)."""
    assert len(a) == len(b)
    for x, y in zip(_items(a), _items(b)):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["loss_mask"], y["loss_mask"])
        for k in ("aux_hidden", "final_hidden"):
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=atol, msg=k)


def test_truncated_and_corrupt_shards_are_detected_and_regenerated(tiny_llama, smollm2_tokenizer, tmp_path):
    seqs = random_sequences(12, 10, 20, seed=4)
    kw = dict(batch_size=2, shard_mb=0.04, progress=False)  # ~4 sequences per shard
    rep = hs.write_features(tiny_llama, smollm2_tokenizer, seqs, tmp_path / "a", **kw)
    assert rep.shards_written >= 3 and rep.merged
    hs.write_features(tiny_llama, smollm2_tokenizer, seqs, tmp_path / "ref", **kw)
    shards = sorted((tmp_path / "a").glob("shard-*.safetensors"))
    with open(shards[0], "r+b") as fh:  # truncated
        fh.truncate(shards[0].stat().st_size - 100)
    data = bytearray(shards[1].read_bytes())  # same size, one byte flipped in the tensor data
    data[-50] ^= 0xFF
    shards[1].write_bytes(bytes(data))
    bad = hs.verify_features(tmp_path / "a")
    assert len(bad) == 2 and "truncated" in bad[0] and "corrupt" in bad[1]
    assert hs.verify_features(tmp_path / "a", verify="size") == [bad[0]]
    with pytest.raises(hs.FeatureStoreError, match="damaged"):
        hs.FeatureDataset(tmp_path / "a")
    rep2 = hs.write_features(tiny_llama, smollm2_tokenizer, seqs, tmp_path / "a", **kw)
    assert len(rep2.shards_regenerated) == 2 and rep2.shards_written == 2
    assert rep2.shards_reused == rep.shards_written - 2
    assert hs.verify_features(tmp_path / "a") == []
    _assert_same_store(hs.FeatureDataset(tmp_path / "a"), hs.FeatureDataset(tmp_path / "ref"))


KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import eaglebook
    from eaglebook import hidden_states as hs
    model, tok = eaglebook.load_target(sys.argv[1], dtype="float32", verbose=False)
    seqs = json.load(open(sys.argv[2]))
    calls = []
    def die(module, args):  # a hard kill in the middle of shard 3 (at forward number argv[4])
        calls.append(1)
        if len(calls) == int(sys.argv[4]):
            os.kill(os.getpid(), signal.SIGKILL)
    model.model.layers[0].register_forward_pre_hook(die)
    hs.write_features(model, tok, seqs, sys.argv[3], batch_size=2, shard_mb=0.04, progress=False)
""")


def test_killed_run_resumes_from_last_complete_shard(tiny_llama, smollm2_tokenizer, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "model")
    smollm2_tokenizer.save_pretrained(tmp_path / "model")
    seqs = random_sequences(24, 10, 20, seed=5)
    (tmp_path / "seqs.json").write_text(json.dumps(seqs))
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    out = tmp_path / "features"
    lengths = [len(s["input_ids"]) for s in seqs]
    plan = hs.plan_shards(lengths, 0, 1, int(0.04 * 2**20 // hs.bytes_per_token(64)))
    forwards = [len(hs.make_batches(lengths, shard, 2)) for shard in plan]
    assert len(plan) >= 4
    kill_at = forwards[0] + forwards[1] + 1  # the first forward of the third shard
    env = {**os.environ, "PYTHONPATH": str(REPO), "EAGLEBOOK_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "kill.py"), str(tmp_path / "model"),
                           str(tmp_path / "seqs.json"), str(out), str(kill_at)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (part,) = out.glob("index-rank*.json")
    state = json.loads(part.read_text())
    assert not state["complete"] and len(state["shards"]) == 2
    assert not (out / "index.json").exists()
    with pytest.raises(hs.FeatureStoreError, match="incomplete"):
        hs.FeatureDataset(out)
    kept = {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in state["shards"]}
    (out / ".shard-r000-00002.safetensors.tmp-99999").write_bytes(b"half a shard")  # a kill mid-write

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    rep = hs.write_features(model, smollm2_tokenizer, seqs, out, batch_size=2, shard_mb=0.04, progress=False)
    assert rep.shards_reused == 2 and rep.shards_written == rep.shards_total - 2 and rep.merged
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept  # finished shards were not redone
    assert not list(out.glob(".shard-*.tmp-*"))
    hs.write_features(model, smollm2_tokenizer, seqs, tmp_path / "ref", batch_size=2, shard_mb=0.04, progress=False)
    _assert_same_store(hs.FeatureDataset(out), hs.FeatureDataset(tmp_path / "ref"))


# ---------------------------------------------------------------- data parallel, online

def test_data_parallel_ranks_merge_into_the_single_process_store(tiny_llama, smollm2_tokenizer, tmp_path):
    seqs = random_sequences(9, seed=6)
    kw = dict(batch_size=3, shard_mb=0.04, storage="float32", progress=False)
    r1 = hs.write_features(tiny_llama, smollm2_tokenizer, seqs, tmp_path / "dp", rank=1, world_size=2, **kw)
    assert not r1.merged and not (tmp_path / "dp" / "index.json").exists()  # rank 0 not done yet
    r0 = hs.write_features(tiny_llama, smollm2_tokenizer, seqs, tmp_path / "dp", rank=0, world_size=2, **kw)
    assert r0.merged and r0.sequences == 5 and r1.sequences == 4
    files = {e["file"] for e in hs.read_index(tmp_path / "dp")["shards"]}
    assert any("-r000-" in f for f in files) and any("-r001-" in f for f in files)
    hs.write_features(tiny_llama, smollm2_tokenizer, seqs, tmp_path / "one", **kw)
    _assert_same_store(hs.FeatureDataset(tmp_path / "dp"), hs.FeatureDataset(tmp_path / "one"), atol=1e-5)


def test_online_features_equal_the_stored_ones(tiny_llama, smollm2_tokenizer, tmp_path):
    seqs = random_sequences(5, seed=7)
    hs.write_features(tiny_llama, smollm2_tokenizer, seqs, tmp_path, progress=False)
    online = list(hs.OnlineFeatures(tiny_llama, smollm2_tokenizer, seqs, batch_size=3, storage_dtype="bfloat16"))
    offline = _items(hs.FeatureDataset(tmp_path))
    assert [x["seq_id"] for x in online] == list(range(5))
    for a, b in zip(online, offline):
        for k in ("input_ids", "loss_mask", "aux_hidden", "final_hidden"):
            assert torch.equal(a[k], b[k]), k
    import pickle

    ds = hs.FeatureDataset(tmp_path)
    ds[0]  # opens a shard handle; DataLoader workers under spawn must still get a picklable dataset
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[4]["aux_hidden"], offline[4]["aux_hidden"])
    from eaglebook.train import collate

    batch = collate(offline[:3])  # the trainer's batching takes the reader's items as they are
    assert batch["aux_hidden"].shape[:2] == batch["attention_mask"].shape
    assert int(batch["attention_mask"].sum()) == sum(len(s["input_ids"]) for s in seqs[:3])


# ---------------------------------------------------------------- cost

def test_bytes_per_token_matches_the_shards_on_disk(tiny_llama, smollm2_tokenizer, tmp_path):
    seqs = random_sequences(20, 50, 60, seed=8)
    rep = hs.write_features(tiny_llama, smollm2_tokenizer, seqs, tmp_path, progress=False)
    idx = hs.read_index(tmp_path)
    predicted = hs.disk_cost(idx["num_tokens"], 64)["total_bytes"]
    # safetensors adds a JSON header and per-sequence offsets: small next to the features.
    assert predicted <= idx["total_bytes"] <= predicted * 1.05 + 2048, (predicted, idx["total_bytes"])
    assert rep.bytes_written == idx["total_bytes"]


def test_cost_figures():
    # 32B example: hidden 5120, 2048 tokens, 3 aux + final in bf16 + int64 ids -> ~80 MiB per sample.
    c = hs.disk_cost(2048, 5120, ids_bytes=8, mask_bytes=0)
    assert c["bytes_per_token"] == 4 * 5120 * 2 + 8
    assert 79.9 < c["total_bytes"] / 2**20 < 80.1
    # EAGLE-3 needs 4x the last-layer-only (EAGLE-1/2) store of BaldEagle's layout.
    one = hs.bytes_per_token(4096, n_aux=0, final=True, ids_bytes=0, mask_bytes=0)
    assert hs.bytes_per_token(4096, ids_bytes=0, mask_bytes=0) == 4 * one


def test_param_count_and_gpu_planner(tiny_llama, smollm2):
    assert hs.param_count(hs.LLAMA_3_1_8B) == 8_030_261_248
    assert hs.param_count(tiny_llama.config) == sum(p.numel() for p in tiny_llama.parameters())
    assert hs.param_count(smollm2[0].config) == sum(p.numel() for p in smollm2[0].parameters())
    plan = hs.plan_capture_memory(hs.LLAMA_3_1_8B, gpu_gib=24)
    with_logits = hs.plan_capture_memory(hs.LLAMA_3_1_8B, gpu_gib=24, compute_logits=True)
    assert plan["fits"] and 14.9 < plan["weights_gib"] < 15.0
    for a, b in zip(plan["table"], with_logits["table"]):
        assert a["batch_size"] > 3 * b["batch_size"] >= 3  # the vocab-sized logits dominate
        assert a["peak_gib"] <= 24
    assert not hs.plan_capture_memory(hs.LLAMA_3_1_8B, gpu_gib=16)["fits"]  # 8B bf16 weights alone ~15 GiB
    assert any("KV cache" in k for k in hs.plan_capture_memory(use_cache=True)["per_token"])


# ---------------------------------------------------------------- the CLI

def test_capture_cli(tiny_llama, smollm2_tokenizer, tmp_path, capsys):
    from eaglebook.cli import main

    tiny_llama.save_pretrained(tmp_path / "model")
    smollm2_tokenizer.save_pretrained(tmp_path / "model")
    with open(tmp_path / "data.jsonl", "w") as fh:
        for s in random_sequences(5, seed=9):
            fh.write(json.dumps(s) + "\n")
    rc = main(["capture", "--data", str(tmp_path / "data.jsonl"), "--out_dir", str(tmp_path / "f"),
               "--target", str(tmp_path / "model"), "--dtype", "float32", "--storage", "fp8-token",
               "--limit", "4"])
    assert rc == 0 and "index written" in capsys.readouterr().out
    ds = hs.FeatureDataset(tmp_path / "f")
    assert len(ds) == 4 and ds.storage == "fp8-token"


@pytest.mark.slow
def test_torchrun_two_processes(tiny_llama, smollm2_tokenizer, tmp_path):
    """`torchrun --nproc_per_node 2 -m eaglebook.cli capture ...`: each rank writes its shards."""
    tiny_llama.save_pretrained(tmp_path / "model")
    smollm2_tokenizer.save_pretrained(tmp_path / "model")
    seqs = random_sequences(8, seed=10)
    with open(tmp_path / "data.jsonl", "w") as fh:
        for s in seqs:
            fh.write(json.dumps(s) + "\n")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO), "EAGLEBOOK_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "eaglebook.cli", "capture",
                           "--data", str(tmp_path / "data.jsonl"), "--out_dir", str(tmp_path / "f"),
                           "--target", str(tmp_path / "model"), "--dtype", "float32", "--shard_mb", "0.04",
                           "--storage", "float32"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    idx = hs.read_index(tmp_path / "f")
    assert idx["world_size"] == 2 and {e["rank"] for e in idx["shards"]} == {0, 1}
    hs.write_features(tiny_llama, smollm2_tokenizer, seqs, tmp_path / "one", storage="float32", progress=False)
    _assert_same_store(hs.FeatureDataset(tmp_path / "f"), hs.FeatureDataset(tmp_path / "one"), atol=1e-5)
