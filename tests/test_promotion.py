"""The promotion rule, both ways, on hand-made evaluation reports."""

import pytest

from align.evaluation.promotion import PromotionRule, check, decide, judged_rate
from align.loop.steps import promote
from align.loop.versions import Home


def report(gold=None, rm=None, kl=0.1, gold_lc=None, rm_lc=None, p=1e-4):
    """A report whose wins are clear (sign test p = 1e-4) unless `p` says otherwise."""
    return {"gold_win_rate": gold, "rm_win_rate": rm, "kl_to_reference": kl, "gold_lc_win_rate": gold_lc,
            "rm_lc_win_rate": rm_lc, "gold_sign_test_p": p, "rm_sign_test_p": p}


def test_a_win_rate_above_half_plus_margin_within_the_kl_budget_is_promoted():
    rule = PromotionRule(margin=0.02, max_kl=2.0)
    d = decide({"dpo": report(gold=0.55, kl=0.5)}, rule, "SFT (v1)")
    assert d["promote"] == "dpo"
    assert "gold_win_rate 0.550 > 0.5 + margin 0.02, sign test p = 0.0001 <= 0.05" in d["reason"]
    assert "0.500" in d["reason"]


def test_a_win_rate_within_the_margin_is_not_promoted():
    # 0.515 is above 50% but not above 0.5 + 0.02
    d = decide({"dpo": report(gold=0.515)}, PromotionRule(margin=0.02), "the champion (v1 dpo)")
    assert d["promote"] is None
    assert d["reason"] == ("nothing beats the champion (v1 dpo): dpo: gold_win_rate 0.515 is not above "
                           "0.5 + margin 0.02")


def test_a_win_that_could_be_chance_is_not_promoted():
    # the demo's DPO: 56.2% on 32 prompts, 5 wins / 26 ties / 1 loss, p = 0.22
    noisy = {**report(gold=0.562), "gold_sign_test_p": 0.22}
    assert decide({"dpo": noisy}, PromotionRule(max_p=None), "SFT (v1)")["promote"] == "dpo"  # no test asked for
    d = decide({"dpo": noisy}, PromotionRule(), "SFT (v1)")  # the default: p <= 0.05
    assert d["promote"] is None and "its sign test p = 0.22 is over max_p 0.05: the win could be chance" in d["reason"]
    clear = {**report(gold=0.565), "gold_sign_test_p": 1.3e-5}
    assert decide({"dpo": clear}, PromotionRule(max_p=0.05), "SFT (v1)")["promote"] == "dpo"
    # the reward model's test when it is the judge; no p at all fails the test
    rm = {**report(rm=0.6), "rm_sign_test_p": 0.01, "gold_sign_test_p": 0.9}
    assert decide({"ppo": rm}, PromotionRule(max_p=0.05), "SFT (v1)")["promote"] == "ppo"
    assert decide({"ppo": report(gold=0.7, p=None)}, PromotionRule(max_p=0.05), "SFT (v1)")["promote"] is None


def test_several_candidates_share_the_significance_level():
    # p = 0.03 passes alone, but with three candidates each must reach 0.05 / 3 = 0.0167 (Bonferroni)
    alone = decide({"grpo": report(gold=0.7, p=0.03)}, PromotionRule(), "SFT")
    assert alone["promote"] == "grpo"
    three = decide({"dpo": report(gold=0.6, p=0.5), "ppo": report(gold=0.55, p=0.4),
                    "grpo": report(gold=0.7, p=0.03)}, PromotionRule(), "SFT")
    assert three["promote"] is None
    assert "grpo: its sign test p = 0.03 is over max_p 0.05 / 3 candidates" in three["reason"]
    three = decide({"dpo": report(gold=0.6, p=0.5), "ppo": report(gold=0.55, p=0.4),
                    "grpo": report(gold=0.7, p=0.01)}, PromotionRule(), "SFT")
    assert three["promote"] == "grpo" and "sign test p = 0.01 <= 0.0167" in three["reason"]


def test_a_winner_over_the_kl_budget_is_not_promoted():
    d = decide({"ppo": report(gold=0.9, kl=3.5)}, PromotionRule(max_kl=2.0), "SFT")
    assert d["promote"] is None
    assert d["checks"]["ppo"]["why_not"] == ["KL to its reference 3.500 is over the budget 2"]
    assert decide({"ppo": report(gold=0.9, kl=3.5)}, PromotionRule(max_kl=None), "SFT")["promote"] == "ppo"


def test_the_best_passing_candidate_wins():
    d = decide({"dpo": report(gold=0.6), "ppo": report(gold=0.7, kl=5.0), "x": report(gold=0.65)},
               PromotionRule(max_kl=2.0), "SFT")
    assert d["promote"] == "x"  # ppo has the highest rate but is over the KL budget
    assert [n for n, c in d["checks"].items() if c["passed"]] == ["dpo", "x"]


def test_auto_judge_falls_back_to_the_reward_model_without_gold_answers():
    rule = PromotionRule()
    assert judged_rate(report(gold=0.4, rm=0.9), rule) == ("gold_win_rate", 0.4)
    assert judged_rate(report(rm=0.9), rule) == ("rm_win_rate", 0.9)
    assert judged_rate(report(gold=0.4, rm=0.9), PromotionRule(judge="reward_model")) == ("rm_win_rate", 0.9)
    assert judged_rate(report(gold=0.4, gold_lc=0.7), PromotionRule(metric="lc_win_rate")) == ("gold_lc_win_rate", 0.7)
    assert check(report(), PromotionRule(judge="gold"))["why_not"] == [
        "no gold_win_rate in its evaluation (no gold answers)"]


def test_no_candidates_means_no_promotion():
    assert decide({}, PromotionRule(), "SFT")["reason"] == "no new policy was trained in this version"


@pytest.mark.parametrize("gold,expected", [(0.7, "dpo"), (0.45, "sft")])
def test_the_first_version_promotes_the_winner_or_makes_sft_the_first_champion(tmp_path, gold, expected):
    home = Home(tmp_path / "p")
    record = {"version": "v1", "stages": {"sft": {"path": "runs/p/v1/sft", "key": "k-sft"},
                                          "dpo": {"path": "runs/p/v1/dpo", "key": "k-dpo"}}}
    decision = promote(home, record, {"dpo": report(gold=gold)}, PromotionRule(), None, "SFT (v1)")
    assert decision["changed"] and home.champion()["stage"] == expected
    assert home.champion()["path"] == f"runs/p/v1/{expected}"
    if expected == "sft":
        assert decision["reason"].endswith("SFT becomes the first champion")


def test_a_losing_round_keeps_the_champion(tmp_path):
    home = Home(tmp_path / "p")
    champion = {"version": "v1", "stage": "dpo", "path": "runs/p/v1/dpo"}
    home.set_champion(champion)
    record = {"version": "v2", "stages": {"sft": {"path": "runs/p/v1/sft", "key": "a"},
                                          "dpo": {"path": "runs/p/v2/dpo", "key": "b"}}}
    decision = promote(home, record, {"dpo": report(gold=0.5)}, PromotionRule(), champion, "the champion (v1 dpo)")
    assert not decision["changed"] and decision["champion"] == champion
    assert home.champion() == champion


def test_a_lineage_over_its_kl_budget_from_sft_is_not_promoted():
    # with reference: champion each round's KL is about one round; the lineage's distance from SFT adds up
    far = {**report(gold=0.8, kl=0.5), "kl_to_sft": 3.2}
    assert decide({"dpo": far}, PromotionRule(), "SFT")["promote"] == "dpo"  # no lineage budget by default
    d = decide({"dpo": far}, PromotionRule(max_kl_from_sft=3.0), "SFT")
    assert d["promote"] is None and "KL to SFT 3.200 is over the lineage's budget 3" in d["reason"]
