"""GRPO / RLOO arithmetic against hand-computed numbers: group advantages and the clipped token-level loss."""

import math

import pytest
import torch

from align.rl.advantages import group_advantages
from align.rl.losses import grpo_policy_loss


def test_group_normalised_dr_grpo_and_leave_one_out_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two prompts, G = 4 answers each
    # group 1: mean 0.5, centred ±0.5, std (Bessel) = sqrt((4 · 0.25) / 3) = 0.57735; group 2: all alike
    adv, uniform = group_advantages(rewards, 4, "grpo")
    assert uniform.tolist() == [False, True]
    s = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # 0.86588
    assert adv.tolist() == pytest.approx([s, -s, -s, s, 0, 0, 0, 0], abs=1e-6)
    adv, _ = group_advantages(rewards, 4, "grpo", scale=False)  # Dr. GRPO: centred only
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # RLOO: answer 1 scored 1, the others' mean is (0 + 0 + 1) / 3, so 1 − 1/3 = 2/3 = 4/3 · 0.5
    adv, _ = group_advantages(rewards, 4, "rloo")
    assert adv.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    # G = 3, rewards (3, 0, 0): 3 − mean(0, 0) = 3; 0 − mean(3, 0) = −1.5
    adv, _ = group_advantages(torch.tensor([3.0, 0.0, 0.0]), 3, "rloo")
    assert adv.tolist() == pytest.approx([3.0, -1.5, -1.5])


def test_group_advantages_refuse_what_has_no_group():
    with pytest.raises(ValueError, match="at least 2 answers"):
        group_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="multiple of 4"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), 4)
    with pytest.raises(ValueError, match="unknown group advantage"):
        group_advantages(torch.tensor([1.0, 2.0]), 2, "ppo")


def _case():
    # ratios (exp(logp − old)) 1.5, 0.5 for answer 0 (A = +1) and 1.0, 1.3 for answer 1 (A = −1, 2nd token padding)
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.0, 1.3]]))
    return logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])


def test_clip_higher_objective_and_its_three_normalisations():
    logp, old, adv, mask = _case()
    # per token max(−A·r, −A·clip(r, 0.8, 1.28)): (0,0) r=1.5 → max(−1.5, −1.28) = −1.28 (clipped, high side);
    # (0,1) r=0.5 → max(−0.5, −0.8) = −0.5; (1,0) r=1 → 1.0; (1,1) is padding
    loss, m = grpo_policy_loss(logp, old, adv, mask, 0.2, 0.28, norm="token")
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.0) / 3)
    assert m["clip_high_fraction"].item() == pytest.approx(1 / 3) and m["clip_low_fraction"].item() == 0
    loss, _ = grpo_policy_loss(logp, old, adv, mask, 0.2, 0.28, norm="sequence")
    assert loss.item() == pytest.approx(((-1.28 - 0.5) / 2 + 1.0) / 2)  # per answer, then over answers
    loss, _ = grpo_policy_loss(logp, old, adv, mask, 0.2, 0.28, norm="constant", max_tokens=4)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.0) / (2 * 4))  # Dr. GRPO: B · max_tokens
    # symmetric clipping stops the good token's growth earlier: −1.2 instead of −1.28
    loss, _ = grpo_policy_loss(logp, old, adv, mask, 0.2, 0.2, norm="token")
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.0) / 3)


def test_the_low_clip_bounds_a_bad_answer_and_k3_kl_is_added_with_beta():
    logp = torch.log(torch.tensor([[0.5, 1.0]]))
    old, adv, mask = torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2)
    # A = −1, r = 0.5: max(0.5, clip(0.5, 0.8, 1.28) = 0.8) = 0.8 (clipped, low side); r = 1: 1.0
    loss, m = grpo_policy_loss(logp, old, adv, mask, 0.2, 0.28)
    assert loss.item() == pytest.approx((0.8 + 1.0) / 2) and "kl" not in m  # no reference, no KL
    assert m["clip_low_fraction"].item() == pytest.approx(0.5) and m["clip_high_fraction"].item() == 0
    # reference log-probs ln 2 above the policy's on token 2: k3 = e^{ln 2} − ln 2 − 1 = 1 − ln 2 = 0.30685
    ref = logp + torch.tensor([[0.0, math.log(2)]])
    loss, m = grpo_policy_loss(logp, old, adv, mask, 0.2, 0.28, ref_logp=ref, beta=0.1)
    assert m["kl"].item() == pytest.approx((1 - math.log(2)) / 2)
    assert loss.item() == pytest.approx((0.8 + 1.0 + 0.1 * (1 - math.log(2))) / 2)
    with pytest.raises(ValueError, match="needs the reference"):
        grpo_policy_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_tokens"):
        grpo_policy_loss(logp, old, adv, mask, norm="constant")


def test_the_gradient_at_the_sampling_policy_is_the_advantage_per_token():
    # at r = 1 nothing is clipped: d loss / d logp_t = −A_t / tokens (token norm), so a good answer's tokens rise
    logp = torch.zeros(2, 2, requires_grad=True)
    loss, _ = grpo_policy_loss(logp, torch.zeros(2, 2), torch.tensor([2.0, -1.0]), torch.ones(2, 2))
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-0.5, -0.5, 0.25, 0.25])
