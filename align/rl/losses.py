"""Pure tensor-in → (loss, metrics) functions. No model imports, so each is tested with hand-computed numbers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.rl.masked import masked_mean


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley–Terry loss of a reward model on preference pairs: mean of -log σ(r_chosen - r_rejected - margin).

    chosen, rejected: (B,) scores; margin: (B,) or a scalar — a pair labelled "much better" can demand a larger
    gap. Metrics: accuracy (chosen scored strictly higher) and the mean gap r_chosen - r_rejected.
    """
    gap = chosen - rejected
    loss = -F.logsigmoid(gap - margin).mean()
    metrics = {"accuracy": (gap > 0).float().mean().detach(), "margin": gap.mean().detach()}
    return loss, metrics


def expected_calibration_error(prob: torch.Tensor, correct: torch.Tensor, bins: int = 10) -> float:
    """ECE: the share-weighted mean |accuracy - confidence| over equal-width confidence bins.

    prob: (N,) the predicted probability that the model's pick is right — for a reward model σ(|gap|), where the
    pick is the higher-scored side; correct: (N,) bool, whether the pick was right.
    """
    prob = prob.detach().double().flatten()
    correct = correct.detach().double().flatten()
    # a probability of exactly 1.0 belongs in the last bin, not past it
    idx = torch.clamp((prob * bins).long(), max=bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.double().mean().item() * abs(correct[sel].mean().item() - prob[sel].mean().item())
    return ece


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask → (B,) index of each row's last real token, for left- or right-padded batches alike.

    A reward model's score is read there (the EOS the formatting path appends), never at padding.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, time), got shape {tuple(attention_mask.shape)}")
    if not bool(attention_mask.any(dim=1).all()):
        raise ValueError("a row of the batch has no real token")
    t = attention_mask.shape[1]
    return t - 1 - attention_mask.long().flip(1).argmax(dim=1)


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) logits, (B, T) labels → (B,) summed log-probs of the labelled tokens, and (B,) their count.

    Position t's logits predict token t+1, so logits and labels are shifted against each other here.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    safe = torch.where(mask, labels, 0)
    return (token_logps(logits, safe) * mask).sum(-1), mask.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None,
             simpo_gamma: float = 0.5, sft_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference optimisation losses on (B,) summed answer log-probs.

    h = (π_c − ρ_c) − (π_r − ρ_r), the policy's log-ratio gain on chosen over rejected (π policy, ρ reference):
      sigmoid  −(1−ε)·log σ(βh) − ε·log σ(−βh)   DPO; ε = label_smoothing (conservative DPO, noisy labels)
      ipo      (h − 1/(2β))²                     IPO: regresses h to a target instead of pushing it up forever
      hinge    max(0, 1 − βh)                    SLiC-style: stops caring once a pair is separated by 1/β
      simpo    −log σ(β(π_c/|c| − π_r/|r|) − γ)  SimPO: reference-free, length-normalised; γ = simpo_gamma
    sft_weight w > 0 adds w·(−π_c/|c|), the chosen answers' mean token NLL (RPO): pairs that differ in a few
    tokens otherwise let DPO lower both answers' likelihood while it widens their gap.
    Metrics: implicit rewards β(π − ρ) of each side (for simpo β·mean log-prob), their accuracy and margin.
    """
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is defined for the sigmoid loss only, not {loss_type}")
    if loss_type == "simpo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("simpo needs the answer lengths (chosen_len, rejected_len)")
        reward_c, reward_r = beta * policy_chosen / chosen_len, beta * policy_rejected / rejected_len
        losses = -F.logsigmoid(reward_c - reward_r - simpo_gamma)
    else:
        reward_c, reward_r = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
        h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
        if loss_type == "sigmoid":
            losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        elif loss_type == "ipo":
            losses = (h - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            losses = torch.relu(1 - beta * h)
        else:
            raise ValueError(f"unknown DPO loss {loss_type!r}; one of {', '.join(DPO_LOSSES)}")
    if sft_weight:
        if chosen_len is None:
            raise ValueError("sft_weight needs the chosen answers' lengths (chosen_len)")
        losses = losses + sft_weight * (-policy_chosen / chosen_len)
    gap = (reward_c - reward_r).detach()
    metrics = {"rewards_chosen": reward_c.detach().mean(), "rewards_rejected": reward_r.detach().mean(),
               "accuracy": (gap > 0).float().mean(), "margin": gap.mean()}
    return losses.mean(), metrics


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, per token: max(−A·r, −A·clip(r, 1−ε, 1+ε)) with r = exp(logp − old_logp),
    averaged over the unmasked tokens. All inputs (B, T).

    Metrics: clip_fraction (tokens where the clipped term won) and approx_kl = mean ½(logp − old_logp)².
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    metrics = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask).detach(),
               "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask)}
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ½·max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, −ε, ε), masked mean."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, {"value_clip_fraction": masked_mean((clipped > unclipped).float(), mask).detach()}


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) log-probability of each token under (B, T, V) logits that predict it (already aligned)."""
    # log_softmax would build a second (B, T, V) tensor only to pick T entries of it; gather − logsumexp doesn't
    logits = logits.float()
    return torch.gather(logits, 2, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, T) entropy of the next-token distribution: logsumexp(z) − Σ softmax(z)·z."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - (F.softmax(logits, -1) * logits).sum(-1)


GRPO_NORMS = ("sequence", "token", "constant")


def grpo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     clip_low: float = 0.2, clip_high: float = 0.2, ref_logp: torch.Tensor | None = None,
                     beta: float = 0.0, norm: str = "token", max_tokens: int | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO/RLOO's token-level clipped objective with one advantage per answer. logp, old_logp, ref_logp, mask:
    (B, T); advantages: (B,).

    Per token: ℓ_t = max(−A·r_t, −A·clip(r_t, 1−ε_low, 1+ε_high)) + β·k3_t, with r_t = exp(logp − old_logp) and
    k3_t = exp(ref − logp) − (ref − logp) − 1 (KL(π‖ρ) estimated at π's own tokens; 0 and not needed when β = 0).
    ε_high > ε_low is DAPO's clip-higher: an unlikely token with a positive advantage may grow further before its
    gradient stops, which keeps exploration (entropy) from collapsing.
    How the tokens' losses become one number:
      sequence  mean over each answer's tokens, then over answers (GRPO: a long answer's tokens count less)
      token     sum over every token / the batch's token count (DAPO: every token counts the same)
      constant  sum over every token / (B · max_tokens) (Dr. GRPO: no length bias from the denominator)
    Metrics: clip_low_fraction / clip_high_fraction (tokens where the clipped term won, below / above), kl (the
    mean k3, only with a reference) and approx_kl = mean ½(logp − old_logp)² (how far the updates moved from the
    sampling policy).
    """
    if norm not in GRPO_NORMS:
        raise ValueError(f"unknown loss normalisation {norm!r}: use one of {', '.join(GRPO_NORMS)}")
    if norm == "constant" and not max_tokens:
        raise ValueError("norm='constant' needs max_tokens (the longest answer the sampler allows)")
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs the reference's log-probs (ref_logp)")
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(1)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
    if beta:
        per_token = per_token + beta * kl
    if norm == "sequence":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif norm == "token":
        loss = masked_mean(per_token, mask)
    else:
        loss = (per_token * mask).sum() / (mask.shape[0] * max_tokens)
    won = (clipped > unclipped).float()
    metrics = {"clip_low_fraction": masked_mean(won * (adv < 0).float(), mask).detach(),
               "clip_high_fraction": masked_mean(won * (adv > 0).float(), mask).detach(),
               "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask)}
    if ref_logp is not None:  # without a reference there is no KL to report (not a KL of 0)
        metrics["kl"] = masked_mean(kl.detach(), mask)
    return loss, metrics
