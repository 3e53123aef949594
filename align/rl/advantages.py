"""PPO's, GRPO's and RLOO's reward and advantage arithmetic, pure: tensors in, tensors out, no model imports.

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


GROUP_ADVANTAGES = ("grpo", "rloo")


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo", scale: bool = True,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-answer advantages from the rewards of G answers to the same prompt: (advantages (N,), uniform (N/G,)).

    rewards: (N,) laid out prompt by prompt, each prompt's G = `group_size` answers next to each other.
      grpo   A_i = (r_i − mean_g) / (std_g + eps), std with Bessel's correction; scale=False keeps r_i − mean_g
             (Dr. GRPO: dividing by a group's std over-weights prompts that are nearly solved or nearly hopeless)
      rloo   A_i = r_i − mean_{j≠i} r_j = G/(G−1)·(r_i − mean_g): each answer's baseline leaves it out
    `uniform` marks groups whose answers all scored alike: their advantages are 0, they teach nothing.
    """
    if group_size < 2:
        raise ValueError(f"group advantages need at least 2 answers per prompt, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N a multiple of {group_size}, got shape {tuple(rewards.shape)}")
    g = rewards.double().view(-1, group_size)
    centred = g - g.mean(1, keepdim=True)
    uniform = (g.max(1).values - g.min(1).values) == 0
    if estimator == "grpo":
        adv = centred / (g.std(1, keepdim=True) + eps) if scale else centred
    elif estimator == "rloo":
        adv = centred * group_size / (group_size - 1)
    else:
        raise ValueError(f"unknown group advantage {estimator!r}: use one of {', '.join(GROUP_ADVANTAGES)}")
    return adv.masked_fill(uniform.unsqueeze(1), 0.0).flatten().to(rewards.dtype), uniform
