"""The one sampling path draws from the distribution whose log-probs the RL stages use: softmax(logits / T) and
nothing else — not the base's generation_config.json (a fixture sets top_k, repetition_penalty and temperature, as
Qwen2.5-Instruct's does) and not transformers' own generate-time defaults (top_k 50)."""

import json
import shutil

import pytest
import torch

from align.modeling.generate import Sampling, draw, generation_batch, sample_batch
from align.modeling.heads import pad_batch, states_logps
from align.modeling.models import attach_lora, load_base, load_tokenizer
from align.modeling.roles import Roles, make_batch
from align.runtime.config import LoraConfig, ModelConfig

# what an instruct model's generation_config.json may carry; every entry would reshape a draw if it leaked in
SHIPPED = {"do_sample": True, "top_k": 3, "top_p": 0.5, "temperature": 0.3, "repetition_penalty": 1.5,
           "min_new_tokens": 4, "no_repeat_ngram_size": 2}
PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Name a colour."}],
           [{"role": "user", "content": "What is 12 + 9? Think first."}]]


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with a shipped generation config, as a LoRA policy whose adapter changes the logits."""
    d = tmp_path_factory.mktemp("shipped-genconfig")
    shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True)
    saved = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**saved, **SHIPPED}))
    tok = load_tokenizer(str(d))
    torch.manual_seed(0)
    model = attach_lora(load_base(str(d), ModelConfig()), LoraConfig(r=4, dropout=0.0), quantized=False,
                        gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert model.get_base_model().generation_config.top_k == 3  # the fixture really ships it
    return model.eval(), tok


def drawn_with_scores(model, tok, temperature: float, seed: int = 0, n: int = 1):
    prompts = [tok.apply_chat_template(p, add_generation_prompt=True) for p in PROMPTS]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    ids, mask = pad_batch(prompts, tok.pad_token_id, side="left")
    torch.manual_seed(seed)
    out = draw(model, ids, mask, Sampling(temperature, n=n), 12, tok.eos_token_id, tok.pad_token_id, scores=True)
    return [p for p in prompts for _ in range(n)], ids, out


@pytest.mark.parametrize("temperature, n", [(1.0, 1), (0.7, 1), (1.0, 3)])
def test_rl_logps_equal_the_generators_own_scores(policy, temperature, n):
    """log_softmax of the processed logits generate() drew each token from equals the per-token log-probs PPO
    computes for that token at the same temperature (its ratios and KL assume exactly this). With n answers per
    prompt (GRPO) the prompt is read once and its cache handed to the n rows, on both sides."""
    model, tok = policy
    prompts, ids, out = drawn_with_scores(model, tok, temperature, n=n)
    answers = out.sequences[:, ids.shape[1]:]
    assert answers.shape[0] == len(PROMPTS) * n
    gen_logps = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # (B, T, V)
    picked = gen_logps.gather(-1, answers[..., None])[..., 0]
    responses = []
    for row in answers.tolist():  # up to and including the EOS, as the rollout keeps them
        responses.append(row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    batch = make_batch(prompts, responses, tok.pad_token_id, tok.eos_token_id, "cpu",
                       prompt_of=[i // n for i in range(len(prompts))] if n > 1 else None)
    with torch.no_grad():
        rl = Roles(model, torch.nn.Linear(64, 1), None).policy_logps(batch, temperature)
    m = batch.resp_mask.bool()
    assert m.sum() >= 12 * n  # something was drawn
    if n > 1:  # the n answers to a prompt are drawn apart, not copied
        assert len({tuple(r) for r in responses}) > len(PROMPTS)
    assert torch.isfinite(picked[:, :m.shape[1]][m]).all()  # no token drawn from outside a top-k
    assert torch.allclose(rl[m], picked[:, :m.shape[1]][m], atol=1e-4)


def test_plain_generate_would_have_used_the_shipped_settings(policy):
    """The same call without align's sampler: the shipped top_k 3 cuts the distribution (so the test above can
    tell the difference)."""
    model, tok = policy
    prompts = [tok.apply_chat_template(p, add_generation_prompt=True) for p in PROMPTS]
    ids, mask = pad_batch([p if isinstance(p, list) else p["input_ids"] for p in prompts], tok.pad_token_id,
                          side="left")
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True,
                         output_scores=True, pad_token_id=tok.pad_token_id)
    kept = torch.isfinite(out.scores[0]).sum(-1)
    assert (kept <= 3).all()  # top_k 3 (and top_p 0.5 within it)
    _, _, ours = drawn_with_scores(model, tok, 1.0)
    assert (torch.isfinite(ours.scores[0]).sum(-1) == len(tok)).all()


def test_the_sampler_leaves_the_models_generation_config_as_it_was(policy):
    model, tok = policy
    sample_batch(model, tok, PROMPTS[:1], Sampling(1.0, 1.0, 2), max_new_tokens=3)
    assert model.get_base_model().generation_config.top_k == 3
    assert model.get_base_model().generation_config.repetition_penalty == 1.5


def test_greedy_is_the_argmax_of_the_plain_logits(policy):
    """Greedy answers (evaluation, chat) ignore the shipped settings too: each token is the argmax of the model's
    own logits, with no repetition penalty, no n-gram ban and no minimum length."""
    model, tok = policy
    prompt = tok.apply_chat_template(PROMPTS[2], add_generation_prompt=True)
    prompt = torch.tensor([prompt if isinstance(prompt, list) else prompt["input_ids"]])
    out = draw(model, prompt, torch.ones_like(prompt), Sampling(), 8, tok.eos_token_id, tok.pad_token_id)
    ids = prompt
    with torch.no_grad():
        for _ in range(out.shape[1] - prompt.shape[1]):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_chunked_states_logps_equal_the_whole_and_keep_gradients(policy, monkeypatch):
    """states_logps in chunks (a vocabulary projection recomputed per chunk) gives the same log-probs, entropies
    and gradients as one pass."""
    from align.modeling import heads

    model, _ = policy
    torch.manual_seed(1)
    states = torch.randn(2, 5, 64, requires_grad=True)
    tokens = torch.randint(0, 512, (2, 5))
    whole, ent = states_logps(model, states, tokens, 0.7, with_entropy=True)
    (g_whole,) = torch.autograd.grad((whole.sum() + ent.sum()), states)
    monkeypatch.setattr(heads, "CHUNK_ELEMENTS", 3 * 512)  # 3 rows a chunk: 4 chunks for 10 rows
    chunked, ent_c = states_logps(model, states, tokens, 0.7, with_entropy=True)
    (g_chunked,) = torch.autograd.grad((chunked.sum() + ent_c.sum()), states)
    assert torch.allclose(whole, chunked, atol=1e-5) and torch.allclose(ent, ent_c, atol=1e-5)
    assert torch.allclose(g_whole, g_chunked, atol=1e-5)
    # the temperature is applied: T = 0.7 differs from T = 1
    assert not torch.allclose(states_logps(model, states, tokens, 1.0), whole, atol=1e-3)


def test_ppo_refuses_a_truncated_rollout_distribution(tmp_path):
    """top_p < 1 draws from a nucleus the PPO log-probs do not describe: refused before anything loads."""
    from align.runtime.config import PPOConfig, load_config
    from align.runtime.errors import ConfigError
    from align.stages import ppo

    cfg = load_config(PPOConfig, None, [f"runs_dir={tmp_path}", "rollout.top_p=0.9", "reward_model=x"])
    with pytest.raises(ConfigError, match=r"rollout.top_p=0.9: PPO's ratios .* Set rollout.top_p=1.0"):
        ppo.setup(cfg)


def test_the_generation_config_states_every_logits_setting():
    cfg = Sampling(0.7, 1.0, 2).generation_config(16, stop_id=5, pad_id=0)
    assert (cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty) == (True, 0.7, 0, 1.0, 1.0)
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.num_return_sequences, cfg.max_new_tokens) == (5, 0, 2, 16)
    assert Sampling(0.7).exact and not Sampling(0.7, 0.9).exact and not Sampling(0.0).exact


def test_generation_batch_follows_the_device_and_the_length():
    """On a CPU up to 64 answers share a decoding step, fewer as answers grow long; elsewhere 16."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert generation_batch(cpu, 57 + 48) == 64
    assert generation_batch(cpu, 1000 + 64) == 7
    assert generation_batch(cpu, 20000) == 1
    assert generation_batch(gpu, 57 + 48) == 16


def test_greedy_answers_do_not_depend_on_the_batch(policy):
    """The default batch (all three prompts at once here) answers as one prompt at a time does."""
    model, tok = policy
    alone = sample_batch(model, tok, PROMPTS, Sampling(), max_new_tokens=8, batch_size=1)
    together = sample_batch(model, tok, PROMPTS, Sampling(), max_new_tokens=8)
    assert [a[0][1] for a in together] == [a[0][1] for a in alone]
    assert any(len(a[0][1]) > 1 for a in alone)
