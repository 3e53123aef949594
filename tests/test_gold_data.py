"""The shipped gold judge (scores by hand) and the shipped preference data (consistent with the judge)."""

import importlib.util
import json

import pytest
from conftest import ROOT

from align.data.pairs import parse_pair


def _judge():
    spec = importlib.util.spec_from_file_location("reward_data_judge", ROOT / "reward_data" / "judge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


judge = _judge()
REF = "Leo has 4 boxes with 6 pencils each, so 4 × 6 = 24. The answer is 24."


@pytest.mark.parametrize("response, expected", [
    (REF, 2.75),  # correct 2.0 + format 0.5 + right working 0.25; 18 words, no length cost
    ("Leo has 4 boxes with 6 pencils each, so 4 × 6 = 25. The answer is 25.", 0.5),  # format only
    ("Leo has 4 boxes, so 4 × 6 = 24.", 0.25),  # working only: no final answer sentence
    ("24.", 0.0),
    ("", 0.0),
    # 22 + 18 = 40 words: 10 over 30 -> -0.25 ; correct, formatted, working -> 2.75 - 0.25 = 2.5
    ("word " * 22 + REF, 2.5),
    # 113 + 18 = 131 words: the length cost is capped at -1.0 -> 2.75 - 1.0 = 1.75
    ("word " * 113 + REF, 1.75),
])
def test_gold_score_by_hand(response, expected):
    assert judge.gold_score("q", response, 24) == pytest.approx(expected)


def test_judge_pair_orders_both_ways():
    assert judge.judge_pair("q", REF, "24.", 24) == 1
    assert judge.judge_pair("q", "24.", REF, 24) == -1
    assert judge.judge_pair("q", REF, REF, 24) == 0


def _rows(name):
    return [json.loads(line) for line in (ROOT / "reward_data" / "prefs" / name).read_text().splitlines()]


@pytest.mark.parametrize("name, minimum", [("train.jsonl", 1000), ("eval.jsonl", 200)])
def test_shipped_pairs_agree_with_the_judge_and_parse(name, minimum):
    rows = _rows(name)
    assert len(rows) >= minimum
    for row in rows:
        assert judge.judge_pair(row["prompt"], row["chosen"], row["rejected"], row["answer"]) == 1
        prompt, chosen, rejected = parse_pair(row)
        assert prompt[-1]["content"] == row["prompt"] and chosen[0]["content"] == row["chosen"]


def test_splits_share_no_question():
    sft = {json.loads(line)["messages"][0]["content"] for split in ("train", "eval")
           for line in (ROOT / f"reward_data/sft/{split}.jsonl").read_text().splitlines()}
    train, held_out, prompts = ({r["prompt"] for r in _rows(n)} for n in ("train.jsonl", "eval.jsonl", "prompts.jsonl"))
    assert len(prompts) >= 200
    assert not (held_out & (train | sft)) and not (prompts & (train | held_out | sft))


def test_generator_reproduces_the_shipped_files(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "reward_data" / "generate.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=300)
    for name in ("sft/train.jsonl", "sft/eval.jsonl", "prefs/train.jsonl", "prefs/eval.jsonl", "prefs/prompts.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "reward_data" / name).read_bytes(), name
