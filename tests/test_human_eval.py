"""People's judgements as evaluation: Cohen's kappa and the human win-rate by hand, the judges' agreement with
people, `align eval --human`, and `promotion.judge: human` making a version wait for people, then decide."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import EVAL_NUMBERS, pair_rows, run_align, write_jsonl

from align.evaluation.human import agreement, cohen_kappa, human_report
from align.evaluation.promotion import PromotionRule, check, decide
from align.runtime.errors import DataError


def test_cohen_kappa_by_hand():
    first = ["a", "a", "b", "b", "tie", "a"]
    second = ["a", "b", "b", "b", "tie", "a"]
    # observed 5/6; chance = (3·2 [a] + 2·3 [b] + 1·1 [tie]) / 36 = 13/36; κ = (30/36 − 13/36) / (23/36) = 17/23
    assert cohen_kappa(first, second) == pytest.approx(17 / 23)
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)  # chance 1/2, observed 0
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # one label only: chance agreement is 1
    with pytest.raises(ValueError):
        cohen_kappa(["a"], ["a", "b"])


def row(item, annotator, label, cand_side="a", **extra):
    sides = {"a": "P", "b": "Q"} if cand_side == "a" else {"a": "Q", "b": "P"}
    return {"item": item, "annotator": annotator, "label": label, "prompt": f"q{item}", "answer_a": f"A{item}",
            "answer_b": f"B{item}", "written_by": sides, "candidate": "P", "baseline": "Q", **extra}


def test_human_win_rate_counts_each_item_once_by_majority():
    rows = [row(1, "ana", "a"), row(1, "bo", "a"),              # item 1: candidate (A) wins
            row(2, "ana", "a", "b"),                            # item 2: candidate is B, A preferred: a loss
            row(3, "ana", "b", "b"), row(3, "bo", "tie", "b"),  # item 3: B by majority (+... 1 vs 0): a win
            row(4, "ana", "a"), row(4, "bo", "b"),              # item 4: an even split: a tie
            row(5, "ana", "both_bad")]                          # item 5: neither: a tie
    report = human_report(rows)
    assert (report["human_wins"], report["human_ties"], report["human_losses"]) == (2, 2, 1)
    assert report["human_n"] == 5 and report["human_win_rate"] == pytest.approx((2 + 0.5 * 2) / 5)
    assert report["human_sign_test_p"] == pytest.approx(1.0)  # 2 vs 1 decided: 2·P(X ≤ 1 | 3, ½) = 2·4/8, capped
    assert report["candidate"] == "P" and report["human_judgements"] == 8
    pairs = report["human_agreement"]["pairs"]
    # ana / bo share items 1, 3, 4: labels (a,b,a) vs (a,tie,b): observed 1/3; chance: ana a2 b1, bo a1 tie1 b1 →
    # (2·1 + 1·1) / 9 = 1/3, so κ = 0
    assert pairs == [{"annotators": ["ana", "bo"], "items": 3, "kappa": pytest.approx(0.0), "raw": 1 / 3}]


def test_judges_agree_with_people_over_the_items_people_decided():
    rows = [row(1, "ana", "a"), row(2, "ana", "b"), row(3, "ana", "tie"), row(4, "ana", "a")]
    report = human_report(rows, rm_prefers_a=lambda r: {1: 1, 2: 1, 3: -1, 4: None}[r["item"]],
                          gold_prefers_a=lambda r: {1: 1, 2: -1, 3: 1, 4: 1}[r["item"]])
    assert report["rm_agrees_with_people"] == pytest.approx(1 / 2) and report["rm_agreement_n"] == 2  # 4: unjudged
    assert report["gold_agrees_with_people"] == 1.0 and report["gold_agreement_n"] == 3  # 3: a tie, left out
    with pytest.raises(DataError, match="more than one pair"):
        human_report([row(1, "ana", "a"), {**row(2, "ana", "a"), "candidate": "R"}])


def test_agreement_lists_every_pair_of_annotators():
    rows = [row(1, "ana", "a"), row(1, "bo", "a"), row(1, "cy", "b"), row(2, "ana", "b"), row(2, "cy", "b")]
    pairs = {tuple(p["annotators"]): p for p in agreement(rows)["pairs"]}
    assert set(pairs) == {("ana", "bo"), ("ana", "cy"), ("bo", "cy")}
    assert pairs[("ana", "cy")]["items"] == 2 and pairs[("ana", "cy")]["raw"] == 0.5


def test_align_eval_human_reports_people_and_the_reward_models_agreement(tmp_path, tiny_reward_run):
    good = [r for r in pair_rows(EVAL_NUMBERS[:6])]
    rows = []
    for i, pair in enumerate(good):
        cand_side = "a" if i % 2 else "b"
        a, b = (pair["chosen"], pair["rejected"]) if cand_side == "a" else (pair["rejected"], pair["chosen"])
        rows.append({**row(i, "ana", cand_side, cand_side), "prompt": pair["prompt"], "answer_a": a, "answer_b": b,
                     "gold": int(pair["chosen"].split()[-1].rstrip("."))})
    path = write_jsonl(tmp_path / "human.jsonl", rows)
    ran = run_align("eval", "--human", path, "--reward-model", tiny_reward_run, "--device", "cpu")
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["human_wins"] == 6 and report["human_win_rate"] == 1.0
    assert report["human_sign_test_p"] == pytest.approx(2 / 64)
    assert report["gold_agrees_with_people"] == 1.0 and report["gold_agreement_n"] == 6  # people chose the right
    assert report["rm_agreement_n"] == 6 and 0 <= report["rm_agrees_with_people"] <= 1
    assert "human win-rate of P against Q: 100.0% (95% 100.0%–100.0%; 6/0/0, sign test p = 0.031)" in ran.stderr
    assert "the gold judge prefers the answer people preferred on 100% of 6 items" in ran.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"item": "x", "label": "a"}])
    ran = run_align("eval", "--human", bad)
    assert ran.returncode == 2 and f"{bad}:2" in ran.stderr and "Traceback" not in ran.stderr
    ran = run_align("eval", "--human", path, "--policy", tmp_path)
    assert ran.returncode == 2 and "--policy DIR" in ran.stderr


def test_a_human_judged_candidate_waits_for_enough_items_then_decides():
    rule = PromotionRule(judge="human", min_human=6, max_kl=None)
    waiting = check({"human_n": 4, "human_win_rate": 1.0, "human_sign_test_p": 0.125}, rule)
    assert not waiting["passed"] and waiting["awaiting"] and "4 of 6 items judged" in waiting["why_not"][0]
    decision = decide({"dpo": {"human_n": 4}, "ppo": {"human_n": 9, "human_win_rate": 0.9,
                                                     "human_sign_test_p": 0.01}}, rule, "SFT")
    assert decision["promote"] is None and decision["awaiting"] == ["dpo"] and "awaiting" in decision["reason"]
    done = decide({"dpo": {"human_n": 6, "human_win_rate": 1.0, "human_sign_test_p": 2 / 64}}, rule, "SFT")
    assert done["promote"] == "dpo" and "human_win_rate 1.000" in done["reason"]


@pytest.fixture(scope="module")
def tiny_pipeline_overrides(tmp_path_factory, tiny_model_dir):
    from test_pipeline import loop_files, tiny_overrides

    tmp = tmp_path_factory.mktemp("human-loop")
    return tmp, [*tiny_overrides(tmp, tiny_model_dir, *loop_files(tmp)), "ppo.enabled=false",
                 "grpo.enabled=false", "promotion.judge=human", "promotion.min_human=6", "promotion.max_kl=",
                 "merge.enabled=false"]


def test_the_loop_waits_for_people_then_decides(tiny_pipeline_overrides, monkeypatch, capsys):
    from align.loop import steps
    from align.loop.pipeline import load_pipeline, run
    from align.loop.versions import Home

    tmp, overrides = tiny_pipeline_overrides
    v1 = run(load_pipeline(None, overrides))
    decision = v1["decision"]
    assert decision["awaiting"] == ["dpo"] and "awaiting human evaluation" in decision["reason"]
    command = decision["label"]["dpo"]
    assert command.startswith(f"align label --policy {v1['stages']['dpo']['path']} --against ")
    out = Path(command.split("--out ")[1])
    assert out == tmp / "runs" / "t" / "v1" / "human" / "dpo.jsonl"
    assert main_runs(tmp, capsys).count("awaiting human evaluation (dpo)") == 1

    # again before anyone judged: still waiting, and the automatic evaluation is not run again
    monkeypatch.setattr(steps, "evaluate_policies", lambda *a, **k: pytest.fail("evaluated again"))
    again = run(load_pipeline(None, overrides))
    assert not again.get("nothing_to_do") and again["decision"]["awaiting"] == ["dpo"]

    # people judge 6 blind items, the candidate winning each: then the loop decides (p = 2/64 < 0.05)
    baseline = v1["evaluation"]["baseline"]
    rows = [{**row(i, "ana", "a" if i % 2 else "b", "a" if i % 2 else "b"), "candidate": v1["stages"]["dpo"]["path"],
             "baseline": baseline, "written_by": {"a": v1["stages"]["dpo"]["path"], "b": baseline} if i % 2 else
             {"a": baseline, "b": v1["stages"]["dpo"]["path"]}} for i in range(6)]
    rows.append({**rows[0], "candidate": "some/other/policy"})  # another comparison in the file: not counted
    out.parent.mkdir(parents=True)
    write_jsonl(out, rows)
    decided = run(load_pipeline(None, overrides))
    assert not decided["decision"].get("awaiting")
    assert decided["decision"]["promote"] == "dpo" and "human_win_rate 1.000" in decided["decision"]["reason"]
    assert decided["evaluation"]["policies"]["dpo"]["human_n"] == 6
    assert Home(tmp / "runs" / "t").champion()["stage"] == "dpo"
    assert run(load_pipeline(None, overrides)).get("nothing_to_do")  # decided: nothing waits any more


def main_runs(tmp, capsys) -> str:
    from align.cli.main import main

    capsys.readouterr()
    assert main(["runs", "--runs-dir", str(tmp / "runs"), "--name", "t"]) == 0
    return capsys.readouterr().out
