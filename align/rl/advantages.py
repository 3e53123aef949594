"""PPO's reward and advantage arithmetic, pure: tensors in, tensors out, no model imports.

Shapes: B sequences, T response tokens (right-padded); `mask` is 1.0 on response tokens and 0.0 on padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from align.rl.masked import masked_mean, masked_var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries; with shift_mean=False the mean is kept (only rescaled).
    Masked entries come out as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ reference) at tokens sampled from the policy.

    k1 = log π − log ρ (unbiased, can be negative per token); k3 = (ρ/π − 1) − log(ρ/π) (unbiased, never
    negative, lower variance when the two are close).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1 or k3")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: −kl_coef·KL on every response token, plus the sequence's score on its last token.

    scores: (B,), kl and mask: (B, T). A response of length 0 gets nothing.
    """
    rewards = -kl_coef * kl * mask
    lengths = mask.sum(1).long()
    rows = torch.nonzero(lengths > 0).flatten()
    rewards[rows, lengths[rows] - 1] += scores[rows]
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses: (advantages, returns), both (B, T).

    δ_t = r_t + γ·V_{t+1} − V_t with V = 0 past the last token; A_t = δ_t + γλ·A_{t+1}; returns = A + V.
    Padding is zeroed first, so a response that ends early bootstraps from 0 at its end.
    """
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass
class RunningMoments:
    """Running mean and std of scalar rewards (Chan et al.'s parallel update), for reward normalisation."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))


@dataclass
class KLController:
    """The KL coefficient: fixed, or adaptive towards a target KL (proportional control, error clipped to ±0.2,
    as in Ziegler et al. 2019): coef ← coef·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon)."""

    coef: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None and self.target > 0:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef
