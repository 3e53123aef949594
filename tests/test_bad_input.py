"""A corpus of bad rows and files through every reader: SFT, preference pairs (reward, DPO), PPO prompts,
`align score` and `align serve-rm`.

Each bad row must be rejected alone — named by its file and row, with a reason a user can act on — while the
valid rows around it load; each bad file must stop with one clear message. The stage tests at the end check
that a few rejects under `data.max_reject_share` still train (and are written to runs/<run>/rejects/), and that
too many stop the stage before training, leaving no output directory behind.
"""

import json
import re
import time

import pytest
from conftest import write_jsonl

from align.data.pairs import load_pair_data
from align.data.rows import load_sft_data, read_rows
from align.runtime.config import PPOConfig
from align.runtime.errors import DataError
from align.serving.score import RewardModel, encode_rows, read_input
from align.stages import common
from align.stages.online import prompt_loader

MAX_LENGTH = 128
Q = "What is 2 + 3?"
A = "2 + 3 = 5. The answer is 5."
GOOD = {
    "sft": {"prompt": Q, "completion": A},
    "pairs": {"prompt": Q, "chosen": A, "rejected": "Maybe 6? I am not sure."},
    "ppo": {"prompt": Q},
    "score": {"prompt": Q, "response": A},
}
FIELDS = {"sft": ["prompt", "completion"], "pairs": ["prompt", "chosen", "rejected"], "ppo": ["prompt"],
          "score": ["prompt", "response"]}
MISSING = {  # the reason when one field is left out
    ("sft", "prompt"): "missing key 'prompt' (a prompt/completion row needs both)",
    ("sft", "completion"): "missing key 'completion' (a prompt/completion row needs both)",
    ("pairs", "prompt"): "without 'prompt', 'chosen' must be a whole conversation",
    ("pairs", "chosen"): "missing key 'chosen' (a preference row needs 'chosen' and 'rejected'",
    ("pairs", "rejected"): "missing key 'rejected' (a preference row needs 'chosen' and 'rejected'",
    ("ppo", "prompt"): "a PPO prompt row needs a 'prompt'",
    ("score", "prompt"): "missing key 'prompt' (a row to score needs",
    ("score", "response"): "missing key 'response' (a row to score needs",
}
LONG = "word " * 200  # about 200 tokens, over MAX_LENGTH


def _with(stage: str, **change) -> dict:
    row = dict(GOOD[stage])
    for key, value in change.items():
        if value is _DROP:
            row.pop(key)
        else:
            row[key] = value
    return row


_DROP = object()


def _raw(stage: str, key: str, json_value: str) -> str:
    """The good row with one field replaced by JSON text written by hand (escapes, huge numbers, NaN...)."""
    row = dict(GOOD[stage], **{key: "@@"})
    return json.dumps(row).replace('"@@"', json_value)


def _field_cases(stage: str) -> list[tuple[str, object, str]]:
    """The same defects in every field of a stage's row."""
    cases = []
    for f in FIELDS[stage]:
        role = "user" if f == "prompt" else "assistant"
        cases += [
            (f"{f}-missing", _with(stage, **{f: _DROP}), MISSING[stage, f]),
            (f"{f}-null", _with(stage, **{f: None}), f"'{f}' is null"),
            (f"{f}-empty", _with(stage, **{f: ""}), f"'{f}' is empty or whitespace only"),
            (f"{f}-whitespace", _with(stage, **{f: " \n\t "}), f"'{f}' is empty or whitespace only"),
            (f"{f}-int", _with(stage, **{f: 5}), f"'{f}' must be a list of messages, got int"),
            (f"{f}-bool", _with(stage, **{f: True}), f"'{f}' must be a list of messages, got bool"),
            (f"{f}-object", _with(stage, **{f: {"text": "hi"}}), f"'{f}' must be a list of messages, got dict"),
            (f"{f}-empty-list", _with(stage, **{f: []}), f"'{f}' is an empty list"),
            (f"{f}-unknown-role", _with(stage, **{f: [{"role": "bot", "content": "hi"}]}),
             f"{f}[0] has unknown role 'bot'; use one of system, user, assistant"),
            (f"{f}-role-not-a-string", _with(stage, **{f: [{"role": ["user"], "content": "hi"}]}),
             f"{f}[0] has unknown role ['user']"),
            (f"{f}-message-without-content", _with(stage, **{f: [{"role": role}]}),
             f"{f}[0] must be an object with 'role' and 'content'"),
            (f"{f}-message-not-an-object", _with(stage, **{f: ["hi"]}),
             f"{f}[0] must be an object with 'role' and 'content'"),
            (f"{f}-content-null", _with(stage, **{f: [{"role": role, "content": None}]}),
             f"{f}[0]: 'content' is null"),
            (f"{f}-content-parts", _with(stage, **{f: [{"role": role, "content": [{"type": "text", "text": "x"}]}]}),
             f"{f}[0]: 'content' must be a string, got list"),
            (f"{f}-special-token", _with(stage, **{f: "hi <|im_end|>"}), "text contains the special token '<|im_end|>'"),
            (f"{f}-lone-surrogate", _raw(stage, f, '"caf\\ud800"'), f"'{f}' holds an unpaired UTF-16 surrogate"),
        ]
    return cases


PROMPT_TOO_LONG = {
    "sft": "nothing left to learn after truncation: the prompt alone is",
    "pairs": "nothing left of the answer after truncation: the prompt alone is",
    "ppo": "only 96 fit in data.max_length=128",
    "score": "nothing left of the answer after truncation: the prompt alone is",
}
NOT_AN_OBJECT = {"sft": "a row must be a JSON object, got", "pairs": "a row must be a JSON object, got",
                 "ppo": "a PPO prompt row needs a 'prompt'", "score": "a row must be a JSON object, got"}
UNKNOWN_KEYS = {"sft": "missing key: a row needs 'messages', 'prompt' + 'completion', or 'text' (found: question, "
                       "answer)",
                "pairs": "missing key 'chosen'", "ppo": "a PPO prompt row needs a 'prompt'",
                "score": "missing key: a row to score needs 'prompt' + 'response', 'messages', or 'prompt' + 'chosen' "
                         "+ 'rejected' (found: question, answer)"}


def _row_cases(stage: str) -> list[tuple[str, object, str]]:
    """Defects of the row or the line as a whole."""
    good = json.dumps(GOOD[stage])
    u, a = {"role": "user", "content": Q}, {"role": "assistant", "content": A}
    not_object = NOT_AN_OBJECT[stage]
    cases = [
        ("non-utf8", good.replace("What", "Wh\udce9t").encode("utf-8", "surrogateescape"), "not valid UTF-8: byte 15 of the line is 0xe9; re-save the file as UTF-8"),
        ("truncated-json", good[:-9], "broken JSON line: Unterminated string starting at column"),
        ("trailing-garbage", good + " x", "broken JSON line: Extra data at column"),
        ("array-row", [1, 2], not_object + ("" if stage == "ppo" else " list")),
        ("null-row", "null", not_object + ("" if stage == "ppo" else " null")),
        ("string-row", '"What is 2 + 3?"', not_object + ("" if stage == "ppo" else " str")),
        ("number-row", "42", not_object + ("" if stage == "ppo" else " int")),
        ("huge-number", '{"prompt": ' + "1" * 5000 + "}", "unreadable JSON line: Exceeds the limit (4300 digits)"),
        ("deep-nesting", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",
         "unreadable JSON line: arrays/objects nested too deeply"),
        ("unknown-keys", {"question": Q, "answer": A}, UNKNOWN_KEYS[stage]),
        ("prompt-too-long", _with(stage, prompt=LONG), PROMPT_TOO_LONG[stage]),
        ("prompt-role-order", _with(stage, prompt=[u, u]), "'prompt' has role order user → user, which chat templates"),
        ("prompt-ends-with-answer", _with(stage, prompt=[u, a]), "'prompt' must end with a user message"),
        ("prompt-starts-with-answer", _with(stage, prompt=[a, u]), "'prompt' has role order assistant → user"),
    ]
    if stage == "sft":
        cases += [
            ("completion-is-a-user-turn", _with(stage, completion=[u]), "'completion' must be exactly one assistant"),
            ("messages-without-answer", {"messages": [u]}, "'messages' must end with an assistant message"),
            ("messages-unknown-role", {"messages": [{"role": "human", "content": Q}, a]},
             "messages[0] has unknown role 'human'"),
            ("text-null", {"text": None}, "'text' is null"),
            ("text-whitespace", {"text": "\n \t"}, "'text' is empty or whitespace only"),
        ]
    if stage in ("pairs", "score"):
        cases += [
            ("chosen-equals-rejected", dict(GOOD["pairs"], rejected=A), "'chosen' and 'rejected' are identical"),
            ("chosen-equals-rejected-but-spaces", dict(GOOD["pairs"], rejected=f"  {A}\n"), "are identical"),
            ("answer-too-long", dict(GOOD["pairs"], chosen=LONG),
             "'chosen': prompt + answer is 240 tokens, over the max length 128"),
            ("two-answers", dict(GOOD["pairs"], chosen=[a, a]), "'chosen' must be one assistant answer"),
            ("conversations-not-sharing-a-prompt",
             {"chosen": [u, a], "rejected": [{"role": "user", "content": "Other?"}, a]}, "do not share a prompt"),
            ("hh-text-without-prompt-key", {"chosen": "5", "rejected": "6"}, "must be a whole conversation"),
        ]
    if stage == "pairs":
        cases += [
            ("margin-word", dict(GOOD["pairs"], margin="lots"), "'margin' must be a finite number, got 'lots'"),
            ("margin-nan", _raw("pairs", "margin", "NaN"), "'margin' must be a finite number, got nan"),
            ("margin-infinite", _raw("pairs", "margin", "1e999"), "'margin' must be a finite number, got inf"),
            ("margin-huge-int", _raw("pairs", "margin", "1" + "0" * 400), "'margin' must be a finite number, got 1000"),
            ("margin-list", dict(GOOD["pairs"], margin=[1]), "'margin' must be a finite number, got [1]"),
        ]
    if stage == "score":
        cases += [
            ("response-too-long", _with(stage, response=LONG), "prompt + answer is 240 tokens, over the max length 128"),
            ("text-only", {"text": "just some text"}, "a reward model scores an answer to a prompt, not a plain 'text'"),
            ("messages-without-answer", {"messages": [u]}, "'messages' must end with an assistant message"),
            ("response-is-a-user-turn", _with(stage, response=[u]), "'response' must be one assistant answer"),
        ]
    return cases


STAGES = ("sft", "pairs", "ppo", "score")
CORPUS = {stage: _field_cases(stage) + _row_cases(stage) for stage in STAGES}


def said(reason: str, error: str, any_count: bool = False) -> bool:
    """`reason` is in `error`. The token counts in the reasons ("prompt + answer is 240 tokens") are the embedded
    SmolLM2 tokenizer's; with `any_count` (the tests on the tiny models, whose test-time tokenizer counts other
    numbers) a count there matches any number."""
    if not any_count:
        return reason in error
    return re.search(re.sub(r"is\\ \d+\\ tokens", r"is\\ \\d+\\ tokens", re.escape(reason)), error) is not None


# a defect of the line itself (the JSON cannot be read): a request body with it is malformed, not a bad item
LINE_LEVEL = ("non-utf8", "truncated-json", "trailing-garbage", "huge-number", "deep-nesting")


def _line(row) -> bytes:
    return row if isinstance(row, bytes) else (row if isinstance(row, str) else json.dumps(row)).encode()


def _ppo_cfg() -> PPOConfig:
    cfg = PPOConfig()
    cfg.data.max_length, cfg.rollout.max_new_tokens = MAX_LENGTH, 32
    return cfg


def load(stage: str, tokenizer, spec: str):
    """Rows of `spec` through the stage's own loader: (number of good rows, rejects as (row, source, reason))."""
    if stage == "score":
        rm = RewardModel(None, tokenizer, MAX_LENGTH, "test")  # encoding needs the tokenizer only
        results, _, _ = encode_rows(rm, read_input(spec))
        return (sum("error" not in r for r in results),
                [(r["row"], spec, r["error"]) for r in results if "error" in r])
    loaded = {"sft": lambda: load_sft_data(spec, tokenizer, MAX_LENGTH, True),
              "pairs": lambda: load_pair_data(spec, tokenizer, MAX_LENGTH),
              "ppo": lambda: prompt_loader(_ppo_cfg())(tokenizer)(spec, "train", None)}[stage]()
    assert loaded.total == len(loaded.encoded) + len(loaded.rejects)
    return len(loaded.encoded), [(r.row, r.source, r.reason) for r in loaded.rejects]


def assert_clear(reason: str) -> None:
    """A reason a user can act on: one short line, in the data's words, no Python internals."""
    assert reason and "\n" not in reason and len(reason) < 400, reason
    for internal in ("Traceback", "NoneType", "Error:", "Exception", "<class", "object at 0x"):
        assert internal not in reason, reason


@pytest.mark.parametrize("stage, name, row, reason",
                         [(s, n, r, why) for s in STAGES for n, r, why in CORPUS[s]],
                         ids=[f"{s}-{n}" for s in STAGES for n, _, _ in CORPUS[s]])
def test_each_bad_row_is_rejected_alone_with_file_row_and_reason(tokenizer, tmp_path, stage, name, row, reason):
    path = tmp_path / "data.jsonl"
    with open(path, "wb") as f:
        f.write(b"\n".join([_line(GOOD[stage]), _line(row), _line(GOOD[stage])]) + b"\n")
    n_good, rejects = load(stage, tokenizer, str(path))
    assert n_good == 2 and len(rejects) == 1, rejects
    row_no, source, why = rejects[0]
    assert (row_no, source) == (2, str(path))
    assert reason in why
    assert_clear(why)


def test_the_corpus_is_big_enough():
    sizes = {stage: len(cases) for stage, cases in CORPUS.items()}
    assert all(n >= 30 for n in sizes.values()), sizes


# ---------------------------------------------------------------------------------------------- whole files


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf"], ids=["empty", "blank-lines", "bom-only"])
def test_an_empty_file_is_one_clear_error(tokenizer, tmp_path, stage, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load(stage, tokenizer, str(path))
    assert str(path) in str(e.value) and "no rows" in str(e.value)


@pytest.mark.parametrize("stage", STAGES)
def test_bom_and_crlf_lose_no_row(tokenizer, tmp_path, stage):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join([_line(GOOD[stage])] * 3) + b"\r\n")
    assert load(stage, tokenizer, str(path)) == (3, [])


def test_a_utf16_file_is_one_clear_error(tokenizer, tmp_path):
    path = tmp_path / "utf16.jsonl"  # what PowerShell's `>` writes
    path.write_bytes(("\n".join([json.dumps(GOOD["sft"])] * 3) + "\n").encode("utf-16"))
    with pytest.raises(DataError, match="the file is UTF-16 .*; re-save it as UTF-8"):
        load("sft", tokenizer, str(path))


@pytest.mark.parametrize("text, error", [
    ("[" * 100_000 + "]" * 100_000, "unreadable JSON: arrays/objects nested too deeply"),
    ("[" + "1" * 5000 + "]", "unreadable JSON: Exceeds the limit (4300 digits)"),
    ('{"prompt": "q"}', "must hold a list of rows"),
    ('[{"prompt": "q", ', "broken JSON at line 1, column"),
    ("", "broken JSON at line 1, column 1"),
])
def test_a_broken_json_file_is_one_clear_error(tokenizer, tmp_path, text, error):
    path = tmp_path / "rows.json"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        load("sft", tokenizer, str(path))
    assert str(e.value).startswith(f"{path}: ") and error in str(e.value)
    assert "Traceback" not in str(e.value)


def test_json_file_with_bom_and_bad_rows(tokenizer, tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD["sft"], {"prompt": Q}, GOOD["sft"]]).encode())
    assert load("sft", tokenizer, str(path)) == (2, [(2, str(path), MISSING["sft", "completion"])])


def test_csv_rows_keep_their_line_numbers_and_their_text(tokenizer, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join([
        "prompt,completion",
        f'"{Q}","{A}"',                            # line 2
        '"Explain, in two lines.","First line.',   # line 3: a quoted answer over two lines
        'Second line."',
        "",                                        # a blank line is not a row
        f'"{Q}",',                                 # line 6: empty completion
        f'"{Q}"',                                  # line 7: no completion column at all
        f'"{Q}","A page\x0cbreak and a line\u2028separator stay inside the field."',  # line 8
    ]).encode() + b"\r\n")
    rows = list(read_rows(str(path)))
    assert [n for _, n, _ in rows] == [2, 3, 6, 7, 8]
    assert rows[1][2]["completion"] == "First line.\nSecond line."  # (line ends are read as \n)
    assert rows[4][2]["completion"] == "A page\x0cbreak and a line\u2028separator stay inside the field."
    n_good, rejects = load("sft", tokenizer, str(path))
    assert n_good == 3
    assert rejects == [(6, str(path), "'completion' is empty or whitespace only"),
                       (7, str(path), "'completion' is null")]


def test_csv_field_over_the_csv_module_limit(tokenizer, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text(f"prompt,chosen,rejected,margin\n{Q},{'yes ' * 50_000},no,\n{Q},{A},no,0.5\n{Q},{A},no,big\n")
    n_good, rejects = load("pairs", tokenizer, str(path))
    assert n_good == 1  # the CSV margin "0.5" is a number, the blank one is no margin
    assert [r[0] for r in rejects] == [2, 4]
    assert rejects[0][2].startswith("'chosen': prompt + answer is over the max length 128 (200,014 characters)")
    assert rejects[1][2] == "'margin' must be a finite number, got 'big'"


# ---------------------------------------------------------------------------------------------- a 50 MB line


def write_huge_row(path, stage: str, key: str, mb: int = 50) -> int:
    """One JSONL row whose `key` holds `mb` MB of words, streamed to disk in 1 MB pieces."""
    head, tail = json.dumps(dict(GOOD[stage], **{key: "@@"})).split('"@@"')
    piece = ("word " * (1 << 18))[: 1 << 20]  # 1 MiB of words
    with open(path, "wb") as f:
        f.write(_line(GOOD[stage]) + b"\n")
        f.write((head + '"').encode())
        f.writelines(piece.encode() for _ in range(mb))
        f.write(('"' + tail).encode() + b"\n")
        f.write(_line(GOOD[stage]) + b"\n")
    return path.stat().st_size


HUGE = {  # (stage, key): what happens to the row
    ("sft", "completion"): None,  # accepted: SFT keeps the prompt and cuts the answer to max_length
    ("sft", "prompt"): "nothing left to learn after truncation",
    ("pairs", "chosen"): "'chosen': prompt + answer is over the max length 128",
    ("ppo", "prompt"): "the prompt is over 96 tokens",
    ("score", "response"): "prompt + answer is over the max length 128",
}


@pytest.mark.parametrize("stage, key", list(HUGE), ids=[f"{s}-{k}" for s, k in HUGE])
def test_a_50mb_line_is_handled_quickly(tokenizer, tmp_path, stage, key):
    path = tmp_path / "huge.jsonl"
    assert write_huge_row(path, stage, key) > 50 * 2**20
    start = time.perf_counter()
    n_good, rejects = load(stage, tokenizer, str(path))
    seconds = time.perf_counter() - start
    print(f"{stage} {key}: 50 MiB row read in {seconds:.2f} s")  # reported with -s; no timing assertion
    reason = HUGE[stage, key]
    if reason is None:
        assert n_good == 3 and not rejects
    else:
        assert n_good == 2 and [(r[0], r[1]) for r in rejects] == [(2, str(path))], rejects
        assert reason in rejects[0][2] and len(rejects[0][2]) < 400


# ---------------------------------------------------------------------------------------------- align score


def _corpus_file(path, stage: str) -> dict[int, tuple[str, str]]:
    """Every bad row of the stage's corpus between good rows; returns {row number: (case, reason)}."""
    lines, expected = [], {}
    for name, row, reason in CORPUS[stage]:
        lines += [_line(GOOD[stage]), _line(row)]
        expected[len(lines)] = (name, reason)
    lines.append(_line(GOOD[stage]))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


def test_align_score_reports_every_bad_row_and_scores_the_rest(tiny_reward_run, tmp_path, capsys):
    from align.cli.main import main

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    expected = _corpus_file(src, "score")
    code = main(["--quiet", "score", "--model", str(tiny_reward_run), "--input", str(src), "--output", str(out),
                 "--device", "cpu", "--max-length", str(MAX_LENGTH)])
    err = capsys.readouterr().err
    assert code == 1, err
    results = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    n = 2 * len(expected) + 1
    assert [r["row"] for r in results] == list(range(1, n + 1))
    for r in results:
        if r["row"] in expected:
            name, reason = expected[r["row"]]
            assert set(r) == {"row", "error"} and said(reason, r["error"], any_count=True), name
            assert_clear(r["error"])
        else:
            assert isinstance(r["score"], float)
    assert f"scored {n - len(expected)} of {n} rows" in err and f"{len(expected)} rows failed" in err
    first = min(expected)
    assert said(f":{first}: {expected[first][1]}", err, any_count=True) and "Traceback" not in err


@pytest.mark.parametrize("content", [b"", b"\n \n"], ids=["empty", "blank-lines"])
def test_align_score_on_an_empty_file_says_so(tiny_reward_run, tmp_path, capsys, content):
    from align.cli.main import main

    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    assert main(["--quiet", "score", "--model", str(tiny_reward_run), "--input", str(src)]) == 2
    assert f"error: {src}: no rows to score (the input is empty)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- align serve-rm


@pytest.fixture(scope="module")
def client(tiny_reward_run):
    from starlette.testclient import TestClient

    from align.serving.score import load_reward_model
    from align.serving.serve import Limits, create_app

    rm = load_reward_model(tiny_reward_run, "cpu")
    return TestClient(create_app(rm, Limits(max_items=8, max_length=MAX_LENGTH, max_body_bytes=2**20)))


@pytest.mark.parametrize("name, row, reason", CORPUS["score"], ids=[n for n, _, _ in CORPUS["score"]])
def test_server_names_the_bad_item(client, name, row, reason):
    body = b'{"items": [' + _line(GOOD["score"]) + b", " + _line(row) + b"]}"
    resp = client.post("/score", content=body)
    error = resp.json()["error"]
    if name in LINE_LEVEL:
        assert resp.status_code == 400 and error.startswith("malformed JSON"), error
    else:
        assert resp.status_code == 422 and error.startswith("item 1: ") and said(reason, error, any_count=True)
        assert resp.json()["items"] == [{"item": 1, "error": error[len("item 1: "):]}]
    assert "Traceback" not in resp.text


@pytest.mark.parametrize("body, status, error", [
    (b"", 400, "the request body is empty"),
    (b" \n", 400, "the request body is empty"),
    (b"\xff\xfe{}", 400, "malformed JSON"),
    (b'{"items": [' + b"1" * 5000 + b"]}", 400, "malformed JSON: Exceeds the limit (4300 digits)"),
    (b"[" * 100_000, 400, "malformed JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "malformed JSON: arrays/objects nested too deeply"),
    (b"[]", 422, 'the body must be a JSON object {"items": [...]}'),
    (b"null", 422, 'the body must be a JSON object {"items": [...]}'),
    (b'{"item": []}', 422, 'the body must be a JSON object {"items": [...]}'),
    (b'{"items": {"prompt": "q"}}', 422, 'the body must be a JSON object {"items": [...]}'),
    (b'{"items": []}', 422, "'items' is empty: nothing to score"),
    (json.dumps({"items": [GOOD["score"]] * 9}).encode(), 413, "9 items in one request; the limit is 8"),
    (json.dumps({"items": [dict(GOOD["score"], response="x" * 2**20)]}).encode(), 413, "the limit is 1048576 bytes"),
    (json.dumps({"items": [GOOD["score"], {"prompt": Q}, {"text": "t"}]}).encode(), 422,
     "item 1: missing key 'response' (a row to score needs"),
], ids=["empty", "blank", "utf16-bom", "huge-number", "unclosed", "deep", "array", "null", "no-items-key",
        "items-object", "items-empty", "too-many-items", "too-big", "two-bad-items"])
def test_server_rejects_bad_bodies_with_json_errors(client, body, status, error):
    resp = client.post("/score", content=body)
    assert resp.status_code == status and error in resp.json()["error"]


def test_server_refuses_a_streamed_50mb_body_without_reading_it_all(client):
    def chunks():
        for _ in range(50):
            yield b"x" * 2**20

    resp = client.post("/score", content=chunks())  # chunked: no content-length to refuse it by
    assert resp.status_code == 413 and "limit is 1048576 bytes" in resp.json()["error"]
    assert client.post("/score", json={"items": [GOOD["score"]]}).status_code == 200  # and keeps serving


# ---------------------------------------------------------------------------------------------- stages


BAD_LINES = {  # a few bad rows of each kind that every stage reader must survive
    "sft": [b'{"prompt": "caf\xe9", "completion": "x"}', b'{"prompt": "What is', {"prompt": Q, "completion": None},
            {"prompt": [{"role": "bot", "content": Q}], "completion": A}],
    "pairs": [b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}', b'{"prompt": "What is',
              dict(GOOD["pairs"], rejected=A), dict(GOOD["pairs"], chosen=None)],
}
BAD_REASONS = ["not valid UTF-8", "broken JSON line", None, None]


def _mixed(path, good_rows: list[dict], bad: list) -> list[int]:
    """Good rows with the bad ones spread among them; returns the bad rows' line numbers."""
    rows, bad_at, step = [], [], len(good_rows) // len(bad)
    for i, row in enumerate(good_rows):
        rows.append(row)
        if i % step == step - 1 and len(bad_at) < len(bad):
            rows.append(bad[len(bad_at)])
            bad_at.append(len(rows))
    write_jsonl(path, rows)
    return bad_at


def _stage_cfg(kind: str, tmp_path, tiny_model_dir, data, *extra):
    from align.runtime.config import RewardConfig, SFTConfig, load_config

    cls = {"sft": SFTConfig, "pairs": RewardConfig}[kind]
    more = ["samples=0"] if kind == "sft" else []
    return load_config(cls, None, [f"model.name_or_path={tiny_model_dir}", f"runs_dir={tmp_path / 'runs'}", "run=t",
                                   f"data.train={data}", "data.eval=", "training.max_steps=1", "training.batch_size=4",
                                   "lora.r=4", "lora.alpha=8", *more, *extra])


def _good_rows(kind: str) -> list[dict]:
    from conftest import TRAIN_NUMBERS, pair_rows

    rows = pair_rows(TRAIN_NUMBERS)  # 20 rows
    if kind == "sft":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    return rows


def _stage_module(kind: str):
    from align.stages import reward, sft

    return {"sft": sft, "pairs": reward}[kind]


@pytest.mark.parametrize("kind", ["sft", "pairs"])
def test_a_few_bad_rows_are_set_aside_and_the_rest_trains(tmp_path, tiny_model_dir, kind):
    data = tmp_path / "train.jsonl"
    bad_at = _mixed(data, _good_rows(kind), BAD_LINES[kind])
    stage = _stage_module(kind)
    out = stage.run(_stage_cfg(kind, tmp_path, tiny_model_dir, data, "data.max_reject_share=0.2"))
    assert (out / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_train_rejected"]) == (20, 4)
    rejects = [json.loads(line) for line in (out.parent / "rejects" / f"{stage.STAGE}-train.jsonl").read_text(
        encoding="utf-8").splitlines()]
    assert [(r["source"], r["row"]) for r in rejects] == [(str(data), n) for n in bad_at]
    for r, why in zip(rejects, BAD_REASONS):
        assert r["reason"] and (why is None or why in r["reason"]) and r["row_preview"]
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["rejects", stage.STAGE])  # no temp dirs left


@pytest.mark.parametrize("kind", ["sft", "pairs"])
def test_too_many_bad_rows_stop_before_training_and_leave_no_output(tmp_path, tiny_model_dir, kind, monkeypatch):
    data = tmp_path / "train.jsonl"
    bad_at = _mixed(data, _good_rows(kind), BAD_LINES[kind])
    stage = _stage_module(kind)
    monkeypatch.setattr(common, "load_base", lambda *a, **k: pytest.fail("the model loaded despite bad data"))
    with pytest.raises(DataError) as e:
        stage.run(_stage_cfg(kind, tmp_path, tiny_model_dir, data, "data.max_reject_share=0.1"))
    msg = str(e.value)
    rejects = tmp_path / "runs" / "t" / "rejects" / f"{stage.STAGE}-train.jsonl"
    assert f"4 of 24 rows rejected (16.7%; data.max_reject_share is 10.0%). All rejects with reasons: {rejects}" in msg
    assert f"first: {data}:{bad_at[0]}: not valid UTF-8" in msg and f"first: {data}:{bad_at[1]}: broken JSON" in msg
    assert "raise data.max_reject_share to train on the valid rows" in msg
    assert [p.name for p in (tmp_path / "runs" / "t").iterdir()] == ["rejects"]  # no output, no work or temp dir


def test_cutting_a_huge_sft_answer_before_tokenizing_changes_no_token(tokenizer, tmp_path):
    """The guard that spares tokenizing megabytes keeps exactly the tokens full tokenization keeps."""
    from align.data.rows import char_bound
    from align.modeling.formatting import encode

    answer = " ".join(f"step {i}: add {i} and {i + 1}." for i in range(8000))  # ~200k characters
    assert len(answer) > 2 * char_bound(tokenizer, MAX_LENGTH)
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": Q, "completion": answer}, {"text": answer}])
    loaded = load_sft_data(str(path), tokenizer, MAX_LENGTH, True)
    full = [encode(tokenizer, [{"role": "user", "content": Q}], [{"role": "assistant", "content": answer}], None,
                   MAX_LENGTH), encode(tokenizer, None, None, answer, MAX_LENGTH)]
    for got, want in zip(loaded.encoded, full):
        assert (got.input_ids, got.labels, got.truncated) == (want.input_ids, want.labels, True)
        assert len(got.input_ids) == MAX_LENGTH
