"""Every numbered notebook runs headless through papermill with CI-sized parameters.

Notebooks are found by glob, so none can escape CI. Each writes results.json into its run
folder; the checks below assert on those figures, not merely on "it ran". A notebook
without a check here fails, as does a CI parameter its parameters cell does not declare.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from eaglebook import runner

PARAMS = yaml.safe_load((Path(__file__).parent / "notebook_params.yaml").read_text()) or {}
NOTEBOOKS = runner.notebook_paths()


def check_00(r):
    assert r["ended_with_eot"] and r["answer_tokens"] > 0
    assert "Paris" in r["answer"]
    assert r["mtbench_questions"] == 80 and r["humaneval_problems"] == 164
    from eaglebook.export import SHIPPED_HEADS

    if (SHIPPED_HEADS["smollm2-135m-eagle3"] / "config.json").is_file():  # the shipped head decodes in 0.8
        assert r["eagle_lossless_ok"] and r["eagle_identical"]  # float32: token for token the greedy answer
        assert r["eagle_accept_length"] > 1.2  # a trained head confirms several tokens per target pass
        assert sum(r["eagle_accept_lengths"]) + 1 == r["eagle_tokens"]  # + the prefill's token
        # the 25-line draft-then-verify loop (no cache) gives plain greedy's tokens too
        assert r["scratch_ok"] and r["scratch_identical"] and r["scratch_tokens"] == r["eagle_tokens"]
        assert all(1 <= s <= 5 for s in r["scratch_steps"]) and sum(r["scratch_steps"]) + 1 >= r["scratch_tokens"]


def check_03(r):
    p = r["params"]
    assert p["trainable"] == p["fc"] + p["midlayer"] + p["norm"] + p["lm_head"] > 0
    assert p["frozen"] == 49152 * 576  # SmolLM2's shared embedding, not counted as the draft's
    assert p["fc"] == 3 * 576 * 576 and p["lm_head"] == r["draft_vocab_size"] * 576
    assert 0 < r["params_pct_of_target"] < r["params_full_vocab_pct_of_target"]
    assert 1 < r["llama8b_params_pct_of_target"] < 6  # the 8B rule of thumb holds there
    assert 0.5 < r["vocab_coverage_held_out"] <= 1
    curve = r["coverage_curve"]  # the plotted curve is the map in use: its value at draft_vocab is the coverage
    assert abs(curve["coverage"][curve["sizes"].index(r["draft_vocab_size"])] - r["vocab_coverage_held_out"]) < 0.01
    if r["from_01"]:  # notebook 01 ran in this session: 03 built its head around 01's map
        from eaglebook import vocab

        d2t, _, _ = vocab.load_vocab_map(Path(r["draft_dir"]).parent.parent / "01-loss-masks" / "vocab_map.safetensors")
        assert r["vocab_source"].startswith("notebook 01") and r["draft_vocab_size"] == len(d2t)
    assert r["appendix"]  # CI runs the appendix: every export format reloads to identical logits
    assert set(r["round_trip_max_abs_diff"]) == {"eagle3", "speculators", "eagle1-sglang", "eagle1-vllm"}
    assert all(v == 0.0 for v in r["round_trip_max_abs_diff"].values())
    assert r["hand_written_layer_max_abs_diff"] < 1e-4
    # the untrained head's 0% is explained: the copied lm_head is right on the target's own feature,
    # the untrained layer's output is not that feature, and training (the shipped head) fixes it
    assert r["untrained_agreement"] < 0.02
    assert abs(r["lm_head_on_final_feature_agreement"] - r["target_choice_in_draft_vocab"]) < 0.02
    assert r["lm_head_on_final_feature_agreement"] > 0.5
    assert abs(r["untrained_cosine_to_final"]) < 0.2
    assert r["shipped_head_agreement"] > r["untrained_agreement"] + 0.15  # 0.25 on this mostly-prompt window
    assert r["aux_layers"] == {"hf": [2, 15, 27], "sglang": [1, 14, 26], "default": True}
    draft_dir = Path(r["draft_dir"])
    assert (draft_dir / "config.json").is_file() and (draft_dir / "eaglebook.json").is_file()

def check_02(r):
    assert r["aux_layers_hf"] == [2, 15, 27] and r["aux_layers_sglang"] == [1, 14, 26]
    from transformers import Olmo3Config

    olmo_types = Olmo3Config(num_hidden_layers=32).layer_types  # hybrid: captured states are full-attention outputs
    olmo = r["hybrid_aux_sglang"]["OLMo-3-style, 32 layers"]
    assert len(olmo) == 3 and all(olmo_types[i] == "full_attention" for i in olmo)
    assert r["sequences"] == 16 and r["tokens"] > 16 * 20
    assert r["shards_written"] >= 2  # shard_mb 2.0 splits the CI store
    # bf16: 4 x 576 x 2 B of features + 4 B id + 1 B mask per token, plus small safetensors headers.
    assert r["bytes_per_token_formula"] == 4 * 576 * 2 + 5
    assert r["bytes_per_token_formula"] <= r["bytes_per_token"] < 1.05 * r["bytes_per_token_formula"]
    assert r["appendix"]  # CI runs the appendix: storage precision, cost at scale
    assert r["capture_tok_s"] > 0 and r["plain_forward_tok_s"] > 0  # timings are reported, not asserted
    assert r["resume_regenerated"] == 1 and r["resume_reused"] == r["shards_written"] - 1
    assert r["online_min_cosine"] > 0.99
    assert all(0 < e < 0.06 for e in r["fp8_token_rel_err"] + r["fp8_channel_rel_err"])
    # storage error against a float32 reference: never 0 by construction, ordered by precision
    err = r["storage_rel_err_vs_float32"]
    assert len(r["error_blocks"]) == 4 and all(len(v) == 4 for v in err.values())
    assert all(0 < e < 0.005 for e in err["bfloat16"])  # 8 significant bits: at most 2^-8 per value
    assert all(f < b < t for f, b, t in zip(err["float16"], err["bfloat16"], err["fp8-token"]))
    if r["dtype"] == "float32":
        assert r["compute_rel_err_vs_float32"] == [0.0] * 4
    else:
        assert all(e > 0 for e in r["compute_rel_err_vs_float32"])
    assert 79.9 < r["example_32b_mib_per_2k_sample"] < 80.1
    assert r["rtx3090_llama8b_batch_at_2048"] >= 1

def _llama_server_built() -> bool:
    from eaglebook.bench import BenchError, llama_server_binary

    try:
        return bool(llama_server_binary())
    except BenchError:
        return False


def check_06(r):
    assert r["backend"] in ("inprocess", "sglang", "openai")
    assert r["prompts"] == 2 and r["per_category"], "every prompt paired, per category"
    assert r["baseline_tok_s"] > 0 and r["eagle_tok_s"] > 0 and r["speedup"] > 0
    assert r["accept_length"] >= 1.0  # the bonus token alone gives 1
    assert [s["config"] for s in r["settings"]] == ["s2-k1-n3", "s2-k1-n3+ng2", "s2-k2-n4"]  # + the merged drafter
    if r["backend"] == "inprocess":  # the peers ran in the same interleaved run, every lane on every prompt
        lanes = {x["lane"]: x for x in r["lanes"]}
        assert set(lanes) == {"baseline", "eagle s2-k1-n3", "eagle s2-k2-n4", "eagle s2-k1-n3+ng2", "generate",
                              "prompt_lookup pld3-m3"}
        assert all(x["requests"] == 2 and x["speedup"] > 0 for x in lanes.values())
        assert lanes["prompt_lookup pld3-m3"]["accept_length"] >= 1.0 and lanes["generate"]["accept_length"] is None
        if r["dtype"] == "float32":  # greedy, every lane: the baseline's tokens (or a float tie)
            assert all(x["lossless_ok"] == x["checked"] == 2 for x in lanes.values() if x["lane"] != "baseline")
        assert r["head_to_head"]["prompts"] == 2 and "lanes.png" in r["files"]
    assert {c["concurrency"] for c in r["concurrency"]} == {1, 2}  # the appendix runs when concurrency is set
    if r["backend"] == "inprocess":  # every lane's per-prompt speedups
        assert set(r["lane_spread"]) == {"eagle s2-k1-n3", "eagle s2-k2-n4", "eagle s2-k1-n3+ng2", "generate",
                                         "prompt_lookup pld3-m3"}
    assert r["engines"][0]["engine"] == "eaglebook"  # 6.10: eaglebook's own cycle first, then each installed engine
    if _llama_server_built():  # the shipped head served by llama.cpp beside its greedy and its n-gram mode
        shipped = {x["lane"]: x for x in r["engine_lanes"] if x["engine"] == "llama.cpp, shipped head"}
        assert set(shipped) == {"baseline", "eagle n1", "eagle n3", "prompt_lookup ngram-mod"}
        assert shipped["eagle n1"]["accept_length"] > 1.0 and shipped["eagle n1"]["checked"] == 2
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in r["lane_spread"].values())
    if r["learner_head"]:
        assert {x["head"] for x in r["learner_head"]} == {"shipped / chosen head", "your head (notebook 04)"}
    if r["backend"] == "inprocess" and r["dtype"] == "float32":
        assert r["identical_share"] == 1.0
    assert {"speedup_by_category.png", "throughput_vs_accept_length.png", "concurrency.png",
            "bench.json", "bench.csv"} <= set(r["files"])
    from eaglebook.export import SHIPPED_HEADS

    if (SHIPPED_HEADS["smollm2-135m-eagle3"] / "headline.json").is_file():  # the shipped head's full run
        rows = r["headline_rows"]
        assert {x["dtype"] for x in rows} == {"float32", "bfloat16"} and len(rows) >= 4
        assert all(x["prompts"] == 80 for x in rows) and "headline.png" in r["files"]
        assert all(x["lossless_ok"] == x["checked"] for x in rows if x["dtype"] == "float32")
    if (SHIPPED_HEADS["smollm2-135m-eagle3"] / "headline-peers.json").is_file():  # the head beside its peers
        peers = {x["setting"]: x for x in r["peer_rows"]}
        assert "transformers generate()" in peers and "headline-peers.png" in r["files"]
        assert any(s.startswith("prompt lookup 3") for s in peers)  # "prompt lookup 3 (match 3)" once rerun
        assert all(x["prompts"] == 80 and x["speedup"] > 0 for x in peers.values())


def check_04(r):
    assert r["target_loaded"] == "TargetHead"  # training read only the embedding, lm_head and provenance
    assert r["teacher_agreement"] > 0.97 and r["aux_layers_hf"] == [2, 15, 27]
    assert r["last_loss"] < r["first_loss"]  # the loss falls
    assert r["final"]["eval_acc_0"] > r["untrained"]["eval_acc_0"]  # and beats the untrained head
    assert r["hand_loss_abs_diff"] < 1e-4  # the loss written out in the notebook is the package's
    assert len(r["acc_per_position"]) == r["ttt_steps"] == 7
    assert 1.0 <= r["tau_sim"] <= r["ttt_steps"] + 1
    assert r["train_tok_s"] > 0 and r["steps"] == 30
    assert 0 <= r["dropped_frac"] < 0.5
    head_03 = Path(r["run_dir"]) / "03-draft-head" / "draft" / "config.json"
    if head_03.is_file():  # it trained the head 03 built, over 01's (or 03's) vocabulary
        assert r["head_source"].startswith("notebook 03's head")
        assert r["draft_vocab_size"] == json.loads(head_03.read_text())["draft_vocab_size"]
    else:
        assert r["draft_vocab_size"] == 4096 and r["head_source"].startswith("built here")
    # conditional accuracy carries the positions it rests on: survivors only ever thin out
    for chain in r["survivors"].values():
        n = chain["survivors"]
        assert len(n) == len(chain["cond"]) == r["ttt_steps"] and n[0] > 0
        assert all(a >= b for a, b in zip(n, n[1:]))
    assert all(abs(a - r["final"][f"eval_cond_acc_{k}"]) < 1e-3 for k, a in enumerate(r["survivors"]["yours"]["cond"]))
    # the shipped head, evaluated on the same held-out features at the same positions
    assert len(r["shipped_acc_per_position"]) == r["ttt_steps"]
    assert r["shipped"]["eval_acc_0"] > r["untrained"]["eval_acc_0"]
    assert r["tau_sim_shipped"] == r["shipped"]["eval_tau_sim"] and 1.0 <= r["tau_sim_shipped"] <= r["ttt_steps"] + 1
    assert {"ttt_mask.png", "training_curves.png", "step_accuracy.png", "conditional_accuracy.png"} <= set(r["files"])
    assert (Path(r["draft_dir"]) / "eaglebook.json").is_file()

def check_01(r):
    from eaglebook import regenerate, vocab

    assert r["records_read"] == 200 and r["records_read"] == r["records_kept"] + r["records_skipped"]
    assert r["tokenized_rows"] > 100 and 0.2 < r["trained_token_fraction"] < 0.95
    assert r["regen_rows"] == 4 and r["train_rows"] + r["holdout_rows"] == 4 and r["holdout_rows"] >= 1
    assert r["regen_tokens_per_second"] > 0 and 0 < r["regen_trained_fraction"] < 1
    assert r["mask_checked_rows"] >= 50  # the notebook's own assertions ran on real rows
    assert 0 < r["draft_vocab_coverage_holdout"] <= 1 and 0 < r["draft_vocab_coverage_sharegpt"] <= 1
    # the vocabulary is a real selection: counted over enough answers that (almost) no id is padding
    assert r["distinct_trained_tokens"] > r["draft_vocab"] and r["vocab_padding_ids"] <= 0.01 * r["draft_vocab"]
    assert r["draft_vocab_coverage_train"] >= r["draft_vocab_coverage_sharegpt"]  # in-sample beats held out
    assert r["vocab_sharegpt_rows_counted"] < r["tokenized_rows"] and r["sharegpt_holdout_tokens"] > 0
    ds, meta = regenerate.load_regenerated(r["dataset_dir"], expect={"template_hash": r["template_hash"]})
    assert meta["weights_fingerprint"] == r["weights_fingerprint"]
    assert sum(map(sum, ds["train"]["loss_mask"])) == sum(ds["train"]["answer_tokens"])
    d2t, t2d, meta = vocab.load_vocab_map(r["vocab_map"])
    assert len(d2t) == r["draft_vocab"] == 2048
    counts = vocab.load_vocab_counts(r["vocab_map"])  # saved beside the map, for notebook 03
    assert int(counts.sum()) == r["vocab_counted_tokens"] and meta["sharegpt_records"] == r["records_read"]
    assert 0 <= r["regen_cut_at_limit"] <= r["regen_rows"] - r["regen_finished"]
    curves, sizes = r["coverage_curves"], r["coverage_sizes"]
    held, in_sample = curves["held-out regenerated answers"], curves["counted answers (in-sample)"]
    assert held == sorted(held) and in_sample[-1] == 1.0 and held[-1] == 1.0  # all ids cover everything
    at = sizes.index(2048)
    assert abs(held[at] - r["draft_vocab_coverage_holdout"]) < 0.05  # the plotted curve is the map's coverage
    assert held[at] <= in_sample[at]  # held out never beats in-sample

def check_05(r):
    # the hand-written tree growth and acceptance equalled the engine on every step of a real generation
    assert r["engine_on_page_steps"] >= 2 and len(r["walk_accept_lengths"]) == r["engine_on_page_steps"]
    assert r["drawn_step_accept_length"] == max(r["walk_accept_lengths"])  # the picture: the longest accepted path
    assert r["prompts_checked"] == 2
    assert r["lossless_ok"], "EAGLE changed a float32 greedy output"
    assert {"chain", "tree"} <= set(r["lossless"]) and all(t["lossless_ok"] for t in r["lossless"].values())
    assert r["speed_dtype"] == "bfloat16" and r["n_prompts"] == 2
    assert r["accept_length_mean"] >= 1.0 and r["speedup"] > 0 and r["predicted_speedup"] > 0
    assert {"chain", "tree"} <= set(r["settings"])
    assert {"draft_tree.png", "tree_mask.png", "accept_lengths.png", "heads.png", "sampling_check.png",
            "speedup_spread.png", "setting_prediction.png"} <= set(r["files"])
    # sampling: the hand-written rule equalled the engine's on every seed, and its tokens follow p
    s = r["sampling"]
    assert s["draws"] == 1000 and s["children"] and s["p_value"] > 1e-3
    assert abs(s["child_accepted_share"] - s["children_p"]) < 4 * (0.25 / s["draws"]) ** 0.5
    # the draft setting for the learner's head: acceptance per depth, a prediction per setting, the argmax run
    for family in ("chain", "tree"):  # CI: a chain of 3 and the tree s3-k4-n12
        n = r["steps_reaching_depth"][family]
        assert len(r["accept_per_depth"][family]) == 3 and len(n) == 4 and all(a >= b for a, b in zip(n, n[1:]))
    pred = r["setting_prediction"]
    assert [p["setting"] for p in pred] == ["s1-k1-n2", "s2-k1-n3", "s3-k1-n4", "s1-k4-n5", "s2-k4-n12", "s3-k4-n12"]
    assert r["chosen_setting"] == max(pred, key=lambda p: p["predicted"])["setting"]
    assert r["chosen_speedup"] > 0 and len(r["chosen_per_prompt"]) == r["n_prompts"]
    assert all(len(v) == r["n_prompts"] for v in r["speedup_per_prompt"].values())
    from eaglebook.export import SHIPPED_HEADS

    if (SHIPPED_HEADS["smollm2-135m-eagle3"] / "config.json").is_file():  # a learner gets the trained head
        assert r["head"].startswith("shipped default head"), r["head"]
    if (Path(r["run_dir"]) / "04-ttt-training" / "draft" / "config.json").is_file():  # 04 ran: yours beside it
        assert r["yours"] and r["yours"]["accept_length"] >= 1.0 and "yours (tree)" in r["lossless"]
        assert r["lossless"]["yours (tree)"]["lossless_ok"]
        assert r["tuned_head"] == "your head (04)"
    else:
        assert r["yours"] is None and r["tuned_head"].startswith("the shipped head")
    if (Path(r["run_dir"]) / "02-hidden-states" / "features" / "index.json").is_file():  # an EAGLE-2 style head
        assert r["eagle2"]["lossless_ok"] and r["eagle2"]["accept_length"] >= 1.0


CHECKS = {
    "00-setup-check": check_00,
    "03-draft-head": check_03,
    "04-ttt-training": check_04,
    "02-hidden-states": check_02,
    "06-sglang-benchmark": check_06,
    "01-loss-masks": check_01,
    "05-tree-decoding": check_05,
}


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory):
    # One run folder for the whole session: a later notebook reuses an earlier one's outputs.
    return tmp_path_factory.mktemp("notebooks")


def test_every_notebook_is_found():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00-setup-check.ipynb"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_ci_parameters_are_declared(nb):
    declared = runner.parameters_cell(nb)  # raises if there is no parameters cell
    assert "run_dir" in declared, "every notebook takes run_dir"
    unknown = set(PARAMS.get(nb.stem, {})) - set(declared)
    assert not unknown, f"tests/notebook_params.yaml sets {sorted(unknown)}, not declared in {nb.name}"


@pytest.mark.notebook
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_reports(nb, suite_dir):
    assert nb.stem in CHECKS, f"add a results check for {nb.stem} in tests/test_notebooks.py"
    results = runner.run_notebook(nb, suite_dir, PARAMS.get(nb.stem, {}))
    CHECKS[nb.stem](results)
