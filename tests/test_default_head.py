"""The shipped default head: it loads by name against the real target, its provenance
matches that target, its card says what it is, and it drafts better than an untrained head."""
from __future__ import annotations

import json
import shutil

import pytest

from eaglebook import decode, recipe
from eaglebook.export import SHIPPED_HEADS, load_draft

HEAD = SHIPPED_HEADS["smollm2-135m-eagle3"]
pytestmark = pytest.mark.skipif(not (HEAD / "config.json").is_file(), reason="the default head is not in this checkout")


def test_shipped_head_loads_and_matches_the_target(smollm2):
    model, tok = smollm2
    head = load_draft("smollm2-135m-eagle3", target=model, tokenizer=tok)  # checks fingerprint + template
    side = json.loads((HEAD / "eaglebook.json").read_text())
    assert side["aux_layers"]["sglang"] == [1, 14, 26] and side["aux_layers"]["hf"] == [2, 15, 27]
    assert head.config.draft_vocab_size == 4096
    assert (HEAD / "model.safetensors").stat().st_size < 20e6  # small: bf16, reduced vocabulary
    card = (HEAD / "README.md").read_text()
    assert side["weights_fingerprint"] in card and side["template_hash"] in card


def test_shipped_head_accepts_more_than_an_untrained_one(smollm2):
    model, tok = smollm2
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    ids = decode.render_prompt_ids(tok, [{"role": "user", "content": "Write a short poem about the sea."}])
    spec = decode.SpecConfig.chain(3)
    trained = decode.EagleDecoder(model, decode.load_head(model, "smollm2-135m-eagle3"), spec, eos_ids=eos)
    untrained = decode.EagleDecoder(model, decode.load_head(model, None), spec, eos_ids=eos)
    a, b = trained.generate(ids, 48), untrained.generate(ids, 48)
    base = decode.baseline_decode(model, ids, 48, eos)
    assert decode.check_lossless(base, a.token_ids)["ok"] and decode.check_lossless(base, b.token_ids)["ok"]
    assert a.accept_length > b.accept_length


def test_card_is_written_from_the_heads_own_record(tmp_path):
    head = tmp_path / "head"
    shutil.copytree(HEAD, head)
    (head / "README.md").unlink()
    text = recipe.write_card(head).read_text()
    side = json.loads((head / "eaglebook.json").read_text())
    assert side["weights_fingerprint"] in text and "[1, 14, 26]" in text
    for stage in side["training"]["stages"]:
        assert f"| {stage} |" in text  # every stage's wall clock is in the card


def test_shipped_card_is_what_write_card_writes(tmp_path):
    """The committed card is regenerated from the head's record, its headline.json and its
    hand-written card-notes.md; rewriting it loses nothing (status and findings included)."""
    head = tmp_path / HEAD.name
    shutil.copytree(HEAD, head)
    (head / "README.md").unlink()
    text = recipe.write_card(head).read_text()
    assert text == (HEAD / "README.md").read_text(), "regenerate the card: python -c \"from eaglebook import " \
        "recipe; recipe.write_card('data/smollm2-135m-eagle3')\""
    notes = (HEAD / recipe.CARD_NOTES).read_text().strip()
    assert notes in text and "## Where it stands" in notes
    assert "| float32 | tree s5-k4-n16 |" in text  # the headline table, from headline.json


def test_recipe_writes_the_prompts_it_never_trains_on(tmp_path):
    from eaglebook import bench, data
    from eaglebook.regenerate import prepare_conversations

    convs, _ = data.load_sharegpt(limit=120)
    src = tmp_path / "convs.jsonl"
    src.write_text("".join(json.dumps({"id": r["id"], "messages": r["messages"]}) + "\n" for r in convs))
    args = recipe.DefaultHeadArgs(work_dir=str(tmp_path / "run"), data=str(src), regen_conversations=20,
                                  original_conversations=30, holdout_fraction=0.1, unseen_prompts=1000,
                                  stop_after="conversations")
    assert recipe.Recipe(args).run() is None
    train = data.split_holdout(prepare_conversations(str(src))[0], 0.1)["train"]
    used = set(train.select(range(50))["id"])
    prompts = bench.load_prompts_file(tmp_path / "run" / "unseen-prompts.jsonl")
    ids = {p.id for p in prompts}
    assert ids and not ids & used
    assert len(ids) == len(prompts) == json.loads((tmp_path / "run" / "recipe.json").read_text())[
        "stages"]["conversations"]["unseen_prompts"]
    assert len(prompts) > (len(train) - 50) // 2  # the rest of the training split and the hold-out rows
    used_text = {r["messages"][0]["content"] for r in train.select(range(50))}
    texts = [p.turns[0] for p in prompts]
    assert not set(texts) & used_text and len(set(texts)) == len(texts)  # nothing trained on, no repeats
    assert all(p.category == "sharegpt-unseen" and len(p.turns) == 1 for p in prompts)


def test_accept_length_curve_reads_every_checkpoint_in_step_order(tmp_path, smollm2):
    from safetensors.torch import save_file

    from eaglebook import vocab
    from eaglebook.draft import build_draft

    model, tok = smollm2
    trained = decode.load_head(model, "smollm2-135m-eagle3")
    vocab.save_vocab_map(tmp_path / "vocab_map.safetensors", trained.d2t.clone(), trained.t2d.clone())
    (tmp_path / "recipe.json").write_text(json.dumps({"args": {"batch_size": 4}, "stages": {}}))
    untrained = build_draft(model, trained.d2t.clone(), trained.t2d.clone())  # same vocabulary, weights at init
    for step, head in ((10, trained), (2, untrained)):  # 10 sorts after 2 by number, not by name
        ck = tmp_path / "trainer" / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        save_file({k: v.detach().float().contiguous().clone() for k, v in head.state_dict().items()},
                  str(ck / "model.safetensors"))
    rows = recipe.accept_length_curve(tmp_path, model, tok, limit=2, max_new_tokens=32, num_steps=3)
    assert [(r["step"], r["sequences_seen"], r["prompts"]) for r in rows] == [(2, 8, 2), (10, 40, 2)]
    assert rows[1]["accept_length"] > rows[0]["accept_length"] >= 1.0
