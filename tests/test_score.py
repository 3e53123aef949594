"""`align score`: real files with bad rows, stdin, every output format, and training's own scores."""

import json

import pyarrow.parquet as pq
import pytest
from conftest import run_align, write_jsonl

from align.runtime.errors import RowError
from align.serving.score import load_reward_model, parse_score_row, read_input, score_rows, summarize


def run_cli(*args, stdin=None, cwd=None):
    """`align score ARGS...`, in this process (stdin read through sys.stdin.buffer as the command reads it)."""
    return run_align("score", *args, stdin=stdin, cwd=cwd)


@pytest.fixture(scope="module")
def rm(tiny_reward_run):
    return load_reward_model(tiny_reward_run, "cpu")


@pytest.fixture
def mixed_file(tmp_path, reward_data_files):
    good = [json.loads(line) for line in reward_data_files[0].read_text().splitlines()[:2]]
    return write_jsonl(tmp_path / "in.jsonl", [
        good[0],                                                                   # 1 a training pair
        {"prompt": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is 5."},  # 2 prompt/response
        b"{broken",                                                                # 3 broken JSON
        {"messages": [{"role": "user", "content": "What is 2 + 3?"},
                      {"role": "assistant", "content": "The answer is 5."}]},    # 4 messages
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "5"},              # 5 identical pair
        {"text": "just text"},                                                     # 6 nothing to score
        {"prompt": "What is 2 + 3?", "response": "word " * 600},                   # 7 too long
        good[1],                                                                   # 8 another training pair
    ])


def test_row_forms():
    assert len(parse_score_row({"prompt": "q", "response": "a"}).answers) == 1
    assert parse_score_row({"prompt": "q", "chosen": "a", "rejected": "b"}).is_pair
    row = parse_score_row({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    assert row.answers == [[{"role": "assistant", "content": "a"}]]
    for bad, reason in (({"response": "a"}, "missing key 'prompt'"), ({"text": "t"}, "scores an answer"),
                        ({"foo": 1}, "found: foo")):
        with pytest.raises(RowError, match=reason):
            parse_score_row(bad)


def test_training_rows_get_the_scores_they_had_in_training(rm, tiny_reward_run):
    probes = json.loads((tiny_reward_run / "metrics.json").read_text())["train_probe"]
    rows = read_input(probes[0]["source"])
    by_row = dict(rows)
    results = score_rows(rm, [(p["row"], by_row[p["row"]]) for p in probes], batch_size=3)
    for probe, result in zip(probes, results):
        assert result["chosen_score"] == pytest.approx(probe["chosen_score"], abs=1e-4)
        assert result["rejected_score"] == pytest.approx(probe["rejected_score"], abs=1e-4)


def test_batching_and_order_do_not_change_scores(rm, mixed_file):
    rows = read_input(str(mixed_file))
    one = score_rows(rm, rows, batch_size=1)
    many = score_rows(rm, rows, batch_size=8)
    assert [r["row"] for r in many] == [1, 2, 3, 4, 5, 6, 7, 8]
    for a, b in zip(one, many):
        assert a.keys() == b.keys()
        for k in ("score", "chosen_score", "margin"):
            if k in a:
                assert a[k] == pytest.approx(b[k], abs=1e-5)


def test_cli_scores_a_file_with_bad_rows(tiny_reward_run, mixed_file, tmp_path):
    out = run_cli("--model", str(tiny_reward_run), "--input", str(mixed_file), "--output", str(tmp_path / "o.jsonl"))
    assert out.returncode == 1, out.stderr  # some rows failed
    results = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["row"] for r in results] == [1, 2, 3, 4, 5, 6, 7, 8]
    errors = {r["row"]: r["error"] for r in results if "error" in r}
    assert set(errors) == {3, 5, 6, 7}
    assert "broken JSON" in errors[3] and "identical" in errors[5] and "scores an answer" in errors[6]
    assert "over the max length 512" in errors[7]
    assert results[0]["correct"] is True and results[7]["margin"] > 0
    assert isinstance(results[1]["score"], float) and isinstance(results[3]["score"], float)
    assert "scored 4 of 8 rows; 2 pairs: accuracy 1.000" in out.stderr
    assert ".jsonl:3: broken JSON" in out.stderr and "Traceback" not in out.stderr  # file:row


def test_cli_reads_stdin_and_writes_stdout(tiny_reward_run, mixed_file):
    out = run_cli("--model", str(tiny_reward_run), "--input", "-", stdin=mixed_file.read_text(errors="replace"))
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 8 and out.returncode == 1
    clean = run_cli("--model", str(tiny_reward_run), "--input", "-",
                    stdin=json.dumps({"prompt": "What is 2 + 3?", "response": "The answer is 5."}) + "\n")
    assert clean.returncode == 0 and "score" in json.loads(clean.stdout)


def test_cli_csv_and_parquet_in_and_out(rm, tiny_reward_run, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text('prompt,response\n"What is 2 + 3?","The answer is 5."\n"What is 4 + 4?","Eight, I guess."\n')
    out = run_cli("--model", str(tiny_reward_run), "--input", str(src), "--output", str(tmp_path / "o.csv"))
    assert out.returncode == 0, out.stderr
    header, *lines = (tmp_path / "o.csv").read_text().splitlines()
    assert header.startswith("row,score") and len(lines) == 2
    pq_in = tmp_path / "in.parquet"
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist([{"prompt": "What is 2 + 3?", "chosen": "The answer is 5.",
                                          "rejected": "Maybe 7."}]), pq_in)
    out = run_cli("--model", str(tiny_reward_run), "--input", str(pq_in), "--output", str(tmp_path / "o.parquet"))
    assert out.returncode == 0, out.stderr
    table = pq.read_table(tmp_path / "o.parquet").to_pylist()
    expected = score_rows(rm, [(1, {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "Maybe 7."})])
    assert table[0]["margin"] == pytest.approx(expected[0]["margin"], abs=1e-5)


def test_cli_max_length_and_bad_arguments(tiny_reward_run, mixed_file, tmp_path):
    out = run_cli("--model", str(tiny_reward_run), "--input", str(mixed_file), "--max-length", "40")
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 1 and all("over the max length 40" in r["error"] for r in results
                                       if "error" in r and r["row"] in (1, 2, 4, 8))
    missing = run_cli("--model", str(tmp_path), "--input", str(mixed_file))
    assert missing.returncode == 2 and "neither a reward run" in missing.stderr
    no_input = run_cli("--model", str(tiny_reward_run), "--input", str(tmp_path / "nope.jsonl"))
    assert no_input.returncode == 2 and "nope.jsonl" in no_input.stderr and "Traceback" not in no_input.stderr
    bad_out = run_cli("--model", str(tiny_reward_run), "--input", str(mixed_file), "--output", str(tmp_path / "o.xls"))
    assert bad_out.returncode == 2 and ".xls" in bad_out.stderr


def test_summary_counts():
    s = summarize([{"row": 1, "margin": 1.0, "correct": True}, {"row": 2, "margin": -3.0, "correct": False},
                   {"row": 3, "score": 0.1}, {"row": 4, "error": "x"}])
    assert (s.rows, s.failed, s.pairs, s.accuracy, s.mean_margin) == (4, 1, 2, 0.5, -1.0)
