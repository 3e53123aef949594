"""What is measured of one policy, besides win-rates: perplexity on held-out answers, a sampled estimate of the
KL to a reference, and text overlap (BLEU, ROUGE-L) with reference answers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from align.data.rows import load_sft_data
from align.modeling.formatting import Messages, encode_prompt
from align.modeling.generate import Sampling, sample_batch
from align.modeling.heads import answer_labels, labelled_logps, pad_batch


@torch.no_grad()
def answer_logps(model, pad_id: int, seqs: list[list[int]], prompt_lens: list[int], batch_size: int = 16
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) summed log-probs of each sequence's answer tokens (after its prompt) and (N,) their counts, through
    the one log-prob path (chunked over a large vocabulary, the model's own logit transforms kept)."""
    device = next(model.parameters()).device
    sums, counts = [], []
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[start:start + batch_size], pad_id, device=device)
        logps, n = labelled_logps(model, ids, mask, answer_labels(ids, mask, prompt_lens[start:start + batch_size]))
        sums.append(logps.float().cpu())
        counts.append(n.cpu())
    return torch.cat(sums), torch.cat(counts)


def perplexity(model, tokenizer, spec: str, max_length: int, limit: int, batch_size: int = 8) -> float:
    """exp(mean NLL per answer token) on held-out SFT rows (prompt tokens masked, as SFT trained)."""
    rows = load_sft_data(spec, tokenizer, max_length, completion_only=True, limit=limit).encoded
    logps, n = answer_logps(model, tokenizer.pad_token_id, [r.input_ids for r in rows], [r.prompt_len for r in rows],
                            batch_size)
    return math.exp(-logps.sum().item() / max(int(n.sum()), 1))


def sampled_kl(model, tokenizer, messages: list[Messages], max_new_tokens: int, reference_ctx, seed: int = 0
               ) -> float:
    """KL(policy ‖ reference) per answer, estimated as the mean of log π(y|x) − log ρ(y|x) over one answer per
    prompt sampled from the policy at temperature 1 (the k1 estimator is unbiased only on the policy's own
    samples, not on greedy answers). Seeded, and the global RNG is restored afterwards."""
    prompts = [encode_prompt(tokenizer, m) for m in messages]  # once, for the sampler and both log-prob passes
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        drawn = sample_batch(model, tokenizer, messages, Sampling(1.0, 1.0, 1), max_new_tokens, desc="KL samples",
                             encoded=prompts)
    finally:
        torch.set_rng_state(state)
    answers = [a[0][1] or [tokenizer.eos_token_id] for a in drawn]
    seqs, lens = [p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts]
    was_training = model.training
    model.eval()
    logratio = answer_logps(model, tokenizer.pad_token_id, seqs, lens)[0]
    with reference_ctx(model):
        logratio -= answer_logps(model, tokenizer.pad_token_id, seqs, lens)[0]
    model.train(was_training)
    return logratio.mean().item()


def text_overlap(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 0–100) and mean ROUGE-L F1 (rouge-score, 0–1) of answers against references."""
    # sacrebleu and rouge-score load only when overlap is asked for
    import sacrebleu
    from rouge_score import rouge_scorer

    if not predictions or len(predictions) != len(references):
        raise ValueError("predictions and references must be non-empty and of equal length")
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)
    return {"bleu": bleu, "rouge_l": rouge}
