"""Pure tensor-in → (loss, metrics) functions. No model imports, so each is tested with hand-computed numbers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
