"""Base models without a chat template get align's plain format (User: / Assistant: turns, the answer closed by
the tokenizer's own EOS right after its last word), and `model.chat_template` names a format."""

import shutil

import pytest
import torch

from align.modeling.formatting import encode, end_of_turn
from align.modeling.models import FALLBACK_CHAT_TEMPLATE, load_tokenizer
from align.runtime.errors import ModelError


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama as a base model ships: no chat template, EOS a document end."""
    d = tmp_path_factory.mktemp("no-template")
    shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True)
    for name in ("chat_template.jinja",):
        (d / name).unlink(missing_ok=True)
    import json
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_a_tokenizer_without_template_gets_the_plain_format(base_dir):
    tok = load_tokenizer(str(base_dir))
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE
    enc = encode(tok, [{"role": "user", "content": "What is 2 + 3?"}], [{"role": "assistant", "content": "5."}])
    assert tok.decode(enc.input_ids[:enc.prompt_len]).endswith("User: What is 2 + 3?\n\nAssistant:")
    assert enc.completion_ids[-1] == tok.eos_token_id and tok.decode(enc.completion_ids[:-1]) == " 5."
    assert end_of_turn(tok) == tok.eos_token


def test_model_chat_template_names_plain_or_a_file(tiny_model_dir, tmp_path):
    assert load_tokenizer(str(tiny_model_dir), chat_template="plain").chat_template == FALLBACK_CHAT_TEMPLATE
    own = tmp_path / "t.jinja"
    own.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    assert load_tokenizer(str(tiny_model_dir), chat_template=str(own)).chat_template == own.read_text()
    with pytest.raises(ModelError, match="model.chat_template='nope.jinja': no such file"):
        load_tokenizer(str(tiny_model_dir), chat_template="nope.jinja")


def test_a_short_sft_teaches_a_base_model_to_stop_in_the_plain_format(tmp_path):
    """A template-less base after a short SFT in the plain format ends its held-out answers with the EOS that closes
    the turn instead of running on to the token limit.

    The base is a tiny Llama saved as base models ship (no chat template). Two things a random tiny model needs
    that a real base has: peaked next-token distributions (initializer_range 0.3; a default random init is nearly
    uniform over the vocabulary and 60 steps barely move it), and an EOS embedding that is not zero — a config
    whose pad_token_id is the EOS id makes its embedding row zero at init, and with the output layer tied to the
    frozen embeddings no adapter can then ever raise the EOS logit."""
    import json

    from conftest import tiny_tokenizer, write_jsonl
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.modeling.generate import Sampling, sample_batch
    from align.runtime.config import SFTConfig, load_config
    from align.serving.trained import load_policy
    from align.stages import sft

    base = tmp_path / "base"
    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=None, initializer_range=0.3)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(str(base)).chat_template == FALLBACK_CHAT_TEMPLATE

    rows = [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}. The answer is {a + b}."}
            for a in range(1, 13) for b in range(1, 9)]
    train = write_jsonl(tmp_path / "train.jsonl", rows[::2])
    held_out = [[{"role": "user", "content": r["prompt"]}] for r in rows[1::2][:40]]
    out = sft.run(load_config(SFTConfig, None, [
        f"model.name_or_path={base}", f"runs_dir={tmp_path / 'runs'}", "run=base", f"data.train={train}",
        "data.eval=", "samples=0", "training.max_steps=60", "training.batch_size=8", "training.learning_rate=1e-2",
        "training.warmup_ratio=0", "lora.r=16", "lora.alpha=32"]))
    model, tok, _ = load_policy(out, "cpu")
    answers = sample_batch(model, tok, held_out, Sampling(), max_new_tokens=40)
    stopped = [bool(ids) and ids[-1] == tok.eos_token_id for ((_, ids),) in answers]
    assert sum(stopped) / len(stopped) >= 0.95, [text for ((text, _),) in answers][:5]
