"""On-policy pairs: sampling n answers per prompt, and turning judged answers into best-vs-worst pairs."""

import json

import pytest
import torch
from conftest import run_align, write_jsonl

from align.data.pairs import load_pair_data
from align.loop import onpolicy
from align.modeling.generate import Sampling, answer, sample_batch
from align.runtime.errors import ConfigError, OutputError
from align.serving.trained import load_policy

PROMPTS = [[{"role": "user", "content": "What is 2 + 3? Answer with care and show the working."}],
           [{"role": "user", "content": "What is 4 + 4?"}]]


def test_best_vs_worst_by_hand():
    # scores 2.75, 0.5, None (unscored), 3.0 but cut off, "" empty: candidates are the first two only
    cands = [(2.75, "right", True), (0.5, "wrong", True), (None, "x", True), (3.0, "cut", False), (1.0, " ", True)]
    assert onpolicy.best_vs_worst(cands) == ((2.75, "right"), (0.5, "wrong"))
    # equal best scores: the shorter answer is chosen
    assert onpolicy.best_vs_worst([(1.0, "long answer", True), (1.0, "short", True), (0.0, "bad", True)]
                                  ) == ((1.0, "short"), (0.0, "bad"))
    assert onpolicy.best_vs_worst([(1.0, "a", True), (1.0, "b", True)]) is None  # nothing to prefer
    assert onpolicy.best_vs_worst([(1.0, "a", True), (0.0, "b", False)]) is None  # one whole answer


def test_sample_batch_gives_n_answers_in_prompt_order(sft_run):
    model, tok, _ = load_policy(sft_run, "cpu")
    torch.manual_seed(1)
    drawn = sample_batch(model, tok, PROMPTS, Sampling(1.0, 1.0, 3), max_new_tokens=5, batch_size=4)
    assert [len(a) for a in drawn] == [3, 3]
    assert all(0 < len(ids) <= 5 for answers in drawn for _, ids in answers)
    assert len({t for t, _ in drawn[0]}) > 1  # sampled, not three copies of one answer
    torch.manual_seed(1)
    assert sample_batch(model, tok, PROMPTS, Sampling(1.0, 1.0, 3), max_new_tokens=5, batch_size=4) == drawn
    # greedy in a left-padded batch answers each prompt as it would be answered alone
    greedy = sample_batch(model, tok, PROMPTS, Sampling(), max_new_tokens=5)
    assert [a[0][0] for a in greedy] == [answer(model, tok, p, 5) for p in PROMPTS]


def _canned(eos):
    """Stands in for the policy's sampler: fixed answers, with token ids that end at the EOS or not."""
    texts = {"What is 2 + 3?": ["2 + 3 = 5. The answer is 5.", "The answer is 6.", "2 + 3 = 5. The answer is 5."],
             "What is 4 + 4?": ["The answer is 8.", "The answer is 8.", "The answer is 8."],
             "What is 7 + 1?": ["The answer is 8.", "The answer is 9.", "7 + 1 = 8. The answer is 8 and more"]}

    def fake(model, tokenizer, prompts, sampling, max_new_tokens, batch_size, desc=None):
        assert sampling.n == 3
        out = []
        for p in prompts:
            answers = texts[p[-1]["content"]]
            out.append([(t, [5, 6] if t.endswith("more") else [5, eos]) for t in answers])
        return out

    return fake


def test_sample_pairs_writes_best_vs_worst_that_dpo_reads(tmp_path, sft_run, tiny_tok, monkeypatch):
    monkeypatch.setattr(onpolicy, "sample_batch", _canned(tiny_tok.eos_token_id))
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 2 + 3?", "answer": 5}, {"prompt": "What is 4 + 4?", "answer": 8},
        {"prompt": "What is 7 + 1?", "answer": 8}, {"prompt": "What is 7 + 1?", "answer": 8},  # duplicate: once
        {"prompt": "What is 1 + 1?"}])  # no answer: the gold judge cannot score it
    out = tmp_path / "pairs.jsonl"
    summary = onpolicy.sample_pairs(str(sft_run), str(prompts), str(out), sampling=Sampling(1.0, 1.0, 3),
                                    device="cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # 2 + 3: 2.75 (right, formatted, shows work) vs 0.5 (wrong, formatted); 4 + 4: all alike, no pair;
    # 7 + 1: the cut-off answer is no candidate, 2.5 (right + format) vs 0.5
    assert rows == [
        {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5. The answer is 5.", "rejected": "The answer is 6.",
         "chosen_score": 2.75, "rejected_score": 0.5, "answer": 5},
        {"prompt": "What is 7 + 1?", "chosen": "The answer is 8.", "rejected": "The answer is 9.",
         "chosen_score": 2.5, "rejected_score": 0.5, "answer": 8}]
    assert summary["prompts"] == 3 and summary["pairs"] == 2 and summary["samples"] == 9
    assert summary["no_eos_share"] == pytest.approx(1 / 9)
    loaded = load_pair_data(str(out), tiny_tok, 256)
    assert len(loaded.encoded) == 2 and not loaded.rejects
    with pytest.raises(OutputError, match="already exists"):
        onpolicy.sample_pairs(str(sft_run), str(prompts), str(out), device="cpu")


def test_sample_pairs_refuses_prompts_without_answers_for_the_gold_judge(tmp_path, sft_run):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    with pytest.raises(ConfigError, match="integer 'answer'"):
        onpolicy.sample_pairs(str(sft_run), str(prompts), str(tmp_path / "o.jsonl"), device="cpu")


@pytest.mark.parametrize("args,message", [
    (["--n", "1"], "at least 2"), (["--temperature", "0"], "--temperature must be > 0"),
    (["--policy", "nowhere"], "not a finished stage output")])
def test_cli_argument_errors(tmp_path, sft_run, args, message):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 1?", "answer": 2}])
    base = ["--policy", str(sft_run), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")]
    if args[0] == "--policy":
        base[1] = args[1]
        args = []
    r = run_align("pairs", *base, *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_a_reward_model_can_judge_the_answers(tmp_path, sft_run, tiny_reward_run, tiny_tok, monkeypatch):
    from align.serving.score import ScoreRow, load_reward_model

    monkeypatch.setattr(onpolicy, "sample_batch", _canned(tiny_tok.eos_token_id))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 3?"}, {"prompt": "What is 7 + 1?"}])
    out = tmp_path / "pairs.jsonl"
    summary = onpolicy.sample_pairs(str(sft_run), str(prompts), str(out), judge=str(tiny_reward_run),
                                    sampling=Sampling(1.0, 1.0, 3), device="cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["prompts"] == 2 and len(rows) == 2  # no 'answer' needed with a reward model as judge
    rm = load_reward_model(tiny_reward_run, "cpu")
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"]}]
        answers = [[{"role": "assistant", "content": row[k]}] for k in ("chosen", "rejected")]
        chosen, rejected = rm.score(rm.encode(ScoreRow(messages, answers)))
        assert row["chosen_score"] == pytest.approx(chosen, abs=1e-5)
        assert row["rejected_score"] == pytest.approx(rejected, abs=1e-5) and chosen > rejected


def test_each_round_draws_pairs_from_prompts_the_lineage_has_not_used(tmp_path, sft_run, tiny_tok, monkeypatch):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {a} + 1?", "answer": a + 1}
                                                 for a in range(1, 8)])
    home = tmp_path / "runs" / "demo"  # a pipeline directory: its champion is the SFT run
    home.mkdir(parents=True)
    (home / "champion.json").write_text(json.dumps({"version": "v1", "stage": "sft", "path": str(sft_run)}))

    def asked(out):  # the prompts a pair file was drawn from
        return [json.loads(line)["prompt"] for line in out.read_text().splitlines()]

    seen = []

    def fake(model, tokenizer, messages, sampling, *a, **k):  # one right and two wrong answers per prompt
        seen.append([m[-1]["content"] for m in messages])
        right = [f"The answer is {int(m[-1]['content'].split()[2]) + 1}." for m in messages]
        return [[(r, [5, tiny_tok.eos_token_id]), ("The answer is 0.", [5, tiny_tok.eos_token_id])] * 2
                for r in right]

    monkeypatch.setattr(onpolicy, "sample_batch", fake)
    first = onpolicy.sample_pairs(str(home), str(prompts), str(tmp_path / "r1.jsonl"), limit=3, fresh=True,
                                  sampling=Sampling(1.0, 1.0, 3), device="cpu")
    second = onpolicy.sample_pairs(str(home), str(prompts), str(tmp_path / "r2.jsonl"), limit=3, fresh=True,
                                   sampling=Sampling(1.0, 1.0, 3), device="cpu")
    assert seen[0] == [f"What is {a} + 1?" for a in (1, 2, 3)]
    assert seen[1] == [f"What is {a} + 1?" for a in (4, 5, 6)]  # round 2: new questions
    assert (first["skipped_as_used"], second["skipped_as_used"]) == (0, 3)
    assert len((home / "used-prompts.jsonl").read_text().splitlines()) == 6  # what was used is recorded
    assert asked(tmp_path / "r1.jsonl") == seen[0]  # every prompt gave a pair: right vs wrong
    onpolicy.sample_pairs(str(home), str(prompts), str(tmp_path / "r3.jsonl"), fresh=True,
                          sampling=Sampling(1.0, 1.0, 3), device="cpu")
    assert seen[2] == ["What is 7 + 1?"]
    with pytest.raises(ConfigError, match="all 7 prompts .* were used by earlier rounds"):
        onpolicy.sample_pairs(str(home), str(prompts), str(tmp_path / "r4.jsonl"), fresh=True, device="cpu")
    # --skip without a ledger; --fresh needs a pipeline directory
    onpolicy.sample_pairs(str(sft_run), str(prompts), str(tmp_path / "s.jsonl"), skip=5,
                          sampling=Sampling(1.0, 1.0, 3), device="cpu")
    assert seen[3] == ["What is 6 + 1?", "What is 7 + 1?"]
    with pytest.raises(ConfigError, match="--fresh needs --policy to be a pipeline directory"):
        onpolicy.sample_pairs(str(sft_run), str(prompts), str(tmp_path / "f.jsonl"), fresh=True, device="cpu")
