"""Loss and reward-reading math against numbers computed by hand (arithmetic in the comments)."""

import math

import pytest
import torch

from align.rl.losses import dpo_loss, expected_calibration_error, last_token_index, pairwise_reward_loss, sequence_logps


def test_pairwise_loss_by_hand():
    # gaps = [2 - 0, 0 - 1] = [2, -1]
    # -log σ(2) = log(1 + e^-2) = log(1.135335) = 0.126928
    # -log σ(-1) = log(1 + e^1) = log(3.718282) = 1.313262
    # mean = (0.126928 + 1.313262) / 2 = 0.720095
    loss, m = pairwise_reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(0.720095, abs=1e-6)
    assert m["accuracy"].item() == 0.5  # only the first pair is ordered right
    assert m["margin"].item() == pytest.approx(0.5)  # (2 + -1) / 2


def test_pairwise_loss_with_margin_by_hand():
    # gaps - margin = [2 - 1, -1 - 1] = [1, -2]
    # log(1 + e^-1) = log(1.367879) = 0.313262 ; log(1 + e^2) = log(8.389056) = 2.126928 ; mean = 1.220095
    loss, _ = pairwise_reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), margin=1.0)
    assert loss.item() == pytest.approx(1.220095, abs=1e-6)
    per_pair, _ = pairwise_reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]),
                                       margin=torch.tensor([1.0, 1.0]))
    assert per_pair.item() == pytest.approx(loss.item())


def test_equal_scores_cost_log_two_and_gradients_push_apart():
    chosen = torch.tensor([0.5], requires_grad=True)
    rejected = torch.tensor([0.5], requires_grad=True)
    loss, m = pairwise_reward_loss(chosen, rejected)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["accuracy"].item() == 0.0  # a tie is not a correct ordering
    loss.backward()
    # d/dgap of -log σ(gap) at 0 is -σ(-0) = -0.5
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def test_expected_calibration_error_by_hand():
    # 4 picks in 4 different bins (width 0.1), each weighing 1/4:
    #   0.95 right -> |1 - 0.95| = 0.05 ; 0.85 wrong -> |0 - 0.85| = 0.85
    #   0.55 right -> |1 - 0.55| = 0.45 ; 0.60 wrong -> |0 - 0.60| = 0.60
    # ECE = (0.05 + 0.85 + 0.45 + 0.60) / 4 = 0.4875
    ece = expected_calibration_error(torch.tensor([0.95, 0.85, 0.55, 0.6]), torch.tensor([1, 0, 1, 0]).bool())
    assert ece == pytest.approx(0.4875, abs=1e-6)


def test_calibration_error_is_zero_when_confidence_matches_accuracy():
    # one bin at 0.75 with 3 of 4 right
    assert expected_calibration_error(torch.full((4,), 0.75), torch.tensor([1, 1, 1, 0]).bool()) == pytest.approx(0)
    # probability 1.0 lands in the last bin
    assert expected_calibration_error(torch.tensor([1.0]), torch.tensor([True])) == pytest.approx(0)


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(right).tolist() == [2, 1]
    assert last_token_index(left).tolist() == [3, 3]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


# one pair: π_c = -4, π_r = -6, ρ_c = -5, ρ_r = -5  →  h = (-4 + 5) - (-6 + 5) = 1 + 1 = 2
PAIR = dict(policy_chosen=torch.tensor([-4.0]), policy_rejected=torch.tensor([-6.0]),
            ref_chosen=torch.tensor([-5.0]), ref_rejected=torch.tensor([-5.0]))


def test_dpo_sigmoid_by_hand():
    # β = 0.5: βh = 1; -log σ(1) = log(1 + e^-1) = 0.313262
    loss, m = dpo_loss(**PAIR, beta=0.5)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    # implicit rewards: 0.5·(−4 − −5) = 0.5 and 0.5·(−6 − −5) = −0.5 → margin 1, accuracy 1
    assert m["rewards_chosen"].item() == pytest.approx(0.5) and m["rewards_rejected"].item() == pytest.approx(-0.5)
    assert m["margin"].item() == pytest.approx(1.0) and m["accuracy"].item() == 1.0


def test_dpo_label_smoothing_by_hand():
    # ε = 0.1: 0.9·log(1 + e^-1) + 0.1·log(1 + e^1) = 0.9·0.313262 + 0.1·1.313262 = 0.281936 + 0.131326 = 0.413262
    loss, _ = dpo_loss(**PAIR, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.413262, abs=1e-6)


def test_sft_weight_adds_the_chosen_mean_nll_by_hand():
    # chosen: log-prob −4 over 2 tokens → mean NLL 2; 0.313262 + 0.5·2 = 1.313262
    loss, _ = dpo_loss(**PAIR, beta=0.5, sft_weight=0.5, chosen_len=torch.tensor([2.0]),
                       rejected_len=torch.tensor([3.0]))
    assert loss.item() == pytest.approx(1.313262, abs=1e-6)


def test_ipo_by_hand():
    # β = 0.5: target 1/(2β) = 1; (h − 1)² = (2 − 1)² = 1.  β = 0.25: target 2; (2 − 2)² = 0
    assert dpo_loss(**PAIR, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)
    assert dpo_loss(**PAIR, beta=0.25, loss_type="ipo")[0].item() == pytest.approx(0.0)


def test_hinge_by_hand():
    # β = 0.25: max(0, 1 − 0.5) = 0.5;  β = 1: max(0, 1 − 2) = 0
    assert dpo_loss(**PAIR, beta=0.25, loss_type="hinge")[0].item() == pytest.approx(0.5)
    assert dpo_loss(**PAIR, beta=1.0, loss_type="hinge")[0].item() == pytest.approx(0.0)


def test_simpo_is_reference_free_and_length_normalised():
    # lengths 2 and 3: mean log-probs −4/2 = −2 and −6/3 = −2; β = 2, γ = 0.5: -log σ(2·0 − 0.5) = log(1 + e^0.5)
    #   = log(2.648721) = 0.974077
    args = dict(beta=2.0, loss_type="simpo", chosen_len=torch.tensor([2.0]), rejected_len=torch.tensor([3.0]))
    loss, m = dpo_loss(**PAIR, **args)
    assert loss.item() == pytest.approx(0.974077, abs=1e-6)
    other_ref = {**PAIR, "ref_chosen": torch.tensor([0.0]), "ref_rejected": torch.tensor([-100.0])}
    assert dpo_loss(**other_ref, **args)[0].item() == pytest.approx(loss.item())
    assert m["margin"].item() == pytest.approx(0.0)


def test_unknown_dpo_loss_is_named():
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        dpo_loss(**PAIR, loss_type="kto")


def test_sequence_logps_by_hand():
    # vocab 2, uniform logits → every token log(1/2) = −0.693147; labels: prompt masked, 2 answer tokens
    logits = torch.zeros(1, 4, 2)
    labels = torch.tensor([[-100, -100, 1, 0]])
    logps, n = sequence_logps(logits, labels)
    assert n.item() == 2 and logps.item() == pytest.approx(2 * math.log(0.5), abs=1e-6)
    # make position 1 sure of token 1 (the label at position 2): its log-prob becomes ≈ 0
    logits[0, 1] = torch.tensor([-30.0, 30.0])
    assert sequence_logps(logits, labels)[0].item() == pytest.approx(math.log(0.5), abs=1e-6)


def test_chunked_answer_logps_equal_the_plain_path_with_gradients(tiny_model_dir, monkeypatch):
    """The chunked, recomputed vocabulary projection gives the same log-probs and gradients as full logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.modeling import heads

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    ids, mask = heads.pad_batch([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]], pad_id=0)
    labels = heads.answer_labels(ids, mask, [3, 2])

    def run(chunk):
        monkeypatch.setattr(heads, "CHUNK_ELEMENTS", chunk)
        model.zero_grad()
        logps, count = heads.labelled_logps(model, ids, mask, labels)
        logps.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logps.detach(), count, grads

    plain, n_plain, g_plain = run(1 << 40)
    chunked, n_chunked, g_chunked = run(1)  # one answer token per chunk
    assert torch.equal(n_plain, n_chunked) and n_plain.tolist() == [3, 2]
    assert torch.allclose(plain, chunked, atol=1e-5)
    assert g_plain.keys() == g_chunked.keys() and g_plain
    # float32 matmuls of other shapes round differently: per tensor, within 1e-4 of the gradient's size (a wrong
    # or missing token is off by the order of the gradient itself)
    assert all((g_plain[k] - g_chunked[k]).norm() <= 1e-4 * g_plain[k].norm() for k in g_plain)
