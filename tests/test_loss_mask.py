"""The one render function: exact loss masks on several real template styles, built locally."""
from __future__ import annotations

import copy

import pytest

from eaglebook import data

# Llama-3 header style, with an injected system block like Llama-3.1's date preamble.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# A reasoning template in the style of Qwen3: the answer is `<think>...</think>` + content, and
# the reasoning of answers before the last user turn is dropped from the history.
THINK_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{%- set content = m['content'] %}"
    "{%- if '</think>' in content and loop.index0 < ns.last_user %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

MULTI = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 equals 4."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "4 times 3 is 12.\n\nAnything else?"},
]


def masked_runs(ids, mask):
    """The contiguous runs of trained ids."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def decoded_runs(tok, out):
    return [tok.decode(r, skip_special_tokens=False) for r in masked_runs(out["input_ids"], out["loss_mask"])]


@pytest.fixture(scope="module")
def llama3_tok(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": [
        "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def think_tok(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = THINK_TEMPLATE
    return tok


def test_chatml_with_injected_system_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    msgs = MULTI[:2]
    out = data.tokenize_conversation(tok, msgs)
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert "You are a helpful AI assistant named SmolLM" in full  # the template injected it
    assert out["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    assert decoded_runs(tok, out) == ["2+2 equals 4.<|im_end|>"]
    # The newline after <|im_end|> is scaffolding, not trained.
    assert out["loss_mask"][-1] == 0 and tok.decode(out["input_ids"][-1:]) == "\n"
    assert len(out["input_ids"]) == len(out["loss_mask"])


def test_chatml_multi_turn_and_explicit_system(smollm2_tokenizer):
    tok = smollm2_tokenizer
    msgs = [{"role": "system", "content": "Be terse."}] + MULTI
    out = data.tokenize_conversation(tok, msgs)
    assert "SmolLM" not in tok.decode(out["input_ids"])
    assert decoded_runs(tok, out) == ["2+2 equals 4.<|im_end|>", "4 times 3 is 12.\n\nAnything else?<|im_end|>"]
    assert out["input_ids"] == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]


def test_llama3_headers(llama3_tok):
    tok = llama3_tok
    out = data.tokenize_conversation(tok, MULTI)
    text = tok.decode(out["input_ids"])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system") and "Cutting Knowledge" in text
    assert decoded_runs(tok, out) == ["2+2 equals 4.<|eot_id|>", "4 times 3 is 12.\n\nAnything else?<|eot_id|>"]
    # Role headers are never trained.
    hdr = tok.convert_tokens_to_ids("<|start_header_id|>")
    assert all(m == 0 for t, m in zip(out["input_ids"], out["loss_mask"]) if t == hdr)


def test_think_template_single_turn_trains_the_reasoning(think_tok):
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello!"}]
    out = data.tokenize_conversation(think_tok, msgs)
    assert decoded_runs(think_tok, out) == ["<think>\nThe user greets me.\n</think>\n\nHello!<|im_end|>"]


def test_think_template_rewriting_history_is_reported(think_tok):
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nGreeting.\n</think>\n\nHello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "<think>\nFarewell.\n</think>\n\nGoodbye!"}]
    with pytest.raises(data.TemplateRewritesHistory, match="rewrites history"):
        data.tokenize_conversation(think_tok, msgs)
    out = data.tokenize_conversation(think_tok, msgs, on_rewrite="last_turn")
    assert decoded_runs(think_tok, out) == ["<think>\nFarewell.\n</think>\n\nGoodbye!<|im_end|>"]
    full = think_tok.apply_chat_template(msgs, tokenize=False)
    assert "Greeting." not in full
    assert out["input_ids"] == think_tok(full, add_special_tokens=False)["input_ids"]


def test_generation_prompt_options_reach_the_template(think_tok):
    msgs = [{"role": "user", "content": "Hi"}]
    plain = data.render_prompt(think_tok, msgs)
    no_think = data.render_prompt(think_tok, msgs, enable_thinking=False)
    assert think_tok.decode(no_think[len(plain):]) == "<think>\n\n</think>\n\n"


def test_render_prompt_is_the_prefix_of_the_training_sequence(smollm2_tokenizer, llama3_tok):
    for tok in (smollm2_tokenizer, llama3_tok):
        prompt = data.render_prompt(tok, MULTI[:3])
        out = data.tokenize_conversation(tok, MULTI)
        assert out["input_ids"][:len(prompt)] == prompt
        assert out["loss_mask"].index(1, len(prompt)) == len(prompt)  # the answer starts right after it
        # A single-turn prompt has no seams: exactly the template's own tokenization.
        assert data.render_prompt(tok, MULTI[:1]) == tok.apply_chat_template(MULTI[:1], add_generation_prompt=True)["input_ids"]
    assert prompt[-1] == llama3_tok.apply_chat_template(MULTI[:3], add_generation_prompt=True)["input_ids"][-1]


def test_header_answer_seam_is_tokenized_as_at_serving_time(llama3_tok):
    # With this byte-level BPE, "<|end_header_id|>\n\n" ends a prompt as one "\n\n" token, but
    # "\n\n2+2" inside a longer text splits as "\n", "\n". Tokenizing the whole conversation
    # text would train turn 1 on a prompt the model never saw; segment-wise rendering keeps
    # every earlier prompt a prefix of the later ones.
    tok = llama3_tok
    whole1 = tok.apply_chat_template(MULTI[:1], add_generation_prompt=True)["input_ids"]
    whole3 = tok.apply_chat_template(MULTI[:3], add_generation_prompt=True)["input_ids"]
    assert whole3[:len(whole1)] != whole1  # the template's whole-text tokenization breaks the prefix rule
    ours1, ours3 = data.render_prompt(tok, MULTI[:1]), data.render_prompt(tok, MULTI[:3])
    assert ours3[:len(ours1)] == ours1


def test_truncation_keeps_alignment(smollm2_tokenizer):
    full = data.tokenize_conversation(smollm2_tokenizer, MULTI)
    for n in (1, 7, len(full["input_ids"]) // 2, len(full["input_ids"]) - 1, 10_000):
        cut = data.tokenize_conversation(smollm2_tokenizer, MULTI, max_length=n)
        assert cut["input_ids"] == full["input_ids"][:n] and cut["loss_mask"] == full["loss_mask"][:n]
    with pytest.raises(ValueError, match="max_length"):
        data.tokenize_conversation(smollm2_tokenizer, MULTI, max_length=0)


def test_model_ids_are_kept_and_cut_off_answers_get_no_end_of_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    # Ids the model might produce that re-tokenizing their text would merge differently.
    produced = [tok.convert_tokens_to_ids(c) for c in ("H", "e", "l", "l", "o")]
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    done = data.tokenize_conversation(tok, msgs, answer_ids={1: produced + [eot]})
    assert masked_runs(done["input_ids"], done["loss_mask"]) == [produced + [eot]]
    cut = data.tokenize_conversation(tok, msgs, answer_ids={1: produced})
    assert cut["input_ids"][-5:] == produced and cut["loss_mask"][-5:] == [1] * 5
    assert eot not in cut["input_ids"][-6:]  # no invented end-of-turn, no newline after it
    with pytest.raises(data.TemplateError, match="cut off"):
        data.tokenize_conversation(tok, MULTI, answer_ids={1: produced})


def test_trained_turns_selects_answers(smollm2_tokenizer):
    out = data.tokenize_conversation(smollm2_tokenizer, MULTI, trained_turns={3})
    assert decoded_runs(smollm2_tokenizer, out) == ["4 times 3 is 12.\n\nAnything else?<|im_end|>"]


@pytest.mark.parametrize("msgs,match", [
    ([], "non-empty"),
    ([{"role": "robot", "content": "x"}], "message 0"),
    ([{"role": "user", "content": 3}], "message 0"),
    ([{"role": "assistant", "content": "x"}], "starts with an assistant"),
])
def test_bad_input_names_the_problem(smollm2_tokenizer, msgs, match):
    with pytest.raises(data.TemplateError, match=match):
        data.tokenize_conversation(smollm2_tokenizer, msgs)


def test_missing_end_of_turn_is_an_error(smollm2_tokenizer):
    with pytest.raises(data.TemplateError, match="end_of_turn"):
        data.tokenize_conversation(smollm2_tokenizer, MULTI[:2], end_of_turn=[12345])


def test_tokenize_dataset_on_real_sharegpt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ds, _ = data.load_sharegpt(limit=40)
    out, rep = data.tokenize_dataset(ds, tok, max_length=512, progress=False)
    assert rep.read == len(ds) and rep.kept == len(out) > 0
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for row, src in zip(out, (r for r in ds if r["id"] in set(out["id"]))):
        assert row["length"] == len(row["input_ids"]) == len(row["loss_mask"]) <= 512
        assert row["num_trained"] == sum(row["loss_mask"]) > 0
        runs = masked_runs(row["input_ids"], row["loss_mask"])
        answers = [m["content"] for m in src["messages"] if m["role"] == "assistant"]
        # Every complete trained run is one assistant answer followed by <|im_end|>.
        for run, ans in zip(runs, answers):
            if run[-1] == eot:
                assert tok.decode(run) == ans + "<|im_end|>"
    tiny, rep = data.tokenize_dataset(ds, tok, max_length=8, progress=False)
    assert len(tiny) == 0 and rep.skipped["no trained token within max_length"] == rep.read
