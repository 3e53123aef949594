"""Reading every supported format, and a reason for every class of bad row."""

import json

import pytest
from conftest import chat, write_jsonl

from align.data.rows import check_reject_share, data_hash, load_sft_data, read_rows, write_rejects
from align.runtime.errors import DataError

GOOD = chat("What is 1 + 1?", "1 + 1 = 2. The answer is 2.")


def _load(tokenizer, path, **kw):
    return load_sft_data(str(path), tokenizer, kw.pop("max_length", 256), True, **kw)


@pytest.mark.parametrize("row, reason", [
    ({"question": "q"}, "missing key: a row needs 'messages', 'prompt' + 'completion', or 'text' (found: question)"),
    ({"prompt": "q"}, "missing key 'completion'"),
    ({"prompt": "q", "completion": None}, "'completion' is null"),
    ({"prompt": "", "completion": "a"}, "'prompt' is empty or whitespace only"),
    ({"prompt": "q", "completion": " \n\t"}, "'completion' is empty or whitespace only"),
    ({"prompt": 5, "completion": "a"}, "'prompt' must be a list of messages, got int"),
    ({"text": ["a"]}, "'text' must be a string, got list"),
    ({"messages": "hi"}, "'messages' must be a list of messages, got str"),
    ({"messages": []}, "'messages' is an empty list"),
    ({"messages": [{"role": "user"}]}, "messages[0] must be an object with 'role' and 'content'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0] has unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "role order user → user → assistant"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "role order assistant"),
    ({"messages": [{"role": "user", "content": "a"}]}, "'messages' must end with an assistant message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]}, "'content' is null"),
    ({"prompt": "q", "completion": [{"role": "user", "content": "a"}]}, "'completion' must be exactly one assistant"),
    ({"prompt": "q", "completion": "a <|im_end|>"}, "special token '<|im_end|>'"),
    ({"prompt": "word " * 300, "completion": "a"}, "nothing left to learn after truncation"),
    ([1, 2], "a row must be a JSON object, got list"),
])
def test_each_bad_row_gets_its_reason(tokenizer, tmp_path, row, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    loaded = _load(tokenizer, path)
    assert len(loaded.encoded) == 1 and len(loaded.rejects) == 1
    bad = loaded.rejects[0]
    assert bad.row == 2 and bad.source == str(path)
    assert reason in bad.reason


def test_non_utf8_and_broken_json_lines_name_the_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, b'{"text": "caf\xe9"}', '{"text": "unterminated', GOOD])
    loaded = _load(tokenizer, path)
    reasons = {r.row: r.reason for r in loaded.rejects}
    assert "not valid UTF-8" in reasons[2]
    assert "broken JSON line" in reasons[3]
    assert len(loaded.encoded) == 2


def test_empty_file_is_an_error(tokenizer, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="no rows"):
        _load(tokenizer, path)


def test_missing_file_and_unknown_suffix(tokenizer, tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        list(read_rows(str(tmp_path / "nope.jsonl")))
    other = tmp_path / "d.txt"
    other.write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        list(read_rows(str(other)))


def test_unreachable_hub_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="'someorg/no-such-data' is neither a local file nor a dataset the hub"):
        list(read_rows("someorg/no-such-data"))


def test_prompt_completion_forms(tokenizer, tmp_path):
    rows = [
        {"prompt": "What is 2 + 2?", "completion": "4"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
         "completion": [{"role": "assistant", "content": "4"}]},
        {"text": "Some plain text."},
    ]
    loaded = _load(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows))
    assert not loaded.rejects and len(loaded.encoded) == 3
    assert loaded.encoded[2].prompt_len == 0


def test_json_parquet_csv_and_saved_dataset_read_alike(tokenizer, tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": "a?", "completion": "b."}, {"prompt": "c?", "completion": "d."}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.csv").write_text("prompt,completion\na?,b.\nc?,d.\n")
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    expected = [e.input_ids for e in _load(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows)).encoded]
    for name in ("d.json", "d.parquet", "d.csv", "saved"):
        assert [e.input_ids for e in _load(tokenizer, tmp_path / name).encoded] == expected, name


def test_csv_messages_column_as_json(tokenizer, tmp_path):
    msgs = json.dumps(GOOD["messages"]).replace('"', '""')
    (tmp_path / "d.csv").write_text(f'messages\n"{msgs}"\n')
    assert len(_load(tokenizer, tmp_path / "d.csv").encoded) == 1


def test_broken_json_file_names_line(tokenizer, tmp_path):
    (tmp_path / "d.json").write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match=r"d.json: broken JSON at line 3"):
        _load(tokenizer, tmp_path / "d.json")


def test_non_utf8_csv_names_line(tokenizer, tmp_path):
    (tmp_path / "d.csv").write_bytes(b"text\nfine\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"d.csv:3: not valid UTF-8"):
        _load(tokenizer, tmp_path / "d.csv")


def test_saved_dataset_missing_split(tokenizer, tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"text": "a"}])}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match="no split 'test' \\(it has train\\)"):
        _load(tokenizer, tmp_path / "saved", split="test")


def test_reject_share_threshold_and_rejects_file(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 8 + [{"text": ""}, {"prompt": "q"}])
    loaded = _load(tokenizer, path)
    rejects = tmp_path / "rejects.jsonl"
    write_rejects(rejects, loaded.rejects)
    written = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["row"], r["source"]) for r in written] == [(9, str(path)), (10, str(path))]
    assert all(r["reason"] for r in written)
    check_reject_share(loaded, 0.25, rejects, "train data")  # 20% rejected: allowed
    with pytest.raises(DataError) as e:
        check_reject_share(loaded, 0.1, rejects, "train data")
    msg = str(e.value)
    assert "2 of 10 rows rejected (20.0%" in msg and str(rejects) in msg
    assert f"{path}:9: 'text' is empty or whitespace only" in msg


def test_all_rows_rejected_fails_even_with_full_tolerance(tokenizer, tmp_path):
    loaded = _load(tokenizer, write_jsonl(tmp_path / "d.jsonl", [{"text": " "}]))
    with pytest.raises(DataError, match="no usable rows remain"):
        check_reject_share(loaded, 1.0, tmp_path / "r.jsonl", "train data")


def test_limit_takes_first_valid_rows(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}] + [chat(f"q{i}", f"a{i}") for i in range(5)])
    loaded = _load(tokenizer, path, limit=3)
    assert len(loaded.encoded) == 3 and [e.row for e in loaded.examples] == [2, 3, 4]


def test_shipped_sft_data_is_clean(tokenizer):
    for split in ("train", "eval"):
        loaded = _load(tokenizer, f"reward_data/sft/{split}.jsonl", max_length=512)
        assert not loaded.rejects and len(loaded.encoded) >= 100


def test_comma_separated_files_are_read_in_order_and_hashed_together(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"n": 1}, {"n": 2}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"n": 3}])
    rows = list(read_rows(f"{a},{b}"))
    assert [(src.endswith(name), row, raw) for (src, row, raw), name in zip(rows, ["a.jsonl", "a.jsonl", "b.jsonl"])
            ] == [(True, 1, {"n": 1}), (True, 2, {"n": 2}), (True, 1, {"n": 3})]  # each row keeps its file and line
    assert data_hash(f"{a},{b}") != data_hash(f"{b},{a}") != data_hash(str(a))
    with pytest.raises(DataError, match="an empty name between commas"):
        list(read_rows(f"{a},,{b}"))
    with pytest.raises(DataError, match="not found"):
        list(read_rows(f"{a},{tmp_path}/missing.jsonl"))
