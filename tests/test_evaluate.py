"""Evaluation metrics against numbers worked out by hand."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import write_jsonl

from align.evaluation.measures import perplexity, text_overlap
from align.evaluation.winrate import judged, length_controlled_win_rate, outcome, win_rate


def test_win_rate_counts_a_tie_as_half():
    assert win_rate([1, 0.5, 0, 1]) == 0.625
    with pytest.raises(ValueError):
        win_rate([])


def test_win_statistics_by_hand():
    from align.evaluation.winrate import win_statistics

    # 3 wins, 0 losses, 1 tie: outcomes 1, 1, 1, 0.5 → mean 0.875; sample variance (3 × 0.125² + 0.375²) / 3
    # = 0.0625, SE = sqrt(0.0625 / 4) = 0.125, half-width 1.96 × 0.125 = 0.245 → [0.63, 1.0] (capped at 1);
    # sign test over the 3 decided: P(0 losses) = 1/8, two-sided 0.25
    s = win_statistics([1, 1, 0, 1])
    assert (s["wins"], s["ties"], s["losses"]) == (3, 1, 0)
    assert s["ci95"] == pytest.approx([0.63, 1.0]) and s["sign_test_p"] == pytest.approx(0.25)
    # 8 wins, 2 losses: P(≤ 2 of 10) = (1 + 10 + 45) / 1024 = 56/1024, two-sided 0.109375
    assert win_statistics([1] * 8 + [-1] * 2)["sign_test_p"] == pytest.approx(0.109375)
    # an even split is no evidence at all; only ties: nothing decided
    assert win_statistics([1, -1, 1, -1])["sign_test_p"] == 1.0
    assert win_statistics([0, 0])["sign_test_p"] == 1.0 and win_statistics([0, 0])["ci95"] == [0.5, 0.5]
    assert win_statistics([])["ci95"] is None


def test_one_judges_part_of_a_report_by_hand():
    assert [outcome(v) for v in (2, 1, 0, -1, -3)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    # verdicts win, tie, loss, win: outcomes 1, 0.5, 0, 1 → 2.5 / 4 = 0.625; equal lengths → the same rate
    part = judged("rm", [1, 0, -1, 1], ["a b"] * 4, ["c d"] * 4)
    assert part["rm_win_rate"] == 0.625 and part["rm_n"] == 4
    assert (part["rm_wins"], part["rm_ties"], part["rm_losses"]) == (2, 1, 1)
    assert part["rm_lc_win_rate"] == pytest.approx(0.625, abs=1e-6)
    # 2 wins of 3 decided: P(≤ 1 of 3) = 4/8, two-sided 1.0
    assert part["rm_sign_test_p"] == 1.0
    empty = judged("gold", [], [], [])
    assert empty["gold_win_rate"] is None and empty["gold_n"] == 0 and empty["gold_ci95"] is None


def test_length_controlled_win_rate_equals_the_plain_rate_at_equal_lengths():
    r = length_controlled_win_rate([1, 1, 1, 0], [20, 20, 20, 20], [20, 20, 20, 20])
    # intercept-only logistic fit: σ(a) = mean outcome = 0.75, slope 0
    assert r["length_controlled_win_rate"] == pytest.approx(0.75, abs=1e-6)
    assert r["length_slope"] == pytest.approx(0.0, abs=1e-9)


def test_length_controlled_win_rate_removes_a_win_by_length():
    # 8 answers longer than the baseline's win 6 (0.75); 4 shorter ones win 1 (0.25). Plain rate 7/12 = 0.583.
    # Two groups at d = ±t fit exactly: σ(a + bt) = 0.75, σ(a − bt) = 0.25 → a = 0: at equal length, 0.5.
    outcomes = [1, 1, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0]
    policy = [30] * 8 + [10] * 4
    baseline = [10] * 8 + [30] * 4
    r = length_controlled_win_rate(outcomes, policy, baseline)
    assert r["win_rate"] == pytest.approx(7 / 12)
    assert r["length_controlled_win_rate"] == pytest.approx(0.5, abs=1e-3)
    assert r["length_slope"] > 0  # longer answers were preferred


def test_text_overlap():
    same = text_overlap(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0) and same["rouge_l"] == pytest.approx(1.0)
    # ROUGE-L of "the cat sat" vs "the cat ran": LCS "the cat" = 2 of 3 words each way → F1 = 2/3
    r = text_overlap(["the cat sat"], ["the cat ran"])
    assert r["rouge_l"] == pytest.approx(2 / 3) and 0 <= r["bleu"] < 100


def test_align_eval_reports_a_policy_against_its_baseline(tmp_path, sft_run):
    import json

    from conftest import run_align, write_jsonl

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {a} + 2?", "answer": a + 2} for a in range(3)])
    sft = write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"What is {a} + 1?", "completion": f"It is {a + 1}."}
                                             for a in range(3)])
    out = tmp_path / "report.json"
    proc = run_align("eval", "--policy", sft_run, "--prompts", prompts, "--sft-data", sft, "--max-new-tokens", "4",
                     "--kl-limit", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["baseline"] == "base model (adapters off)" and report["n_prompts"] == 3
    assert 0 <= report["gold_win_rate"] <= 1 and 0 <= report["gold_lc_win_rate"] <= 1
    assert report["perplexity_policy"] > 1 and report["perplexity_baseline"] > 1
    assert report["perplexity_policy"] != report["perplexity_baseline"]  # the adapter changes the model
    assert {"bleu", "rouge_l"} <= set(report["overlap_policy"]) and "kl_estimate" in report
    assert report["kl_prompts"] == 2  # --kl-limit: the KL from the first 2 of the 3 prompts
    # against itself as the baseline: every answer ties and the KL is zero
    same = run_align("eval", "--policy", sft_run, "--baseline", sft_run, "--prompts", prompts, "--sft-data", "",
                     "--max-new-tokens", "4")
    assert same.returncode == 0, same.stderr[-2000:]
    mirror = json.loads(same.stdout)
    assert mirror["gold_win_rate"] == 0.5 and mirror["kl_estimate"] == 0.0 and mirror["kl_prompts"] == 3


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token distribution is fixed: uniform over V tokens, or a given token twice as likely."""

    def __init__(self, vocab: int, favourite: int | None = None):
        super().__init__()
        self.vocab, self.favourite = vocab, favourite
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so the evaluation can find the device
        self.config = SimpleNamespace()
        self.head = torch.nn.Linear(1, vocab, bias=False)  # only its shape is read

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
        width = logits_to_keep or input_ids.shape[1]
        logits = torch.zeros(input_ids.shape[0], width, self.vocab)
        if self.favourite is not None:
            logits[..., self.favourite] = math.log(2.0)
        return SimpleNamespace(logits=logits)


def test_perplexity_by_hand(tmp_path, tokenizer):
    rows = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "What is 2 + 3?", "completion": "5"},
                                                {"prompt": "Name a colour.", "completion": "Blue, like the sky."}])
    vocab = len(tokenizer)
    # uniform over V tokens: every answer token has probability 1/V, so perplexity = V exactly
    assert perplexity(FixedLogits(vocab), tokenizer, str(rows), 128, limit=2) == pytest.approx(vocab, rel=1e-4)
    # one token twice as likely as the rest: every other token has p = 1 / (V + 1), so perplexity = V + 1 when no
    # answer token is the favourite (token 0 never appears in an answer)
    assert perplexity(FixedLogits(vocab, favourite=0), tokenizer, str(rows), 128, limit=2) == pytest.approx(
        vocab + 1, rel=1e-4)


def test_the_gold_part_counts_right_final_answers_apart_from_format():
    from align.evaluation.judges import gold_part

    prompts = [([{"role": "user", "content": f"What is {a} + 2?"}], a + 2) for a in (1, 2, 3, 4)]
    # policy: right and well-formed, right but unformatted ("The answer is 4" with no period still parses), wrong,
    # right; baseline: right on prompt 2 only
    policy = [("1 + 2 = 3. The answer is 3.", []), ("The answer is 4", []), ("The answer is 9.", []),
              ("4 + 2 = 6. The answer is 6.", [])]
    baseline = [("The answer is 7.", []), ("The answer is 4.", []), ("The answer is 1.", []), ("Six.", [])]
    part = gold_part(prompts, policy, baseline)
    assert part["gold_right_policy"] == 0.75 and part["gold_right_reference"] == 0.25
    # the scores decide the wins: prompt 2's right but unformatted answer loses to a right, formatted one (2 < 2.5);
    # prompt 3 is wrong against wrong, both formatted: a tie
    assert (part["gold_wins"], part["gold_ties"], part["gold_losses"]) == (2, 1, 1)


def test_the_lineage_root_is_found_through_policy_parents(tmp_path):
    from align.evaluation.evaluate import lineage_sft

    def stage(name, kind, parent):
        d = tmp_path / name
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"stage": kind, "parent": parent and str(tmp_path / parent)}))
        return str(d)

    sft = stage("sft", "sft", None)
    stage("dpo1", "dpo", "sft")  # round 1, held to SFT
    dpo2 = stage("dpo2", "dpo", "dpo1")  # round 2, held to the round-1 champion (reference: champion)
    assert lineage_sft(sft) == sft and lineage_sft(dpo2) == sft
    assert lineage_sft(None) is None and lineage_sft(str(tmp_path / "nowhere")) is None


def test_reward_model_part_scores_the_baseline_once_and_only_answers_that_differ():
    from align.evaluation.judges import reward_model_part

    class Scorer:  # a reward model whose score is the answer's length; None (too long) for "xxxxxxxx"
        def __init__(self):
            self.scored = []

        def score_answers(self, prompts, answers):
            self.scored += answers
            return [None if a == "x" * 8 else float(len(a)) for a in answers]

    scorer = Scorer()
    shared = {"reward_model": scorer}
    messages = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    baseline = [("same", []), ("short", []), ("longer", []), ("kept", [])]
    first = reward_model_part("rm", messages, [("same", []), ("much longer", []), ("s", []), ("x" * 8, [])],
                              baseline, shared)
    # tie (same text, same score), win (11 > 5), loss (1 < 6); the unscorable answer leaves its prompt out
    assert (first["rm_wins"], first["rm_ties"], first["rm_losses"], first["rm_n"]) == (1, 1, 1, 3)
    assert first["rm_score_policy"] == pytest.approx((4 + 11 + 1) / 3)
    assert scorer.scored == ["same", "short", "longer", "kept", "much longer", "s", "x" * 8]
    second = reward_model_part("rm", messages, baseline, baseline, shared)  # a policy answering as the baseline
    assert second["rm_ties"] == 4 and len(scorer.scored) == 7  # nothing scored again
