"""Every family, not one: tiny Llama-3, Qwen2.5, Gemma-2, Mistral and Phi-3 models with tokenizers built here
from each family's documented format (tests/families.py) go through the formatting invariants, SFT, the reward
model (its score read at the turn's end, whatever the padding, as `align score` reads it), DPO, PPO, a verified
merge, and generation that stops at the end of the turn."""

import json

import pytest
import torch
from conftest import pair_rows, write_jsonl
from families import FAMILIES, build_model, build_tokenizer

from align.modeling.formatting import encode, encode_prompt
from align.modeling.generate import Sampling, sample_batch
from align.modeling.heads import pad_batch, sequence_scores
from align.modeling.models import load_tokenizer
from align.runtime.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig, load_config
from align.runtime.errors import FormatError
from align.serving.score import ScoreRow

# an instruct model's shipped sampling defaults; the sampler must not pick them up (tests/test_sampling.py)
SHIPPED = {"do_sample": True, "top_k": 20, "top_p": 0.8, "temperature": 0.7, "repetition_penalty": 1.05}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def fam(request, tmp_path_factory):
    family = FAMILIES[request.param]
    path = build_model(family, build_tokenizer(family), tmp_path_factory.mktemp(family.name), SHIPPED)
    return family, path, load_tokenizer(str(path))


def prompt_of(family, system: bool = True):
    head = [{"role": "system", "content": "Be brief."}] if system and family.system else []
    return head + [{"role": "user", "content": "What is 2 + 3?"}]


def test_formatting_invariants(fam):
    family, _, tok = fam
    turn_end = tok.convert_tokens_to_ids(family.turn_end)
    assert tok.eos_token_id == turn_end  # the token that closes a turn is the one answers end with
    assert tok.pad_token is not None
    answer = [{"role": "assistant", "content": "2 + 3 = 5."}]
    for system in (True, False):
        enc = encode(tok, prompt_of(family, system), answer)
        ids = enc.input_ids
        if family.bos:  # one BOS, first, whether the template writes it, the tokenizer adds it, or both
            bos = tok.convert_tokens_to_ids(family.bos)
            assert ids[0] == bos and ids.count(bos) == 1
        else:
            assert tok.decode(ids[:1]) != "<|endoftext|>"
        completion = enc.completion_ids
        assert completion[-1] == turn_end and completion.count(turn_end) == 1  # closed by exactly one
        assert tok.decode(completion[:-1]).strip() == "2 + 3 = 5."  # the boundary: the answer and nothing else
        assert ids[:enc.prompt_len] == encode_prompt(tok, prompt_of(family, system))
        text = tok.decode(ids)
        if system and family.system:
            assert text.count("Be brief.") == 1
        if family.default_system:
            assert text.count(family.default_system) == (0 if system and family.name == "qwen2.5" else 1)
    if not family.system:  # Gemma's template refuses a system turn: the error says so
        with pytest.raises(FormatError, match="cannot render this role order"):
            encode(tok, [{"role": "system", "content": "x"}, {"role": "user", "content": "q"}], answer)


def test_generation_stops_at_the_end_of_the_turn(fam):
    """A model made to say the turn's end token first: the answer is that one token, and sampling stopped there
    (a sampler stopping at the shipped EOS alone would run on to max_new_tokens for Gemma and Phi-3)."""
    from align.modeling.models import ModelConfig, load_base

    family, path, tok = fam
    model = load_base(str(path), ModelConfig())
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 1e4
    model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out + bias)
    (drawn,) = sample_batch(model, tok, [prompt_of(family)], Sampling(1.0), max_new_tokens=6)
    text, tokens = drawn[0]
    assert tokens == [tok.eos_token_id] and text == ""


def test_greedy_answers_drawn_together_equal_those_drawn_alone(fam):
    """The evaluation draws up to 64 answers per generate() call on a CPU: with left padding under each family's
    BOS, pad token (or none) and template, a short prompt batched beside a long one answers as it does alone."""
    from align.modeling.models import ModelConfig, load_base

    family, path, tok = fam
    torch.manual_seed(0)
    model = load_base(str(path), ModelConfig())
    prompts = [[{"role": "user", "content": "Hi"}],
               [{"role": "user", "content": "What is 12 + 9? Say it in a long sentence, please, with the sum."}]]
    alone = sample_batch(model, tok, prompts, Sampling(), max_new_tokens=5, batch_size=1)
    together = sample_batch(model, tok, prompts, Sampling(), max_new_tokens=5)
    assert [a[0][1] for a in together] == [a[0][1] for a in alone]
    # n answers per prompt read the prompt once and hand its cache to n rows: the same draws as n copies of it
    torch.manual_seed(5)
    from_cache = [t for a in sample_batch(model, tok, prompts, Sampling(1.0, n=3), max_new_tokens=5) for _, t in a]
    torch.manual_seed(5)
    copies = sample_batch(model, tok, [p for p in prompts for _ in range(3)], Sampling(1.0), max_new_tokens=5)
    assert from_cache == [a[0][1] for a in copies] and len(set(map(tuple, from_cache))) > 2


def test_each_prompt_read_once_gives_the_log_probs_and_gradients_of_a_whole_pass(fam):
    """GRPO's answers to one prompt share that prompt's pass through the decoder (shared_prompt_states): under
    each family's padding, positions, attention (Gemma-2's sliding window and soft-capping, Phi-3's fused
    projections) the answers' log-probs and the adapter's gradients are those of one pass over every whole row."""
    from align.modeling.models import LoraConfig, ModelConfig, attach_lora, load_base
    from align.modeling.roles import Roles, make_batch

    family, path, tok = fam
    model = attach_lora(load_base(str(path), ModelConfig()), LoraConfig(r=4, alpha=8, dropout=0.0), False, False)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter adds nothing: give it a real difference from the base
            p.data.normal_(0, 0.3)
    questions = ["Hi", "What is 12 + 9? Say it in a long sentence, please.", "Why?"]
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    prompt_of = [0, 0, 1, 1, 1, 2]
    answers = [list(torch.randint(10, 200, (n,)).tolist()) + [tok.eos_token_id] for n in (3, 7, 1, 5, 2, 6)]
    roles = Roles(model, None, None)
    model.train()
    read: list[int] = []
    model.get_decoder().register_forward_pre_hook(lambda _m, _a, kw: read.append(kw["input_ids"].numel()),
                                                  with_kwargs=True)
    results = []
    for shared in (None, prompt_of):
        batch = make_batch([prompts[i] for i in prompt_of], answers, tok.pad_token_id, tok.eos_token_id, "cpu",
                           prompt_of=shared)
        read.clear()
        logp = roles.policy_logps(batch, 0.7)
        P, T = batch.prompt_len, batch.responses.shape[1]
        assert sum(read) == (6 * (P + T) if shared is None else 3 * P + 6 * T)
        (logp * batch.resp_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        results.append((logp.detach() * batch.resp_mask, grads))
    (whole, whole_grads), (once, once_grads) = results
    assert whole.abs().sum() > 0 and len(whole_grads) > 0
    torch.testing.assert_close(once, whole, atol=1e-5, rtol=1e-5)
    assert once_grads.keys() == whole_grads.keys()
    for n in whole_grads:
        torch.testing.assert_close(once_grads[n], whole_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_a_pairs_answers_reading_their_prompt_once_give_dpos_log_probs_and_gradients(fam):
    """DPO's shared layout (each pair's prompt read once for both answers) against whole right-padded rows: the
    same summed answer log-probs, answer lengths and adapter gradients, for pairs of different lengths."""
    from align.data.pairs import EncodedPair
    from align.modeling.models import LoraConfig, ModelConfig, attach_lora, load_base
    from align.stages import dpo

    family, path, tok = fam
    model = attach_lora(load_base(str(path), ModelConfig()), LoraConfig(r=4, alpha=8, dropout=0.0), False, False)
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    pairs = []
    for q, good, bad in [("What is 2 + 3?", "2 + 3 = 5.", "It is 6, I think, or maybe 7."),
                         ("Add 12 and 9, then say the sum in words.", "21: twenty-one.", "20.")]:
        chosen = encode(tok, [{"role": "user", "content": q}], [{"role": "assistant", "content": good}])
        rejected = encode(tok, [{"role": "user", "content": q}], [{"role": "assistant", "content": bad}])
        assert chosen.input_ids[:chosen.prompt_len] == rejected.input_ids[:rejected.prompt_len]
        pairs.append(EncodedPair(chosen.input_ids, rejected.input_ids, 0.0, chosen.prompt_len))
    read: list[int] = []
    model.get_decoder().register_forward_pre_hook(lambda _m, _a, kw: read.append(kw["input_ids"].numel()),
                                                  with_kwargs=True)
    model.train()
    results = []
    for shared in (False, True):
        batch = dpo._batch(pairs, tok.pad_token_id, "cpu", shared=shared)
        read.clear()
        logps, counts = dpo.answer_logps(model, batch)
        logps.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        results.append((logps.detach(), counts, grads, sum(read)))
    (lp, n, g, whole_read), (lp_s, n_s, g_s, once_read) = results
    assert n_s.tolist() == n.tolist() and min(n.tolist()) > 0 and len(g) > 0
    assert once_read < whole_read  # the prompts went through the decoder once, not twice
    torch.testing.assert_close(lp_s, lp, atol=1e-5, rtol=1e-5)
    for name in g:
        torch.testing.assert_close(g_s[name], g[name], atol=1e-5, rtol=1e-4, msg=name)


def test_every_stage_runs_and_the_reward_is_read_at_the_turns_end(fam, tmp_path):
    from align.serving import merge as merging
    from align.serving.score import load_reward_model
    from align.stages import dpo, ppo, reward, sft

    family, path, tok = fam
    rows = pair_rows([(a, b) for a in range(2, 6) for b in (3, 7)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    sft_rows = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    common = [f"model.name_or_path={path}", f"runs_dir={tmp_path / 'runs'}", "run=f", "data.eval=", "lora.r=4",
              "lora.alpha=8", "training.batch_size=4", "training.max_steps=1", "training.learning_rate=1e-3"]
    sft_dir = sft.run(load_config(SFTConfig, None, common + [f"data.train={sft_rows}", "samples=0"]))
    rm_dir = reward.run(load_config(RewardConfig, None, common + [f"data.train={pairs}", f"init_from_sft={sft_dir}"]))

    # the reward model's score is read at the turn's end, the same under left and right padding and in `align score`
    rm = load_reward_model(rm_dir, "cpu")
    assert rm.tokenizer.eos_token_id == tok.convert_tokens_to_ids(family.turn_end)
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    seqs = rm.encode(ScoreRow(prompt, [[{"role": "assistant", "content": "2 + 3 = 5."}],
                                       [{"role": "assistant", "content": "Maybe 6? Not sure."}]]))
    assert all(s[-1] == rm.tokenizer.eos_token_id for s in seqs)
    by_cli = torch.tensor(rm.score(seqs))
    with torch.no_grad():
        for side in ("left", "right"):
            ids, mask = pad_batch(seqs, rm.tokenizer.pad_token_id, side=side)
            assert torch.allclose(sequence_scores(rm.model, ids, mask), by_cli, atol=1e-5), side

    dpo_dir = dpo.run(load_config(DPOConfig, None, common + [f"data.train={pairs}", f"init_from_sft={sft_dir}",
                                                             "eval_prompts="]))
    ppo_dir = ppo.run(load_config(PPOConfig, None, common + [
        f"data.train={pairs}", f"init_from_sft={sft_dir}", f"reward_model={rm_dir}",
        "rollout.batch_size=4", "rollout.max_new_tokens=6", "eval_prompts="]))
    for out in (sft_dir, dpo_dir, ppo_dir):
        assert (out / "adapter_model.safetensors").is_file()
        assert load_tokenizer(str(out)).eos_token_id == tok.convert_tokens_to_ids(family.turn_end)
    summary = merging.merge(str(dpo_dir), str(tmp_path / "merged"))  # raises when verification fails
    assert summary["passed"] and summary["verification"]["top1_agreement"] == 1.0
    from transformers import GenerationConfig  # plain transformers' generate stops the merged policy at the turn end
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id[0] == tok.convert_tokens_to_ids(
        family.turn_end)


def test_grpo_answers_end_at_the_turns_end_and_rewards_see_plain_text(fam, tmp_path):
    """GRPO on every family: sampled answers that ended carry the family's turn end as their last token, the
    text a reward function receives holds no special token, and a step trains."""
    from align.runtime.config import GRPOConfig
    from align.stages import grpo

    family, path, tok = fam
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {a} + 1?", "answer": a + 1}
                                                       for a in range(4)])
    fn = tmp_path / "spy.py"  # a user's reward function that writes down the answers it is given
    fn.write_text(f"import json\ndef r(prompt, answer, row):\n    open({str(tmp_path / 'seen.jsonl')!r}, 'a')"
                  ".write(json.dumps(answer) + '\\n')\n    return float(len(answer) % 3)\n")
    cfg = load_config(GRPOConfig, None, [
        f"model.name_or_path={path}", f"runs_dir={tmp_path / 'runs'}", "run=f", f"data.train={prompts}",
        "lora.r=4", "lora.alpha=8", "rollout.batch_size=2", "grpo.num_generations=2", "rollout.max_new_tokens=6",
        "training.batch_size=4", "training.max_steps=1", "grpo.skip_uniform_groups=false", "eval_prompts=",
        f"rewards=[{fn}:r]"])
    prep = grpo.setup(cfg)
    roles = grpo.build_roles(prep)
    torch.manual_seed(0)
    batch, groups = grpo.sample_groups(roles, prep, [0, 1])
    turn_end = tok.convert_tokens_to_ids(family.turn_end)
    lengths = batch.resp_mask.sum(1).long()
    for i in range(len(groups.texts)):
        last = int(batch.responses[i, lengths[i] - 1])
        assert bool(batch.ended[i]) == (last == turn_end)
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert seen == groups.texts and len(seen) == 4
    specials = [t for t in tok.all_special_tokens if t]
    assert not any(s in text for s in specials for text in seen), seen
    out = grpo.run(cfg)
    assert (out / "adapter_model.safetensors").is_file()
    assert load_tokenizer(str(out)).eos_token_id == turn_end


def test_chat_talks_to_every_family_through_its_template(fam):
    """Two turns of `align chat` on a family's plain model directory (as a merged model is loaded): each turn's
    answer ends at the turn's end, holds no special token, goes back into the next prompt through the family's
    template; greedy means greedy, whatever sampling the model's generation_config.json ships."""
    import io

    from align.serving.chat import Speaker, interactive, reply
    from align.serving.policies import load_any_policy

    family, path, _ = fam
    model, tok = load_any_policy(path, "cpu")
    speaker = Speaker(str(path), model, tok)
    inputs = iter(["What is 2 + 3?", "And 4 + 5?", "/exit"])
    out = io.StringIO()
    system = "Be brief." if family.system else None
    assert interactive([speaker], Sampling(), 6, system, lambda _: next(inputs), out) == 0
    roles = [m["role"] for m in speaker.history]
    assert roles == (["system"] if system else []) + ["user", "assistant"] * 2
    answers = [m["content"] for m in speaker.history if m["role"] == "assistant"]
    specials = [t for t in tok.all_special_tokens if t]
    assert not any(s in a for a in answers for s in specials)
    for answer in answers:
        assert answer in out.getvalue() or not answer
    follow_up = speaker.history + [{"role": "user", "content": "Thanks"}]
    assert answers[0] in tok.decode(encode_prompt(tok, follow_up))
    again = reply(speaker, speaker.history[:-1], Sampling(), 6)  # the last question once more, greedily
    assert again == answers[1] == reply(speaker, speaker.history[:-1], Sampling(), 6)
