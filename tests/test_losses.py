"""Loss and reward-reading math against numbers computed by hand (arithmetic in the comments)."""

import math

import pytest
import torch

from align.losses import expected_calibration_error, last_token_index, pairwise_reward_loss


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
