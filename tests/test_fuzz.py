"""Fuzzing the data readers, the row parsers of every stage and the scoring server's request parsing
(hypothesis): whatever the input, the only failures are the designed ones — a row-level RowError / FormatError
with a reason, a file-level DataError, or a 4xx JSON answer — never another exception or a 500.

The example counts are small so the file runs in seconds; ALIGN_FUZZ_EXAMPLES=20000 runs a long fuzz:

    ALIGN_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -q -s
"""

import io
import json
import os
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.data.pairs import load_pair_data, parse_pair, row_margin
from align.data.rows import check_reject_share, jsonl_rows, load_sft_data, parse_row, read_rows, write_rejects
from align.runtime.config import PPOConfig
from align.runtime.errors import DataError, RowError
from align.serving.score import RewardModel, encode_rows, parse_score_row, read_input
from align.stages.online import prompt_loader

LONG_RUN = os.environ.get("ALIGN_FUZZ_EXAMPLES")
COUNTS: dict[str, int] = {}


def fuzz(default: int):
    """settings for one fuzz test: `default` examples, or ALIGN_FUZZ_EXAMPLES; no deadline, no database."""
    return settings(max_examples=int(LONG_RUN) if LONG_RUN else default, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def counted(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nfuzz examples run: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))


# ---------------------------------------------------------------------------------------------- strategies

KEYS = ["prompt", "completion", "messages", "text", "chosen", "rejected", "response", "margin", "role", "content"]
ROLES = ["system", "user", "assistant", "bot", ""]
TEXTS = ["What is 2 + 3?", "The answer is 5.", "", " \n\t", "<|im_end|>", "<|im_start|>user", "caf\ud800",
         "\n\nHuman: Hi\n\nAssistant: Hello.", "\n\nHuman: What is 2 + 3?\n\nAssistant: 5.", "\n\nHuman: ",
         "word " * 150, "\x00\x0c\u2028\u0085", "é" * 3]

texts = st.one_of(st.sampled_from(TEXTS), st.text(max_size=40),  # (st.text draws no surrogates: add some)
                  st.lists(st.sampled_from(["a", " ", "\ud800", "\udfff", "\ud83d", "\ude00"]), max_size=5)
                  .map("".join))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300, max_value=10**310),
                    st.floats(), texts)
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": texts}),
    st.fixed_dictionaries({"role": scalars, "content": scalars}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), scalars, max_size=3),
    scalars), max_size=5)
values = st.recursive(st.one_of(scalars, messages),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)),
                                                              inner, max_size=4)),
                      max_leaves=12)
rows = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), st.one_of(texts, messages, scalars), max_size=5),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), values, max_size=5),
    values)


def _good_line(row) -> bytes:
    return json.dumps(row).encode()


LINES = st.one_of(
    rows.map(_good_line),
    rows.map(_good_line).flatmap(lambda b: st.integers(0, len(b)).map(lambda i: b[:i])),  # a truncated row
    st.binary(max_size=60),
    st.sampled_from([b"", b"\r", b" ", b"\xef\xbb\xbf", b"\xff\xfe", b"[" * 3000, b"1" * 5000, b"NaN",
                     b'{"a": 1}{"b": 2}', b'"\\ud800"', b"\x00"]),
    texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@st.composite
def jsonl_bytes(draw) -> bytes:
    """JSONL-ish bytes: real rows, rows cut short, random bytes, odd line ends and encodings."""
    lines = draw(st.lists(LINES, max_size=8))
    sep = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    return sep.join(lines) + draw(st.sampled_from([b"", sep]))


# ---------------------------------------------------------------------------------------------- readers


def _check_rows(items, source=None) -> None:
    last = 0
    for src, n, raw in items:
        assert isinstance(src, str) and isinstance(n, int) and n > last
        last = n
        if source is not None:
            assert src == source
        if isinstance(raw, RowError):
            assert str(raw) and "\n" not in str(raw)


@fuzz(800)
@given(data=st.one_of(jsonl_bytes(), st.binary(max_size=400)))
def test_jsonl_rows_take_any_bytes(data):
    counted("jsonl_rows(bytes)")
    try:
        items = list(jsonl_rows(io.BytesIO(data), "f.jsonl"))
    except DataError as e:  # the one whole-stream error: a UTF-16 file
        assert data.startswith((b"\xff\xfe", b"\xfe\xff")) and "the file is UTF-16" in str(e)
        return
    _check_rows(items, "f.jsonl")


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@fuzz(300)
@given(data=st.one_of(jsonl_bytes(), st.binary(max_size=400),
                      st.lists(rows, max_size=5).map(lambda r: json.dumps(r).encode())),
       suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_read_rows_takes_any_file(scratch, data, suffix):
    counted(f"read_rows({suffix})")
    path = scratch / f"data{suffix}"
    path.write_bytes(data)
    try:
        items = list(read_rows(str(path)))
    except DataError as e:  # a whole-file problem (a .json or .csv that cannot be read): one clear message
        assert str(e).startswith(str(path)) and "Traceback" not in str(e)
        return
    _check_rows(items, str(path))


def _csv(table: list[list[str]]) -> str:
    import csv

    buf = io.StringIO()
    csv.writer(buf).writerows([[c.encode("utf-8", "replace").decode() for c in r] for r in table])
    return buf.getvalue()


CSV_TEXTS = st.one_of(
    st.lists(st.lists(texts, max_size=4), max_size=5).map(_csv),
    st.lists(st.sampled_from(['"', ",", "\n", "\r", "a", "[", "]", '""', "\u2028", " ", "\ufeff"]), max_size=40)
    .map("".join))


@fuzz(300)
@given(text=CSV_TEXTS)
def test_csv_reader_takes_any_text(scratch, text):
    counted("read_rows(.csv text)")
    path = scratch / "cells.csv"
    path.write_text(text, encoding="utf-8")
    try:
        items = list(read_rows(str(path)))
    except DataError as e:
        assert str(e).startswith(str(path))
        return
    _check_rows(items, str(path))


# ---------------------------------------------------------------------------------------------- row parsers


@fuzz(1500)
@given(row=rows)
def test_row_parsers_raise_only_row_errors(row):
    counted("parse_row/parse_pair/parse_score_row")
    for parse in (parse_row, parse_pair, parse_score_row):
        try:
            parse(row)
        except RowError as e:
            assert str(e) and "\n" not in str(e) and "NoneType" not in str(e)
    if isinstance(row, dict):
        try:
            assert isinstance(row_margin(row), float)
        except RowError as e:
            assert "'margin' must be a finite number" in str(e)


def stage_loaders(tokenizer) -> dict:
    """Each stage's own loader of a file: (number of good rows, rejects as (row, reason))."""
    cfg = PPOConfig()
    cfg.data.max_length, cfg.rollout.max_new_tokens = 128, 32
    rm = RewardModel(None, tokenizer, 128, "test")  # encoding needs the tokenizer only

    def of(loaded):
        return len(loaded.encoded), [(r.row, r.reason, r.preview) for r in loaded.rejects]

    def score(spec):
        results, _, _ = encode_rows(rm, read_input(spec))
        return sum("error" not in r for r in results), [(r["row"], r["error"], "") for r in results if "error" in r]

    return {"sft": lambda spec: of(load_sft_data(spec, tokenizer, 128, True)),
            "pairs": lambda spec: of(load_pair_data(spec, tokenizer, 128)),
            "ppo": lambda spec: of(prompt_loader(cfg)(tokenizer)(spec, "train", None)),
            "score": score}


@fuzz(300)
@given(row=rows)
def test_stage_loaders_reject_any_row_with_a_reason(tokenizer, scratch, row):
    """Parsing and encoding together (chat template, special tokens, lengths) for SFT, pairs, PPO and scoring."""
    counted("row through SFT/pairs/PPO/score loaders")
    path = scratch / "row.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    for name, load in stage_loaders(tokenizer).items():
        n_good, rejects = load(str(path))
        assert n_good + len(rejects) == 1, name
        for n, reason, preview in rejects:
            assert n == 1 and reason and "\n" not in reason and "NoneType" not in reason, (name, reason)
            preview.encode("utf-8")  # a reject can always be written to the rejects file


@fuzz(150)
@given(lines=st.lists(st.one_of(rows.map(_good_line), jsonl_bytes()), min_size=1, max_size=6))
def test_sft_and_pair_loaders_take_any_file_and_write_their_rejects(tokenizer, scratch, lines):
    counted("load_sft_data/load_pair_data(file)")
    path = scratch / "rows.jsonl"
    path.write_bytes(b"\n".join(lines))
    for load in (lambda: load_sft_data(str(path), tokenizer, 128, True),
                 lambda: load_pair_data(str(path), tokenizer, 128)):
        try:
            loaded = load()
        except DataError as e:  # the whole-file errors: nothing in it, or UTF-16
            assert "no rows" in str(e) or "the file is UTF-16" in str(e)
            continue
        write_rejects(scratch / "rejects.jsonl", loaded.rejects)  # never fails on what it was given
        written = (scratch / "rejects.jsonl").read_bytes().split(b"\n")[:-1]  # JSONL: lines end at \n only
        assert [json.loads(line)["row"] for line in written] == [r.row for r in loaded.rejects]
        try:
            check_reject_share(loaded, 0.5, scratch / "rejects.jsonl", "train data")
        except DataError as e:
            assert f"of {loaded.total} rows rejected" in str(e)


# ---------------------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def client(tiny_reward_run):
    from starlette.testclient import TestClient

    from align.serving.score import load_reward_model
    from align.serving.serve import Limits, create_app

    rm = load_reward_model(tiny_reward_run, "cpu")
    return TestClient(create_app(rm, Limits(max_items=4, max_length=128, max_body_bytes=64 * 1024)))


words = st.from_regex(r"[a-j0-9][a-j0-9 +=?.é]{0,29}", fullmatch=True)
good_items = st.one_of(  # valid items, so that many requests reach the model and get scores
    st.fixed_dictionaries({"prompt": words, "response": words}),
    st.fixed_dictionaries({"prompt": words, "chosen": words, "rejected": words},
                          optional={"margin": st.floats(-5, 5)}),
    st.tuples(words, words).map(lambda qa: {"messages": [{"role": "user", "content": qa[0]},
                                                         {"role": "assistant", "content": qa[1]}]}),
)
bodies = st.one_of(
    st.lists(good_items, min_size=1, max_size=4).map(lambda items: json.dumps({"items": items}).encode()),
    st.lists(st.one_of(good_items, rows), min_size=1, max_size=5).map(
        lambda items: json.dumps({"items": items}).encode()),
    st.binary(max_size=300),
    jsonl_bytes(),
    values.map(lambda v: json.dumps(v).encode()),
    st.lists(rows, max_size=6).map(lambda items: json.dumps({"items": items}).encode()),
    st.lists(rows, max_size=3).map(  # raw UTF-8, where a lone surrogate becomes bytes that are not UTF-8
        lambda items: json.dumps({"items": items}, ensure_ascii=False).encode("utf-8", "surrogatepass")),
)


@fuzz(300)
@given(body=bodies, content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_server_answers_any_body_with_json_and_never_500(client, body, content_type):
    counted("POST /score")
    resp = client.post("/score", content=body, headers={"content-type": content_type} if content_type else {})
    counted(f"POST /score -> {resp.status_code}")
    payload = resp.json()
    if resp.status_code == 200:
        items = json.loads(body)["items"]
        assert len(payload["scores"]) == len(items)
    else:
        assert resp.status_code in (400, 413, 422), (resp.status_code, payload)
        assert isinstance(payload["error"], str) and payload["error"] and "Traceback" not in payload["error"]
