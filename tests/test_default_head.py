"""The shipped default head (issue 9): it loads by name against the real target, its provenance
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
