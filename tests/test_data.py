"""Loaders and normalizers: real wheels, and every malformed-record reason."""
from __future__ import annotations

import json

import pytest

from eaglebook import data


def test_sharegpt_loads_every_complete_record():
    ds, rep = data.load_sharegpt()
    # The shipped file is cut off mid-record: 17,671 complete conversations, then a broken tail.
    assert rep.read == 17671
    assert rep.skipped["truncated record at end of file"] == 1
    assert rep.kept == len(ds) == rep.read - (rep.n_skipped - 1)
    assert len(ds) > 17000
    row = ds[0]
    assert set(row) == {"id", "source", "messages"}
    roles = [m["role"] for m in row["messages"]]
    assert roles[0] in ("system", "user") and "assistant" in roles
    assert all(isinstance(m["content"], str) for m in row["messages"])


def test_sharegpt_limit():
    ds, rep = data.load_sharegpt(limit=50)
    assert rep.read == 50 and len(ds) == rep.kept <= 50


@pytest.mark.parametrize("record,reason", [
    ({"conversations": []}, "empty conversation"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]}, "unknown role 'robot'"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no assistant turn"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                        {"from": "gpt", "value": "c"}]}, "wrong turn order"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "c"}]}, "non-string content"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]}, "empty turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "system turn after the start"),
    ({"messages": "nope"}, "messages is not a list"),
    ({"text": "plain"}, "unknown record format"),
    ("a string", "record is not an object"),
])
def test_malformed_records_are_skipped_with_reason(record, reason):
    rows, rep = data.normalize_records([record, {"messages": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": "a"}]}])
    assert len(rows) == 1 and rep.kept == 1 and rep.read == 2
    assert rep.skipped == {reason: 1}
    assert reason in rep.table()


def test_formats_normalize_to_one_schema():
    sharegpt = {"id": "s1", "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                              {"from": "chatgpt", "value": "A"}, {"from": "human", "value": "Q2"}]}
    openai = {"id": "o1", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                       {"role": "assistant", "content": "A"}]}
    ultra = {"id": "u1", "data": ["Q", "A"]}
    lead = {"id": "l1", "conversations": [{"from": "gpt", "value": "tail"}, {"from": "human", "value": "Q"},
                                          {"from": "gpt", "value": "A"}]}
    rows, rep = data.normalize_records([sharegpt, openai, ultra, lead])
    assert rep.kept == 4 and rep.n_skipped == 0
    assert rows[0]["messages"] == rows[1]["messages"] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert rows[2]["messages"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert rows[3]["messages"] == rows[2]["messages"]
    assert rep.notes == {"trailing user turn dropped": 1, "leading assistant turn dropped": 1}


def test_truncated_json_array_and_jsonl(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    arr = tmp_path / "cut.json"
    arr.write_text("[" + json.dumps(good) + ",\n" + json.dumps(good) + ', {"messages": [{"role": "us')
    ds, rep = data.load_conversations(arr)
    assert len(ds) == 2 and rep.skipped == {"truncated record at end of file": 1}
    jl = tmp_path / "x.jsonl"
    jl.write_text(json.dumps(good) + "\n{broken\n\n" + json.dumps(good) + "\n")
    ds, rep = data.load_conversations(jl)
    assert len(ds) == 2 and rep.skipped == {"invalid JSON line": 1}


def test_mtbench_and_humaneval():
    mt = data.load_mtbench()
    assert len(mt) == 80
    assert sorted(set(mt["category"])) == sorted(data.MTBENCH_CATEGORIES)
    assert all(len(t) == 2 for t in mt["turns"])
    assert mt[0]["messages"] == [{"role": "user", "content": mt[0]["turns"][0]}]
    he = data.load_humaneval()
    assert len(he) == 164 and he[0]["id"] == "HumanEval/0"
    assert he[0]["prompt"] in he[0]["messages"][0]["content"]
