"""Visualisation helpers return real Figures and HTML with one box per token."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from eaglebook import data, viz, vocab  # noqa: E402


def test_mask_html_marks_every_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    out = data.tokenize_conversation(tok, [{"role": "user", "content": "a <b> & c"},
                                           {"role": "assistant", "content": "ok"}])
    page = viz.mask_html(tok, out["input_ids"], out["loss_mask"])
    assert page.count("<span title=") == len(out["input_ids"])
    assert page.count(viz.TRAINED_BG) == sum(out["loss_mask"]) + 1  # + the legend
    assert "<b>" not in page and "&lt;" in page and "&amp;" in page  # user text is escaped
    assert "\u00b7" in page and "\u21b5" in page  # spaces and newlines are visible
    short = viz.mask_html(tok, out["input_ids"], out["loss_mask"], max_tokens=5)
    assert short.count("<span title=") == 5 and f"{len(out['input_ids']) - 5} more tokens" in short


def test_plots_are_figures(smollm2_tokenizer):
    ds, rep = data.load_sharegpt(limit=10)
    tds, _ = data.tokenize_dataset(ds, smollm2_tokenizer, max_length=512, progress=False)
    fig = viz.plot_lengths({"sharegpt": tds})
    assert len(fig.axes) == 2 and fig.axes[0].patches
    c = vocab.trained_token_counts(tds, len(smollm2_tokenizer))
    fig = viz.plot_coverage({"train": vocab.coverage_curve(c)}, draft_vocab=2048)
    assert fig.axes[0].lines
    rep.skip("demo reason")
    assert viz.plot_skips(rep).axes[0].patches


def test_pipeline_has_one_box_per_notebook_and_marks_the_current_one():
    from eaglebook import runner

    fig = viz.plot_pipeline(highlight="03")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert [t for t in texts if t.isdigit()] == [p.stem[:2] for p in runner.notebook_paths()]
    faces = [p.get_facecolor() for p in ax.patches]
    orange = matplotlib.colors.to_rgba("#ffd6a5")
    assert faces.count(orange) == 1 and faces[3] == orange


def test_pipeline_draws_which_stage_outputs_are_on_disk(tmp_path):
    import torch

    from eaglebook import runner

    paths = runner.notebook_paths()
    stems = {p.stem[:2]: p.stem for p in paths}
    # 01 writes its dataset and its vocabulary map; 03 its head: real files, as the notebooks write them
    (tmp_path / stems["01"] / "regenerated").mkdir(parents=True)
    vocab.save_vocab_map(tmp_path / stems["01"] / "vocab_map.safetensors",
                         *vocab.build_vocab_map(torch.tensor([3, 0, 5, 1]), 2))
    (tmp_path / stems["03"] / "draft").mkdir(parents=True)
    (tmp_path / stems["03"] / "draft" / "config.json").write_text("{}")
    (tmp_path / stems["02"] / "features").mkdir(parents=True)  # a capture that never finished: no index.json
    status = viz.pipeline_status(tmp_path)
    assert status == {n: n in ("01", "03") for n in stems}
    fig = viz.plot_pipeline(highlight="02", run_dir=tmp_path)
    marks = {t.get_gid(): t.get_text() for t in fig.axes[0].texts if (t.get_gid() or "").startswith("status-")}
    assert marks == {f"status-{n}": ("\u2713 on disk" if n in ("01", "03") else "\u25cb not yet") for n in stems}
    assert f"2 of {len(stems)} stages on disk" in fig.axes[0].get_title()
    assert not any((t.get_gid() or "").startswith("status-") for t in viz.plot_pipeline(highlight="02").axes[0].texts)


def test_accepted_tokens_one_box_per_token_coloured_by_step(smollm2):
    from eaglebook import decode
    from eaglebook.target import end_of_turn_ids

    model, tok = smollm2
    head = decode.load_head(model, "smollm2-135m-eagle3")
    dec = decode.EagleDecoder(model, head, decode.SpecConfig(num_steps=3, topk=2, num_draft_tokens=6),
                              eos_ids=end_of_turn_ids(tok, model.generation_config), tokenizer=tok)
    res = dec.generate(decode.render_prompt_ids(tok, [{"role": "user", "content": "List the days of the week."}]), 24)
    fig = viz.plot_accepted_tokens(tok, res)
    boxes = [t for t in fig.axes[0].texts if t.get_bbox_patch() is not None]
    assert len(boxes) == len(res.token_ids)
    colours = [matplotlib.colors.to_hex(t.get_bbox_patch().get_facecolor()) for t in boxes]
    want = [viz.PREFILL_COLOR] + [viz.STEP_COLORS[s % len(viz.STEP_COLORS)]
                                  for s, st in enumerate(res.steps) for _ in st.new_tokens]
    assert colours == want[:len(boxes)]
    dashed = [t.get_bbox_patch().get_linestyle() == "--" for t in boxes]
    assert sum(dashed) == sum(1 for st in res.steps if len(st.new_tokens) == len(st.accepted_nodes))  # one bonus per full step
    assert str(len(res.steps)) in fig._suptitle.get_text()


def test_hidden_state_figures_draw_what_they_are_given():
    import torch
    from transformers import Olmo3Config

    from eaglebook import hidden_states as hs

    olmo = Olmo3Config(num_hidden_layers=32)
    why = hs.explain_aux_layers(32, hs.layer_types_of(olmo))
    ax = viz.plot_aux_layer_choice({"olmo": (32, hs.layer_types_of(olmo), why["sglang"]),
                                    "uniform": (30, None, hs.explain_aux_layers(30)["sglang"])}).axes[0]
    squares, rings = ax.collections[0::2], ax.collections[1::2]
    assert [len(s.get_offsets()) for s in squares] == [32, 30] and [len(r.get_offsets()) for r in rings] == [3, 3]
    assert [int(x) for x, _ in rings[0].get_offsets()] == why["sglang"]  # the rings sit on the chosen layers

    x = torch.randn(64, 4 * 8) * torch.logspace(0, 3, 4 * 8)  # real quantization on spread-out values
    ref = {"aux_hidden": x[:, :24], "final_hidden": x[:, 24:]}
    rows = {s: [r["rel_l2"] for r in hs.storage_error(ref, s, 8)] for s in ("bfloat16", "fp8-token")}
    fig = viz.plot_storage_error({"computed in float32": [0.0] * 4, **rows}, ["a", "b", "c", "final"])
    bars = fig.axes[0].patches
    assert len(bars) == 3 * 4 and all(b.get_height() > 0 for b in bars)  # log scale: zeros drawn at a floor
    assert [round(b.get_height(), 12) for b in bars[4:8]] == [round(e, 12) for e in rows["bfloat16"]]

    curves = {"a": ([1e3, 1e4], [hs.disk_cost(n * 100, 576)["total_gb"] for n in (1e3, 1e4)])}
    ax = viz.plot_disk_cost(curves, "conversations", (650, "published")).axes[0]
    assert len(ax.lines) == 2 and ax.get_yscale() == "log"  # the curve and the reference line


def test_conditional_accuracy_shows_how_many_positions_each_bar_rests_on():
    runs = {"a": {"cond": [0.5, 0.4, 0.9], "survivors": [200, 100, 10]},
            "b": {"cond": [0.6, 0.5, 0.2], "survivors": [200, 120, 60]}}
    fig = viz.plot_conditional_accuracy(runs)
    bars, counts = fig.axes[0], fig.axes[1]
    assert [round(p.get_height(), 3) for p in bars.patches] == [0.5, 0.4, 0.9, 0.6, 0.5, 0.2]
    assert sorted(t.get_text() for t in bars.texts) == sorted(["200", "100", "10", "200", "120", "60"])
    assert [list(line.get_ydata()) for line in counts.lines] == [[200, 100, 10], [200, 120, 60]]


def test_sampling_check_draws_p_beside_each_sampler_with_the_rest_pooled():
    import numpy as np

    p = np.zeros(10)
    p[[2, 5, 7]] = [0.5, 0.3, 0.2]
    draws = {"rule": [2] * 6 + [5] * 3 + [7]}
    fig = viz.plot_sampling_check(p, draws, tokens=[2, 5], labels=["x", "y"], children=[5])
    heights = [round(b.get_height(), 3) for b in fig.axes[0].patches]
    assert heights == [0.5, 0.3, 0.2, 0.6, 0.3, 0.1]  # p then frequencies, each with 'other' last
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["x", "*y", "other"]


def test_setting_prediction_bars_are_predictions_and_dots_are_measurements():
    rows = [{"setting": "s1-k1-n2", "predicted": 1.1}, {"setting": "s2-k1-n3", "predicted": 1.2, "measured": 1.15,
                                                        "per_prompt": [1.0, 1.3]}]
    fig = viz.plot_setting_prediction(rows)
    ax = fig.axes[0]
    assert [round(b.get_height(), 3) for b in ax.patches] == [1.1, 1.2]
    offsets = [c.get_offsets().tolist() for c in ax.collections]
    assert [[1, 1.0], [1, 1.3]] in offsets and [[1, 1.15]] in offsets


def test_speedup_spread_marks_each_prompt_and_the_median():
    fig = viz.plot_speedup_spread({"tree": [0.9, 1.2, 1.5], "chain": [1.1]})
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == 3 and len(ax.collections[1].get_offsets()) == 1
    assert any("median 1.20x, 0.90-1.50x" == t.get_text() for t in ax.texts)


def test_engine_costs_put_each_cycle_in_greedy_steps_beside_its_accept_length():
    result = {"lanes": [{"mode": "baseline", "config": "", "tok_s": 100.0},
                        {"mode": "eagle", "config": "n3", "tok_s": 50.0, "accept_length": 1.6, "speedup": 0.5},
                        {"mode": "prompt_lookup", "config": "ngram-mod", "tok_s": 99.0, "accept_length": None}]}
    rows = viz.engine_cost_rows("llama.cpp", result)
    assert [(r["lane"], r["greedy_ms"], r["cycle_ms"], r["cycle_in_steps"]) for r in rows] == [("n3", 10.0, 32.0, 3.2)]
    assert rows[0]["accept_length"] / rows[0]["cycle_in_steps"] == 0.5 == rows[0]["speedup"]  # 1.6 tokens per 3.2 steps
    ax = viz.plot_engine_costs(rows).axes[0]
    assert [p.get_height() for p in ax.patches] == [3.2]
    assert [tuple(o) for o in ax.collections[0].get_offsets()] == [(0.0, 1.6)]
    assert viz.engine_cost_rows("x", {"lanes": [{"mode": "eagle", "tok_s": 1.0, "accept_length": 2.0}]}) == []
