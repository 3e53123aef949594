"""The reward score is read at the answer's EOS: never at padding, whatever the padding side or the pad id."""

import pytest
import torch

from align.modeling.formatting import encode_scored
from align.modeling.heads import pad_batch, scoring_pad_id, sequence_scores
from align.modeling.models import load_base
from align.runtime.config import ModelConfig


def msgs(role, text):
    return [{"role": role, "content": text}]


@pytest.fixture(scope="module")
def rm(tiny_model_dir, tiny_tok):
    torch.manual_seed(1)
    model = load_base(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir)), task="score",
                      pad_token_id=tiny_tok.pad_token_id)
    return model.eval()


@pytest.fixture(scope="module")
def seqs(tiny_tok):
    q = msgs("user", "What is 2 + 3?")
    return [encode_scored(tiny_tok, q, msgs("assistant", a)) for a in
            ("5.", "2 + 3 = 5. The answer is 5.", "I think it is six, but I am really not sure about that.")]


def per_position(rm, ids):
    out = []
    hook = rm.score.register_forward_hook(lambda _m, _i, o: out.append(o))
    with torch.no_grad():
        rm(input_ids=torch.tensor([ids]))
    hook.remove()
    return out[0][0, :, 0]


def test_pad_batch_left_and_right():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_left_and_right_padding_give_the_same_scores(rm, seqs, tiny_tok):
    with torch.no_grad():
        right = sequence_scores(rm, *pad_batch(seqs, tiny_tok.pad_token_id, "right"))
        left = sequence_scores(rm, *pad_batch(seqs, tiny_tok.pad_token_id, "left"))
        alone = torch.cat([sequence_scores(rm, *pad_batch([s], tiny_tok.pad_token_id)) for s in seqs])
    assert torch.allclose(right, left, atol=1e-5)
    assert torch.allclose(right, alone, atol=1e-5)
    assert len(set(alone.tolist())) == 3  # the three answers do get different scores


def test_score_is_the_head_output_at_the_final_eos(rm, seqs, tiny_tok):
    assert all(s[-1] == tiny_tok.eos_token_id for s in seqs)
    with torch.no_grad():
        ours = sequence_scores(rm, *pad_batch(seqs, tiny_tok.pad_token_id))
    at_eos = torch.stack([per_position(rm, s)[-1] for s in seqs])
    assert torch.allclose(ours, at_eos, atol=1e-5)


def test_pad_equal_to_eos_misleads_plain_pooling_but_not_align(rm, seqs, tiny_tok):
    # SmolLM2's pad token is its EOS (the tiny tokenizer's too): "last token that is not pad" then lands on the token before the EOS
    assert tiny_tok.pad_token_id == tiny_tok.eos_token_id
    s = seqs[1]
    with torch.no_grad():
        plain = rm(input_ids=torch.tensor([s])).logits[0, 0]
        ours = sequence_scores(rm, *pad_batch([s], tiny_tok.pad_token_id))[0]
    positions = per_position(rm, s)
    assert torch.isclose(plain, positions[-2], atol=1e-5)  # the wrong token
    assert torch.isclose(ours, positions[-1], atol=1e-5)   # the EOS
    assert not torch.isclose(plain, ours, atol=1e-4)


def test_scoring_pad_is_not_eos_so_plain_pooling_agrees(rm, seqs, tiny_tok):
    pad = scoring_pad_id(tiny_tok)
    assert pad not in (tiny_tok.eos_token_id, tiny_tok.bos_token_id)
    assert all(pad not in s for s in seqs)
    rm.config.pad_token_id = pad
    try:
        ids, mask = pad_batch(seqs, pad, "right")
        with torch.no_grad():
            plain = rm(input_ids=ids, attention_mask=mask).logits[:, 0]
            ours = sequence_scores(rm, ids, mask)
    finally:
        rm.config.pad_token_id = tiny_tok.pad_token_id
    assert torch.allclose(plain, ours, atol=1e-5)
