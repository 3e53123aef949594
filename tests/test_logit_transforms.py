"""Families whose forward changes the logits after the output layer (Gemma-2's final-logit soft-capping, Cohere's
logit_scale): every path that computes log-probs from hidden states — PPO's response log-probs and the chunked
answer log-probs — gives the log-probs of the model's own logits."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

from align.modeling import heads
from align.modeling.roles import Roles, make_batch

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def gemma2():
    # a small cap makes soft-capping change every logit (tanh(x / 3) · 3 is far from x for |x| ≳ 1)
    return Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=3.0, sliding_window=16,
                                          attn_implementation="eager"))


def cohere():
    return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.25))


@pytest.fixture(params=[gemma2, cohere], ids=["gemma2-softcap", "cohere-logit-scale"])
def model(request):
    torch.manual_seed(0)
    base = request.param()
    with torch.no_grad():  # logits large enough that the transform matters
        base.get_output_embeddings().weight.mul_(40)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()


def own_logps(model, ids, mask):
    """log-softmax of the model's own forward logits: position t predicts token t + 1."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=heads.position_ids(mask)).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


def test_the_transform_really_changes_the_logits(model):
    states = torch.randn(3, 32)
    plain = model.get_base_model().get_output_embeddings()(states)
    assert (heads.output_logits(model, states) - plain).abs().max() > 1.0


def test_ppo_response_logps_are_the_models_own(model):
    prompts, responses = [[1, 5, 6, 7], [1, 8]], [[9, 10, 2], [11, 12, 13, 14]]
    batch = make_batch(prompts, responses, pad_id=0, eos_id=2, device="cpu")
    with torch.no_grad():
        got = Roles(model, torch.nn.Linear(32, 1), None).policy_logps(batch)
        want = own_logps(model, batch.ids, batch.mask)[:, batch.prompt_len - 1:]
    assert torch.allclose(got * batch.resp_mask, want * batch.resp_mask, atol=1e-5)


def test_chunked_answer_logps_are_the_models_own(model, monkeypatch):
    ids, mask = heads.pad_batch([[1, 5, 6, 7, 8, 2], [1, 9, 10, 2]], 0)
    labels = heads.answer_labels(ids, mask, [2, 2])
    with torch.no_grad():
        plain, n = heads.labelled_logps(model, ids, mask, labels)
        monkeypatch.setattr(heads, "CHUNK_ELEMENTS", 97 * 2)  # two positions per chunk
        chunked, n2 = heads.labelled_logps(model, ids, mask, labels)
        per_token = own_logps(model, ids, mask) * (labels[:, 1:] != -100)
    assert torch.equal(n, n2) and n.tolist() == [4, 2]
    assert torch.allclose(plain, per_token.sum(1), atol=1e-4)
    assert torch.allclose(chunked, plain, atol=1e-4)
