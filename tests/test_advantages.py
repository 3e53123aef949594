"""PPO arithmetic against numbers worked out by hand (the working is in the comments)."""

import math

import pytest
import torch

from align.rl.advantages import (
    KLController,
    RunningMoments,
    gae,
    kl_per_token,
    shaped_rewards,
    whiten,
)
from align.rl.losses import entropy, ppo_policy_loss, ppo_value_loss, token_logps
from align.rl.masked import masked_mean, masked_var

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_masked_mean_and_var():
    # kept entries 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 14/3, over n-1 = 2 → 7/3
    assert masked_mean(X, MASK).item() == pytest.approx(7 / 3)
    assert masked_var(X, MASK).item() == pytest.approx(7 / 3)
    assert masked_mean(X, MASK, dim=1).tolist() == pytest.approx([1.5, 4.0])


def test_whiten_uses_only_unmasked_entries_and_zeroes_padding():
    std = math.sqrt(7 / 3)
    expected = torch.tensor([[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0], [(4 - 7 / 3) / std, 0.0, 0.0]])
    assert torch.allclose(whiten(X, MASK), expected, atol=1e-6)
    kept_mean = torch.tensor([[(1 - 7 / 3) / std + 7 / 3, (2 - 7 / 3) / std + 7 / 3, 0.0],
                              [(4 - 7 / 3) / std + 7 / 3, 0.0, 0.0]])
    assert torch.allclose(whiten(X, MASK, shift_mean=False), kept_mean, atol=1e-6)


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))  # log 0.5 − log 0.25
    # k3 with ρ/π = 0.5: (0.5 − 1) − log 0.5 = 0.19315
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    assert kl_per_token(ref, logp, "k3").item() == pytest.approx(1.0 - math.log(2))  # ρ/π = 2: 1 − log 2
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(logp, ref, "k2")


def test_shaped_rewards_put_the_score_on_the_last_response_token():
    scores = torch.tensor([1.0, 2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.7, 0.7], [0.4, 0.4, 0.4]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # coef 0.5: row 1 −0.05, −0.1, −0.15 + 1; row 2 ends after one token: −0.25 + 2; row 3 is empty: nothing
    expected = torch.tensor([[-0.05, -0.1, 0.85], [1.75, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(shaped_rewards(scores, kl, mask, 0.5), expected)


def test_gae_by_hand_including_a_response_that_ends_early():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [2.0, 5.0, 5.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 9.0, 9.0]])  # row 2's padding values must be ignored
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 1: δ2 = 1 − .5 = .5, A2 = .5; δ1 = 0 + .5 − .5 = 0, A1 = .5·.5 = .25; A0 = .5·.25 = .125
    # row 2: one token, bootstraps from 0: δ0 = 2 + 0 − 1 = 1 = A0
    assert torch.allclose(adv, torch.tensor([[0.125, 0.25, 0.5], [1.0, 0.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.625, 0.75, 1.0], [2.0, 0.0, 0.0]]))
    # γ = 0.9, λ = 1: returns are the discounted reward-to-go, 0.81, 0.9, 1
    _, ret = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[0.81, 0.9, 1.0]]))


def test_running_moments_match_the_whole_sample():
    m = RunningMoments()
    m.update(torch.tensor([1.0, 2.0, 3.0]))
    m.update(torch.tensor([4.0, 5.0]))
    assert (m.mean, m.var, m.count) == (pytest.approx(3.0), pytest.approx(2.0), 5)  # population var of 1..5


def test_kl_controller_fixed_and_adaptive():
    fixed = KLController(0.2)
    assert fixed.update(100.0, 10) == 0.2
    up, down = KLController(0.2, target=6.0, horizon=10000), KLController(0.2, target=6.0, horizon=10000)
    # KL 9 vs target 6: error +0.5 clipped to +0.2 → 0.2·(1 + 0.2·100/10000) = 0.2004; KL 3: 0.2·(1 − 0.002)
    assert up.update(9.0, 100) == pytest.approx(0.2004)
    assert down.update(3.0, 100) == pytest.approx(0.1996)


def test_ppo_policy_loss_by_hand():
    ratio = torch.tensor([[1.5, 0.5, 1.1], [0.5, 1.0, 1.0]])
    adv = torch.tensor([[1.0, 1.0, -2.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, m = ppo_policy_loss(torch.log(ratio), torch.zeros(2, 3), adv, mask, clip_range=0.2)
    # (r 1.5, A 1): max(−1.5, −1.2) = −1.2 clipped; (0.5, 1): max(−0.5, −0.8) = −0.5;
    # (0.5, −1): max(0.5, 0.8) = 0.8 clipped; masked token (1.1, −2) ignored. Mean (−1.2 − 0.5 + 0.8)/3 = −0.3
    assert loss.item() == pytest.approx(-0.3)
    assert m["clip_fraction"].item() == pytest.approx(2 / 3)
    # ½·log² r: (0.164402 + 0.480453 + 0.480453)/2/3
    assert m["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 3)


def test_ppo_value_loss_by_hand():
    values, old = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 2.0]])
    returns, mask = torch.tensor([[1.2, 1.0]]), torch.ones(1, 2)
    loss, m = ppo_value_loss(values, old, returns, mask, clip_range=0.2)
    # token 1: V_clip = 0.5 + 0.2 = 0.7; max((1 − 1.2)², (0.7 − 1.2)²) = 0.25; token 2: (2 − 1)² = 1 → ½·1.25/2
    assert loss.item() == pytest.approx(0.3125)
    assert m["value_clip_fraction"].item() == pytest.approx(0.5)


def test_entropy_and_token_logps():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    # uniform over 2: log 2; (0.75, 0.25): −(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335
    assert entropy(logits)[0].tolist() == pytest.approx([math.log(2), 0.562335], abs=1e-6)
    assert token_logps(logits, torch.tensor([[1, 1]]))[0].tolist() == pytest.approx([math.log(0.5), math.log(0.25)])
